"""Which arithmetic a training run uses: every precision decision and notice in one place."""

from __future__ import annotations

import dataclasses

import torch

from ..config import Config


def resolve_precision(cfg: Config, device: torch.device, notices: list[str]) -> Config:
    """``precision: auto`` -> bf16 where bfloat16 is native and fast (CUDA GPUs of compute capability
    8 or newer; CPUs with AVX512-BF16 or AMX, where a demo step ran 1.4x faster than fp32), fp32
    elsewhere; the choice is added to ``notices`` (printed at start) and the returned configuration,
    which the checkpoint stores, holds it.  Explicit settings are returned unchanged (an explicit
    bf16 on a CPU that would emulate it gets a notice).  The KL and the likelihood stay float32."""
    if cfg.precision != "auto":
        if device.type == "cpu" and cfg.precision == "bf16" and not cpu_has_native_bf16():
            notices.append("precision bf16: this CPU has no native bfloat16 instructions (AVX512-BF16 or "
                           "AMX), so bf16 is likely slower than fp32 here (bench/train_step.py compares them)")
        return cfg
    if device.type == "cuda":
        native = torch.cuda.get_device_capability(device)[0] >= 8 and torch.cuda.is_bf16_supported()
        where = "this GPU " + ("supports" if native else "has no fast") + " bfloat16"
    else:
        native = cpu_has_native_bf16()
        where = "this CPU " + ("has" if native else "has no") + " native bfloat16 instructions"
    chosen = "bf16" if native else "fp32"
    notices.append(f"precision auto: {chosen} ({where})")
    return dataclasses.replace(cfg, precision=chosen)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions natively on this CPU (without, they are emulated)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the query: assume it does
        return True
