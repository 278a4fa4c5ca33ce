"""What training tells a person: on the console, and in ``<run>/train.log``.

The console (rank 0 only):

* a progress bar where :func:`console.show_bar` allows one (a terminal); anywhere else (a file,
  a pipe: a cluster job's log) one plain line every ``log_every`` steps instead, with the same
  figures, the seconds per step and the time left, and never a carriage return;
* the start banner, notices, warnings and one line per validation, unless ``--quiet``
  (:data:`console.QUIET`: nothing but errors and the final line, which the CLI prints);
* with ``--verbose``, also a line for every checkpoint and figure written.

``train.log`` gets, whatever the verbosity, every line worth keeping with the time it was written:
the banner, notices, warnings (the program's and Python's, e.g. torch's), validations,
checkpoints, and how the session ended (finished, stopped, error).  It is appended to, so a
resumed run continues its log.  Per-step figures are not repeated there: ``metrics.jsonl`` has them.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

from ..console import NORMAL, QUIET, VERBOSE, bar, show_bar
from ..errors import Stopped, UserError
from ..json_types import JSONObject

LOG_NAME = "train.log"


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


class TrainConsole:
    """The console and the log file of one training process (silent on ranks other than 0)."""

    def __init__(self, output_dir: Path, enabled: bool, verbosity: int = NORMAL, show_progress: bool | None = None):
        self.enabled = enabled
        self.verbosity = verbosity if enabled else QUIET
        self.log_path = Path(output_dir) / LOG_NAME
        self.show_progress = show_progress
        self.bar: Any = None
        self.total = 0
        self.log: IO[str] | None = None

    # -- the session ------------------------------------------------------------------------------
    def open(self, total: int, initial: int) -> None:
        """Open the log (appending) and the progress display for steps ``initial`` -> ``total``."""
        if not self.enabled:
            return
        self.log = open(self.log_path, "a", encoding="utf-8", buffering=1)  # line-buffered: a crash loses nothing
        self.total = total
        if self.verbosity >= NORMAL and show_bar(self.show_progress, total - initial):
            self.bar = bar(total=total, initial=initial, unit="step", desc="train", show=self.show_progress)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self, how: str | None = None) -> None:
        """Close the bar and the log; ``how`` (e.g. ``finished at step 40``) is logged first."""
        self.close_bar()
        if self.log is not None:
            if how:
                self._to_log(how)
            self.log.close()
            self.log = None

    # -- messages ---------------------------------------------------------------------------------
    def say(self, message: str, level: int = NORMAL) -> None:
        """To the log, and to stdout when the verbosity reaches ``level``."""
        self._to_log(message)
        if self.verbosity >= level:
            self._to_console(message, sys.stdout)

    def notice(self, message: str) -> None:
        self.say(f"notice: {message}")

    def warning(self, message: str) -> None:
        """To the log, and to stderr unless quiet."""
        self._to_log(f"warning: {message}")
        if self.verbosity >= NORMAL:
            self._to_console(f"verydeepvae: warning: {message}", sys.stderr)

    def log_only(self, message: str) -> None:
        self._to_log(message)

    def start(self, lines: list[str], notices: list[str], details: Sequence[str] = ()) -> None:
        """The start banner, the notices so far, and ``details`` (shown only when verbose)."""
        for line in lines:
            self.say(line)
        for line in details:
            self.say(line, VERBOSE)
        for notice in notices:
            self.say(f"  notice: {notice}")

    # -- progress ---------------------------------------------------------------------------------
    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def report(self, step: int, figures: JSONObject, steps_per_second: float) -> None:
        """The figures of the latest steps: on the bar, or as one plain line where there is none."""
        if self.bar is not None:
            self.bar.set_postfix(**figures, refresh=False)
            return
        if self.verbosity < NORMAL:
            return
        from tqdm import tqdm

        shown = " ".join(f"{key}={value}" for key, value in figures.items())
        pace = ""
        if steps_per_second > 0:
            left = tqdm.format_interval((self.total - step) / steps_per_second)
            pace = f" {1 / steps_per_second:.2f} s/step, {left} left"
        percent = 100 * step // max(self.total, 1)
        self._to_console(f"{_now()} step {step}/{self.total} ({percent}%) {shown}{pace}", sys.stdout)

    @contextlib.contextmanager
    def python_warnings(self) -> Iterator[None]:
        """Python warnings raised meanwhile (torch's, numpy's...) also go to the log; on the
        console they appear as before, unless quiet."""
        if not self.enabled:
            yield
            return
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            self._to_log(f"warning: {category.__name__}: {message} ({filename}:{lineno})")
            if self.verbosity >= NORMAL:
                previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        try:
            yield
        finally:
            warnings.showwarning = previous

    # -- writing ----------------------------------------------------------------------------------
    def _to_log(self, message: str) -> None:
        if self.log is not None:
            for line in message.splitlines() or [""]:
                self.log.write(f"{_now()} {line.strip()}\n")

    def _to_console(self, message: str, stream: IO[str]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            from tqdm import tqdm

            tqdm.write(message, file=stream)  # above the bar, which is then drawn again
        else:
            stream.write(message + "\n")
        stream.flush()  # a redirected stdout is block-buffered: a job's log shows each line as it comes


def validation_line(step: int, values: dict[str, float], quality: dict[str, float]) -> str:
    """One validation's figures (and the sample-quality signal's, when there is one) in a line."""
    line = (f"validation at step {step}: {values['elbo_bits_per_voxel']:.4f} bits/voxel "
            f"(reconstruction {values['nll_bits_per_voxel']:.4f}, KL {values['kl_bits_per_voxel']:.4f})")
    if math.isfinite(quality.get("frechet_ratio", math.nan)):
        line += f"; Fréchet ratio {quality['frechet_ratio']:.2f}"
    rough, fine = quality.get("roughness_ratio", math.nan), quality.get("fine_correlation_gap", math.nan)
    if math.isfinite(rough) and math.isfinite(fine):
        line += f"; texture: roughness {rough:.2f}x real, fine correlation {fine:+.2f} from real"
    if "dead_levels" in quality:
        line += f"; dead latent levels {int(quality['dead_levels'])}"
        if quality["dead_levels"]:
            line += f" ({_level_names(unused_levels(quality))})"
    return line


# the fewest validation volumes whose posterior means can call a level unused: from 5 (the demo's)
# the count of a level with a few borderline units flips between readings (the demo's 2³ read unused
# at its last validation, in use on 192 held-out phantoms)
MIN_VOLUMES_TO_WARN = 16
# the allowances per latent dimension (nats; at every layer, for the whole run) that kept a 32³
# layer which otherwise died in its first steps (training seeds 6 and 7 with 0.001, seed 6 with 0.003;
# README "The 60-minute recipe"); the same allowance at the 32³ layer alone kept seed 7's layer but
# not seed 6's
FINEST_LAYER_ALLOWANCES = (0.001, 0.003)


def lasting_allowance(cfg: Any) -> float:
    """The free nats per latent dimension ``cfg`` gives every layer for the whole run (0 when the
    allowance is limited to some resolutions or to the first steps)."""
    everywhere = cfg.kl_free_bits_per_latent_steps == 0 and cfg.kl_free_bits_per_latent_resolutions is None
    return cfg.kl_free_bits_per_latent if everywhere else 0.0


def active_units_by_level(quality: dict[str, Any]) -> dict[int, float]:
    """``{edge length: active units}`` from a quality signal's ``active_units_res{r}`` keys (train/quality.py)."""
    prefix = "active_units_res"
    return {int(k[len(prefix):]): v for k, v in quality.items()
            if k.startswith(prefix) and isinstance(v, (int, float))}


def unused_levels(quality: dict[str, float]) -> list[int]:
    """Edge lengths of the latent levels with no active unit in a quality signal, finest first."""
    return sorted((r for r, v in active_units_by_level(quality).items() if v == 0), reverse=True)


def unused_level_warning(quality: dict[str, float], cfg: Any, volumes: int) -> str | None:
    """What to tell a person whose run ends with unused latent levels, or None when every level is used
    or ``volumes`` (the validation volumes the count came from) are too few to tell.

    An unused level means the samples lack what it would carry (the finest: texture and small
    structures; the coarsest: global shape).  When no level is used the model has not learned to
    encode anything yet, and more steps come first.  Otherwise the remedies named are the ones that
    kept such levels in use in the hour-long phantom runs (README, "The 60-minute recipe"), left out
    where the configuration already has them."""
    dead = unused_levels(quality)
    if not dead or volumes < MIN_VOLUMES_TO_WARN:
        return None
    text = (f"training ended with latent level(s) {_level_names(dead)} unused (no active unit at the last "
            "validation): the samples lack what they would carry")
    levels = list(active_units_by_level(quality))
    if len(dead) == len(levels):
        return text + "; the model encodes nothing yet: train for more steps"
    finest = max(levels)
    remedies = []
    allowance = lasting_allowance(cfg)
    if finest in dead and allowance < FINEST_LAYER_ALLOWANCES[-1]:
        larger = next(a for a in FINEST_LAYER_ALLOWANCES if a > allowance)
        remedies.append(f"--set kl_free_bits_per_latent={larger:g} (for a {finest}³ layer that dies early)")
    if any(r < finest for r in dead) and cfg.kl_free_bits == 0:
        remedies.append("--set kl_free_bits=2 (for the coarse levels)")
    if remedies:
        text += "; what kept such levels in use in hour-long phantom runs: " + ", ".join(remedies)
    return text + "; see the README, \"The 60-minute recipe\""


def _level_names(resolutions: Sequence[int]) -> str:
    return ", ".join(f"{r}³" for r in resolutions)


def ending(error: BaseException) -> str:
    """How a session ended, for train.log (the console shows it through the CLI)."""
    if isinstance(error, Stopped):
        return f"stopped: {error}"
    if isinstance(error, UserError):
        return f"error: {error}"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return f"error: {type(error).__name__}: {error} (a bug: the traceback is on the console)"


def start_lines(cfg: Any, device: Any, world_size: int, model: Any, bundle: Any, step: int, total_steps: int,
                steps_per_epoch: int, output_dir: Path) -> list[str]:
    """The lines that open a training run's console output: model size, data, device, batch and steps."""
    c = cfg
    effective = c.batch_size * c.grad_accumulation * world_size
    lines = [
        f"verydeepvae: training {c.resolution}³ model, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters, {model.num_layers} latent layers, {model.latent_dimensions():,} latent dims",
        f"  data: {len(bundle.train)} training / {len(bundle.val)} validation volumes; "
        f"device {device}; {world_size} process(es)",
        f"  effective batch {effective} = batch_size {c.batch_size} x grad_accumulation "
        f"{c.grad_accumulation} x world size {world_size}; learning rate {c.learning_rate:g} "
        "(not rescaled with the effective batch)",
        f"  steps {step} -> {total_steps} ({steps_per_epoch} per epoch); output {output_dir}",
    ]
    if getattr(bundle, "covariates", None) is not None:
        lines += [f"  {line}" for line in bundle.covariates.summary_lines()]
    return lines
