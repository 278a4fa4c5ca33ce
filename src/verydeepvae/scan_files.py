"""Input scans in, results for them out: the file handling that reconstruction, encoding,
interpolation, counterfactuals and evaluation share.

Input volumes go through exactly the preprocessing the model was trained with
(:mod:`verydeepvae.data.nifti_load`, settings from the checkpoint's own config); a result for an
input scan is also written resampled back into that scan's own space (``*_native.nii.gz``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from .console import bar
from .data.native_space import NativeGeometry, to_scan_space
from .errors import DataError
from .inference import to_data_intensity
from .volume_io import save_nifti

if TYPE_CHECKING:
    from .data.nifti_load import VolumeMeta


def input_files(path: str | Path, pattern: str | None = None) -> list[Path]:
    """One NIfTI file, a folder of them (nested too) or a text/CSV file listing them."""
    from .data import discover

    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"input {p} does not exist (expected a NIfTI file, a folder of them or a list file)")
    if p.is_file() and discover.is_nifti_name(p.name):
        return [p.resolve()]
    return discover.discover_files(p, pattern)


def load_preprocessed(files: Sequence[str | Path], settings, cache_root: str | Path | None = None,
                      show_progress: bool | None = None, desc: str = "preprocessing"
                      ) -> tuple[np.ndarray, list[VolumeMeta]]:
    """Volumes (N, R, R, R) float32 in [0, 1] and their preprocessing metadata, exactly as training.

    With ``cache_root`` (a training run's cache), volumes already preprocessed with the same
    settings are read from it (keyed by file content); the cache is never written to here.
    """
    from .data.cache import VolumeCache, file_digest
    from .data.nifti_load import preprocess_file

    cache = VolumeCache(cache_root, settings) if cache_root is not None else None
    R = settings.resolution
    out = np.empty((len(files), R, R, R), dtype=np.float32)
    metas: list[VolumeMeta] = []
    for i, f in enumerate(bar(list(files), desc=desc, unit="vol", show=show_progress)):
        volume = meta = None
        if cache is not None and cache.folder.is_dir():
            try:
                digest = file_digest(f)
                meta = cache.read_meta(digest)
                if meta is not None:
                    volume = cache.load(digest)
            except OSError:
                volume = meta = None
        if volume is None:
            volume, meta = preprocess_file(f, settings)
        out[i] = volume
        metas.append(meta)
    return out, metas


def output_stems(files: Sequence[str | Path]) -> list[str]:
    """File names without .nii/.nii.gz, made unique (``name``, ``name_2``...) in input order."""
    return unique_names(re.sub(r"\.nii(\.gz)?$", "", Path(f).name, flags=re.IGNORECASE) for f in files)


def unique_names(names: Iterable[str]) -> list[str]:
    """Each name, or ``name_2``, ``name_3``... when it was taken, by an earlier name or by a
    generated one (``a/sub``, ``b/sub``, ``c/sub_2`` -> ``sub``, ``sub_2``, ``sub_2_2``)."""
    taken: set[str] = set()
    result = []
    for name in names:
        candidate, count = name, 1
        while candidate in taken:
            count += 1
            candidate = f"{name}_{count}"
        taken.add(candidate)
        result.append(candidate)
    return result


def safe_file_stem(name: Any, fallback: str) -> str:
    """A name read from a file (e.g. a latents file's ``names``) made safe as an output file stem:
    data, never a path (``../../x`` and ``/abs/x`` become ``x``); ``fallback`` when nothing is left."""
    text = str(name) if isinstance(name, (str, int)) else ""
    stem = re.sub(r"[\x00-\x1f/\\]+", "_", Path(text.replace("\\", "/")).name).strip(" .")
    return stem[:200] if stem else fallback


NATIVE_NOTE = ("*_native.nii.gz: the model-grid result resampled (trilinear) into the input scan's own grid, same "
               "shape and affine as the input file, zero outside the preprocessing crop; overlays on the scan")


def write_native(volume: np.ndarray, geometry: NativeGeometry, path: Path,
                 low_high: tuple[float, float] | None, description: str) -> Path:
    """A model-grid volume (model range [0, 1]) written in an input scan's own space (shape,
    affine and sform/qform code of the scan; :mod:`verydeepvae.data.native_space`), in the data's
    intensity scale when ``low_high`` is given (mapped after resampling, so the background test
    sees the resampled values)."""
    native = to_scan_space(volume, geometry)
    if low_high is not None:
        native = to_data_intensity(native, *low_high)
    save_nifti(native, path, np.asarray(geometry["affine"], dtype=float), description=description,
               xform_code=int(geometry.get("xform_code", 1)))  # the scan's own: 0 stays 0
    return path
