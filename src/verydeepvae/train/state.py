"""Turning the training state into (tensors, JSON) for a checkpoint, and back.

Tensors go to safetensors; optimiser hyperparameters, the skip policy, the loss-scaler state and
the Python/NumPy RNG states go to JSON.  Torch RNG states are stored as uint8 tensors.

Under torch.distributed every rank has its own RNG streams (seeded seed + rank); rank 0's are
stored under ``rng.*`` as in a single process, the others' under ``rng.rank<R>.*`` (tensors) and
``rng_ranks`` (JSON), so a resumed run continues every rank's stream where it stopped.  Each
process stores and restores only the CUDA generator of its own device (``rng.cuda``): a run saved
on 8 GPUs resumes on 1 to 4 (with fresh streams for the ranks it no longer has).  Checkpoints
written before kept every visible device's state under ``rng.cuda.<index>``; the entry of the
process's own device is used.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from .. import memory
from ..checkpoint import CheckpointMeta, RngState
from ..config import Config
from ..json_types import JSONObject
from ..model import VeryDeepVAE
from .memory_plan import PlanRecord
from .optim import EMA, UpdateSkipper


class ProcessRngState(RngState):
    """One process's RNG streams: torch's as uint8 tensors (``cuda``: its own device's, when in use)."""

    torch: torch.Tensor
    cuda: torch.Tensor | None


def process_rng_state() -> ProcessRngState:
    """This process's RNG streams (torch CPU, its current CUDA device, Python, NumPy)."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def _set_python_numpy(rng: RngState) -> None:
    if "python" in rng:
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in rng:
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def capture_state(model: torch.nn.Module, ema: EMA, optimiser: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler | None, skipper: UpdateSkipper,
                  rank_rngs: list[ProcessRngState] | None = None,
                  ) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """``rank_rngs``: every rank's ``process_rng_state()`` in rank order (distributed runs)."""
    tensors: dict[str, torch.Tensor] = {}
    tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
    tensors.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
    opt = optimiser.state_dict()
    scalars: dict[str, JSONObject] = {}
    for index, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()  # this process's own device only
    py_state = random.getstate()
    np_state = np.random.get_state()
    meta: CheckpointMeta = {
        "optimiser": {"param_groups": opt["param_groups"], "scalars": scalars},
        "scaler": scaler.state_dict() if scaler is not None else None,
        "skipper": skipper.state_dict(),
        "rng": {
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        },
    }
    if rank_rngs:
        meta["rng_ranks"] = {}
        for r, rng in enumerate(rank_rngs):
            if r == 0:
                continue  # rank 0's are the process's own, stored above
            tensors[f"rng.rank{r}.torch"] = rng["torch"]
            if rng.get("cuda") is not None:
                tensors[f"rng.rank{r}.cuda"] = rng["cuda"]
            meta["rng_ranks"][str(r)] = {"python": rng["python"], "numpy": rng["numpy"]}
    return tensors, meta


def run_meta(cfg: Config, seed: int, world_size: int, memory: PlanRecord, best: float | None,
             history: list[dict[str, float]], ema_updates: int, steps_per_epoch: int, bundle: Any) -> CheckpointMeta:
    """The JSON a checkpoint keeps about its run besides the optimiser state: the configuration, seed
    and world size, the memory plan, the best validation loss (nats/voxel) and history, and the
    data facts a loaded model needs (voxel size in mm, intensity reference, a conditional run's
    covariate schema)."""
    meta: CheckpointMeta = {
        "config": cfg.to_dict(), "seed": seed, "world_size": world_size, "memory": memory,
        "best_validation": best, "validation_history": history,
        "ema_updates": ema_updates, "steps_per_epoch": steps_per_epoch,
        "data": {"voxel_size_mm": float(bundle.voxel_size_mm),
                 "intensity_reference": dict(getattr(bundle, "intensity_reference", {}) or {}),
                 "num_train": len(bundle.train), "num_val": len(bundle.val)},
    }
    if getattr(bundle, "covariates", None) is not None:
        meta["covariates"] = bundle.covariates.to_json()  # the schema a loaded model encodes with
    return meta


def restore_state(checkpoint, optimiser: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                  skipper: UpdateSkipper, rank: int = 0) -> bool:
    """Restore optimiser, scaler, skip policy and this rank's RNG streams.  Returns False when the
    checkpoint holds no RNG state for this rank (it was written by fewer ranks); the rank then
    keeps its freshly seeded streams."""
    meta = checkpoint.meta
    opt_meta = meta["optimiser"]
    state: dict[int, dict[str, Any]] = {}
    for name, value in checkpoint.state("optim").items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in opt_meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    optimiser.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    skipper.load_state_dict(meta.get("skipper", {}))
    if rank == 0:
        _set_python_numpy(meta.get("rng", {}))
        torch_state = checkpoint.tensors.get("rng.torch")
        if torch_state is not None:
            torch.set_rng_state(torch_state.to(torch.uint8).cpu())
        if torch.cuda.is_available():
            cuda_state = checkpoint.tensors.get("rng.cuda")
            if cuda_state is None:  # written before: every visible device's state, by device index
                cuda_state = checkpoint.tensors.get(f"rng.cuda.{torch.cuda.current_device()}")
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state.to(torch.uint8).cpu())
        return True
    # every other rank continues its own, differently seeded, streams
    torch_state = checkpoint.tensors.get(f"rng.rank{rank}.torch")
    rng = meta.get("rng_ranks", {}).get(str(rank))
    if torch_state is None or rng is None:
        return False
    _set_python_numpy(rng)
    torch.set_rng_state(torch_state.to(torch.uint8).cpu())
    cuda_state = checkpoint.tensors.get(f"rng.rank{rank}.cuda")
    if cuda_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state.to(torch.uint8).cpu())
    return True


def own_rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose generators this process draws from: its own device (none on a CPU)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def build_model_with_shared_weights(cfg: Config, seed: int, device: torch.device,
                                    covariate_dim: int = 0) -> VeryDeepVAE:
    """The model with the same initial weights on every rank (DDP would broadcast rank 0's, but the
    EMA copy is taken before that), leaving this rank's own RNG streams where they were.

    ``torch.manual_seed`` reseeds the CPU generator *and every CUDA device's*; restoring only the CPU
    state afterwards would leave every GPU drawing the same posterior noise as every other rank's,
    so the ranks' gradient estimates would be correlated.  The rank's own device is restored too."""
    with torch.random.fork_rng(devices=own_rng_devices(device)):
        torch.manual_seed(seed)
        model = VeryDeepVAE(cfg, covariate_dim).to(device)
    apply_checkpointing(model, cfg)
    return model


def apply_checkpointing(model: VeryDeepVAE, cfg: Config) -> None:
    """Checkpoint ``cfg``'s levels (resolved: not ``auto``), nesting inside a layer's recomputation
    only where that lowers the estimated peak (``memory.MemoryEstimate.nested_levels``)."""
    levels = cfg.checkpointed_levels()
    if levels:
        model.set_checkpoint_levels(levels, memory.estimate(cfg).nested_levels(levels))
