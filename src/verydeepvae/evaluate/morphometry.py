"""Tissue volumes of FLAIR-like brains for the report: GM, WM, CSF, lesions, brain and ventricles.

The estimator (:func:`estimate_volumes`) is the partial-volume model
:func:`verydeepvae.metrics.tissue.flair_partial_volumes`, built for volumes as the model sees
them: preprocessed as for training (skull-stripped, brain fitted into the R³ cube, intensities
scaled to [0, 1]), where at 32³-64³ almost every brain voxel is a mixture of tissues. In short:

* the brain boundary is the mid-intensity level (0.35 x the brain median) towards the outside,
  found by a morphological opening so ventricles and narrow sulci stay inside; boundary voxels
  count as brain in proportion to their intensity (they mix with background);
* intensities are divided by a smooth local white-matter reference (deep, mid-intensity voxels;
  removes bias fields and any global scale), and the range above white matter is stretched
  towards putting the volume's own grey-matter level (85th percentile of tissue intensities) on a
  fixed value;
* each interior voxel's CSF/GM/WM/lesion fractions are read off response curves fitted to the
  phantom's exact partial-volume fractions (population seed 1, 32³ and 64³);
* CSF = the CSF seen inside the brain x a fixed scale (CSF at the brain surface is clamped to the
  background value by preprocessing and cannot be seen); GM = brain - CSF - WM - lesions;
  ventricles = CSF deeper than half the brain's largest depth (and than ``DEEP_CSF_MM``), scaled.

Nothing is calibrated per volume against labels: the estimator sees only the intensities.
Thresholds are relative to the volume's own intensity distribution (a global rescale changes no
estimate) and the brain boundary is a mid-intensity level (mild blurring moves it little).
Method, measurements and known weaknesses: ``docs/morphometry.md``.

Measured recovery of the volumes recorded by the phantom (``participants.tsv``, Pearson r over
40 subjects each, population seed 1 / seed 2; the curves and scales were fitted on seed 1 only)
from volumes preprocessed as for training and estimated at their own voxel size (the report's
``estimator_check``). "32³ from 64³" is 64³ phantoms preprocessed to 32³, the setting of the
previous version of this table; "before" is the previous estimator (multi-Otsu classes):

==========  ===========  ============  ===========  ============  ============
volume      32³          32³ from 64³  64³          before, 32³   before, 64³
==========  ===========  ============  ===========  ============  ============
brain       0.99 / 0.99  0.99 / 0.99   0.99 / 0.99  0.97 / 0.97   0.99 / 0.99
GM          0.97 / 0.99  0.98 / 0.99   0.98 / 0.99  0.62 / 0.48   0.90 / 0.64
WM          0.92 / 0.96  0.95 / 0.97   0.95 / 0.97  0.22 / 0.35   0.77 / 0.65
CSF         0.90 / 0.84  0.91 / 0.85   0.91 / 0.88  0.48 / -0.01  0.81 / 0.55
ventricles  0.93 / 0.90  0.94 / 0.95   0.90 / 0.91  0.55 / 0.38   0.85 / 0.85
lesions     0.90 / 0.88  0.96 / 0.91   0.97 / 0.96  0.79 / 0.47   0.96 / 0.78
==========  ===========  ============  ===========  ============  ============

Mean estimate / recorded is 0.88-1.10 for brain, GM, WM, CSF and ventricles at 32³ and 64³, and
0.67-1.24 for lesions (before: 0.1-0.5 for lesions, 0.3-0.8 for WM, 2-3 for CSF).

On the model grid preprocessing has normalised head size, so the comparison of samples with real
volumes sees composition rather than size. Composition (estimate / estimated brain against
recorded / recorded brain) correlates at 0.66-0.75 for GM, 0.88-0.95 for CSF and 0.89-0.95 for
ventricles (before: -0.57 to 0.41, -0.12 to 0.88 and 0.22 to 0.89). The white-matter share hardly
varies across the phantoms (standard deviation 0.5 % of the brain), so its composition r means
little. Blurring moves CSF and ventricle estimates most: a Gaussian blur of 0.8 voxel lowers them
by 1.1-1.5 and 1.5-1.9 population sd at 32³ (0.4-0.7 at 64³; before: CSF +4 sd); see
``docs/morphometry.md``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..metrics import wasserstein_by_feature
from ..metrics.tissue import flair_partial_volumes
from .population import Recovery, WassersteinComparison

DEEP_CSF_MM = 10.0  # ventricles: CSF at least this deep (and deeper than half the brain's largest depth)
BRAIN_THRESHOLD = 0.02
FEATURES = ("gm_ml", "wm_ml", "csf_ml", "ventricle_ml", "lesion_ml", "brain_ml")
# participants.tsv column recorded by the phantom for each estimated feature
RECORDED = {"gm_ml": "gm_volume_ml", "wm_ml": "wm_volume_ml", "csf_ml": "csf_volume_ml",
            "ventricle_ml": "ventricle_volume_ml", "lesion_ml": "lesion_volume_ml", "brain_ml": "brain_volume_ml"}
LABELS = {"gm_ml": "grey matter", "wm_ml": "white matter", "csf_ml": "CSF", "ventricle_ml": "ventricles (deep CSF)",
          "lesion_ml": "lesions (WMH)", "brain_ml": "brain"}


def estimate_volumes(volume: np.ndarray, voxel_size_mm: float, deep_csf_mm: float = DEEP_CSF_MM) -> dict[str, float]:
    """Estimated volumes (ml) of one FLAIR-like volume in [0, 1] with isotropic voxels of ``voxel_size_mm``.

    Returns the :data:`FEATURES`; see :func:`verydeepvae.metrics.tissue.flair_partial_volumes`.
    """
    t = flair_partial_volumes(np.asarray(volume, dtype=np.float64), float(voxel_size_mm),
                              brain_threshold=BRAIN_THRESHOLD, ventricle_min_depth_mm=deep_csf_mm)
    return {k: float(t[k]) for k in FEATURES}


def volume_table(volumes: np.ndarray | Sequence[np.ndarray], voxel_sizes_mm: float | Sequence[float]) -> dict[str, np.ndarray]:
    """:func:`estimate_volumes` of every volume: ``{feature: (N,) array}`` in :data:`FEATURES` order."""
    vols = list(volumes)
    sizes = [float(voxel_sizes_mm)] * len(vols) if np.isscalar(voxel_sizes_mm) else [float(s) for s in voxel_sizes_mm]
    rows = [estimate_volumes(v, s) for v, s in zip(vols, sizes)]
    return {k: np.array([r[k] for r in rows]) for k in FEATURES}


def wasserstein_with_baseline(samples: dict[str, np.ndarray], real: dict[str, np.ndarray], seed: int = 0,
                              repeats: int = 5, set_size: int | None = None) -> WassersteinComparison:
    """Per-feature 1-Wasserstein distances (ml, and in units of the real std): samples vs real, and
    real vs real between two random disjoint sets of ``set_size`` (default: halves) of the real set
    (mean over ``repeats`` splits), with the samples subsampled to the same size for a like-for-like
    figure."""
    full = wasserstein_by_feature(samples, real)
    full_norm = wasserstein_by_feature(samples, real, normalise=True)
    n = len(next(iter(real.values())))
    out: WassersteinComparison = {"features": {}}
    rng = np.random.default_rng(seed)
    if n >= 4:
        half = min(n // 2, set_size or n // 2)
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


def recovery(estimates: dict[str, np.ndarray], recorded: dict[str, np.ndarray]) -> dict[str, Recovery]:
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
