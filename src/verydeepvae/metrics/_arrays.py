"""Input normalisation shared by the metric modules.

Every public metric accepts numpy arrays or torch tensors. Volumes are shaped (N, D, H, W) or,
for a single volume, (D, H, W); a channel axis of size one, (N, 1, D, H, W), is also accepted and
squeezed. Feature matrices are shaped (N, F).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

ArrayLike = Any  # numpy array, torch tensor, or anything np.asarray accepts


def to_numpy(x: ArrayLike, dtype: Any = np.float64) -> np.ndarray:
    """Return ``x`` as a numpy array of ``dtype`` (tensors are detached and moved to the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def as_volume_batch(x: ArrayLike, name: str = "volumes", dtype: Any = np.float32) -> tuple[np.ndarray, bool]:
    """Return ``(batch, was_single)``: ``x`` as an (N, D, H, W) array and whether it was one volume.

    Accepts (D, H, W), (N, D, H, W) and (N, 1, D, H, W).
    """
    arr = to_numpy(x, dtype=dtype)
    if arr.ndim == 3:
        return arr[None], True
    if arr.ndim == 5 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 4:
        raise ValueError(
            f"{name}: expected a volume (D, H, W) or a batch (N, D, H, W), got shape {tuple(arr.shape)}"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: the batch is empty")
    return arr, False


def check_same_shape(x: np.ndarray, y: np.ndarray, names: str = "x and y") -> None:
    if x.shape != y.shape:
        raise ValueError(f"{names} must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def as_feature_matrix(x: ArrayLike, name: str = "features") -> np.ndarray:
    """Return ``x`` as a float64 (N, F) matrix; (N, ...) inputs are flattened per row."""
    arr = to_numpy(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    elif arr.ndim > 2:
        arr = arr.reshape(arr.shape[0], -1)
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: no rows")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def per_volume_result(values: np.ndarray, single: bool) -> float | np.ndarray:
    """A float for a single input volume, else a float64 array of shape (N,)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values[0]) if single else values
