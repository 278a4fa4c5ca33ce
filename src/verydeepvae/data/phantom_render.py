"""Geometry and rendering for the phantom population (see :mod:`verydeepvae.data.phantom`).

Everything here works in millimetres on a cubic field of view of ``FOV_MM`` centred on the
origin, so a subject drawn from a seed has the same anatomy at every resolution: the random
fields live on fixed coarse control grids and the lesions have positions and sizes in mm.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .atlas import Atlas, load_atlas

FOV_MM = 192.0
DEFORMATION_GRID = 6  # control points per axis of the nonlinear deformation
BIAS_GRID = 4  # control points per axis of the bias field
SHARPNESS = 2.0  # exponent that sharpens the template's tissue fractions (see sharpen)


@dataclass(frozen=True)
class Anatomy:
    """The atlas plus what is derived from it once: extra channels, fields, lesion sites."""

    atlas: Atlas
    channels: np.ndarray  # (5, X, Y, Z): gm, wm, csf, ventricle fractions; pial distance (mm)
    toward_ventricles: np.ndarray  # (3, X, Y, Z) in atlas voxels per mm of enlargement
    periventricular_sites: np.ndarray  # (N, 3) atlas voxel coordinates
    deep_sites: np.ndarray  # (M, 3) atlas voxel coordinates
    centre_vox: np.ndarray  # (3,) centre of the brain's bounding box, atlas voxel coordinates
    support: np.ndarray  # (X, Y, Z) bool: atlas voxels that may contribute (dilated brain mask)
    pull_box: tuple[np.ndarray, np.ndarray]  # atlas-voxel box outside which the pull is ~0


@functools.lru_cache(maxsize=1)
def anatomy() -> Anatomy:
    atlas = load_atlas()
    vox = atlas.voxel_mm
    mask = atlas.mask
    sulcal = np.clip(atlas.csf - atlas.ventricle, 0.0, 1.0)
    # Pial distance: mm to the nearest sulcal/cisternal CSF (fraction > 0.2, ventricles
    # excluded) or to the outside of the brain. Cortical thinning by t mm turns the grey matter
    # closer than t to it into CSF, so sulci widen and the cortex recedes from the surface.
    pial = (sulcal > 0.2) | (mask < 0.5)
    pial_distance = ndi.distance_transform_edt(~pial) * vox
    channels = np.stack([atlas.gm, atlas.wm, atlas.csf, atlas.ventricle, pial_distance]).astype(np.float32)

    # Ventricle enlargement pulls sampling positions towards the ventricles along the gradient
    # of the smoothed ventricle map, scaled so the largest pull is 1 mm per mm of enlargement.
    smooth = ndi.gaussian_filter(atlas.ventricle, sigma=5.0 / vox)
    grad = np.stack(np.gradient(smooth))
    grad /= np.sqrt((grad**2).sum(axis=0)).max()
    toward = (grad / vox).astype(np.float32)

    # Where lesions may sit: periventricular (white matter 2-8 mm from the lateral ventricles)
    # and deep (white matter > 12 mm from the ventricles and > 4 mm from grey matter).
    dist_vent = ndi.distance_transform_edt(atlas.ventricle < 0.5) * vox
    dist_gm = ndi.distance_transform_edt(atlas.gm < 0.3) * vox
    pv = (atlas.wm > 0.5) & (dist_vent >= 2.0) & (dist_vent <= 8.0)
    deep = (atlas.wm > 0.85) & (dist_vent > 12.0) & (dist_gm > 4.0)
    idx = np.argwhere(mask > 0.5)
    centre = (idx.min(0) + idx.max(0)) / 2.0
    support = ndi.binary_dilation(mask > 0.01, iterations=2)
    strength = np.sqrt((toward**2).sum(axis=0))
    live = np.argwhere(strength > 1e-3 * strength.max())
    pull_box = (live.min(0).astype(float) - 1.0, live.max(0).astype(float) + 1.0)
    pv_sites, deep_sites = np.argwhere(pv).astype(float), np.argwhere(deep).astype(float)
    return Anatomy(atlas, channels, toward, pv_sites, deep_sites, centre, support, pull_box)


def axis_mm(resolution: int) -> np.ndarray:
    """Voxel-centre coordinates (mm) along one axis; matches ``volume_io.grid_affine``."""
    vox = FOV_MM / resolution
    return (np.arange(resolution) - (resolution - 1) / 2.0) * vox


def rbf_weights(x_mm: np.ndarray, n: int) -> np.ndarray:
    """(len(x), n) smooth interpolation weights from ``n`` control points spanning the FOV.

    Gaussian bumps one control spacing wide, each row normalised to unit length, so a field
    with i.i.d. N(0, s^2) control values has standard deviation s everywhere.
    """
    centres = np.linspace(-FOV_MM / 2.0, FOV_MM / 2.0, n)
    spacing = centres[1] - centres[0]
    w = np.exp(-0.5 * ((np.asarray(x_mm, float)[:, None] - centres[None, :]) / spacing) ** 2)
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def smooth_field(coeffs: np.ndarray, resolution: int) -> np.ndarray:
    """Evaluate control values ``coeffs`` (..., n, n, n) on the full grid (..., R, R, R)."""
    w = rbf_weights(axis_mm(resolution), coeffs.shape[-1]).astype(np.float32)
    out = np.tensordot(coeffs.astype(np.float32), w, axes=([-1], [1]))  # (..., nx, ny, Rz)
    out = np.tensordot(out, w, axes=([-2], [1]))  # (..., nx, Rz, Ry)
    out = np.tensordot(out, w, axes=([-3], [1]))  # (..., Rz, Ry, Rx)
    return np.ascontiguousarray(np.swapaxes(out, -1, -3))


def field_at(coeffs: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """Evaluate control values ``coeffs`` (C, n, n, n) at scattered points (P, 3): (P, C)."""
    n = coeffs.shape[-1]
    wx, wy, wz = (rbf_weights(points_mm[:, k], n) for k in range(3))
    return np.einsum("pa,pb,pc,kabc->pk", wx, wy, wz, coeffs)


def rotation_matrix(degrees: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Pose:
    """Output mm -> atlas voxel: ``q = M p + m0 + S d(p)``, then the ventricle pull."""

    matrix: np.ndarray  # (3, 3)
    offset: np.ndarray  # (3,)
    displacement_scale: np.ndarray  # (3,) atlas voxels per mm of nonlinear displacement
    deformation: np.ndarray  # (3, n, n, n) control values of the nonlinear displacement (mm)
    enlargement_mm: float


def make_pose(anat: Anatomy, scales, rotation_deg, translation_mm, deformation, enlargement_mm) -> Pose:
    """Compose misregistration, nonlinear deformation and brain size into one map.

    The subject is the atlas scaled by ``scales`` (about the brain's centre), deformed, then
    rotated and translated in the scanner: an output point p shows the atlas at
    ``centre + (R^T (p - t) + d(p)) / scales``.
    """
    vox = anat.atlas.voxel_mm
    inv_scale = 1.0 / (np.asarray(scales, float) * vox)
    rot_t = rotation_matrix(np.asarray(rotation_deg, float)).T
    matrix = inv_scale[:, None] * rot_t
    offset = anat.centre_vox - matrix @ np.asarray(translation_mm, float)
    return Pose(matrix, offset, inv_scale, np.asarray(deformation, float), float(enlargement_mm))


def _pull(anat: Anatomy, coords: np.ndarray, enlargement_mm: float) -> np.ndarray:
    """Apply the ventricle pull to atlas coordinates (3, P); only points near the ventricles move."""
    if enlargement_mm == 0.0 or coords.shape[1] == 0:
        return coords
    lo, hi = anat.pull_box
    near = np.flatnonzero(np.all((coords >= lo[:, None]) & (coords <= hi[:, None]), axis=0))
    pts = coords[:, near]
    out = coords.copy()
    for k in range(3):
        shift = ndi.map_coordinates(anat.toward_ventricles[k], pts, order=1, mode="constant", cval=0.0, prefilter=False)
        out[k, near] += enlargement_mm * shift
    return out


def sample_tissues(anat: Anatomy, pose: Pose, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Atlas channels at the output voxels that can be inside the brain.

    Returns ``(index, channels)``: flat indices into the (R, R, R) grid and (5, P) float32 values
    (gm, wm, csf, ventricle, pial distance) there; every other voxel is background. Working on
    these points only (about a quarter of the cube) keeps the interpolation cheap.
    """
    ax = axis_mm(resolution).astype(np.float32)
    disp = smooth_field(pose.deformation, resolution)
    coords = []
    for k in range(3):
        m = pose.matrix[k].astype(np.float32)
        c = (m[0] * ax)[:, None, None] + (m[1] * ax)[None, :, None] + (m[2] * ax)[None, None, :]
        c += np.float32(pose.offset[k]) + np.float32(pose.displacement_scale[k]) * disp[k]
        coords.append(c.ravel())
    del disp
    shape = np.array(anat.support.shape)
    rounded = [np.rint(c).astype(np.int32) for c in coords]
    inside = np.ones(resolution**3, dtype=bool)
    for k in range(3):
        inside &= (rounded[k] >= 0) & (rounded[k] < shape[k])
    candidates = np.flatnonzero(inside)
    flat = np.ravel_multi_index(tuple(r[candidates] for r in rounded), anat.support.shape)
    index = candidates[anat.support.ravel()[flat]]
    pts = np.stack([c[index] for c in coords]).astype(np.float64)
    pts = _pull(anat, pts, pose.enlargement_mm)
    channels = np.stack(
        [ndi.map_coordinates(ch, pts, order=1, mode="constant", cval=0.0, prefilter=False) for ch in anat.channels]
    )
    return index, channels


def output_mm_of(anat: Anatomy, pose: Pose, targets_vox: np.ndarray, iterations: int = 8) -> np.ndarray:
    """Invert the output-to-atlas map for scattered atlas points (P, 3) by fixed-point steps."""
    inverse = np.linalg.inv(pose.matrix)
    points = (targets_vox - pose.offset) @ inverse.T
    for _ in range(iterations):
        disp = field_at(pose.deformation, points) * pose.displacement_scale
        q = points @ pose.matrix.T + pose.offset + disp
        q = _pull(anat, q.T, pose.enlargement_mm).T
        points = points + (targets_vox - q) @ inverse.T
    return points


def sharpen(channels: np.ndarray, power: float = SHARPNESS) -> np.ndarray:
    """Make the template's blurry (population-averaged) tissue fractions crisper, like one brain.

    GM/WM/CSF fractions f become f**power / sum(f**power) times their original sum, so the mask
    is unchanged; the ventricle fraction keeps its share of the CSF.
    """
    gm, wm, csf, ventricle, pial_distance = channels
    total = gm + wm + csf
    powered = np.stack([gm, wm, csf]) ** power
    norm = powered.sum(axis=0)
    scale = np.divide(total, norm, out=np.zeros_like(total), where=norm > 0)
    gm, wm, new_csf = powered * scale
    ventricle = ventricle * np.divide(new_csf, csf, out=np.zeros_like(csf), where=csf > 1e-6)
    return np.stack([gm, wm, new_csf, np.minimum(ventricle, new_csf), pial_distance])


def render_lesions(resolution: int, centres_mm: np.ndarray, radii_mm: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """Soft ellipsoids (value 1 inside, smooth 1-voxel edge) on the output grid, combined by max."""
    out = np.zeros((resolution,) * 3, dtype=np.float32)
    vox = FOV_MM / resolution
    ax = axis_mm(resolution)
    for centre, radii, rot in zip(centres_mm, radii_mm, rotations):
        reach = radii.max() + 1.5 * vox
        lo = np.clip(np.floor((centre - reach - ax[0]) / vox).astype(int), 0, resolution)
        hi = np.clip(np.ceil((centre + reach - ax[0]) / vox).astype(int) + 1, 0, resolution)
        if np.any(hi <= lo):
            continue
        grids = np.meshgrid(*(ax[lo[k] : hi[k]] - centre[k] for k in range(3)), indexing="ij")
        local = np.tensordot(rot.T, np.stack(grids), axes=1)  # coordinates in the lesion's frame
        r = np.sqrt(((local / radii[:, None, None, None]) ** 2).sum(axis=0))
        # Edge width ~ half a voxel in mm, relative to the smallest radius.
        edge = max(0.5 * vox / radii.min(), 0.15)
        blob = np.clip((1.0 - r) / edge + 0.5, 0.0, 1.0).astype(np.float32)
        view = out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        np.maximum(view, blob, out=view)
    return out
