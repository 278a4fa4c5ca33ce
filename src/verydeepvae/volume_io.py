"""Writing volumes as NIfTI with an affine that matches their own voxel grid and a display window
(``cal_min``/``cal_max``) that viewers open them with."""

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


ROBUST_PERCENTILE = 99.5


def display_window(data: np.ndarray) -> tuple[float, float]:
    """(cal_min, cal_max) for a volume: ``(0, 1)`` for model intensities (every voxel in [0, 1]), so
    every volume of a run opens with the same window and 1 is the upper clamp percentile; otherwise
    from ``min(0, smallest value)`` to the 99.5th percentile of the voxels above it (the background,
    often most of the volume, would pull a plain percentile down; one bright outlier would make the
    maximum useless)."""
    values = np.asarray(data, dtype=np.float32)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 0.0
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        return 0.0, 1.0
    low = min(0.0, low)
    above = values[values > low]
    top = float(np.percentile(above, ROBUST_PERCENTILE)) if above.size else high
    return low, top if top > low else high


def save_nifti(
    volume: np.ndarray,
    path: str | os.PathLike,
    affine: np.ndarray,
    description: str | None = None,
    xform_code: int = 1,
) -> None:
    """Write a 3D volume atomically as float32 NIfTI (``.nii`` or ``.nii.gz``) with ``cal_min`` /
    ``cal_max`` set by :func:`display_window`.  ``xform_code`` is the qform/sform code (1: scanner
    space; a volume resampled into an input scan's space takes the scan's own code)."""
    data = np.asarray(volume, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=int(xform_code))
    image.set_sform(affine, code=int(xform_code))
    image.header["cal_min"], image.header["cal_max"] = display_window(data)
    if description:
        image.header["descrip"] = description.encode("ascii", "replace")[:79]
    write_with(path, lambda tmp: nib.save(image, str(tmp)))
