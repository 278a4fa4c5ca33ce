"""Shared fixtures: small generated NIfTI folders, so tests never need real data."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: tests share the machine with other work
# a fixed thread count: the training loop's thread governor (train/threads.py) would otherwise react to
# the machine's load, and tests compare runs bitwise; tests/test_threads.py turns it on where it is tested
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1))
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def write_ellipsoids(folder: Path, num: int, size: int = 24, seed: int = 0, voxel_mm: float = 2.0) -> list[Path]:
    """Randomly sized, off-centre ellipsoids of random brightness on a dark background."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    axis = np.linspace(-1, 1, size)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    paths = []
    for i in range(num):
        radii = rng.uniform(0.35, 0.8, 3)
        centre = rng.uniform(-0.1, 0.1, 3)
        inside = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2 < 1
        core = ((x - centre[0]) / (0.5 * radii[0])) ** 2 + ((y - centre[1]) / (0.5 * radii[1])) ** 2 + (z / (0.5 * radii[2])) ** 2 < 1
        volume = inside * rng.uniform(300, 500) + core * rng.uniform(100, 300) + rng.normal(0, 5, inside.shape) * inside
        affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
        path = folder / f"subject_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), str(path))
        paths.append(path)
    return paths


@pytest.fixture
def ellipsoid_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "niftis"
    write_ellipsoids(folder, 24)
    return folder


def tiny_train_args(data: Path, run: Path, *extra: str) -> list[str]:
    """``verydeepvae train`` arguments for a few quick steps of the tiny preset (a line every 2 steps,
    a validation every 2, no figures)."""
    return ["train", "--preset", "tiny", "--data", str(data), "--output-dir", str(run), "--set", "log_every=2",
            "--set", "validation_every=2", "--set", "subjects_to_plot=0", "--set", "num_workers=0", *extra]


@pytest.fixture
def free_bits_seen(monkeypatch) -> list:
    """The ``free_bits`` of every training forward pass (``VeryDeepVAE.forward`` of a model in
    training mode; validation is left out), in order, while the test runs."""
    from verydeepvae.model import VeryDeepVAE

    seen: list = []
    forward = VeryDeepVAE.forward

    def recording(self, x, kl_weight=1.0, kl_balance=False, free_bits=0.0, covariates=None):
        if self.training:
            seen.append(free_bits)
        return forward(self, x, kl_weight, kl_balance, free_bits, covariates)

    monkeypatch.setattr(VeryDeepVAE, "forward", recording)
    return seen


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tiny models (``pytestmark = pytest.mark.usefixtures(...)``):
    they gain nothing from a second thread, and on a busy 2-core machine two threads wait on each
    other and run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
