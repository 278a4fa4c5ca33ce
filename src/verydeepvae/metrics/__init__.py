"""Offline metrics for the evaluation report (no downloaded weights, CPU friendly).

Volumes are (N, D, H, W) or (D, H, W) numpy arrays or torch tensors with intensities in [0, 1];
feature matrices are (N, F).
"""

from .diversity import MSSSIMSettings, ms_ssim3d, ms_ssim_settings, pairwise_ms_ssim
from .reconstruction import mae, psnr, ssim3d

__all__ = [
    "MSSSIMSettings",
    "mae",
    "ms_ssim3d",
    "ms_ssim_settings",
    "pairwise_ms_ssim",
    "psnr",
    "ssim3d",
]
