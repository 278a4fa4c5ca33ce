"""Loading and preprocessing one volume: dtypes, orientation, anisotropy, intensities, bad files."""

from __future__ import annotations

import gzip
import re

import nibabel as nib
import numpy as np
import pytest

from test_data_helpers import centred_affine, extents, textured_ball, world_coords, write
from verydeepvae.data.nifti_load import PreprocessSettings, open_image, preprocess_file
from verydeepvae.errors import DataError

S16 = PreprocessSettings(resolution=16)
S32 = PreprocessSettings(resolution=32)


def _check_output(volume, R):
    assert volume.shape == (R, R, R) and volume.dtype == np.float32
    assert volume.min() >= 0.0 and volume.max() <= 1.0
    assert volume[0, 0, 0] == 0.0  # background


def test_sphere_in_physical_space_stays_a_sphere_with_anisotropic_voxels(tmp_path):
    shape, zooms = (96, 80, 24), (1.0, 1.25, 4.0)
    affine = centred_affine(shape, zooms)
    path = write(tmp_path / "aniso.nii.gz", textured_ball(shape, affine, radius_mm=30, centre=(5, -4, 2)), affine)
    volume, meta = preprocess_file(path, S32)
    _check_output(volume, 32)
    ext = extents(volume, 0.3)
    assert max(ext) - min(ext) <= 1, ext  # not an ellipsoid
    # The ball (60 mm) spans the crop; the cube side is 60 mm plus the margins.
    assert ext[0] == pytest.approx(60.0 / meta["voxel_size_mm"], abs=1.5)
    assert meta["source_voxel_size_mm"] == pytest.approx(list(zooms))


def test_box_keeps_its_aspect_ratio_and_is_padded_not_stretched(tmp_path):
    shape = (60, 30, 20)  # 1 mm voxels: a 50 x 20 x 10 mm bright box
    data = np.zeros(shape, np.float32)
    data[5:55, 5:25, 5:15] = 100 + np.random.default_rng(0).normal(0, 3, (50, 20, 10))
    path = write(tmp_path / "box.nii", data, centred_affine(shape, (1, 1, 1)))
    volume, meta = preprocess_file(path, S32)
    ext = extents(volume, 0.3)
    assert ext[0] / ext[1] == pytest.approx(50 / 20, rel=0.12)
    assert ext[0] / ext[2] == pytest.approx(50 / 10, rel=0.2)
    assert meta["voxel_size_mm"] == pytest.approx(50 * 1.12 / 32, rel=0.02)


@pytest.mark.parametrize("flip", [(True, True, False), (True, False, True), (False, False, False)])
def test_left_stays_left_whatever_the_stored_orientation(tmp_path, flip):
    shape, zooms = (40, 44, 36), (2.0, 2.0, 2.0)
    affine = centred_affine(shape, zooms, flip)
    xyz = world_coords(shape, affine)
    data = textured_ball(shape, affine, radius_mm=30)
    marker_left = np.linalg.norm(xyz - np.array([-18.0, 0.0, 0.0]), axis=-1) < 6  # x < 0: left in RAS
    marker_up = np.linalg.norm(xyz - np.array([0.0, 8.0, 18.0]), axis=-1) < 5  # anterior, superior
    data[marker_left] = 1000.0
    data[marker_up] = 1000.0
    # The marker is tiny, so clamp at 100% to keep it the brightest thing.
    volume, _ = preprocess_file(write(tmp_path / "m.nii.gz", data, affine), PreprocessSettings(32, (0.0, 100.0)))
    bright = np.argwhere(volume > 0.9)
    low_x = bright[bright[:, 0] < 16]
    high_z = bright[bright[:, 2] > 16]
    assert len(low_x) > 0 and low_x[:, 1].mean() == pytest.approx(15.5, abs=2)  # the left blob
    assert len(bright[(bright[:, 0] > 20)]) == 0  # nothing bright on the right
    assert high_z[:, 1].mean() > 16  # the superior blob is anterior too


def test_lps_image_matches_its_ras_twin(tmp_path):
    shape, zooms = (30, 34, 28), (2.0, 1.5, 2.5)
    ras = centred_affine(shape, zooms)
    data = textured_ball(shape, ras, radius_mm=18, centre=(-6, 3, 2))
    a = preprocess_file(write(tmp_path / "ras.nii.gz", data, ras), S16)[0]
    lps = centred_affine(shape, zooms, (True, True, False))
    b = preprocess_file(write(tmp_path / "lps.nii.gz", data[::-1, ::-1, :].copy(), lps), S16)[0]
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_stored_dtypes_and_scaling_give_the_same_volume(tmp_path):
    shape = (24, 24, 24)
    affine = centred_affine(shape, (2, 2, 2))
    data = np.round(textured_ball(shape, affine, radius_mm=18) / 4)  # integers 0..~115
    reference = preprocess_file(write(tmp_path / "f64.nii", data, affine, np.float64), S16)[0]
    for name, dtype, slope in [("u8.nii.gz", np.uint8, None), ("i16.nii.gz", np.int16, None),
                               ("f32.nii.gz", np.float32, None)]:
        out = preprocess_file(write(tmp_path / name, data, affine, dtype, slope), S16)[0]
        np.testing.assert_allclose(out, reference, atol=1e-4, err_msg=name)
    # int16 with scl_slope/scl_inter: stored values 2*data+7, scaled back to data by nibabel
    stored = write(tmp_path / "slope.nii.gz", data * 2 + 7, affine, np.int16, slope=0.5, inter=-3.5)
    image = nib.load(str(stored))
    assert image.get_data_dtype() == np.int16 and image.dataobj.slope == 0.5
    out, meta = preprocess_file(stored, S16)
    np.testing.assert_allclose(out, reference, atol=1e-4)
    assert meta["clamp_high"] == pytest.approx(np.percentile(data[data > 10], 99.95), rel=0.02)


def test_singleton_4d_is_accepted_and_nii_equals_nii_gz(tmp_path):
    shape = (20, 20, 20)
    affine = centred_affine(shape, (2, 2, 2))
    data = textured_ball(shape, affine, radius_mm=15)
    three = preprocess_file(write(tmp_path / "a.nii", data, affine), S16)[0]
    gz = preprocess_file(write(tmp_path / "a.nii.gz", data, affine), S16)[0]
    four = preprocess_file(write(tmp_path / "b.nii.gz", data[..., None], affine), S16)[0]
    np.testing.assert_array_equal(three, gz)
    np.testing.assert_array_equal(three, four)


def test_intensity_clamp_uses_foreground_percentiles(tmp_path):
    shape = (24, 24, 24)
    affine = centred_affine(shape, (2, 2, 2))
    data = textured_ball(shape, affine, radius_mm=18)
    data[12, 12, 12] = 1e6  # one hot voxel must not squash the rest
    out, meta = preprocess_file(write(tmp_path / "hot.nii.gz", data, affine), S16)
    assert meta["clamp_high"] < 1000
    assert out[out > 0].mean() > 0.3


def _ball_with_lesions(tmp_path, name, lesion_fraction):
    """A FLAIR-like ball: dark fluid at the centre (60), tissue (300), a brighter shell (400), and
    a share of the shell set to a lesion value of 760 (1.9x the brighter tissue)."""
    shape = (32, 32, 32)
    affine = centred_affine(shape, (2, 2, 2))
    data = textured_ball(shape, affine, radius_mm=28)
    inside = data > 0
    inner = np.linalg.norm(world_coords(shape, affine), axis=-1) < 18
    data[inner & inside] -= 100.0
    data[np.linalg.norm(world_coords(shape, affine), axis=-1) < 8] = 60.0
    rng = np.random.default_rng(1)
    candidates = np.flatnonzero(inside & ~inner)
    lesions = rng.choice(candidates, int(lesion_fraction * inside.sum()), replace=False)
    data.ravel()[lesions] = 760.0 + rng.normal(0, 20, lesions.size)
    normal = inside.copy()
    normal.ravel()[lesions] = False
    return write(tmp_path / name, data, affine), data, normal


@pytest.mark.parametrize("anchor", [None, 90.0])
def test_lesions_darken_normal_tissue_unless_an_anchor_percentile_sets_the_scale(tmp_path, anchor):
    settings = PreprocessSettings(resolution=32, anchor_percentile=anchor)
    scales = []
    for fraction in (0.0, 0.03):
        path, data, normal = _ball_with_lesions(tmp_path, f"lesions_{fraction}.nii.gz", fraction)
        out, meta = preprocess_file(path, settings)
        _check_output(out, 32)
        scales.append(meta["clamp_high"] - meta["clamp_low"])
    change = scales[1] / scales[0]  # how much further normal tissue is squeezed by the lesions
    if anchor is None:
        assert change > 1.5  # the upper clamp percentile is now a lesion value
    else:
        assert abs(change - 1.0) < 0.05
        # the anchor (a shell value, about 400) lands at 0.5, and lesions (about 760) stay below 1
        model = (data - meta["clamp_low"]) / (meta["clamp_high"] - meta["clamp_low"])
        assert 0.45 < np.percentile(model[normal], 90) < 0.55
        assert np.percentile(model[data > 700], 50) < 1.0


def test_without_an_anchor_the_settings_and_cache_key_are_as_before_anchors():
    assert "anchor_percentile" not in S16.to_dict()
    assert PreprocessSettings(resolution=16, anchor_percentile=90.0).key() != S16.key()


def test_non_finite_voxels_become_background_with_a_warning(tmp_path):
    shape = (20, 20, 20)
    affine = centred_affine(shape, (2, 2, 2))
    data = textured_ball(shape, affine, radius_mm=15)
    data[0, :3, :3] = np.nan
    data[1, 0, 0] = np.inf
    out, meta = preprocess_file(write(tmp_path / "nan.nii.gz", data, affine), S16)
    assert np.isfinite(out).all() and out.max() <= 1
    assert "10 non-finite" in meta["warnings"][0] and "nan.nii.gz" in meta["warnings"][0]


def _copy(source, target):
    target.write_bytes(source.read_bytes())
    return target


def _bad_files(tmp_path):
    shape = (16, 16, 16)
    affine = centred_affine(shape, (2, 2, 2))
    ball = textured_ball(shape, affine, radius_mm=12)
    good_gz = write(tmp_path / "good.nii.gz", ball, affine)
    truncated_gz = tmp_path / "truncated.nii.gz"
    truncated_gz.write_bytes(good_gz.read_bytes()[: good_gz.stat().st_size // 2])
    good = write(tmp_path / "good.nii", ball, affine)
    truncated = tmp_path / "truncated.nii"
    truncated.write_bytes(good.read_bytes()[:1000])
    text = tmp_path / "text.nii"
    text.write_text("this is not an image\n" * 40)
    gz_garbage = tmp_path / "garbage.nii.gz"
    gz_garbage.write_bytes(gzip.compress(b"\0" * 2000))
    return {
        "truncated.nii.gz": (truncated_gz, r"truncated or corrupt|cannot be read"),
        "truncated.nii": (truncated, r"truncated or corrupt|cannot be read"),
        "text.nii": (text, "cannot be read as NIfTI"),
        "garbage.nii.gz": (gz_garbage, "cannot be read as NIfTI"),
        "misnamed.nii": (_copy(good_gz, tmp_path / "misnamed.nii"), "gzip-compressed, so it should be named .nii.gz"),
        "flat.nii": (write(tmp_path / "flat.nii", np.ones((16, 16), np.float32)), "2D image"),
        "slab.nii": (write(tmp_path / "slab.nii", np.ones((16, 16, 1), np.float32)), "2D image"),
        "series.nii.gz": (write(tmp_path / "series.nii.gz", np.stack([ball] * 3, -1), affine), r"4D series .*\(3 volumes\)"),
        "constant.nii": (write(tmp_path / "constant.nii", np.full(shape, 7.0, np.float32), affine), "constant"),
        "zeros.nii": (write(tmp_path / "zeros.nii", np.zeros(shape, np.float32), affine), "all voxels are zero"),
        "allnan.nii": (write(tmp_path / "allnan.nii", np.full(shape, np.nan, np.float32), affine), "no finite voxel"),
        "speck.nii": (write(tmp_path / "speck.nii", np.pad(np.ones((1, 1, 1), np.float32), 7), affine), "almost no foreground"),
    }


def test_every_bad_file_raises_a_data_error_naming_it(tmp_path):
    for name, (path, problem) in _bad_files(tmp_path).items():
        with pytest.raises(DataError) as caught:
            preprocess_file(path, S16)
        message = str(caught.value)
        assert name in message, message
        assert re.search(problem, message), f"{name}: {message}"


def test_header_check_is_quick_and_catches_shape_problems(tmp_path):
    files = _bad_files(tmp_path)
    for name in ("flat.nii", "slab.nii", "series.nii.gz", "text.nii"):
        with pytest.raises(DataError, match=name.replace(".", r"\.")):
            open_image(files[name][0])
    assert open_image(files["constant.nii"][0]).shape == (16, 16, 16)  # needs the voxels to tell
