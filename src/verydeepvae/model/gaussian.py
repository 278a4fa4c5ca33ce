"""Diagonal Gaussian helpers for the latent layers, always evaluated in float32.

The std is a softplus with beta = ln 2 (Efficient-VDVAE): smooth gradients, never zero, and
exactly 1 when its raw input is 0, so zero-initialised prior heads give N(0, 1) priors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SOFTPLUS_BETA = math.log(2.0)
MIN_STD = 1e-5


def std_from_raw(raw: torch.Tensor) -> torch.Tensor:
    return F.softplus(raw.float(), beta=SOFTPLUS_BETA).clamp_min(MIN_STD)


def kl_diagonal_gaussians(
    q_mean: torch.Tensor, q_std: torch.Tensor, p_mean: torch.Tensor, p_std: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(q || p) between diagonal Gaussians, in nats."""
    q_mean, p_mean = q_mean.float(), p_mean.float()
    var_ratio = (q_std / p_std) ** 2
    mean_term = ((q_mean - p_mean) / p_std) ** 2
    return 0.5 * (var_ratio + mean_term - 1.0) - torch.log(q_std / p_std)


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(x; mean, std²), in nats."""
    z = (x.float() - mean.float()) / std
    return -0.5 * z * z - torch.log(std) - 0.5 * math.log(2.0 * math.pi)


def draw(mean: torch.Tensor, std: torch.Tensor, temperature: float = 1.0,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """mean + temperature * std * eps (temperature 0 gives the mean)."""
    if temperature == 0.0:
        return mean.float()
    eps = torch.randn(mean.shape, device=mean.device, dtype=torch.float32, generator=generator)
    return mean.float() + temperature * std * eps
