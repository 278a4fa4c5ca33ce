"""The preprocessed-volume cache: used on later passes, never stale, safe to damage."""

from __future__ import annotations

from unittest import mock

import nibabel as nib
import numpy as np
import pytest

from test_data_helpers import data_config, good_volume
from verydeepvae.data import build_datasets
from verydeepvae.data import nifti_load
from verydeepvae.data.cache import VolumeCache, file_digest
from verydeepvae.data.nifti_load import PreprocessSettings


@pytest.fixture
def folder(tmp_path):
    for i in range(5):
        good_volume(tmp_path / "in" / f"s{i}.nii.gz", seed=i)
    return tmp_path / "in"


def _counting_load():
    return mock.patch.object(nifti_load.nib, "load", side_effect=nib.load)


def test_second_build_and_every_item_read_no_nifti(folder, tmp_path):
    cfg = data_config(folder, tmp_path / "run")
    first = build_datasets(cfg, tmp_path / "run")
    items = [first.train[i].clone() for i in range(len(first.train))]
    with mock.patch.object(nifti_load.nib, "load", side_effect=AssertionError("NIfTI decoded again")):
        again = build_datasets(cfg, tmp_path / "run")
        for i, item in enumerate(items):
            assert torch_equal(again.train[i], item)
        for i in range(len(again.val)):
            again.val[i]
    assert again.train_files == first.train_files


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_cache_is_shared_between_runs_and_keyed_by_content_not_name(folder, tmp_path):
    cache_dir = tmp_path / "shared_cache"
    build_datasets(data_config(folder, tmp_path / "a", cache_dir=str(cache_dir)), tmp_path / "a")
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for path in folder.iterdir():
        (renamed / ("copy_" + path.name)).write_bytes(path.read_bytes())
    with _counting_load() as load:
        build_datasets(data_config(renamed, tmp_path / "b", cache_dir=str(cache_dir)), tmp_path / "b")
    assert load.call_count == 0


@pytest.mark.parametrize("change", [
    {"resolution": 32},
    {"clamp_percentiles": [1.0, 99.0]},
    {"crop_to_foreground": False},
    {"intensity_anchor_percentile": 90.0},
])
def test_changing_a_preprocessing_setting_invalidates_the_cache(folder, tmp_path, change):
    cache_dir = str(tmp_path / "cache")
    build_datasets(data_config(folder, tmp_path / "a", cache_dir=cache_dir), tmp_path / "a")
    with _counting_load() as load:
        bundle = build_datasets(data_config(folder, tmp_path / "b", cache_dir=cache_dir, **change), tmp_path / "b")
    assert load.call_count >= 5
    R = change.get("resolution", 16)
    assert bundle.train[0].shape == (1, R, R, R)


def test_a_changed_file_is_preprocessed_again(folder, tmp_path):
    cfg = data_config(folder, tmp_path / "run", train_fraction=0.5)
    before = build_datasets(cfg, tmp_path / "run")
    target = before.train_files[0]
    good_volume(folder / target.split("/")[-1], seed=99, shape=(30, 20, 20))  # same name, new content
    with _counting_load() as load:
        after = build_datasets(cfg, tmp_path / "run")
    assert load.call_count >= 1
    assert not torch_equal(after.train[0], before.train[0])


def test_cache_entries_are_safetensors_with_metadata_and_damage_is_repaired(tmp_path):
    path = good_volume(tmp_path / "v.nii.gz")
    settings = PreprocessSettings(resolution=16)
    cache = VolumeCache(tmp_path / "cache", settings)
    volume, meta = nifti_load.preprocess_file(path, settings)
    digest = file_digest(path)
    assert cache.read_meta(digest) is None
    cache.store(digest, volume, meta)
    entry = cache.path(digest)
    assert entry.suffix == ".safetensors" and entry.read_bytes()[8:9] == b"{"  # JSON header, no pickle
    assert cache.read_meta(digest)["voxel_size_mm"] == pytest.approx(meta["voxel_size_mm"])
    np.testing.assert_allclose(cache.load(digest), volume, atol=1 / 65535)
    assert (cache.folder / "settings.json").is_file()
    assert not list(cache.folder.glob(".*tmp*"))  # atomic writes leave no temporary files
    entry.write_bytes(entry.read_bytes()[:50])
    assert cache.read_meta(digest) is None  # damaged: treated as missing and rebuilt


def test_an_anchored_run_records_its_anchor_in_the_intensity_reference(folder, tmp_path):
    plain = build_datasets(data_config(folder, tmp_path / "a"), tmp_path / "a")
    anchored = build_datasets(data_config(folder, tmp_path / "b", intensity_anchor_percentile=90.0), tmp_path / "b")
    assert "anchor_percentile" not in plain.intensity_reference
    assert anchored.intensity_reference["anchor_percentile"] == 90.0
    assert anchored.intensity_reference["high"] != plain.intensity_reference["high"]
