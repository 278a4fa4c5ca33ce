"""Training-time augmentation: mild, each transform with its own probability, output in [0, 1].

The generative model learns to reproduce whatever it is shown, so by default there are no
scanner-artefact transforms (no ghosting, spikes, motion or noise; the original applied them).
What remains is geometry and contrast variation that real scans have anyway:

* ``aug_prob_affine`` - MONAI RandAffine: rotation ±5°, shear ±0.03, scale ±5%, translation ±2%
  of the side, background padding (preprocessing leaves a 6% margin for this).
* ``aug_prob_elastic`` - MONAI RandDeformGrid + Resample (the construction of MONAI's
  Rand2DElastic, in 3D): random offsets of control points every R/8 voxels, interpolated; mean
  displacement ~R/100 voxels per axis (1.3 voxels at 128³).
* ``aug_prob_anisotropy`` - from the original: one random axis is downsampled by a factor
  U(0.8, 0.95) and resized back (thicker slices).
* ``aug_prob_haircut`` - from the original: the first and last 1-2 slices along one random axis
  are set to background.
* ``aug_prob_bias_field`` - MONAI RandBiasField, a smooth multiplicative field (degree 3,
  coefficients up to 0.02) rescaled to mean 1: intensities times about 0.9-1.25.
* ``aug_prob_gamma`` - MONAI RandAdjustContrast, gamma in [0.8, 1.25].

They run in that order (geometry first, then intensity); values are clipped to [0, 1].

Randomness: every call takes a ``numpy.random.Generator``; :func:`sample_generator` derives it from
``torch.initial_seed()`` of the current process (different in each DataLoader worker, each epoch
and, when the trainer seeds torch per rank, each rank), the sample index and a per-process counter.
Runs seeded the same way see the same augmentations.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROTATE_RAD = math.radians(5.0)
SHEAR = 0.03
SCALE = 0.05
TRANSLATE_FRACTION = 0.02
ANISOTROPY_FACTOR = (0.8, 0.95)
HAIRCUT_SLICES = (1, 2)
BIAS_COEFF = (0.0, 0.02)  # field normalised to mean 1: multiplies intensities by ~0.9-1.25
GAMMA = (0.8, 1.25)


@dataclass(frozen=True)
class AugmentSettings:
    affine: float = 0.2
    elastic: float = 0.0
    bias_field: float = 0.1
    gamma: float = 0.1
    anisotropy: float = 0.1
    haircut: float = 0.1

    @classmethod
    def from_config(cls, cfg: Any) -> "AugmentSettings":
        return cls(
            affine=cfg.aug_prob_affine,
            elastic=cfg.aug_prob_elastic,
            bias_field=cfg.aug_prob_bias_field,
            gamma=cfg.aug_prob_gamma,
            anisotropy=cfg.aug_prob_anisotropy,
            haircut=cfg.aug_prob_haircut,
        )

    def any(self) -> bool:
        return any(p > 0 for p in (self.affine, self.elastic, self.bias_field, self.gamma,
                                   self.anisotropy, self.haircut))


_counter = itertools.count()


def sample_generator(index: int, epoch_key: tuple[int, ...] | None = None) -> np.random.Generator:
    """A fresh generator for one sample.

    With ``epoch_key`` (the trainer's (seed, rank, epoch)) the stream depends only on that key and
    the sample index, so a resumed run augments exactly as the uninterrupted one would, whatever
    the worker layout.  Without it: (process seed, sample index, per-process call count).
    """
    if epoch_key is not None:
        return np.random.default_rng(np.random.SeedSequence([*map(int, epoch_key), int(index)]))
    seed = torch.initial_seed()
    return np.random.default_rng(np.random.SeedSequence([seed, int(index), next(_counter)]))


class Augmenter:
    """Callable on a (1, R, R, R) float tensor in [0, 1]; returns one of the same shape and range."""

    ORDER = ("affine", "elastic", "anisotropy", "haircut", "bias_field", "gamma")

    def __init__(self, settings: AugmentSettings, resolution: int):
        self.settings = settings
        self.resolution = int(resolution)
        self._monai: dict[str, Any] | None = None  # built lazily in each process

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_monai"] = None
        return state

    def _transforms(self) -> dict[str, Any]:
        if self._monai is None:
            from monai.transforms import RandAdjustContrast, RandAffine, RandBiasField, RandDeformGrid, Resample

            R = self.resolution
            common = dict(
                rotate_range=(ROTATE_RAD,) * 3,
                shear_range=(SHEAR,) * 6,
                translate_range=(TRANSLATE_FRACTION * R,) * 3,
                scale_range=(SCALE,) * 3,
                padding_mode="zeros",
                mode="bilinear",
            )
            # Elastic on a coarse control grid rather than MONAI's Rand3DElastic, whose dense
            # Gaussian smoothing of a full-size field costs ~11 s per 128^3 volume on one core;
            # this costs about as much as the affine.  Offsets ~ N(0, 1) * U(R/64, R/32) voxels
            # at the control points give a mean displacement of about R/100 voxels per axis
            # (measured 0.65 at 64^3, 1.3 at 128^3).
            self._monai = {
                "affine": RandAffine(prob=1.0, **common),
                "elastic": _CoarseElastic(RandDeformGrid, Resample, R),
                "bias_field": RandBiasField(degree=3, coeff_range=BIAS_COEFF, prob=1.0),
                "gamma": RandAdjustContrast(prob=1.0, gamma=GAMMA),
            }
        return self._monai

    def __call__(self, volume: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return self.apply(volume, rng)[0]

    def apply(self, volume: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
        """The augmented volume and the names of the transforms that fired."""
        probs = {name: getattr(self.settings, name) for name in self.ORDER}
        fire = {name: bool(rng.random() < p) for name, p in probs.items()}
        out = volume
        applied = []
        for name in self.ORDER:
            if not fire[name]:
                continue
            applied.append(name)
            if name in ("anisotropy", "haircut"):
                out = getattr(self, f"_{name}")(out, rng)
            else:
                transform = self._transforms()[name]
                transform.set_random_state(seed=int(rng.integers(2**32)))
                if name == "bias_field":  # the field itself, rescaled to mean 1
                    field = _plain(transform(torch.ones_like(out)))
                    out = (out * (field / field.mean())).clamp_(0.0, 1.0)
                else:
                    out = _plain(transform(out))
        out = _plain(out).to(torch.float32).clamp_(0.0, 1.0).contiguous()
        return out, applied

    @staticmethod
    def _anisotropy(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        axis = int(rng.integers(3))
        factor = float(rng.uniform(*ANISOTROPY_FACTOR))
        size = list(x.shape[1:])
        small = list(size)
        small[axis] = max(2, int(round(size[axis] * factor)))
        down = F.interpolate(x[None], size=small, mode="area")
        return F.interpolate(down, size=size, mode="trilinear", align_corners=False)[0]

    @staticmethod
    def _haircut(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        axis = int(rng.integers(3)) + 1  # skip the channel axis
        n = int(rng.integers(HAIRCUT_SLICES[0], HAIRCUT_SLICES[1] + 1))
        x = x.clone()
        x.narrow(axis, 0, n).zero_()
        x.narrow(axis, x.shape[axis] - n, n).zero_()
        return x


class _CoarseElastic:
    """Random control-point offsets (MONAI RandDeformGrid), upsampled, applied with MONAI Resample."""

    def __init__(self, deform_grid_cls: Any, resample_cls: Any, resolution: int):
        self.spacing = max(2, resolution // 8)
        self.deform = deform_grid_cls(spacing=(self.spacing,) * 3,
                                      magnitude_range=(resolution / 64.0, resolution / 32.0))
        self.resample = resample_cls(mode="bilinear", padding_mode="zeros")

    def set_random_state(self, seed: int) -> None:
        self.deform.set_random_state(seed=seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[1:])
        control = torch.as_tensor(self.deform(spatial_size=size))
        grid = F.interpolate(control[None], scale_factor=(self.spacing,) * 3, mode="trilinear",
                             align_corners=False, recompute_scale_factor=True)[0]
        starts = [(g - s) // 2 for g, s in zip(grid.shape[1:], size)]
        grid = grid[:, starts[0]:starts[0] + size[0], starts[1]:starts[1] + size[1], starts[2]:starts[2] + size[2]]
        return self.resample(x, grid)


def _plain(x: Any) -> torch.Tensor:
    """MONAI returns MetaTensors; the DataLoader should see plain tensors."""
    as_tensor = getattr(x, "as_tensor", None)
    return as_tensor() if callable(as_tensor) else torch.as_tensor(x)
