"""The training loop: one library function, ``train``, that the CLI and tests call.

Per optimiser step: forward (optionally under bf16/fp16 autocast), backward (optionally
accumulated over micro-batches), gradient clipping, the skip decision (taken by all ranks
together), the update, the EMA update and the learning-rate schedule.  Validation, figures and
checkpoints happen every N steps on rank 0's behalf; everything needed to continue exactly is in
the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import secrets
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..config import Config
from ..console import NORMAL, QUIET, VERBOSE
from ..errors import CheckpointError, DataError, Stopped, UserError
from ..model import autocast_for
from .. import checkpoint as ckpt
from . import distributed, memory_plan, resume_changes, run_folder, run_record
from .optim import EMA, UpdateSkipper, build_optimiser, kl_weight, lr_factor, update_loss_scale
from .precision import configure_backends, out_of_memory_message, resolve_precision
from .progress import TrainConsole, ending, validation_line
from .reporting import Reporter, to_bits
from .sampler import EpochKeyed, EpochSampler, EpochStream
from .state import build_model_with_shared_weights, capture_state, process_rng_state, restore_state


class TrainingStopped(Stopped):
    """Training ended early on purpose (signal) or because it could not go on (divergence)."""


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    checkpoint: Path | None
    validation: list[dict[str, float]] = field(default_factory=list)


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return (cfg.total_epochs or 10) * steps_per_epoch


def train(cfg: Config, bundle: Any = None, notices: list[str] | None = None,
          show_progress: bool | None = None, verbosity: int = NORMAL,
          command: Sequence[str] | None = None) -> TrainResult:
    """Train (or resume) the model described by ``cfg``; returns where the results are.

    ``show_progress`` False: no progress bar (a plain line every ``log_every`` steps instead, as
    wherever the output is not a terminal); ``verbosity``: console.QUIET, NORMAL or VERBOSE
    (train/progress.py); ``command``: the command-line arguments, for the run record (default:
    the process's)."""
    notices = [] if notices is None else notices
    if bundle is None:  # a conditional run's covariates are checked before anything is written
        from ..data.run_covariates import check_before_training

        check_before_training(cfg)
    runtime = distributed.setup(cfg, notices)
    held = None
    try:
        requested = cfg
        # before the output folder is claimed: an impossible precision changes no file
        cfg = resolve_precision(cfg, runtime.device, notices)
        # decided by all ranks together: torchrun's restart count can differ between nodes
        restarted = distributed.any_rank(runtime.restart_count > 0, runtime)
        held = distributed.main_first(lambda: _claim_output_dir(cfg, runtime, restarted, notices), runtime,
                                      "checking the output folder")
        return _Trainer(cfg, runtime, bundle, notices, show_progress, restarted, verbosity, command, requested).run()
    finally:
        if held is not None:
            held.release()
        distributed.teardown()


def _claim_output_dir(cfg: Config, runtime: distributed.Runtime, restarted: bool,
                      notices: list[str]) -> run_folder.RunLock | None:
    """Global rank 0 only: the folder is writable, no other run trains in it (its lock), and a fresh
    run does not land among an older run's files."""
    if not runtime.is_main:
        return None
    output_dir = Path(cfg.output_dir)
    _check_writable(output_dir)
    return run_folder.claim(output_dir, fresh=not (cfg.resume or restarted), overwrite=cfg.overwrite,
                            notices=notices)


class _Trainer:
    def __init__(self, cfg: Config, runtime: distributed.Runtime, bundle: Any, notices: list[str],
                 show_progress: bool | None, restarted: bool = False, verbosity: int = NORMAL,
                 command: Sequence[str] | None = None, requested: Config | None = None):
        self.requested = requested or cfg  # as asked for: the run record notes what the run chose by itself
        self.command = command
        self.restarted = restarted
        configure_backends(cfg, runtime.device, notices)
        self.cfg = cfg
        self.runtime = runtime
        self.notices = notices
        self.output_dir = Path(cfg.output_dir)
        self.ckpt_dir = ckpt.checkpoint_dir(self.output_dir)
        self.console = TrainConsole(self.output_dir, runtime.is_main, verbosity, show_progress)
        self.seed = cfg.seed if cfg.seed is not None else secrets.randbelow(2**31)
        _seed_everything(self.seed + runtime.rank)
        resume_from = self._find_resume_checkpoint(restarted)
        self.resumed_from = resume_from.path if resume_from is not None else None
        if resume_from is not None:  # before any data work: a refused resume costs nothing
            _check_same_architecture(cfg, resume_from)
            cfg = self.cfg = resume_changes.apply(cfg, resume_from.meta["config"], notices)
            self.seed = int(resume_from.meta.get("seed", self.seed))  # the run's own (also when it was random)
            # rank 0's folder decides (other nodes may not share its file system and make their own copy)
            split_missing = bundle is None and runtime.is_main and not (self.output_dir / "split.json").is_file()
            if distributed.any_rank(split_missing, runtime):
                raise DataError(
                    f"{self.output_dir / 'split.json'} is missing: the run's training/validation split cannot be "
                    "restored, and a new split could validate on volumes it has trained on. Restore the file, or "
                    "start afresh with --overwrite")
        # checkpoint_levels auto -> the least recomputation that fits this device; also before any
        # data work (the precision, batch size and levels are final here, after the resume rules)
        cfg, self.memory_plan = memory_plan.resolve(cfg, runtime, notices)
        self.cfg = cfg
        if bundle is None:
            from ..data import build_datasets

            # rank 0 writes split.json / the cache first, then the others read them (no races)
            bundle = distributed.main_first(
                lambda: build_datasets(cfg, self.output_dir, notices,
                                       show_progress=False if verbosity == QUIET else show_progress),
                runtime, "preparing the data",
                fingerprint=lambda b: distributed.fingerprint_strings(list(b.train_files) + ["|"] + list(b.val_files)))
        self.bundle = bundle
        self.device = runtime.device
        schema = getattr(bundle, "covariates", None)  # a conditional run (data/covariates.py)
        self.model = build_model_with_shared_weights(cfg, self.seed, self.device, schema.dim if schema else 0)
        if schema is not None:
            self.model.set_covariate_bank(bundle.train.covariates)
        self.ema = EMA(self.model, cfg.ema_rate)
        self.optimiser = build_optimiser(self.model, cfg)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.skipper = UpdateSkipper(cfg)
        self.sampler = EpochSampler(len(bundle.train), self.seed, runtime.rank, runtime.world_size, cfg.batch_size)
        self.steps_per_epoch = max(1, self.sampler.batches_per_epoch // cfg.grad_accumulation)
        self.total_steps = total_steps(cfg, self.steps_per_epoch)
        self.step = 0
        self.best: float | None = None
        self.history: list[dict[str, float]] = []
        self.last_quality: dict[str, float] = {}  # the latest sample-quality signal (rank 0; progress bar)
        self.quality_on = cfg.quality_samples > 0
        self.quality_reference: np.ndarray | None = None  # real volumes of the quality signal (rank 0)
        if resume_from is not None:
            self._restore(resume_from)
        self.net = self.model
        if runtime.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:  # performance: compiled on the first step (channels_last is set in the model)
            self.net = torch.compile(self.net)
        if resume_from is not None and runtime.is_main:
            _drop_records_after(self.output_dir / "metrics.jsonl", self.step)
        self.reporter = Reporter(self.output_dir, runtime.is_main,
                                 purge_step=self.step + 1 if resume_from is not None else None)
        self.stop_signal: int | None = None
        self.periods = self._periods()
        self.started = time.perf_counter()  # training wall clock of this process (logged as elapsed_seconds)
        self.log_clock = self.started  # when the window of the next train log line began

    # -- set-up ----------------------------------------------------------------------------------
    def _find_resume_checkpoint(self, restarted: bool) -> ckpt.Checkpoint | None:
        """``restarted``: torchrun --max-restarts brought the workers back (decided by all ranks
        together in :func:`train`: torchrun's restart count can differ between nodes)."""
        if not (self.cfg.resume or restarted):
            return None
        found, problems = None, []
        if self.runtime.is_main or not self.runtime.distributed:
            found = ckpt.newest_loadable(self.ckpt_dir, problems)
            self.notices.extend(problems)
        found = distributed.same_checkpoint(found, self.ckpt_dir, self.runtime)  # rank 0's, on every rank
        why = "--resume" if self.cfg.resume else "after a torchrun restart"
        if found is None and distributed.any_rank(bool(problems), self.runtime):
            newest = problems[0].split("; falling back")[0] if problems else "see rank 0's message"
            raise CheckpointError(
                f"{why}: no checkpoint in {self.ckpt_dir} can be loaded ({len(problems) or 'all'} tried; newest: "
                f"{newest}); nothing was changed: restore a good copy, or start afresh with --overwrite")
        if found is None:
            self.notices.append(f"{why}: no checkpoint in {self.ckpt_dir}, starting from step 0")
        elif restarted and not self.cfg.resume:
            self.notices.append(f"{why}: resuming from the newest checkpoint, {found.path.name}")
        return found

    def _restore(self, checkpoint: ckpt.Checkpoint) -> None:
        if checkpoint.unverified_notice():
            self.notices.append(checkpoint.unverified_notice())
        self.model.load_state_dict(checkpoint.state("model"))
        self.ema.model.load_state_dict(checkpoint.state("ema"))
        meta = checkpoint.meta
        self.step = checkpoint.step
        self.best = meta.get("best_validation")
        self.history = meta.get("validation_history", [])
        self.ema.updates = meta.get("ema_updates", self.step)
        if self.cfg.restore_optimiser:
            if not restore_state(checkpoint, self.optimiser, self.scaler, self.skipper, self.runtime.rank):
                self.notices.append(f"rank {self.runtime.rank}: the checkpoint holds no RNG state for this rank "
                                    f"(written by {meta.get('world_size', 1)} process(es)); its streams start afresh")
        saved_by = int(meta.get("world_size", 1))
        if saved_by != self.runtime.world_size and self.runtime.is_main:
            self.notices.append(
                f"the run was saved by {saved_by} process(es) and resumes with {self.runtime.world_size}: weights, "
                "optimiser and step continue exactly, but the order of the training examples and the random "
                "draws differ from an uninterrupted run")
        self.notices.append(f"resumed from {checkpoint.path} at step {self.step}")

    def _periods(self) -> dict[str, int]:
        c, spe = self.cfg, self.steps_per_epoch
        return {
            "validation": c.validation_period_epochs * spe if c.validation_period_epochs else c.validation_every,
            "checkpoint": c.checkpoint_period_epochs * spe if c.checkpoint_period_epochs else c.checkpoint_every,
            "figures": c.figures_period_epochs * spe if c.figures_period_epochs else c.figures_every,
        }

    # -- main loop -------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        entry = self._write_record()
        self.console.open(self.total_steps, self.step)
        try:
            with self.console.python_warnings():
                result = self._run(entry)
        except BaseException as error:
            self.console.close(ending(error))
            raise
        self.console.close(f"finished at step {self.step}")
        return result

    def _run(self, entry: dict[str, Any] | None) -> TrainResult:
        if self.runtime.is_main:
            self._print_start(entry)
        batches = self._batches()
        try:
            with self._signal_handlers():
                last_checkpoint = self._loop(batches)
        finally:
            batches.close()  # shuts the DataLoader's worker processes down now, not at garbage collection
        self.console.close_bar()
        self._debug_final("finished")
        if self.runtime.is_main:
            self._final_samples()
        self.reporter.close()
        return TrainResult(self.output_dir, self.step, last_checkpoint, self.history)

    def _loop(self, batches: Iterator[torch.Tensor]) -> Path | None:
        """Steps until the end; a stop signal or too many skipped updates raise TrainingStopped."""
        cfg = self.cfg
        last_checkpoint = None
        window: list[torch.Tensor] = []
        self.log_clock = time.perf_counter()
        while self.step < self.total_steps:
            try:
                stats = self._train_step(batches)
            except torch.OutOfMemoryError:
                newest = ckpt.list_checkpoints(self.ckpt_dir)
                raise UserError(out_of_memory_message(self.cfg, self.device, self.step,
                                                      str(newest[-1]) if newest else None,
                                                      self.memory_plan.budget)) from None
            self.step += 1
            self.console.advance()
            window.append(stats)
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                self._log_train(window)
                window = []
            done = self.step == self.total_steps
            if self.stop_signal is None and distributed.launcher_gone(self.runtime):
                self.stop_signal = signal.SIGTERM  # torchrun died: stop as if it had sent SIGTERM
            stop = distributed.any_rank(self.stop_signal is not None, self.runtime)
            if self.step % self.periods["validation"] == 0 or done:
                self._validate()
            if self.step % self.periods["checkpoint"] == 0 or done or stop:
                last_checkpoint = self._save_checkpoint()
            if self.step % self.periods["figures"] == 0 or done:  # after the checkpoint: side work
                self._figures()
            if stop:
                self.reporter.close()
                self._debug_final("stopped")
                raise TrainingStopped(
                    f"training stopped by signal at step {self.step}; state saved in {self.ckpt_dir}; "
                    "continue with --resume", exit_code=128 + (self.stop_signal or signal.SIGTERM))
            if self.skipper.too_many:
                self.reporter.close()
                raise TrainingStopped(
                    f"training stopped at step {self.step}: {self.skipper.consecutive} consecutive updates "
                    "were skipped (non-finite or extreme gradients); the last good checkpoint is kept in "
                    f"{self.ckpt_dir}; try a lower learning_rate or a smaller grad_clip")
        return last_checkpoint

    def _debug_final(self, how: str) -> None:
        if os.environ.get(distributed.DEBUG_DIR_ENV):
            distributed.debug_record(self.runtime, how, step=self.step,
                                     parameters=distributed.parameter_digest(self.model),
                                     ema=distributed.parameter_digest(self.ema.model))

    def _batches(self) -> Iterator[torch.Tensor]:
        """Micro-batches forever, starting where the step count says the data order is, from one
        DataLoader for the whole run (sampler.EpochStream)."""
        micro = self.step * self.cfg.grad_accumulation
        epoch, start = divmod(micro, self.sampler.batches_per_epoch)
        train = self.bundle.train
        if getattr(train, "covariates", None) is not None:
            from ..data.datasets import WithCovariates

            train = WithCovariates(train)  # batches of (volumes, covariates)
        loader = DataLoader(
            EpochKeyed(train, self.seed, self.runtime.rank), batch_size=self.cfg.batch_size,
            sampler=EpochStream(self.sampler, epoch, start), num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda", drop_last=False, worker_init_fn=_ignore_stop_signals,
            # its own generator: creating the loader must not consume the global RNG, or a run
            # resumed mid-epoch would diverge from the uninterrupted one
            generator=torch.Generator().manual_seed(self.seed * 7919 + epoch),
        )
        yield from _start_workers(loader)

    def _autocast(self):
        return autocast_for(self.cfg.precision, self.device)

    def _train_step(self, batches: Iterator[torch.Tensor]) -> torch.Tensor:
        cfg = self.cfg
        self.net.train()
        for group in self.optimiser.param_groups:
            group["lr"] = cfg.learning_rate * lr_factor(self.step, cfg, self.total_steps)
        weight = kl_weight(self.step, cfg)
        totals = torch.zeros(3 + self.model.num_layers, dtype=torch.float64)
        finite = True
        for micro in range(cfg.grad_accumulation):
            x, covariates = _split_batch(next(batches), self.device)
            sync = contextlib.nullcontext()
            if self.runtime.distributed and micro < cfg.grad_accumulation - 1:
                sync = self.net.no_sync()
            with sync:
                with self._autocast():
                    out = self.net(x, weight, cfg.kl_balance, cfg.kl_free_bits, covariates=covariates)
                loss = out.loss / cfg.grad_accumulation
                if cfg.l2_reg_coeff:
                    loss = loss + cfg.l2_reg_coeff * _l2_penalty(self.model) / cfg.grad_accumulation
                finite &= bool(torch.isfinite(out.loss).item())
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            totals[0] += out.elbo.mean().item() / cfg.grad_accumulation
            totals[1] += out.nll.mean().item() / cfg.grad_accumulation
            totals[3:] += out.kl_per_layer.mean(0).detach().double().cpu() / cfg.grad_accumulation
        if self.scaler:
            self.scaler.unscale_(self.optimiser)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        grad_norm = float(norm.item())
        # one decision for all ranks: the same (largest) norm and "non-finite anywhere" everywhere,
        # so every rank's skip history, counters and parameters stay identical
        local_bad = not (finite and math.isfinite(grad_norm))
        agreed = distributed.all_reduce_max(
            torch.tensor([0.0 if local_bad else grad_norm, 1.0 if local_bad else 0.0], dtype=torch.float64),
            self.runtime).cpu()
        all_finite = agreed[1].item() == 0.0
        grad_norm = agreed[0].item() if all_finite else float("nan")
        skip, why = self.skipper.should_skip(grad_norm, all_finite, self.step)
        if skip:
            self.optimiser.zero_grad(set_to_none=True)
        else:
            if self.scaler:
                self.scaler.step(self.optimiser)
            else:
                self.optimiser.step()
            self.optimiser.zero_grad(set_to_none=True)
            self.ema.update(self.model)
        if self.scaler:
            update_loss_scale(self.scaler, why)
        totals[2] = grad_norm if math.isfinite(grad_norm) else float("nan")
        return totals

    # -- side work -------------------------------------------------------------------------------
    def _log_train(self, window: list[torch.Tensor]) -> None:
        stats = torch.stack(window).nanmean(0).to(self.device, torch.float64)
        distributed.debug_record(self.runtime, "train_local", step=self.step, loss_nats_per_voxel=stats[0].item())
        stats = distributed.all_reduce_mean(stats, self.runtime).cpu()
        elbo, nll, grad_norm = stats[0].item(), stats[1].item(), stats[2].item()
        kl = stats[3:]
        lr = self.optimiser.param_groups[0]["lr"]
        voxels = self.cfg.batch_size * self.cfg.grad_accumulation * self.runtime.world_size * self.model.num_voxels
        now = time.perf_counter()
        rate = len(window) / max(now - self.log_clock, 1e-9)  # steps per second since the last log line
        self.log_clock = now
        values = {
            "loss_nats_per_voxel": elbo, "elbo_bits_per_voxel": to_bits(elbo), "nll_bits_per_voxel": to_bits(nll),
            "kl_bits_per_voxel": to_bits(kl.sum().item()), "grad_norm": grad_norm, "learning_rate": lr,
            "skipped_nonfinite": self.skipper.skipped_nonfinite, "skipped_large": self.skipper.skipped_large,
            "voxels_per_second": rate * voxels, "elapsed_seconds": now - self.started,
        }
        for i, (level, value) in enumerate(zip(self.model.layer_levels, kl.tolist())):
            values[f"kl_layer/{i:02d}_res{self.cfg.resolution >> level}"] = to_bits(value)
        self.reporter.scalars(self.step, values, "train")
        figures = {"bits": f"{to_bits(elbo):.3f}", "kl": f"{to_bits(kl.sum().item()):.3f}",
                   "gnorm": f"{grad_norm:.1f}", "skips": self.skipper.skipped_nonfinite + self.skipper.skipped_large}
        if math.isfinite(self.last_quality.get("frechet_ratio", math.nan)):
            figures["fd"] = f"{self.last_quality['frechet_ratio']:.1f}x"
        if "dead_levels" in self.last_quality:
            figures["dead"] = int(self.last_quality["dead_levels"])
        self.console.report(self.step, figures, rate)

    @torch.no_grad()
    def _validate(self) -> None:
        model = self.ema.model
        model.eval()
        data = self.bundle.val
        indices = list(range(self.runtime.rank, len(data), self.runtime.world_size))
        sums = torch.zeros(3 + model.num_layers, dtype=torch.float64, device=self.device)
        limit = self.cfg.max_validation_batches
        for b, start in enumerate(range(0, len(indices), self.cfg.batch_size)):
            if limit is not None and b >= limit:
                break
            batch = indices[start:start + self.cfg.batch_size]
            x = torch.stack([data[i] for i in batch]).to(self.device)
            with self._autocast():
                out = model(x, covariates=_covariates_of(data, batch, self.device))
            sums[0] += out.elbo.double().sum()
            sums[1] += out.nll.double().sum()
            sums[2] += x.shape[0]
            sums[3:] += out.kl_per_layer.double().sum(0)
        distributed.debug_record(self.runtime, "validation_local", step=self.step, elbo_sum=sums[0].item(),
                                 count=sums[2].item())
        sums = distributed.all_reduce_sum(sums, self.runtime)  # a mean over every validation volume
        count = max(sums[2].item(), 1.0)
        elbo, nll = sums[0].item() / count, sums[1].item() / count
        kl = (sums[3:] / count).tolist()
        values = {"loss_nats_per_voxel": elbo, "elbo_bits_per_voxel": to_bits(elbo),
                  "nll_bits_per_voxel": to_bits(nll), "kl_bits_per_voxel": to_bits(sum(kl))}
        for i, (level, value) in enumerate(zip(model.layer_levels, kl)):
            values[f"kl_layer/{i:02d}_res{self.cfg.resolution >> level}"] = to_bits(value)
        self.reporter.scalars(self.step, values, "validation")
        entry = {"step": self.step, "elbo_bits_per_voxel": to_bits(elbo)}
        if self.runtime.is_main and self.quality_on:  # the other ranks go on to the next collective
            self.last_quality = self._quality()
            entry.update({k: self.last_quality[k] for k in ("frechet_ratio", "dead_levels")
                          if math.isfinite(self.last_quality.get(k, math.nan))})
        self.history.append(entry)
        self.last_validation = elbo
        self.console.say(validation_line(self.step, values, self.last_quality if self.quality_on else {}))
        if self.runtime.is_main:
            self.reporter.curves_figure()
            self.reporter.flush()

    def _quality(self) -> dict[str, float]:
        """The sample-quality signal of the EMA model (train/quality.py), logged as quality/*.

        Rank 0 only, with no collective calls and only its own seeded generators (the global RNG
        streams, hence training, are unaffected).  A failure is reported once and turns the signal
        off: a diagnostic must not end a long run."""
        from torch.utils.data import Subset

        from . import quality

        cfg, val = self.cfg, self.bundle.val
        used = len(val)  # active units over the validation volumes that validation itself uses
        if cfg.max_validation_batches is not None:
            used = min(used, cfg.max_validation_batches * cfg.batch_size)
        try:
            if self.quality_reference is None:  # the same volumes at every validation: read them once
                self.quality_reference = quality.reference_volumes(val, self.bundle.train, cfg.quality_samples,
                                                                   self.seed)
            reference = self.quality_reference
            if getattr(val, "covariates", None) is not None:
                from ..data.datasets import WithCovariates

                val = WithCovariates(val)  # (volume, covariates) items: encoding needs both
            values = quality.sample_quality(self.ema.model, Subset(val, range(used)), reference, cfg.quality_samples,
                                            cfg.batch_size, self.device, self.seed)
        except Exception as error:  # noqa: BLE001 (any failure: warn, go on training)
            self.quality_on = False
            self.console.warning(f"the sample-quality signal failed at step {self.step} "
                                 f"({type(error).__name__}: {error}); it is off for the rest of this run")
            return {}
        if set(values) == {"seconds"}:  # too few volumes for either part
            return {}
        self.reporter.scalars(self.step, values, "quality")
        return values

    @torch.no_grad()
    def _figures(self) -> None:
        """Reconstructions and samples of the EMA model, one subject at a time under the training
        precision: a batch of ``subjects_to_plot`` full-precision volumes can need more memory than
        the training step itself (at 128³, 4 reconstructions in fp32 hold ~12.7 GiB)."""
        if not self.runtime.is_main or self.cfg.subjects_to_plot == 0:
            return
        model = self.ema.model.eval()
        n = min(self.cfg.subjects_to_plot, len(self.bundle.val))
        with self._autocast():
            if n > 0:
                x = torch.stack([self.bundle.val[i] for i in range(n)]).to(self.device)
                c = _covariates_of(self.bundle.val, range(n), self.device)
                rows = [("reconstruction", _one_by_one(model.reconstruct, x, covariates=c))]
                for level in range(1, model.decoder.num_levels):
                    rows.append((f"prior <{self.cfg.resolution >> (level - 1)}³",
                                 _one_by_one(model.reconstruct, x, covariates=c, prior_from_level=level,
                                             temperature=0.0)))
                self.reporter.reconstruction_figure(self.step, x, rows)
            generator = torch.Generator(device=self.device).manual_seed(self.seed)
            samples = torch.cat([model.sample(1, 1.0, generator=generator)
                                 for _ in range(max(1, self.cfg.subjects_to_plot))])
        path = self.reporter.sample_figure(self.step, samples, 1.0)
        self.console.say(f"figures of step {self.step} written ({path.name} and the reconstructions)", VERBOSE)

    def _save_checkpoint(self) -> Path | None:
        is_best = False
        value = getattr(self, "last_validation", None)
        if value is not None and (self.best is None or value < self.best):
            self.best, is_best = value, True
        path = None
        rank_rngs = distributed.gather_to_main(process_rng_state(), self.runtime) if self.runtime.distributed else None
        if self.runtime.is_main:
            tensors, meta = capture_state(self.model, self.ema, self.optimiser, self.scaler, self.skipper, rank_rngs)
            meta.update({
                "config": self.cfg.to_dict(), "seed": self.seed, "world_size": self.runtime.world_size,
                "memory": self.memory_plan.record(),
                "best_validation": self.best, "validation_history": self.history,
                "ema_updates": self.ema.updates, "steps_per_epoch": self.steps_per_epoch,
                "data": {"voxel_size_mm": float(self.bundle.voxel_size_mm),
                         "intensity_reference": dict(getattr(self.bundle, "intensity_reference", {}) or {}),
                         "num_train": len(self.bundle.train), "num_val": len(self.bundle.val)},
            })
            if getattr(self.bundle, "covariates", None) is not None:
                meta["covariates"] = self.bundle.covariates.to_json()  # the schema a loaded model encodes with
            if self.step == self.total_steps and self.cfg.fitted_prior and self.ema.model.condition is None:
                prior_tensors, prior_meta = self._fit_prior()
                tensors.update(prior_tensors)
                if prior_meta:
                    meta["fitted_prior"] = prior_meta
            try:
                path = ckpt.save_checkpoint(self.ckpt_dir, self.step, tensors, meta)
            except OSError as error:
                previous = ckpt.list_checkpoints(self.ckpt_dir)
                kept = f"the previous checkpoint {previous[-1].name} is intact" if previous else "no earlier checkpoint"
                raise UserError(f"could not write the step-{self.step} checkpoint in {self.ckpt_dir}: "
                                f"{error.strerror or error}; {kept}") from None
            best_path = None
            if is_best:
                ckpt.record_best(self.ckpt_dir, path, value, self.step)
                best_path = path
            else:
                recorded = ckpt.read_best(self.ckpt_dir)
                best_path = self.ckpt_dir / recorded["checkpoint"] if recorded else None
            ckpt.prune(self.ckpt_dir, self.cfg.keep_checkpoints, best_path)
            self.console.say(f"checkpoint {path.name} written" + (" (the best so far)" if is_best else ""), VERBOSE)
        distributed.barrier(self.runtime)
        return path

    def _fit_prior(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The final checkpoint's coarse-level prior (train/fit_prior.py), fitted for the EMA model
        (the one that samples) under the training precision."""
        from . import fit_prior

        volumes = fit_prior.training_volumes(self.bundle.train)
        if len(volumes) < fit_prior.MIN_VOLUMES:
            self.console.say(f"coarse-level prior: the learned one (fewer than {fit_prior.MIN_VOLUMES} usable "
                             "training volumes to fit another)", VERBOSE)
            return {}, {}
        self.ema.model.eval()
        with self._autocast():
            tensors, meta = fit_prior.fit_and_choose(self.ema.model, volumes, self.cfg.batch_size, self.seed)
        self.console.say(fit_prior.notice(meta))
        return tensors, meta

    def _final_samples(self) -> None:
        from ..sampling import write_samples

        num = max(1, self.cfg.subjects_to_plot)
        covariates, record = None, None
        schema = getattr(self.bundle, "covariates", None)
        if schema is not None:  # covariates drawn from the training scans', recorded per volume
            from ..conditional import resolve

            conditions = resolve(schema, [{} for _ in range(num)], self.seed)
            covariates = conditions.vectors
            record = {"conditions": conditions.record([f"sample_{i:04d}.nii.gz" for i in range(num)])}
        write_samples(self.ema.model, self.output_dir / "samples", num=num,
                      temperature=1.0, seed=self.seed, voxel_size_mm=float(self.bundle.voxel_size_mm),
                      batch_size=self.cfg.batch_size, device=self.device, show_progress=False,
                      extra_record=record, covariates=covariates)

    def _write_record(self) -> dict[str, Any] | None:
        """Append this session to the run record (train/run_record.py); every rank describes its
        device, rank 0 writes.  Returns the entry (rank 0)."""
        devices = distributed.gather_to_main(run_record.describe_device(self.device), self.runtime)
        if not self.runtime.is_main:
            return None
        entry = run_record.session(
            replace(self.cfg, seed=self.seed, device=self.device.type), self.requested, start_step=self.step,
            total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch, resumed_from=self.resumed_from,
            restarted=self.restarted, devices=devices or [], world_size=self.runtime.world_size,
            data={"train": len(self.bundle.train), "validation": len(self.bundle.val),
                  "voxel_size_mm": float(self.bundle.voxel_size_mm), **self._covariate_record()},
            notices=self.notices, command=self.command)
        run_record.append(self.output_dir, entry, self.notices)
        return entry

    def _covariate_record(self) -> dict[str, Any]:
        """A conditional run's covariate schema for the run record (its training rows stay in the checkpoint)."""
        schema = getattr(self.bundle, "covariates", None)
        if schema is None:
            return {}
        return {"covariates": {k: v for k, v in schema.to_json().items() if k != "bank"}}

    def _print_start(self, entry: dict[str, Any] | None) -> None:
        c, r = self.cfg, self.runtime
        effective = c.batch_size * c.grad_accumulation * r.world_size
        lines = [
            f"verydeepvae: training {c.resolution}³ model, {sum(p.numel() for p in self.model.parameters()):,} "
            f"parameters, {self.model.num_layers} latent layers, {self.model.latent_dimensions():,} latent dims",
            f"  data: {len(self.bundle.train)} training / {len(self.bundle.val)} validation volumes; "
            f"device {self.device}; {r.world_size} process(es)",
            f"  effective batch {effective} = batch_size {c.batch_size} x grad_accumulation "
            f"{c.grad_accumulation} x world size {r.world_size}; learning rate {c.learning_rate:g} "
            "(not rescaled with the effective batch)",
            f"  steps {self.step} -> {self.total_steps} ({self.steps_per_epoch} per epoch); output {self.output_dir}",
        ]
        if getattr(self.bundle, "covariates", None) is not None:
            lines += [f"  {line}" for line in self.bundle.covariates.summary_lines()]
        self.console.start(lines, self.notices, run_record.describe(entry) if entry else [])

    @contextlib.contextmanager
    def _signal_handlers(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, _frame):
            if self.stop_signal is not None:  # second signal: stop now
                raise KeyboardInterrupt
            self.stop_signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _start_workers(loader: DataLoader) -> Iterator[torch.Tensor]:
    """``iter(loader)`` with SIGINT/SIGTERM blocked while the worker processes are forked.

    Ctrl-C reaches a whole process group and torchrun signals each worker's whole process group,
    so DataLoader workers get the stop signal too.  A worker killed by it before it could ignore
    it (torch's own worker handler dies on a SIGTERM that is not from its parent) would crash the
    training process mid-step; forked with the signals blocked, it starts deaf to them, and the
    training process receives a signal that arrived meanwhile as soon as the mask is restored.
    """
    import threading

    if loader.num_workers == 0 or threading.current_thread() is not threading.main_thread():
        return iter(loader)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C / SIGTERM to the training process, which finishes its step,
    saves and then shuts them down (they also exit by themselves when it is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by _start_workers; now ignored


def _drop_records_after(path: Path, step: int) -> None:
    """On resume: forget logged records newer than the checkpoint (they will be logged again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("step", 0)) > step:
                continue
        except (ValueError, AttributeError):
            continue
        kept.append(line + "\n")
    from ..atomic import write_text

    write_text(path, "".join(kept))


def _one_by_one(function, x: torch.Tensor, covariates: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """``function(x, **kwargs)`` one volume at a time (bounded memory), with each volume's
    ``covariates`` when there are (a conditional model)."""
    if covariates is not None:
        return torch.cat([function(x[i:i + 1], covariates=covariates[i:i + 1], **kwargs) for i in range(x.shape[0])])
    return torch.cat([function(x[i:i + 1], **kwargs) for i in range(x.shape[0])])


def _split_batch(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(volumes, covariates or None) on ``device`` from a DataLoader batch (a conditional run's
    batches are pairs, data/datasets.py WithCovariates)."""
    if isinstance(batch, (list, tuple)):
        return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    return batch.to(device, non_blocking=True), None


def _covariates_of(dataset: Any, indices, device: torch.device) -> torch.Tensor | None:
    """The encoded covariates of these items of a conditional run's dataset, else None."""
    table = getattr(dataset, "covariates", None)
    return None if table is None else table[list(indices)].to(device)


def _l2_penalty(model: torch.nn.Module) -> torch.Tensor:
    """The original's regulariser: sum over weight tensors of mean(W²)."""
    return sum(p.pow(2).mean() for p in model.parameters() if p.dim() > 1)


def _check_same_architecture(cfg: Config, checkpoint: ckpt.Checkpoint) -> None:
    differences = ckpt.architecture_difference(cfg, checkpoint.config)
    if differences:
        raise CheckpointError(f"checkpoint {checkpoint.path} is of another architecture ({'; '.join(differences)})")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"output directory {directory} is not writable: {error.strerror or error}") from None
