"""Writing volumes as NIfTI with an affine that matches their own voxel grid."""

from __future__ import annotations

import os
from typing import Sequence

import nibabel as nib
import numpy as np

from .atomic import write_with


def grid_affine(shape: Sequence[int], voxel_size_mm: float | Sequence[float] = 1.0) -> np.ndarray:
    """RAS+ affine for a grid of ``shape`` voxels of ``voxel_size_mm``, centred on the origin.

    Axis i runs left→right, posterior→anterior, inferior→superior, so the volume opens the
    right way round in FSLeyes, ITK-SNAP or nibabel.
    """
    spacing = np.broadcast_to(np.asarray(voxel_size_mm, dtype=float), (3,))
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    centre = (np.asarray(shape[:3], dtype=float) - 1.0) / 2.0
    affine[:3, 3] = -spacing * centre
    return affine


def save_nifti(
    volume: np.ndarray,
    path: str | os.PathLike,
    affine: np.ndarray,
    description: str | None = None,
) -> None:
    """Write a 3D volume atomically as float32 NIfTI (``.nii`` or ``.nii.gz``)."""
    data = np.asarray(volume, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    if description:
        image.header["descrip"] = description.encode("ascii", "replace")[:79]
    write_with(path, lambda tmp: nib.save(image, str(tmp)))
