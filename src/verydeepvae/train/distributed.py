"""torch.distributed set-up for torchrun (or a single process), and small collective helpers.

Ranks come from the environment torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE).  NCCL on CUDA,
gloo on the CPU.  Only global rank 0 writes shared outputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import Config
from ..errors import UserError


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def choose_device(cfg: Config, local_rank: int) -> torch.device:
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device cuda was requested but no CUDA GPU is available; use --device cpu")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UserError(f"local rank {local_rank} needs CUDA device {local_rank}, but only {count} are visible")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(cfg: Config) -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if cfg.threads_per_rank:
        torch.set_num_threads(cfg.threads_per_rank)
    return Runtime(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Mean over ranks (a no-op in a single process)."""
    if not runtime.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / runtime.world_size


def any_rank(flag: bool, runtime: Runtime) -> bool:
    """True when the flag is set on any rank, so that all ranks take the same decision."""
    if not runtime.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=runtime.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()
