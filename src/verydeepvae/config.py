"""The one typed configuration that travels through the whole program.

It is built once at the edge (preset JSON/YAML file -> user file -> ``--set key=value``), validated
once, and then trusted everywhere else.  Both generations of the original project's key names are
accepted (see ``LEGACY_RENAMES``); keys the original accepted but that have no meaning here are
reported, never silently swallowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from .device import check_device_name
from .errors import ConfigError

LIKELIHOODS = ("discretised_logistic", "gaussian")
PRECISIONS = ("fp32", "bf16", "fp16", "auto", "half")
OPTIMISERS = ("adamax", "adamw")
SCHEDULES = ("cosine", "constant")
DOWNSAMPLING = ("avgpool", "nearest", "conv")
MAX_KERNEL = 7


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
    downsampling: str = "avgpool"
    # a learned per-voxel bias of the decoder state at every level up to this resolution (VDVAE's
    # bias_xs; 0: only the learned constant at the top, as in checkpoints written before it existed)
    bias_max_resolution: int = 32
    likelihood: str = "discretised_logistic"
    num_bins: int = 256
    # soft ceiling on the discretised logistic's per-voxel scale, in [-1, 1] intensity units (0: none)
    output_scale_max: float = 0.0

    # --- optimisation -----------------------------------------------------------------------------
    batch_size: int = 8
    max_steps: Optional[int] = None  # None: derived from total_epochs
    total_epochs: Optional[int] = None
    optimiser: str = "adamax"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    l2_reg_coeff: float = 0.0
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    lr_min_ratio: float = 0.1
    grad_clip: float = 200.0
    skip_factor: float = 10.0
    skip_window: int = 100
    skip_warmup_steps: int = 50
    skip_threshold: Optional[float] = None  # absolute cap on the gradient norm, off by default
    max_consecutive_skips: int = 100
    ema_rate: float = 0.999
    kl_warmup_steps: int = 0
    kl_balance: bool = False  # NVAE-style per-layer KL balancing while the KL warm-up runs
    kl_free_bits: float = 0.0  # nats of KL per latent layer and volume exempt from the loss (free bits)
    # fit a Gaussian prior for the 1³ and 2³ latents to the training volumes at the end of training,
    # used for sampling when its samples match the training volumes better (train/fit_prior.py)
    fitted_prior: bool = True
    # fp32, bf16, fp16 (CUDA), auto (bf16 where native, fp16 on CUDA 7.x, else fp32) or half (what the
    # original's half_precision: true becomes: fp16 on CUDA, bf16 elsewhere; train/precision.py)
    precision: str = "fp32"
    grad_accumulation: int = 1
    seed: Optional[int] = 0

    # --- schedule of side work (in optimiser steps; *_epochs variants override when set) --------
    log_every: int = 10
    validation_every: int = 200
    checkpoint_every: int = 500
    figures_every: int = 500
    validation_period_epochs: Optional[int] = None
    checkpoint_period_epochs: Optional[int] = None
    figures_period_epochs: Optional[int] = None
    keep_checkpoints: int = 3  # newest K kept (plus the best); 0 keeps every checkpoint
    subjects_to_plot: int = 4
    max_validation_batches: Optional[int] = None
    # at each validation (rank 0): active latent units per level and the Fréchet ratio of this many
    # prior samples against as many real volumes (quality/* in TensorBoard and metrics.jsonl; a
    # cheap trend, `verydeepvae evaluate` is the full check; train/quality.py); 0 turns it off (e.g.
    # at 128³, where drawing the samples is costly); below 4 only the active units are logged
    quality_samples: int = 8

    # --- data ----------------------------------------------------------------------------------
    data_path: Optional[str] = None  # folder or file list; None: the built-in phantom population
    nifti_filename_pattern: Optional[str] = None  # None: *.nii and *.nii.gz
    max_niis_to_use: Optional[int] = None
    train_fraction: float = 0.95
    clamp_percentiles: list[float] = field(default_factory=lambda: [0.05, 99.95])
    crop_to_foreground: bool = True
    cache_dir: Optional[str] = None  # None: <output_dir>/cache
    num_workers: int = 1
    skip_bad_files: bool = False
    phantom_num: int = 200
    augment: bool = True
    aug_prob_affine: float = 0.2
    aug_prob_elastic: float = 0.0
    aug_prob_bias_field: float = 0.1
    aug_prob_gamma: float = 0.1
    aug_prob_anisotropy: float = 0.1
    aug_prob_haircut: float = 0.1
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
    threads_per_rank: Optional[int] = None
    resume: bool = False
    overwrite: bool = False  # a fresh run into a folder holding another run moves that run aside
    restore_optimiser: bool = True

    # --- performance (speed/memory modes; none changes the model's maths) -----------------------
    # activation checkpointing: "auto" (training picks the least recomputation whose estimated
    # peak fits the device's memory, train/memory_plan.py), "none", "all", or resolution level
    # indices (0 = full resolution)
    checkpoint_levels: list[int] | str = "auto"
    channels_last: bool = False  # channels-last-3D memory format for activations and weights
    compile: bool = False  # torch.compile the model for training
    # deterministic GPU algorithms (cuDNN/cuBLAS; slower), so a resumed GPU run repeats an
    # uninterrupted one bitwise as a CPU run does (train/precision.py configure_backends)
    deterministic: bool = False

    # ------------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.channels)

    def level_resolutions(self) -> list[int]:
        return [self.resolution >> i for i in range(self.num_levels)]

    def resolved(self, name: str) -> list[int]:
        """A channel list with its documented default filled in."""
        value = getattr(self, name)
        if value is not None:
            return list(value)
        if name == "channels_hidden_top_down":
            return self.resolved("channels_top_down")
        return list(self.channels)

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# Key names of the original project (both its generations) -> ours.
LEGACY_RENAMES = {
    "latents_per_channel": "latent_feature_maps_per_resolution",
    "nii_target_shape": "resolution",
    "nifti_flair_dir": "data_path",
    "nifti_dir": "data_path",
    "random_seed": "seed",
    "train_frac": "train_fraction",
    "gradient_clipping_value": "grad_clip",
    "gradient_skipping_value": "skip_threshold",
    "workers_per_process": "num_workers",
    "warmup_iterations": "skip_warmup_steps",
    "validation_period": "validation_period_epochs",
    "save_period": "checkpoint_period_epochs",
    "plot_recons_period": "figures_period_epochs",
    "resume_from_checkpoint": "resume",
    "veto_transformations": "augment",  # inverted, see _legacy_value
    "half_precision": "precision",  # bool -> "half"/"fp32"
    "keep_every_checkpoint": "keep_checkpoints",  # bool -> 0 (all) / 3
    "convolutional_downsampling": "downsampling",  # bool -> "conv"/"avgpool"
    "output_folder": "output_dir",
}

# Keys the original accepted that have no effect here; each is reported with its reason.
LEGACY_IGNORED = {
    "verbose": "model summaries are printed by `verydeepvae config show`",
    "plot_gradient_norms": "gradient norms always go to TensorBoard",
    "normalise_weight_by_depth": "residual branches are always scaled by 1/sqrt(depth)",
    "zero_biases": "biases are always zero-initialised",
    "veto_batch_norm": "the model never uses batch norm",
    "use_rezero": "not implemented; depth-scaled initialisation is used instead",
    "use_precision_reweighting": "had no effect in the original either",
    "latents_to_optimise": "had no effect in the original either",
    "predict_x_scale": "the output likelihood always learns its per-voxel scale",
    "predict_x_scale_with_sigmoid": "stds use a softplus parameterisation",
    "scale_hidden_clamp_bounds": "stds use a softplus parameterisation",
    "scale_output_clamp_bounds": "stds use a softplus parameterisation",
    "variance_hidden_clamp_bounds": "stds use a softplus parameterisation",
    "variance_output_clamp_bounds": "stds use a softplus parameterisation",
    "output_activation_function": "the likelihood's mean is bounded to the data range",
    "use_tanh_output": "the likelihood's mean is bounded to the data range",
    "use_sigmoid_output": "the likelihood's mean is bounded to the data range",
    "separate_hidden_loc_scale_convs": "not implemented",
    "separate_output_loc_scale_convs": "not implemented",
    "latent_feature_maps_per_resolution_weight_sharing": "not implemented",
    "latents_per_channel_weight_sharing": "not implemented",
    "latents_to_use": "not implemented",
    "apply_augmentations_to_validation_set": "validation data are never augmented",
    "local_rank": "set by torchrun or --local_rank, not by the configuration",
    "checkpoint_folder": "checkpoints live in <output_dir>/checkpoints",
    "tensorboard_dir": "TensorBoard events live in <output_dir>/tensorboard",
    "recon_folder": "figures live in <output_dir>/figures",
    "model_name": "not used",
}

# Architecture keys added after checkpoints were first written, with the value that rebuilds the
# model such a checkpoint holds (Checkpoint.config fills them in when they are missing).
ARCHITECTURE_BEFORE_KEY = {"bias_max_resolution": 0}

PRESETS = ("32", "64", "128", "demo", "tiny")


def preset_names() -> tuple[str, ...]:
    return PRESETS


def read_preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    text = resources.files("verydeepvae.presets").joinpath(f"{name}.json").read_text()
    return json.loads(text)


MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_ALIASES = 100
MAX_CONFIG_ELEMENTS = 100_000  # values in a configuration once its aliases are expanded
# YAML 1.1 reads 1e-3 (no dot, or no sign in the exponent) as a string; YAML 1.2 and JSON as a number
_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")


class _SafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that reads 1e-3 as a number, refuses duplicate keys and stops alias bombs
    ("billion laughs": a few hundred bytes that expand to gigabytes) after MAX_YAML_ALIASES aliases."""

    def __init__(self, stream):
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} YAML aliases")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.YAMLError(f"duplicate key {_short(key)}")
            seen.add(key)
        return super().construct_mapping(node, deep)


_SafeLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_SafeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """YAML (a superset of JSON) with :class:`_SafeLoader`'s limits and a size limit."""
    if len(text) > MAX_CONFIG_BYTES:
        raise yaml.YAMLError(f"more than {MAX_CONFIG_BYTES} bytes")
    data = yaml.load(text, Loader=_SafeLoader)
    _check_expanded_size(data)
    return data


def _check_expanded_size(data: Any) -> None:
    """A few aliases nested in each other expand to billions of values (the parsed object shares
    them, but every later walk over it would not): count, stopping at the limit."""
    count, stack = 0, [data]
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_CONFIG_ELEMENTS:
            raise yaml.YAMLError(f"more than {MAX_CONFIG_ELEMENTS} values once its aliases are expanded")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 8, 8, 60, 60


def _short(value: Any, limit: int = 80) -> str:
    """A bounded repr of ``value``: error lines quote a value, never a whole file, and computing
    the quote never walks a huge object."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_config_file(path: str | Path, max_bytes: int = MAX_CONFIG_BYTES) -> dict[str, Any]:
    """Read a JSON or YAML configuration file into a plain dict (``max_bytes``: larger files are
    refused; YAML files are bounded by MAX_CONFIG_BYTES whatever it says)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist")
    try:
        if path.stat().st_size > max_bytes:
            raise ValueError(f"larger than {max_bytes} bytes")
        text = path.read_text()
        data = load_yaml(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"configuration file {path} could not be parsed: {first_line[:200]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"configuration file {path} must contain a mapping of keys to values")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is read as JSON/YAML when it parses."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and "," in value and key not in ("data_path", "output_dir"):
        parts = [p.strip() for p in value.split(",")]
        try:
            value = [load_yaml(p) for p in parts]
        except yaml.YAMLError:
            value = parts
    return key, value


def build_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    notices: list[str] | None = None,
    file_values: dict[str, Any] | None = None,
) -> Config:
    """Merge preset -> file -> overrides, translate legacy names, validate, return a Config.

    ``notices`` collects one-line messages about legacy keys that were accepted but ignored.
    ``file_values``: the configuration ``config_file`` holds, when the caller has read it already
    (a run record or a checkpoint holds one among other things: train/run_record.py).
    """
    merged: dict[str, Any] = {}
    if preset is not None:
        merged.update(normalise_keys(read_preset(preset), notices, source=f"preset {preset}"))
    if config_file is not None or file_values is not None:
        values = read_config_file(config_file) if file_values is None else file_values
        merged.update(normalise_keys(values, notices, source=str(config_file or "configuration")))
    if overrides:
        merged.update(normalise_keys(overrides, notices, source="command line"))
    return config_from_dict(merged)


def normalise_keys(
    raw: dict[str, Any], notices: list[str] | None = None, source: str = "configuration"
) -> dict[str, Any]:
    """Translate legacy names and values to ours; reject unknown keys naming the closest match."""
    known = {f.name for f in dataclasses.fields(Config)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in LEGACY_IGNORED:
            if notices is not None:
                notices.append(f"{source}: key {key!r} is accepted but ignored: {LEGACY_IGNORED[key]}")
            continue
        if key in LEGACY_RENAMES:
            new_key = LEGACY_RENAMES[key]
            out[new_key] = _legacy_value(key, value)
            continue
        if key not in known:
            raise ConfigError(f"unknown configuration key {key!r} (in {source}){_suggest(key, known)}")
        out[key] = value
    return out


def _legacy_value(key: str, value: Any) -> Any:
    if key == "nii_target_shape":
        if (
            isinstance(value, (list, tuple))
            and len(value) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            if len(set(value)) != 1:
                raise ConfigError(
                    f"nii_target_shape must be a cube such as [64, 64, 64], got {list(value)}"
                )
            return value[0]
        raise ConfigError(f"nii_target_shape must be a list of three equal integers, got {_short(value)}")
    if key in ("veto_transformations", "half_precision", "keep_every_checkpoint", "convolutional_downsampling"):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {_short(value)}")
        return {
            "veto_transformations": not value,
            # the original's fp16 AMP, which it also ran on CPUs (its own tests do): "half" is fp16 on a
            # CUDA GPU and bf16 elsewhere, decided once the device is known (train/precision.py)
            "half_precision": "half" if value else "fp32",
            "keep_every_checkpoint": 0 if value else 3,
            "convolutional_downsampling": "conv" if value else "avgpool",
        }[key]
    return value


def _suggest(key: str, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(known | set(LEGACY_RENAMES)), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def config_from_dict(values: dict[str, Any]) -> Config:
    """Type-check every value, then check the layer definitions hang together."""
    hints = typing.get_type_hints(Config)
    unknown = [key for key in values if key not in hints]
    if unknown:
        raise ConfigError(f"unknown configuration key {_short(unknown[0])}{_suggest(str(unknown[0]), set(hints))}")
    if isinstance(values.get("condition_on"), str):  # one name (--set condition_on=age), or "age,sex" in a file
        values = {**values, "condition_on": [v.strip() for v in values["condition_on"].split(",")]}
    checked = {key: _check_type(key, value, hints[key]) for key, value in values.items()}
    config = Config(**checked)
    validate(config)
    return config


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin is list:
        inner = typing.get_args(annotation)[0]
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(inner, str(inner))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        annotation, str(annotation)
    ).replace("a integer", "an integer")


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            return _check_type(key, value, options[0])
        if list[int] in options and isinstance(value, int) and not isinstance(value, bool):
            value = [value]  # e.g. --set checkpoint_levels=0
        for option in options:
            try:
                return _check_type(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {' or '.join(_type_name(o) for o in options)}, got {_short(value)}")
    if origin is list:
        item_type = typing.get_args(annotation)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be {_type_name(annotation)}, got {_short(value)}")
        return [_check_type(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {_short(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {_short(value)}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {_short(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {_short(value)}")
        return float(value)
    if annotation is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # e.g. CUDA_devices: [0, 1]
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {_short(value)}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # a bug, not user input


LAYER_LISTS = (
    "channels",
    "channels_hidden",
    "channels_top_down",
    "channels_hidden_top_down",
    "channels_per_latent",
    "latent_feature_maps_per_resolution",
    "kernel_sizes_bottom_up",
    "kernel_sizes_top_down",
)


MAX_RESOLUTION = 1024
MAX_CHANNELS = 8192
MAX_LAYERS_PER_LEVEL = 256
MAX_SEED = 2**32 - 1  # NumPy's limit


def validate(c: Config) -> None:
    """Checks that need more than one value's type; each message names the key."""
    if c.resolution < 2 or c.resolution > MAX_RESOLUTION or c.resolution & (c.resolution - 1):
        raise ConfigError(f"resolution must be a power of two between 2 and {MAX_RESOLUTION} (e.g. 32, 64, 128), "
                          f"got {c.resolution}")
    if c.seed is not None and not 0 <= c.seed <= MAX_SEED:
        raise ConfigError(f"seed must be between 0 and {MAX_SEED} (or null for a random one), got {c.seed}")
    k = int(math.log2(c.resolution))
    n = len(c.channels)
    if not 1 <= n <= k + 1:
        raise ConfigError(
            f"channels must have between 1 and {k + 1} entries (log2(resolution)+1 for resolution "
            f"{c.resolution}; fewer entries put the top of the hierarchy at a coarser resolution), got {n}"
        )
    for name in LAYER_LISTS:
        value = getattr(c, name)
        if value is None:
            continue
        if len(value) != n:
            raise ConfigError(
                f"{name} must have {n} entries, one per resolution level like channels "
                f"({', '.join(str(r) for r in c.level_resolutions())}), got {len(value)}"
            )
        lowest = 0 if name == "latent_feature_maps_per_resolution" else 1
        highest = MAX_LAYERS_PER_LEVEL if name == "latent_feature_maps_per_resolution" else MAX_CHANNELS
        for i, v in enumerate(value):
            if not lowest <= v <= highest:
                raise ConfigError(f"{name}[{i}] must be between {lowest} and {highest}, got {v}")
    for name in ("kernel_sizes_bottom_up", "kernel_sizes_top_down"):
        for i, v in enumerate(getattr(c, name)):
            if v > MAX_KERNEL:
                raise ConfigError(f"{name}[{i}] must be between 1 and {MAX_KERNEL}, got {v}")
    if c.latent_feature_maps_per_resolution[-1] < 1:
        raise ConfigError(
            "latent_feature_maps_per_resolution must have at least 1 latent layer at the coarsest "
            f"level (its last entry), got {c.latent_feature_maps_per_resolution}"
        )
    _choice("likelihood", c.likelihood, LIKELIHOODS)
    _choice("precision", c.precision, PRECISIONS)
    try:
        check_device_name(c.device)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _choice("optimiser", c.optimiser, OPTIMISERS)
    _choice("lr_schedule", c.lr_schedule, SCHEDULES)
    _choice("downsampling", c.downsampling, DOWNSAMPLING)
    for name in ("batch_size", "grad_accumulation", "log_every", "validation_every", "checkpoint_every",
                 "figures_every", "num_bins", "skip_window", "max_consecutive_skips"):
        if getattr(c, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(c, name)}")
    for name in ("max_steps", "total_epochs", "max_niis_to_use", "validation_period_epochs",
                 "checkpoint_period_epochs", "figures_period_epochs", "max_validation_batches",
                 "threads_per_rank"):
        value = getattr(c, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1 (or null), got {value}")
    for name in ("warmup_steps", "skip_warmup_steps", "kl_warmup_steps", "keep_checkpoints", "bias_max_resolution",
                 "num_workers", "subjects_to_plot", "quality_samples", "phantom_num"):
        if getattr(c, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(c, name)}")
    for name in ("learning_rate", "grad_clip", "skip_factor"):
        if getattr(c, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(c, name)}")
    if c.skip_threshold is not None and c.skip_threshold <= 0:
        raise ConfigError(f"skip_threshold must be > 0 (or null), got {c.skip_threshold}")
    for name in ("weight_decay", "l2_reg_coeff", "kl_free_bits", "output_scale_max"):
        if getattr(c, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(c, name)}")
    for name in ("ema_rate", "lr_min_ratio"):
        if not 0.0 <= getattr(c, name) <= 1.0:
            raise ConfigError(f"{name} must be between 0 and 1, got {getattr(c, name)}")
    if not 0.0 < c.train_fraction <= 1.0:
        raise ConfigError(f"train_fraction must be in (0, 1], got {c.train_fraction}")
    for name in [f.name for f in dataclasses.fields(Config) if f.name.startswith("aug_prob_")]:
        if not 0.0 <= getattr(c, name) <= 1.0:
            raise ConfigError(f"{name} must be a probability between 0 and 1, got {getattr(c, name)}")
    lo_hi = c.clamp_percentiles
    if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] < lo_hi[1] <= 100.0:
        raise ConfigError(f"clamp_percentiles must be [low, high] with 0 <= low < high <= 100, got {lo_hi}")
    if c.num_bins < 2:
        raise ConfigError(f"num_bins must be >= 2, got {c.num_bins}")
    if c.precision == "fp16" and c.device in ("cpu", "mps"):
        raise ConfigError(f"precision fp16 needs a CUDA device; use bf16 on the {c.device.upper()}")
    _validate_performance(c)
    _validate_conditioning(c)
    if c.CUDA_devices is not None:
        for d in c.CUDA_devices:
            if not d.isdigit():
                raise ConfigError(f"CUDA_devices must be device indices such as ['0', '1'], got {c.CUDA_devices}")


COVARIATE_KINDS = ("numeric", "categorical")


def _validate_conditioning(c: Config) -> None:
    if c.condition_on is None:
        if c.covariates_file is not None:
            raise ConfigError("covariates_file (--covariates) needs condition_on (--condition-on): which of its "
                              "columns condition the model")
        return
    if not c.condition_on:
        raise ConfigError("condition_on must name at least one covariate (e.g. age,sex), or be null")
    seen = set()
    for entry in c.condition_on:
        name, _, kind = entry.partition(":")
        if not name.strip():
            raise ConfigError(f"condition_on entries must be column names (optionally name:numeric or "
                              f"name:categorical), got {_short(entry)}")
        if kind and kind.strip() not in COVARIATE_KINDS:
            raise ConfigError(f"condition_on: the kind of {name.strip()!r} must be numeric or categorical, got "
                              f"{_short(kind)}")
        if name.strip() in seen:
            raise ConfigError(f"condition_on names {name.strip()!r} twice")
        seen.add(name.strip())
    if c.data_path is not None and c.covariates_file is None:
        raise ConfigError("condition_on with data_path needs covariates_file (--covariates FILE): a TSV/CSV with one "
                          "row per scan (only the built-in phantom population brings its own)")


def _validate_performance(c: Config) -> None:
    levels = c.checkpoint_levels
    if isinstance(levels, str):
        if levels not in ("auto", "none", "all"):
            raise ConfigError(f'checkpoint_levels must be "auto", "none", "all" or a list of resolution level '
                              f"indices, got {levels!r}")
        return
    for level in levels:
        if not 0 <= level < c.num_levels:
            raise ConfigError(
                f"checkpoint_levels entries must be level indices from 0 (resolution {c.resolution}) to "
                f"{c.num_levels - 1} (resolution {c.level_resolutions()[-1]}), got {level}")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {_short(value)}")
