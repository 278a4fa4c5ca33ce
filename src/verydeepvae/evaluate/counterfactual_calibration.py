"""The guidance scale for counterfactuals, calibrated apart from the samples' (``calibration.py``).

Why apart: guidance moves the decoder's conditioning w times as far from a scan's own covariates
(model/vae.py ``_film``).  For samples, w at which their population trend matches the training
scans' is right.  A counterfactual keeps one brain's latents, and near the ends of the training
range the pushed conditioning leaves what the decoder learnt: on the 7,000-step lesion model
(docs/conditional.md), ageing 16 held-out phantoms from 50 to 90 at the samples' age scale 1.62 made
9 of them shrink their ventricles again at 90, where scale 1.2 kept 15 of 16 growing step by step.

Per numeric covariate, on ``scans`` of the calibration's training scans, with their own covariates:

1. each scan swept over ``points`` values from the training minimum to the maximum (the whole range
   a user may ask for), noise mode (counterfactual.py), at scales from 1 up in steps of a factor
   ``STEP`` (finer than the samples' grid: on that model 1.2 kept 15 of 16 scans monotonic, 1.4 13
   and 1.62 7) and at the samples' calibrated scale itself;
2. at each scale: the fraction of scans whose measure (the samples' calibration's) moves strictly
   monotonically in the training scans' direction, and the mean per-scan slope over the training
   scans' slope (the *change ratio*: 1 = a brain changes as fast as the population does);
3. a scale is *kept* while no more than one scan fewer than at the best scale so far is monotonic;
   the search ends at the first that is not, or that reaches change ratio 1;
4. the choice: where the change ratio reaches 1 among the kept scales (interpolated), else the last
   kept scale.  So the counterfactual scale never exceeds the samples' and never costs a brain its
   monotonic change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..data.covariates import CovariateSchema, Value
from ..guidance import Guidance
from ..inference import TrainedModel
from .conditional import counterfactual_sweeper, measure

TOLERATED_LOSS = 1  # scans that may lose their monotonic change against the best scale so far
STEP = 1.2  # factor between the scales tried


@dataclass
class CounterfactualReading:
    """Counterfactual sweeps of the calibration scans at one guidance scale."""

    scale: float
    change_ratio: float | None  # mean per-scan slope / the training scans' slope
    monotonic: int  # scans whose measure moves strictly in the training scans' direction
    kept: bool


@dataclass
class CounterfactualCalibration:
    """One covariate's counterfactual scale (module notes)."""

    scale: float
    reached: bool = False
    scans: int = 0
    values: list[float] = field(default_factory=list)
    readings: list[CounterfactualReading] = field(default_factory=list)


def first_reaching_one(points: Sequence[tuple[float, float]]) -> float | None:
    """The scale where a ratio first reaches 1 along (scale, ratio) points in ascending scale order,
    interpolated linearly from the point before (the first point itself when it already does); None
    if it never does.  Shared with the samples' choice (calibration.choose_scale)."""
    if points and points[0][1] >= 1.0:
        return points[0][0]
    for (s0, q0), (s1, q1) in zip(points, points[1:]):
        if q1 >= 1.0:
            return s0 + (1.0 - q0) / (q1 - q0) * (s1 - s0)
    return None


def choose_counterfactual_scale(readings: Sequence[CounterfactualReading]) -> tuple[float, bool]:
    """(scale, reached) from readings in ascending scale order (module notes, step 4)."""
    kept = [(r.scale, r.change_ratio) for r in readings if r.kept and r.change_ratio is not None
            and math.isfinite(r.change_ratio)]
    if not kept:
        return (readings[0].scale if readings else 1.0), False
    reached = first_reaching_one(kept)
    return (kept[-1][0], False) if reached is None else (reached, True)


def counterfactual_scales(sample_scale: float, step: float = STEP) -> list[float]:
    """The scales tried: 1, ``step``, ``step``², ... below the samples' scale (within 2 %), then that scale."""
    out, scale = [], 1.0
    while scale < sample_scale / 1.02:
        out.append(round(scale, 3))
        scale *= step
    return out + [float(sample_scale)]


def calibrate_counterfactuals(trained: TrainedModel, schema: CovariateSchema, name: str, volumes: np.ndarray,
                              rows: Sequence[dict[str, Value]], key: str, real_slope: float, sample_scale: float,
                              points: int = 9, batch_size: int = 8,
                              progress=None) -> CounterfactualCalibration:
    """One covariate's counterfactual scale (module notes) from preprocessed training ``volumes``
    (N, R, R, R) with their own covariates ``rows``; ``key``/``real_slope``: the measure and slope
    the samples' calibration read (measure units per covariate unit)."""
    covariate = schema.get(name)
    values = [float(v) for v in np.linspace(covariate.minimum, covariate.maximum, points)]
    result = CounterfactualCalibration(float(sample_scale), scans=len(volumes), values=values)
    direction = math.copysign(1.0, real_slope)
    best = 0
    sweeps = [counterfactual_sweeper(trained, schema, volume, own, name, values, batch_size)
              for volume, own in zip(volumes, rows)]  # each scan encoded once, decoded at every scale
    for scale in counterfactual_scales(sample_scale):
        slopes, monotonic = [], 0
        for sweep in sweeps:
            outs = sweep(Guidance(1.0, {name: scale}))
            measured = np.asarray(measure(outs, trained.voxel_size_mm)[key], float)
            monotonic += bool(np.all(direction * np.diff(measured) > 0))
            slopes.append(float(np.polyfit(values, measured, 1)[0]))
        best = max(best, monotonic)
        ratio = float(np.mean(slopes)) / real_slope if slopes else None
        result.readings.append(CounterfactualReading(scale, ratio, monotonic, monotonic >= best - TOLERATED_LOSS))
        if progress is not None:
            progress(result.readings[-1], len(volumes))
        if not result.readings[-1].kept or (ratio is not None and ratio >= 1.0):
            break
    result.scale, result.reached = choose_counterfactual_scale(result.readings)
    return result


def describe_counterfactual(c: dict[str, Any]) -> str:
    """One line about a covariate's counterfactual calibration (its JSON form)."""
    n = c["scans"]
    readings = ", ".join(f"{r['scale']:.3g}: {r['monotonic']}/{n} monotonic, change ratio "
                         + ("n/a" if r["change_ratio"] is None else f"{r['change_ratio']:.2f}")
                         + ("" if r["kept"] else " (monotonic change lost)") for r in c["readings"])
    return (f"counterfactual scale {c['scale']:.3g}{'' if c['reached'] else ' (change ratio 1 not reached)'}; "
            f"{n} training scans swept over the training range: {readings}")
