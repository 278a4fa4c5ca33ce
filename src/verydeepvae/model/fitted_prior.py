"""A second prior for the coarsest latent layers: a Gaussian fitted to the latents the encoder
gives the training volumes (the aggregate posterior), drawn from instead of the learned prior.

Why: after a short run the learned prior of the coarse layers does not yet match what the encoder
uses them for, and prior samples land where the decoder was never trained ("prior holes").  On
the demo model (450 CPU steps), drawing the 1³ and 2³ layers from this Gaussian and every finer
layer from its learned prior took the random-CNN Fréchet ratio of the samples from 3.0-3.5 to
1.7-1.8 on two held-out phantom sets; taking the coarse latents of the held-out volumes
themselves (the bound of what a better top prior can give) reached 1.5.  After 4,000 steps the
learned prior was better (1.67 against 1.91), so training keeps this Gaussian only when its
samples are closer to the training volumes than the learned prior's (train/fit_prior.py).  Where a
model keeps its global factors varies with the training seed, so training also fits a Gaussian
over 1³ to 4³ and keeps whichever of the three is closest; docs/training-recipe.md has the study.

The Gaussian is ``N(mean, L Lᵀ)`` over the concatenated, flattened latents of ``layers`` (indices
into the decoder's layers, coarsest first); it lives beside the weights in the checkpoint
(``fitted_prior.*`` tensors), not in the module's state, so checkpoints without it load as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, TypedDict

import torch

TENSOR_PREFIX = "fitted_prior."


class FittedPriorLayout(TypedDict):
    """Which latent layers the fitted Gaussian covers and their shapes (its tensors are in the checkpoint)."""

    layers: list[int]
    shapes: list[list[int]]
    dim: int


class FittedPriorChoice(TypedDict, total=False):
    """A checkpoint's ``fitted_prior`` entry (train/fit_prior.py): the fitted Gaussian's layout,
    whether sampling uses it and why; only ``used``, ``num_volumes``, ``not_fitted`` and
    ``frechet_to_training`` when none could be fitted."""

    layers: list[int]
    shapes: list[list[int]]
    dim: int
    used: bool
    num_volumes: int
    draws_per_volume: int
    frechet_to_training: dict[str, float]  # "learned", "fitted" -> random-CNN Fréchet distance
    rule: str
    not_fitted: str  # why no Gaussian could be fitted


def resolutions(shapes: Sequence[Sequence[int]]) -> list[int]:
    """The resolutions (edge length, coarsest first) of latent layers of ``shapes`` (C, R, R, R)."""
    return sorted({int(shape[-1]) for shape in shapes})


def levels_text(shapes: Sequence[Sequence[int]]) -> str:
    """"1³, 2³, 4³": the resolutions of latent layers of ``shapes`` (C, R, R, R)."""
    return ", ".join(f"{s}³" for s in resolutions(shapes))


def chosen_prior_text(meta: FittedPriorChoice) -> str:
    """What a checkpoint's ``fitted_prior`` entry samples the coarse latents with, in words."""
    if not meta.get("used"):
        return "the learned prior"
    shapes = meta.get("shapes")
    return f"the Gaussian fitted to the {levels_text(shapes)} latents" if shapes else "the fitted Gaussian"


@dataclass
class FittedPrior:
    layers: list[int]  # decoder layer indices it draws, coarsest first
    shapes: list[tuple[int, ...]]  # (channels, size, size, size) of each of those layers
    mean: torch.Tensor  # (D,) float32, D = sum of the layers' element counts
    scale_tril: torch.Tensor  # (D, D) float32, lower-triangular Cholesky factor of the covariance

    @property
    def dim(self) -> int:
        return int(self.mean.numel())

    def levels_text(self) -> str:
        return levels_text(self.shapes)

    def to(self, device: torch.device | str) -> "FittedPrior":
        return FittedPrior(self.layers, self.shapes, self.mean.to(device), self.scale_tril.to(device))

    def draw(self, n: int, temperatures: Sequence[float], generator: torch.Generator | None = None
             ) -> dict[int, torch.Tensor]:
        """n draws, as {layer index: (n, *shape) tensor}; ``temperatures`` holds one value per
        decoder layer (the fitted layers' values scale the deviation from the mean, as in
        ``gaussian.draw``)."""
        device = generator.device if generator is not None else self.mean.device
        mean, tril = self.mean.to(device), self.scale_tril.to(device)  # no copy when already there
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float32, device=device)
        out: dict[int, torch.Tensor] = {}
        start = 0
        for layer, shape in zip(self.layers, self.shapes):
            size = math.prod(shape)
            block = slice(start, start + size)
            # rows of L for this layer's elements: the deviations stay jointly Gaussian across layers
            z = mean[block] + temperatures[layer] * (eps @ tril[block].T)
            out[layer] = z.reshape((n,) + tuple(shape))
            start += size
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return {TENSOR_PREFIX + "mean": self.mean.detach().cpu().contiguous(),
                TENSOR_PREFIX + "scale_tril": self.scale_tril.detach().cpu().contiguous()}

    def describe(self) -> FittedPriorLayout:
        return {"layers": list(self.layers), "shapes": [list(s) for s in self.shapes], "dim": self.dim}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], info: FittedPriorLayout) -> "FittedPrior":
        mean = tensors[TENSOR_PREFIX + "mean"].float()
        tril = tensors[TENSOR_PREFIX + "scale_tril"].float()
        shapes = [tuple(int(v) for v in s) for s in info["shapes"]]
        layers = [int(i) for i in info["layers"]]
        if len(shapes) != len(layers) or mean.shape != (sum(math.prod(s) for s in shapes),) \
                or tril.shape != (mean.numel(), mean.numel()):
            raise ValueError("fitted prior tensors do not match their description")
        return cls(layers, shapes, mean, tril)
