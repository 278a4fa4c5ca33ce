"""Tissue volumes of FLAIR-like brains for the report: GM, WM, CSF, lesions, brain and ventricles.

GM, WM, CSF, lesion and brain volumes come from :func:`verydeepvae.metrics.tissue_volumes`
(multi-Otsu classes with partial-volume correction; FLAIR contrast CSF < WM < GM < lesion).

Ventricles have no intensity of their own, so they are estimated by position: **deep CSF**, the
CSF-class voxels (below the CSF/WM threshold) farther than ``DEEP_CSF_MM`` (10 mm) from the brain
surface (Euclidean distance transform of the brain mask, in mm).  Sulcal CSF lies at the surface,
the lateral ventricles deep inside, so the count tracks ventricle size; deep sulci (e.g. the
Sylvian fissure) add an offset, which is why the estimate is larger than the true ventricle
volume (about 2x on the phantom population) while correlating with it.

Measured recovery of the phantom's recorded volumes (``participants.tsv``, Pearson r) from volumes
preprocessed as for training (64³ phantoms, population seed 1, 40 subjects / seed 11, 20 subjects):

==========  ===========  ===========
volume      at 64³       at 32³
==========  ===========  ===========
brain       0.99 / 1.00  0.99 / 1.00
lesions     0.97 / 0.95  0.93 / 0.90
GM          0.90 / 0.93  0.65 / 0.92
ventricles  0.85 / 0.89  0.72 / 0.83
CSF         0.81 / 0.82  0.61 / 0.64
WM          0.77 / 0.86  0.34 / 0.70
==========  ===========  ===========

Preprocessing (crop, resampling with anti-aliasing) blurs tissue borders, which mostly costs WM and
CSF (partial-volume CSF/GM voxels look like WM in FLAIR), increasingly so at coarse resolutions.
The report measures these correlations on its own held-out phantom volumes whenever
``participants.tsv`` is available, so every comparison comes with the estimator's accuracy at that
resolution.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from ..metrics import tissue_volumes, wasserstein_by_feature

DEEP_CSF_MM = 10.0
BRAIN_THRESHOLD = 0.02
FEATURES = ("gm_ml", "wm_ml", "csf_ml", "ventricle_ml", "lesion_ml", "brain_ml")
# participants.tsv column recorded by the phantom for each estimated feature
RECORDED = {"gm_ml": "gm_volume_ml", "wm_ml": "wm_volume_ml", "csf_ml": "csf_volume_ml",
            "ventricle_ml": "ventricle_volume_ml", "lesion_ml": "lesion_volume_ml", "brain_ml": "brain_volume_ml"}
LABELS = {"gm_ml": "grey matter", "wm_ml": "white matter", "csf_ml": "CSF", "ventricle_ml": "ventricles (deep CSF)",
          "lesion_ml": "lesions (WMH)", "brain_ml": "brain"}


def estimate_volumes(volume: np.ndarray, voxel_size_mm: float, deep_csf_mm: float = DEEP_CSF_MM) -> dict[str, float]:
    """Estimated volumes (ml) of one FLAIR-like volume in [0, 1] with isotropic voxels of ``voxel_size_mm``."""
    v = np.asarray(volume, dtype=np.float64)
    ml = float(voxel_size_mm) ** 3 / 1000.0
    t = tissue_volumes(v, ml, brain_threshold=BRAIN_THRESHOLD)
    out = {k: float(t[k]) for k in ("gm_ml", "wm_ml", "csf_ml", "lesion_ml", "brain_ml")}
    inside = v > BRAIN_THRESHOLD
    threshold = t["threshold_csf_wm"]
    if np.isfinite(threshold) and inside.any():
        depth_mm = ndi.distance_transform_edt(inside) * float(voxel_size_mm)
        out["ventricle_ml"] = float(np.count_nonzero(inside & (v < threshold) & (depth_mm > deep_csf_mm)) * ml)
    else:
        out["ventricle_ml"] = 0.0
    return out


def volume_table(volumes: np.ndarray | Sequence[np.ndarray], voxel_sizes_mm: float | Sequence[float]) -> dict[str, np.ndarray]:
    """:func:`estimate_volumes` of every volume: ``{feature: (N,) array}`` in :data:`FEATURES` order."""
    vols = list(volumes)
    sizes = [float(voxel_sizes_mm)] * len(vols) if np.isscalar(voxel_sizes_mm) else [float(s) for s in voxel_sizes_mm]
    rows = [estimate_volumes(v, s) for v, s in zip(vols, sizes)]
    return {k: np.array([r[k] for r in rows]) for k in FEATURES}


def wasserstein_with_baseline(samples: dict[str, np.ndarray], real: dict[str, np.ndarray], seed: int = 0,
                              repeats: int = 5) -> dict[str, Any]:
    """Per-feature 1-Wasserstein distances (ml, and in units of the real std): samples vs real, and
    real vs real between two random halves of the real set (mean over ``repeats`` splits), with
    the samples subsampled to the same half size for a like-for-like figure."""
    full = wasserstein_by_feature(samples, real)
    full_norm = wasserstein_by_feature(samples, real, normalise=True)
    n = len(next(iter(real.values())))
    out: dict[str, Any] = {"features": {}}
    rng = np.random.default_rng(seed)
    if n >= 4:
        half = n // 2
        m = len(next(iter(samples.values())))
        base = {k: [] for k in real}
        matched = {k: [] for k in real}
        for _ in range(max(1, repeats)):
            perm = rng.permutation(n)
            a, b = perm[:half], perm[half:2 * half]
            pick = rng.permutation(m)[:min(half, m)]
            for k in real:
                base[k].append(wasserstein_by_feature({k: real[k][a]}, {k: real[k][b]})[k])
                matched[k].append(wasserstein_by_feature({k: samples[k][pick]}, {k: real[k][a]})[k])
        out["set_size"] = half
    for k in real:
        sd = float(np.std(real[k]))
        entry = {"samples_vs_real_ml": full[k], "samples_vs_real_in_real_sd": full_norm[k],
                 "real_mean_ml": float(np.mean(real[k])), "real_sd_ml": sd,
                 "samples_mean_ml": float(np.mean(samples[k])), "samples_sd_ml": float(np.std(samples[k]))}
        if n >= 4:
            entry["samples_vs_real_half_ml"] = float(np.mean(matched[k]))
            entry["real_vs_real_half_ml"] = float(np.mean(base[k]))
        out["features"][k] = entry
    return out


def recovery(estimates: dict[str, np.ndarray], recorded: dict[str, np.ndarray]) -> dict[str, Any]:
    """Pearson r and mean ratio estimate/recorded per feature (estimator accuracy on phantoms)."""
    out = {}
    for k, values in estimates.items():
        if k not in recorded:
            continue
        a, b = np.asarray(values, float), np.asarray(recorded[k], float)
        r = float(np.corrcoef(a, b)[0, 1]) if len(a) >= 3 and a.std() > 0 and b.std() > 0 else float("nan")
        ratio = float(a.mean() / b.mean()) if b.mean() > 0 else float("nan")
        out[k] = {"pearson_r": r, "mean_estimate_ml": float(a.mean()), "mean_recorded_ml": float(b.mean()),
                  "ratio": ratio, "recorded_column": RECORDED[k]}
    return out
