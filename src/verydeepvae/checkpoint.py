"""Checkpoints that cannot run code: tensors in safetensors, everything else as JSON metadata.

One file per checkpoint, ``<run>/checkpoints/step_XXXXXXXX.safetensors``, written atomically,
with a SHA-256 sidecar checked on load.  The newest K are kept, plus the best by validation loss.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .atomic import write_json, write_safetensors, write_text
from .config import ARCHITECTURE_BEFORE_KEY, LAYER_LISTS, Config, config_from_dict
from .errors import CheckpointError, ConfigError
from .json_types import JSONObject

if TYPE_CHECKING:  # names for the metadata's parts, without importing NIfTI reading here
    from .data.nifti_load import IntensityReference
    from .model.fitted_prior import FittedPriorChoice
    from .model.voxel_noise import VoxelNoiseRecord

FORMAT = "verydeepvae-checkpoint-1"
META_KEY = "verydeepvae"
PREFIX = "step_"
SUFFIX = ".safetensors"

ARCHITECTURE_KEYS = ("resolution",) + LAYER_LISTS + (
    "bottleneck_resnet_encoder", "only_use_one_conv_block_at_top", "downsampling", "likelihood", "num_bins",
    "likelihood_mixtures", "bias_max_resolution", "condition_on",
)


class RunData(TypedDict, total=False):
    """The data facts a loaded model needs (voxel size of the model grid in mm, intensity reference)."""

    voxel_size_mm: float
    intensity_reference: IntensityReference
    num_train: int
    num_val: int


class RngState(TypedDict, total=False):
    """Python's and NumPy's RNG states as JSON (torch's are tensors)."""

    python: list[Any]  # random.getstate(), the tuple as a list
    numpy: list[Any]  # numpy.random.get_state()


class CheckpointMeta(TypedDict, total=False):
    """A checkpoint's JSON metadata: ``format`` and ``step``, the run facts of train/state.py's
    ``run_meta`` and the optimiser state of its ``capture_state``, and ``fitted_prior`` and
    ``voxel_noise`` on a final checkpoint that fitted them.  Checkpoints of earlier versions may lack
    any key but the first two."""

    format: str
    step: int
    config: JSONObject  # Config.to_dict(); read through config_values
    seed: int
    world_size: int
    memory: JSONObject  # train/memory_plan.py Plan.record()
    best_validation: float | None
    validation_history: list[dict[str, float]]
    ema_updates: int
    steps_per_epoch: int
    data: RunData
    covariates: JSONObject  # CovariateSchema.to_json(), a conditional model's schema
    fitted_prior: FittedPriorChoice
    voxel_noise: VoxelNoiseRecord
    finest_layer_restart: JSONObject  # train/finest_layer.py restart_record, a run that started again
    optimiser: JSONObject  # param_groups, and non-tensor state per parameter index
    scaler: JSONObject | None  # GradScaler.state_dict()
    skipper: JSONObject  # UpdateSkipper.state_dict()
    rng: RngState
    rng_ranks: dict[str, RngState]  # ranks other than 0, by rank


class BestRecord(TypedDict):
    """``checkpoints/best.json``: the checkpoint with the lowest validation loss (nats/voxel)."""

    checkpoint: str
    validation_loss: float
    step: int


@dataclass
class Checkpoint:
    path: Path
    meta: CheckpointMeta
    tensors: dict[str, torch.Tensor]
    verified: bool = True  # False: no .sha256 sidecar was there to check the file against

    def unverified_notice(self) -> str | None:
        if self.verified:
            return None
        return f"checkpoint {self.path} has no {_sidecar(self.path).name} beside it: loaded without checking its integrity"

    @functools.cached_property
    def config(self) -> Config:
        return _config(self.meta, self.path)

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors stored under ``prefix.`` (e.g. ``model``, ``ema``), prefix removed."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}{SUFFIX}"


def save_checkpoint(directory: Path, step: int, tensors: dict[str, torch.Tensor], meta: CheckpointMeta) -> Path:
    """Write one checkpoint atomically; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / checkpoint_name(step)
    meta = dict(meta, format=FORMAT, step=step)
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    digest: dict[str, str] = {}

    def hash_it(tmp: Path) -> None:
        digest["sha256"] = _sha256(tmp)

    write_safetensors(path, flat, {META_KEY: json.dumps(meta)}, after=hash_it)
    write_text(_sidecar(path), digest["sha256"] + "\n")
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify one checkpoint file.  Never unpickles anything."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as handle:
        head = handle.read(9)
    # a safetensors file is an 8-byte little-endian header length, then the JSON header ("{"); the
    # length's first byte may well be 0x80, so only a file that is not that can be a pickle
    safetensors_like = len(head) == 9 and head[8:9] == b"{"
    if head[:2] == b"PK" or (head[:1] == b"\x80" and not safetensors_like):
        raise CheckpointError(
            f"checkpoint {path} is a pickle/zip file; it is refused because loading it could run "
            "code (verydeepvae checkpoints are .safetensors files)"
        )
    sidecar = _sidecar(path)
    verified = sidecar.is_file()
    if verified:
        expected = sidecar.read_text().strip()
        if expected and expected != _sha256(path):
            raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 does not match {sidecar.name}")
    try:
        tensors = load_file(str(path), device=str(device))
    except _READ_ERRORS as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {str(error).splitlines()[0]}") from None
    meta = read_metadata(path)
    checkpoint = Checkpoint(path=path, meta=meta, tensors=tensors, verified=verified)
    if "config" in meta:
        checkpoint.config  # noqa: B018 (validated now, kept for every later reader)
    return checkpoint


_READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError)


def read_metadata(path: str | Path) -> CheckpointMeta:
    """A checkpoint's metadata (configuration, step, history...) from its header alone: no tensor
    is read and the SHA-256 is not checked, so looking at a run (``config show``, ``inspect``)
    costs nothing at any model size.  :func:`load_checkpoint` is the checked way in."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw_meta = (handle.metadata() or {}).get(META_KEY)
    except _READ_ERRORS as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {str(error).splitlines()[0]}") from None
    if raw_meta is None:
        raise CheckpointError(f"checkpoint {path} is a safetensors file but not a verydeepvae checkpoint")
    try:
        meta = json.loads(raw_meta)
    except ValueError:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata (not JSON)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"checkpoint {path} has unknown format {str(found)[:40]!r}")
    _check_step(meta, path)
    return meta


MAX_STEP = 10**12


def _check_step(meta: CheckpointMeta, path: Path) -> None:
    """Every reader relies on the step count (the configuration is checked by ``Checkpoint.config``)."""
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise CheckpointError(f"checkpoint {path} has an invalid step {str(step)[:40]!r} in its metadata")


def config_values(meta: CheckpointMeta, path: Path) -> JSONObject:
    """The configuration stored in a checkpoint's metadata as plain values (architecture keys
    newer than the checkpoint set as they were before they existed)."""
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"checkpoint {path} has no configuration in its metadata")
    return {**ARCHITECTURE_BEFORE_KEY, **meta["config"]}


def _config(meta: CheckpointMeta, path: Path) -> Config:
    """The configuration stored in a checkpoint's metadata, or one line saying what is wrong."""
    values = config_values(meta, path)
    try:
        return config_from_dict(values)
    except ConfigError as error:
        raise CheckpointError(f"checkpoint {path} has an invalid configuration: {error}") from None


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in a folder, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"{PREFIX}*{SUFFIX}") if p.name[len(PREFIX):-len(SUFFIX)].isdigit())


def newest_loadable(directory: Path, notices: list[str] | None = None,
                    device: str | torch.device = "cpu") -> Checkpoint | None:
    """The newest checkpoint that loads and verifies; corrupt newer ones are reported and passed over."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path, device)
        except CheckpointError as error:
            if notices is not None:
                notices.append(f"{error}; falling back to the previous checkpoint")
    return None


def resolve_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """A checkpoint file, or a run folder / checkpoints folder (its newest loadable checkpoint)."""
    path = Path(path)
    if path.is_file():
        return load_checkpoint(path, device)
    if path.is_dir():
        directory = path if list_checkpoints(path) else checkpoint_dir(path)
        found = newest_loadable(directory, device=device)
        if found is not None:
            return found
        raise CheckpointError(f"no loadable checkpoint in {path}")
    raise CheckpointError(f"checkpoint {path} does not exist")


def prune(directory: Path, keep: int, best: Path | None) -> None:
    """Delete all but the newest ``keep`` checkpoints (0 keeps all), never the best one."""
    if keep <= 0:
        return
    for path in list_checkpoints(directory)[:-keep]:
        if best is not None and path.name == best.name:
            continue
        path.unlink(missing_ok=True)
        _sidecar(path).unlink(missing_ok=True)


def record_best(directory: Path, path: Path, value: float, step: int) -> None:
    write_json(directory / "best.json", {"checkpoint": path.name, "validation_loss": value, "step": step})


def read_best(directory: Path) -> BestRecord | None:
    """best.json, or None when it is missing, unreadable or lacks its ``checkpoint`` name."""
    try:
        best = json.loads((directory / "best.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(best, dict) or not isinstance(best.get("checkpoint"), str):
        return None
    return best


def keep_newest_and_best(directory: Path, path: Path, step: int, keep: int, best_value: float | None) -> None:
    """After writing ``path`` (step ``step``): record it as the best when ``best_value`` (its
    validation loss, nats/voxel) is given, then keep the newest ``keep`` checkpoints and the best."""
    if best_value is not None:
        record_best(directory, path, best_value, step)
        best_path: Path | None = path
    else:
        recorded = read_best(directory)
        best_path = directory / recorded["checkpoint"] if recorded else None
    prune(directory, keep, best_path)


def architecture_difference(configured: Config, stored: Config) -> list[str]:
    """Architecture keys whose values differ, as 'key: configured X, checkpoint Y'.

    Derived widths (channels_hidden...) are named only when one side sets them explicitly, so a
    change of ``channels`` is reported once.
    """
    out = []
    for key in ARCHITECTURE_KEYS:
        if getattr(configured, key) is None and getattr(stored, key) is None:
            continue
        va, vb = _arch_value(configured, key), _arch_value(stored, key)
        if va != vb:
            out.append(f"{key}: configured {va}, checkpoint {vb}")
    return out


def _arch_value(c: Config, key: str) -> Any:
    if key in ("channels_hidden", "channels_top_down", "channels_hidden_top_down"):
        return list(getattr(c.model, key))  # defaults filled in
    return getattr(c, key)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
