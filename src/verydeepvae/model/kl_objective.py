"""The KL terms of the training objective beyond the plain bound: NVAE-style balancing across
layers and free bits per layer.  Kept apart from ``vae.py`` because they shape the optimisation,
not the model: the reported ELBO never includes them."""

from __future__ import annotations

from typing import Sequence

import torch


def balanced_kl_coefficients(kl: torch.Tensor, sizes: Sequence[int], floor: float = 1e-3) -> torch.Tensor:
    """NVAE-style KL balancing (Vahdat & Kautz 2020): per-layer multipliers (mean 1) proportional to
    each layer's KL per latent dimension (batch mean, plus ``floor`` nats), from the per-layer KL
    ``kl`` (B, layers) in nats per volume and the layers' numbers of latent dimensions ``sizes``.
    A layer that carries little information per unit pays little for more, so layers the optimiser
    would otherwise switch off early (the coarse ones, whose decoder path is longest) stay in play
    during the warm-up."""
    per_dim = kl.mean(0).clamp_min(0.0) / kl.new_tensor([float(s) for s in sizes]) + floor
    return per_dim / per_dim.mean()


def free_bits_kl(kl: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Free bits (Kingma et al. 2016) per latent layer: the batch-mean KL of a layer below
    ``threshold`` (same units as ``kl``, (B, layers)) is not penalised, so a layer can start carrying
    information, and lower its posterior noise, before it pays for it; above it the usual KL applies.
    Returned per sample (B, layers) with each layer's batch mean replaced by max(mean, threshold);
    ``threshold``: one number, or one per layer ((layers,) tensor)."""
    mean = kl.mean(0, keepdim=True)
    return kl - mean + torch.maximum(mean, torch.as_tensor(threshold, dtype=kl.dtype, device=kl.device))
