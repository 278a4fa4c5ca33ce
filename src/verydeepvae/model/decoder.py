"""Top-down decoder: from a learned constant at the coarsest level to the full resolution.

Per level (coarse to fine): ×2 nearest upsampling (except at the top), a learned per-voxel bias of
the state (levels up to ``bias_max_resolution``), then the configured number of latent layers.
Residual branches and z projections are scaled by 1/sqrt(number of latent layers).

The per-level biases are VDVAE's ``bias_xs``: they tell the decoder *where* it is.  Without them the
only positional signal below the learned top constant is the zero padding at the volume's edges, so
the population-mean brain (ventricles in the middle, cortex at the rim) has to be carried by the
latents or built up from the borders; in the demo that left reconstructions as one symmetric blob
after 250 steps (docs/training-recipe.md).  They start at zero, so a new model computes what it
computed before they existed.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .blocks import Upsample
from .condition import modulate
from .latent_layer import LatentChoice, LatentLayer


# The biases enter as BIAS_GAIN * parameter.  Adam-type optimisers move every parameter by about
# the learning rate per step whatever its gradient, and a per-voxel bias has no shared weights to
# speed it up: with the gain, the population-mean brain is in place within ~100 steps instead of
# ~1,000 (fitting one brain at learning rate 6e-3: PSNR 37 dB after 150 steps with the gain, 26 dB
# without; docs/training-recipe.md).
BIAS_GAIN = 10.0


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = cfg.channels_top_down
        hidden = cfg.channels_hidden_top_down
        encoder_width = cfg.channels
        latents = cfg.latent_feature_maps_per_resolution
        z_channels = cfg.channels_per_latent
        kernels = cfg.kernel_sizes_top_down
        n = cfg.num_levels
        self.num_levels = n
        self.depth = sum(latents)
        scale = 1.0 / math.sqrt(self.depth)
        top_size = cfg.level_resolutions()[-1]
        self.h_top = nn.Parameter(torch.zeros(1, width[-1], top_size, top_size, top_size))
        self.layers = nn.ModuleList()
        self.layer_levels: list[int] = []
        self.upsamples = nn.ModuleDict()
        self.biases = nn.ParameterDict()
        for level in reversed(range(n)):
            if level < n - 1:
                self.upsamples[str(level)] = Upsample(width[level + 1], width[level])
                size = cfg.resolution >> level
                if size <= cfg.bias_max_resolution:
                    self.biases[str(level)] = nn.Parameter(torch.zeros(1, width[level], size, size, size))
            for _ in range(latents[level]):
                self.layers.append(LatentLayer(width[level], hidden[level], encoder_width[level],
                                               z_channels[level], kernels[level], scale))
                self.layer_levels.append(level)

    def forward(self, activations: Sequence[torch.Tensor] | None, choices: Sequence[LatentChoice],
                batch_size: int, generator: torch.Generator | None = None, keep_z: bool = True,
                film: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None, num_layers: int | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor | None], list[torch.Tensor]]:
        """Run the hierarchy; returns the final state, the per-layer KLs and the z of every layer
        (an empty list without ``keep_z``: training does not hold on to them).  ``film``: per level
        (index 0 = full resolution) the (scale, shift) of a conditional model (model/condition.py),
        applied to the state at the start of the level.  ``num_layers``: stop after that many
        latent layers, coarsest first (the state returned is then the one below the last of them)."""
        stop = len(self.layers) if num_layers is None else num_layers
        h = self.h_top.expand(batch_size, -1, -1, -1, -1)
        kls: list[torch.Tensor | None] = []
        zs: list[torch.Tensor] = []
        index = 0
        for level in reversed(range(self.num_levels)):
            if num_layers is not None and index >= stop:  # levels without latent layers still run in full
                break
            if level < self.num_levels - 1:
                h = self.upsamples[str(level)](h)
                if str(level) in self.biases:
                    h = h + self.biases[str(level)] * BIAS_GAIN
            if film is not None:
                h = modulate(h, film[level])
            # GELU of the lateral input once per level, not once per latent layer
            e_act = None if activations is None else F.gelu(activations[level])
            while index < stop and self.layer_levels[index] == level:
                h, kl, z = self.layers[index](h, e_act, choices[index], generator)
                kls.append(kl)
                if keep_z:
                    zs.append(z)
                index += 1
        return h, kls, zs
