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


CHUNK_ELEMENTS = 1 << 20  # the fused sample+KL works through slabs of about this many elements


def posterior_sample_and_kl(q_mean: torch.Tensor, q_raw: torch.Tensor, p_mean: torch.Tensor,
                            p_raw: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z = q_mean + q_std * eps (float32) and KL(q || p) summed over everything but the batch
    (float32, shape (B,)), from the networks' raw outputs (std = ``std_from_raw``).

    The same values and gradients as composing ``std_from_raw``, ``kl_diagonal_gaussians``, a
    reparameterised draw and a sum, but it keeps only its inputs for the backward pass and works
    through the volume in slabs along depth, so its float32 temporaries stay small (the maths of a
    128³ layer would otherwise hold a dozen latent-sized float32 maps at once)."""
    return _SampleKL.apply(q_mean, q_raw, p_mean, p_raw, eps)


def _slabs(shape: torch.Size) -> list[slice]:
    depth = shape[2] if len(shape) > 2 else 1
    per_slab = max(1, math.prod(shape) // max(depth, 1))
    step = max(1, CHUNK_ELEMENTS // per_slab)
    if len(shape) <= 2 or step >= depth:
        return [slice(None)]
    return [slice(i, min(i + step, depth)) for i in range(0, depth, step)]


def _slab(t: torch.Tensor, sl: slice) -> torch.Tensor:
    return t if sl == slice(None) else t[:, :, sl]


def _dense_slab(t: torch.Tensor, sl: slice) -> torch.Tensor:
    """A slab whose voxels are adjacent in memory (channels-first).  The raw inputs are channel
    slices of the networks' outputs; in channels-last mode such a slice interleaves with the other
    channels, and elementwise maths on it (softplus above all) ran 14x slower than on a copy."""
    t = _slab(t, sl)
    return t if t.stride(-1) == 1 else t.contiguous()


class _SampleKL(torch.autograd.Function):
    """With a = q_std / p_std and d = (q_mean - p_mean) / p_std: KL = (a² + d² - 1) / 2 - log a,
    dKL/dq_mean = -dKL/dp_mean = d / p_std, dKL/dq_std = (a - 1/a) / p_std and
    dKL/dp_std = (1 - a² - d²) / p_std; the stds are recomputed from the raw inputs."""

    @staticmethod
    def forward(ctx, q_mean, q_raw, p_mean, p_raw, eps):
        ctx.save_for_backward(q_mean, q_raw, p_mean, p_raw, eps)
        z = torch.empty_like(q_mean, dtype=torch.float32)
        kl = torch.zeros(q_mean.shape[0], dtype=torch.float32, device=q_mean.device)
        for sl in _slabs(q_mean.shape):
            qm, qr, pm, pr, e = (_dense_slab(t, sl) for t in (q_mean, q_raw, p_mean, p_raw, eps))
            q_std, p_std = std_from_raw(qr), std_from_raw(pr)
            inv_p = p_std.reciprocal_()
            a = q_std * inv_p
            d = (qm.float() - pm.float()).mul_(inv_p)
            kl_map = (a * a).addcmul_(d, d).sub_(1.0).mul_(0.5).sub_(a.log_())
            kl += kl_map.sum(dim=tuple(range(1, kl_map.dim())))
            _slab(z, sl).copy_(torch.addcmul(qm.float(), q_std, e))
        return z, kl

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        q_mean, q_raw, p_mean, p_raw, eps = ctx.saved_tensors
        grads = [torch.empty_like(t) for t in (q_mean, q_raw, p_mean, p_raw)]
        if grad_kl is None:
            grad_kl = torch.zeros(q_mean.shape[0], dtype=torch.float32, device=q_mean.device)
        gk = grad_kl.float().view(-1, *([1] * (q_mean.dim() - 1)))
        for sl in _slabs(q_mean.shape):
            qm, qr, pm, pr, e = (_dense_slab(t, sl) for t in (q_mean, q_raw, p_mean, p_raw, eps))
            q_std, q_slope = _std_and_slope(qr)
            p_std, p_slope = _std_and_slope(pr)
            g = p_std.reciprocal_()
            a = q_std.mul_(g)
            d = (qm.float() - pm.float()).mul_(g)
            g.mul_(gk)  # dL/dKL / p_std
            mean_term = d * g
            g_p_std = (1.0 - a * a).sub_(d.mul_(d)).mul_(g)
            g_q_std = (a - a.reciprocal()).mul_(g)
            g_q_mean = mean_term
            if grad_z is not None:
                gz = _slab(grad_z, sl)
                g_q_std.addcmul_(gz, e)
                g_q_mean = mean_term + gz
            for out, value in zip(grads, (g_q_mean, g_q_std.mul_(q_slope), mean_term.neg_(), g_p_std.mul_(p_slope))):
                _slab(out, sl).copy_(value)
        return (*grads, None)


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
