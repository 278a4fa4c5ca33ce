"""Everything a training run steps with, built before its first step: the checkpoint to resume from
(and the configuration rules of a resume), the memory plan, the data, the model, EMA, optimiser,
loss scaler, skip policy, data order and the DDP / compiled wrapper, restored from the checkpoint.

Kept apart from the loop (``loop.py``), which only steps, validates and saves.  The order of the
work matters and is the order of :func:`build`: random streams are seeded before the model is
initialised, and a resume is refused (architecture, missing split) before any data work.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .. import checkpoint as ckpt
from ..config import Config
from ..console import QUIET
from ..errors import CheckpointError, DataError
from ..model import VeryDeepVAE
from . import distributed, finest_layer, memory_plan, resume_changes
from .optim import EMA, UpdateSkipper, build_optimiser
from .sampler import EpochSampler
from .state import build_model_with_shared_weights, restore_state


@dataclass
class TrainingParts:
    """What :func:`build` makes.  ``step``, ``best`` (lowest validation loss, nats/voxel) and
    ``history`` are the resumed run's (0, None, [] for a fresh one); ``net`` is the module that
    trains (``model`` itself, or its DDP / compiled wrapper)."""

    cfg: Config
    seed: int
    memory_plan: memory_plan.Plan
    bundle: Any
    model: VeryDeepVAE
    ema: EMA
    optimiser: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    skipper: UpdateSkipper
    sampler: EpochSampler
    steps_per_epoch: int
    total_steps: int
    net: torch.nn.Module
    resumed_from: ckpt.Checkpoint | None = None
    step: int = 0
    best: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return (cfg.total_epochs or 10) * steps_per_epoch


def build(cfg: Config, runtime: distributed.Runtime, bundle: Any, notices: list[str], show_progress: bool | None,
          restarted: bool, verbosity: int) -> TrainingParts:
    """Build (and, on resume, restore) everything the loop needs; notices collect what was decided."""
    output_dir = Path(cfg.output_dir)
    seed = cfg.seed if cfg.seed is not None else secrets.randbelow(2**31)
    seed_everything(seed + runtime.rank)
    resume_from = find_resume_checkpoint(cfg, runtime, restarted, notices)
    if resume_from is not None:  # before any data work: a refused resume costs nothing
        cfg, seed = _resumed_config(cfg, seed, resume_from, runtime, bundle is None, notices)
    # checkpoint_levels auto -> the least recomputation that fits this device; also before any
    # data work (the precision, batch size and levels are final here, after the resume rules)
    cfg, plan = memory_plan.resolve(cfg, runtime, notices)
    if bundle is None:
        bundle = _build_data(cfg, runtime, output_dir, notices, False if verbosity == QUIET else show_progress)
    schema = getattr(bundle, "covariates", None)  # a conditional run (data/covariates.py)
    model = build_model_with_shared_weights(cfg, seed, runtime.device, schema.dim if schema else 0)
    if schema is not None:
        model.set_covariate_bank(bundle.train.covariates)
    ema, optimiser = EMA(model, cfg.ema_rate), build_optimiser(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    skipper = UpdateSkipper(cfg)
    sampler = EpochSampler(len(bundle.train), seed, runtime.rank, runtime.world_size, cfg.batch_size)
    steps_per_epoch = max(1, sampler.batches_per_epoch // cfg.grad_accumulation)
    parts = TrainingParts(cfg=cfg, seed=seed, memory_plan=plan, bundle=bundle, model=model, ema=ema,
                          optimiser=optimiser, scaler=scaler, skipper=skipper, sampler=sampler,
                          steps_per_epoch=steps_per_epoch, total_steps=total_steps(cfg, steps_per_epoch), net=model,
                          resumed_from=resume_from)
    if resume_from is not None:
        restore(parts, resume_from, runtime, notices)
    parts.net = _training_module(model, cfg, runtime)
    return parts


def find_resume_checkpoint(cfg: Config, runtime: distributed.Runtime, restarted: bool,
                           notices: list[str]) -> ckpt.Checkpoint | None:
    """The checkpoint to continue from (rank 0's choice, on every rank), None for a fresh start.

    ``restarted``: torchrun --max-restarts brought the workers back (decided by all ranks together:
    torchrun's restart count can differ between nodes)."""
    if not (cfg.resume or restarted):
        return None
    ckpt_dir = ckpt.checkpoint_dir(cfg.output_dir)
    found, problems = None, []
    if runtime.is_main or not runtime.distributed:
        found = ckpt.newest_loadable(ckpt_dir, problems)
        notices.extend(problems)
    found = distributed.same_checkpoint(found, ckpt_dir, runtime)  # rank 0's, on every rank
    why = "--resume" if cfg.resume else "after a torchrun restart"
    if found is None and distributed.any_rank(bool(problems), runtime):
        newest = problems[0].split("; falling back")[0] if problems else "see rank 0's message"
        raise CheckpointError(
            f"{why}: no checkpoint in {ckpt_dir} can be loaded ({len(problems) or 'all'} tried; newest: "
            f"{newest}); nothing was changed: restore a good copy, or start afresh with --overwrite")
    if found is None:
        notices.append(f"{why}: no checkpoint in {ckpt_dir}, starting from step 0")
    elif restarted and not cfg.resume:
        notices.append(f"{why}: resuming from the newest checkpoint, {found.path.name}")
    return found


def _resumed_config(cfg: Config, seed: int, checkpoint: ckpt.Checkpoint, runtime: distributed.Runtime,
                    needs_split: bool, notices: list[str]) -> tuple[Config, int]:
    """The configuration and seed a resumed run continues with (train/resume_changes.py), after
    checking that it can: the same architecture, and the run's split.json still there."""
    check_same_architecture(cfg, checkpoint)
    split = Path(cfg.output_dir) / "split.json"
    cfg = resume_changes.apply(cfg, checkpoint.meta["config"], notices,
                               checkpoint.meta.get(finest_layer.RECORD_KEY))
    seed = int(checkpoint.meta.get("seed", seed))  # the run's own (also when it was random)
    # rank 0's folder decides (other nodes may not share its file system and make their own copy)
    split_missing = needs_split and runtime.is_main and not split.is_file()
    if distributed.any_rank(split_missing, runtime):
        raise DataError(
            f"{split} is missing: the run's training/validation split cannot be "
            "restored, and a new split could validate on volumes it has trained on. Restore the file, or "
            "start afresh with --overwrite")
    return cfg, seed


def _build_data(cfg: Config, runtime: distributed.Runtime, output_dir: Path, notices: list[str],
                show_progress: bool | None):
    from ..data import build_datasets

    # rank 0 writes split.json / the cache first, then the others read them (no races)
    return distributed.main_first(
        lambda: build_datasets(cfg, output_dir, notices, show_progress=show_progress, is_main=runtime.is_main),
        runtime, "preparing the data",
        fingerprint=lambda b: distributed.fingerprint_strings(list(b.train_files) + ["|"] + list(b.val_files)))


def restore(parts: TrainingParts, checkpoint: ckpt.Checkpoint, runtime: distributed.Runtime,
            notices: list[str]) -> None:
    """Weights, EMA, step, validation history and (``restore_optimiser``) optimiser, loss scaler,
    skip history and random streams from ``checkpoint``."""
    if checkpoint.unverified_notice():
        notices.append(checkpoint.unverified_notice())
    parts.model.load_state_dict(checkpoint.state("model"))
    parts.ema.model.load_state_dict(checkpoint.state("ema"))
    meta = checkpoint.meta
    parts.step = checkpoint.step
    parts.best = meta.get("best_validation")
    parts.history = meta.get("validation_history", [])
    parts.ema.updates = meta.get("ema_updates", parts.step)
    if parts.cfg.restore_optimiser:
        if not restore_state(checkpoint, parts.optimiser, parts.scaler, parts.skipper, runtime.rank):
            notices.append(f"rank {runtime.rank}: the checkpoint holds no RNG state for this rank "
                           f"(written by {meta.get('world_size', 1)} process(es)); its streams start afresh")
    saved_by = int(meta.get("world_size", 1))
    if saved_by != runtime.world_size and runtime.is_main:
        notices.append(
            f"the run was saved by {saved_by} process(es) and resumes with {runtime.world_size}: weights, "
            "optimiser and step continue exactly, but the order of the training examples and the random "
            "draws differ from an uninterrupted run")
    notices.append(f"resumed from {checkpoint.path} at step {parts.step}")


def _training_module(model: VeryDeepVAE, cfg: Config, runtime: distributed.Runtime) -> torch.nn.Module:
    """The module the steps call: DDP around the model with several ranks, compiled with ``compile``."""
    net: torch.nn.Module = model
    if runtime.distributed:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:  # performance: compiled on the first step (channels_last is set in the model)
        net = torch.compile(net)
    return net


def check_same_architecture(cfg: Config, checkpoint: ckpt.Checkpoint) -> None:
    differences = ckpt.architecture_difference(cfg, checkpoint.config)
    if differences:
        raise CheckpointError(f"checkpoint {checkpoint.path} is of another architecture ({'; '.join(differences)})")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
