"""At the end of training: fit the Gaussian prior of the coarsest latent layers
(model/fitted_prior.py) to the training volumes' aggregate posterior, with the leading components of
the layers below it (model/leading_components.py), and keep it only if its samples are closer to the
training volumes than the learned prior's.

Both the fit and the choice use training volumes only (no validation or held-out data), so the
choice is part of training, like early stopping on the training loss would be.  The decision and
its two distances go into the checkpoint's metadata (``fitted_prior``) and the run's notices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .. import metrics
from ..console import VERBOSE
from ..model import VeryDeepVAE
from ..model.fitted_prior import FittedPrior, FittedPriorChoice, chosen_prior_text
from ..model.leading_components import LeadingComponents

CANDIDATE_LEVELS = (3, 2)
"""How many resolution levels, from the top, the fitted Gaussian covers: the first of these the model
has room for and whose Gaussian can be fitted (``MAX_DIMENSIONS``), deepest first.  Only that one is
compared with the learned prior.  Choosing between depths by the samples' distance to the training
volumes was measured to be noise: one prior of one 60-minute model read 4.7, 14.1 and 7.4 with three
streams of 128 samples, and on three such models (training seeds 1, 4, 7) held-out readings of the
1³-4³ Gaussian missed 5 + 1 + 2 of 80 target readings against 8 + 6 + 0 for the 1³-2³ one, whichever
the distance favoured (docs/training-recipe.md).  The top level alone never helped; a fourth level (1³ to 8³ at
32³) gave the most varied samples but Fréchet ratios up to 2.1 on held-out phantoms."""

MAX_DIMENSIONS = 2048
"""A candidate is fitted only if it covers at most this many active units: its Cholesky factor is
stored in the checkpoint (16 MiB at 2,048) and is estimated from at most 512 draws.  The 60-minute
demo model of training seed 4 had 10 active units at 1³-2³ and 115 at 1³-4³."""

ACTIVE_VARIANCE = 0.01
"""A unit is active when its posterior mean, as a standardised residual under the learned prior,
varies across the training volumes with at least this variance (the usual active-unit rule)."""

MAX_COMPONENT_DIMENSIONS = 1 << 21
"""The leading components cover whole levels below the Gaussian, coarsest first, up to this many
latent dimensions: the posterior means of 256 training volumes then take at most 2 GiB (float32),
twice that while the components are found.
8³ to 32³ in the demo (204,800) and the 32 preset (1,761,280); 8³ and 16³ in the 64 and 128
presets (450,560), whose 32³ level alone has 3.9 million."""

MAX_VOLUMES = 256  # training volumes encoded for the fit (evenly spaced over the training set)
MIN_VOLUMES = 16  # fewer training volumes: no fit (neither the Gaussian nor the comparison would mean much)
DRAWS_PER_VOLUME = 2  # posterior draws per volume: the fit is to the aggregate posterior, noise included
COMPARE_SAMPLES = 128
"""Samples from each prior compared with the training volumes.  32 were too few to choose among three:
the same prior of one model measured 24.3 and 44.9 with two sample streams."""


def coarse_layers(model: VeryDeepVAE, levels: int) -> list[int]:
    """Indices of the decoder layers at the ``levels`` coarsest resolution levels."""
    top = model.decoder.num_levels - 1
    return [i for i, level in enumerate(model.decoder.layer_levels) if level > top - levels]


def candidate_levels(model: VeryDeepVAE) -> list[int]:
    """The ``CANDIDATE_LEVELS`` this model has room for, deepest first: never every level (the finest
    stay learned)."""
    return [n for n in CANDIDATE_LEVELS if n < model.decoder.num_levels]


def fit(model: VeryDeepVAE, volumes: np.ndarray, batch_size: int, seed: int, levels: int) -> FittedPrior:
    """The moment-matched Gaussian of the active units of the ``levels`` coarsest levels, fitted to
    the posterior residuals of ``volumes`` (N, R, R, R) in [0, 1] (:func:`gaussian`)."""
    layers = coarse_layers(model, levels)
    return gaussian(model, posterior_residuals(model, volumes, batch_size, seed, layers), layers)


def component_layers(model: VeryDeepVAE, levels: int) -> list[int]:
    """Indices of the decoder layers the leading components cover below a Gaussian of the ``levels``
    coarsest levels: whole levels, coarsest first, within ``MAX_COMPONENT_DIMENSIONS``.  The finest
    level is included when it fits: a short run may keep brain size there rather than at 16³ (demo
    training seed 1; docs/training-recipe.md)."""
    top = model.decoder.num_levels - 1
    sizes = model.latent_sizes()
    chosen: list[int] = []
    for level in range(top - levels, -1, -1):
        layers = [i for i, lv in enumerate(model.decoder.layer_levels) if lv == level]
        if sum(sizes[i] for i in chosen + layers) > MAX_COMPONENT_DIMENSIONS:
            break
        chosen += layers
    return chosen


def leading_components(model: VeryDeepVAE, residuals: "Residuals", layers: list[int], count: int
                       ) -> LeadingComponents:
    """The ``count`` leading principal components of the posterior-mean residuals of ``layers``
    across the training volumes (fewer when there are not enough volumes).  Found from the volumes'
    N x N Gram matrix, not an SVD of the N x D data: D runs to millions, N to 256."""
    device = model.output_head.conv.weight.device
    x = torch.cat([torch.from_numpy(residuals.means[i]) for i in layers], 1)  # (N, D) float32
    if not bool(torch.isfinite(x).all()):
        raise ValueError("non-finite posterior latents")
    mean = x.double().mean(0)
    x.sub_(mean.float())  # in place: x is already a copy, and the largest array here
    gram = torch.zeros(len(x), len(x), dtype=torch.float64)
    for block in x.split(1 << 16, dim=1):
        gram += block.double() @ block.double().T
    values, vectors = torch.linalg.eigh(gram)  # ascending
    k = max(0, min(count, len(x) - 1, int((values > 1e-9 * values[-1].clamp_min(1e-30)).sum())))
    values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
    singular = values.sqrt()
    # (D, k), orthonormal columns: each is the volumes' residuals weighted by an eigenvector
    basis = torch.cat([(block.T.double() @ vectors / singular).float() for block in x.split(1 << 16, dim=1)])
    scales = (singular / max(len(x) - 1, 1) ** 0.5).float()
    shapes = model.latent_shapes()
    return LeadingComponents(list(layers), [shapes[i] for i in layers], mean.float().to(device), basis.to(device),
                             scales.to(device))


@dataclass
class Residuals:
    """Standardised posterior residuals, (z - prior mean) / prior std, of some layers: ``draws``
    {layer: (N * DRAWS_PER_VOLUME, layer size) float64}; ``activity`` {layer: (layer size,)}, the
    variance across volumes of each unit's posterior-mean residual; ``means`` {layer: (N, layer
    size) float32}, the posterior-mean residuals of the layers asked for them."""

    draws: dict[int, np.ndarray]
    activity: dict[int, np.ndarray]
    means: dict[int, np.ndarray]

    def active(self, layer: int) -> np.ndarray:
        """Flat indices of the layer's active units (``ACTIVE_VARIANCE``)."""
        return np.flatnonzero(self.activity[layer] > ACTIVE_VARIANCE)


@torch.no_grad()
def posterior_residuals(model: VeryDeepVAE, volumes: np.ndarray, batch_size: int, seed: int, layers: list[int],
                        mean_layers: Sequence[int] = ()) -> Residuals:
    """``DRAWS_PER_VOLUME`` posterior draws per volume of each of ``layers`` and the posterior
    means, as residuals under the learned prior, and the posterior means alone of ``mean_layers``.
    Encoded once for every candidate Gaussian; each top-down pass stops below the finest layer it
    is needed for (``VeryDeepVAE.encode_passes``)."""
    device = model.output_head.conv.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    rows: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    means: dict[int, list[torch.Tensor]] = {i: [] for i in [*layers, *mean_layers]}
    for start in range(0, len(volumes), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(volumes[start:start + batch_size][:, None])).float().to(device)
        # the draws stop below ``layers``, so the Gaussian's draws do not depend on ``mean_layers``
        stops = [max(means) + 1] + [max(layers) + 1] * DRAWS_PER_VOLUME
        mean, *drawn = model.encode_passes(x, [False] + [True] * DRAWS_PER_VOLUME, num_layers=stops,
                                           as_noise=True, generator=generator)
        for i in means:
            means[i].append(mean[i].float().flatten(1).cpu())
        for i in layers:
            rows[i].extend(es[i].float().flatten(1).double().cpu() for es in drawn)
    activity = {i: torch.cat(means[i]).double().var(0, unbiased=False).numpy() for i in layers}
    return Residuals({i: torch.cat(r).numpy() for i, r in rows.items()}, activity,
                     {i: torch.cat(means[i]).numpy() for i in mean_layers})


def gaussian(model: VeryDeepVAE, residuals: Residuals, layers: list[int]) -> FittedPrior:
    """The Gaussian of the active units' residual draws (:func:`posterior_residuals`) over
    ``layers``; Ledoit-Wolf shrinkage keeps the covariance well conditioned when N is small.
    (Shrinking towards each latent's own variance instead of a common one gave the same samples:
    docs/training-recipe.md.)"""
    device = model.output_head.conv.weight.device
    every_shape = model.latent_shapes()
    units = [residuals.active(i) for i in layers]
    count = sum(len(u) for u in units)
    if not count:
        raise ValueError("no active latent unit to fit")
    if count > MAX_DIMENSIONS:
        raise ValueError(f"more than {MAX_DIMENSIONS} active units")
    z = np.concatenate([residuals.draws[i][:, u] for i, u in zip(layers, units)], 1)
    if not np.isfinite(z).all():
        raise ValueError("non-finite posterior latents")
    cov, _ = metrics.ledoit_wolf_covariance(z)
    cov += np.eye(len(cov)) * (1e-6 * np.trace(cov) / len(cov) + 1e-12)  # strictly positive definite
    tril = np.linalg.cholesky(cov)
    return FittedPrior(layers, [every_shape[i] for i in layers], torch.from_numpy(z.mean(0)).float().to(device),
                       torch.from_numpy(tril).float().to(device),
                       [torch.from_numpy(u).long().to(device) for u in units], noise=True)


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


def fit_and_choose(model: VeryDeepVAE, volumes: np.ndarray, batch_size: int, seed: int, components: int = 0
                   ) -> tuple[dict[str, torch.Tensor], FittedPriorChoice]:
    """Fit the Gaussian of the deepest candidate levels that can be fitted, with ``components``
    leading components of the levels below it (0: none), compare its samples and the learned
    prior's with the training volumes, and decide; returns the checkpoint tensors (empty when the
    learned prior wins) and the metadata entry.  Leaves ``model.fitted_prior`` as decided."""
    depths = candidate_levels(model)
    deepest = coarse_layers(model, max(depths)) if depths else []
    # every layer some depth's components would cover, beyond the deepest Gaussian's own
    below = sorted({i for levels in depths for i in component_layers(model, levels)} - set(deepest)) \
        if components else []
    residuals = posterior_residuals(model, volumes, batch_size, seed, deepest, below) if depths else None
    fitted, problem = None, "no level to fit"
    for levels in depths:
        try:
            fitted = gaussian(model, residuals, coarse_layers(model, levels))
            layers = component_layers(model, levels) if components else []
            found = leading_components(model, residuals, layers, components) if layers else None
            if found is not None and found.count:  # no direction varies: the learned prior draws those layers
                fitted.components = found
            break
        except (ValueError, np.linalg.LinAlgError) as error:
            problem = str(error)
    if fitted is None:  # nothing usable to fit: the learned prior stays
        model.fitted_prior = None
        return {}, {"used": False, "num_volumes": int(len(volumes)), "not_fitted": problem,
                    "frechet_to_training": {}}
    device = model.output_head.conv.weight.device
    features = metrics.RandomConvFeatures(seed=0, input_size=max(16, min(64, model.resolution)), device=device)
    reference = features(volumes)
    distances = {"learned": frechet_to(model, "learned", reference, features, batch_size, seed)}
    model.fitted_prior = fitted
    name = candidate_name(fitted)
    distances[name] = frechet_to(model, "fitted", reference, features, batch_size, seed)
    used = distances[name] < distances["learned"]
    model.fitted_prior = fitted if used else None
    meta = {**fitted.describe(), "used": bool(used), "num_volumes": int(len(volumes)),
            "draws_per_volume": DRAWS_PER_VOLUME, "frechet_to_training": distances,
            "rule": "the Gaussian fitted to the deepest top levels it can cover (with the leading components of "
                    "the levels below), if its samples' random-CNN Fréchet distance to the training volumes is "
                    "smaller than the learned prior's"}
    return (fitted.tensors() if used else {}), meta


def for_final_checkpoint(model: VeryDeepVAE, dataset: Any, batch_size: int, seed: int, autocast, console,
                         components: int = 0) -> tuple[dict[str, torch.Tensor], FittedPriorChoice]:
    """The final checkpoint's coarse-level prior, fitted for ``model`` (the EMA model, which samples)
    to the training ``dataset`` under ``autocast()`` (the training precision); the decision is told
    on ``console`` (train/progress.py).  Nothing when there are too few usable training volumes."""
    volumes = training_volumes(dataset)
    if len(volumes) < MIN_VOLUMES:
        console.say(f"coarse-level prior: the learned one (fewer than {MIN_VOLUMES} usable training volumes to "
                    "fit another)", VERBOSE)
        return {}, {}
    model.eval()
    with autocast():
        tensors, meta = fit_and_choose(model, volumes, batch_size, seed, components)
    console.say(notice(meta))
    return tensors, meta


def candidate_name(prior: FittedPrior) -> str:
    """"fitted 1³, 2³, 4³": the levels a fitted Gaussian covers, as the checkpoint's distances name it."""
    return f"fitted {prior.levels_text()}"


def training_volumes(dataset: Any, limit: int = MAX_VOLUMES) -> np.ndarray:
    """Up to ``limit`` training volumes (N, R, R, R), evenly spaced over the set: unaugmented where
    the dataset can give them (``VolumeDataset.volume``), else its items as they come."""
    return training_items(dataset, limit)[0]


def training_items(dataset: Any, limit: int = MAX_VOLUMES) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`training_volumes` and, for a conditional run's dataset (``VolumeDataset.covariates``),
    the encoded covariates of the same volumes (N, dim) float32; else None."""
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(limit, len(dataset))).astype(int))
    table = getattr(dataset, "covariates", None)
    volumes, kept = [], []
    for i in picks:
        item = dataset.volume(int(i)) if hasattr(dataset, "volume") else dataset[int(i)]
        if isinstance(item, (tuple, list)):  # (volume, covariates)
            item = item[0]
        item = np.asarray(item, dtype=np.float32)
        if np.isfinite(item).all():  # a damaged item would poison the fit and the comparison
            volumes.append(item.reshape(item.shape[-3:]))
            kept.append(int(i))
    covariates = None if table is None else np.asarray(table, dtype=np.float32)[kept].reshape(len(kept), -1)
    return (np.stack(volumes) if volumes else np.zeros((0, 0, 0, 0), np.float32)), covariates


def notice(meta: FittedPriorChoice) -> str:
    if "not_fitted" in meta:
        return f"coarse-level prior: the learned one (no Gaussian could be fitted: {meta['not_fitted']})"
    d = meta["frechet_to_training"]
    which = chosen_prior_text(meta)
    shown = ", ".join(f"{name} {value:.1f}" for name, value in d.items())
    return (f"coarse-level prior: sampling uses {which} (random-CNN Fréchet distance of samples to the "
            f"training volumes: {shown})")
