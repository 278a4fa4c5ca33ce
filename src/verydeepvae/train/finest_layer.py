"""A run whose finest latent layer dies in its first steps starts again, with an allowance.

Why: in the hour-long phantom runs (README, "The 60-minute recipe") three training seeds of twelve
lost their 32³ layer during its KL warm-up. Its KL read 0.0001 bits/voxel from step 300 on and the
layer never came back, not even when the allowance was switched on later (a resumed run, 4,200 more
steps). Trained from step 0 with ``kl_free_bits_per_latent=0.001`` at every layer, all three kept
the layer (two met every target over their hour); the nine seeds whose layer lived read
0.0016-0.026 bits/voxel at step 500 (docs/training-recipe.md). The allowance is not simply always
on because it makes a live run's samples more alike (seed 4). So the check costs a run whose layer
died its first ``finest_layer_restart_step`` steps once more, and a run whose layer lives nothing.

The check (``finest_layer_restart_step``, 0: off): at that step, the mean KL of the finest layers
(those at the model's finest latent resolution) over the last :data:`WINDOW` steps, in bits/voxel
and averaged over the ranks, against ``finest_layer_restart_kl``. At or below it the loop raises
:class:`FinestLayerUnused`; ``loop.train`` sets the first attempt's files aside and trains afresh
with :func:`restart_config`. The checkpoints of the second attempt record it
(:func:`restart_record`), so ``--resume`` with the original command keeps the allowance
(``resume_changes.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from ..config import Config
from ..errors import Stopped
from ..json_types import JSONObject
from . import distributed, run_folder
from .precision import resolve_speed_choices
from .progress import FINEST_LAYER_ALLOWANCES, lasting_allowance
from .reporting import to_bits

WINDOW = 50  # steps whose KL the check averages (one step's KL is noisy)
ALLOWANCE = FINEST_LAYER_ALLOWANCES[0]  # nats per latent dimension, at every layer, for the whole run
ALLOWANCE_KEYS = ("kl_free_bits_per_latent", "kl_free_bits_per_latent_resolutions", "kl_free_bits_per_latent_steps")
RECORD_KEY = "finest_layer_restart"  # in a checkpoint's metadata


class FinestLayerUnused(Stopped):
    """The finest latent layer carried (almost) no KL at the check: this attempt ends here."""

    def __init__(self, step: int, steps_averaged: int, kl_bits_per_voxel: float):
        super().__init__(f"the finest latent layer carried {kl_bits_per_voxel:.4f} bits/voxel of KL over the "
                         f"{steps_averaged} steps up to step {step}: starting again with an allowance")
        self.step = step
        self.steps_averaged = steps_averaged
        self.kl_bits_per_voxel = kl_bits_per_voxel


def has_allowance(cfg: Config) -> bool:
    """Whether ``cfg`` already gives every layer at least the allowance for the whole run."""
    return lasting_allowance(cfg) >= ALLOWANCE


def restart_config(cfg: Config) -> Config:
    """``cfg`` with the allowance at every layer for the whole run (a larger one configured is kept),
    for a fresh start (a first attempt that was itself resumed has been set aside)."""
    return dataclasses.replace(cfg, kl_free_bits_per_latent=max(cfg.kl_free_bits_per_latent, ALLOWANCE),
                               kl_free_bits_per_latent_resolutions=None, kl_free_bits_per_latent_steps=0,
                               resume=False)


def second_attempt(error: FinestLayerUnused, requested: Config, runtime: distributed.Runtime,
                   notices: list[str]) -> tuple[Config, Config, list[str], JSONObject]:
    """What the run trains with when it starts again from step 0, as ``--overwrite --set
    kl_free_bits_per_latent=0.001`` would: the same seed and data, the first attempt's files set
    aside (the data cache kept).  ``requested``: the configuration as the command asked for it;
    ``notices``: the command's own, before training decided anything.  Returns the resolved
    configuration, the requested one, the notices and the record the checkpoints keep."""
    moved = distributed.main_first(
        lambda: str(run_folder.set_aside_first_attempt(requested.output_dir)) if runtime.is_main else "", runtime,
        "setting the first attempt aside")
    record = restart_record(requested, error, moved)
    again = restart_config(requested)
    notices = [*notices, restart_notice(record, again)]
    return resolve_speed_choices(again, runtime.device, notices), again, notices, record


def restart_record(asked: Config, error: FinestLayerUnused, first_attempt: str) -> JSONObject:
    """What the second attempt's checkpoints keep about the restart: when, what the layer read, the
    allowance as the command asked for it (``asked``), and where the first attempt's files went."""
    return {"step": error.step, "steps_averaged": error.steps_averaged, "kl_bits_per_voxel": error.kl_bits_per_voxel,
            "threshold_bits_per_voxel": asked.finest_layer_restart_kl,
            "asked": {key: getattr(asked, key) for key in ALLOWANCE_KEYS}, "first_attempt": first_attempt}


def restart_notice(record: JSONObject, cfg: Config) -> str:
    """The notice the second attempt opens with (console, train.log, the run record)."""
    return (f"the finest latent layer carried {record['kl_bits_per_voxel']:.4f} bits/voxel of KL over the "
            f"{record['steps_averaged']} steps up to step {record['step']} (at most "
            f"{record['threshold_bits_per_voxel']:g}: unused, "
            "and such a layer never came back in the hour-long phantom runs); training started again from step 0 "
            f"with kl_free_bits_per_latent={cfg.kl_free_bits_per_latent:g} at every layer; the first attempt's "
            f"files are in {record['first_attempt']}")


class FinestLayerCheck:
    """Collects the finest layers' KL over the :data:`WINDOW` steps up to ``finest_layer_restart_step``
    and decides there. Inactive when the step is 0, already passed (a resumed run), not before the
    run's end, or when the configuration already has the allowance."""

    def __init__(self, cfg: Config, layer_levels: Sequence[int], start_step: int, total_steps: int):
        step = cfg.finest_layer_restart_step
        active = 0 < step < total_steps and start_step < step and not has_allowance(cfg)
        self.step = step if active else None
        self.threshold = cfg.finest_layer_restart_kl
        finest = min(layer_levels) if len(layer_levels) else 0
        self.layers = [i for i, level in enumerate(layer_levels) if level == finest]
        self.sum = 0.0  # nats/voxel, summed over the finest layers and the recorded steps
        self.count = 0

    def record(self, step: int, kl_per_layer: torch.Tensor) -> None:
        """``kl_per_layer``: one step's KL of every layer (nats/voxel, this rank's batch); ``step``:
        the steps done, this one included."""
        if self.step is not None and self.step - WINDOW < step <= self.step:
            self.sum += float(kl_per_layer[self.layers].sum())
            self.count += 1

    def unused_at(self, step: int, runtime: Any) -> float | None:
        """At the check step (every rank calls it there, whose all-reduce it joins): the finest
        layers' mean KL in bits/voxel when it is at or below the threshold, else None."""
        if step != self.step:
            return None
        local = torch.tensor([self.sum / max(self.count, 1)], dtype=torch.float64, device=runtime.device)
        bits = to_bits(distributed.all_reduce_mean(local, runtime).item())
        return bits if bits <= self.threshold else None

    def raise_if_unused(self, step: int, runtime: Any) -> None:
        """:class:`FinestLayerUnused` at the check step when the finest layers are unused."""
        bits = self.unused_at(step, runtime)
        if bits is not None:
            raise FinestLayerUnused(step, self.count, bits)
