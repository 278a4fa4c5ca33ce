"""Offline metrics for the evaluation report (no downloaded weights, CPU friendly).

Volumes are (N, D, H, W) or (D, H, W) numpy arrays or torch tensors with intensities in [0, 1];
feature matrices are (N, F). Report-facing results are floats, per-volume arrays, or JSON-ready
dicts. Modules, by job:

* ``reconstruction``: :func:`psnr`, :func:`ssim3d`, :func:`mae` (per-volume, paired volumes);
* ``diversity``: :func:`ms_ssim3d`, :func:`pairwise_ms_ssim` with size-valid settings
  (:func:`ms_ssim_settings`);
* ``features``: :class:`RandomConvFeatures`, :func:`intensity_features`, :func:`extract_features`,
  :func:`standardize_features`, :func:`pooled_standardiser`;
* ``distances``: :func:`frechet_distance`, :func:`mmd`, :func:`real_vs_real_baseline`,
  :func:`matched_to_baseline`;
* ``memorisation``: :func:`nearest_neighbour_distances`, :func:`memorisation_summary`;
* ``likelihood``: :func:`active_units` (streaming: :class:`RunningVariance`,
  :func:`active_units_from_variances`);
* ``tissue``: :func:`tissue_volumes`, :func:`tissue_volume_table`, :func:`wasserstein_by_feature`;
* ``texture``: :func:`texture_statistics` (voxel-to-voxel roughness and its fine structure),
  :func:`texture_summary`, :func:`texture_comparison`.

Naming: distances on random-3D-CNN features are "Fréchet distance on random-3D-CNN features" and
"MMD on random-3D-CNN features", never FID/KID, which imply pretrained Inception/Med3D networks.
"""

from .distances import frechet_distance, ledoit_wolf_covariance, matched_to_baseline, mmd, real_vs_real_baseline
from .diversity import MSSSIMSettings, ms_ssim3d, ms_ssim_settings, pairwise_ms_ssim
from .features import (
    RandomConvFeatures,
    extract_features,
    intensity_feature_names,
    intensity_features,
    pooled_standardiser,
    standardize_features,
)
from .likelihood import ACTIVE_THRESHOLD, RunningVariance, active_units, active_units_from_variances
from .memorisation import memorisation_summary, nearest_neighbour_distances
from .reconstruction import mae, psnr, ssim3d
from .texture import texture_comparison, texture_statistics, texture_summary
from .tissue import TISSUE_CLASSES, tissue_volume_table, tissue_volumes, wasserstein_by_feature

__all__ = [
    "ACTIVE_THRESHOLD",
    "MSSSIMSettings",
    "RandomConvFeatures",
    "RunningVariance",
    "TISSUE_CLASSES",
    "active_units",
    "active_units_from_variances",
    "extract_features",
    "frechet_distance",
    "intensity_feature_names",
    "intensity_features",
    "ledoit_wolf_covariance",
    "matched_to_baseline",
    "mae",
    "memorisation_summary",
    "mmd",
    "ms_ssim3d",
    "ms_ssim_settings",
    "nearest_neighbour_distances",
    "pairwise_ms_ssim",
    "pooled_standardiser",
    "psnr",
    "real_vs_real_baseline",
    "ssim3d",
    "standardize_features",
    "texture_comparison",
    "texture_statistics",
    "texture_summary",
    "tissue_volume_table",
    "tissue_volumes",
    "wasserstein_by_feature",
]
