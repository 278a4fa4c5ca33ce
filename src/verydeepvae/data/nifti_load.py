"""Reading one NIfTI volume and turning it into the model's R³ grid with intensities in [0, 1].

The steps, in order (``preprocess_file``):

1. **Read** with nibabel: any stored dtype (uint8, int16/int32 with ``scl_slope``/``scl_inter``,
   float32/64; scaling is applied).  A 4D image whose extra dimensions are all 1 is squeezed to 3D;
   a true 4D series, a 2D image (fewer than 2 voxels along a spatial axis) and non-NIfTI files are
   rejected with a ``DataError`` naming the file.
2. **Orientation**: reordered/flipped to the closest canonical RAS+ orientation
   (``nibabel.as_closest_canonical``), so array axis 0 runs left→right, 1 posterior→anterior,
   2 inferior→superior, whatever the scanner stored.  Left stays left.  (A residual oblique
   rotation is not resampled away.)
3. **Non-finite voxels** (NaN/inf) are treated as background: set to the volume's smallest finite
   value (so they become 0), with a notice.  A volume with no finite voxel, a constant volume
   (including all zeros) or one with almost no foreground is a bad file.
4. **Foreground** = voxels brighter than ``min + 5% * (99.9th percentile - min)``.
5. **Intensity**: clamped to the ``clamp_percentiles`` (default 0.05 and 99.95) of the
   *foreground* voxels, then scaled linearly to [0, 1]; background (below the low value) is 0.
   With ``intensity_anchor_percentile`` P the scale comes from the P-th percentile instead, which
   lands at :data:`ANCHOR_LEVEL` (values above 1 are clipped). Why: the upper clamp percentile of a
   FLAIR scan with many lesions is a lesion value, so the same white matter comes out darker the
   more lesions a scan has (phantoms: Spearman -0.58 between lesion load and white-matter model
   intensity, -0.02 with P = 99 and +0.09 with P = 90), and a model then learns lesion load as
   global brightness rather than as lesions.
6. **Geometry**: the foreground bounding box (``crop_to_foreground``, plus a 6% margin per side;
   otherwise the whole field of view) is placed in a cube whose side is its longest physical
   extent, and that cube is resampled to R³ voxels in one linear interpolation, in physical space
   (voxel sizes from the affine), with a Gaussian anti-aliasing pre-filter along axes that are
   shrunk.  Anisotropic voxels therefore become isotropic, the aspect ratio is kept (shorter axes
   are padded with background, never stretched), and the resulting voxel size
   (side / R, in mm) is recorded.  Each volume is fitted on its own, so with
   ``crop_to_foreground`` overall head size is normalised across subjects (shape is not); set it
   to false to keep physical sizes of scans that share one field of view.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..errors import DataError
from ..json_types import JSONObject

# Bump whenever the output of preprocessing changes, so older cache entries are never reused.
PREPROCESS_VERSION = 1
FOREGROUND_FRACTION = 0.05  # of (robust max - min), above the minimum
CROP_MARGIN = 0.06  # of the longest foreground extent, on each side (room for mild affine moves)
MIN_FOREGROUND_VOXELS = 8
ANCHOR_LEVEL = 0.5  # model intensity of the anchor percentile: room up to twice its value above it
BBOX_SLICE_FRACTION = 5e-4  # slices with fewer foreground voxels than this x the fullest one are ignored


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that changes a preprocessed volume; part of every cache key."""

    resolution: int
    clamp_percentiles: tuple[float, float] = (0.05, 99.95)
    crop_to_foreground: bool = True
    foreground_fraction: float = FOREGROUND_FRACTION
    crop_margin: float = CROP_MARGIN
    version: int = PREPROCESS_VERSION
    anchor_percentile: float | None = None  # None: the upper clamp percentile maps to 1

    @classmethod
    def from_config(cls, cfg: Any) -> "PreprocessSettings":
        lo, hi = cfg.clamp_percentiles
        anchor = getattr(cfg, "intensity_anchor_percentile", None)
        return cls(
            resolution=int(cfg.resolution),
            clamp_percentiles=(float(lo), float(hi)),
            crop_to_foreground=bool(cfg.crop_to_foreground),
            anchor_percentile=None if anchor is None else float(anchor),
        )

    def to_dict(self) -> JSONObject:
        """The settings as JSON; without an anchor the dictionary (and so the cache key) is the one
        written before anchors existed, so existing caches stay valid."""
        d = asdict(self)
        d["clamp_percentiles"] = list(self.clamp_percentiles)
        if self.anchor_percentile is None:
            del d["anchor_percentile"]
        return d

    def key(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- reading ---------------------------------------------------------------------------------------


MAX_VOXELS = 512**3  # 0.5 GiB as float32; guards against small files that decompress to huge volumes


def open_image(path: str | Path) -> nib.spatialimages.SpatialImage:
    """Load the header (not the voxels) and check the image is a usable 3D NIfTI volume.

    This is the quick up-front check; it returns the squeezed 3D image.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO or device would block the read forever
        raise DataError(f"{path}: is not a regular file")
    try:
        image = nib.load(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: file does not exist") from None
    except Exception as error:  # nibabel raises many types for garbage input
        hint = ""
        if path.name.lower().endswith(".nii") and _starts_with(path, b"\x1f\x8b"):
            hint = "; it is gzip-compressed, so it should be named .nii.gz"
        raise DataError(f"{path}: cannot be read as NIfTI ({_describe(error)}){hint}") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{path}: is a {type(image).__name__}, not a NIfTI image")
    shape = tuple(int(s) for s in image.shape)
    if len(shape) < 3:
        raise DataError(f"{path}: is a {len(shape)}D image of shape {shape}; a 3D volume is expected")
    if len(shape) > 3:
        extra = shape[3:]
        if any(s != 1 for s in extra):
            raise DataError(
                f"{path}: is a {len(shape)}D series of shape {shape} ({math.prod(extra)} volumes); "
                "a single 3D volume is expected (split the series, e.g. with fslsplit, and pick one)"
            )
        image = nib.funcs.squeeze_image(image)
        shape = shape[:3]
    if min(shape) < 2:
        raise DataError(f"{path}: is a 2D image (shape {shape}); a 3D volume is expected")
    if math.prod(shape) > MAX_VOXELS:
        raise DataError(f"{path}: holds {shape[0]}x{shape[1]}x{shape[2]} voxels, more than the {MAX_VOXELS:,} "
                        "(512³) this tool reads; a compressed file this large would need "
                        f"{math.prod(shape) * 4 / 2**30:.1f} GiB as float32 (resample it first)")
    dtype = image.get_data_dtype()
    if np.issubdtype(dtype, np.complexfloating):
        raise DataError(f"{path}: has complex voxel values ({dtype}); a magnitude image is expected "
                        "(e.g. fslcomplex -realabs), the imaginary part would otherwise be dropped")
    if dtype.names is not None or not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise DataError(f"{path}: has voxel type {dtype}, not scalar intensities (e.g. an RGB image)")
    zooms = voxel_sizes(image.affine)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise DataError(f"{path}: has an invalid affine (voxel sizes {zooms.tolist()} mm)")
    return image


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Physical size (mm) of a voxel step along each array axis."""
    return np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))


def load_canonical(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxels as float32 in RAS+ array order, and the voxel sizes (mm) along those axes."""
    image = open_image(path)
    try:
        canonical = nib.as_closest_canonical(image)
        data = np.asarray(canonical.get_fdata(dtype=np.float32))
    except DataError:
        raise
    except MemoryError:
        raise
    except Exception as error:
        raise DataError(f"{path}: voxel data cannot be read, the file may be truncated or corrupt ({_describe(error)})") from None
    return data, voxel_sizes(canonical.affine)


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(len(magic)) == magic
    except OSError:
        return False


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


# --- intensity and geometry -----------------------------------------------------------------------


class CubeFit(TypedDict):
    """Where the model's cube sits in the scan (:func:`fit_to_cube`): its voxel size (mm) and the
    crop's start and stop indices in the RAS-ordered source voxels."""

    voxel_size_mm: float
    crop_start: list[int]
    crop_stop: list[int]


class VolumeMeta(CubeFit):
    """A preprocessed volume's metadata (kept beside it in the cache): the intensity clamp, the
    source grid and where the cube sits in it."""

    clamp_low: float
    clamp_high: float
    source_shape: list[int]
    source_voxel_size_mm: list[float]
    foreground_voxels: int
    warnings: list[str]


class IntensityReference(TypedDict, total=False):
    """How model intensities map back to the data's scale (``--intensity data``), kept in every checkpoint:
    medians over the training files of their ``clamp_low``/``clamp_high`` (empty in a run that had none)."""

    low: float
    high: float
    clamp_percentiles: list[float]
    anchor_percentile: float  # only when intensity_anchor_percentile was set (high is then derived from it)
    voxel_size_mm_range: list[float]
    mapping: str


def preprocess_volume(
    data: np.ndarray, zooms: np.ndarray, settings: PreprocessSettings, name: str = "volume"
) -> tuple[np.ndarray, VolumeMeta]:
    """RAS-ordered voxels + voxel sizes -> (R³ float32 volume in [0, 1], metadata)."""
    data = np.asarray(data, dtype=np.float32)
    zooms = np.asarray(zooms, dtype=float)
    warnings: list[str] = []
    finite = np.isfinite(data)
    if not finite.all():
        n_bad = int(data.size - np.count_nonzero(finite))
        if n_bad == data.size:
            raise DataError(f"{name}: has no finite voxel values (all NaN or infinite)")
        data = np.where(finite, data, data[finite].min())
        warnings.append(f"{name}: {n_bad} non-finite (NaN/inf) voxels were treated as background")
    low_value, high_value = float(data.min()), float(data.max())
    if high_value == low_value:
        what = "all voxels are zero" if high_value == 0 else f"it is constant (every voxel is {high_value:g})"
        raise DataError(f"{name}: is empty: {what}")

    sample = data[::2, ::2, ::2] if data.size > 2_000_000 else data
    robust_max = float(np.percentile(sample, 99.9))
    if robust_max <= low_value:
        robust_max = high_value
    threshold = low_value + settings.foreground_fraction * (robust_max - low_value)
    foreground = data > threshold
    n_fg = int(np.count_nonzero(foreground))
    if n_fg < MIN_FOREGROUND_VOXELS:
        raise DataError(f"{name}: has almost no foreground (only {n_fg} voxels above background)")

    clamp_low, clamp_high = _intensity_range(data[foreground], settings)
    if clamp_high <= clamp_low:  # e.g. a binary mask: every foreground voxel has the same value
        clamp_low = low_value
    scaled = (data - np.float32(clamp_low)) * np.float32(1.0 / (clamp_high - clamp_low))
    np.clip(scaled, 0.0, 1.0, out=scaled)

    volume, geometry = fit_to_cube(scaled, foreground, zooms, settings)
    meta: VolumeMeta = {
        "clamp_low": clamp_low,
        "clamp_high": clamp_high,
        "source_shape": [int(s) for s in data.shape],
        "source_voxel_size_mm": [float(z) for z in zooms],
        "foreground_voxels": n_fg,
        "warnings": warnings,
        **geometry,
    }
    return volume, meta


def _intensity_range(foreground_values: np.ndarray, settings: PreprocessSettings) -> tuple[float, float]:
    """The data values that map to model intensities 0 and 1 (module docstring, step 5)."""
    low, high = (float(v) for v in np.percentile(foreground_values, settings.clamp_percentiles))
    if settings.anchor_percentile is not None:
        anchor = float(np.percentile(foreground_values, settings.anchor_percentile))
        if anchor > low:
            high = low + (anchor - low) / ANCHOR_LEVEL
    return low, high


def foreground_box(foreground: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start/stop indices of the foreground along each axis, ignoring specks of noise."""
    starts, stops = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        counts = foreground.sum(axis=others)
        keep = np.flatnonzero(counts > BBOX_SLICE_FRACTION * counts.max())
        starts.append(int(keep[0]))
        stops.append(int(keep[-1]) + 1)
    return np.array(starts), np.array(stops)


def fit_to_cube(
    scaled: np.ndarray, foreground: np.ndarray, zooms: np.ndarray, settings: PreprocessSettings
) -> tuple[np.ndarray, CubeFit]:
    """Resample the (cropped) volume into an R³ cube of isotropic voxels, keeping its aspect ratio."""
    R = settings.resolution
    shape = np.array(scaled.shape)
    if settings.crop_to_foreground:
        start, stop = foreground_box(foreground)
        margin = settings.crop_margin
    else:
        start, stop = np.zeros(3, dtype=int), shape.copy()
        margin = 0.0
    extent = (stop - start) * zooms  # mm
    side = float(extent.max()) * (1.0 + 2.0 * margin)
    voxel = side / R
    # Keep real data (not zeros) in the margin where the image has it.
    pad = np.ceil(margin * extent.max() / zooms).astype(int)
    lo = np.maximum(start - pad, 0)
    hi = np.minimum(stop + pad, shape)
    crop = scaled[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    step = voxel / zooms  # input voxels per output voxel, per axis
    sigma = np.maximum(0.0, (step - 1.0) / 2.0)
    if np.any(sigma > 0.05):
        crop = ndimage.gaussian_filter(crop, sigma=sigma, mode="constant", cval=0.0, truncate=3.0)
    centre = (start + stop - 1) / 2.0 - lo  # centre of the box, in crop index coordinates
    offset = centre + (0.5 - R / 2.0) * step
    out = ndimage.affine_transform(
        crop, step, offset=offset, output_shape=(R, R, R), order=1, mode="constant", cval=0.0,
        prefilter=False, output=np.float32,
    )
    np.clip(out, 0.0, 1.0, out=out)
    return out, {
        "voxel_size_mm": voxel,
        "crop_start": [int(v) for v in start],
        "crop_stop": [int(v) for v in stop],
    }


def preprocess_file(path: str | Path, settings: PreprocessSettings) -> tuple[np.ndarray, VolumeMeta]:
    """Read, orient, normalise and resample one file (see the module notes)."""
    data, zooms = load_canonical(path)
    return preprocess_volume(data, zooms, settings, name=str(path))
