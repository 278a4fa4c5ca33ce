"""Discovery of NIfTI files (folders, nested folders, lists) and the saved, seeded split."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_data_helpers import good_volume
from verydeepvae.data import discover
from verydeepvae.errors import DataError


def _touch_niftis(root: Path, names: list[str]) -> list[Path]:
    out = []
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        out.append(path)
    return out


def test_flat_folder_finds_nii_and_nii_gz_sorted_and_skips_others(tmp_path):
    _touch_niftis(tmp_path, ["b.nii.gz", "a.nii", "c.NII.GZ", "notes.txt", "a.json", ".hidden.nii", "._a.nii"])
    found = discover.discover_files(tmp_path)
    assert [p.name for p in found] == ["a.nii", "b.nii.gz", "c.NII.GZ"]
    assert all(p.is_absolute() for p in found)


def test_nested_bids_folder_and_pattern(tmp_path):
    _touch_niftis(tmp_path, [
        "sub-02/anat/sub-02_T1w.nii.gz", "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-01/anat/sub-01_FLAIR.nii.gz", "sub-01/anat/sub-01_T1w.json", ".git/x.nii",
    ])
    everything = discover.discover_files(tmp_path)
    assert [p.name for p in everything] == ["sub-01_FLAIR.nii.gz", "sub-01_T1w.nii.gz", "sub-02_T1w.nii.gz"]
    t1 = discover.discover_files(tmp_path, "*_T1w*")  # the .json sidecar is never a volume
    assert [p.name for p in t1] == ["sub-01_T1w.nii.gz", "sub-02_T1w.nii.gz"]
    by_path = discover.discover_files(tmp_path, "sub-02/*/*.nii.gz")
    assert [p.name for p in by_path] == ["sub-02_T1w.nii.gz"]


def test_text_and_csv_lists_with_relative_paths(tmp_path):
    files = _touch_niftis(tmp_path / "data", ["x.nii.gz", "y.nii", "z.nii.gz"])
    listing = tmp_path / "lists" / "files.txt"
    listing.parent.mkdir()
    listing.write_text(f"# my subjects\n../data/z.nii.gz\n\n{files[0]}\n../data/z.nii.gz\n")
    assert discover.discover_files(listing) == [files[2], files[0]]  # listed order, no duplicates
    table = tmp_path / "subjects.csv"
    table.write_text("id,path,age\n1,data/y.nii,40\n2,data/x.nii.gz,50\n")
    assert discover.discover_files(table) == [files[1], files[0]]
    headerless = tmp_path / "plain.csv"
    headerless.write_text("data/x.nii.gz,1\n")
    assert discover.discover_files(headerless) == [files[0]]


def test_missing_path_empty_folder_and_bad_list_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover.discover_files(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=r"empty.*no NIfTI files"):
        discover.discover_files(tmp_path / "empty")
    listing = tmp_path / "list.txt"
    listing.write_text("gone.nii.gz\n")
    with pytest.raises(DataError, match=r"list.txt, line 1: .*gone.nii.gz does not exist"):
        discover.discover_files(listing)
    (tmp_path / "blank.txt").write_text("\n# nothing\n")
    with pytest.raises(DataError, match="lists no paths"):
        discover.discover_files(tmp_path / "blank.txt")
    single = good_volume(tmp_path / "one.nii.gz")
    with pytest.raises(DataError, match="single NIfTI file"):
        discover.discover_files(single)


def test_split_is_seeded_deterministic_and_keeps_a_validation_file():
    files = [f"/d/{i:03d}.nii" for i in range(40)]
    a = discover.split_files(files, 0.9, seed=3)
    assert a == discover.split_files(files, 0.9, seed=3)
    assert a != discover.split_files(files, 0.9, seed=4)
    train, val = a
    assert len(val) == 4 and sorted(train + val) == files and not set(train) & set(val)
    for n in (2, 3, 10):  # train_fraction 1.0 still leaves one validation file
        train, val = discover.split_files(files[:n], 1.0, seed=0)
        assert len(val) == 1 and len(train) == n - 1
    assert discover.split_files(files[:1], 0.9, 0) == (files[:1], files[:1])


def test_cap_applies_before_the_split():
    files = [Path(f"/d/{i}.nii") for i in range(10)]
    assert discover.cap_files(files, 3) == files[:3]
    assert discover.cap_files(files, None) == files


def test_saved_split_round_trip_and_missing_files(tmp_path):
    files = _touch_niftis(tmp_path, ["a.nii", "b.nii", "c.nii"])
    split = tmp_path / "split.json"
    discover.save_split(split, [str(files[0]), str(files[1])], [str(files[2])], {"seed": 1})
    train, val, info = discover.load_split(split)
    assert train == [str(files[0]), str(files[1])] and val == [str(files[2])] and info["seed"] == 1
    files[1].unlink()
    with pytest.raises(DataError, match=r"split.json names 1 file\(s\) that no longer exist: .*b.nii"):
        discover.load_split(split)
    split.write_text("{not json")
    with pytest.raises(DataError, match="not a readable split file"):
        discover.load_split(split)
