"""torch.distributed set-up for torchrun (or a single process), and small collective helpers.

Ranks come from the environment torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
TORCHELASTIC_RESTART_COUNT).  One process per device: NCCL on CUDA (``cuda:LOCAL_RANK``), gloo on
the CPU.  Only global rank 0 writes shared outputs; every decision that changes what a rank does
next (skip an update, stop on a signal, give up because the data could not be prepared) is taken
by all ranks together, so no rank is ever left waiting in a collective for one that has gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from ..config import Config
from ..device import resolve_device
from ..errors import UserError

T = TypeVar("T")

# Test/debug hook: with this variable set to a folder, every rank appends what it saw (its own,
# not-yet-reduced metrics, its parameter digest, its pid) to <folder>/rank<R>.jsonl.
DEBUG_DIR_ENV = "VERYDEEPVAE_DEBUG_DIR"


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    local_world_size: int = 1
    restart_count: int = 0  # torchrun's TORCHELASTIC_RESTART_COUNT: > 0 after a worker-group restart
    launcher_pid: int | None = None  # torchrun's pid, watched so that workers never outlive it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    """True in a worker started by torchrun / ``python -m torch.distributed.run``."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_WORLD_SIZE" in os.environ


def choose_device(cfg: Config, local_rank: int, local_world_size: int = 1) -> torch.device:
    """This process's device for ``cfg.device`` (the one resolver, :func:`verydeepvae.device.resolve_device`)."""
    return resolve_device(cfg.device, local_rank, local_world_size)


# --- CUDA_devices -----------------------------------------------------------------------------------

# the CUDA_VISIBLE_DEVICES this process set from CUDA_devices ("" = the CPU), once set; process-wide
# like the variable itself, which must be set once, before CUDA initialises
_applied_devices: str | None = None


def physical_gpu_count() -> int | None:
    """CUDA devices on this machine, whatever CUDA_VISIBLE_DEVICES says (None: cannot tell)."""
    if not torch.backends.cuda.is_built():
        return 0
    try:
        count = int(torch.cuda._raw_device_count_nvml())  # NVML: no CUDA initialisation
    except Exception:  # pragma: no cover - depends on the driver
        count = -1
    return count if count >= 0 else None


def plan_devices(devices: list[str], gpu_count: int | None, visible: str | None) -> tuple[str | None, str | None]:
    """(new CUDA_VISIBLE_DEVICES or None for the CPU, notice or None); raises UserError for devices
    that do not exist.  ``visible`` is an already set CUDA_VISIBLE_DEVICES: the indices then refer
    to its entries (as CUDA numbers them)."""
    listed = ",".join(devices)
    if gpu_count == 0:
        return None, f"no CUDA GPU found: running on the CPU with gloo instead of CUDA_devices {listed}"
    pool = [v.strip() for v in visible.split(",") if v.strip()] if visible not in (None, "") else None
    if pool is not None:
        missing = [d for d in devices if int(d) >= len(pool)]
        if missing:
            raise UserError(f"CUDA_devices {listed}: device {missing[0]} does not exist; CUDA_VISIBLE_DEVICES="
                            f"{visible} makes {len(pool)} device(s) visible (0-{len(pool) - 1})")
        return ",".join(pool[int(d)] for d in devices), None
    if gpu_count is not None:
        missing = [d for d in devices if int(d) >= gpu_count]
        if missing:
            have = f"0-{gpu_count - 1}" if gpu_count > 1 else "0"
            raise UserError(f"CUDA_devices {listed}: device {missing[0]} does not exist; this machine has "
                            f"{gpu_count} CUDA device(s) ({have})")
    return listed, None


def configure_devices(devices: list[str]) -> tuple[str, str | None]:
    """Set CUDA_VISIBLE_DEVICES (before CUDA initialises) and return ("cuda"|"cpu", notice).

    Done once per process: a second call (e.g. train() after the legacy entry point) changes nothing.
    """
    global _applied_devices
    if _applied_devices is not None:
        return ("cuda" if _applied_devices else "cpu"), None
    visible, notice = plan_devices(devices, physical_gpu_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    if visible is None:
        _applied_devices = ""
        return "cpu", notice
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    if not torch.cuda.is_available():  # NVML could not tell, and CUDA sees nothing
        _applied_devices = ""
        listed = ",".join(devices)
        return "cpu", f"no usable CUDA GPU: running on the CPU with gloo instead of CUDA_devices {listed}"
    _applied_devices = visible
    count = torch.cuda.device_count()
    if count < len(devices):
        raise UserError(f"CUDA_devices {','.join(devices)}: only {count} of these devices exist")
    return "cuda", None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name} must be an integer, got {value!r}") from None


def setup(cfg: Config, notices: list[str] | None = None) -> Runtime:
    """This process's place in the job, its device, and the process group (several ranks)."""
    if cfg.CUDA_devices and cfg.device not in ("cpu", "mps"):
        kind, notice = configure_devices(list(cfg.CUDA_devices))
        if notice and notices is not None:
            notices.append(notice)
        if kind == "cpu" and cfg.device.startswith("cuda"):
            raise UserError(f"device {cfg.device} was requested but no CUDA GPU is available "
                            f"(CUDA_devices {','.join(cfg.CUDA_devices)}); use --device cpu")
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    if not 0 <= rank < world_size:
        raise UserError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size})")
    device = choose_device(cfg, local_rank, local_world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise UserError(f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set; start several "
                            "processes with torchrun (python -m torch.distributed.run --nproc_per_node=N ...)")
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _attempt_store(rank, world_size)
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
    if cfg.threads_per_rank:
        torch.set_num_threads(cfg.threads_per_rank)
    return Runtime(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                   local_world_size=local_world_size, restart_count=_env_int("TORCHELASTIC_RESTART_COUNT", 0),
                   launcher_pid=os.getppid() if under_torchrun() else None)


def _attempt_store(rank: int, world_size: int):
    """torchrun's agent keeps one key-value store for all attempts of a job (TORCHELASTIC_USE_AGENT_STORE);
    after a ``--max-restarts`` restart the gloo/NCCL addresses of the failed attempt's workers are still
    in it, and a new worker can read a dead peer's address ("Connection refused", pytorch/pytorch#135712).
    Keys of each attempt go under their own prefix.  Only on one node: torchrun's restart count, the
    attempt number, can differ between nodes (a node restarted for a membership change does not count
    it); on several nodes set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun instead, which gives
    every attempt a fresh store.  None: the plain env:// set-up."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or _env_int("GROUP_WORLD_SIZE", 1) != 1:
        return None
    base, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size))
    attempt = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    return dist.PrefixStore(f"verydeepvae/attempt_{attempt}/default_pg", base)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launcher_gone(runtime: Runtime) -> bool:
    """True when the torchrun launcher that started this worker has died (we were re-parented)."""
    return runtime.launcher_pid is not None and os.getppid() != runtime.launcher_pid


# --- collectives -----------------------------------------------------------------------------------


def all_reduce_mean(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Mean over ranks (a no-op in a single process)."""
    if not runtime.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / runtime.world_size


def all_reduce_sum(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Sum over ranks (a no-op in a single process)."""
    if not runtime.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Element-wise maximum over ranks (a no-op in a single process).  Values must not be NaN."""
    if not runtime.distributed:
        return values
    values = values.to(runtime.device).clone()
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def any_rank(flag: bool, runtime: Runtime) -> bool:
    """True when the flag is set on any rank, so that all ranks take the same decision."""
    if not runtime.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=runtime.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        if runtime.device.type == "cuda":
            dist.barrier(device_ids=[runtime.device.index])
        else:
            dist.barrier()


def gather_to_main(obj: Any, runtime: Runtime) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (in rank order); None elsewhere.  Objects travel pickled
    between our own processes only, never from or to a file."""
    if not runtime.distributed:
        return [obj]
    out: list[Any] | None = [None] * runtime.world_size if runtime.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


# --- rank 0 first, then everybody (without collective time-outs) -----------------------------------

# Process-wide on purpose: the calls' store keys must differ across every train() of this process,
# and torchrun's agent store outlives one process group (a per-Runtime count would restart at 1).
_main_first_calls = 0
POLL_SECONDS = 0.2


def _store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _wait_for_keys(store, keys: list[str]) -> None:
    """Wait, however long it takes, until every key exists.  A plain Python loop: signals are
    handled between polls, and no collective time-out (30 min for gloo) can fire while rank 0
    spends hours preprocessing a large data set on its first run."""
    while not store.check(keys):
        time.sleep(POLL_SECONDS)


def main_first(fn: Callable[[], T], runtime: Runtime, what: str,
               fingerprint: Callable[[T], str] | None = None) -> T:
    """Run ``fn`` on rank 0, then (when it worked) on every other rank; all ranks agree on failure.

    Rank 0 writes what is shared (e.g. ``split.json``, the preprocessed-volume cache, the phantom
    population) before the others read it, so ranks never race each other for the same files;
    on nodes that do not share rank 0's file system the other ranks simply build their own copy.
    With ``fingerprint``, every rank's result must have rank 0's fingerprint (the same file list
    on every node), else all ranks stop with one clear message.
    """
    if not runtime.distributed:
        return fn()
    global _main_first_calls
    _main_first_calls += 1
    store = _store()
    prefix = (f"verydeepvae/main_first/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
              f"{runtime.restart_count}/{_main_first_calls}")

    if not runtime.is_main:
        _wait_for_keys(store, [f"{prefix}/0"])
        first = store.get(f"{prefix}/0").decode()
        if not first.startswith("ok:"):
            raise UserError(f"stopped: rank 0 failed while {what} (its message says why)")
    result = _run_and_record(fn, store, f"{prefix}/{runtime.rank}", fingerprint)
    keys = [f"{prefix}/{r}" for r in range(runtime.world_size)]
    _wait_for_keys(store, keys)
    values = [store.get(k).decode() for k in keys]
    failed = [r for r, v in enumerate(values) if not v.startswith("ok:")]
    if failed:
        raise UserError(f"stopped: rank {failed[0]} failed while {what} (its message says why)")
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise UserError(f"rank {differ[0]} got a different result than rank 0 while {what} (do all nodes see "
                        "the same data folder and output folder?)")
    return result


def _run_and_record(fn: Callable[[], T], store, key: str, fingerprint: Callable[[T], str] | None) -> T:
    """``fn()``, with its outcome under ``key`` in the store: ``ok:<fingerprint>``, or
    ``error:<exception class>`` (then re-raised) for the other ranks to see."""
    try:
        result = fn()
    except BaseException as error:
        store.set(key, f"error:{type(error).__name__}")
        raise
    store.set(key, "ok:" + (fingerprint(result) if fingerprint is not None else ""))
    return result


def same_checkpoint(found: Any, directory: Path, runtime: Runtime) -> Any:
    """Rank 0's choice of checkpoint (``found``, a loaded Checkpoint or None; ignored on other ranks),
    loaded on every rank.  Ranks that cannot read the same file (another node without a shared file
    system, or a copy that differs) receive it from rank 0."""
    if not runtime.distributed:
        return found
    from ..checkpoint import CheckpointError, load_checkpoint

    choice = [None]
    if runtime.is_main and found is not None:
        sidecar = found.path.with_name(found.path.name + ".sha256")
        choice = [(found.path.name, sidecar.read_text().strip() if sidecar.is_file() else "")]
    dist.broadcast_object_list(choice, src=0, device=runtime.device)
    if choice[0] is None:
        return None
    name, digest = choice[0]
    mine = found if runtime.is_main else None
    if mine is None:
        local = directory / name
        sidecar = local.with_name(name + ".sha256")
        if local.is_file() and sidecar.is_file() and sidecar.read_text().strip() == digest:
            try:
                mine = load_checkpoint(local)
            except CheckpointError:
                mine = None
    if any_rank(mine is None, runtime):
        payload = [found.path.read_bytes()] if runtime.is_main else [None]
        dist.broadcast_object_list(payload, src=0, device=runtime.device)
        if mine is None:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="verydeepvae-resume-") as tmp:
                copy = Path(tmp) / name
                copy.write_bytes(payload[0])
                mine = load_checkpoint(copy)
                mine.path = directory / name
    return mine


def fingerprint_strings(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


# --- test/debug hook -------------------------------------------------------------------------------


def debug_record(runtime: Runtime, kind: str, **payload: Any) -> None:
    """Append one JSON line to ``$VERYDEEPVAE_DEBUG_DIR/rank<R>.jsonl`` (no-op when unset)."""
    folder = os.environ.get(DEBUG_DIR_ENV)
    if not folder:
        return
    record = {"kind": kind, "rank": runtime.rank, "local_rank": runtime.local_rank,
              "world_size": runtime.world_size, "pid": os.getpid(), "restart": runtime.restart_count, **payload}
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / f"rank{runtime.rank}.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


def parameter_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer, bit for bit (to check that ranks agree)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
