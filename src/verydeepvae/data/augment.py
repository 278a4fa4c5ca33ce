"""Training-time augmentation: mild, each transform with its own probability, output in [0, 1].

The generative model learns to reproduce whatever it is shown, so by default there are no
scanner-artefact transforms (no ghosting, spikes, motion or noise; the original applied them).
What remains is geometry and contrast variation that real scans have anyway:

=============  ====================  ================================================================
transform      probability key       what it does (defaults are deliberately mild)
=============  ====================  ================================================================
affine         ``aug_prob_affine``   MONAI RandAffine: rotation ±5°, shear ±0.03, scale ±5%,
                                     translation ±2% of the side; background padding
elastic        ``aug_prob_elastic``  MONAI Rand3DElastic: smooth deformation of about 1-2 voxels
                                     (slow at 128^3, off by default)
anisotropy     ``aug_prob_anisotropy``  (from the original) one random axis is downsampled by a
                                     factor U(0.8, 0.95) and resized back (thicker slices)
haircut        ``aug_prob_haircut``  (from the original) the first and last 1-2 slices along one
                                     random axis are set to background
bias field     ``aug_prob_bias_field``  MONAI RandBiasField, smooth multiplicative field (degree 3,
                                     coefficients up to 0.02, rescaled to mean 1: about x0.9-1.25)
gamma          ``aug_prob_gamma``    MONAI RandAdjustContrast, gamma in [0.8, 1.25]
=============  ====================  ================================================================

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


def sample_generator(index: int) -> np.random.Generator:
    """A fresh generator for one sample: (process seed, sample index, per-process call count)."""
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
            from monai.transforms import RandAdjustContrast, RandAffine, RandBiasField, Rand3DElastic

            R = self.resolution
            common = dict(
                rotate_range=(ROTATE_RAD,) * 3,
                shear_range=(SHEAR,) * 6,
                translate_range=(TRANSLATE_FRACTION * R,) * 3,
                scale_range=(SCALE,) * 3,
                padding_mode="zeros",
                mode="bilinear",
            )
            # Elastic: uniform displacement noise smoothed with sigma (voxels), times magnitude.
            # Smoothing shrinks the noise like sigma^-1.5, so magnitude grows like R^2.5; measured
            # mean displacements are ~0.6, 0.9 and 2 voxels at R = 32, 64, 128 (about 1.5-2.5 mm
            # on a typical brain crop).  Dense 3D smoothing: ~2 s per volume at 128^3 on a CPU.
            sigma = (R / 12.0, R / 8.0)
            magnitude = (0.0055 * R**2.5, 0.011 * R**2.5)
            self._monai = {
                "affine": RandAffine(prob=1.0, **common),
                "elastic": Rand3DElastic(sigma_range=sigma, magnitude_range=magnitude, prob=1.0,
                                         padding_mode="zeros", mode="bilinear"),
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


def _plain(x: Any) -> torch.Tensor:
    """MONAI returns MetaTensors; the DataLoader should see plain tensors."""
    as_tensor = getattr(x, "as_tensor", None)
    return as_tensor() if callable(as_tensor) else torch.as_tensor(x)
