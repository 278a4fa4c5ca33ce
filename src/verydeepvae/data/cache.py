"""On-disk cache of preprocessed volumes.

Layout: ``<cache_dir>/preprocessed-<settings key>/<sha256 of the file's bytes>.safetensors``.

* The key is the **content hash** of the source file (so renaming or touching a file costs
  nothing, and an edited file is never served from a stale entry) inside a folder named by a hash
  of **every preprocessing setting** and the preprocessing code version (so changing the
  resolution, clamp percentiles or cropping never reuses old volumes).  ``settings.json`` in that
  folder records the settings for people.
* Each entry is one safetensors file (no pickle, nothing executable): the R³ volume quantised to
  uint16 (steps of 1/65535, far finer than the model's 256 bins; half the size of float32) and
  the metadata (clamp values, voxel size, source geometry, warnings) as JSON in its header.
* Writes are atomic (temporary file + rename), so concurrent ranks or a crash never leave a
  half-written entry; an unreadable entry is treated as missing and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from ..atomic import write_bytes, write_json
from ..errors import DataError
from .nifti_load import PreprocessSettings, VolumeMeta, preprocess_file

QUANT = 65535.0
HASH_CHUNK = 1 << 20


def file_digest(path: str | Path) -> str:
    """SHA-256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class VolumeCache:
    """Preprocessed volumes for one set of preprocessing settings."""

    def __init__(self, root: str | Path, settings: PreprocessSettings):
        self.root = Path(root)
        self.settings = settings
        self.folder = self.root / f"preprocessed-{settings.key()}"

    def ensure_folder(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        marker = self.folder / "settings.json"
        if not marker.exists():
            write_json(marker, self.settings.to_dict())

    def path(self, digest: str) -> Path:
        return self.folder / f"{digest}.safetensors"

    def read_meta(self, digest: str) -> VolumeMeta | None:
        """The entry's metadata, or None if it is missing or unreadable."""
        path = self.path(digest)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="np") as handle:
                meta = json.loads((handle.metadata() or {})["meta"])
                shape = handle.get_slice("volume").get_shape()
        except Exception:  # corrupt or foreign file: rebuild it
            return None
        R = self.settings.resolution
        return meta if list(shape) == [R, R, R] else None

    def load(self, digest: str) -> np.ndarray:
        """The cached volume as float32 in [0, 1]; raises if the entry is missing or corrupt."""
        data = st_load(self.path(digest).read_bytes())["volume"]
        return data.astype(np.float32) * np.float32(1.0 / QUANT)

    def store(self, digest: str, volume: np.ndarray, meta: VolumeMeta) -> np.ndarray:
        """Write the entry; returns the volume as it will be read back (quantised)."""
        self.ensure_folder()
        quantised = np.round(np.clip(volume, 0.0, 1.0) * QUANT).astype(np.uint16)
        payload = st_save({"volume": quantised}, metadata={"meta": json.dumps(meta)})
        write_bytes(self.path(digest), payload)
        return quantised.astype(np.float32) * np.float32(1.0 / QUANT)


def prepare_entry(digest: str, path: str, cache: VolumeCache) -> tuple[bool, Any]:
    """Preprocess one file into the cache: ``(True, metadata)`` or ``(False, reason)``.

    Runs in worker processes, so this module stays free of torch.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nibabel chatter about odd headers; problems raise
            volume, meta = preprocess_file(path, cache.settings)
    except DataError as error:
        return False, str(error)
    except MemoryError:
        return False, f"{path}: too large to load into memory"
    cache.store(digest, volume, meta)
    return True, meta
