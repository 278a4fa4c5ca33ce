"""Conditioning the top-down path on a covariate vector (age, sex, lesion load... encoded as in
``data/covariates.py``): an embedding MLP, then FiLM at every resolution level of the decoder.

    e = GELU(W2 GELU(W1 c))                     c: (B, dim) covariates, e: (B, width)
    h <- h * (1 + gamma_l(e)) + beta_l(e)       at level l, after its upsampling and positional bias

``gamma_l`` and ``beta_l`` are linear maps to the level's channels, zero-initialised: a new
conditional model computes exactly what the unconditional one with the same weights computes, and
the conditioning grows from there.  Every prior p(z | h) and posterior q(z | x, h) of the level reads
the modulated state, so both see the covariates; the residual blocks carry the modulation down to
finer levels, where it is applied again.  The design and why: ``docs/conditional.md``.

Unconditional models have no such module, so their parameters, state dicts and checkpoints are
what they were.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def embedding_width(top_width: int) -> int:
    """The embedding's width: the decoder's top width, within [32, 256]."""
    return max(32, min(256, int(top_width)))


class ConditionEmbedding(nn.Module):
    def __init__(self, covariate_dim: int, level_widths: Sequence[int], width: int):
        super().__init__()
        self.covariate_dim = int(covariate_dim)
        self.mlp = nn.Sequential(nn.Linear(self.covariate_dim, width), nn.GELU(), nn.Linear(width, width))
        self.film = nn.ModuleList(nn.Linear(width, 2 * w) for w in level_widths)
        for layer in self.film:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, covariates: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per resolution level (index 0 = full resolution): (scale, shift), each (B, C_level, 1, 1, 1)."""
        if covariates.dim() != 2 or covariates.shape[1] != self.covariate_dim:
            raise ValueError(f"covariates must be shaped (batch, {self.covariate_dim}), got {tuple(covariates.shape)}")
        e = F.gelu(self.mlp(covariates.float()))
        out = []
        for layer in self.film:
            scale, shift = layer(e)[:, :, None, None, None].chunk(2, dim=1)
            out.append((1.0 + scale, shift))
        return out


def modulate(h: torch.Tensor, film: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """FiLM of a decoder state (B, C, s, s, s) in its own dtype and memory format."""
    scale, shift = film
    return h * scale.to(h.dtype) + shift.to(h.dtype)
