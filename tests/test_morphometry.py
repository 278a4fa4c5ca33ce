"""The report's tissue-volume estimator on phantom volumes preprocessed as for training.

Behaviour only (positive correlation with the recorded volumes, sane ratios, invariance to what
generated samples may differ in); the measured accuracy is in docs/morphometry.md.
"""

from __future__ import annotations

import numpy as np
import pytest

from verydeepvae.data import phantom
from verydeepvae.data.nifti_load import PreprocessSettings, preprocess_volume
from verydeepvae.evaluate import morphometry
from verydeepvae.metrics import tissue


@pytest.fixture(scope="module")
def preprocessed_32():
    """Ten 32³ phantoms (a population seed not used for fitting), preprocessed like evaluation."""
    settings = PreprocessSettings(resolution=32)
    vox = phantom.voxel_size_mm(32)
    volumes, sizes, factors = [], [], []
    for index in range(10):
        image, f = phantom.generate_volume(phantom.subject_seed(5, index), 32)
        volume, meta = preprocess_volume(image, np.full(3, vox), settings)
        volumes.append(volume)
        sizes.append(meta["voxel_size_mm"])
        factors.append(f)
    recorded = {k: np.array([f[c] for f in factors]) for k, c in morphometry.RECORDED.items()}
    return volumes, sizes, recorded


def test_estimates_track_the_recorded_volumes(preprocessed_32):
    volumes, sizes, recorded = preprocessed_32
    table = morphometry.volume_table(volumes, sizes)
    assert set(table) == set(morphometry.FEATURES)
    fit = morphometry.recovery(table, recorded)
    for k in ("gm_ml", "wm_ml", "csf_ml", "brain_ml", "ventricle_ml"):
        assert fit[k]["pearson_r"] > 0.3, (k, fit[k])
    for k in ("gm_ml", "wm_ml", "csf_ml", "brain_ml", "ventricle_ml", "lesion_ml"):
        assert 0.5 < fit[k]["ratio"] < 2.0, (k, fit[k])
    # GM, WM, CSF and lesions are parts of the brain
    parts = table["gm_ml"] + table["wm_ml"] + table["csf_ml"] + table["lesion_ml"]
    np.testing.assert_allclose(parts, table["brain_ml"], rtol=1e-9)
    assert np.all(table["ventricle_ml"] < table["csf_ml"])


def test_estimates_ignore_global_intensity_scale_and_faint_background(preprocessed_32):
    volumes, sizes, _ = preprocessed_32
    rng = np.random.default_rng(0)
    for volume, size in zip(volumes[:4], sizes[:4]):
        base = morphometry.estimate_volumes(volume, size)
        scaled = morphometry.estimate_volumes(volume * 0.9, size)
        speckled = np.where(volume > 0, volume, rng.uniform(0.0, 0.04, volume.shape)).astype(np.float32)
        noisy = morphometry.estimate_volumes(speckled, size)
        for k in morphometry.FEATURES:
            assert scaled[k] == pytest.approx(base[k], rel=0.03, abs=0.5), k
            assert noisy[k] == pytest.approx(base[k], rel=0.05, abs=1.0), k


def test_estimates_are_deterministic_and_need_the_voxel_size(preprocessed_32):
    volumes, sizes, _ = preprocessed_32
    a = morphometry.estimate_volumes(volumes[0], sizes[0])
    assert a == morphometry.estimate_volumes(volumes[0].copy(), sizes[0])
    doubled = morphometry.estimate_volumes(volumes[0], 2 * sizes[0])
    # ml scale with the voxel volume; lengths in mm (channel width, depths) change the details only
    assert doubled["brain_ml"] == pytest.approx(8 * a["brain_ml"], rel=0.03)


def test_partial_volume_maps_are_fractions(preprocessed_32):
    volumes, sizes, _ = preprocessed_32
    out = tissue.flair_partial_volumes(volumes[0], sizes[0], return_maps=True)
    maps = out["maps"]
    total = sum(maps[k] for k in ("csf", "gm", "wm", "lesion"))
    assert total.min() >= 0 and total.max() <= 1 + 1e-9
    assert np.isclose(total.max(), 1.0)
    for k in ("csf", "gm", "wm", "lesion"):
        assert maps[k].min() >= 0 and maps[k].max() <= 1
    for row in zip(*tissue.PV_INTERIOR.values()):
        assert sum(row) == pytest.approx(1.0, abs=0.011)
    assert 0.5 < out["reference"] / np.median(volumes[0][volumes[0] > 0.02]) < 2.0


def test_degenerate_volumes_do_not_crash():
    empty = tissue.flair_partial_volumes(np.zeros((16, 16, 16)), 2.0)
    assert empty["brain_ml"] == 0 and empty["csf_ml"] == 0
    speck = np.zeros((16, 16, 16))
    speck[7:9, 7:9, 7:9] = 0.5
    out = morphometry.estimate_volumes(speck, 2.0)
    assert out["brain_ml"] == pytest.approx(8 * 0.008)
    cube = np.zeros((20, 20, 20))
    cube[4:16, 4:16, 4:16] = 0.6  # constant interior: no tissue contrast
    out = morphometry.estimate_volumes(cube, 2.0)
    assert all(np.isfinite(v) for v in out.values())
    with pytest.raises(ValueError):
        tissue.flair_partial_volumes(np.zeros((16, 16, 16)), 0.0)
