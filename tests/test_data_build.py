"""build_datasets end to end: the contract the training loop relies on."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from test_data_helpers import data_config, good_volume, write
from verydeepvae.data import DataBundle, build_datasets, write_pipeline_preview
from verydeepvae.errors import ConfigError, DataError


def _folder(root: Path, n: int = 6) -> Path:
    for i in range(n):
        good_volume(root / f"sub-{i:02d}.nii.gz", seed=i)
    return root


def test_contract_shapes_ranges_files_and_split_file(tmp_path):
    data = _folder(tmp_path / "in", 10)
    out = tmp_path / "run"
    bundle = build_datasets(data_config(data, out, train_fraction=0.8, augment=True, aug_prob_affine=1.0), out)
    assert isinstance(bundle, DataBundle)
    assert len(bundle.train) == 8 and len(bundle.val) == 2
    assert bundle.train.files == bundle.train_files and bundle.val.files == bundle.val_files
    assert sorted(bundle.train_files + bundle.val_files) == sorted(str(p) for p in data.iterdir())
    for dataset in (bundle.train, bundle.val):
        x = dataset[0]
        assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (1, 16, 16, 16)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert bundle.val.augmenter is None and bundle.train.augmenter is not None
    assert torch.equal(bundle.val[0], bundle.val[0])  # validation is never augmented
    assert 1.0 < bundle.voxel_size_mm < 3.0
    ref = bundle.intensity_reference
    assert 300 < ref["low"] < ref["high"] < 500
    saved = json.loads((out / "split.json").read_text())
    assert saved["train"] == bundle.train_files and saved["validation"] == bundle.val_files
    assert saved["seed"] == 0 and bundle.skipped_files == []
    batch = next(iter(DataLoader(bundle.train, batch_size=4)))
    assert batch.shape == (4, 1, 16, 16, 16)


def test_split_depends_on_seed_and_is_reused_on_resume(tmp_path):
    data = _folder(tmp_path / "in", 12)
    a = build_datasets(data_config(data, tmp_path / "a", seed=1), tmp_path / "a")
    b = build_datasets(data_config(data, tmp_path / "b", seed=1), tmp_path / "b")
    c = build_datasets(data_config(data, tmp_path / "c", seed=2), tmp_path / "c")
    assert a.val_files == b.val_files and a.val_files != c.val_files
    good_volume(data / "sub-99.nii.gz", seed=99)  # new data arrive; the resumed run keeps its split
    resumed = build_datasets(data_config(data, tmp_path / "a", seed=5, train_fraction=0.5), tmp_path / "a")
    assert (resumed.train_files, resumed.val_files) == (a.train_files, a.val_files)
    Path(a.train_files[0]).unlink()
    with pytest.raises(DataError, match="no longer exist"):
        build_datasets(data_config(data, tmp_path / "a"), tmp_path / "a")


def test_max_niis_caps_before_the_split(tmp_path):
    data = _folder(tmp_path / "in", 10)
    bundle = build_datasets(data_config(data, tmp_path / "r", max_niis_to_use=4, train_fraction=0.5), tmp_path / "r")
    used = sorted(bundle.train_files + bundle.val_files)
    assert used == sorted(str(p) for p in sorted(data.iterdir())[:4])
    assert len(bundle.val) == 2


def test_list_file_input_and_single_file(tmp_path):
    data = _folder(tmp_path / "in", 3)
    listing = tmp_path / "list.txt"
    listing.write_text("in/sub-02.nii.gz\n")
    notices: list[str] = []
    bundle = build_datasets(data_config(listing, tmp_path / "r"), tmp_path / "r", notices)
    assert bundle.train_files == bundle.val_files == [str(data / "sub-02.nii.gz")]
    assert any("only one usable input file" in n for n in notices)


def _with_bad(root: Path) -> dict[str, Path]:
    _folder(root, 4)
    return {
        "flat": write(root / "flat.nii.gz", np.ones((12, 12), np.float32)),
        "zeros": write(root / "zeros.nii.gz", np.zeros((12, 12, 12), np.float32)),
    }


def test_bad_files_stop_before_training_with_one_error_naming_them(tmp_path):
    bad = _with_bad(tmp_path / "in")
    with pytest.raises(DataError) as caught:
        build_datasets(data_config(tmp_path / "in", tmp_path / "r"), tmp_path / "r")
    message = str(caught.value)
    assert "flat.nii.gz" in message and "2D image" in message and "skip_bad_files" in message
    assert not (tmp_path / "r" / "split.json").exists()
    bad["flat"].unlink()
    with pytest.raises(DataError, match=r"zeros.nii.gz: is empty: all voxels are zero"):
        build_datasets(data_config(tmp_path / "in", tmp_path / "r"), tmp_path / "r")


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_bad_files_skips_lists_and_warns(tmp_path, workers):
    bad = _with_bad(tmp_path / "in")
    notices: list[str] = []
    cfg = data_config(tmp_path / "in", tmp_path / "r", skip_bad_files=True, num_workers=workers)
    bundle = build_datasets(cfg, tmp_path / "r", notices)
    assert sorted(bundle.skipped_files) == sorted(str(p) for p in bad.values())
    assert len(bundle.train) + len(bundle.val) == 4
    listed = (tmp_path / "r" / "skipped_files.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted(bundle.skipped_files)
    assert any("2D image" in line for line in listed)
    assert any("skipped 2 of 6" in n for n in notices)
    saved = json.loads((tmp_path / "r" / "split.json").read_text())
    assert not set(bundle.skipped_files) & set(saved["train"] + saved["validation"])


def test_no_usable_files_and_missing_data_path(tmp_path):
    (tmp_path / "in").mkdir()
    write(tmp_path / "in" / "zeros.nii", np.zeros((8, 8, 8), np.float32))
    with pytest.raises(DataError, match="none of the 1 input files"):
        build_datasets(data_config(tmp_path / "in", tmp_path / "r", skip_bad_files=True), tmp_path / "r")
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(data_config(tmp_path / "missing", tmp_path / "r2"), tmp_path / "r2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="contains no NIfTI files"):
        build_datasets(data_config(tmp_path / "empty", tmp_path / "r3"), tmp_path / "r3")


def test_damaged_cache_entry_is_rebuilt_during_training(tmp_path):
    data = _folder(tmp_path / "in", 3)
    bundle = build_datasets(data_config(data, tmp_path / "r"), tmp_path / "r")
    expected = bundle.train[0].clone()
    entry = bundle.train.cache.path(bundle.train.digests[0])
    entry.write_bytes(b"garbage")
    assert torch.equal(bundle.train[0], expected)


def test_pipeline_preview_writes_niftis_with_grid_affine_and_a_montage(tmp_path):
    data = _folder(tmp_path / "in", 4)
    out = tmp_path / "r"
    cfg = data_config(data, out, augment=True, aug_prob_affine=1.0, aug_prob_haircut=1.0,
                      visualise_training_pipeline_before_starting=True)
    notices: list[str] = []
    bundle = build_datasets(cfg, out, notices)  # the flag writes the preview (subjects_to_plot = 4)
    assert len(list((out / "pipeline_test").glob("*.nii.gz"))) == 6  # 3 training volumes x 2
    assert any("pipeline preview" in n for n in notices)
    folder = write_pipeline_preview(bundle, tmp_path / "again", n=2)
    assert folder == tmp_path / "again" / "pipeline_test"
    niftis = sorted(folder.glob("*.nii.gz"))
    assert len(niftis) == 4 and (folder / "pipeline_test.png").stat().st_size > 1000
    image = nib.load(str(niftis[0]))
    assert image.shape == (16, 16, 16)
    assert np.allclose(np.diag(image.affine)[:3], bundle.voxel_size_mm)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")


def test_phantom_population_is_generated_once_into_the_cache(tmp_path):
    out = tmp_path / "r"
    cfg = data_config(None, out, phantom_num=3, resolution=16)
    bundle = build_datasets(cfg, out)
    folder = out / "cache" / "phantom_16_3_0"
    assert sorted(p.name for p in folder.glob("*.nii.gz")) == ["sub-0001.nii.gz", "sub-0002.nii.gz", "sub-0003.nii.gz"]
    assert len(bundle.train) + len(bundle.val) == 3
    assert not [p for p in (out / "cache").iterdir() if p.name.startswith(".")]  # no half population
    stamp = folder.stat().st_mtime_ns
    build_datasets(data_config(None, tmp_path / "r2", phantom_num=3, cache_dir=str(out / "cache")), tmp_path / "r2")
    assert folder.stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="phantom_num"):
        build_datasets(data_config(None, tmp_path / "r3", phantom_num=0), tmp_path / "r3")
