"""Likelihood-side diagnostics of the latent hierarchy.

Active units (Burda, Grosse & Salakhutdinov 2016, "Importance Weighted Autoencoders", §5.2): a
latent unit u is *active* when its posterior mean changes with the input,
``A_u = Var_x( E_{q(z|x)}[z_u] ) > threshold`` (threshold 0.01 in the paper). Units whose
posterior ignores the data have collapsed to the prior and carry no information; counting them
per latent layer shows where a hierarchical VAE actually stores information.

In a top-down hierarchy the posterior mean of a deeper layer also depends on the samples drawn
above it; use posterior means from one pass per volume (e.g. the mean at every layer with the
layers above sampled or set to their means, stated in the report).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ._arrays import ArrayLike, to_numpy


ACTIVE_THRESHOLD = 0.01  # Burda et al. 2016


class RunningVariance:
    """Streaming per-unit mean and variance (Welford), so the posterior means of many volumes need
    not be held at once.  ``update`` takes a batch (B, ...) of any shape; ``variance`` is the
    population variance per unit, flattened, as numpy."""

    def __init__(self, dtype: torch.dtype = torch.float64):
        self.n, self.mean, self.m2, self.dtype = 0, None, None, dtype

    def update(self, batch: torch.Tensor) -> None:
        for row in batch.to(self.dtype).flatten(1):
            self.n += 1
            if self.mean is None:
                self.mean, self.m2 = row.clone(), torch.zeros_like(row)
                continue
            delta = row - self.mean
            self.mean += delta / self.n
            self.m2 += delta * (row - self.mean)

    def variance(self) -> np.ndarray:
        return (self.m2 / max(self.n, 1)).cpu().numpy()


def active_units_from_variances(variances: Sequence[np.ndarray], num_volumes: int, names: Sequence[str],
                                threshold: float = ACTIVE_THRESHOLD) -> dict:
    """The JSON-ready count of :func:`active_units` from each layer's per-unit variances over the
    data of the posterior means (the streaming form: :class:`RunningVariance`)."""
    per_layer = []
    for name, var in zip(names, variances):
        active, units = int(np.sum(var > threshold)), int(var.size)
        per_layer.append({"name": name, "active": active, "units": units, "fraction": active / units if units else 0.0})
    total_a = sum(p["active"] for p in per_layer)
    total_u = sum(p["units"] for p in per_layer)
    return {
        "threshold": float(threshold),
        "num_volumes": int(num_volumes),
        "per_layer": per_layer,
        "total_active": total_a,
        "total_units": total_u,
        "fraction_active": total_a / total_u if total_u else 0.0,
    }


def active_units(
    posterior_means_per_layer: Sequence[ArrayLike],
    threshold: float = ACTIVE_THRESHOLD,
    names: Sequence[str] | None = None,
) -> dict:
    """Count active latent units per layer: variance over the data of the posterior mean > ``threshold``.

    ``posterior_means_per_layer``: one array per latent layer shaped (N, ...) (N volumes; the rest
    is that layer's units, e.g. (N, C, d, h, w) with every channel-voxel a unit). N >= 2, the same
    for all layers. Variances are population variances over the N volumes, in the latent's own
    units (squared standard-normal units for a prior N(0, I)).

    Returns a JSON-ready dict with ``threshold``, ``num_volumes``, ``per_layer`` (a list of
    ``{"name", "active", "units", "fraction"}``), ``total_active``, ``total_units`` and
    ``fraction_active``.
    """
    if len(posterior_means_per_layer) == 0:
        raise ValueError("active_units needs at least one layer")
    if names is not None and len(names) != len(posterior_means_per_layer):
        raise ValueError("names must have one entry per layer")
    variances = []
    n0 = None
    for i, m in enumerate(posterior_means_per_layer):
        arr = to_numpy(m, dtype=np.float64)
        if arr.ndim < 1 or arr.shape[0] < 2:
            raise ValueError(f"layer {i}: expected (N, ...) posterior means with N >= 2, got shape {arr.shape}")
        if n0 is None:
            n0 = arr.shape[0]
        elif arr.shape[0] != n0:
            raise ValueError(f"layer {i}: {arr.shape[0]} volumes, but layer 0 has {n0}")
        variances.append(arr.reshape(arr.shape[0], -1).var(axis=0))
    names = list(names) if names is not None else [f"layer_{i}" for i in range(len(variances))]
    return active_units_from_variances(variances, int(n0), names, threshold)
