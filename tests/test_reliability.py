"""Reliability: NaN batches, divergence, corrupt or foreign checkpoints, a full disk, SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from verydeepvae.cli import main
from verydeepvae.config import build_config
from verydeepvae.errors import UserError
from verydeepvae import checkpoint as ckpt
from verydeepvae.train.loop import TrainingStopped, train


class Blobs(torch.utils.data.Dataset):
    """In-memory 16³ volumes; indices in ``poisoned`` come back as NaN."""

    def __init__(self, n: int, seed: int, poisoned: set[int] = frozenset()):
        g = torch.Generator().manual_seed(seed)
        axis = torch.linspace(-1, 1, 16)
        x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
        self.volumes = []
        for _ in range(n):
            r = 0.4 + 0.4 * torch.rand(3, generator=g)
            inside = (x / r[0]) ** 2 + (y / r[1]) ** 2 + (z / r[2]) ** 2 < 1
            self.volumes.append((inside.float() * 0.7)[None])
        self.poisoned = set(poisoned)

    def __len__(self):
        return len(self.volumes)

    def __getitem__(self, i):
        return torch.full_like(self.volumes[i], float("nan")) if i in self.poisoned else self.volumes[i]


@dataclass
class Bundle:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    voxel_size_mm: float = 2.0
    intensity_reference: dict | None = None


def _cfg(out: Path, **overrides):
    base = {"output_dir": str(out), "num_workers": 0, "subjects_to_plot": 0, "max_steps": 12,
            "checkpoint_every": 4, "validation_every": 4, "log_every": 1}
    base.update(overrides)
    return build_config(preset="tiny", overrides=base)


def _train_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_nan_batches_are_skipped_counted_and_training_continues(tmp_path):
    bundle = Bundle(Blobs(16, 0, poisoned={3, 7}), Blobs(4, 1))
    result = train(_cfg(tmp_path / "run", batch_size=2), bundle=bundle, show_progress=False)
    assert result.step == 12
    records = _train_records(tmp_path / "run")
    assert records[-1]["skipped_nonfinite"] >= 1
    state = ckpt.load_checkpoint(result.checkpoint).state("model")
    assert all(torch.isfinite(t).all() for t in state.values())


def test_too_many_consecutive_skips_stop_with_a_message_and_keep_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, max_steps=4), bundle=Bundle(Blobs(8, 0), Blobs(4, 1)), show_progress=False)
    good = ckpt.list_checkpoints(run / "checkpoints")[-1]
    poisoned = Bundle(Blobs(8, 0, poisoned=set(range(8))), Blobs(4, 1))
    with pytest.raises(TrainingStopped) as info:
        train(_cfg(run, resume=True, max_consecutive_skips=3, checkpoint_every=100), bundle=poisoned,
              show_progress=False)
    assert "3 consecutive updates were skipped" in str(info.value)
    assert ckpt.load_checkpoint(good).step == 4


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, max_steps=8), bundle=Bundle(Blobs(8, 0), Blobs(4, 1)), show_progress=False)
    newest = ckpt.list_checkpoints(run / "checkpoints")[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    notices: list[str] = []
    result = train(_cfg(run, max_steps=10, resume=True), bundle=Bundle(Blobs(8, 0), Blobs(4, 1)),
                   notices=notices, show_progress=False)
    assert any("is corrupt" in n and "falling back" in n for n in notices)
    assert any("resumed from" in n and "step_00000004" in n for n in notices)
    assert result.step == 10


def test_truncated_checkpoint_is_reported(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, max_steps=4), bundle=Bundle(Blobs(8, 0), Blobs(4, 1)), show_progress=False)
    path = ckpt.list_checkpoints(run / "checkpoints")[-1]
    path.write_bytes(path.read_bytes()[:1000])
    ckpt._sidecar(path).unlink()
    with pytest.raises(UserError, match="cannot be read"):
        ckpt.load_checkpoint(path)


def test_checkpoint_of_another_architecture_is_refused_naming_the_difference(tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(run, max_steps=4), bundle=Bundle(Blobs(8, 0), Blobs(4, 1)), show_progress=False)
    with pytest.raises(UserError, match=r"another architecture \(channels: configured \[8, 12, 16, 16, 24\], checkpoint \[8, 12, 16, 16, 16\]\)"):
        train(_cfg(run, resume=True, channels=[8, 12, 16, 16, 24]), bundle=Bundle(Blobs(8, 0), Blobs(4, 1)),
              show_progress=False)


def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    calls = {"n": 0}
    import safetensors.torch

    real = safetensors.torch.save_file

    def failing(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(28, "No space left on device", filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(UserError, match="No space left on device; the previous checkpoint step_00000004"):
        train(_cfg(run, max_steps=8), bundle=Bundle(Blobs(8, 0), Blobs(4, 1)), show_progress=False)
    files = ckpt.list_checkpoints(run / "checkpoints")
    assert [p.name for p in files] == ["step_00000004.safetensors"]
    assert ckpt.load_checkpoint(files[0]).step == 4
    assert not list((run / "checkpoints").glob(".*tmp*"))  # no temporary file left behind


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_a_checkpoint(tmp_path):
    """Eight SIGKILLs, each a random number of steps into a resumed run and a random fraction of a step
    later (checkpoint writes, every 3 steps, included), then a run to the end: every checkpoint on
    disk stays readable, progress survives and every step is trained.  The kills are counted in
    logged steps, not seconds, so the same test holds on a faster machine and costs few steps."""
    from conftest import write_ellipsoids

    data = tmp_path / "data"
    write_ellipsoids(data, 8, size=16)
    run = tmp_path / "run"
    total = 100
    argv = [sys.executable, "-m", "verydeepvae", "train", "--preset", "tiny", "--data", str(data),
            "--output-dir", str(run), "--max-steps", str(total), "--resume", "--no-progress",
            "--set", "checkpoint_every=3", "--set", "num_workers=0", "--set", "subjects_to_plot=0",
            "--set", "validation_every=50", "--set", "log_every=1",
            "--set", "augment=false"]  # MONAI's import is a third of a start-up, and 9 starts
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rng = random.Random(1234)
    starts: list[int] = []
    deadline = time.monotonic() + 300
    kills = 0
    log = run / "metrics.jsonl"
    while kills < 8 and time.monotonic() < deadline:
        before = ckpt.newest_loadable(run / "checkpoints")
        starts.append(before.step if before else 0)
        target = _lines(log) + rng.randint(1, 6)
        process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while process.poll() is None and time.monotonic() < deadline and _lines(log) < target:
            time.sleep(0.01)  # until it has logged 1-6 more steps
        time.sleep(rng.uniform(0.0, 0.1))  # then kill at a random moment of the next step
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        kills += 1
        for path in ckpt.list_checkpoints(run / "checkpoints"):
            ckpt.load_checkpoint(path)  # every checkpoint on disk is always readable
    assert kills >= 8, f"only {kills} kills fitted in the time budget"
    assert starts == sorted(starts) and starts[-1] > 0  # progress survived the kills
    finished = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    final = ckpt.newest_loadable(run / "checkpoints")
    assert final.step == total
    steps = [r["step"] for r in _train_records(run)]
    assert set(range(1, total + 1)) <= set(steps)  # every step was trained and logged at least once


def _lines(path: Path) -> int:
    """Lines in a file that may not exist yet (0 then)."""
    return path.read_bytes().count(b"\n") if path.exists() else 0
