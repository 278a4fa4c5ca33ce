"""The stream of training batches: one DataLoader for the whole run, starting where the step count
says the data order is (sampler.EpochStream), with worker processes that leave stop signals to
the training process.
"""

from __future__ import annotations

import signal
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from ..config import Config
from .sampler import EpochKeyed, EpochSampler, EpochStream


def training_batches(train: Any, sampler: EpochSampler, step: int, cfg: Config, seed: int, rank: int,
                     device: torch.device) -> Iterator[torch.Tensor]:
    """Micro-batches forever from optimiser step ``step`` on: volumes (B, 1, R, R, R), or
    (volumes, covariates) pairs for a conditional run."""
    micro = step * cfg.grad_accumulation
    epoch, start = divmod(micro, sampler.batches_per_epoch)
    if getattr(train, "covariates", None) is not None:
        from ..data.datasets import WithCovariates

        train = WithCovariates(train)  # batches of (volumes, covariates)
    loader = DataLoader(
        EpochKeyed(train, seed, rank), batch_size=cfg.batch_size,
        sampler=EpochStream(sampler, epoch, start), num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda", drop_last=False, worker_init_fn=_ignore_stop_signals,
        # its own generator: creating the loader must not consume the global RNG, or a run
        # resumed mid-epoch would diverge from the uninterrupted one
        generator=torch.Generator().manual_seed(seed * 7919 + epoch),
    )
    yield from _start_workers(loader)


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


def split_batch(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(volumes, covariates or None) on ``device`` from a DataLoader batch (a conditional run's
    batches are pairs, data/datasets.py WithCovariates)."""
    if isinstance(batch, (list, tuple)):
        return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    return batch.to(device, non_blocking=True), None


def covariates_of(dataset: Any, indices, device: torch.device) -> torch.Tensor | None:
    """The encoded covariates of these items of a conditional run's dataset, else None."""
    table = getattr(dataset, "covariates", None)
    return None if table is None else table[list(indices)].to(device)
