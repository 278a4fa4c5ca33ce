"""Named statistics of a training step and of a validation pass.

Each is a small dataclass that becomes one float64 tensor only for the collective (all-reduce)
that combines the ranks' values, and is read back by name afterwards: no numbered tensor slots
whose meaning changes between training and validation.  Units: nats per voxel throughout (the
logged bits per voxel are made from them by :func:`loss_values`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .reporting import to_bits


@dataclass
class StepStats:
    """One optimiser step, averaged over its micro-batches: the negative ELBO and its
    reconstruction term (nats/voxel), the gradient norm (NaN when the update was non-finite) and
    the KL of each latent layer (nats/voxel, a float64 tensor of shape (num_layers,))."""

    elbo: float
    nll: float
    grad_norm: float
    kl: torch.Tensor

    def to_tensor(self) -> torch.Tensor:
        """``[elbo, nll, grad_norm, kl...]`` as float64 on the CPU, shape (3 + num_layers,)."""
        head = torch.tensor([self.elbo, self.nll, self.grad_norm], dtype=torch.float64)
        return torch.cat([head, self.kl.to("cpu", torch.float64)])

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> StepStats:
        values = values.to("cpu", torch.float64)
        return cls(values[0].item(), values[1].item(), values[2].item(), values[3:])

    @classmethod
    def window_mean(cls, window: Sequence[StepStats]) -> torch.Tensor:
        """The steps' mean of every statistic, ignoring NaNs (skipped updates), as one tensor."""
        return torch.stack([s.to_tensor() for s in window]).nanmean(0)


@dataclass
class ValidationSums:
    """Sums over validation volumes (float64 tensors on the compute device): negative ELBO and
    reconstruction term (nats/voxel, summed over volumes), the number of volumes, and each latent
    layer's KL summed over volumes (shape (num_layers,))."""

    elbo: torch.Tensor
    nll: torch.Tensor
    count: torch.Tensor
    kl: torch.Tensor

    @classmethod
    def zeros(cls, num_layers: int, device: torch.device) -> ValidationSums:
        def zero(*shape):
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        return cls(zero(()), zero(()), zero(()), zero(num_layers))

    def to_tensor(self) -> torch.Tensor:
        """``[elbo, nll, count, kl...]``, shape (3 + num_layers,), for the all-reduce."""
        return torch.cat([torch.stack([self.elbo, self.nll, self.count]), self.kl])

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> ValidationSums:
        return cls(values[0], values[1], values[2], values[3:])


def loss_values(elbo: float, nll: float, kl_total: float) -> dict[str, float]:
    """The headline loss figures of a training window or a validation pass: the loss in nats/voxel,
    and the negative ELBO, its reconstruction term and the total KL in bits/voxel."""
    return {"loss_nats_per_voxel": elbo, "elbo_bits_per_voxel": to_bits(elbo),
            "nll_bits_per_voxel": to_bits(nll), "kl_bits_per_voxel": to_bits(kl_total)}


def layer_kl_values(kl: Sequence[float], layer_levels: Sequence[int], resolution: int) -> dict[str, float]:
    """One ``kl_layer/NN_resR`` entry per latent layer (R: the layer's resolution), bits/voxel."""
    return {f"kl_layer/{i:02d}_res{resolution >> level}": to_bits(value)
            for i, (level, value) in enumerate(zip(layer_levels, kl))}
