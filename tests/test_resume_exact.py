"""Exact resume: N steps in one go equal N/2 steps, a stop, a resume and N/2 more, bit for bit."""

from __future__ import annotations

import shutil

import pytest
import torch

from verydeepvae.cli import main
from verydeepvae.checkpoint import load_checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_resume_is_bitwise_identical(tmp_path, workers):
    from conftest import write_ellipsoids

    data = tmp_path / "data"
    write_ellipsoids(data, 12, size=16)
    full = tmp_path / "full"
    common = ["--preset", "tiny", "--data", str(data), "--no-progress", "--max-steps", "12",
              "--set", "checkpoint_every=6", "--set", "keep_checkpoints=0", "--set", f"num_workers={workers}",
              "--set", "subjects_to_plot=0", "--set", "aug_prob_affine=0.5", "--set", "aug_prob_gamma=0.5"]
    assert main(["train", "--output-dir", str(full), *common]) == 0
    # a run that stopped right after its step-6 checkpoint
    half = tmp_path / "half"
    shutil.copytree(full, half)
    for name in ("step_00000012.safetensors", "step_00000012.safetensors.sha256"):
        (half / "checkpoints" / name).unlink()
    assert main(["train", "--output-dir", str(half), "--resume", *common]) == 0
    a = load_checkpoint(full / "checkpoints" / "step_00000012.safetensors")
    b = load_checkpoint(half / "checkpoints" / "step_00000012.safetensors")
    for prefix in ("model", "ema", "optim"):
        sa, sb = a.state(prefix), b.state(prefix)
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{prefix}.{key} differs after resume"
