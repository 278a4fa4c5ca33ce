"""At the end of training: measure how the training volumes' deviations from p(x | z) go together
between face neighbours, so that drawn voxels follow it (model/voxel_noise.py).

Each training volume is passed through the model with its latents drawn from the posterior, as in
training; every voxel's cumulative probability under p(x | z) is turned into a normal score
(N(0, 1) if the voxels were drawn independently from the model), and the scores' Pearson
correlation between face neighbours inside the brain (``metrics.texture.interior``, the texture
metric's region) is taken along each axis, pooled over the volumes (a conditional model's given
each volume's covariates).  Training volumes only, like the fitted prior (train/fit_prior.py);
training itself is unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..metrics.texture import interior
from ..model import VeryDeepVAE
from ..model.voxel_noise import VoxelNoise, VoxelNoiseRecord
from .fit_prior import training_items

MAX_VOLUMES = 64
"""Training volumes measured (evenly spaced over the set).  On the 450-step demo model 48, 64 and all
95 gave 0.24 / 0.42 / 0.36, 0.27 / 0.44 / 0.39 and 0.28 / 0.43 / 0.38; 64 took 3 s of the end of
training on 2 CPU cores."""

MIN_VOLUMES = 4  # fewer: no measurement (the draws stay independent)


@torch.no_grad()
def measure(model: VeryDeepVAE, volumes: np.ndarray, batch_size: int, seed: int,
            covariates: np.ndarray | None = None) -> VoxelNoise:
    """The face-neighbour correlations (depth, height, width) of the normal scores of ``volumes``
    (N, R, R, R) in [0, 1] under ``model``'s p(x | z), z from the posterior (a conditional model's
    given each volume's encoded ``covariates`` (N, dim)), inside each volume's brain interior;
    negative correlations count as 0 (independent draws)."""
    device = model.output_head.conv.weight.device
    moments = np.zeros((3, 6))  # per axis: count, Σa, Σb, Σab, Σa², Σb²
    # the posterior draws of the training step (VeryDeepVAE.forward), from the seed's random stream
    # without disturbing the caller's
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(volumes), batch_size):
            batch = np.ascontiguousarray(volumes[start:start + batch_size][:, None], dtype=np.float32)
            x01 = torch.from_numpy(batch).to(device)
            given = None if covariates is None else torch.from_numpy(covariates[start:start + batch_size]).to(device)
            params = model(x01, covariates=given).params
            scores = model.likelihood.normal_scores(params, x01 * 2.0 - 1.0)[:, 0].double().cpu().numpy()
            for volume, score in zip(batch[:, 0], scores):
                _add_neighbour_moments(moments, score, interior(volume))
    correlations = []
    for count, sa, sb, sab, saa, sbb in moments:
        if count < 2:
            raise ValueError("no neighbouring voxels inside the brain to measure")
        cov = sab / count - (sa / count) * (sb / count)
        var_a, var_b = saa / count - (sa / count) ** 2, sbb / count - (sb / count) ** 2
        value = cov / np.sqrt(max(var_a * var_b, 1e-30))
        correlations.append(float(np.clip(value, 0.0, 1.0 - 1e-6)))
    return VoxelNoise(tuple(correlations))  # type: ignore[arg-type]


def _add_neighbour_moments(moments: np.ndarray, score: np.ndarray, inside: np.ndarray) -> None:
    """Add the sums of the face-neighbour pairs of ``score`` (R, R, R) with both voxels ``inside``,
    one row of ``moments`` per axis."""
    for axis in range(3):
        moved, mask = np.moveaxis(score, axis, 0), np.moveaxis(inside, axis, 0)
        both = mask[1:] & mask[:-1]
        a, b = moved[1:][both], moved[:-1][both]
        moments[axis] += (a.size, a.sum(), b.sum(), (a * b).sum(), (a * a).sum(), (b * b).sum())


def for_final_checkpoint(model: VeryDeepVAE, dataset: Any, batch_size: int, seed: int, autocast, console
                         ) -> VoxelNoiseRecord:
    """Measure the final model's voxel noise on the training ``dataset`` under ``autocast()`` (the
    training precision), set it on ``model`` (the EMA model, which samples) and return the
    checkpoint's record (empty when there are too few usable training volumes); the result is told
    on ``console``."""
    volumes, covariates = training_items(dataset, MAX_VOLUMES)
    if len(volumes) < MIN_VOLUMES or (model.condition is not None and covariates is None):
        return {}
    model.eval()
    try:
        with autocast():
            noise = measure(model, volumes, batch_size, seed, None if model.condition is None else covariates)
    except ValueError as error:  # e.g. empty volumes: the draws stay independent
        console.say(f"drawn voxels: independent ({error})")
        return {}
    record = noise.record(len(volumes))
    model.voxel_noise = VoxelNoise.from_record(record)  # as stored: the run's samples equal later ones
    console.say(f"drawn voxels: neighbour correlation {noise.text()} (depth / height / width), measured on "
                f"{len(volumes)} training volumes (model/voxel_noise.py)")
    return record
