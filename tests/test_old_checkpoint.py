"""A run written by an earlier version of the code (tests/data/old_run) still loads, samples the
same volumes and resumes training.

The run was made before the issue-15 refactor with
``verydeepvae train --output-dir /tmp/vdvae-old-run --max-steps 4 --no-progress`` and the settings
of ``OLD_SETTINGS`` (commit 53f2d77);
only what loading, sampling and resuming need was kept (the checkpoint and its sidecar, best.json,
split.json, run.json, metrics.jsonl and the eight phantom volumes).  ``expected.json`` holds numbers
that code computed from it, so a change of behaviour shows as well as a failure to load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from verydeepvae import api
from verydeepvae.cli import main
from verydeepvae.checkpoint import load_checkpoint

OLD_RUN = Path(__file__).parent / "data" / "old_run"
OLD_SETTINGS = ["--preset", "tiny", "--set", "phantom_num=8", "--set", "channels=4,4,4,4,4",
                "--set", "channels_per_latent=2,2,2,2,2", "--set", "kernel_sizes_bottom_up=3,2,2,1,1",
                "--set", "kernel_sizes_top_down=3,2,2,1,1", "--set", "log_every=2", "--set", "validation_every=2",
                "--set", "checkpoint_every=4", "--set", "keep_checkpoints=1", "--set", "subjects_to_plot=0",
                "--set", "num_workers=0", "--set", "figures_every=1000"]
WRITTEN_AT = "/tmp/vdvae-old-run"  # the folder the old code wrote the run into (split.json names it)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def moved_run(tmp_path: Path) -> Path:
    """A copy of the old run in ``tmp_path``, its split.json pointing at the copy's volumes (as a run
    folder moved to another place would be edited)."""
    run = tmp_path / "old_run"
    shutil.copytree(OLD_RUN, run)
    (run / "expected.json").unlink()
    split = run / "split.json"
    split.write_text(split.read_text().replace(WRITTEN_AT, str(run)))
    return run


def old_numbers(run: Path) -> dict[str, float]:
    """What expected.json records: statistics of two samples (seed 0) and of the reconstruction of
    the first training volume, through the Python API."""
    model = api.load(run, device="cpu")
    samples = model.sample(2, seed=0).data
    volume = run / "cache" / "phantom_16_8_0" / "sub-0001.nii.gz"
    recon = model.reconstruct(volume).data
    return {"step": model.step, "sample_mean": float(samples.mean()), "sample_std": float(samples.std()),
            "reconstruction_mean": float(recon.mean()), "reconstruction_std": float(recon.std())}


def test_old_checkpoint_loads_and_samples_the_same(tmp_path):
    run = moved_run(tmp_path)
    checkpoint = load_checkpoint(run / "checkpoints" / "step_00000004.safetensors")
    assert checkpoint.verified and checkpoint.step == 4
    expected = json.loads((OLD_RUN / "expected.json").read_text())
    got = old_numbers(run)
    assert got["step"] == expected["step"]
    for key in ("sample_mean", "sample_std", "reconstruction_mean", "reconstruction_std"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    out = tmp_path / "samples"
    assert main(["sample", "--checkpoint", str(run), "--num", "2", "--output", str(out), "--no-progress",
                 "--quiet"]) == 0
    assert sorted(p.name for p in out.glob("sample_*.nii.gz")) == ["sample_0000.nii.gz", "sample_0001.nii.gz"]


def test_old_run_resumes(tmp_path):
    run = moved_run(tmp_path)
    assert main(["train", *OLD_SETTINGS, "--output-dir", str(run), "--resume", "--max-steps", "6",
                 "--set", "checkpoint_every=2", "--no-progress", "--quiet"]) == 0
    resumed = load_checkpoint(run / "checkpoints" / "step_00000006.safetensors")
    assert resumed.step == 6
    old = load_checkpoint(OLD_RUN / "checkpoints" / "step_00000004.safetensors")
    assert resumed.state("model").keys() == old.state("model").keys()
    record = json.loads((run / "run.json").read_text())
    assert len(record["sessions"]) == 2


if __name__ == "__main__":  # run with the old code to (re)write expected.json
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        shutil.copytree(OLD_RUN, Path(folder) / "old_run", ignore=shutil.ignore_patterns("expected.json"))
        copy = Path(folder) / "old_run"
        split = copy / "split.json"
        split.write_text(split.read_text().replace(WRITTEN_AT, str(copy)))
        (OLD_RUN / "expected.json").write_text(json.dumps(old_numbers(copy), indent=2) + "\n")
