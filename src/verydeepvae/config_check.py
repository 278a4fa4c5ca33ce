"""Kinds and bounds of configuration values: each value's type (:func:`check_type`), and the bounds
declared beside each field with the one generic check of them (:func:`check_fields`).

A field of :class:`verydeepvae.config.Config` declares its rule in its metadata
(``field(default=8, metadata=at_least(1))``); :func:`check_fields` then checks every field alike
and words every message the same way: ``<key> must be >= 1, got 0``, with ``(or null)`` for a
field that may be null.  Rules that tie several fields together are hand-written below (``check_*``)
and called by ``config.validate``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from .config_text import short_repr
from .errors import ConfigError

CHECK = "check"  # the metadata key


@dataclass(frozen=True)
class Limits:
    """A bound on a number: ``low <= value``, ``value <= high``, ``value > above`` (each optional).
    ``wording`` replaces the message's plain statement of the bound; ``null`` is what the message
    adds for a field that may be null."""

    low: float | None = None
    high: float | None = None
    above: float | None = None
    wording: str | None = None
    null: str = " (or null)"

    def holds(self, value: float) -> bool:
        return ((self.low is None or value >= self.low) and (self.high is None or value <= self.high)
                and (self.above is None or value > self.above))

    def rule(self) -> str:
        if self.wording is not None:
            return self.wording
        if self.low is not None and self.high is not None:
            return f"between {self.low} and {self.high}"
        if self.above is not None:
            return f"> {self.above}"
        return f">= {self.low}"

    def check(self, key: str, value: Any, nullable: bool) -> None:
        if not self.holds(value):
            raise ConfigError(f"{key} must be {self.rule()}{self.null if nullable else ''}, got {value}")


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of names."""

    options: tuple[str, ...]

    def check(self, key: str, value: Any, nullable: bool) -> None:
        if value not in self.options:
            raise ConfigError(f"{key} must be one of {', '.join(self.options)}; got {short_repr(value)}")


def at_least(low: float, **wording: str) -> dict[str, Limits]:
    return {CHECK: Limits(low=low, **wording)}


def greater_than(bound: float, **wording: str) -> dict[str, Limits]:
    return {CHECK: Limits(above=bound, **wording)}


def between(low: float, high: float, **wording: str) -> dict[str, Limits]:
    return {CHECK: Limits(low=low, high=high, **wording)}


def one_of(options: tuple[str, ...]) -> dict[str, Choice]:
    return {CHECK: Choice(tuple(options))}


@functools.lru_cache(maxsize=None)
def _nullable_fields(cls: type) -> frozenset[str]:
    hints = typing.get_type_hints(cls)
    return frozenset(name for name, hint in hints.items() if type(None) in typing.get_args(hint))


def check_fields(config: Any) -> None:
    """Every field's declared rule, in field order; a null value of a nullable field passes."""
    nullable = _nullable_fields(type(config))
    for f in dataclasses.fields(config):
        rule = f.metadata.get(CHECK)
        value = getattr(config, f.name)
        if rule is not None and value is not None:
            rule.check(f.name, value, f.name in nullable)


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


def check_type(key: str, value: Any, annotation: Any) -> Any:
    """``value`` as the type ``annotation`` declares (ints accepted as floats, numbers as strings), or
    one line of ConfigError naming ``key`` and the expected kind."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            return check_type(key, value, options[0])
        if list[int] in options and isinstance(value, int) and not isinstance(value, bool):
            value = [value]  # e.g. --set checkpoint_levels=0
        for option in options:
            try:
                return check_type(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {' or '.join(_type_name(o) for o in options)}, got {short_repr(value)}")
    if origin is list:
        item_type = typing.get_args(annotation)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be {_type_name(annotation)}, got {short_repr(value)}")
        return [check_type(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {short_repr(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {short_repr(value)}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {short_repr(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {short_repr(value)}")
        return float(value)
    if annotation is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # e.g. CUDA_devices: [0, 1]
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {short_repr(value)}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # a bug, not user input


COVARIATE_KINDS = ("numeric", "categorical")


def check_conditioning(c: Any) -> None:
    """condition_on names covariates once each, with a known kind, and has a source of values."""
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
                              f"name:categorical), got {short_repr(entry)}")
        if kind and kind.strip() not in COVARIATE_KINDS:
            raise ConfigError(f"condition_on: the kind of {name.strip()!r} must be numeric or categorical, got "
                              f"{short_repr(kind)}")
        if name.strip() in seen:
            raise ConfigError(f"condition_on names {name.strip()!r} twice")
        seen.add(name.strip())
    if c.data_path is not None and c.covariates_file is None:
        raise ConfigError("condition_on with data_path needs covariates_file (--covariates FILE): a TSV/CSV with one "
                          "row per scan (only the built-in phantom population brings its own)")


def check_performance(c: Any) -> None:
    """checkpoint_levels is auto, none, all or level indices that exist; channels_last is a boolean or auto."""
    if isinstance(c.channels_last, str) and c.channels_last != "auto":
        raise ConfigError(f'channels_last must be true, false or "auto", got {c.channels_last!r}')
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


def check_kl_warmup(c: Any) -> None:
    """kl_warmup_resolutions and kl_free_bits_per_latent_resolutions name resolutions the model has
    (without a warm-up or an allowance they have no effect, so ``--set kl_warmup_steps=0`` switches a
    preset's warm-up off)."""
    sizes = c.level_resolutions()
    for name in ("kl_warmup_resolutions", "kl_free_bits_per_latent_resolutions"):
        for size in getattr(c, name) or []:
            if size not in sizes:
                raise ConfigError(f"{name} entries must be resolutions of this model's levels "
                                  f"({', '.join(str(s) for s in sizes)}), got {size}")


MAX_KERNEL = 7
MAX_CHANNELS = 8192
MAX_LAYERS_PER_LEVEL = 256
# the per-resolution lists of the architecture: one entry per level, finest first
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


def check_layers(c: Any) -> None:
    """The per-resolution layer lists: one entry per level, each within its bounds."""
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
