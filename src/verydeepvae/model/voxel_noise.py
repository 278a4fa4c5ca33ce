"""Drawn voxels whose deviations from the mean go together between neighbours, as the training
volumes' do: a Gaussian copula over the voxels of p(x | z).

Why: p(x | z) is factorised (one discretised logistic per voxel), so drawing from it makes every
voxel's deviation independent of its neighbours'.  Where the decoder has not placed fine anatomy
(sulci, small lesions, the scanner's smooth noise), that deviation is wide, and independent draws
turn it into single-voxel grain: on the 450-step demo, roughness 0.086 against 0.066 in held-out
phantoms and a fine-scale neighbour correlation of 0.18 against 0.43 (docs/training-recipe.md).
The model does not say how neighbouring deviations go together; the training volumes do.  Their
probability-integral-transform scores under p(x | z), with z drawn from the posterior, correlate
0.27 / 0.44 / 0.39 between face neighbours along the three axes on that model; drawn so, its
samples read 0.073 and 0.39.

A draw here keeps each voxel's distribution exactly p(x_i | z): the logistic's uniform is Φ(g),
where g, instead of independent N(0, 1) per voxel, is a standard normal field whose face-neighbour
correlation along each axis is the one measured (``correlations``), made by filtering white noise
with a unit-energy Gaussian kernel per axis.  The field is computed in float32 outside autocast: in
bfloat16, Φ(g) rounds to 1 in the tails and a voxel becomes +inf.

Hand-written rather than MONAI's GaussianSmooth: the kernel must have unit energy (so the field has
unit variance) and the convolution runs over a padded field ("valid"), so that every voxel, the
edges included, has the same variance; it is three conv3d calls.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence, TypedDict

import torch
import torch.nn.functional as F

MAX_CORRELATION = 0.95  # a measured correlation is capped here: the kernel grows without bound towards 1


class VoxelNoiseRecord(TypedDict, total=False):
    """The checkpoint's ``voxel_noise`` metadata."""

    correlations: list[float]
    num_volumes: int
    what: str


def _kernel(sigma: float) -> torch.Tensor:
    """1-D Gaussian kernel of standard deviation ``sigma`` voxels, unit energy (sum of squares 1), float64."""
    radius = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.norm()


def neighbour_correlation(sigma: float) -> float:
    """Correlation between face neighbours, along the kernel's axis, of white noise filtered by
    :func:`_kernel` (``sigma``): its autocorrelation at lag 1."""
    if sigma <= 0.0:
        return 0.0
    k = _kernel(sigma)
    return float((k[:-1] * k[1:]).sum())


@functools.lru_cache(maxsize=64)
def kernel_sigma(correlation: float) -> float:
    """The kernel width (voxels) whose filtered white noise has ``correlation`` between face
    neighbours (0 for none), by bisection: the correlation rises monotonically with the width."""
    correlation = min(float(correlation), MAX_CORRELATION)
    if correlation <= 0.0:
        return 0.0
    low, high = 0.05, 16.0
    for _ in range(60):
        middle = 0.5 * (low + high)
        if neighbour_correlation(middle) < correlation:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


@dataclass(frozen=True)
class VoxelNoise:
    correlations: tuple[float, float, float]  # face-neighbour correlation of g along depth, height, width

    def __post_init__(self) -> None:
        if len(self.correlations) != 3 or not all(math.isfinite(c) and -1.0 < c < 1.0 for c in self.correlations):
            raise ValueError(f"voxel-noise correlations must be three numbers in (-1, 1), got {self.correlations}")

    @property
    def sigmas(self) -> tuple[float, ...]:
        return tuple(kernel_sigma(c) for c in self.correlations)

    def scores(self, shape: Sequence[int], generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
        """A standard normal field of ``shape`` (B, 1, D, H, W), float32, each voxel N(0, 1), with
        the face-neighbour correlations :attr:`correlations`."""
        kernels = [_kernel(s).float().to(device) if s > 0 else torch.ones(1, device=device) for s in self.sigmas]
        pads = [(len(k) - 1) // 2 for k in kernels]
        batch, channels, *size = shape
        with torch.autocast(torch.device(device).type, enabled=False):
            field = torch.randn((batch, channels, *[n + 2 * p for n, p in zip(size, pads)]), generator=generator,
                                dtype=torch.float32, device=device)
            for axis, k in enumerate(kernels):
                view = [1, 1, 1, 1, 1]
                view[2 + axis] = len(k)
                field = F.conv3d(field, k.view(view))
        return field

    def record(self, num_volumes: int) -> VoxelNoiseRecord:
        return {"correlations": [round(float(c), 4) for c in self.correlations], "num_volumes": int(num_volumes),
                "what": "face-neighbour correlation (depth, height, width) of the training volumes' normal scores "
                        "under p(x | z), z from the posterior; drawn voxels follow it (model/voxel_noise.py)"}

    @classmethod
    def from_record(cls, record: VoxelNoiseRecord) -> "VoxelNoise":
        values = record["correlations"]
        return cls(tuple(float(v) for v in values))  # type: ignore[arg-type]

    def text(self) -> str:
        """"0.29 / 0.41 / 0.38": the correlations, for notices and reports."""
        return " / ".join(f"{c:.2f}" for c in self.correlations)


def draw_voxels(likelihood: torch.nn.Module, params: torch.Tensor, generator: torch.Generator | None,
                noise: VoxelNoise | None) -> torch.Tensor:
    """A draw from ``likelihood`` (model/likelihood.py) with parameter maps ``params`` (B, P, D, H, W),
    in [-1, 1]: its voxels correlated as ``noise`` says, or each on its own without it."""
    scores = None if noise is None else noise.scores((params.shape[0], 1, *params.shape[2:]), generator,
                                                     params.device)
    return likelihood.sample(params, generator, scores)
