"""Memorisation check: are generated volumes closer to training volumes than real unseen ones are?

Method. For each generated sample, find the L2 distance to its nearest training volume; do the
same for each *held-out* real volume (never trained on). Held-out volumes show how close a new,
genuinely different brain typically is to the training set. A model that copies training data
produces samples much closer than that: a small median ratio and many samples below the
held-out 5th percentile. Distances can be taken on raw voxels (sensitive to exact copies) or on
standardised features (sensitive to near-copies that differ in noise); report which.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from ._arrays import ArrayLike, to_numpy


def _rows(x: ArrayLike, name: str) -> np.ndarray:
    arr = to_numpy(x, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None]
    arr = arr.reshape(arr.shape[0], -1)
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: no rows")
    return arr


def nearest_neighbour_distances(
    queries: ArrayLike,
    reference: ArrayLike,
    batch_size: int = 64,
    exclude_self: bool = False,
    max_block_bytes: int = 2**27,
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query to its nearest reference item, and that item's index.

    ``queries`` (N, ...) and ``reference`` (M, ...) are volumes (N, D, H, W) or feature vectors
    (N, F); each item is flattened. Units: intensity units for volumes (the L2 norm over voxels;
    divide by sqrt(voxels) for an RMS difference), feature units for features. Work is done in
    float64 blocks of at most ``batch_size`` queries x ``batch_size`` reference items, shrunk so
    one block holds at most ``max_block_bytes`` (128 MiB: 8 volumes of 128^3), so extra memory is
    about ``2 * max_block_bytes`` regardless of N and M. With ``exclude_self``
    (queries and reference are the same set) each item's match to itself is ignored.
    Returns ``(distances, indices)``, shapes (N,) float64 and (N,) int64.
    """
    q = _rows(queries, "queries")
    r = _rows(reference, "reference")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries and reference differ in size per item: {q.shape[1]} vs {r.shape[1]}")
    if exclude_self and len(q) != len(r):
        raise ValueError("exclude_self needs queries and reference to be the same set")
    bs = max(1, min(int(batch_size), int(max_block_bytes) // (8 * q.shape[1])))
    best = np.full(len(q), np.inf)
    idx = np.zeros(len(q), dtype=np.int64)
    r_sq = [None] * ((len(r) + bs - 1) // bs)
    for qs in range(0, len(q), bs):
        qb = torch.from_numpy(q[qs : qs + bs]).double()
        q_sq = (qb * qb).sum(dim=1, keepdim=True)
        for bi, rs in enumerate(range(0, len(r), bs)):
            rb = torch.from_numpy(r[rs : rs + bs]).double()
            if r_sq[bi] is None:
                r_sq[bi] = (rb * rb).sum(dim=1)
            d2 = (q_sq + r_sq[bi][None] - 2.0 * qb @ rb.T).clamp_min(0.0)
            if exclude_self:
                for k in range(len(qb)):
                    j = qs + k - rs
                    if 0 <= j < len(rb):
                        d2[k, j] = float("inf")
            m, a = d2.min(dim=1)
            m, a = m.numpy(), a.numpy() + rs
            better = m < best[qs : qs + bs]
            best[qs : qs + bs][better] = m[better]
            idx[qs : qs + bs][better] = a[better]
    return np.sqrt(best), idx


def memorisation_summary(
    sample_to_train: ArrayLike, heldout_to_train: ArrayLike, percentile: float = 5.0
) -> dict:
    """Compare samples' nearest-training-volume distances with held-out real volumes' ones.

    Inputs are the distance arrays from :func:`nearest_neighbour_distances` (samples -> train and
    held-out -> train, same space and units). Returns a JSON-ready dict:

    * ``median_sample``, ``median_heldout`` and ``median_ratio`` = median_sample / median_heldout:
      about 1 when samples are as novel as unseen real brains; well below 1 suggests copying
      (above 1 means samples are farther from the training data than real brains are, e.g. blurry
      or unrealistic).
    * ``heldout_p{percentile}``: the ``percentile``-th percentile of held-out distances, and
      ``fraction_below_p{percentile}``: the fraction of samples closer than it (about
      ``percentile``/100 without memorisation; values near 1 mean most samples are near-copies).
    * ``min_sample``, ``min_heldout``; ``mannwhitney_p``: one-sided Mann-Whitney U p-value for
      "sample distances are stochastically smaller than held-out distances" (small p = evidence
      of memorisation; needs several values in each set to be meaningful).
    """
    s = np.asarray(to_numpy(sample_to_train), dtype=np.float64).ravel()
    h = np.asarray(to_numpy(heldout_to_train), dtype=np.float64).ravel()
    if s.size == 0 or h.size == 0:
        raise ValueError("memorisation_summary needs at least one sample and one held-out distance")
    med_s, med_h = float(np.median(s)), float(np.median(h))
    thr = float(np.percentile(h, percentile))
    tag = f"{percentile:g}"
    try:
        p = float(stats.mannwhitneyu(s, h, alternative="less").pvalue)
    except ValueError:  # e.g. all values identical
        p = float("nan")
    return {
        "num_samples": int(s.size),
        "num_heldout": int(h.size),
        "median_sample": med_s,
        "median_heldout": med_h,
        "median_ratio": med_s / med_h if med_h > 0 else float("inf"),
        f"heldout_p{tag}": thr,
        f"fraction_below_p{tag}": float(np.mean(s < thr)),
        "min_sample": float(s.min()),
        "min_heldout": float(h.min()),
        "mannwhitney_p": p,
    }
