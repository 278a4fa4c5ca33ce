"""A trained model ready to use: the layer that sampling, reconstruction, encoding, evaluation and
training's final samples all stand on.

:func:`open_trained` loads a checkpoint file (or a run folder's newest) onto a device and wraps it
as a :class:`TrainedModel` with the facts needed to feed it (the preprocessing settings it was
trained with) and to write its outputs (voxel size, intensity reference).  It also holds the
small conversions every user of a model shares: model intensities back to the data's scale, and
the per-volume ELBO terms in nats per voxel.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import numpy as np
import torch

from . import checkpoint as ckpt
from .device import resolve_device
from .errors import CheckpointError, UserError
from .model import VeryDeepVAE
from .model.fitted_prior import FittedPrior
from .model.voxel_noise import VoxelNoise

if TYPE_CHECKING:
    from .data.nifti_load import IntensityReference


class ModelRecord(TypedDict):
    """Which model made an output (in each output's JSON record)."""

    checkpoint: str
    step: int
    weights: str  # "ema" or "raw"


class IntensityRecord(TypedDict, total=False):
    """How an output's intensities relate to the data (:func:`intensity_record`)."""

    scale: str  # "model" or "data"
    note: str
    low: float
    high: float
    mapping: str

BACKGROUND_LEVEL = 0.5 / 255.0  # model intensities below this are background (the lowest of 256 bins)
LN2 = math.log(2.0)


def load_model(checkpoint: ckpt.Checkpoint, use_ema: bool = True,
               device: str | torch.device = "cpu") -> VeryDeepVAE:
    """Rebuild the model from the checkpoint's own config and load its (EMA) weights."""
    if checkpoint.unverified_notice():
        print(f"verydeepvae: notice: {checkpoint.unverified_notice()}", file=sys.stderr)
    config = checkpoint.config
    schema = covariate_schema(checkpoint)
    model = VeryDeepVAE(config, schema.dim if schema is not None else 0)
    if schema is not None and schema.bank:  # sample() without covariates draws the training scans'
        model.set_covariate_bank(torch.from_numpy(schema.encode(schema.bank_rows())))
    model.inference_precision = config.precision  # generation in the arithmetic it was trained in
    state = checkpoint.state("ema" if use_ema else "model")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} does not match its own architecture "
            f"(missing {len(missing)} tensors, unexpected {len(unexpected)})"
        )
    prior = checkpoint.meta.get("fitted_prior") or {}
    if use_ema and prior.get("used"):  # fitted for the EMA weights, which sample (model/fitted_prior.py)
        try:
            model.fitted_prior = FittedPrior.from_tensors(checkpoint.tensors, prior)
        except (KeyError, ValueError, TypeError) as error:
            raise CheckpointError(f"checkpoint {checkpoint.path} has a damaged fitted prior ({error})") from None
    noise = checkpoint.meta.get("voxel_noise")
    if use_ema and noise:  # measured for the EMA weights too (model/voxel_noise.py)
        try:
            model.voxel_noise = VoxelNoise.from_record(noise)
        except (KeyError, ValueError, TypeError) as error:
            raise CheckpointError(f"checkpoint {checkpoint.path} has a damaged voxel-noise record ({error})") from None
    model = model.to(device).eval()
    if model.fitted_prior is not None:
        model.fitted_prior = model.fitted_prior.to(device)
    return model


def covariate_schema(checkpoint: ckpt.Checkpoint):
    """The covariate schema of a conditional model's checkpoint (data/covariates.py), else None."""
    if not checkpoint.meta.get("covariates"):
        return None
    from .data.covariates import CovariateSchema

    return CovariateSchema.from_json(checkpoint.meta["covariates"], where=f"checkpoint {checkpoint.path}")


@dataclass
class TrainedModel:
    """A model loaded from a checkpoint, with the facts needed to feed it and to write its outputs."""

    model: VeryDeepVAE
    checkpoint: ckpt.Checkpoint
    weights: str  # "ema" or "raw"
    device: str

    @property
    def config(self):
        return self.checkpoint.config

    @property
    def resolution(self) -> int:
        return self.model.resolution

    @property
    def preprocess_settings(self):
        from .data.nifti_load import PreprocessSettings

        return PreprocessSettings.from_config(self.config)

    @property
    def data_meta(self) -> ckpt.RunData:
        return dict(self.checkpoint.meta.get("data", {}) or {})

    @property
    def voxel_size_mm(self) -> float:
        """The model grid's voxel size: the median over the training volumes."""
        return float(self.data_meta.get("voxel_size_mm", 1.0))

    @property
    def covariates(self):
        """The covariate schema of a conditional model (data/covariates.py), None if unconditional."""
        return covariate_schema(self.checkpoint)

    @property
    def intensity_reference(self) -> IntensityReference:
        return dict(self.data_meta.get("intensity_reference", {}) or {})

    @property
    def run_dir(self) -> Path:
        return run_folder(self.checkpoint.path)

    def record(self) -> ModelRecord:
        return {"checkpoint": str(self.checkpoint.path), "step": self.checkpoint.step, "weights": self.weights}


def run_folder(checkpoint_path: str | Path) -> Path:
    """The training output folder of a checkpoint (``<run>/checkpoints/step_X.safetensors`` -> ``<run>``)."""
    parent = Path(checkpoint_path).resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def open_trained(path: str | Path, use_ema: bool = True, device: str | None = "auto") -> TrainedModel:
    """Load a checkpoint file (or a run folder's newest checkpoint) for inference."""
    device = str(resolve_device(device))  # "cuda:1" stays "cuda:1"; "cuda" -> "cuda:0"
    checkpoint = ckpt.resolve_checkpoint(path)
    model = load_model(checkpoint, use_ema=use_ema, device=device)
    return TrainedModel(model=model, checkpoint=checkpoint, weights="ema" if use_ema else "raw", device=device)


def prior_level(model: VeryDeepVAE, resolution: int | None) -> int | None:
    """The decoder level m such that latents at resolutions finer than ``resolution`` (levels < m)
    come from the prior; None keeps every posterior latent."""
    if resolution is None:
        return None
    resolutions = [model.resolution >> level for level in range(model.decoder.num_levels)]
    if resolution not in resolutions:
        raise UserError(f"--prior-above must be one of the model's resolutions {resolutions}, got {resolution}")
    return resolutions.index(resolution)


def to_data_intensity(volume: np.ndarray, low: float, high: float) -> np.ndarray:
    """Model intensities in [0, 1] -> ``low + v * (high - low)``; background (v < 0.5/255) -> 0."""
    v = np.asarray(volume, dtype=np.float32)
    out = np.float32(low) + v * np.float32(high - low)
    out[v < BACKGROUND_LEVEL] = 0.0
    return out


def reference_range(reference: IntensityReference, source: str) -> tuple[float, float]:
    """(low, high) of a checkpoint's intensity reference, or a UserError naming what is missing."""
    low, high = reference.get("low"), reference.get("high")
    if low is None or high is None:
        where = f"checkpoint {source}" if source else "the checkpoint"
        raise UserError(f"{where} records no intensity reference (low/high); use --intensity model")
    return float(low), float(high)


def intensity_record(low_high: tuple[float, float] | None, what: str) -> IntensityRecord:
    """How an output's intensities relate to the data (for its JSON record): the model range, or
    the data's scale through ``low``/``high`` (``what`` says where they came from)."""
    if low_high is None:
        return {"scale": "model", "note": "model intensities in [0, 1]"}
    return {"scale": "data", "low": low_high[0], "high": low_high[1],
            "mapping": f"low + v * (high - low), background (v < 0.5/255) -> 0; low/high: {what}"}


@contextlib.contextmanager
def seeded(seed: int, device: str | torch.device):
    """Run a block with the global RNG seeded (for model calls without a generator argument),
    restoring the caller's RNG state afterwards."""
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


@torch.no_grad()
def elbo_terms(model: VeryDeepVAE, x01: torch.Tensor, seed: int = 0,
               covariates: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Per-volume negative ELBO, reconstruction term and per-layer KL, in nats per voxel
    (one posterior sample per volume, drawn reproducibly from ``seed``; ``covariates``: those of
    the volumes, for a conditional model)."""
    with seeded(seed, x01.device), model.inference_autocast(x01.device):
        out = model(x01, covariates=covariates)
    return {"elbo": out.elbo.double().cpu().numpy(), "nll": out.nll.double().cpu().numpy(),
            "kl_per_layer": out.kl_per_layer.double().cpu().numpy()}
