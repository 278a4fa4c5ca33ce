"""Bottom-up encoder: per resolution level, residual blocks then a ×2 downsampling.

It returns the activation at every level (the lateral inputs of the decoder's posteriors).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from .blocks import Downsample, ResBlock


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        channels = cfg.channels
        hidden = cfg.channels_hidden
        kernels = cfg.kernel_sizes_bottom_up
        n = cfg.num_levels
        blocks_per_level = cfg.encoder_blocks_per_level()
        self.depth = sum(blocks_per_level)
        scale = 1.0 / math.sqrt(self.depth)
        self.levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        in_channels = 1
        for level in range(n):
            blocks = []
            for b in range(blocks_per_level[level]):
                blocks.append(
                    ResBlock(in_channels if b == 0 else channels[level], hidden[level], channels[level],
                             kernels[level], scale, bottleneck=cfg.bottleneck_resnet_encoder)
                )
            self.levels.append(nn.Sequential(*blocks))
            in_channels = channels[level]
            if level < n - 1:
                self.downsamples.append(Downsample(channels[level], cfg.downsampling))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations per level, highest resolution first."""
        activations = []
        for level, blocks in enumerate(self.levels):
            x = blocks(x)
            activations.append(x)
            if level < len(self.downsamples):
                x = self.downsamples[level](x)
        return activations
