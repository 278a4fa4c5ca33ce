"""A corpus of bad inputs: each gives exit status 2, one line naming the problem, no traceback,
and leaves existing outputs untouched."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from verydeepvae.cli import main


def _snapshot(folder: Path) -> dict[str, str]:
    """Every output file's content (the run folder's .lock records whoever last held it)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    from conftest import write_ellipsoids

    root = tmp_path_factory.mktemp("bad")
    good = root / "good"
    write_ellipsoids(good, 6, size=16)
    run = root / "run"
    assert main(["train", "--preset", "tiny", "--data", str(good), "--output-dir", str(run), "--max-steps", "2",
                 "--no-progress", "--set", "subjects_to_plot=0"]) == 0
    paths = {"root": root, "good": good, "run": run}

    def folder_with(name: str, writer) -> Path:
        folder = root / name
        folder.mkdir()
        shutil.copy(next(good.glob("*.nii.gz")), folder / "ok.nii.gz")
        writer(folder)
        return folder

    paths["empty"] = root / "empty"
    paths["empty"].mkdir()
    paths["text"] = folder_with("text", lambda f: (f / "notes.nii").write_text("not an image"))
    paths["truncated"] = folder_with(
        "truncated", lambda f: (f / "cut.nii.gz").write_bytes((good / "subject_000.nii.gz").read_bytes()[:300]))
    paths["two_d"] = folder_with(
        "two_d", lambda f: nib.save(nib.Nifti1Image(np.random.rand(16, 16).astype(np.float32), np.eye(4)),
                                    str(f / "slice.nii.gz")))
    paths["five_d"] = folder_with(
        "five_d", lambda f: nib.save(nib.Nifti1Image(np.random.rand(8, 8, 8, 2, 2).astype(np.float32), np.eye(4)),
                                     str(f / "series.nii.gz")))
    paths["all_nan"] = folder_with(
        "all_nan", lambda f: nib.save(nib.Nifti1Image(np.full((16, 16, 16), np.nan, np.float32), np.eye(4)),
                                      str(f / "nan.nii.gz")))
    paths["gzip_garbage"] = folder_with(
        "gzip_garbage", lambda f: (f / "junk.nii.gz").write_bytes(gzip.compress(b"\x00" * 1000)))
    (root / "bad.json").write_text("{not json")
    (root / "list.json").write_text("[1, 2]")
    (root / "a_file").write_text("x")
    torch.save({"w": torch.zeros(2)}, root / "model.pt")
    return paths


def _train(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(data), "--output-dir", str(out), "--max-steps", "2",
            "--no-progress", *extra]


CASES = {
    "missing data folder": (lambda p: _train(p["root"] / "nope", p["root"] / "o1"), "does not exist"),
    "empty data folder": (lambda p: _train(p["empty"], p["root"] / "o2"), "no NIfTI"),
    "non-NIfTI file": (lambda p: _train(p["text"], p["root"] / "o3"), "notes.nii"),
    "truncated .nii.gz": (lambda p: _train(p["truncated"], p["root"] / "o4"), "cut.nii.gz"),
    "2D image": (lambda p: _train(p["two_d"], p["root"] / "o5"), "slice.nii.gz"),
    "5D image": (lambda p: _train(p["five_d"], p["root"] / "o6"), "series.nii.gz"),
    "all-NaN volume": (lambda p: _train(p["all_nan"], p["root"] / "o7"), "nan.nii.gz"),
    "gzip of garbage": (lambda p: _train(p["gzip_garbage"], p["root"] / "o8"), "junk.nii.gz"),
    "unknown config key": (lambda p: _train(p["good"], p["run"], "--set", "foo=1"), "unknown configuration key 'foo'"),
    "wrong type": (lambda p: _train(p["good"], p["run"], "--set", "batch_size=abc"), "batch_size must be an integer"),
    "negative batch size": (lambda p: _train(p["good"], p["run"], "--set", "batch_size=-2"), "batch_size must be >= 1"),
    "resolution not a power of two": (lambda p: _train(p["good"], p["run"], "--set", "resolution=20"),
                                      "resolution must be a power of two"),
    "list of wrong length": (lambda p: _train(p["good"], p["run"], "--set", "kernel_sizes_top_down=3,3"),
                             "kernel_sizes_top_down must have 5 entries"),
    "checkpoint of another architecture": (
        lambda p: _train(p["good"], p["run"], "--resume", "--set", "channels=8,12,16,16,24"), "another architecture"),
    "unwritable output directory": (lambda p: _train(p["good"], p["root"] / "a_file" / "out"), "not writable"),
    "pickle checkpoint": (lambda p: ["sample", "--checkpoint", str(p["root"] / "model.pt"), "--output-dir",
                                     str(p["run"] / "samples")], "pickle"),
    "missing checkpoint": (lambda p: ["sample", "--checkpoint", str(p["root"] / "none"), "--output-dir",
                                      str(p["run"] / "samples")], "does not exist"),
    "bad temperature": (lambda p: ["sample", "--checkpoint", str(p["run"]), "--temperature", "hot",
                                   "--output-dir", str(p["run"] / "samples")], "--temperature must be a number"),
    "unparsable config file": (lambda p: ["train", "--config", str(p["root"] / "bad.json"), "--output-dir",
                                          str(p["run"])], "could not be parsed"),
    "config file that is not a mapping": (lambda p: ["train", "--config", str(p["root"] / "list.json"),
                                                     "--output-dir", str(p["run"])], "must contain a mapping"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(name, corpus, capsys):
    build_argv, fragment = CASES[name]
    before = _snapshot(corpus["run"])
    capsys.readouterr()
    assert main(build_argv(corpus)) == 2, name
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("verydeepvae: error: ") and fragment in err[0], err[0]
    assert "Traceback" not in err[0]
    assert _snapshot(corpus["run"]) == before


def test_corpus_is_large_enough():
    assert len(CASES) >= 15
