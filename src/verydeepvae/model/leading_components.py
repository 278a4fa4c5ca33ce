"""A prior over the leading components of the layers just below the fitted Gaussian: the few
directions in which the training volumes' latents of those layers move together.

Why: after a short run the encoder stores global factors (brain size above all) where they are
cheapest, in the 16³ or 32³ latents at the brain's edge, and no coarser level holds them.  The
learned prior draws those latents place by place, independently given the layers above, so a factor
that moves every edge place together averages out and every sample has the average brain.  On two
demo models (450 steps) the brain volume of samples spread 21-37 ml against 112-115 ml across real
phantoms; drawing the 8³ to 32³ layers' standardised residuals along their 8 leading components,
with the training volumes' spread, and N(0, 1) across the rest as the learned prior does, gave
103-123 ml and brought the samples' MS-SSIM to within 0.01-0.04 of real pairs, from 0.06-0.07
(docs/training-recipe.md has the study).

The residual of a layer is (z - prior mean) / prior std (``LatentChoice.noise``), the form in which
its units are independent under the learned prior, so the rest of the space is drawn exactly as the
learned prior draws it.  Over the ``D`` units of ``layers``, with orthonormal ``basis`` (D, K) and
``scales`` (K,) (the components' standard deviations over the training volumes), a draw is

    noise = mean + basis (scales * a) + (I - basis basisᵀ) n,   a ~ N(0, I_K),  n ~ N(0, I_D),

its deviations from ``mean`` multiplied by the layer's temperature.  K directions estimated from a
few hundred volumes are population directions, not any one subject's code; the evaluation's
memorisation ratio checks that samples are not closer to training volumes than held-out ones are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, TypedDict

import torch

PREFIX = "fitted_prior.components."


class ComponentsLayout(TypedDict):
    """Which layers the components cover and how many there are (their tensors are in the checkpoint)."""

    layers: list[int]
    shapes: list[list[int]]
    count: int


@dataclass
class LeadingComponents:
    layers: list[int]  # decoder layer indices, coarsest first
    shapes: list[tuple[int, ...]]  # (channels, size, size, size) of each of those layers
    mean: torch.Tensor  # (D,) float32: the training volumes' mean residual, D = the layers' units
    basis: torch.Tensor  # (D, K) float32, orthonormal columns
    scales: torch.Tensor  # (K,) float32: standard deviation along each column

    @property
    def count(self) -> int:
        return int(self.scales.numel())

    def to(self, device: torch.device | str) -> "LeadingComponents":
        return LeadingComponents(self.layers, self.shapes, self.mean.to(device), self.basis.to(device),
                                 self.scales.to(device))

    def draw(self, n: int, temperatures: Sequence[float], generator: torch.Generator | None = None
             ) -> dict[int, torch.Tensor]:
        """n draws of the layers' standardised residuals, as {layer index: (n, *shape) tensor};
        ``temperatures`` holds one value per decoder layer."""
        device = generator.device if generator is not None else self.mean.device
        mean, basis, scales = self.mean.to(device), self.basis.to(device), self.scales.to(device)
        rest = torch.randn(n, mean.numel(), generator=generator, dtype=torch.float32, device=device)
        along = torch.randn(n, self.count, generator=generator, dtype=torch.float32, device=device)
        deviation = (along * scales - rest @ basis) @ basis.T + rest
        out: dict[int, torch.Tensor] = {}
        start = 0
        for layer, shape in zip(self.layers, self.shapes):
            size = math.prod(shape)
            block = slice(start, start + size)
            out[layer] = (mean[block] + temperatures[layer] * deviation[:, block]).reshape((n,) + tuple(shape))
            start += size
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return {PREFIX + name: getattr(self, name).detach().cpu().float().contiguous()
                for name in ("mean", "basis", "scales")}

    def describe(self) -> ComponentsLayout:
        return {"layers": list(self.layers), "shapes": [list(s) for s in self.shapes], "count": self.count}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], info: ComponentsLayout) -> "LeadingComponents":
        layers = [int(i) for i in info["layers"]]
        shapes = [tuple(int(v) for v in s) for s in info["shapes"]]
        mean, basis, scales = (tensors[PREFIX + name].float() for name in ("mean", "basis", "scales"))
        size = sum(math.prod(s) for s in shapes)
        count = int(info["count"])
        if len(shapes) != len(layers) or mean.shape != (size,) or basis.shape != (size, count) \
                or scales.shape != (count,):
            raise ValueError("leading-component tensors do not match their description")
        return cls(layers, shapes, mean, basis, scales)
