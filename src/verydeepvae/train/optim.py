"""Optimiser, learning-rate and KL schedules, EMA weights and the update-skipping policy."""

from __future__ import annotations

import math
from collections import deque
from typing import Sequence

import torch
from torch import nn

from ..config import Config


def build_optimiser(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimiser == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.9), weight_decay=cfg.weight_decay)
    return torch.optim.Adamax(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: Config, total_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to ``lr_min_ratio``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr_min_ratio + (1.0 - cfg.lr_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def kl_weight(step: int, cfg: Config) -> float:
    """Optional linear KL warm-up from 1e-4 to 1 (off when kl_warmup_steps is 0)."""
    if cfg.kl_warmup_steps <= 0 or step >= cfg.kl_warmup_steps:
        return 1.0
    return max(1e-4, step / cfg.kl_warmup_steps)


def layer_kl_weights(step: int, cfg: Config, layer_levels: list[int],
                     device: torch.device | str = "cpu") -> float | torch.Tensor:
    """The KL weight at this step: one number, or with ``kl_warmup_resolutions`` a (layers,) tensor
    in which only the layers at those resolutions follow the warm-up and the others weigh 1."""
    weight = kl_weight(step, cfg)
    if cfg.kl_warmup_resolutions is None or weight >= 1.0:
        return weight
    warm, resolutions = set(cfg.kl_warmup_resolutions), cfg.level_resolutions()
    return torch.tensor([weight if resolutions[level] in warm else 1.0 for level in layer_levels], device=device)


def free_nats_at(step: int, cfg: Config, with_allowance: float | Sequence[float]) -> float | Sequence[float]:
    """Free nats per layer and volume at this step: ``with_allowance`` (VeryDeepVAE.free_nats, the
    per-dimension allowance included) for the first ``kl_free_bits_per_latent_steps`` steps (0: for
    every step), then ``kl_free_bits`` alone for every layer."""
    ends = cfg.kl_free_bits_per_latent_steps
    return with_allowance if not ends or step < ends else cfg.kl_free_bits


class EMA:
    """Exponential moving average of the weights, used for validation and sampling.

    The rate ramps up as min(rate, (1 + updates) / (10 + updates)) so that short runs are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, rate: float):
        self.rate = rate
        self.updates = 0
        self.model = _clone(model)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        rate = min(self.rate, (1.0 + self.updates) / (10.0 + self.updates))
        ema_params = [p for p in self.model.parameters()]
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - rate)


def _clone(model: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone.eval()


class UpdateSkipper:
    """Decides whether an optimiser step is taken, given the pre-clip gradient norm.

    A step is skipped when the loss or the gradient is non-finite, or when the norm exceeds
    ``skip_factor`` times the median of the recent norms (or the absolute ``skip_threshold`` when
    set).  Every finite norm, taken or skipped, enters the history, so a lasting change of scale
    moves the median and the threshold follows: the policy cannot lock training up the way a
    fixed threshold can (openai/vdvae#25).  No norm-based skips happen during the first
    ``skip_warmup_steps`` steps, when norms are large and changing fast.
    """

    def __init__(self, cfg: Config):
        self.factor = cfg.skip_factor
        self.absolute = cfg.skip_threshold
        self.warmup = cfg.skip_warmup_steps
        self.max_consecutive = cfg.max_consecutive_skips
        self.history: deque[float] = deque(maxlen=cfg.skip_window)
        self.skipped_nonfinite = 0
        self.skipped_large = 0
        self.consecutive = 0

    def threshold(self) -> float:
        limit = math.inf
        if len(self.history) >= 5:
            ordered = sorted(self.history)
            limit = self.factor * ordered[len(ordered) // 2]
        if self.absolute is not None:
            limit = min(limit, self.absolute)
        return limit

    def should_skip(self, grad_norm: float, loss_finite: bool, step: int) -> tuple[bool, str]:
        if not loss_finite or not math.isfinite(grad_norm):
            self.skipped_nonfinite += 1
            self.consecutive += 1
            return True, "non-finite"
        skip = step >= self.warmup and grad_norm > self.threshold()
        self.history.append(grad_norm)
        if skip:
            self.skipped_large += 1
            self.consecutive += 1
            return True, "large"
        self.consecutive = 0
        return False, ""

    @property
    def too_many(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def state_dict(self) -> dict:
        return {"history": list(self.history), "skipped_nonfinite": self.skipped_nonfinite,
                "skipped_large": self.skipped_large, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(state.get("history", []))
        self.skipped_nonfinite = state.get("skipped_nonfinite", 0)
        self.skipped_large = state.get("skipped_large", 0)
        self.consecutive = state.get("consecutive", 0)


def update_loss_scale(scaler: torch.amp.GradScaler, skipped: str) -> None:
    """After a step of fp16 training: ``skipped`` is "" (the step was taken), "non-finite" or
    "large" (:meth:`UpdateSkipper.should_skip`).

    Only an overflow lowers the loss scale (by the scaler's backoff factor, and its count of clean
    steps starts again); a step skipped for a large but finite gradient norm leaves the scale as it
    was, since scaling did not cause it.  The decision is the one all ranks agreed on, not each
    rank's own view of its gradients, so every rank keeps the same scale."""
    if not skipped:
        scaler.update()
        return
    if skipped == "non-finite":
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        state = scaler.state_dict()
        state["_growth_tracker"] = 0
        scaler.load_state_dict(state)
    else:
        scaler.update(scaler.get_scale())  # ends the step (unscale_ bookkeeping), scale unchanged
