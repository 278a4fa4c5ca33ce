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


def posterior_sample_and_kl(q_mean: torch.Tensor, q_raw: torch.Tensor, p_mean: torch.Tensor,
                            p_raw: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z = q_mean + q_std * eps and the elementwise KL(q || p), both float32, from the networks'
    raw outputs (std = ``std_from_raw``), in one step that keeps only its inputs for the backward
    pass: the same values and gradients as composing ``std_from_raw``, ``kl_diagonal_gaussians``
    and a reparameterised draw, without a dozen latent-sized float32 intermediates per layer."""
    return _SampleKL.apply(q_mean, q_raw, p_mean, p_raw, eps)


class _SampleKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_mean, q_raw, p_mean, p_raw, eps):
        ctx.save_for_backward(q_mean, q_raw, p_mean, p_raw, eps)
        q_std, p_std = std_from_raw(q_raw), std_from_raw(p_raw)
        diff = q_mean.float() - p_mean.float()
        ratio = q_std / p_std
        kl = 0.5 * (ratio * ratio + (diff / p_std) ** 2 - 1.0) - torch.log(ratio)
        z = torch.addcmul(q_mean.float(), q_std, eps)
        return z, kl

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        q_mean, q_raw, p_mean, p_raw, eps = ctx.saved_tensors
        q_std, dq_std_draw = _std_and_slope(q_raw)
        p_std, dp_std_draw = _std_and_slope(p_raw)
        if grad_z is None:
            grad_z = torch.zeros_like(q_std)
        if grad_kl is None:
            grad_kl = torch.zeros_like(q_std)
        inv_p = 1.0 / p_std
        diff_term = grad_kl * (q_mean.float() - p_mean.float()) * inv_p * inv_p  # dKL/dq_mean
        q_ratio = q_std * inv_p
        # dKL/dq_std = q_std/p_std^2 - 1/q_std;  dKL/dp_std = 1/p_std - (q_std^2 + diff^2)/p_std^3
        g_q_std = grad_z * eps + grad_kl * (q_ratio * inv_p - 1.0 / q_std)
        diff = q_mean.float() - p_mean.float()
        g_p_std = grad_kl * inv_p * (1.0 - q_ratio * q_ratio) - diff_term * diff * inv_p
        return ((grad_z + diff_term).to(q_mean.dtype), (g_q_std * dq_std_draw).to(q_raw.dtype),
                (-diff_term).to(p_mean.dtype), (g_p_std * dp_std_draw).to(p_raw.dtype), None)


def _std_and_slope(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """std_from_raw(raw) and its derivative (the softplus slope, 0 where the clamp holds)."""
    raw = raw.float()
    soft = F.softplus(raw, beta=SOFTPLUS_BETA)
    slope = torch.sigmoid(SOFTPLUS_BETA * raw) * (soft >= MIN_STD)
    return soft.clamp_min(MIN_STD), slope


def draw(mean: torch.Tensor, std: torch.Tensor, temperature: float = 1.0,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """mean + temperature * std * eps (temperature 0 gives the mean)."""
    if temperature == 0.0:
        return mean.float()
    eps = torch.randn(mean.shape, device=mean.device, dtype=torch.float32, generator=generator)
    return mean.float() + temperature * std * eps
