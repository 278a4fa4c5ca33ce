"""Turning the training state into (tensors, JSON) for a checkpoint, and back.

Tensors go to safetensors; optimiser hyperparameters, the skip policy, the loss-scaler state and
the Python/NumPy RNG states go to JSON.  Torch RNG states are stored as uint8 tensors.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from .optim import EMA, UpdateSkipper


def capture_state(model: torch.nn.Module, ema: EMA, optimiser: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler | None, skipper: UpdateSkipper
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
    tensors.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
    opt = optimiser.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    py_state = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "optimiser": {"param_groups": opt["param_groups"], "scalars": scalars},
        "scaler": scaler.state_dict() if scaler is not None else None,
        "skipper": skipper.state_dict(),
        "rng": {
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        },
    }
    return tensors, meta


def restore_state(checkpoint, optimiser: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                  skipper: UpdateSkipper, rank: int = 0) -> None:
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
    if rank == 0:  # other ranks keep their own, differently seeded, streams
        rng = meta.get("rng", {})
        if "python" in rng:
            version, internal, gauss = rng["python"]
            random.setstate((version, tuple(internal), gauss))
        if "numpy" in rng:
            name, keys, pos, has_gauss, cached = rng["numpy"]
            np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch_state = checkpoint.tensors.get("rng.torch")
        if torch_state is not None:
            torch.set_rng_state(torch_state.to(torch.uint8).cpu())
        cuda_states = [checkpoint.tensors[k] for k in sorted(checkpoint.tensors) if k.startswith("rng.cuda.")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
