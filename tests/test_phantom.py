"""The built-in phantom population: files, determinism, and factors visible in the images."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy.stats import spearmanr

from verydeepvae.data import atlas as atlas_mod
from verydeepvae.data.phantom import (
    LABELS,
    generate_population,
    generate_volume,
    read_participants,
    sample_factors,
    subject_seed,
    voxel_size_mm,
    write_phantom_montage,
)
from verydeepvae.errors import ConfigError
from verydeepvae.volume_io import grid_affine

R = 32


@pytest.fixture(scope="module")
def population():
    """16 in-memory subjects at 32^3: (volume, factors, labels)."""
    return [generate_volume(subject_seed(7, i), R, return_labels=True) for i in range(16)]


def test_population_files(tmp_path):
    paths = generate_population(3, R, tmp_path / "phantom", seed=5, progress=False)
    assert [p.name for p in paths] == ["sub-0001.nii.gz", "sub-0002.nii.gz", "sub-0003.nii.gz"]
    for path in paths:
        image = nib.load(str(path))
        assert image.shape == (R, R, R)
        assert image.get_data_dtype() == np.float32
        assert np.allclose(image.header.get_zooms(), voxel_size_mm(R))
        assert voxel_size_mm(R) == pytest.approx(6.0)
        assert np.allclose(image.affine, grid_affine((R, R, R), 6.0))
        data = image.get_fdata()
        assert data.min() >= 0.0 and data.max() <= 1.0
        assert data[0, 0, 0] == 0.0 and (data > 0).mean() > 0.15  # skull-stripped, brain fills the cube
    rows = read_participants(tmp_path / "phantom" / "participants.tsv")
    assert [r["participant_id"] for r in rows] == ["sub-0001", "sub-0002", "sub-0003"]
    for key in ("seed", "brain_scale", "atrophy", "ventricle_enlargement_mm", "cortical_thinning_mm", "lesion_count",
                "lesion_volume_ml", "csf_intensity", "wm_intensity", "gm_intensity", "lesion_intensity",
                "bias_field_strength", "noise_level", "rotation_x_deg", "translation_z_mm"):
        assert key in rows[0]
    assert int(rows[1]["seed"]) == subject_seed(5, 1)
    assert (tmp_path / "phantom" / "phantom_montage.png").stat().st_size > 1000


def test_deterministic_and_seed_recorded(tmp_path):
    a, fa = generate_volume(123, R)
    b, fb = generate_volume(np.random.default_rng(123), R)
    assert a.dtype == np.float32 and a.shape == (R, R, R)
    assert np.array_equal(a, b) and fa == fb
    assert not np.array_equal(a, generate_volume(124, R)[0])
    first = generate_population(2, 16, tmp_path / "a", seed=3, montage=False, progress=False)
    again = generate_population(3, 16, tmp_path / "b", seed=3, montage=False, progress=False)
    for p, q in zip(first, again):  # the first subjects do not depend on the population size
        assert np.array_equal(nib.load(str(p)).get_fdata(), nib.load(str(q)).get_fdata())
    row = read_participants(tmp_path / "a" / "participants.tsv")[1]
    assert np.array_equal(generate_volume(int(row["seed"]), 16)[0], nib.load(str(first[1])).get_fdata(dtype=np.float32))


def test_same_subject_at_every_resolution():
    drawn = set(sample_factors(np.random.default_rng(0)))
    f16 = generate_volume(11, 16)[1]
    f32 = generate_volume(11, 32)[1]
    assert {k: f16[k] for k in drawn} == {k: f32[k] for k in drawn}
    assert f16["brain_volume_ml"] == pytest.approx(f32["brain_volume_ml"], rel=0.1)


def test_labels_match_image(population):
    for volume, factors, labels in population:
        assert labels.dtype == np.uint8 and labels.shape == volume.shape
        assert set(np.unique(labels)) <= set(LABELS)
        assert np.all(volume[labels == 0] == 0.0)
        assert (labels == 5).any() and (labels == 2).any() and (labels == 3).any()
        if factors["lesion_count"] == 0:
            assert not (labels == 4).any()


def test_contrast_ordering(population):
    for volume, factors, labels in population:
        groups = {"csf": (1, 5), "gm": (2,), "wm": (3,), "lesion": (4,)}
        mean = {k: volume[np.isin(labels, c)].mean() for k, c in groups.items() if np.isin(labels, c).any()}
        assert mean["csf"] < mean["wm"] < mean["gm"], (factors, mean)
        if "lesion" in mean:
            assert mean["lesion"] > mean["gm"], (factors, mean)
        intensity = [factors[f"{k}_intensity"] for k in ("csf", "wm", "gm", "lesion")]
        assert intensity == sorted(intensity)


def test_atrophy_enlarges_csf_and_ventricles(population):
    atrophy = [f["atrophy"] for _, f, _ in population]
    csf_fraction = [np.isin(lab, (1, 5)).sum() / (lab > 0).sum() for _, _, lab in population]
    ventricles = [(lab == 5).sum() / (lab > 0).sum() for _, _, lab in population]
    assert spearmanr(atrophy, csf_fraction)[0] > 0.6
    assert spearmanr(atrophy, ventricles)[0] > 0.6
    # Measured volumes recorded with the factors agree with the label maps.
    assert spearmanr([f["ventricle_volume_ml"] for _, f, _ in population], ventricles)[0] > 0.8


def test_lesion_load_brightens_white_matter(population):
    load = [f["lesion_load"] for _, f, _ in population]
    bright = [
        ((vol > 1.1 * f["gm_intensity"]) & np.isin(lab, (3, 4))).sum() for vol, f, lab in population
    ]
    volume = [f["lesion_volume_ml"] for _, f, _ in population]
    assert spearmanr(load, bright)[0] > 0.6
    assert spearmanr(volume, bright)[0] > 0.6
    assert spearmanr(load, volume)[0] > 0.6


def test_montage_from_paths_and_arrays(tmp_path, population):
    write_phantom_montage([v for v, _, _ in population[:2]], tmp_path / "m.png")
    path = tmp_path / "one.nii.gz"
    nib.save(nib.Nifti1Image(population[0][0], grid_affine((R,) * 3, 6.0)), str(path))
    write_phantom_montage([path], tmp_path / "n.png")
    assert (tmp_path / "m.png").stat().st_size > 1000 and (tmp_path / "n.png").stat().st_size > 1000


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="resolution"):
        generate_volume(0, 4)
    with pytest.raises(ConfigError, match="number of subjects"):
        generate_population(0, R, tmp_path)


def test_packaged_atlas_and_notice():
    atlas = atlas_mod.load_atlas()
    assert atlas.source.endswith(atlas_mod.ATLAS_FILENAME)
    assert atlas.voxel_mm == 2.0
    ml = {k: getattr(atlas, k).sum() * 8 / 1000 for k in ("gm", "wm", "csf", "ventricle")}
    assert 800 < ml["gm"] < 1200 and 500 < ml["wm"] < 800 and 10 < ml["ventricle"] < 30 < ml["csf"]
    assert atlas_mod.packaged_atlas_path().stat().st_size < 1_500_000
    notice = (atlas_mod.packaged_atlas_path().parent / "NOTICE").read_text()
    assert "Louis Collins" in notice and "Fonov" in notice


@pytest.mark.slow
def test_atlas_rebuilt_from_nilearn_when_missing(monkeypatch, tmp_path):
    pytest.importorskip("nilearn", reason="nilearn is the optional [atlas] extra (make test installs it)")
    packaged = atlas_mod.load_atlas()
    monkeypatch.setattr(atlas_mod, "packaged_atlas_path", lambda: tmp_path / "missing.nii.gz")
    atlas_mod.load_atlas.cache_clear()
    try:
        rebuilt = atlas_mod.load_atlas()
    finally:
        atlas_mod.load_atlas.cache_clear()
    assert rebuilt.source == "nilearn"
    assert np.allclose(rebuilt.affine, packaged.affine)
    for key in ("gm", "wm", "csf", "ventricle"):
        assert np.array_equal(getattr(rebuilt, key), getattr(packaged, key))


# --- age and sex (issue 12) -------------------------------------------------------------------------


def test_age_and_sex_leave_the_subjects_stream_and_image_untouched(monkeypatch):
    from verydeepvae.data import phantom

    image, factors = generate_volume(21, 16)
    assert 45.0 <= factors["age"] <= 90.0 and factors["sex"] in ("F", "M")
    # without the demographics draw at all, every other factor and the image are bitwise the same
    monkeypatch.setattr(phantom, "draw_demographics", lambda *args: {})
    bare_image, bare = generate_volume(21, 16)
    assert np.array_equal(image, bare_image)
    assert {k: v for k, v in factors.items() if k not in ("age", "sex")} == bare


def test_a_subject_has_the_same_age_and_sex_at_every_resolution():
    a, b = generate_volume(33, 16)[1], generate_volume(33, 32)[1]
    assert (a["age"], a["sex"]) == (b["age"], b["sex"])


def test_age_rises_with_atrophy_and_lesion_load_and_men_have_larger_brains():
    from verydeepvae.data.phantom_demographics import draw_demographics

    rng = np.random.default_rng(0)
    rows = []
    for _ in range(400):
        f = sample_factors(rng)
        rows.append({**f, **draw_demographics(rng, f["atrophy"], f["lesion_load"], f["brain_scale"])})
    age = np.array([r["age"] for r in rows])
    male = np.array([r["sex"] == "M" for r in rows])
    assert age.min() >= 45 and age.max() <= 90 and 0.3 < male.mean() < 0.7
    assert spearmanr(age, [r["atrophy"] for r in rows])[0] > 0.8
    assert spearmanr(age, [r["lesion_load"] for r in rows])[0] > 0.1
    scale = np.array([r["brain_scale"] for r in rows])
    assert scale[male].mean() > scale[~male].mean() + 0.02


def test_a_subject_rendered_at_another_age_is_the_same_subject_older():
    seed = subject_seed(4, 2)
    own_image, own = generate_volume(seed, 16)
    again, again_f = generate_volume(seed, 16, age=own["age"])
    assert abs(again_f["age"] - own["age"]) < 1e-6 and abs(again_f["atrophy"] - own["atrophy"]) < 1e-6
    assert np.allclose(again, own_image, atol=1e-5)  # its own age: the subject itself
    ages = [50.0, 65.0, 80.0]
    older = [generate_volume(seed, 16, age=a)[1] for a in ages]
    assert [round(f["age"], 6) for f in older] == ages
    for key in ("atrophy", "ventricle_enlargement_mm", "ventricle_volume_ml", "csf_volume_ml"):
        assert older[0][key] < older[1][key] < older[2][key], key
    unchanged = set(own) - {"age", "atrophy", "ventricle_enlargement_mm", "cortical_thinning_mm"} - {
        k for k in own if k.endswith("_ml")} - {"lesion_count_periventricular", "lesion_count_deep"}
    assert all(older[0][k] == own[k] for k in unchanged)  # every other factor as drawn
    with pytest.raises(ValueError, match="outside the phantom's range"):
        generate_volume(seed, 16, age=95.0)


def test_participants_tsv_has_age_and_sex_and_old_tables_are_completed(tmp_path):
    from verydeepvae.data.phantom import CONDITIONABLE, IDENTITY_COLUMNS, complete_participants

    folder = tmp_path / "p"
    generate_population(3, 16, folder, seed=2, montage=False, progress=False)
    path = folder / "participants.tsv"
    header = path.read_text().splitlines()[0].split("\t")
    assert header[:7] == list(IDENTITY_COLUMNS) + ["age", "sex"]
    assert set(header) - set(IDENTITY_COLUMNS) == set(CONDITIONABLE)
    rows = read_participants(path)
    assert not complete_participants(folder)
    # a table written before age and sex existed gets them, with the values generate_volume draws
    old = [h for h in header if h not in ("age", "sex")]
    path.write_text("\n".join(["\t".join(old)] + ["\t".join(r[h] for h in old) for r in rows]) + "\n")
    assert complete_participants(folder)
    assert read_participants(path) == rows
