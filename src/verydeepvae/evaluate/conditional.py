"""The report's conditional-generation section (conditional models only): do samples and
counterfactuals follow the requested covariates?

For each covariate of the model:

* **samples across its range**: numeric covariates at ``points`` values evenly spaced between the
  5th and 95th percentiles of the training scans' values, categorical ones at every level;
  ``per_point`` samples each, the other covariates drawn from the training scans given this one
  (``conditional.resolve``), at the report's temperature and seed;
* **tissue measurements** (when the report measures tissue: phantom or FLAIR-like data): every
  sample's estimated volumes (``evaluate/morphometry.py``, ml on the model grid) and CSF fraction
  (CSF / brain).  For a numeric covariate, per measure: Spearman correlation and least-squares slope
  of the measurement against the *requested* value, beside the same for the held-out real volumes
  against their *own* values ("real slope", same estimator, same grid) and the slope ratio; and a
  two-sided Mann-Whitney U test between the samples at the lowest and at the highest value.  For a
  categorical covariate, the mean per level, samples beside real;
* **counterfactuals** of up to ``max_counterfactual`` held-out scans (numeric covariates; noise
  mode, ``counterfactual.py``): each scan decoded at every point; the measured change from its
  reconstruction against the requested change (Spearman and slope, beside the real slope), the
  fraction of scans whose measurement moves monotonically along the sweep in the real slope's
  direction, and how well the counterfactual at the scan's own values reconstructs it (PSNR
  against the input; it is the posterior-mean reconstruction by construction).

The *primary* measure of a covariate (the report's summary line) is the one the held-out real
volumes correlate with most strongly: for the phantom's age, the CSF fraction or ventricles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from scipy import stats

from .. import conditional
from ..counterfactual import counterfactual_volumes, decode_counterfactuals, encode_scan
from ..data.covariates import CovariateSchema, Value
from ..guidance import Guidance, check_guidance
from ..inference import TrainedModel
from ..sampling import iter_samples
from . import morphometry
from .conditional_section import (CategoricalMeasure, ConditionalSection, CounterfactualMeasure, Counterfactuals,
                                  CounterfactualTruth, CovariateEntry, MannWhitney, Measure, NumericMeasure, Trend, fmt)
from .phantom_truth import psnr_against_truth, true_counterfactuals

WHAT = ("Per covariate: samples at values across its range (numeric: evenly spaced between the training scans' "
        "5th and 95th percentiles; categorical: every level), the other covariates drawn from the training scans given "
        "it; their estimated tissue measurements against the requested value (Spearman, least-squares slope), beside "
        "the held-out real volumes against their own values (same estimator, same grid); and counterfactuals of "
        "held-out scans along the same values (noise mode): measured change against requested change. Method: "
        "docs/conditional.md")
MEASURES = morphometry.FEATURES + ("csf_fraction",)
LABELS = {**morphometry.LABELS, "csf_fraction": "CSF fraction of the brain"}
UNITS = {k: "ml" for k in morphometry.FEATURES} | {"csf_fraction": "fraction"}


def measure(volumes: np.ndarray, voxel_size_mm: float) -> dict[str, np.ndarray]:
    """Tissue measurements of volumes (N, R, R, R): the morphometry features and the CSF fraction."""
    table = morphometry.volume_table(volumes, voxel_size_mm)
    brain = np.asarray(table["brain_ml"], float)
    table["csf_fraction"] = np.divide(table["csf_ml"], brain, out=np.full_like(brain, np.nan), where=brain > 0)
    return table


@dataclass
class SweepArrays:
    """One covariate's volumes and measurements for the figures (never in report.json)."""

    values: list[Value]
    samples: np.ndarray  # (N, R, R, R), ``per_point`` at each value
    requested: list[Value]  # each sample's requested value
    table: dict[str, np.ndarray] | None = None  # the samples' measurements, when tissue is measured
    real: dict[str, np.ndarray] | None = None  # the held-out volumes' measurements
    real_values: list[Value] | None = None  # the held-out volumes' own values
    cf_input: np.ndarray | None = None  # the first held-out scan, its reconstruction and its sweep
    cf_recon: np.ndarray | None = None
    cf_volumes: np.ndarray | None = None
    cf_own: Value | None = None


def trend(x: Sequence[float], y: Sequence[float]) -> Trend:
    """Spearman correlation (and its p-value) and least-squares slope of y against x."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    out: Trend = {"n": int(len(x)), "spearman": None, "spearman_p": None, "slope": None}
    if len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
        rho, p = stats.spearmanr(x, y)
        out.update(spearman=float(rho), spearman_p=float(p), slope=float(np.polyfit(x, y, 1)[0]))
    return out


def mann_whitney(a: Sequence[float], b: Sequence[float]) -> MannWhitney:
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return {"p": None, "n": [len(a), len(b)]}
    return {"p": float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue), "n": [len(a), len(b)],
            "median_low": float(np.median(a)), "median_high": float(np.median(b))}


def sweep_points(schema: CovariateSchema, name: str, points: int) -> list[Value]:
    """The values a covariate is sampled at (module notes)."""
    covariate = schema.get(name)
    if covariate.kind != "numeric":
        return list(covariate.levels)
    values = np.asarray([float(v) for v in (row[name] for row in schema.bank_rows())])
    if len(values) == 0:
        values = np.asarray([covariate.minimum, covariate.maximum])
    low, high = np.percentile(values, [5, 95])
    return [float(v) for v in np.linspace(low, high, max(2, points))]


def sample_at(trained: TrainedModel, schema: CovariateSchema, name: str, values: Sequence[Value], per_point: int,
              temperature: Any, seed: int, batch_size: int, show: bool | None = None,
              guidance: Guidance | float = 1.0) -> tuple[np.ndarray, list[Value], list[dict[str, Value]]]:
    """``per_point`` samples at each value of ``name`` (others drawn given it): (volumes (N, R, R, R),
    the requested value of each, each volume's complete covariates)."""
    requests = [{name: v} for v in values for _ in range(per_point)]
    resolved = conditional.resolve(schema, requests, seed)
    volumes = np.concatenate([v for _, v in iter_samples(trained.model, len(requests), temperature, seed, batch_size,
                                                         trained.device, show, covariates=resolved.vectors,
                                                         guidance=check_guidance(guidance, schema).weights(schema),
                                                         references=resolved.references)])
    return volumes, [r[name] for r in requests], resolved.rows


def counterfactual_sweep(trained: TrainedModel, schema: CovariateSchema, volume: np.ndarray, own: dict[str, Value],
                         name: str, values: Sequence[Value], batch_size: int = 4,
                         guidance: Guidance | float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(reconstruction, counterfactuals (K, R, R, R)) of one preprocessed volume along ``values`` of ``name``."""
    targets = schema.encode([{**own, name: v} for v in values])
    return counterfactual_volumes(trained.model, volume, schema.encode([own])[0], targets, "noise", batch_size,
                                  trained.device, check_guidance(guidance, schema).weights(schema))


def counterfactual_sweeper(trained: TrainedModel, schema: CovariateSchema, volume: np.ndarray, own: dict[str, Value],
                           name: str, values: Sequence[Value], batch_size: int = 4
                           ) -> Callable[[Guidance | float], np.ndarray]:
    """``counterfactual_sweep``'s counterfactuals (K, R, R, R) as a function of the guidance, the scan
    encoded once: for sweeps of one scan repeated at several scales (counterfactual_calibration.py)."""
    codes, c = encode_scan(trained.model, volume, schema.encode([own])[0], "noise", trained.device)
    targets = schema.encode([{**own, name: v} for v in values])

    def at(guidance: Guidance | float) -> np.ndarray:
        return decode_counterfactuals(trained.model, codes, c, targets, "noise", batch_size, trained.device,
                                      check_guidance(guidance, schema).weights(schema))
    return at


def conditional_section(trained: TrainedModel, heldout: np.ndarray, heldout_rows: list[dict[str, Value]],
                        real_table: dict[str, np.ndarray] | None, temperature: Any, seed: int, batch_size: int,
                        points: int = 5, per_point: int = 6, max_counterfactual: int = 8,
                        show: bool | None = None, guidance: Guidance | float = 1.0,
                        counterfactual_guidance: Guidance | float | None = None,
                        phantom_rows: list[dict[str, str]] | None = None
                        ) -> tuple[ConditionalSection, dict[str, SweepArrays]]:
    """The section and each covariate's arrays for the figures; ``real_table``: the held-out volumes'
    measurements on the model grid, or None when tissue is not measured; ``counterfactual_guidance``:
    the counterfactuals' (None: ``guidance``); ``phantom_rows``: the held-out scans' participants.tsv rows
    when they are phantoms (``phantom_truth.phantom_rows``), to measure their true counterfactuals too."""
    schema = trained.covariates
    vox = trained.voxel_size_mm
    guidance = check_guidance(guidance, schema)
    moved = guidance if counterfactual_guidance is None else check_guidance(counterfactual_guidance, schema)
    section = ConditionalSection(WHAT, schema.to_json()["covariates"], points, per_point, guidance.to_json(),
                                 measured=real_table is not None, units={k: UNITS[k] for k in MEASURES},
                                 labels=LABELS, counterfactual_guidance=moved.to_json())
    if real_table is not None:
        real_table = dict(real_table)
        brain = np.asarray(real_table["brain_ml"], float)
        real_table["csf_fraction"] = np.divide(real_table["csf_ml"], brain, out=np.full_like(brain, np.nan),
                                               where=brain > 0)
    arrays: dict[str, SweepArrays] = {}
    for c in schema.covariates:
        values = sweep_points(schema, c.name, points)
        volumes, requested, _ = sample_at(trained, schema, c.name, values, per_point, temperature, seed, batch_size,
                                          show, guidance)
        entry: CovariateEntry = {"kind": c.kind, "values": values, "requested": requested}
        arrays[c.name] = SweepArrays(values, volumes, requested)
        if real_table is not None:
            table = measure(volumes, vox)
            entry["samples_measured"] = {k: table[k].tolist() for k in MEASURES}
            own = [row[c.name] for row in heldout_rows]
            entry["real_values"] = own
            if c.kind == "numeric":
                entry["measures"] = _numeric_measures(table, requested, real_table, own, values)
                entry["primary"] = _primary(entry["measures"])
            else:
                entry["measures"] = _categorical_measures(table, requested, real_table, own, values)
            arrays[c.name].table, arrays[c.name].real, arrays[c.name].real_values = table, real_table, own
        if c.kind == "numeric" and len(heldout) > 0:
            entry["counterfactual"] = _counterfactuals(trained, heldout, heldout_rows, c.name, values,
                                                       min(max_counterfactual, len(heldout)), batch_size,
                                                       entry.get("measures", {}) if real_table is not None else None,
                                                       arrays[c.name], moved, phantom_rows)
        section.per_covariate[c.name] = entry
    return section, arrays


def _counterfactuals(trained: TrainedModel, heldout: np.ndarray, heldout_rows: list[dict[str, Value]], name: str,
                     values: Sequence[Value], n: int, batch_size: int, measures: dict[str, Measure] | None,
                     arrays: SweepArrays, guidance: Guidance | float = 1.0,
                     phantom_rows: list[dict[str, str]] | None = None) -> Counterfactuals:
    """The first ``n`` held-out scans swept along ``values`` of ``name`` (noise mode, ``guidance``): their
    reconstructions' PSNR (dB) and, with ``measures`` (tissue is measured), the measured change
    against the requested one, and with ``phantom_rows`` the same scans' true counterfactuals beside
    them; the first scan's volumes go into ``arrays`` for the figure."""
    from ..metrics import psnr

    recons, sweeps = [], []
    for i in range(n):
        recon, outs = counterfactual_sweep(trained, trained.covariates, heldout[i], heldout_rows[i], name, values,
                                           batch_size, guidance)
        recons.append(recon)
        sweeps.append(outs)
    cf: Counterfactuals = {
        "num_scans": n,
        "psnr_own_values_db": [float(np.atleast_1d(psnr(heldout[i][None], recons[i][None]))[0]) for i in range(n)],
        "note": "the counterfactual at a scan's own values is its posterior-mean reconstruction "
                "(noise mode), so its PSNR is the reconstruction's"}
    if measures is not None:
        cf["measures"] = _counterfactual_measures(np.stack(recons), np.stack(sweeps), trained.voxel_size_mm,
                                                  [row[name] for row in heldout_rows[:n]], values, measures)
        truth = None if phantom_rows is None else true_counterfactuals(phantom_rows[:n], name, values,
                                                                       trained.preprocess_settings)
        if truth is not None:
            cf["truth"] = _truth(truth, np.stack(recons), np.stack(sweeps), trained.voxel_size_mm, measures)
    arrays.cf_input, arrays.cf_recon, arrays.cf_volumes = heldout[0], recons[0], sweeps[0]
    arrays.cf_own = heldout_rows[0][name]
    return cf


def _truth(truth: np.ndarray, recons: np.ndarray, sweeps: np.ndarray, vox: float,
           sample_measures: dict[str, Measure]) -> CounterfactualTruth:
    """True counterfactuals (N, V, R, R, R) read as the model's: monotonic fraction per measure, and PSNR
    of the counterfactuals and of the unchanged reconstructions against them."""
    n, k = truth.shape[:2]
    flat = measure(truth.reshape((-1,) + truth.shape[2:]), vox)
    fractions = {key: _monotonic(flat[key].reshape(n, k), key, sample_measures) for key in MEASURES}
    moved, unchanged = psnr_against_truth(truth, sweeps, recons)
    return {"monotonic_fraction": fractions, "psnr_counterfactual_db": moved, "psnr_unchanged_db": unchanged}


def _numeric_measures(table, requested, real_table, own, values) -> dict[str, NumericMeasure]:
    out = {}
    low = [i for i, r in enumerate(requested) if r == values[0]]
    high = [i for i, r in enumerate(requested) if r == values[-1]]
    for k in MEASURES:
        samples, real = trend(requested, table[k]), trend(own, real_table[k])
        ratio = (samples["slope"] / real["slope"]) if samples["slope"] is not None and real["slope"] else None
        out[k] = {"samples": samples, "real": real, "slope_ratio": ratio,
                  "lowest_vs_highest": mann_whitney(table[k][low], table[k][high])}
    return out


def _categorical_measures(table, requested, real_table, own, levels) -> dict[str, CategoricalMeasure]:
    out = {}
    for k in MEASURES:
        out[k] = {str(level): {
            "samples_mean": _mean([table[k][i] for i, r in enumerate(requested) if r == level]),
            "real_mean": _mean([real_table[k][i] for i, r in enumerate(own) if r == level]),
        } for level in levels}
    return out


def _counterfactual_measures(recons: np.ndarray, sweeps: np.ndarray, vox: float, own: Sequence[float],
                             values: Sequence[float], sample_measures: dict[str, Measure]
                             ) -> dict[str, CounterfactualMeasure]:
    base = measure(recons, vox)
    flat = measure(sweeps.reshape((-1,) + sweeps.shape[2:]), vox)
    n, k = sweeps.shape[:2]
    requested_change = np.asarray([[v - o for v in values] for o in own], float)
    out = {}
    for key in MEASURES:
        change = flat[key].reshape(n, k) - base[key][:, None]
        out[key] = {"change_vs_requested": trend(requested_change.ravel(), change.ravel()),
                    "monotonic_fraction": _monotonic(flat[key].reshape(n, k), key, sample_measures),
                    "mean_change_per_value": change.mean(0).tolist()}
    return out


def _monotonic(curves: np.ndarray, key: str, sample_measures: dict[str, Measure]) -> float | None:
    """Fraction of the sweeps (N, V) of measure ``key`` that never move against the real slope's direction;
    None when the real slope gives no direction."""
    direction = np.sign((sample_measures.get(key, {}).get("real", {}) or {}).get("slope") or 0.0)
    if not direction:
        return None
    return float(np.mean(np.all(np.diff(curves, axis=1) * direction >= 0, axis=1)))


def _primary(measures: dict[str, NumericMeasure]) -> str | None:
    scored = [(abs(m["real"]["spearman"]), k) for k, m in measures.items() if m["real"]["spearman"] is not None]
    return max(scored)[1] if scored else None


def _mean(values: Sequence[float]) -> float | None:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else None


# --- report pieces --------------------------------------------------------------------------------


def write_figures(section: ConditionalSection, arrays: dict[str, SweepArrays], folder) -> dict[str, str]:
    from .. import viz
    from ..viz_conditional import save_counterfactual_strip, save_trend

    out = {}
    for name, a in arrays.items():
        per = section.per_covariate[name]
        values, samples, requested = a.values, a.samples, a.requested
        rows = [[samples[i] for i, r in enumerate(requested) if r == v][:4] for v in values]
        path = folder / f"conditional_{name}_samples.png"
        viz.save_grid(rows, path, row_titles=[fmt(name, v) for v in values],
                      col_titles=[f"sample {j + 1}" for j in range(max(len(r) for r in rows))])
        out[f"conditional_{name}_samples"] = f"figures/{path.name}"
        primary = per.get("primary")
        if primary and a.table is not None:
            path = folder / f"conditional_{name}_{primary}.png"
            save_trend(requested, a.table[primary], path, f"{name} (requested / own)",
                       f"{LABELS[primary]} ({UNITS[primary]})", real=(a.real_values, a.real[primary]),
                       title=f"{LABELS[primary]} against {name}")
            out[f"conditional_{name}_trend"] = f"figures/{path.name}"
        if a.cf_volumes is not None:
            path = folder / f"counterfactual_{name}.png"
            save_counterfactual_strip([a.cf_input, a.cf_recon, *a.cf_volumes],
                                      ["input", f"recon. ({fmt(name, a.cf_own)})"] +
                                      [fmt(name, v) for v in values], a.cf_recon, path,
                                      suptitle=f"counterfactuals of a held-out scan along {name}")
            out[f"counterfactual_{name}"] = f"figures/{path.name}"
    return out
