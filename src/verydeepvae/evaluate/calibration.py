"""Guidance calibration: for each covariate of a conditional model, the guidance scale at which its
samples respond to a requested value as strongly as the training scans respond to their own.

Why: how strongly a model learns a covariate's effect depends on the training seed and budget.  Two
training seeds of one command needed lesion-load guidance 3 and 5, and each failed at the other's
(docs/conditional.md), so no fixed scale can be documented for a recipe; a measured one can.

Per numeric covariate:

1. **Real response.** The training scans' tissue measurements (``evaluate/morphometry.py`` volumes
   and the CSF fraction) against their own values: the measure that tracks the covariate most
   closely (largest |Spearman|) and its least-squares slope, the *real slope*.
2. **Sample response.** ``per_point`` samples at each of ``points`` values between the training
   values' 5th and 95th percentiles (the other covariates drawn given it), at every scale of
   ``scales``, with the same seeds at every scale (common random numbers: the scales' slopes differ
   by the scale, not by the draws).  Their slope of the same measure against the requested value,
   over the real slope, is the *slope ratio* at that scale.  The draws come in ``streams``
   independent streams (seeds ``seed``, ``seed + 1``, ...): the slope is fitted on all of them
   pooled, and each stream's own ratio is kept to show how far one stream would have moved it (one
   stream of 72 samples moved a 7,000-step model's lesion-load scale from 3.9 to 5.1 between two
   seeds; docs/conditional.md).
3. **Realism.** The random-CNN Fréchet distance of each scale's samples to the training scans,
   against that of the scale-1 samples; scales beyond the first whose distance exceeds
   ``REALISM_TOLERANCE`` times it end the search (strong guidance can meet a slope with volumes that
   are no longer brains; docs/conditional.md measured 0.95-1.2x for guidance that kept brains,
   3.4-8x for guidance that did not).
4. **Choice.** Where the slope ratio first reaches 1, interpolated linearly between the scales either
   side; ``1 / ratio`` when scale 1 already overshoots (the effect grows about linearly from scale 0,
   where it vanishes).  The realistic range ends where the Fréchet ratio crosses the tolerance,
   interpolated linearly between the last realistic and the first unrealistic scale (so is the slope
   ratio there).  When nothing in that range reaches 1, the realistic scale whose ratio is closest
   to 1 (in log terms) is kept and the covariate is marked *not reached*.

Counterfactuals get a scale of their own, never above the samples' (``counterfactual_calibration.py``
says why and how).  Categorical covariates keep scale 1 (there is no slope to match).  Nothing here
is asserted in tests beyond its arithmetic: the figures move with the model and the seed.
"""

from __future__ import annotations

import datetime
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import metrics
from ..atomic import write_json
from ..data.covariates import CovariateSchema, Value
from ..errors import UserError
from ..guidance import CALIBRATION_FIGURE, CALIBRATION_FILE, REALISM_TOLERANCE, SCALES, Guidance
from ..inference import TrainedModel
from ..scan_files import input_files, load_preprocessed
from .conditional import MEASURES, measure, sample_at, sweep_points, trend
from .counterfactual_calibration import (CounterfactualCalibration, calibrate_counterfactuals, describe_counterfactual,
                                         first_reaching_one)


@dataclass
class ScaleReading:
    """The samples' response at one guidance scale."""

    scale: float
    slope: float | None  # measure units per covariate unit
    spearman: float | None
    slope_ratio: float | None  # slope / real slope
    frechet_ratio: float  # Fréchet distance to the training scans / that of the scale-1 samples
    realistic: bool
    stream_ratios: list[float | None] = field(default_factory=list)  # each stream's own slope ratio


@dataclass
class CovariateCalibration:
    """One covariate's calibration (module notes); ``scale`` is what ``--guidance calibrated`` uses."""

    name: str
    kind: str
    scale: float = 1.0
    reached: bool = False
    measure: str | None = None
    real_slope: float | None = None
    real_spearman: float | None = None
    readings: list[ScaleReading] = field(default_factory=list)
    stream_ratios_at_scale: list[float] = field(default_factory=list)  # each stream's ratio at ``scale``
    note: str = ""
    counterfactual: CounterfactualCalibration | None = None  # what ``counterfactual`` uses


def choose_scale(readings: Sequence[ScaleReading], tolerance: float = REALISM_TOLERANCE) -> tuple[float, bool]:
    """(scale, reached) from the readings in ascending scale order (module notes, step 4)."""
    points = _realistic_points(readings, tolerance)
    if not points:
        return 1.0, False
    scale, ratio = points[0]
    if scale == 1.0 and ratio >= 1.0:
        return scale / ratio, True
    reached = first_reaching_one(points)
    if reached is not None:
        return reached, True
    positive = [(s, q) for s, q in points if q > 0]
    if not positive:
        return 1.0, False
    return min(positive, key=lambda p: abs(math.log(p[1])))[0], False


def _realistic_points(readings: Sequence[ScaleReading], tolerance: float) -> list[tuple[float, float]]:
    """(scale, slope ratio) of the realistic readings, and where the realism limit falls between the
    last realistic and the first unrealistic one (both quantities interpolated linearly)."""
    points: list[tuple[float, float]] = []
    last: ScaleReading | None = None
    for r in readings:
        if r.slope_ratio is None or not math.isfinite(r.slope_ratio):
            continue
        if r.realistic:
            points.append((r.scale, r.slope_ratio))
            last = r
            continue
        if last is not None and math.isfinite(r.frechet_ratio) and r.frechet_ratio > last.frechet_ratio:
            t = (tolerance - last.frechet_ratio) / (r.frechet_ratio - last.frechet_ratio)
            points.append((last.scale + t * (r.scale - last.scale),
                           last.slope_ratio + t * (r.slope_ratio - last.slope_ratio)))
        break
    return points


def real_response(volumes_table: dict[str, np.ndarray], own: Sequence[float],
                  measures: Sequence[str] = MEASURES) -> tuple[str | None, dict]:
    """The measure of ``measures`` that tracks a covariate in the training scans (largest |Spearman|)
    and its trend."""
    best: tuple[float, str, dict] | None = None
    for key in measures:
        t = trend(own, volumes_table[key])
        if t["spearman"] is None or t["slope"] is None:
            continue
        if best is None or abs(t["spearman"]) > best[0]:
            best = (abs(t["spearman"]), key, t)
    return (best[1], best[2]) if best else (None, {})


class RealFeatures:
    """The random-CNN feature extractor and the training scans' features, computed once for every
    covariate of a calibration."""

    def __init__(self, real: np.ndarray, device: Any) -> None:
        self.extract = metrics.RandomConvFeatures(seed=0, input_size=max(16, min(64, real.shape[-1])), device=device)
        self.real = self.extract(real)


class _Realism:
    """Fréchet distances of sample sets to the training scans in random-CNN features, relative to
    the first set's (the scale-1 samples).  ``real``: the scans (N, R, R, R) or their RealFeatures.
    ``features`` and ``ratio`` are separate so a set's features can be gathered stream by stream."""

    def __init__(self, real: np.ndarray | RealFeatures, device: Any) -> None:
        self.reference = real if isinstance(real, RealFeatures) else RealFeatures(real, device)
        self.baseline: float | None = None
        self.standardise = None

    def features(self, samples: np.ndarray) -> np.ndarray:
        return self.reference.extract(samples)

    def ratio(self, feats: np.ndarray) -> float:
        real = self.reference.real
        if self.standardise is None:
            self.standardise = metrics.pooled_standardiser(real, feats)
        distance = metrics.frechet_distance(self.standardise(feats), self.standardise(real))
        if self.baseline is None:
            self.baseline = max(distance, 1e-12)
        return float(distance / self.baseline)


@dataclass
class _Sweep:
    """One covariate's sweep, read at any guidance scale (module notes, steps 2-3)."""

    trained: TrainedModel
    schema: CovariateSchema
    name: str
    values: list[Value]
    key: str  # the measure
    real_slope: float
    realism: _Realism
    per_point: int
    temperature: Any
    seed: int
    batch_size: int
    streams: int

    def reading(self, scale: float) -> ScaleReading:
        requested: list[float] = []
        measured, feats, ratios = [], [], []
        for stream in range(self.streams):
            samples, req, _ = sample_at(self.trained, self.schema, self.name, self.values, self.per_point,
                                        self.temperature, self.seed + stream, self.batch_size, show=False,
                                        guidance=Guidance(1.0, {self.name: scale}))
            m = np.asarray(measure(samples, self.trained.voxel_size_mm)[self.key], float)
            values = [float(v) for v in req]
            ratios.append(self._ratio(trend(values, m)["slope"]))
            requested += values
            measured.append(m)
            feats.append(self.realism.features(samples))
            del samples  # one stream's volumes at a time: at 128³ a pooled set would not fit
        s = trend(requested, np.concatenate(measured))
        fd = self.realism.ratio(np.concatenate(feats))
        return ScaleReading(scale, s["slope"], s["spearman"], self._ratio(s["slope"]), fd, fd <= REALISM_TOLERANCE,
                            ratios)

    def _ratio(self, slope: float | None) -> float | None:
        return slope / self.real_slope if slope is not None else None


def stream_ratios_at(readings: Sequence[ScaleReading], scale: float) -> list[float]:
    """Each stream's slope ratio at ``scale``, interpolated linearly between the scales read (the
    spread says how much one stream alone would have moved the calibration)."""
    if not readings or not readings[0].stream_ratios:
        return []
    out = []
    for k in range(len(readings[0].stream_ratios)):
        pts = [(r.scale, r.stream_ratios[k]) for r in readings
               if len(r.stream_ratios) > k and r.stream_ratios[k] is not None and math.isfinite(r.stream_ratios[k])]
        if pts:
            out.append(float(np.interp(scale, [p[0] for p in pts], [p[1] for p in pts])))
    return out


def calibrate_covariate(trained: TrainedModel, schema: CovariateSchema, name: str, real: np.ndarray | RealFeatures,
                        real_table: dict[str, np.ndarray], own: Sequence[Value], scales: Sequence[float] = SCALES,
                        points: int = 9, per_point: int = 8, temperature: Any = 1.0, seed: int = 0,
                        batch_size: int = 8, progress=None, measure_key: str | None = None,
                        streams: int = 1) -> CovariateCalibration:
    """One covariate's calibration (module notes) against training volumes ``real`` (N, R, R, R; or
    their RealFeatures, when several covariates are calibrated against the same scans),
    their measurements ``real_table`` (``conditional.measure``) and their own values ``own``;
    ``measure_key`` fixes the measure instead of taking the one that tracks the covariate best."""
    kind = schema.get(name).kind
    if kind != "numeric":
        return CovariateCalibration(name, kind, note="categorical: kept at 1 (no slope to match)")
    key, real_trend = real_response(real_table, [float(v) for v in own], [measure_key] if measure_key else MEASURES)
    result = CovariateCalibration(name, kind, measure=key, real_slope=real_trend.get("slope"),
                                  real_spearman=real_trend.get("spearman"))
    if key is None or not result.real_slope:
        result.note = "no tissue measure varies with it in the training scans: kept at 1"
        return result
    sweep = _Sweep(trained, schema, name, sweep_points(schema, name, points), key, result.real_slope,
                   _Realism(real, trained.device), per_point, temperature, seed, batch_size, streams)
    for scale in sorted(set(float(s) for s in scales) | {1.0}):
        result.readings.append(sweep.reading(scale))
        if progress is not None:
            progress(result.readings[-1])
        last = result.readings[-1]
        if not last.realistic or (last.slope_ratio is not None and last.slope_ratio >= 1.0):
            break  # beyond here the choice cannot change (module notes, steps 3-4)
    result.scale, result.reached = choose_scale(result.readings)
    result.stream_ratios_at_scale = stream_ratios_at(result.readings, result.scale) if streams > 1 else []
    if not result.reached:
        ratio = dict(_realistic_points(result.readings, REALISM_TOLERANCE)).get(result.scale)
        result.note = ("no realistic scale reaches the training scans' response: kept "
                       + (f"{result.scale:.3g}, where the slope ratio is {ratio:.2f}" if ratio is not None else "1"))
    return result


def calibrated_guidance(results: Sequence[CovariateCalibration], counterfactuals: bool = False) -> Guidance:
    """The Guidance the calibrations chose for samples, or for ``counterfactuals`` (every covariate
    by name; others 1)."""
    return Guidance(1.0, {r.name: round(float(r.counterfactual.scale if counterfactuals and r.counterfactual
                                                else r.scale), 3) for r in results})


@dataclass
class CalibrationOptions:
    """How a calibration samples (module notes): the scales tried, the sweep and its draws."""

    scales: tuple[float, ...] = SCALES
    points: int = 9
    per_point: int = 8
    temperature: float = 1.0
    seed: int = 0
    streams: int = 3
    counterfactual_scans: int = 16  # training scans the counterfactual scale is read on (0: the samples' scale)
    batch_size: int = 8
    show_progress: bool | None = None
    measures: dict[str, str] = field(default_factory=dict)  # covariate -> measure, where not the best-tracking one


def select_scans(trained: TrainedModel, data: str | None, pattern: str | None, covariates_file: str | None,
                 max_scans: int, seed: int) -> tuple[list[str], list[dict[str, Value]], str]:
    """(files, their own covariates, a description) of the scans a calibration reads the real
    response on: ``data`` (with ``covariates_file``, the run's covariates.json or a participants.tsv),
    else the run's training scans; a seeded random ``max_scans`` of them."""
    from ..conditional import scan_covariates
    from .data import read_split

    if data is None:
        split = read_split(trained.run_dir)
        if split is None:
            raise UserError(f"no split.json in the run folder {trained.run_dir}; give --data (scans with covariates)")
        files, source = [f for f in split[0] if Path(f).is_file()], f"training scans of {trained.run_dir / 'split.json'}"
    else:
        files, source = [str(f) for f in input_files(data, pattern)], str(data)
    if len(files) < 3:
        raise UserError(f"calibrate-guidance needs at least 3 scans with covariates; {source} has {len(files)}")
    if len(files) > max_scans:
        keep = np.sort(np.random.default_rng(seed).permutation(len(files))[:max_scans])
        files = [files[i] for i in keep]
    rows, _ = scan_covariates(trained, files, None, covariates_file)
    return files, rows, source


def check_measures(chosen: dict[str, str], schema: CovariateSchema) -> dict[str, str]:
    """``{covariate: measure}`` checked: known covariates, measures of :data:`MEASURES`."""
    for name, key in chosen.items():
        if name not in schema.names:
            raise UserError(f"--measure: the model is not conditioned on {name!r}; its covariates are "
                            f"{', '.join(schema.names)}")
        if key not in MEASURES:
            raise UserError(f"--measure {name}={key}: the measures are {', '.join(MEASURES)}")
    return dict(chosen)


def calibrate_run(trained: TrainedModel, files: Sequence[str], rows: Sequence[dict[str, Value]],
                  output_dir: str | Path, options: CalibrationOptions, data_source: str) -> dict[str, Any]:
    """Calibrate every covariate of ``trained`` against ``files`` (the scans, with their own covariate
    ``rows``), write ``guidance_calibration.json`` and ``guidance_calibration.png`` to ``output_dir``
    and return the record (``guidance``: what ``--guidance calibrated`` uses)."""
    schema = trained.covariates
    volumes, _ = load_preprocessed(files, trained.preprocess_settings, show_progress=options.show_progress,
                                   desc="calibration scans")
    table = measure(volumes, trained.voxel_size_mm)
    features = RealFeatures(volumes, trained.device)  # once for every covariate
    results = []
    for name in schema.names:
        show = _printer(name) if options.show_progress is not False else None
        results.append(calibrate_covariate(trained, schema, name, features, table, [r[name] for r in rows],
                                           options.scales, options.points, options.per_point, options.temperature,
                                           options.seed, options.batch_size, show, options.measures.get(name),
                                           options.streams))
        _counterfactuals(trained, results[-1], volumes, rows, options)
    record = {"checkpoint": str(trained.checkpoint.path), "step": trained.checkpoint.step, "weights": trained.weights,
              "guidance": calibrated_guidance(results).to_json(),
              "counterfactual_guidance": calibrated_guidance(results, counterfactuals=True).to_json(),
              "data": {"source": data_source, "num_scans": len(files)},
              "options": {k: v for k, v in asdict(options).items() if k != "show_progress"},
              "covariates": [asdict(r) for r in results],
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CALIBRATION_FILE, record)
    from ..viz_conditional import save_calibration_figure

    save_calibration_figure(results, out / CALIBRATION_FIGURE, REALISM_TOLERANCE)
    return record


def _counterfactuals(trained: TrainedModel, result: CovariateCalibration, volumes: np.ndarray,
                     rows: Sequence[dict[str, Value]], options: CalibrationOptions) -> None:
    """The covariate's counterfactual scale (counterfactual_calibration.py), when it has a sample scale."""
    n = min(options.counterfactual_scans, len(volumes))
    if n < 1 or not result.readings or result.measure is None or not result.real_slope:
        return
    show = None
    if options.show_progress is not False:
        def show(r, scans):
            ratio = "n/a" if r.change_ratio is None else f"{r.change_ratio:.2f}"
            print(f"  {result.name} counterfactuals: scale {r.scale:.3g}: {r.monotonic}/{scans} monotonic, change "
                  f"ratio {ratio}{'' if r.kept else ' (monotonic change lost)'}", file=sys.stderr, flush=True)
    result.counterfactual = calibrate_counterfactuals(
        trained, trained.covariates, result.name, volumes[:n], rows[:n], result.measure, result.real_slope,
        result.scale, options.points, options.batch_size, show)


def describe(record: dict[str, Any]) -> list[str]:
    """What a calibration found, one line per covariate and one for the result."""
    lines = []
    for c in record["covariates"]:
        if not c["readings"]:
            lines.append(f"{c['name']}: scale 1 ({c['note']})")
            continue
        ratios = ", ".join(f"{r['scale']:g}: {'n/a' if r['slope_ratio'] is None else format(r['slope_ratio'], '.2f')}"
                           + ("" if r["realistic"] else " (not realistic)") for r in c["readings"])
        lines.append(f"{c['name']}: scale {c['scale']:.3g}{'' if c['reached'] else ' (not reached)'}; read on "
                     f"{c['measure']} (training scans: slope {c['real_slope']:.3g} per unit, Spearman "
                     f"{c['real_spearman']:.2f}); samples' slope ratio by scale {ratios}"
                     + _spread(c.get("stream_ratios_at_scale") or [])
                     + (f"; {c['note']}" if c["note"] else ""))
        if c.get("counterfactual"):
            lines.append(f"{c['name']}: {describe_counterfactual(c['counterfactual'])}")
    lines.append(f"calibrated guidance {Guidance.from_json(record['guidance'])} for samples and "
                 f"{Guidance.from_json(record.get('counterfactual_guidance', record['guidance']))} for counterfactuals "
                 f"(step {record['step']}): sample, counterfactual and evaluate use them by default (--guidance auto)")
    return lines


def _spread(ratios: Sequence[float]) -> str:
    if len(ratios) < 2:
        return ""
    return (f"; at that scale the {len(ratios)} sample streams alone give slope ratios "
            f"{min(ratios):.2f}-{max(ratios):.2f}")


def _printer(name: str):
    def show(r: ScaleReading) -> None:
        ratio = "n/a" if r.slope_ratio is None else f"{r.slope_ratio:.2f}"
        if len(r.stream_ratios) > 1:
            ratio += " (streams " + ", ".join("n/a" if q is None else f"{q:.2f}" for q in r.stream_ratios) + ")"
        print(f"  {name}: scale {r.scale:g}: slope ratio {ratio}, Fréchet {r.frechet_ratio:.2f}x scale 1"
              f"{'' if r.realistic else ' (no longer realistic)'}", file=sys.stderr, flush=True)
    return show
