"""How a training process uses its device: every precision, GPU-backend and determinism decision
and its notice in one place, and what to say when the device runs out of memory."""

from __future__ import annotations

import dataclasses
import os

import torch

from .. import memory
from ..config import Config
from . import memory_plan
from ..errors import ConfigError


def resolve_precision(cfg: Config, device: torch.device, notices: list[str]) -> Config:
    """``precision: auto`` -> bf16 where bfloat16 is native and fast (CUDA GPUs of compute capability
    8 or newer; CPUs with AVX512-BF16 or AMX, where a demo step ran 1.4x faster than fp32); fp16 with
    loss scaling on CUDA GPUs of capability 7.x (V100, T4: fast float16 tensor cores, no fast
    bfloat16); fp32 elsewhere.  The choice is added to ``notices`` (printed at start) and the
    returned configuration, which the checkpoint stores, holds it.  Explicit settings are returned
    unchanged (an explicit bf16 where it would be emulated gets a notice; an explicit fp16 off a CUDA
    GPU is a ConfigError: there is no float16 autocast there).  ``precision: half``, the original's
    ``half_precision: true``, is fp16 on a CUDA GPU and bf16 elsewhere (with a notice), so the
    original's configurations, its CPU tests among them, run as they did.  The KL and the
    likelihood stay float32."""
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision fp16 needs a CUDA device, and this run is on {device}; use bf16 (or auto)")
    if cfg.precision == "half":
        if device.type == "cuda":
            return dataclasses.replace(cfg, precision="fp16")
        notices.append(f"half_precision: float16 autocast needs a CUDA GPU, so half precision on {device} is bf16")
        return dataclasses.replace(cfg, precision="bf16")
    if cfg.precision != "auto":
        if cfg.precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
            notices.append("precision bf16: this CPU has no native bfloat16 instructions (AVX512-BF16 or "
                           "AMX), so bf16 is likely slower than fp32 here (bench/train_step.py compares them)")
        if cfg.precision == "bf16" and device.type == "cuda" and not gpu_has_fast_bf16(device):
            major, minor = torch.cuda.get_device_capability(device)
            notices.append(f"precision bf16: this GPU (compute capability {major}.{minor}) has no fast bfloat16, "
                           "so bf16 is emulated or slow here; fp16 (with loss scaling) is its fast half precision")
        return cfg
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if gpu_has_fast_bf16(device):
            chosen, where = "bf16", "this GPU supports bfloat16"
        elif major >= 7:
            chosen, where = "fp16", (f"this GPU (compute capability {major}.{minor}) has fast float16 but no fast "
                                     "bfloat16; with loss scaling")
        else:
            chosen, where = "fp32", f"this GPU (compute capability {major}.{minor}) has no fast half precision"
    elif device.type != "cpu":
        chosen, where = "fp32", f"no half precision is chosen automatically on {device.type}"
    else:
        native = cpu_has_native_bf16()
        chosen = "bf16" if native else "fp32"
        where = "this CPU " + ("has" if native else "has no") + " native bfloat16 instructions"
    notices.append(f"precision auto: {chosen} ({where})")
    return dataclasses.replace(cfg, precision=chosen)


def resolve_speed_choices(cfg: Config, device: torch.device, notices: list[str]) -> Config:
    """Every ``auto`` speed setting decided for ``device`` before training starts (precision, memory
    format); checkpointed levels are decided later, by the memory plan, once the budget is known."""
    return resolve_memory_format(resolve_precision(cfg, device, notices), device, notices)


def resolve_memory_format(cfg: Config, device: torch.device, notices: list[str]) -> Config:
    """``channels_last: auto`` -> channels-last-3D on a CPU, where ``bench/train_step.py`` measured it
    1.3-1.4x faster than the contiguous format in fp32 and in bf16 (oneDNN's 3D convolutions want it);
    contiguous elsewhere, where it was not measured (set ``channels_last: true`` to try it on a GPU).
    The choice is a notice and goes into the returned configuration; an explicit setting wins."""
    if cfg.channels_last != "auto":
        return cfg
    chosen = device.type == "cpu"
    notices.append("channels_last auto: " + ("on (the fast memory format for CPU convolutions)" if chosen
                                             else f"off (not measured on {device.type}; true to try)"))
    return dataclasses.replace(cfg, channels_last=chosen)


def gpu_has_fast_bf16(device: torch.device) -> bool:
    """Compute capability 8 (Ampere) or newer, where bfloat16 runs on tensor cores."""
    return torch.cuda.get_device_capability(device)[0] >= 8 and torch.cuda.is_bf16_supported()


def configure_backends(cfg: Config, device: torch.device, notices: list[str]) -> None:
    """The speed / exactness policy of the compute backends, set once per training process.

    GPU: cuDNN autotuning on (the 3D convolutions have fixed shapes, so the search pays once);
    TF32 off under ``precision: fp32`` (so fp32 means float32 rounding, as the evaluation claims)
    and on under bf16/fp16, whose float32 parts are then fast too.  With ``deterministic``
    (``--deterministic``): autotuning off, deterministic cuDNN and cuBLAS algorithms (slower), so a
    resumed GPU run repeats an uninterrupted one as the CPU does; without it, GPU runs resume with
    the same weights and streams but not bitwise the same later steps.  The choice is a notice."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type != "cuda":
        return
    tf32 = cfg.precision != "fp32"
    torch.backends.cudnn.benchmark = not cfg.deterministic
    torch.backends.cudnn.deterministic = cfg.deterministic
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    how = ("deterministic algorithms: bitwise-repeatable, slower" if cfg.deterministic
           else "fastest algorithms: --deterministic makes a resumed run repeat an uninterrupted one bitwise")
    notices.append(f"GPU backends: cuDNN autotuning {'off' if cfg.deterministic else 'on'}, "
                   f"TF32 {'on' if tf32 else 'off'} (precision {cfg.precision}), {how}")


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions natively on this CPU (without, they are emulated)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the query: assume it does
        return True


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of a CUDA device, or the machine's RAM (``/proc/meminfo``); None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def out_of_memory_message(cfg: Config, device: torch.device, step: int, newest_checkpoint: str | None,
                          budget: memory_plan.Budget | None = None) -> str:
    """One line for a training step that ran out of memory: what ran, what the estimator says would
    fit (in the memory the run found available at its start, ``train/memory_plan.py``, when known;
    else in the device's total memory), and what was kept."""
    levels = cfg.checkpointed_levels()
    est = memory.estimate(cfg)
    peak = est.peak(cfg.batch_size, levels)
    line = (f"out of memory on {device} at step {step + 1} (batch_size {cfg.batch_size}, precision "
            f"{cfg.precision}, checkpoint_levels {memory.levels_text(levels, cfg.num_levels)}; ")
    if budget is not None and budget.hard is not None:
        line += (f"estimated peak {memory.format_bytes(budget.needed(peak))} of the "
                 f"{memory.format_bytes(budget.hard)} of {budget.hard_source}; "
                 + memory_plan.what_fits(cfg, budget.in_estimate_bytes(budget.hard), device.type)[0])
    else:
        line += f"estimated peak {memory.format_bytes(peak)}"
        total = device_memory_bytes(device)
        if total:
            line += f" of {memory.format_bytes(total)}; " + memory_plan.what_fits(cfg, total, device.type)[0]
    kept = f"the newest complete checkpoint is {newest_checkpoint}" if newest_checkpoint else "no checkpoint was written yet"
    return (line + f"); {kept}; try --set batch_size=N or --set checkpoint_levels=all "
            "(verydeepvae config show --estimate-memory lists the options)")
