"""Convolutions and residual blocks shared by the encoder and the decoder.

Pre-activation (GELU before every convolution), no normalisation layers, biases zero at
initialisation, and the last convolution of every residual branch scaled by 1/sqrt(depth) so the
variance of the residual stream does not grow with the number of blocks (Child 2021).

``maybe_checkpoint`` is the one place activation checkpointing happens (see ``Config.checkpoint_levels``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def maybe_checkpoint(enabled: bool, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, recomputed in the backward pass instead of storing its activations when
    ``enabled`` and gradients are being recorded.  The RNG state is saved and restored around the
    recomputation (torch's default), so random draws inside repeat exactly."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)


class Conv3d(nn.Module):
    """A 3D convolution that keeps the spatial size for any kernel size from 1 to 7.

    Odd kernels pad symmetrically; even kernels pad one more voxel before than after (the
    original project's choice for its 2³ kernels).

    On the CPU, a kernel wider than its grid (3 on 2³, 5 on 2³ or 4³) runs in float32 even under
    bfloat16 autocast: torch 2.13's CPU bfloat16 convolution returns wrong or non-finite weight
    gradients there (measured: 60 of 60 trials wrong for 3 on 2³, 17 of 60 non-finite for 5 on 4³;
    docs/performance.md), and these levels are too small for the cost to show.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, zero_init: bool = False):
        super().__init__()
        before, after = kernel_size // 2, (kernel_size - 1) // 2
        # symmetric padding inside the convolution (no padded copy, keeps the memory format);
        # an explicit pad only for even kernels
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=after)
        self.padding = (before - after, 0) * 3
        self.kernel_size = kernel_size
        self.needs_pad = before != after
        # set for one-channel inputs in channels-last mode: their layout is ambiguous and the
        # convolution would otherwise return channels-first, converting everything downstream
        self.output_format: torch.memory_format | None = None
        nn.init.zeros_(self.conv.bias)
        if zero_init:
            nn.init.zeros_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wider_than_grid = x.shape[-1] < self.kernel_size
        if self.needs_pad:
            x = F.pad(x, self.padding)
        if wider_than_grid and x.device.type == "cpu" and (x.dtype == torch.bfloat16
                                                           or torch.is_autocast_enabled("cpu")):
            x = self._float32_conv(x)
        else:
            x = self.conv(x)
        return x if self.output_format is None else x.contiguous(memory_format=self.output_format)

    def _float32_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution in float32, returned in the dtype autocast would have given."""
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        conv = self.conv
        with torch.autocast("cpu", enabled=False):
            out = F.conv3d(x.float(), conv.weight.float(), conv.bias.float(), padding=conv.padding)
        return out.to(dtype)

    def scale_weight_(self, factor: float) -> None:
        with torch.no_grad():
            self.conv.weight.mul_(factor)


class ConvStack(nn.Module):
    """GELU → 1×1 → GELU → k³ → GELU → k³ → GELU → 1×1: the bottleneck used everywhere."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, kernel_size: int,
                 zero_last: bool = False):
        super().__init__()
        self.c1 = Conv3d(in_channels, hidden, 1)
        self.c2 = Conv3d(hidden, hidden, kernel_size)
        self.c3 = Conv3d(hidden, hidden, kernel_size)
        self.c4 = Conv3d(hidden, out_channels, 1, zero_init=zero_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_activated(F.gelu(x))

    def from_activated(self, g: torch.Tensor) -> torch.Tensor:
        """The stack applied to an input that already went through its first GELU (so callers
        that feed one activation to several stacks compute that GELU once)."""
        x = self.c2(F.gelu(self.c1(g)))
        x = self.c3(F.gelu(x))
        return self.c4(F.gelu(x))

    @property
    def last(self) -> Conv3d:
        return self.c4


class PlainStack(nn.Module):
    """GELU → k³ → GELU → k³: the original's non-bottleneck encoder block branch."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.c1 = Conv3d(in_channels, out_channels, kernel_size)
        self.c2 = Conv3d(out_channels, out_channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(F.gelu(self.c1(F.gelu(x))))

    @property
    def last(self) -> Conv3d:
        return self.c2


class ResBlock(nn.Module):
    """x + branch(x), with a 1×1 projection on the skip when the width changes."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, kernel_size: int,
                 residual_scale: float, bottleneck: bool = True):
        super().__init__()
        self.checkpointed = False  # set by VeryDeepVAE from Config.checkpoint_levels
        if bottleneck:
            self.branch: nn.Module = ConvStack(in_channels, hidden, out_channels, kernel_size)
        else:
            self.branch = PlainStack(in_channels, out_channels, kernel_size)
        self.branch.last.scale_weight_(residual_scale)
        self.residual_scale = residual_scale
        self.skip = nn.Identity() if in_channels == out_channels else Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self.checkpointed, self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.branch(x)


class Downsample(nn.Module):
    """Halve the resolution: average pooling (default), nearest subsampling (the original's
    default) or a learned stride-2 convolution (the original's ``convolutional_downsampling``)."""

    def __init__(self, channels: int, mode: str):
        super().__init__()
        self.mode = mode
        self.channels_last = False  # set by VeryDeepVAE.set_channels_last
        self.conv = nn.Conv3d(channels, channels, 2, stride=2) if mode == "conv" else None
        if self.conv is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "avgpool":
            return avg_pool_2x(x, self.channels_last)
        if self.mode == "nearest":
            return x[:, :, ::2, ::2, ::2]
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, with a 1×1 projection when the decoder width changes.  The projection
    runs before the upsampling, at an eighth of the voxels: a 1×1 convolution acts on each voxel
    alone, so projecting then copying gives exactly what copying then projecting gives."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.channels_last = False  # set by VeryDeepVAE.set_channels_last
        self.project = None if in_channels == out_channels else Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.project is not None:
            x = self.project(x)
        return upsample_nearest_2x(x, self.channels_last)


def avg_pool_2x(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """``F.avg_pool3d(x, 2)``, kept channels-last in channels-last mode (the CPU pooling kernel
    converts its input to channels-first)."""
    if not channels_last:
        return F.avg_pool3d(x, 2)
    return _AveragePool2x.apply(x)


def upsample_nearest_2x(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=2, mode="nearest")``: the same values, in the requested
    memory format (a 1³ input's layout is ambiguous, so it is not read off the input).  Written by
    hand for its backward: torch sums 2×2×2 blocks, a reduction over three strided dimensions,
    10-50x more slowly than ``_sum_blocks``, and torch.compile's CPU code generation fails on the
    scatter-add of the interpolate backward in torch 2.13."""
    return _Upsample2x.apply(x, channels_last)


def _blocks(t: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """A view of a (B, C, 2D, 2H, 2W) tensor with each 2×2×2 block's offsets as dimensions of
    size 2, and which dimensions those are: (B, D, 2, H, 2, W, 2, C) over the channels-last
    layout, (B, C, D, 2, H, 2, W, 2) over the channels-first one (copied into it if need be)."""
    b, c, d, h, w = t.shape
    if channels_last:
        return t.permute(0, 2, 3, 4, 1).contiguous().view(b, d // 2, 2, h // 2, 2, w // 2, 2, c), (2, 4, 6)
    return t.contiguous().view(b, c, d // 2, 2, h // 2, 2, w // 2, 2), (3, 5, 7)


def _sum_blocks(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Sum of every 2×2×2 block of t (B, C, 2D, 2H, 2W) -> (B, C, D, H, W), in t's layout and
    dtype, by three pairwise additions of contiguous halves (in float32 for 16-bit inputs)."""
    blocks, dims = _blocks(t, channels_last)
    wide = torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype
    for dim in reversed(dims):  # the last first, so the earlier dimensions keep their places
        blocks = blocks.select(dim, 0).to(wide) + blocks.select(dim, 1)
    blocks = blocks.to(t.dtype)
    return blocks.permute(0, 4, 1, 2, 3) if channels_last else blocks


def _copy_blocks(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Every voxel of x (B, C, D, H, W) copied into a 2×2×2 block -> (B, C, 2D, 2H, 2W)."""
    b, c, d, h, w = x.shape
    if channels_last:
        out = torch.empty((b, 2 * d, 2 * h, 2 * w, c), dtype=x.dtype, device=x.device)
        out.view(b, d, 2, h, 2, w, 2, c).copy_(x.permute(0, 2, 3, 4, 1)[:, :, None, :, None, :, None, :])
        return out.permute(0, 4, 1, 2, 3)
    out = torch.empty((b, c, 2 * d, 2 * h, 2 * w), dtype=x.dtype, device=x.device)
    out.view(b, c, d, 2, h, 2, w, 2).copy_(x[:, :, :, None, :, None, :, None])
    return out


class _Upsample2x(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        ctx.channels_last = channels_last
        return _copy_blocks(x, channels_last)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _sum_blocks(grad, ctx.channels_last), None


class _AveragePool2x(torch.autograd.Function):
    """Channels-last mean over 2×2×2 blocks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _sum_blocks(x, True).mul_(0.125)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _copy_blocks(grad * 0.125, True)
