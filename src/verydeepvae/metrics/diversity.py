"""Diversity: 3D multi-scale SSIM (MS-SSIM) between volumes, with settings valid at the volume size.

Sample diversity is reported as the mean MS-SSIM over random pairs of *distinct* generated
volumes (lower = more diverse), always beside the same statistic on pairs of real volumes: the
goal is to match the real value, not to minimise it (a model producing noise is very "diverse").

The size pitfall. MONAI's ``compute_ms_ssim`` (used here) raises unless, on every axis,
``size // (n_scales - 1)**2 > kernel_size - 1``; its defaults (5 scales, kernel 11) need >= 176
voxels per side and so fail at 32^3, 64^3 and 128^3. Independently, the (unpadded) SSIM window
must fit in the coarsest scale: ``size / 2**(n_scales - 1) >= kernel_size``. :func:`ms_ssim_settings`
picks the largest number of scales (at most 5) for which both hold with a 7-voxel Gaussian window
(sigma 1.5):

======  ======  ======  ====================================
volume  scales  kernel  weights (Wang et al. 2003, renormalised)
======  ======  ======  ====================================
32^3    3       7       0.0448, 0.2856, 0.3001 -> sum to 1
64^3    4       7       0.0448, 0.2856, 0.3001, 0.2363 -> sum to 1
128^3   5       7       0.0448, 0.2856, 0.3001, 0.2363, 0.1333
======  ======  ======  ====================================

Other sizes follow the same rule (e.g. 16^3 and 24^3 -> 2 scales, 48^3 -> 3, 96^3 -> 4,
>= 128^3 -> 5). Below 16^3 even 2 scales do not fit, and the metric falls back to a single scale
(= plain SSIM with the same window) and, if the volume is smaller than 7 voxels, to the largest
odd kernel that fits (minimum 3). Scores computed with different settings are not comparable with
each other nor with published values (e.g. Pinaya et al.'s 0.6555 at 160x224x160 with 5 scales and
kernel 11), which is why the settings are returned with every result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics.regression import compute_ms_ssim

from ._arrays import ArrayLike, as_volume_batch, check_same_shape, per_volume_result

WANG_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
DEFAULT_KERNEL = 7
KERNEL_SIGMA = 1.5
MIN_KERNEL = 3


@dataclass(frozen=True)
class MSSSIMSettings:
    """The MS-SSIM configuration used for one volume shape (state it beside every score)."""

    volume_shape: tuple[int, ...]
    num_scales: int
    weights: tuple[float, ...]
    kernel_size: int
    kernel_sigma: float
    data_range: float
    note: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["volume_shape"] = list(self.volume_shape)
        d["weights"] = [round(w, 6) for w in self.weights]
        return d


def _fits(shape: tuple[int, ...], n: int, k: int) -> bool:
    div = max(1, n - 1) ** 2
    for s in shape:
        if s // div <= k - 1:  # MONAI's check
            return False
        coarsest = s
        for _ in range(n - 1):
            coarsest //= 2  # avg_pool(kernel 2) floors
        if coarsest < k:  # the unpadded window must fit at the coarsest scale
            return False
    return True


def ms_ssim_settings(
    shape: tuple[int, ...], kernel_size: int = DEFAULT_KERNEL, max_scales: int = 5, data_range: float = 1.0
) -> MSSSIMSettings:
    """Choose scales, weights and kernel so MS-SSIM is valid on volumes of spatial ``shape``.

    Takes the largest number of scales <= ``max_scales`` for which both MONAI's size condition and
    "the window fits the coarsest scale" hold with ``kernel_size``; weights are the first
    ``num_scales`` Wang et al. weights renormalised to sum to 1. If not even one scale fits,
    the kernel shrinks to the largest odd size that does (at least 3), else ``ValueError``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"expected a 3D spatial shape, got {shape}")
    if not 1 <= max_scales <= len(WANG_WEIGHTS):
        raise ValueError(f"max_scales must be in 1..{len(WANG_WEIGHTS)}, got {max_scales}")
    k = int(kernel_size)
    for n in range(max_scales, 0, -1):
        if _fits(shape, n, k):
            break
    else:
        n = 1
        k = min(shape) if min(shape) % 2 == 1 else min(shape) - 1
        if k < MIN_KERNEL:
            raise ValueError(f"volumes of shape {shape} are too small for SSIM (need >= {MIN_KERNEL} per side)")
    w = np.array(WANG_WEIGHTS[:n], dtype=np.float64)
    w = tuple(float(v) for v in w / w.sum())
    if n == 1:
        note = f"single scale (plain SSIM), {k}-voxel Gaussian window: volume too small for multi-scale"
    else:
        note = f"{n} scales, {k}-voxel Gaussian window; not comparable with 5-scale/11-voxel published figures"
    return MSSSIMSettings(shape, n, w, k, KERNEL_SIGMA, float(data_range), note)


def _ms_ssim_batch(a: np.ndarray, b: np.ndarray, st: MSSSIMSettings, device: str) -> np.ndarray:
    ta = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[:, None].to(device)
    tb = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))[:, None].to(device)
    with torch.no_grad():
        v = compute_ms_ssim(
            ta,
            tb,
            spatial_dims=3,
            data_range=st.data_range,
            kernel_size=st.kernel_size,
            kernel_sigma=st.kernel_sigma,
            weights=st.weights,
        )
    return v.reshape(-1).double().cpu().numpy()


def ms_ssim3d(
    x: ArrayLike,
    y: ArrayLike,
    data_range: float = 1.0,
    settings: MSSSIMSettings | None = None,
    batch_size: int = 4,
    device: str = "cpu",
) -> float | np.ndarray:
    """3D MS-SSIM per volume pair (dimensionless, 1 = identical), using MONAI's implementation.

    ``settings`` defaults to :func:`ms_ssim_settings` for the volume shape. Pairs are processed in
    batches of ``batch_size`` to bound memory (a 128^3 pair needs roughly 0.2 GB of work space).
    Returns a float for a single (D, H, W) pair, else an array of shape (N,).
    """
    xb, single = as_volume_batch(x, "x")
    yb, _ = as_volume_batch(y, "y")
    check_same_shape(xb, yb)
    st = settings or ms_ssim_settings(xb.shape[1:], data_range=data_range)
    out = [
        _ms_ssim_batch(xb[i : i + batch_size], yb[i : i + batch_size], st, device)
        for i in range(0, len(xb), max(1, batch_size))
    ]
    return per_volume_result(np.concatenate(out), single)


def _pair_from_index(k: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Map linear indices over the n(n-1)/2 unordered pairs (row-major, i < j) to (i, j)."""
    k = k.astype(np.int64)
    i = n - 2 - np.floor(np.sqrt(-8 * k + 4 * n * (n - 1) - 7) / 2.0 - 0.5).astype(np.int64)
    j = k + i + 1 - n * (n - 1) // 2 + (n - i) * ((n - i) - 1) // 2
    return i, j


def random_distinct_pairs(n: int, num_pairs: int, seed: int) -> np.ndarray:
    """``min(num_pairs, n(n-1)/2)`` distinct unordered pairs (i < j) of indices into n items, shape (P, 2)."""
    if n < 2:
        raise ValueError(f"need at least 2 volumes to form pairs, got {n}")
    total = n * (n - 1) // 2
    p = min(int(num_pairs), total)
    rng = np.random.default_rng(seed)
    k = np.sort(rng.choice(total, size=p, replace=False))
    i, j = _pair_from_index(k, n)
    return np.stack([i, j], axis=1)


def pairwise_ms_ssim(
    volumes: ArrayLike,
    num_pairs: int = 100,
    seed: int = 0,
    data_range: float = 1.0,
    batch_size: int = 4,
    device: str = "cpu",
) -> dict:
    """Mean and std of 3D MS-SSIM over random distinct pairs of ``volumes`` (N, D, H, W).

    A diversity statistic: compute it for generated samples and for real volumes with the same
    ``num_pairs`` and report both. Pairs are drawn without replacement from the N(N-1)/2 unordered
    pairs of different volumes (all of them if ``num_pairs`` is larger), reproducibly from ``seed``.

    Returns a JSON-ready dict: ``mean``, ``std`` (population std over pairs), ``num_pairs``,
    ``num_volumes``, ``seed`` and ``settings`` (see :class:`MSSSIMSettings`).
    """
    vb, _ = as_volume_batch(volumes, "volumes")
    pairs = random_distinct_pairs(len(vb), num_pairs, seed)
    st = ms_ssim_settings(vb.shape[1:], data_range=data_range)
    vals = [
        _ms_ssim_batch(vb[pairs[s : s + batch_size, 0]], vb[pairs[s : s + batch_size, 1]], st, device)
        for s in range(0, len(pairs), max(1, batch_size))
    ]
    v = np.concatenate(vals)
    return {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "num_pairs": int(len(v)),
        "num_volumes": int(len(vb)),
        "seed": int(seed),
        "settings": st.to_dict(),
    }
