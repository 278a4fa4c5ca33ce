#!/usr/bin/env python
"""Where one training step spends its time: torch.profiler's operator table for one mode.

    python bench/profile_step.py --preset 32 --batch-size 2 --mode bf16+channels_last
    python bench/profile_step.py --preset demo --mode fp32 --rows 40

The step profiled is forward + backward after one untimed warm-up step (the optimiser update is
a few per cent of the step; bench/train_step.py shows its share).  The operator table lists the
operators by their own CPU time (CUDA time on a GPU).  Below it, the count of forward calls of
every Conv3d in one training step: each convolution (prior, posterior, residual, projection,
output head) should run exactly once, i.e. no network does its work twice.
Modes are those of bench/train_step.py.  Prints figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import MODES, mode_config  # noqa: E402  (the same mode definitions as the speed table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="32")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--mode", default="fp32", choices=list(MODES))
    p.add_argument("--rows", type=int, default=20, help="operators shown")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from verydeepvae.model import VeryDeepVAE
    from verydeepvae.train.state import apply_checkpointing

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = mode_config(args.preset, dict(MODES[args.mode], batch_size=args.batch_size), args.mode,
                      torch.device(args.device))
    torch.manual_seed(0)
    model = VeryDeepVAE(cfg).to(device)
    apply_checkpointing(model, cfg)
    net = torch.compile(model) if cfg.compile else model
    r = cfg.resolution
    x = torch.rand(args.batch_size, 1, r, r, r, generator=torch.Generator().manual_seed(1)).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    def step():
        ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            out = net(x)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, kernel selection, compilation
    n_convs, not_once = count_conv_calls(model, step)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    print(f"preset {args.preset}, batch {args.batch_size}, mode {args.mode}, threads {torch.get_num_threads()}: "
          f"profiled step {wall:.2f} s (profiler overhead included)")
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    print(f"convolutions: {n_convs} Conv3d modules; in one training forward "
          + ("each ran exactly once" if not not_once else f"these did not run exactly once: {not_once}"))
    return 0


def count_conv_calls(model, run) -> tuple[int, dict[str, int]]:
    """Forward calls of every Conv3d during ``run()``: (number of Conv3d modules, {name: calls}
    for those not called exactly once)."""
    import torch

    calls: dict[str, int] = {}
    convs = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv3d)}
    handles = [m.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
               for name, m in convs.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return len(convs), {n: calls.get(n, 0) for n in convs if calls.get(n, 0) != 1}


if __name__ == "__main__":
    sys.exit(main())
