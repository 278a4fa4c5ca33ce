"""A second prior for the coarsest latent layers: a Gaussian fitted to the latents the encoder
gives the training volumes (the aggregate posterior), drawn from instead of the learned prior.

Why: after a short run the learned prior of the coarse layers does not yet match what the encoder
uses them for, and prior samples land where the decoder was never trained ("prior holes").  On
the demo model (450 CPU steps), drawing the 1³ and 2³ layers from this Gaussian and every finer
layer from its learned prior took the random-CNN Fréchet ratio of the samples from 3.0-3.5 to
1.7-1.8 on two held-out phantom sets; taking the coarse latents of the held-out volumes
themselves (the bound of what a better top prior can give) reached 1.5.  After 4,000 steps the
learned prior was better (1.67 against 1.91), so training keeps this Gaussian only when its
samples are closer to the training volumes than the learned prior's (train/fit_prior.py).  The
Gaussian now covers 1³ to 4³ (1³-2³ where 1³-4³ has too many active units): on three 60-minute
models it missed fewer held-out targets than the 1³-2³ one; docs/training-recipe.md has the study.

The Gaussian is ``N(mean, L Lᵀ)`` over the concatenated, flattened latents of ``layers`` (indices
into the decoder's layers, coarsest first); it lives beside the weights in the checkpoint
(``fitted_prior.*`` tensors), not in the module's state, so checkpoints without it load as before.

Since the twenty-second session training fits it to the *standardised residuals* of the layers'
*active units* instead (``noise``, ``units``): (z - prior mean) / prior std, the form in which a
layer's units are independent under the learned prior.  Why: a layer's learned prior is a diagonal
Gaussian given the layers above, so it cannot give the correlations the encoder puts between the
units of one layer, and samples came out more alike than real brains (docs/training-recipe.md).
Fitting the active units only keeps the Gaussian small enough to estimate from a few hundred
volumes: over all units of 1³-2³ the inactive ones made Ledoit-Wolf shrink by 0.85, washing out
the active ones' correlations.  The other units are drawn N(0, 1), as the learned prior would draw
them.  Checkpoints of the earlier form (latents, whole layers) load and sample as before.

Since the forty-seventh session it may carry the leading components of the layers just below it
(model/leading_components.py): global factors the encoder stores in the 16³ or 32³ latents, which
the learned prior averages away.  Checkpoints without them sample as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NotRequired, Sequence, TypedDict

import torch

from .latent_layer import LatentChoice
from .leading_components import ComponentsLayout, LeadingComponents

TENSOR_PREFIX = "fitted_prior."


class FittedPriorLayout(TypedDict):
    """Which latent layers the fitted Gaussian covers and their shapes (its tensors are in the checkpoint)."""

    layers: list[int]
    shapes: list[list[int]]
    dim: int
    noise: bool  # absent in checkpoints of the earlier form: latents of whole layers
    units: list[int]  # per layer, how many of its units the Gaussian covers (with ``noise``)
    components: NotRequired[ComponentsLayout]  # the layers below, drawn along leading components


class FittedPriorChoice(TypedDict, total=False):
    """A checkpoint's ``fitted_prior`` entry (train/fit_prior.py): the fitted Gaussian's layout,
    whether sampling uses it and why; only ``used``, ``num_volumes``, ``not_fitted`` and
    ``frechet_to_training`` when none could be fitted."""

    layers: list[int]
    shapes: list[list[int]]
    dim: int
    noise: bool
    units: list[int]
    components: ComponentsLayout
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
    text = f"the Gaussian fitted to the {levels_text(shapes)} latents" if shapes else "the fitted Gaussian"
    components = meta.get("components")
    if components:
        text += (f" and {components['count']} leading components of the {levels_text(components['shapes'])} "
                 "latents")
    return text


@dataclass
class FittedPrior:
    layers: list[int]  # decoder layer indices it draws, coarsest first
    shapes: list[tuple[int, ...]]  # (channels, size, size, size) of each of those layers
    mean: torch.Tensor  # (D,) float32, D = the number of units covered
    scale_tril: torch.Tensor  # (D, D) float32, lower-triangular Cholesky factor of the covariance
    # per layer, the flat indices (int64) of the units covered; None: every unit of every layer
    units: list[torch.Tensor] | None = None
    noise: bool = False  # over standardised residuals under the learned prior, not over latents
    components: LeadingComponents | None = None  # the layers below, drawn along leading components

    @property
    def dim(self) -> int:
        return int(self.mean.numel())

    def levels_text(self) -> str:
        """"1³, 2³, 4³" (with components: "1³, 2³, 4³ + 8 components of 8³, 16³")."""
        text = levels_text(self.shapes)
        if self.components is not None:
            text += f" + {self.components.count} components of {levels_text(self.components.shapes)}"
        return text

    def to(self, device: torch.device | str) -> "FittedPrior":
        units = None if self.units is None else [u.to(device) for u in self.units]
        components = None if self.components is None else self.components.to(device)
        return FittedPrior(self.layers, self.shapes, self.mean.to(device), self.scale_tril.to(device), units,
                           self.noise, components)

    def unit_counts(self) -> list[int]:
        """How many units of each covered layer the Gaussian draws."""
        if self.units is None:
            return [math.prod(shape) for shape in self.shapes]
        return [int(u.numel()) for u in self.units]

    def draw(self, n: int, temperatures: Sequence[float], generator: torch.Generator | None = None
             ) -> dict[int, torch.Tensor]:
        """n draws, as {layer index: (n, *shape) tensor}: latents, or with ``noise`` standardised
        residuals (``LatentChoice.noise``), the units not covered drawn N(0, 1).  ``temperatures``
        holds one value per decoder layer and scales each layer's deviation from the mean, as in
        ``gaussian.draw``."""
        device = generator.device if generator is not None else self.mean.device
        mean, tril = self.mean.to(device), self.scale_tril.to(device)  # no copy when already there
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float32, device=device)
        out: dict[int, torch.Tensor] = {}
        start = 0
        for k, (layer, shape, count) in enumerate(zip(self.layers, self.shapes, self.unit_counts())):
            block = slice(start, start + count)
            # rows of L for this layer's units: the deviations stay jointly Gaussian across layers
            z = mean[block] + temperatures[layer] * (eps @ tril[block].T)
            if self.units is not None:
                full = temperatures[layer] * torch.randn(n, math.prod(shape), generator=generator,
                                                         dtype=torch.float32, device=device)
                full[:, self.units[k].to(device)] = z
                z = full
            out[layer] = z.reshape((n,) + tuple(shape))
            start += count
        return out

    def choices(self, n: int, temperatures: Sequence[float], generator: torch.Generator | None = None
                ) -> dict[int, LatentChoice]:
        """:meth:`draw` as the decoder's latent choices: given latents, or with ``noise`` given
        residuals, which the learned prior turns into latents (``LatentChoice.noise``); then the
        leading components' layers, as residuals."""
        drawn = self.draw(n, temperatures, generator)
        choices = {layer: LatentChoice(noise=d) if self.noise else LatentChoice(z=d) for layer, d in drawn.items()}
        if self.components is not None:
            choices.update({layer: LatentChoice(noise=d)
                            for layer, d in self.components.draw(n, temperatures, generator).items()})
        return choices

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {TENSOR_PREFIX + "mean": self.mean.detach().cpu().contiguous(),
               TENSOR_PREFIX + "scale_tril": self.scale_tril.detach().cpu().contiguous()}
        for layer, units in zip(self.layers, self.units or []):
            out[f"{TENSOR_PREFIX}units.{layer}"] = units.detach().cpu().to(torch.int64).contiguous()
        if self.components is not None:
            out.update(self.components.tensors())
        return out

    def describe(self) -> FittedPriorLayout:
        layout: FittedPriorLayout = {"layers": list(self.layers), "shapes": [list(s) for s in self.shapes],
                                     "dim": self.dim}
        if self.noise:
            layout.update(noise=True, units=self.unit_counts())
        if self.components is not None:
            layout["components"] = self.components.describe()
        return layout

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], info: FittedPriorLayout) -> "FittedPrior":
        mean = tensors[TENSOR_PREFIX + "mean"].float()
        tril = tensors[TENSOR_PREFIX + "scale_tril"].float()
        shapes = [tuple(int(v) for v in s) for s in info["shapes"]]
        layers = [int(i) for i in info["layers"]]
        units = None
        if info.get("noise"):
            units = [tensors[f"{TENSOR_PREFIX}units.{layer}"].long() for layer in layers]
        components = LeadingComponents.from_tensors(tensors, info["components"]) if info.get("components") else None
        prior = cls(layers, shapes, mean, tril, units, bool(info.get("noise")), components)
        counts = prior.unit_counts()
        if len(shapes) != len(layers) or mean.shape != (sum(counts),) or tril.shape != (mean.numel(), mean.numel()) \
                or any(u.numel() and (u.min() < 0 or u.max() >= math.prod(s)) for u, s in zip(units or [], shapes)):
            raise ValueError("fitted prior tensors do not match their description")
        return prior
