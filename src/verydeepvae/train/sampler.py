"""Data order: a seeded permutation per epoch, split across ranks, resumable mid-epoch.

Each epoch's order depends only on (seed, epoch), so a resumed run sees exactly the batches the
uninterrupted run would have seen.  :class:`EpochStream` runs the epochs one after another from a
position, as ``(epoch, index)`` items, so one DataLoader (and its worker processes) serves the
whole run: re-creating it at every epoch made demo steps 10-20 % slower on a 2-core CPU (steps
20-100 without validation: 0.71-0.72 s against 0.56-0.65 s, alternating runs on an idle machine).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler


class EpochSampler(Sampler[int]):
    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, batch_size: int = 1):
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.epoch = 0
        self.start_batch = 0
        per_rank = size // world_size if size >= world_size else 1
        self.per_rank = per_rank
        self.batches_per_epoch = max(1, per_rank // batch_size)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        permutation = torch.randperm(self.size, generator=generator).tolist()
        while len(permutation) < self.per_rank * self.world_size:  # fewer files than ranks
            permutation += permutation
        mine = permutation[self.rank::self.world_size][: self.per_rank]
        return mine[: self.batches_per_epoch * self.batch_size]

    def __iter__(self) -> Iterator[int]:
        indices = self.order(self.epoch)
        return iter(indices[self.start_batch * self.batch_size:])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class EpochStream(Sampler[tuple[int, int]]):
    """``(epoch, index)`` for every epoch's order, forever, from ``epoch`` and ``start_batch``."""

    def __init__(self, epochs: EpochSampler, epoch: int, start_batch: int = 0):
        self.epochs = epochs
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.epoch, self.start_batch
        while True:
            for index in self.epochs.order(epoch)[start * self.epochs.batch_size:]:
                yield epoch, index
            epoch, start = epoch + 1, 0


class EpochKeyed(Dataset):
    """A dataset read with :class:`EpochStream` items: before item ``(epoch, index)`` is read, the
    dataset's augmentation is keyed to (seed, rank, epoch) when it has one (``set_epoch_key``),
    so the random draws depend on the item, not on which worker reads it or when."""

    def __init__(self, dataset, seed: int, rank: int):
        self.dataset = dataset
        self.seed = seed
        self.rank = rank

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        if hasattr(self.dataset, "set_epoch_key"):
            self.dataset.set_epoch_key(self.seed, self.rank, epoch)
        return self.dataset[index]
