"""The headline quality figures of an evaluation report, as one flat row.

Each figure is a ratio or gap against the real-vs-real reference the report computes beside it, so
1 (or 0 for the MS-SSIM gap) means "as close to the real population as another real set is":

* ``frechet_ratio``, ``mmd_ratio``: random-3D-CNN Fréchet distance and MMD² of samples vs real over
  real vs real (matched set sizes);
* ``ms_ssim_gap``: mean MS-SSIM between sample pairs minus that between real pairs (> 0: samples
  too alike);
* ``w1_ratio_<tissue>``: 1-Wasserstein distance of a tissue volume's distribution, samples vs real
  over real vs real (matched set sizes);
* ``memorisation_ratio``: median distance of a sample to its nearest training volume over that of a
  held-out volume (< 1: samples closer to the training set than unseen brains are);
* ``heldout_copies``: held-out volumes that are voxel copies of training volumes (should be 0; if
  not, every other figure is partly a training-set figure);
* ``roughness_ratio``, ``fine_correlation_gap``: the samples' median voxel-to-voxel roughness over the
  real volumes', and their median fine correlation minus the real volumes' (metrics/texture.py;
  grain: ratio > 1 and gap < 0; too smooth: ratio < 1 and gap > 0);
* ``dead_levels``: resolutions (edge length) none of whose latent units is active;
* ``prior``: what drew the samples' coarse latents, "learned" or "fitted 1³-4³" (model/fitted_prior.py).

Missing sections give ``nan`` (or an empty list), never an error.
"""

from __future__ import annotations

import math
from typing import Any

from ..metrics.texture import texture_comparison

TISSUES = ("gm_ml", "wm_ml", "csf_ml", "ventricle_ml", "lesion_ml", "brain_ml")


def _get(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and value is not None else math.nan


def level_activity(report: dict[str, Any]) -> dict[int, int]:
    """Active latent units per resolution (edge length), from the likelihood section."""
    out: dict[int, int] = {}
    for layer in _get(report, "likelihood", "kl_per_layer") or []:
        if "active_units" in layer:
            out[layer["resolution"]] = out.get(layer["resolution"], 0) + int(layer["active_units"])
    return out


def prior_label(levels: list[int] | None) -> str:
    """"learned", or "fitted 1³-4³" for a Gaussian over those levels' latents ("?" when a report
    predates the record)."""
    if levels is None:
        return "?"
    if not levels:
        return "learned"
    low, high = min(levels), max(levels)
    return f"fitted {low}³" if low == high else f"fitted {low}³-{high}³"


def quality_row(report: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of ``report`` (the dict written as report.json)."""
    activity = level_activity(report)
    row: dict[str, Any] = {
        "bits_per_voxel": _num(_get(report, "likelihood", "elbo_bits_per_voxel", "mean")),
        "kl_bits_per_voxel": _num(_get(report, "likelihood", "kl_bits_per_voxel", "mean")),
        "active_units": {f"{r}": a for r, a in sorted(activity.items(), reverse=True)},
        "dead_levels": sorted((r for r, a in activity.items() if a == 0), reverse=True),
        "active_levels": sum(1 for a in activity.values() if a > 0),
        "frechet_ratio": _num(_get(report, "distances", "random_cnn", "frechet", "ratio_to_baseline")),
        "mmd_ratio": _num(_get(report, "distances", "random_cnn", "mmd", "ratio_to_baseline")),
        "recon_psnr_db": _num(_get(report, "reconstruction", "psnr_db", "mean")),
        "memorisation_ratio": _num(_get(report, "memorisation", "voxels", "median_ratio")),
        "heldout_copies": len(_get(report, "memorisation", "heldout_copies") or []),
        "prior": prior_label(_get(report, "samples", "prior_levels")),
    }
    samples = _num(_get(report, "diversity", "samples", "mean"))
    real = _num(_get(report, "diversity", "real", "mean"))
    row["ms_ssim_samples"], row["ms_ssim_real"], row["ms_ssim_gap"] = samples, real, samples - real
    row.update(texture_comparison(_get(report, "texture", "samples"), _get(report, "texture", "real")))
    features = _get(report, "morphometry", "comparison", "features") or {}
    for tissue in TISSUES:
        entry = features.get(tissue) or {}
        matched, base = _num(entry.get("samples_vs_real_half_ml")), _num(entry.get("real_vs_real_half_ml"))
        row[f"w1_ratio_{tissue}"] = matched / base if base > 0 else math.nan
    return row
