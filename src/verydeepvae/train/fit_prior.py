"""At the end of training: fit the Gaussian prior of the coarsest latent layers
(model/fitted_prior.py) to the training volumes' aggregate posterior, and keep it only if its
samples are closer to the training volumes than the learned prior's.

Both the fit and the choice use training volumes only (no validation or held-out data), so the
choice is part of training, like early stopping on the training loss would be.  The decision and
its two distances go into the checkpoint's metadata (``fitted_prior``) and the run's notices.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import metrics
from ..model import VeryDeepVAE
from ..model.fitted_prior import FittedPrior, FittedPriorChoice

COARSE_LEVELS = 2
"""Resolution levels fitted, from the top (1³ and 2³).  On the demo model the top level alone did
not help (random-CNN Fréchet ratio 3.0-3.5 either way) while the top two did (1.7-1.8); with the
4³ level too (1,120 dimensions from 95 volumes) the Gaussian was too poorly estimated (2.2-2.7)."""

MAX_VOLUMES = 256  # training volumes encoded for the fit (evenly spaced over the training set)
MIN_VOLUMES = 16  # fewer training volumes: no fit (neither the Gaussian nor the comparison would mean much)
DRAWS_PER_VOLUME = 2  # posterior draws per volume: the fit is to the aggregate posterior, noise included
COMPARE_SAMPLES = 32  # samples from each prior compared with the training volumes


def coarse_layers(model: VeryDeepVAE) -> list[int]:
    """Indices of the decoder layers at the ``COARSE_LEVELS`` coarsest resolution levels."""
    top = model.decoder.num_levels - 1
    return [i for i, level in enumerate(model.decoder.layer_levels) if level > top - COARSE_LEVELS]


@torch.no_grad()
def fit(model: VeryDeepVAE, volumes: np.ndarray, batch_size: int, seed: int) -> FittedPrior:
    """The moment-matched Gaussian of the coarse layers' posterior draws for ``volumes`` (N, R, R, R)
    in [0, 1]; Ledoit-Wolf shrinkage keeps the covariance well conditioned when N is small."""
    device = model.output_head.conv.weight.device
    layers = coarse_layers(model)
    every_shape = model.latent_shapes()
    shapes = [every_shape[i] for i in layers]
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for start in range(0, len(volumes), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(volumes[start:start + batch_size][:, None])).float().to(device)
        for _ in range(DRAWS_PER_VOLUME):
            zs = model.encode(x, generator=generator, draw=True)
            rows.append(torch.cat([zs[i].float().flatten(1) for i in layers], 1).double().cpu())
    z = torch.cat(rows).numpy()
    if not np.isfinite(z).all():
        raise ValueError("non-finite posterior latents")
    cov, _ = metrics.ledoit_wolf_covariance(z)
    cov += np.eye(len(cov)) * (1e-6 * np.trace(cov) / len(cov) + 1e-12)  # strictly positive definite
    tril = np.linalg.cholesky(cov)
    return FittedPrior(layers, shapes, torch.from_numpy(z.mean(0)).float().to(device),
                       torch.from_numpy(tril).float().to(device))


@torch.no_grad()
def frechet_to(model: VeryDeepVAE, prior: str, reference_feats: np.ndarray, features, batch_size: int,
               seed: int) -> float:
    """Fréchet distance (z-scored random-CNN features) between ``COMPARE_SAMPLES`` samples drawn
    with ``prior`` and the reference volumes' features."""
    device = model.output_head.conv.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = np.concatenate([
        model.sample(min(batch_size, COMPARE_SAMPLES - start), 1.0, generator=generator, prior=prior)
        .float().cpu()[:, 0].numpy() for start in range(0, COMPARE_SAMPLES, batch_size)])
    if not np.isfinite(samples).all():
        return float("inf")  # a prior that makes non-finite volumes loses the comparison
    sample_feats = features(samples)
    z = metrics.pooled_standardiser(reference_feats, sample_feats)
    return float(metrics.frechet_distance(z(sample_feats), z(reference_feats)))


def fit_and_choose(model: VeryDeepVAE, volumes: np.ndarray, batch_size: int, seed: int
                   ) -> tuple[dict[str, torch.Tensor], FittedPriorChoice]:
    """Fit, compare and decide; returns the checkpoint tensors (empty when the learned prior wins)
    and the metadata entry.  Leaves ``model.fitted_prior`` as decided."""
    try:
        fitted = fit(model, volumes, batch_size, seed)
    except (ValueError, np.linalg.LinAlgError) as error:  # nothing usable to fit: the learned prior stays
        model.fitted_prior = None
        return {}, {"used": False, "num_volumes": int(len(volumes)), "not_fitted": str(error),
                    "frechet_to_training": {}}
    device = model.output_head.conv.weight.device
    features = metrics.RandomConvFeatures(seed=0, input_size=max(16, min(64, model.resolution)), device=device)
    reference = features(volumes)
    model.fitted_prior = fitted
    distances = {prior: frechet_to(model, prior, reference, features, batch_size, seed)
                 for prior in ("learned", "fitted")}
    used = distances["fitted"] < distances["learned"]
    model.fitted_prior = fitted if used else None
    meta = {**fitted.describe(), "used": bool(used), "num_volumes": int(len(volumes)),
            "draws_per_volume": DRAWS_PER_VOLUME, "frechet_to_training": distances,
            "rule": "kept when its samples' random-CNN Fréchet distance to the training volumes is the smaller"}
    return (fitted.tensors() if used else {}), meta


def training_volumes(dataset: Any, limit: int = MAX_VOLUMES) -> np.ndarray:
    """Up to ``limit`` training volumes (N, R, R, R), evenly spaced over the set: unaugmented where
    the dataset can give them (``VolumeDataset.volume``), else its items as they come."""
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(limit, len(dataset))).astype(int))
    volumes = []
    for i in picks:
        item = dataset.volume(int(i)) if hasattr(dataset, "volume") else dataset[int(i)]
        if isinstance(item, (tuple, list)):  # (volume, covariates)
            item = item[0]
        item = np.asarray(item, dtype=np.float32)
        if np.isfinite(item).all():  # a damaged item would poison the fit and the comparison
            volumes.append(item.reshape(item.shape[-3:]))
    return np.stack(volumes) if volumes else np.zeros((0, 0, 0, 0), np.float32)


def notice(meta: FittedPriorChoice) -> str:
    if "not_fitted" in meta:
        return f"coarse-level prior: the learned one (no Gaussian could be fitted: {meta['not_fitted']})"
    d = meta["frechet_to_training"]
    which = "the fitted Gaussian" if meta["used"] else "the learned prior"
    return (f"coarse-level prior: sampling uses {which} (random-CNN Fréchet distance of samples to the "
            f"training volumes: learned {d['learned']:.1f}, fitted {d['fitted']:.1f})")
