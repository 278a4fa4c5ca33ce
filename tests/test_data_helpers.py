"""Awkward little NIfTI files for the data tests (imported by the other test_data_* modules)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from verydeepvae.config import config_from_dict


def data_config(data_path: Path | str | None, output_dir: Path, **overrides: Any):
    """A valid Config for data tests: one-level model lists, so any power-of-two resolution works."""
    values = {
        "data_path": None if data_path is None else str(data_path),
        "output_dir": str(output_dir),
        "resolution": 16,
        "channels": [8],
        "channels_per_latent": [2],
        "latent_feature_maps_per_resolution": [1],
        "kernel_sizes_bottom_up": [3],
        "kernel_sizes_top_down": [3],
        "num_workers": 0,
        "augment": False,
    }
    values.update(overrides)
    return config_from_dict(values)


def centred_affine(shape, zooms, flip=(False, False, False)) -> np.ndarray:
    """World origin at the array centre; ``flip`` makes an axis run right->left etc. (e.g. LPS)."""
    signs = np.array([-1.0 if f else 1.0 for f in flip])
    affine = np.diag(list(signs * np.asarray(zooms, float)) + [1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape[:3], float) - 1) / 2)
    return affine


def world_coords(shape, affine) -> np.ndarray:
    ijk = np.indices(shape[:3]).reshape(3, -1).T
    return nib.affines.apply_affine(affine, ijk).reshape(tuple(shape[:3]) + (3,))


def textured_ball(shape, affine, radius_mm=25.0, centre=(0.0, 0.0, 0.0), seed=0) -> np.ndarray:
    """A bright ball with a little texture on a zero background, defined in world (mm) space."""
    xyz = world_coords(shape, affine)
    inside = np.linalg.norm(xyz - np.asarray(centre), axis=-1) < radius_mm
    rng = np.random.default_rng(seed)
    return (inside * (400.0 + rng.normal(0, 20, shape[:3]))).astype(np.float32)


def write(path: Path, data: np.ndarray, affine: np.ndarray | None = None, dtype=None, slope=None, inter=0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.eye(4) if affine is None else affine
    image = nib.Nifti1Image(data if dtype is None else data.astype(dtype), affine)
    if slope is not None:
        image.header.set_slope_inter(slope, inter)
    nib.save(image, str(path))
    return path


def good_volume(path: Path, seed: int = 0, shape=(20, 22, 18), zooms=(2.0, 2.0, 2.0)) -> Path:
    affine = centred_affine(shape, zooms)
    radius = 12.0 + 4.0 * np.random.default_rng(seed).random()
    return write(path, textured_ball(shape, affine, radius_mm=radius, seed=seed), affine)


def extents(volume: np.ndarray, threshold: float = 0.5) -> list[int]:
    """Number of slices along each axis containing voxels above ``threshold``."""
    mask = volume > threshold
    out = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=others))
        out.append(int(idx[-1] - idx[0] + 1) if idx.size else 0)
    return out


def test_helpers_make_a_ball(tmp_path):
    path = good_volume(tmp_path / "a.nii.gz")
    assert nib.load(str(path)).shape == (20, 22, 18)
