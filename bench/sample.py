#!/usr/bin/env python
"""Sampling speed: volumes per second drawn from the prior, per speed mode, and with NIfTI writing.

    python bench/sample.py                                  # preset 32, 8 volumes, batch 4
    python bench/sample.py --preset 64 --num 4 --batch-size 2 --threads 1

The model has freshly initialised weights (the speed does not depend on what it learned).  Columns:

* model: ``sampling.iter_samples`` (the decoder's top-down pass with prior draws, and the output
  head), per mode: fp32, bf16 autocast, channels-last-3D, both;
* +write: ``sampling.write_samples`` in fp32 (also gzip-compressed NIfTI files, a montage and the
  JSON record), i.e. what ``verydeepvae sample`` does.

Modes are interleaved over ``--repeats`` and the best repeat is shown.  CPU timings swing with
machine load (printed); prints figures only, nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
import time

from verydeepvae.process_defaults import apply_cli_defaults

apply_cli_defaults()  # as the CLI does, before anything loads torch (a bounded OpenMP spin, process_defaults.py)
import torch  # noqa: I001

from verydeepvae.config import build_config
from verydeepvae.sampling import iter_samples, write_samples
from verydeepvae.model import VeryDeepVAE

MODES = ("fp32", "bf16", "channels_last", "bf16+channels_last")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="32")
    p.add_argument("--num", type=int, default=8, help="volumes per measurement")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = build_config(preset=args.preset)
    torch.manual_seed(0)
    plain = VeryDeepVAE(cfg).to(args.device).eval()
    cl = copy.deepcopy(plain)
    cl.set_channels_last(True)
    models = {"fp32": plain, "bf16": plain, "channels_last": cl, "bf16+channels_last": cl}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    device_type = torch.device(args.device).type

    def rate(mode: str) -> float:
        bf16 = "bf16" in mode
        context = torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        start = time.perf_counter()
        with context:
            for _ in iter_samples(models[mode], args.num, 1.0, 0, args.batch_size, args.device, False):
                pass
        sync()
        return args.num / (time.perf_counter() - start)

    def rate_writing() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            write_samples(plain, tmp, args.num, 1.0, 0, batch_size=args.batch_size, device=args.device,
                          show_progress=False)
            return args.num / (time.perf_counter() - start)

    print(f"preset {args.preset} ({cfg.resolution}³), {args.num} volumes in batches of {args.batch_size}, "
          f"device {args.device}, {torch.get_num_threads()} thread(s); load average before: "
          f"{open('/proc/loadavg').read().split()[:3]}", flush=True)
    for mode in MODES:  # warm-up: first-call allocations and kernel selection
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled="bf16" in mode):
            models[mode].sample(1)
    best: dict[str, float] = {}
    loads = []
    for _ in range(args.repeats):
        for mode in MODES:
            best[mode] = max(best.get(mode, 0.0), rate(mode))
            loads.append(float(open("/proc/loadavg").read().split()[0]))
        best["fp32 +write"] = max(best.get("fp32 +write", 0.0), rate_writing())
    print(f"load average during the runs {min(loads):.2f}-{max(loads):.2f}")
    print(f"{'mode':<22} {'volumes/s':>10} {'s/volume':>9} {'x fp32':>7}")
    for mode, value in best.items():
        print(f"{mode:<22} {value:10.3f} {1 / value:9.3f} {value / best['fp32']:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
