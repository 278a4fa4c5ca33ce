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
    """With a = q_std / p_std and d = (q_mean - p_mean) / p_std: KL = (a² + d² - 1) / 2 - log a,
    dKL/dq_mean = -dKL/dp_mean = d / p_std, dKL/dq_std = (a - 1/a) / p_std and
    dKL/dp_std = (1 - a² - d²) / p_std; the stds are recomputed from the raw inputs."""

    @staticmethod
    def forward(ctx, q_mean, q_raw, p_mean, p_raw, eps):
        ctx.save_for_backward(q_mean, q_raw, p_mean, p_raw, eps)
        q_std, p_std = std_from_raw(q_raw), std_from_raw(p_raw)
        inv_p = p_std.reciprocal_()
        a = q_std * inv_p
        d = (q_mean.float() - p_mean.float()).mul_(inv_p)
        kl = (a * a).addcmul_(d, d).sub_(1.0).mul_(0.5).sub_(a.log_())
        z = torch.addcmul(q_mean.float(), q_std, eps)
        return z, kl

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        q_mean, q_raw, p_mean, p_raw, eps = ctx.saved_tensors
        q_std, q_slope = _std_and_slope(q_raw)
        p_std, p_slope = _std_and_slope(p_raw)
        inv_p = p_std.reciprocal_()
        a = q_std.mul_(inv_p)
        d = (q_mean.float() - p_mean.float()).mul_(inv_p)
        g = inv_p if grad_kl is None else inv_p.mul_(grad_kl)  # dL/dKL / p_std
        if grad_kl is None:
            g = torch.zeros_like(inv_p)
        mean_term = d * g
        g_p_std = (1.0 - a * a).sub_(d.mul_(d)).mul_(g)
        g_q_std = (a - a.reciprocal()).mul_(g)
        g_q_mean = mean_term
        if grad_z is not None:
            g_q_std.addcmul_(grad_z, eps)
            g_q_mean = mean_term + grad_z
        return (g_q_mean.to(q_mean.dtype), g_q_std.mul_(q_slope).to(q_raw.dtype),
                mean_term.neg_().to(p_mean.dtype), g_p_std.mul_(p_slope).to(p_raw.dtype), None)


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
