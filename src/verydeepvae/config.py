"""The one typed configuration that travels through the whole program.

It is built once at the edge (preset JSON/YAML file -> user file -> ``--set key=value``), validated
once, and then trusted everywhere else.  Both generations of the original project's key names are
accepted (see ``LEGACY_RENAMES``); keys the original accepted but that have no meaning here are
reported, never silently swallowed.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

from .config_check import LAYER_LISTS  # noqa: F401 (importable from here, as checkpoint.py does)
from .config_check import (at_least, between, check_conditioning, check_fields, check_kl_warmup, check_layers,
                           check_performance, check_type, greater_than, one_of)
from .config_names import LEGACY_IGNORED, LEGACY_RENAMES, legacy_value
from .config_text import load_yaml, parse_override, read_config_file  # noqa: F401 (importable from here)
from .config_text import short_repr as _short
from .device import check_device_name
from .errors import ConfigError
from .json_types import JSONObject

LIKELIHOODS = ("discretised_logistic", "gaussian")
SAMPLE_VOXELS = ("mean", "draw")
# what sampling commands accept (--voxels): the run's own setting, either of those, or drawn with each
# voxel on its own, ignoring the neighbour correlation measured at the end of training (sampling.py)
VOXEL_CHOICES = ("auto", *SAMPLE_VOXELS, "independent")
PRECISIONS = ("fp32", "bf16", "fp16", "auto", "half")
OPTIMISERS = ("adamax", "adamw")
SCHEDULES = ("cosine", "constant")
DOWNSAMPLING = ("avgpool", "nearest", "conv")
MAX_RESOLUTION = 1024
MAX_SEED = 2**32 - 1  # NumPy's limit
PROBABILITY = between(0, 1, wording="a probability between 0 and 1")


@dataclass
class Config:
    """Every setting of a run.  List-valued layer definitions run from the full resolution
    (index 0) to the coarsest level, as in the original project."""

    # --- model: layer definitions (one entry per resolution level, highest first) -------------
    resolution: int = 32
    channels: list[int] = field(default_factory=lambda: [20, 40, 60, 80, 100, 120])
    channels_hidden: Optional[list[int]] = None  # None: same as channels
    channels_top_down: Optional[list[int]] = None  # None: same as channels
    channels_hidden_top_down: Optional[list[int]] = None  # None: same as channels_top_down
    channels_per_latent: list[int] = field(default_factory=lambda: [20, 20, 20, 20, 20, 200])
    latent_feature_maps_per_resolution: list[int] = field(default_factory=lambda: [2, 5, 4, 3, 2, 1])
    kernel_sizes_bottom_up: list[int] = field(default_factory=lambda: [3, 3, 3, 3, 2, 1])
    kernel_sizes_top_down: list[int] = field(default_factory=lambda: [3, 3, 3, 3, 2, 1])
    bottleneck_resnet_encoder: bool = True
    only_use_one_conv_block_at_top: bool = False
    downsampling: str = field(default="avgpool", metadata=one_of(DOWNSAMPLING))
    # a learned per-voxel bias of the decoder state at every level up to this resolution (VDVAE's
    # bias_xs; 0: only the learned constant at the top, as in checkpoints written before it existed)
    bias_max_resolution: int = field(default=32, metadata=at_least(0))
    likelihood: str = field(default="discretised_logistic", metadata=one_of(LIKELIHOODS))
    num_bins: int = field(default=256, metadata=at_least(2))
    # components of the discretised logistic (VDVAE's mixture; 1: one logistic, as before)
    likelihood_mixtures: int = field(default=1, metadata=between(1, 32))
    # what a sample's voxels are by default: the mean of p(x | z) (smooth) or a draw from it (the
    # model's texture, and thin CSF that the mean blurs away; docs/training-recipe.md)
    sample_voxels: str = field(default="mean", metadata=one_of(SAMPLE_VOXELS))
    # soft ceiling on the discretised logistic's per-voxel scale, in [-1, 1] intensity units (0: none)
    output_scale_max: float = field(default=0.0, metadata=at_least(0))

    # --- optimisation -----------------------------------------------------------------------------
    batch_size: int = field(default=8, metadata=at_least(1))
    max_steps: Optional[int] = field(default=None, metadata=at_least(1))  # None: derived from total_epochs
    total_epochs: Optional[int] = field(default=None, metadata=at_least(1))
    optimiser: str = field(default="adamax", metadata=one_of(OPTIMISERS))
    learning_rate: float = field(default=1e-3, metadata=greater_than(0))
    weight_decay: float = field(default=0.0, metadata=at_least(0))
    l2_reg_coeff: float = field(default=0.0, metadata=at_least(0))
    warmup_steps: int = field(default=100, metadata=at_least(0))
    lr_schedule: str = field(default="cosine", metadata=one_of(SCHEDULES))
    lr_min_ratio: float = field(default=0.1, metadata=between(0, 1))
    grad_clip: float = field(default=200.0, metadata=greater_than(0))
    skip_factor: float = field(default=10.0, metadata=greater_than(0))
    skip_window: int = field(default=100, metadata=at_least(1))
    skip_warmup_steps: int = field(default=50, metadata=at_least(0))
    # absolute cap on the gradient norm, off by default
    skip_threshold: Optional[float] = field(default=None, metadata=greater_than(0))
    max_consecutive_skips: int = field(default=100, metadata=at_least(1))
    # the EMA's rate is min(ema_rate, (1 + n) / (10 + n)) after n updates (train/optim.py): 0.999 takes
    # effect only after 8,990 updates
    ema_rate: float = field(default=0.999, metadata=between(0, 1))
    kl_warmup_steps: int = field(default=0, metadata=at_least(0))
    # the resolutions (voxels per side) whose latent layers the KL warm-up applies to (None: all);
    # [32] in the demo: the 32³ layer, otherwise never used, learns to carry detail while its KL is
    # cheap and keeps it afterwards (docs/training-recipe.md)
    kl_warmup_resolutions: Optional[list[int]] = None
    kl_balance: bool = False  # NVAE-style per-layer KL balancing while the KL warm-up runs
    # nats of KL per latent layer and volume exempt from the loss (free bits)
    kl_free_bits: float = field(default=0.0, metadata=at_least(0))
    # and nats per latent dimension and volume on top of that: an allowance that grows with a layer's
    # size, so the large 32³ layer is not switched off early (docs/training-recipe.md)
    kl_free_bits_per_latent: float = field(default=0.0, metadata=at_least(0))
    # the resolutions whose latent layers get that per-dimension allowance (None: every layer); [32]
    # keeps the finest layer in play without changing how the coarser layers divide their work
    kl_free_bits_per_latent_resolutions: Optional[list[int]] = None
    # the steps that allowance lasts (0: the whole run): it is needed while a layer would be switched
    # off, early on; kept for the whole run it makes the samples more alike (docs/training-recipe.md)
    kl_free_bits_per_latent_steps: int = field(default=0, metadata=at_least(0))
    # at this step (0: never), a run whose finest latent layers carried at most
    # finest_layer_restart_kl bits/voxel of KL over the 50 steps before starts again from step 0 with
    # kl_free_bits_per_latent=0.001 at every layer, its first attempt set aside: such a layer never
    # came back in the hour-long phantom runs, and that allowance from the start kept it
    # (train/finest_layer.py; 500 in the demo preset)
    finest_layer_restart_step: int = field(default=0, metadata=at_least(0))
    finest_layer_restart_kl: float = field(default=0.0005, metadata=at_least(0))
    # fit a Gaussian prior for the coarsest latents (1³-4³, or 1³-2³ where 1³-4³ is too large) to the
    # training volumes at the end of training, used for sampling when its samples match the
    # training volumes better (train/fit_prior.py)
    fitted_prior: bool = True
    # with it, this many leading components of the layers below it (8³ to 32³ in the demo), which carry
    # global factors such as brain size that the learned prior averages away (model/leading_components.py;
    # 0: none)
    fitted_prior_components: int = field(default=8, metadata=at_least(0))
    # measure, at the end of training, how the training volumes' deviations from p(x | z) correlate
    # between neighbouring voxels, so that drawn voxels follow it instead of being independent grain
    # (model/voxel_noise.py; sampling's --voxels independent draws them as before)
    fit_voxel_noise: bool = True
    # fp32, bf16, fp16 (CUDA), auto (bf16 where native, fp16 on CUDA 7.x, else fp32) or half (what the
    # original's half_precision: true becomes: fp16 on CUDA, bf16 elsewhere; train/precision.py)
    precision: str = field(default="auto", metadata=one_of(PRECISIONS))
    grad_accumulation: int = field(default=1, metadata=at_least(1))
    seed: Optional[int] = field(default=0, metadata=between(0, MAX_SEED, null=" (or null for a random one)"))

    # --- schedule of side work (in optimiser steps; *_epochs variants override when set) --------
    log_every: int = field(default=10, metadata=at_least(1))
    validation_every: int = field(default=200, metadata=at_least(1))
    checkpoint_every: int = field(default=500, metadata=at_least(1))
    figures_every: int = field(default=500, metadata=at_least(1))
    validation_period_epochs: Optional[int] = field(default=None, metadata=at_least(1))
    checkpoint_period_epochs: Optional[int] = field(default=None, metadata=at_least(1))
    figures_period_epochs: Optional[int] = field(default=None, metadata=at_least(1))
    # newest K kept (plus the best); 0 keeps every checkpoint
    keep_checkpoints: int = field(default=3, metadata=at_least(0))
    subjects_to_plot: int = field(default=4, metadata=at_least(0))
    max_validation_batches: Optional[int] = field(default=None, metadata=at_least(1))
    # at each validation (rank 0): active latent units per level and the Fréchet ratio of this many
    # prior samples against as many real volumes (quality/* in TensorBoard and metrics.jsonl; a
    # cheap trend, `verydeepvae evaluate` is the full check; train/quality.py); 0 turns it off (e.g.
    # at 128³, where drawing the samples is costly); below 4 only the active units are logged
    quality_samples: int = field(default=8, metadata=at_least(0))

    # --- data ----------------------------------------------------------------------------------
    data_path: Optional[str] = None  # folder or file list; None: the built-in phantom population
    nifti_filename_pattern: Optional[str] = None  # None: *.nii and *.nii.gz
    max_niis_to_use: Optional[int] = field(default=None, metadata=at_least(1))
    train_fraction: float = field(default=0.95, metadata=greater_than(0, high=1, wording="in (0, 1]"))
    clamp_percentiles: list[float] = field(default_factory=lambda: [0.05, 99.95])
    # None: the upper clamp percentile maps to 1 (the original's scaling). A number P: this
    # percentile of each scan's foreground maps to 0.5 instead and what lies above 1 is clipped, so
    # bright lesions (FLAIR) no longer darken the rest of the brain; e.g. 90 (docs/conditional.md)
    intensity_anchor_percentile: Optional[float] = field(default=None, metadata=between(1, 99.9))
    crop_to_foreground: bool = True
    cache_dir: Optional[str] = None  # None: <output_dir>/cache
    num_workers: int = field(default=1, metadata=at_least(0))
    skip_bad_files: bool = False
    phantom_num: int = field(default=200, metadata=at_least(0))
    augment: bool = True
    aug_prob_affine: float = field(default=0.2, metadata=PROBABILITY)
    aug_prob_elastic: float = field(default=0.0, metadata=PROBABILITY)
    aug_prob_bias_field: float = field(default=0.1, metadata=PROBABILITY)
    aug_prob_gamma: float = field(default=0.1, metadata=PROBABILITY)
    aug_prob_anisotropy: float = field(default=0.1, metadata=PROBABILITY)
    aug_prob_haircut: float = field(default=0.1, metadata=PROBABILITY)
    visualise_training_pipeline_before_starting: bool = False

    # --- conditioning (docs/conditional.md) -------------------------------------------------------
    # covariates the model is conditioned on, in this order ("age", "sex:categorical", ...); None:
    # an unconditional model.  Their values come from covariates_file (TSV/CSV, one row per scan;
    # data/covariate_table.py), or, without data_path, from the phantom population's participants.tsv
    condition_on: Optional[list[str]] = None
    covariates_file: Optional[str] = None

    # --- where and how to run -------------------------------------------------------------------
    output_dir: str = "runs/default"
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps (device.py)
    CUDA_devices: Optional[list[str]] = None
    threads_per_rank: Optional[int] = field(default=None, metadata=at_least(1))
    resume: bool = False
    overwrite: bool = False  # a fresh run into a folder holding another run moves that run aside
    restore_optimiser: bool = True

    # --- performance (speed/memory modes; none changes the model's maths) -----------------------
    # activation checkpointing: "auto" (training picks the least recomputation whose estimated
    # peak fits the device's memory, train/memory_plan.py), "none", "all", or resolution level
    # indices (0 = full resolution)
    checkpoint_levels: list[int] | str = "auto"
    # channels-last-3D memory format for activations and weights: true, false or "auto" (on where
    # bench/train_step.py measured it to pay: CPUs; train/precision.py resolve_memory_format)
    channels_last: bool | str = "auto"
    compile: bool = False  # torch.compile the model for training
    # deterministic GPU algorithms (cuDNN/cuBLAS; slower) and a fixed CPU thread count (no thread
    # governor, train/threads.py), so a resumed run repeats an uninterrupted one bitwise
    # (train/precision.py configure_backends)
    deterministic: bool = False

    # ------------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.channels)

    def level_resolutions(self) -> list[int]:
        return [self.resolution >> i for i in range(self.num_levels)]

    @property
    def hidden_channels(self) -> list[int]:
        """``channels_hidden`` with its default (``channels``) filled in."""
        return list(self.channels if self.channels_hidden is None else self.channels_hidden)

    @property
    def top_down_channels(self) -> list[int]:
        """``channels_top_down`` with its default (``channels``) filled in."""
        return list(self.channels if self.channels_top_down is None else self.channels_top_down)

    @property
    def hidden_top_down_channels(self) -> list[int]:
        """``channels_hidden_top_down`` with its default (``channels_top_down``, filled in) filled in."""
        value = self.channels_hidden_top_down
        return list(self.top_down_channels if value is None else value)

    def checkpointed_levels(self) -> list[int]:
        """The resolution levels whose blocks recompute their activations in the backward pass.

        ``auto`` is resolved into a list by training, before the model is built
        (``train/memory_plan.py``); anywhere else (inference, a model built directly) it means no
        checkpointing, which only matters where gradients are recorded."""
        if self.checkpoint_levels in ("none", "auto"):
            return []
        if self.checkpoint_levels == "all":
            return list(range(self.num_levels))
        return sorted(set(self.checkpoint_levels))

    @property
    def model(self) -> ModelConfig:
        """The architecture alone, as ``model/`` takes it."""
        return ModelConfig(
            resolution=self.resolution, channels=tuple(self.channels), channels_hidden=tuple(self.hidden_channels),
            channels_top_down=tuple(self.top_down_channels),
            channels_hidden_top_down=tuple(self.hidden_top_down_channels),
            channels_per_latent=tuple(self.channels_per_latent),
            latent_feature_maps_per_resolution=tuple(self.latent_feature_maps_per_resolution),
            kernel_sizes_bottom_up=tuple(self.kernel_sizes_bottom_up),
            kernel_sizes_top_down=tuple(self.kernel_sizes_top_down),
            bottleneck_resnet_encoder=self.bottleneck_resnet_encoder,
            only_use_one_conv_block_at_top=self.only_use_one_conv_block_at_top, downsampling=self.downsampling,
            bias_max_resolution=self.bias_max_resolution, likelihood=self.likelihood, num_bins=self.num_bins,
            likelihood_mixtures=self.likelihood_mixtures, sample_voxels=self.sample_voxels,
            output_scale_max=self.output_scale_max,
            checkpointed_levels=tuple(self.checkpointed_levels()), channels_last=self.channels_last is True)

    def to_dict(self) -> JSONObject:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass(frozen=True)
class ModelConfig:
    """What ``model/`` needs to build the network and nothing of files or training (as nanoGPT's
    ``GPTConfig``); made by :attr:`Config.model`.  Per-level tuples run from the full resolution
    (index 0) to the coarsest, with every channel default already filled in; widths are channels,
    kernel sizes voxels, ``bias_max_resolution`` and ``resolution`` voxels per side."""

    resolution: int
    channels: tuple[int, ...]
    channels_hidden: tuple[int, ...]
    channels_top_down: tuple[int, ...]
    channels_hidden_top_down: tuple[int, ...]
    channels_per_latent: tuple[int, ...]
    latent_feature_maps_per_resolution: tuple[int, ...]
    kernel_sizes_bottom_up: tuple[int, ...]
    kernel_sizes_top_down: tuple[int, ...]
    bottleneck_resnet_encoder: bool = True
    only_use_one_conv_block_at_top: bool = False
    downsampling: str = "avgpool"
    bias_max_resolution: int = 32
    likelihood: str = "discretised_logistic"
    num_bins: int = 256
    likelihood_mixtures: int = 1
    sample_voxels: str = "mean"
    output_scale_max: float = 0.0
    checkpointed_levels: tuple[int, ...] = ()  # levels whose activations are recomputed in the backward pass
    channels_last: bool = False

    @property
    def num_levels(self) -> int:
        return len(self.channels)

    def level_resolutions(self) -> list[int]:
        return [self.resolution >> i for i in range(self.num_levels)]

    def encoder_blocks_per_level(self) -> list[int]:
        """Residual blocks of the encoder at each level: two, one at the top with
        ``only_use_one_conv_block_at_top``."""
        return [2] * (self.num_levels - 1) + [1 if self.only_use_one_conv_block_at_top else 2]


# Architecture keys added after checkpoints were first written, with the value that rebuilds the
# model such a checkpoint holds (Checkpoint.config fills them in when they are missing).
ARCHITECTURE_BEFORE_KEY = {"bias_max_resolution": 0}

PRESETS = ("32", "64", "128", "demo", "tiny")


def read_preset(name: str) -> JSONObject:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    text = resources.files("verydeepvae.presets").joinpath(f"{name}.json").read_text()
    return json.loads(text)


def build_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: JSONObject | None = None,
    notices: list[str] | None = None,
    file_values: JSONObject | None = None,
) -> Config:
    """Merge preset -> file -> overrides, translate legacy names, validate, return a Config.

    ``notices`` collects one-line messages about legacy keys that were accepted but ignored.
    ``file_values``: the configuration ``config_file`` holds, when the caller has read it already
    (a run record or a checkpoint holds one among other things: train/run_record.py).
    """
    merged: JSONObject = {}
    if preset is not None:
        merged.update(normalise_keys(read_preset(preset), notices, source=f"preset {preset}"))
    if config_file is not None or file_values is not None:
        values = read_config_file(config_file) if file_values is None else file_values
        merged.update(normalise_keys(values, notices, source=str(config_file or "configuration")))
    if overrides:
        merged.update(normalise_keys(overrides, notices, source="command line"))
    return config_from_dict(merged)


def normalise_keys(
    raw: JSONObject, notices: list[str] | None = None, source: str = "configuration"
) -> JSONObject:
    """Translate legacy names and values to ours; reject unknown keys naming the closest match."""
    known = {f.name for f in dataclasses.fields(Config)}
    out: JSONObject = {}
    for key, value in raw.items():
        if key in LEGACY_IGNORED:
            if notices is not None:
                notices.append(f"{source}: key {key!r} is accepted but ignored: {LEGACY_IGNORED[key]}")
            continue
        if key in LEGACY_RENAMES:
            new_key = LEGACY_RENAMES[key]
            out[new_key] = legacy_value(key, value)
            continue
        if key not in known:
            raise ConfigError(f"unknown configuration key {key!r} (in {source}){_suggest(key, known)}")
        out[key] = value
    return out


def _suggest(key: str, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(known | set(LEGACY_RENAMES)), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def config_from_dict(values: JSONObject) -> Config:
    """Type-check every value, then check the layer definitions hang together."""
    hints = typing.get_type_hints(Config)
    unknown = [key for key in values if key not in hints]
    if unknown:
        raise ConfigError(f"unknown configuration key {_short(unknown[0])}{_suggest(str(unknown[0]), set(hints))}")
    if isinstance(values.get("condition_on"), str):  # one name (--set condition_on=age), or "age,sex" in a file
        values = {**values, "condition_on": [v.strip() for v in values["condition_on"].split(",")]}
    checked = {key: check_type(key, value, hints[key]) for key, value in values.items()}
    config = Config(**checked)
    validate(config)
    return config


def validate(c: Config) -> None:
    """Every field's declared bounds and kinds (``config_check.py``), then the checks that need
    more than one value; each message names the key."""
    if c.resolution < 2 or c.resolution > MAX_RESOLUTION or c.resolution & (c.resolution - 1):
        raise ConfigError(f"resolution must be a power of two between 2 and {MAX_RESOLUTION} (e.g. 32, 64, 128), "
                          f"got {c.resolution}")
    check_layers(c)
    check_fields(c)
    try:
        check_device_name(c.device)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    lo_hi = c.clamp_percentiles
    if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] < lo_hi[1] <= 100.0:
        raise ConfigError(f"clamp_percentiles must be [low, high] with 0 <= low < high <= 100, got {lo_hi}")
    if c.precision == "fp16" and c.device in ("cpu", "mps"):
        raise ConfigError(f"precision fp16 needs a CUDA device; use bf16 on the {c.device.upper()}")
    check_performance(c)
    check_conditioning(c)
    check_kl_warmup(c)
    if c.likelihood_mixtures > 1 and c.likelihood != "discretised_logistic":
        raise ConfigError(f"likelihood_mixtures applies to the discretised_logistic likelihood; set it to 1 "
                          f"with likelihood {c.likelihood}")
    if c.CUDA_devices is not None:
        for d in c.CUDA_devices:
            if not d.isdigit():
                raise ConfigError(f"CUDA_devices must be device indices such as ['0', '1'], got {c.CUDA_devices}")
