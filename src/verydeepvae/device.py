"""Which torch device a process computes on: the one resolver that training, generation and the
command line all use.

Accepted names: ``auto`` (a CUDA GPU when one is available, else the CPU; never MPS, whose 3D
convolution support is not complete in every torch), ``cpu``, ``cuda`` (the process's own GPU:
``cuda:LOCAL_RANK`` under torchrun, ``cuda:0`` otherwise), ``cuda:N`` (GPU N as CUDA numbers the
visible devices, i.e. after ``CUDA_VISIBLE_DEVICES``) and ``mps`` (Apple silicon, where torch
has it).  A device that does not exist here is one line of :class:`UserError`, naming what does.

:func:`check_device_name` checks the spelling only and imports nothing heavy, so the
configuration (``config.py``) and the argument parser can use it; :func:`resolve_device` asks
torch what exists.
"""

from __future__ import annotations

import os
import re

from .errors import UserError

DEVICE_NAMES = "auto, cpu, cuda, cuda:N (e.g. cuda:1) or mps"
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:(0|[1-9][0-9]{0,3})|mps)$")


def check_device_name(name: str) -> str:
    """``name`` unchanged when it is one of :data:`DEVICE_NAMES`, else a ValueError saying so."""
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise ValueError(f"device must be {DEVICE_NAMES}; got {name!r}")
    return name


def resolve_device(name: str | None, local_rank: int = 0, local_world_size: int = 1):
    """The ``torch.device`` for ``name`` on this machine (see the module notes).

    ``local_rank`` / ``local_world_size``: this process's place among the processes torchrun
    started on this node; ``cuda`` then means ``cuda:local_rank``, and one fixed ``cuda:N`` or
    ``mps`` shared by several processes is refused (each process needs its own device).
    """
    import torch

    name = check_device_name(str(name) if isinstance(name, torch.device) else (name or "auto"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_built():
            raise UserError("device mps was requested but this torch was built without MPS (Apple silicon); "
                            "use --device cpu")
        if not backend.is_available():
            raise UserError("device mps was requested but MPS is not available on this machine (it needs Apple "
                            "silicon and macOS 12.3 or newer); use --device cpu")
        if local_world_size > 1:
            raise UserError(f"device mps is one device, but {local_world_size} processes run on this node; "
                            "start one process")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise UserError(f"device {name} was requested but no CUDA GPU is available; use --device cpu")
    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    if name == "cuda":
        if local_rank >= count:
            raise UserError(
                f"local rank {local_rank} of {local_world_size} process(es) on this node needs CUDA device "
                f"{local_rank}, but only {count} are visible{shown}; start at most {count} processes per node "
                "(--nproc_per_node) or make more devices visible (--CUDA_devices)")
        return torch.device("cuda", local_rank)
    index = int(name.split(":", 1)[1])
    if index >= count:
        have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise UserError(f"device {name} does not exist: {count} CUDA device(s) are visible{shown}, {have}")
    if local_world_size > 1:
        raise UserError(f"device {name} names one GPU, but {local_world_size} processes run on this node; "
                        "use --device cuda (each process then takes cuda:LOCAL_RANK)")
    return torch.device("cuda", index)
