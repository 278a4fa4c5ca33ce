#!/usr/bin/env python
"""Training-step speed and memory for every speed/memory mode, side by side in one run.

    python bench/train_step.py --preset 32 --batch-size 2
    python bench/train_step.py --preset 128 --batch-size 1 --modes checkpoint --steps 0
    python bench/train_step.py --preset 32 --batch-size 2 --limit   # + FLOP/s vs a bare Conv3d

A training step is what the loop does per optimiser step: forward (under autocast for bf16/fp16),
backward, gradient clipping, the optimiser update and the EMA update.  Every mode runs in its own
process (so its peak memory is its own: peak RSS on a CPU, ``torch.cuda.max_memory_allocated`` on
CUDA), on the same initial weights and the same batch, and the modes are interleaved across
``--repeats`` so that a change of machine load hits all of them alike; the best repeat is shown.

Columns: steps/s and voxels/s (median over the timed steps); ``update`` is the share of the step
spent in clipping + optimiser + EMA; peak memory beside the estimate of ``verydeepvae.memory``
(+ the process's own memory before the model was built); the first step's loss and its relative
difference from fp32 (bf16 carries 8 significant bits: 2^-8 = 0.0039); ratios against fp32.

``--limit``: the FLOPs of one training step (``torch.utils.flop_counter.FlopCounterMode``, the
plain step's forward + backward: recomputation by checkpointing is not counted as useful work)
divided by the step's time, beside the throughput that bare ``Conv3d`` forward+backward calls
reach on the same machine with the model's own convolution shapes (each shape timed alone, in the
mode's dtype and memory format, weighted by how often the model uses it).

Peak RSS on Linux includes glibc heap fragmentation; the workers, like ``verydeepvae train``, map
blocks of 16 MiB and more afresh and keep up to 1 GiB free at the top of the heap
(``process_defaults.py``); ``MALLOC_MMAP_THRESHOLD_=N`` and ``MALLOC_TRIM_THRESHOLD_=N`` in the
environment override them (``MALLOC_TRIM_THRESHOLD_=131072`` measures the previous default).
CPU timings swing with machine load (check ``/proc/loadavg``; the load is printed); ``--threads``
sets torch's intra-op threads (default: torch's choice).  The workers get the CLI's bounded OpenMP
spin unless ``OMP_WAIT_POLICY`` is set (``OMP_WAIT_POLICY=PASSIVE python bench/train_step.py``
measures the old default).  Mode ``default`` is what ``verydeepvae train``
chooses on the device (``precision``, ``channels_last`` and ``checkpoint_levels`` auto); it does not
include the training loop's thread governor, which only acts under contention.  Prints figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from verydeepvae.process_defaults import apply_cli_defaults

apply_cli_defaults()  # as the CLI does, before anything loads torch (a bounded OpenMP spin, process_defaults.py)

MODES = {  # each mode spells out precision and memory format: the configuration's defaults are "auto"
    "default": {},  # what `verydeepvae train` chooses on this device (precision and channels_last auto)
    "fp32": {"precision": "fp32", "channels_last": False},
    "bf16": {"precision": "bf16", "channels_last": False},
    "checkpoint": {"checkpoint_levels": "all", "precision": "fp32", "channels_last": False},
    "channels_last": {"precision": "fp32", "channels_last": True},
    "compile": {"compile": True, "precision": "fp32", "channels_last": False},
    "bf16+channels_last": {"precision": "bf16", "channels_last": True},
    "bf16+channels_last+compile": {"precision": "bf16", "channels_last": True, "compile": True},
    "checkpoint+bf16": {"checkpoint_levels": "all", "precision": "bf16", "channels_last": False},
    "checkpoint+channels_last": {"checkpoint_levels": "all", "precision": "fp32", "channels_last": True},
    "checkpoint+bf16+channels_last": {"checkpoint_levels": "all", "precision": "bf16", "channels_last": True},
}
DEFAULT_MODES = "default,fp32,bf16,checkpoint,channels_last,compile,bf16+channels_last"


def modes_to_run(asked: str | None, device: str) -> tuple[list[str], str]:
    """(modes, note): the modes of ``--modes`` as given, or the default ones.  From the default ones
    the bf16 modes are left out on a CPU without native bfloat16 instructions, where bf16 is
    emulated: the demo preset ran at 0.010 steps/s against 0.85 in fp32 + channels-last (2-core AMD
    EPYC without AVX512-BF16), minutes per mode that time nothing training would use there
    (``precision: auto`` picks fp32).  The note says what was left out, and how to run it anyway."""
    modes = [m.strip() for m in (asked or DEFAULT_MODES).split(",") if m.strip()]
    if asked is not None or device != "cpu":
        return modes, ""
    from verydeepvae.train.precision import cpu_has_native_bf16

    emulated = [m for m in modes if MODES[m].get("precision") == "bf16"]
    if not emulated or cpu_has_native_bf16():
        return modes, ""
    return ([m for m in modes if m not in emulated],
            f"  {', '.join(emulated)}: left out (this CPU has no native bfloat16, so bf16 is emulated, about 80x "
            f"slower than fp32; --modes {','.join(emulated)} runs them)")


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------------------------------
# worker: one mode in this process
# --------------------------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from verydeepvae.memory import estimate
    from verydeepvae.model import VeryDeepVAE
    from verydeepvae.train.optim import EMA, build_optimiser
    from verydeepvae.train.state import apply_checkpointing

    overrides = dict(MODES[args.worker])
    overrides["batch_size"] = args.batch_size
    device = torch.device(args.device)
    if device.type == "cuda" and overrides.get("precision") == "bf16" and args.fp16:
        overrides["precision"] = "fp16"
    cfg = mode_config(args.preset, overrides, args.worker, device)
    r = cfg.resolution
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, 1, r, r, r, generator=torch.Generator().manual_seed(1)).to(device)
    warm_up_libraries(torch, cfg, device)  # their code pages belong to the baseline, not the model
    baseline = rss_bytes()
    model = VeryDeepVAE(cfg).to(device)
    apply_checkpointing(model, cfg)  # as training does: nested only where it lowers the peak
    net = model
    if cfg.compile:
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True  # the same random draws as eager: comparable losses
        net = torch.compile(model)
    optimiser = build_optimiser(model, cfg)
    ema = EMA(model, cfg.ema_rate)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> tuple[float, float, float]:
        sync()
        t0 = time.perf_counter()
        with autocast():
            out = net(x)
        (scaler.scale(out.loss) if scaler else out.loss).backward()
        sync()
        t1 = time.perf_counter()
        if scaler:
            scaler.unscale_(optimiser)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if scaler:
            scaler.step(optimiser)
            scaler.update()
        else:
            optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        ema.update(model)
        sync()
        t2 = time.perf_counter()
        return out.loss.item(), t1 - t0, t2 - t1

    result: dict = {"mode": args.worker, "threads": torch.get_num_threads()}
    torch.manual_seed(2)  # the same posterior noise in every mode
    compile_start = time.perf_counter()
    first_loss, _, first_update = step()
    result["first_step_s"] = time.perf_counter() - compile_start
    result["loss"] = first_loss
    for _ in range(args.warmup - 1):
        step()
    times, updates = [], []
    for _ in range(args.steps):
        _, fwd_bwd, update = step()
        times.append(fwd_bwd + update)
        updates.append(update)
    result["step_s"] = statistics.median(times) if times else result["first_step_s"]
    result["all_steps_s"] = times
    result["update_s"] = statistics.median(updates) if updates else first_update
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
        result["baseline_bytes"] = 0
    else:
        result["peak_bytes"] = peak_rss_bytes()
        result["baseline_bytes"] = baseline
    est = estimate(cfg)
    result["estimate_bytes"] = est.peak(args.batch_size, cfg.checkpointed_levels())
    result["voxels"] = args.batch_size * r ** 3
    if args.limit:  # after the timing and the memory peak
        result.update(limit_figures(model, cfg, x, autocast, device))
    return result


def warm_up_libraries(torch, cfg, device) -> None:
    """One small convolution forward+backward in the mode's dtype and memory format."""
    fmt = torch.channels_last_3d if cfg.channels_last else torch.contiguous_format
    conv = torch.nn.Conv3d(4, 4, 3, padding=1).to(device).to(memory_format=fmt)
    x = torch.randn(1, 4, 8, 8, 8, device=device).contiguous(memory_format=fmt).requires_grad_()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    with torch.autocast(device_type=device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y = torch.nn.functional.gelu(conv(x))
    y.float().sum().backward()


def limit_figures(model, cfg, x, autocast, device) -> dict:
    """Useful FLOPs of one training step and the bare-Conv3d throughput on the model's shapes."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from verydeepvae.train.state import apply_checkpointing

    model.set_checkpoint_levels([])  # count the plain step's work
    shapes: dict[tuple, int] = {}

    def hook(module, inputs, _output):
        key = (tuple(inputs[0].shape), tuple(module.weight.shape), module.padding, module.stride)
        shapes[key] = shapes.get(key, 0) + 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast():
            out = model(x)
        out.loss.backward()
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    apply_checkpointing(model, cfg)
    step_flops = counter.get_total_flops()

    fmt = torch.channels_last_3d if cfg.channels_last else torch.contiguous_format
    in_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
    conv_flops = conv_time = 0.0
    for (in_shape, w_shape, padding, stride), count in shapes.items():
        conv = torch.nn.Conv3d(w_shape[1], w_shape[0], w_shape[2:], padding=padding, stride=stride).to(device)
        conv = conv.to(memory_format=fmt)
        inp = torch.randn(in_shape, device=device).to(in_dtype).contiguous(memory_format=fmt).requires_grad_()

        def run():
            with autocast():
                y = conv(inp)
            y.backward(torch.ones_like(y))

        flop_counter = FlopCounterMode(display=False)
        with flop_counter:
            run()
        reps = 3
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        conv_time += count * (time.perf_counter() - t0) / reps
        conv_flops += count * flop_counter.get_total_flops()
    return {"step_flops": step_flops, "conv_flops": conv_flops, "conv_time_s": conv_time,
            "conv_flops_per_s": conv_flops / conv_time}


# --------------------------------------------------------------------------------------------------
# driver: every mode in its own process, interleaved over repeats, one table
# --------------------------------------------------------------------------------------------------
def mode_config(preset: str, overrides: dict, mode: str, device):
    """The configuration a mode trains with; for ``default``, with the automatic choices a training
    run makes on ``device`` (precision, memory format, checkpointed levels)."""
    from verydeepvae.config import build_config

    cfg = build_config(preset=preset, overrides=overrides)
    if mode == "default":
        from verydeepvae.train.memory_plan import device_budget, plan
        from verydeepvae.train.precision import resolve_speed_choices

        cfg = resolve_speed_choices(cfg, device, [])
        cfg = dataclasses.replace(cfg, checkpoint_levels=plan(cfg, device_budget(device)).setting())
    return cfg


def memory_check(args: argparse.Namespace, mode: str) -> str | None:
    """A reason not to run a CPU mode whose estimated peak exceeds the memory available now."""
    if args.device != "cpu":
        return None
    import torch

    from verydeepvae.memory import estimate, format_bytes

    cfg = mode_config(args.preset, dict(MODES[mode], batch_size=args.batch_size), mode, torch.device("cpu"))
    need = estimate(cfg).peak(args.batch_size, cfg.checkpointed_levels()) + 2**29
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    available = info.get("MemAvailable", need)
    if need > available:
        return f"estimated peak {format_bytes(need)} > {format_bytes(available)} available"
    return None


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="32")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--modes", help=f"comma separated, from: {', '.join(MODES)} (default: {DEFAULT_MODES}, without "
                                  "the bf16 ones on a CPU without native bfloat16)")
    p.add_argument("--steps", type=int, default=3,
                   help="timed steps per mode (median); 0: time the first step only (includes warm-up costs)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1; compilation happens here)")
    p.add_argument("--repeats", type=int, default=1, help="rounds over all modes; the best is shown")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fp16", action="store_true", help="on CUDA, run the bf16 modes as fp16 with loss scaling")
    p.add_argument("--limit", action="store_true", help="also FLOP/s against bare Conv3d on the same shapes")
    p.add_argument("--json", help="also write every measurement to this JSON file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.warmup = max(1, args.warmup)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    modes, left_out = modes_to_run(args.modes, args.device)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    print(f"preset {args.preset}, batch size {args.batch_size}, device {args.device}, "
          f"{args.steps} timed step(s) after {args.warmup} warm-up, {args.repeats} repeat(s); "
          f"load average before: {open('/proc/loadavg').read().split()[:3]}; "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', '(16 MiB, the CLI default)')}; "
          f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_', '(1 GiB, the CLI default)')}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}",
          flush=True)
    if left_out:
        print(left_out, flush=True)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    loads = []
    for repeat in range(args.repeats):
        for mode in modes:
            too_big = memory_check(args, mode)
            if too_big:
                print(f"  {mode}: skipped ({too_big})", flush=True)
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--preset", args.preset,
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--threads", str(args.threads), "--device", args.device]
            if args.fp16:
                cmd.append("--fp16")
            if args.limit:
                cmd.append("--limit")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            loads.append(float(open("/proc/loadavg").read().split()[0]))
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                print(f"  {mode}: failed ({tail})", flush=True)
                continue
            res = json.loads(lines[-1][7:])
            runs[mode].append(res)
            print(f"  [{repeat + 1}/{args.repeats}] {mode}: {1 / res['step_s']:.3f} steps/s, "
                  f"peak {gib(res['peak_bytes'])} GiB, load {loads[-1]:.2f}", flush=True)
    best = {m: min(r, key=lambda d: d["step_s"]) for m, r in runs.items() if r}
    if not best:
        print("no mode ran; no table")
        return 1
    base = best.get("fp32") or next(iter(best.values()))
    if "fp32" not in best:
        print(f"(no fp32 run: ratios and loss differences are against {base['mode']})")
    mem = "peak RSS" if args.device == "cpu" else "peak alloc"
    print(f"\nthreads {base['threads']}; load average during the runs {min(loads):.2f}-{max(loads):.2f}")
    header = (f"{'mode':<30} {'steps/s':>8} {'voxels/s':>10} {'x fp32':>7} {'update':>7} "
              f"{mem + ' GiB':>13} {'estimate':>9} {'x fp32':>7} {'loss':>9} {'rel diff':>9}")
    print(header)
    print("-" * len(header))
    for mode, res in best.items():
        rel = abs(res["loss"] - base["loss"]) / abs(base["loss"])
        print(f"{mode:<30} {1 / res['step_s']:8.3f} {res['voxels'] / res['step_s']:10.3g} "
              f"{base['step_s'] / res['step_s']:7.2f} {res['update_s'] / res['step_s']:7.1%} "
              f"{gib(res['peak_bytes']):>13} {gib(res['baseline_bytes'] + res['estimate_bytes']):>9} "
              f"{res['peak_bytes'] / base['peak_bytes']:7.2f} {res['loss']:9.5f} {rel:9.1e}")
    if args.limit:
        flops = base["step_flops"]
        print(f"\nthe limit: {flops / 1e9:.2f} GFLOP per training step (fp32 step, forward + backward)")
        print(f"{'mode':<30} {'step GFLOP/s':>12} {'bare Conv3d GFLOP/s':>20} {'ratio':>6}")
        for mode, res in best.items():
            if "conv_flops_per_s" not in res:
                continue
            achieved = flops / res["step_s"]
            print(f"{mode:<30} {achieved / 1e9:12.2f} {res['conv_flops_per_s'] / 1e9:20.2f} "
                  f"{achieved / res['conv_flops_per_s']:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "loads": loads, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
