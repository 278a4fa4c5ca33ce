"""Back from the model grid to an input scan's own space: the inverse of the geometry of
preprocessing (:mod:`verydeepvae.data.nifti_load`), so a reconstruction overlays on its scan in
FSLeyes or ITK-SNAP and voxelwise differences with the scan can be computed.

Preprocessing places the foreground box of the RAS+-reoriented scan (``crop_start`` ..
``crop_stop``, in canonical voxel indices) in a cube of R³ voxels of ``voxel_size_mm``, centred on
the box.  Model-grid voxel ``o`` therefore sits at canonical voxel index
``c + step * (o - (R - 1) / 2)`` (``c`` the box centre, ``step = voxel_size_mm / canonical voxel
sizes``), and at world position ``canonical_affine @ that`` in the scanner's millimetres.  That
grid-to-world matrix (:func:`grid_to_world`) is all the inverse needs: each voxel of the scan
(shape and affine as in the file) is looked up on the model grid through
``inv(grid_to_world) @ scan_affine``, in one resampling (:func:`to_scan_space`).

Resampling: ``scipy.ndimage.affine_transform``, trilinear (order 1), zero outside the cube.
scipy because preprocessing resamples with it already (the same convention for voxel centres, no
new dependency; nibabel's ``resample_from_to`` wraps the same call); trilinear because it never
leaves the [0, 1] range of model intensities (cubic splines overshoot at the brain's edge) and a
higher order cannot restore the detail a 32³ or 64³ grid does not hold.  Where a model voxel is
smaller than the scan's along an axis, a Gaussian pre-filter removes what the scan's grid cannot
represent, as preprocessing does in the other direction.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, TypedDict

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..errors import UserError
from .nifti_load import MAX_VOXELS, CubeFit, open_image


class _ScanGrid(TypedDict):
    shape: list[int]
    affine: Any  # 4x4, voxel index -> mm: nested lists as JSON, an array once checked
    xform_code: int  # the sform code, else the qform code: the space the affine refers to


class ScanGeometry(_ScanGrid):
    """A scan's own grid, read from its header (:func:`scan_geometry`)."""

    canonical_affine: list[list[float]]


class NativeGeometry(_ScanGrid):
    """What :func:`to_scan_space` needs for one input (:func:`native_geometry`)."""

    grid_to_world: Any  # 4x4, model-grid voxel index -> the scan's world (mm)


def scan_geometry(path: str | Path) -> ScanGeometry:
    """The scan's own grid, from its header (no voxels are read): ``shape`` (3 ints), ``affine``
    (4x4, voxel index -> mm, as nibabel reads it), ``xform_code`` (the sform code, else the qform
    code: the space the affine refers to) and ``canonical_affine`` (the affine of the RAS+
    reorientation that preprocessing works on, ``nibabel.as_closest_canonical``)."""
    image = open_image(path)
    affine = np.asarray(image.affine, dtype=float)
    shape = tuple(int(s) for s in image.shape[:3])
    orientation = nib.io_orientation(affine)
    canonical = affine @ nib.orientations.inv_ornt_aff(orientation, shape)
    header = image.header
    sform, qform = int(header["sform_code"]), int(header["qform_code"])
    return {"shape": list(shape), "affine": affine.tolist(), "xform_code": sform or qform,
            "canonical_affine": canonical.tolist()}


def grid_to_world(meta: CubeFit, canonical_affine: Any, resolution: int) -> np.ndarray:
    """4x4 matrix: model-grid voxel index -> the scan's world coordinates (mm), from a volume's
    preprocessing metadata (``crop_start``, ``crop_stop``, ``source_voxel_size_mm``,
    ``voxel_size_mm``) and the scan's canonical affine (see the module notes)."""
    start = np.asarray(meta["crop_start"], dtype=float)
    stop = np.asarray(meta["crop_stop"], dtype=float)
    zooms = np.asarray(meta["source_voxel_size_mm"], dtype=float)
    step = float(meta["voxel_size_mm"]) / zooms
    grid = np.eye(4)
    grid[:3, :3] = np.diag(step)
    grid[:3, 3] = (start + stop - 1.0) / 2.0 - step * (resolution - 1) / 2.0
    return np.asarray(canonical_affine, dtype=float) @ grid


def native_geometry(meta: CubeFit, path: str | Path, resolution: int) -> NativeGeometry:
    """Everything :func:`to_scan_space` needs for one input: its :func:`scan_geometry` with
    ``grid_to_world``, JSON-ready (``encode`` stores it, so ``decode`` can go back without the file)."""
    scan = scan_geometry(path)
    return {"shape": scan["shape"], "affine": scan["affine"], "xform_code": scan["xform_code"],
            "grid_to_world": grid_to_world(meta, scan["canonical_affine"], resolution).tolist()}


def checked_geometry(value: Any, where: str) -> NativeGeometry:
    """A geometry read from a file someone gave us (a latents file), checked before use: shape of
    three positive integers within the reader's size limit, finite invertible 4x4 affines."""
    try:
        shape = [int(s) for s in value["shape"]]
        affine = np.asarray(value["affine"], dtype=float)
        grid = np.asarray(value["grid_to_world"], dtype=float)
        code = int(value.get("xform_code", 1))
        ok = (len(shape) == 3 and all(s >= 1 for s in shape) and math.prod(shape) <= MAX_VOXELS
              and affine.shape == grid.shape == (4, 4) and np.isfinite(affine).all() and np.isfinite(grid).all()
              and abs(np.linalg.det(affine[:3, :3])) > 0 and abs(np.linalg.det(grid[:3, :3])) > 0
              and 0 <= code <= 4)
    except (KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise UserError(f"{where}: the recorded scan geometry is not valid (expected a shape of 3 positive "
                        f"integers up to 512³ voxels and finite invertible 4x4 affines)")
    return {"shape": shape, "affine": affine, "xform_code": code, "grid_to_world": grid}


def to_scan_space(volume: np.ndarray, geometry: NativeGeometry) -> np.ndarray:
    """A model-grid volume (R, R, R) resampled onto the scan's grid: an array of the scan's shape
    (float32), zero outside the model's cube.  ``geometry``: :func:`native_geometry`'s dict."""
    volume = np.asarray(volume, dtype=np.float32)
    grid = np.asarray(geometry["grid_to_world"], dtype=float)
    scan_affine = np.asarray(geometry["affine"], dtype=float)
    shape = tuple(int(s) for s in geometry["shape"])
    # scan voxel index -> model-grid index
    scan_to_grid = np.linalg.inv(grid) @ scan_affine
    # model voxels spanned by one scan voxel along each grid axis (row norms): > 1 where the model
    # grid is finer than the scan's
    ratio = np.sqrt((scan_to_grid[:3, :3] ** 2).sum(axis=1))
    sigma = np.maximum(0.0, (ratio - 1.0) / 2.0)
    if np.any(sigma > 0.05):
        volume = ndimage.gaussian_filter(volume, sigma=sigma, mode="constant", cval=0.0, truncate=3.0)
    return ndimage.affine_transform(volume, scan_to_grid[:3, :3], offset=scan_to_grid[:3, 3], output_shape=shape,
                                    order=1, mode="constant", cval=0.0, prefilter=False, output=np.float32)
