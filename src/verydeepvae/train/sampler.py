"""Data order: a seeded permutation per epoch, split across ranks, resumable mid-epoch.

Each epoch's order depends only on (seed, epoch), so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


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
