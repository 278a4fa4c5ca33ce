"""A compact tissue atlas derived from the MNI ICBM152 2009 nonlinear symmetric template.

The phantom population (:mod:`verydeepvae.data.phantom`) deforms this atlas to make subjects.

Source: the 1 mm grey-matter, white-matter and T1 maps that nilearn ships in
``nilearn/datasets/data/`` (``mni_icbm152_{gm,wm,t1}_tal_nlin_sym_09a_converted.nii.gz``, uint8,
already skull-stripped). Nothing is downloaded. ``scripts/make_atlas.py`` runs
:func:`build_atlas` once and writes the result into the package
(``verydeepvae/atlas/mni152_2009_tissue.nii.gz``, copyright notice in ``atlas/NOTICE``);
:func:`load_atlas` reads that file and only falls back to rebuilding from an installed nilearn
when the packaged file is missing.  nilearn is therefore an optional extra
(``pip install "verydeepvae[atlas]"``), not a dependency.

How the four channels (x, y, z, channel; uint8, value/255 = fraction of the voxel) are made, at
1 mm before downsampling:

* ``gm``, ``wm``: the template's probability maps, unchanged.
* brain mask: ``t1 > 0`` (the converted T1 is skull-stripped; the mask includes brainstem,
  cerebellum, sulcal and ventricular CSF), holes filled.
* ``csf``: ``mask * clip(1 - gm - wm, 0, 1)`` — whatever in the brain mask is neither grey nor white
  matter: sulcal/cisternal CSF and the ventricles.
* ``ventricle``: the part of ``csf`` inside the lateral ventricles: the connected component of deep
  CSF (``csf > 0.5`` and more than 15 mm inside the mask) that lies off the midline, i.e. the
  component with the largest mean distance from the mid-sagittal plane among the large ones
  (at least a quarter of the largest; the other one is the interhemispheric fissure joined to
  the basal cisterns and the third ventricle), grown by two voxels into ``csf > 0.2`` to keep the partial-volume rim.

Then the volume is cropped to the brain's bounding box (plus a margin), block-averaged to
``voxel_mm`` (2 mm: exact partial-volume fractions) and quantised to uint8.
"""

from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from ..errors import DataError

ATLAS_FILENAME = "mni152_2009_tissue.nii.gz"
CHANNELS = ("gm", "wm", "csf", "ventricle")
NILEARN_FILES = {
    key: f"mni_icbm152_{key}_tal_nlin_sym_09a_converted.nii.gz" for key in ("gm", "wm", "t1")
}
DEFAULT_VOXEL_MM = 2.0


@dataclass(frozen=True)
class Atlas:
    """Tissue fractions on a cropped RAS grid; ``affine`` maps voxel indices to MNI mm."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    ventricle: np.ndarray
    affine: np.ndarray
    source: str

    @property
    def voxel_mm(self) -> float:
        return float(abs(self.affine[0, 0]))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.gm.shape)  # type: ignore[return-value]

    @property
    def mask(self) -> np.ndarray:
        """Fraction of each voxel inside the brain mask."""
        return np.clip(self.gm + self.wm + self.csf, 0.0, 1.0)


def packaged_atlas_path() -> Path:
    """Where the atlas shipped with the package lives (it may be missing in a bare checkout)."""
    return Path(str(importlib.resources.files("verydeepvae").joinpath("atlas", ATLAS_FILENAME)))


NILEARN_MISSING = ("nilearn is not installed; it is only needed to rebuild the tissue atlas from the MNI152 "
                   "template files it ships: pip install 'verydeepvae[atlas]'")


def nilearn_data_dir() -> Path:
    """nilearn's template folder.  nilearn (with pandas and scikit-learn, ~160 MB) is the optional
    ``atlas`` extra: the built atlas ships with the package, so only rebuilding it needs nilearn."""
    try:
        import nilearn.datasets
    except ImportError:
        packaged = packaged_atlas_path()
        where = f"the packaged atlas {packaged} is missing and " if not packaged.exists() else ""
        raise DataError(where + NILEARN_MISSING) from None
    return Path(nilearn.datasets.__file__).parent / "data"


def derive_tissue_maps(gm: np.ndarray, wm: np.ndarray, t1: np.ndarray) -> dict[str, np.ndarray]:
    """GM, WM, CSF and lateral-ventricle fractions (float32, 0..1) from the 1 mm template maps."""
    gm = np.clip(np.asarray(gm, np.float32), 0.0, 1.0)
    wm = np.clip(np.asarray(wm, np.float32), 0.0, 1.0)
    mask = ndi.binary_fill_holes(np.asarray(t1) > 0)
    gm = gm * mask
    wm = wm * mask
    csf = (np.clip(1.0 - gm - wm, 0.0, 1.0) * mask).astype(np.float32)

    depth = ndi.distance_transform_edt(mask)
    deep = (csf > 0.5) & (depth > 15.0)
    labels, count = ndi.label(deep)
    if count == 0:
        raise DataError("could not find the lateral ventricles in the template CSF map")
    sizes = ndi.sum(deep, labels, np.arange(1, count + 1))
    order = np.argsort(sizes)[::-1]
    largest = [int(k) + 1 for k in order if sizes[k] >= 0.25 * sizes[order[0]]][:3]
    mid_x = (mask.shape[0] - 1) / 2.0
    xs = np.arange(mask.shape[0], dtype=np.float32)[:, None, None]
    offsets = [float(np.abs(np.broadcast_to(xs, mask.shape)[labels == k] - mid_x).mean()) for k in largest]
    lateral = labels == largest[int(np.argmax(offsets))]
    lateral = ndi.binary_dilation(lateral, iterations=2, mask=csf > 0.2)
    ventricle = (csf * lateral).astype(np.float32)
    return {"gm": gm, "wm": wm, "csf": csf, "ventricle": ventricle, "mask": mask}


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    sx, sy, sz = (s // factor for s in volume.shape)
    v = volume[: sx * factor, : sy * factor, : sz * factor]
    return v.reshape(sx, factor, sy, factor, sz, factor).mean(axis=(1, 3, 5))


def build_atlas(voxel_mm: float = DEFAULT_VOXEL_MM, margin_mm: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Build the compact atlas from nilearn's files: ``(uint8 array (x, y, z, 4), affine)``."""
    factor = int(round(voxel_mm))
    if factor < 1 or abs(factor - voxel_mm) > 1e-6:
        raise ValueError(f"voxel_mm must be a whole number of millimetres, got {voxel_mm}")
    directory = nilearn_data_dir()
    images = {}
    for key, name in NILEARN_FILES.items():
        path = directory / name
        if not path.exists():
            raise DataError(f"nilearn template file not found: {path}")
        images[key] = nib.load(str(path))
    affine = images["t1"].affine
    linear = affine[:3, :3]
    if not np.allclose(np.abs(np.diag(linear)), 1.0) or not np.allclose(linear, np.diag(np.diag(linear))):
        raise DataError(f"expected a 1 mm axis-aligned template, got affine {affine.tolist()}")
    maps = derive_tissue_maps(
        images["gm"].get_fdata(dtype=np.float32) / 255.0,
        images["wm"].get_fdata(dtype=np.float32) / 255.0,
        images["t1"].get_fdata(dtype=np.float32),
    )
    idx = np.argwhere(maps["mask"])
    lo = np.maximum(idx.min(0) - margin_mm, 0)
    hi = idx.max(0) + 1 + margin_mm
    size = -(-(hi - lo) // factor) * factor  # round up to a multiple of the factor
    channels = []
    for key in CHANNELS:
        padded = np.zeros(tuple(size), np.float32)
        crop = maps[key][lo[0] : lo[0] + size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]]
        padded[: crop.shape[0], : crop.shape[1], : crop.shape[2]] = crop
        channels.append(_block_mean(padded, factor))
    data = np.clip(np.rint(np.stack(channels, axis=-1) * 255.0), 0, 255).astype(np.uint8)
    out_affine = affine.copy()
    out_affine[:3, :3] = affine[:3, :3] * factor
    # Index i of the block grid covers source voxels lo + factor*i .. +factor-1: its centre is
    # at source index lo + factor*i + (factor-1)/2.
    out_affine[:3, 3] = affine[:3, :3] @ (lo + (factor - 1) / 2.0) + affine[:3, 3]
    return data, out_affine


def _from_array(data: np.ndarray, affine: np.ndarray, source: str) -> Atlas:
    if data.ndim != 4 or data.shape[-1] != len(CHANNELS):
        raise DataError(f"atlas {source}: expected shape (x, y, z, {len(CHANNELS)}), got {data.shape}")
    values = [np.ascontiguousarray(data[..., i], dtype=np.float32) / 255.0 for i in range(len(CHANNELS))]
    return Atlas(*values, affine=np.asarray(affine, dtype=float), source=source)


@functools.lru_cache(maxsize=2)
def load_atlas(path: str | None = None) -> Atlas:
    """The packaged atlas (or ``path``); rebuilt from nilearn if the packaged file is missing."""
    candidate = Path(path) if path is not None else packaged_atlas_path()
    if candidate.exists():
        try:
            image = nib.load(str(candidate))
            data = np.asarray(image.dataobj, dtype=np.uint8)
        except Exception as exc:
            raise DataError(f"cannot read the tissue atlas {candidate}: {exc}") from exc
        return _from_array(data, image.affine, str(candidate))
    if path is not None:
        raise DataError(f"tissue atlas not found: {candidate}")
    data, affine = build_atlas()
    return _from_array(data, affine, "nilearn")
