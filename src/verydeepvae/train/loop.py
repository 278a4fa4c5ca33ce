"""The training loop: one library function, ``train``, that the CLI and tests call.

Per optimiser step: forward (optionally under bf16/fp16 autocast), backward (optionally
accumulated over micro-batches), gradient clipping, the skip decision (taken by all ranks
together), the update, the EMA update and the learning-rate schedule.  Validation (``validation.py``),
figures and checkpoints happen every N steps on rank 0's behalf; everything needed to continue
exactly is in the checkpoint.  What the loop steps with is built (and restored) by ``builder.py``;
a step's statistics are named (``stats.py``) and become one tensor only for the all-reduce.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..config import Config
from ..console import NORMAL, VERBOSE
from ..errors import Stopped, UserError
from ..model import autocast_for
from .. import checkpoint as ckpt
from . import builder, distributed, finest_layer, run_folder, run_record, validation
from .optim import free_nats_at, layer_kl_weights, lr_factor, update_loss_scale
from .threads import ThreadGovernor, governor_wanted
from .precision import configure_backends, out_of_memory_message, resolve_speed_choices
from .progress import TrainConsole, ending, start_lines, unused_level_warning, validation_line
from .batches import split_batch, training_batches
from .figures import final_samples, training_figures
from .reporting import Reporter, drop_records_after, to_bits
from .state import capture_state, process_rng_state, run_meta
from .stats import StepStats, ValidationSums, layer_kl_values, loss_values
from .stopping import StopRequest


class TrainingStopped(Stopped):
    """Training ended early on purpose (signal) or because it could not go on (divergence)."""


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    checkpoint: Path | None
    validation: list[dict[str, float]] = field(default_factory=list)


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
    given = list(notices)
    held = None
    try:
        requested = cfg
        # before the output folder is claimed: an impossible precision changes no file
        cfg = resolve_speed_choices(cfg, runtime.device, notices)
        # decided by all ranks together: torchrun's restart count can differ between nodes
        restarted = distributed.any_rank(runtime.restart_count > 0, runtime)
        held = distributed.main_first(lambda: run_folder.claim_for_training(cfg, runtime, restarted, notices), runtime,
                                      "checking the output folder")
        first = _Trainer(cfg, runtime, bundle, notices, show_progress, restarted, verbosity, command, requested)
        try:
            return first.run()
        except finest_layer.FinestLayerUnused as unused:
            first.reporter.close()  # its files are moved aside next
            died = unused
        cfg, requested, notices, record = finest_layer.second_attempt(died, requested, runtime, given)
        return _Trainer(cfg, runtime, bundle, notices, show_progress, False, verbosity, command, requested,
                        record).run()
    finally:
        if held is not None:
            held.release()
        distributed.teardown()


class _Trainer:
    """Steps a run built by :func:`builder.build`: training steps, validation, figures, checkpoints."""

    def __init__(self, cfg: Config, runtime: distributed.Runtime, bundle: Any, notices: list[str],
                 show_progress: bool | None, restarted: bool = False, verbosity: int = NORMAL,
                 command: Sequence[str] | None = None, requested: Config | None = None,
                 restart: dict[str, Any] | None = None):
        self.requested = requested or cfg  # as asked for: the run record notes what the run chose by itself
        self.command = command
        self.restarted = restarted
        configure_backends(cfg, runtime.device, notices)
        self.runtime = runtime
        self.notices = notices
        self.output_dir = Path(cfg.output_dir)
        self.ckpt_dir = ckpt.checkpoint_dir(self.output_dir)
        self.console = TrainConsole(self.output_dir, runtime.is_main, verbosity, show_progress)
        parts = builder.build(cfg, runtime, bundle, notices, show_progress, restarted, verbosity)
        self.cfg, self.seed, self.memory_plan, self.bundle = parts.cfg, parts.seed, parts.memory_plan, parts.bundle
        self.model, self.ema, self.net = parts.model, parts.ema, parts.net
        self.free_nats = self.model.free_nats(self.cfg.kl_free_bits, self.cfg.kl_free_bits_per_latent,
                                              self.cfg.kl_free_bits_per_latent_resolutions)
        self.optimiser, self.scaler, self.skipper = parts.optimiser, parts.scaler, parts.skipper
        self.sampler, self.steps_per_epoch, self.total_steps = parts.sampler, parts.steps_per_epoch, parts.total_steps
        self.step, self.best, self.history = parts.step, parts.best, parts.history
        self.resumed_from = parts.resumed_from.path if parts.resumed_from is not None else None
        # the record of an earlier attempt whose finest layer died (train/finest_layer.py), kept in
        # every checkpoint of this one; the check itself, where it still applies
        self.restart = restart or (parts.resumed_from.meta.get(finest_layer.RECORD_KEY) if parts.resumed_from else None)
        self.finest_check = finest_layer.FinestLayerCheck(self.cfg, self.model.layer_levels, self.step,
                                                          self.total_steps)
        self.device = runtime.device
        self.last_quality: dict[str, float] = {}  # the latest sample-quality signal (rank 0; progress bar)
        self.quality_on = self.cfg.quality_samples > 0
        self.threads = ThreadGovernor(governor_wanted(cfg.deterministic, cfg.threads_per_rank, runtime.device,
                                                      runtime.world_size))
        self.quality_reference: np.ndarray | None = None  # real volumes of the quality signal (rank 0)
        if parts.resumed_from is not None and runtime.is_main:
            drop_records_after(self.output_dir / "metrics.jsonl", self.step)
        self.reporter = Reporter(self.output_dir, runtime.is_main,
                                 purge_step=self.step + 1 if parts.resumed_from is not None else None)
        self.stop = StopRequest()
        self.periods = self._periods()
        self.started = time.perf_counter()  # training wall clock of this process (logged as elapsed_seconds)
        self.log_clock = self.started  # when the window of the next train log line began

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

    def _run(self, entry: run_record.Session | None) -> TrainResult:
        if self.runtime.is_main:
            lines = start_lines(self.cfg, self.device, self.runtime.world_size, self.model, self.bundle, self.step,
                                self.total_steps, self.steps_per_epoch, self.output_dir)
            self.console.start(lines, self.notices, run_record.describe(entry) if entry else [])
        batches = training_batches(self.bundle.train, self.sampler, self.step, self.cfg, self.seed,
                                   self.runtime.rank, self.device)
        try:
            with self.stop.listening():
                last_checkpoint = self._loop(batches)
        finally:
            batches.close()  # shuts the DataLoader's worker processes down now, not at garbage collection
            self.threads.restore()
        self.console.close_bar()
        advice = unused_level_warning(self.last_quality, self.cfg, len(self.bundle.val)) if self.quality_on else None
        if self.runtime.is_main and advice:
            self.console.warning(advice)
        self._debug_final("finished")
        if self.runtime.is_main:
            final_samples(self.ema.model, self.bundle, self.cfg, self.seed, self.device, self.output_dir)
        self.reporter.close()
        return TrainResult(self.output_dir, self.step, last_checkpoint, self.history)

    def _loop(self, batches: Iterator[torch.Tensor]) -> Path | None:
        """Steps until the end; a stop signal or too many skipped updates raise TrainingStopped."""
        cfg = self.cfg
        last_checkpoint = None
        window: list[StepStats] = []
        self.log_clock = time.perf_counter()
        while self.step < self.total_steps:
            try:
                stats, change = self.threads.run_step(lambda: self._train_step(batches))
            except torch.OutOfMemoryError:
                newest = ckpt.list_checkpoints(self.ckpt_dir)
                raise UserError(out_of_memory_message(self.cfg, self.device, self.step,
                                                      str(newest[-1]) if newest else None,
                                                      self.memory_plan.budget)) from None
            self.step += 1
            self.console.advance()
            if change:
                self.console.notice(f"step {self.step}: {change}")
            window.append(stats)
            self.finest_check.record(self.step, stats.kl)
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                self._log_train(window)
                window = []
            self.finest_check.raise_if_unused(self.step, self.runtime)
            done = self.step == self.total_steps
            if self.stop.signum is None and distributed.launcher_gone(self.runtime):
                self.stop.signum = signal.SIGTERM  # torchrun died: stop as if it had sent SIGTERM
            stop = distributed.any_rank(self.stop.signum is not None, self.runtime)
            side_work = False
            if self.step % self.periods["validation"] == 0 or done:
                self._validate()
                side_work = True
            if self.step % self.periods["checkpoint"] == 0 or done or stop:
                last_checkpoint = self._save_checkpoint()
                side_work = True
            if self.step % self.periods["figures"] == 0 or done:  # after the checkpoint: side work
                self._figures()
                side_work = True
            if side_work:
                self.threads.settle_after_side_work()
            if stop:
                self.reporter.close()
                self._debug_final("stopped")
                raise TrainingStopped(
                    f"training stopped by signal at step {self.step}; state saved in {self.ckpt_dir}; "
                    "continue with --resume", exit_code=128 + (self.stop.signum or signal.SIGTERM))
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

    def _autocast(self):
        return autocast_for(self.cfg.precision, self.device)

    def _train_step(self, batches: Iterator[torch.Tensor]) -> StepStats:
        cfg = self.cfg
        self.net.train()
        for group in self.optimiser.param_groups:
            group["lr"] = cfg.learning_rate * lr_factor(self.step, cfg, self.total_steps)
        weight = layer_kl_weights(self.step, cfg, self.model.layer_levels, self.device)
        free_nats = free_nats_at(self.step, cfg, self.free_nats)
        stats = StepStats(0.0, 0.0, 0.0, torch.zeros(self.model.num_layers, dtype=torch.float64))
        finite = True
        for micro in range(cfg.grad_accumulation):
            x, covariates = split_batch(next(batches), self.device)
            sync = contextlib.nullcontext()
            if self.runtime.distributed and micro < cfg.grad_accumulation - 1:
                sync = self.net.no_sync()
            with sync:
                with self._autocast():
                    out = self.net(x, weight, cfg.kl_balance, free_nats, covariates=covariates)
                loss = out.loss / cfg.grad_accumulation
                if cfg.l2_reg_coeff:
                    loss = loss + cfg.l2_reg_coeff * _l2_penalty(self.model) / cfg.grad_accumulation
                finite &= bool(torch.isfinite(out.loss).item())
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            stats.elbo += out.elbo.mean().item() / cfg.grad_accumulation
            stats.nll += out.nll.mean().item() / cfg.grad_accumulation
            stats.kl += out.kl_per_layer.mean(0).detach().double().cpu() / cfg.grad_accumulation
        stats.grad_norm = self._update(finite)
        return stats

    def _update(self, finite: bool) -> float:
        """Clip, decide (with every rank) whether to skip, step the optimiser and the EMA; returns
        the gradient norm all ranks agreed on (NaN when some rank's gradients were not finite)."""
        if self.scaler:
            self.scaler.unscale_(self.optimiser)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
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
        return grad_norm if math.isfinite(grad_norm) else float("nan")

    # -- side work -------------------------------------------------------------------------------
    def _log_train(self, window: list[StepStats]) -> None:
        mean = StepStats.window_mean(window).to(self.device, torch.float64)
        distributed.debug_record(self.runtime, "train_local", step=self.step, loss_nats_per_voxel=mean[0].item())
        stats = StepStats.from_tensor(distributed.all_reduce_mean(mean, self.runtime))
        kl_total = stats.kl.sum().item()
        now = time.perf_counter()
        rate = len(window) / max(now - self.log_clock, 1e-9)  # steps per second since the last log line
        self.log_clock = now
        voxels = self.cfg.batch_size * self.cfg.grad_accumulation * self.runtime.world_size * self.model.num_voxels
        values = {
            **loss_values(stats.elbo, stats.nll, kl_total), "grad_norm": stats.grad_norm,
            "learning_rate": self.optimiser.param_groups[0]["lr"],
            "skipped_nonfinite": self.skipper.skipped_nonfinite, "skipped_large": self.skipper.skipped_large,
            "voxels_per_second": rate * voxels, "elapsed_seconds": now - self.started,
            **layer_kl_values(stats.kl.tolist(), self.model.layer_levels, self.cfg.resolution),
        }
        self.reporter.scalars(self.step, values, "train")
        figures = {"bits": f"{to_bits(stats.elbo):.3f}", "kl": f"{to_bits(kl_total):.3f}",
                   "gnorm": f"{stats.grad_norm:.1f}",
                   "skips": self.skipper.skipped_nonfinite + self.skipper.skipped_large}
        if math.isfinite(self.last_quality.get("frechet_ratio", math.nan)):
            figures["fd"] = f"{self.last_quality['frechet_ratio']:.1f}x"
        if "dead_levels" in self.last_quality:
            figures["dead"] = int(self.last_quality["dead_levels"])
        self.console.report(self.step, figures, rate)

    def _validate(self) -> None:
        sums = validation.local_sums(self.ema.model, self.bundle.val, self.runtime, self.cfg, self.device,
                                     self._autocast)
        distributed.debug_record(self.runtime, "validation_local", step=self.step, elbo_sum=sums.elbo.item(),
                                 count=sums.count.item())
        sums = ValidationSums.from_tensor(distributed.all_reduce_sum(sums.to_tensor(), self.runtime))
        elbo, values = validation.validation_values(sums, self.ema.model.layer_levels, self.cfg.resolution)
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
        from . import quality  # only when the signal is on

        try:
            values, self.quality_reference = quality.validation_signal(
                self.ema.model, self.bundle, self.cfg, self.device, self.seed, self.quality_reference)
        except Exception as error:  # noqa: BLE001 (any failure: warn, go on training)
            self.quality_on = False
            self.console.warning(f"the sample-quality signal failed at step {self.step} "
                                 f"({type(error).__name__}: {error}); it is off for the rest of this run")
            return {}
        if set(values) == {"seconds"}:  # too few volumes for either part
            return {}
        self.reporter.scalars(self.step, values, "quality")
        return values

    def _figures(self) -> None:
        if not self.runtime.is_main or self.cfg.subjects_to_plot == 0:
            return
        path = training_figures(self.ema.model, self.cfg, self.bundle.val, self.device, self.seed, self.reporter,
                                self.step)
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
            meta.update(run_meta(self.cfg, self.seed, self.runtime.world_size, self.memory_plan.record(), self.best,
                                 self.history, self.ema.updates, self.steps_per_epoch, self.bundle))
            if self.restart:
                meta[finest_layer.RECORD_KEY] = self.restart
            if self.step == self.total_steps and self.cfg.fitted_prior and self.ema.model.condition is None:
                from . import fit_prior  # only at the end of a run

                prior_tensors, prior_meta = fit_prior.for_final_checkpoint(
                    self.ema.model, self.bundle.train, self.cfg.batch_size, self.seed, self._autocast, self.console,
                    self.cfg.fitted_prior_components)
                tensors.update(prior_tensors)
                if prior_meta:
                    meta["fitted_prior"] = prior_meta
            if self.step == self.total_steps and self.cfg.fit_voxel_noise:
                from . import fit_voxel_noise  # only at the end of a run

                noise = fit_voxel_noise.for_final_checkpoint(self.ema.model, self.bundle.train, self.cfg.batch_size,
                                                             self.seed, self._autocast, self.console)
                if noise:
                    meta["voxel_noise"] = noise
            try:
                path = ckpt.save_checkpoint(self.ckpt_dir, self.step, tensors, meta)
            except OSError as error:
                previous = ckpt.list_checkpoints(self.ckpt_dir)
                kept = f"the previous checkpoint {previous[-1].name} is intact" if previous else "no earlier checkpoint"
                raise UserError(f"could not write the step-{self.step} checkpoint in {self.ckpt_dir}: "
                                f"{error.strerror or error}; {kept}") from None
            ckpt.keep_newest_and_best(self.ckpt_dir, path, self.step, self.cfg.keep_checkpoints,
                                      value if is_best else None)
            self.console.say(f"checkpoint {path.name} written" + (" (the best so far)" if is_best else ""), VERBOSE)
        distributed.barrier(self.runtime)
        return path

    def _write_record(self) -> run_record.Session | None:
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
                  "voxel_size_mm": float(self.bundle.voxel_size_mm), **run_record.covariate_record(self.bundle)},
            notices=self.notices, command=self.command)
        run_record.append(self.output_dir, entry, self.notices)
        return entry


def _l2_penalty(model: torch.nn.Module) -> torch.Tensor:
    """The original's regulariser: sum over weight tensors of mean(W²)."""
    return sum(p.pow(2).mean() for p in model.parameters() if p.dim() > 1)
