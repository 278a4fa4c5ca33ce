#!/usr/bin/env python
"""Phantom generation speed: volumes per second in memory at 32/64/128, and to disk.

    python bench/phantom.py                 # in-memory table + 100 x 64^3 written to a temp dir
    python bench/phantom.py --skip-disk

Prints figures only; nothing is asserted (the target is 100 volumes at 64^3 in under a minute).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from verydeepvae.data.phantom import generate_population, generate_volume, subject_seed, voxel_size_mm
from verydeepvae.data.phantom_render import anatomy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="phantom generation speed")
    parser.add_argument("--counts", default="32:40,64:40,128:8", help="resolution:volumes,...")
    parser.add_argument("--disk", type=int, default=100, help="volumes written at 64^3 (0 to skip)")
    parser.add_argument("--skip-disk", action="store_true")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    anatomy()
    print(f"atlas load + preparation (once per process): {time.perf_counter() - start:.2f} s")
    print(f"{'resolution':>10} {'voxel mm':>9} {'volumes':>8} {'seconds':>8} {'vol/s':>7} {'ms/vol':>7}")
    for item in args.counts.split(","):
        resolution, count = (int(v) for v in item.split(":"))
        generate_volume(0, resolution)  # warm-up
        start = time.perf_counter()
        for i in range(count):
            generate_volume(subject_seed(0, i), resolution)
        seconds = time.perf_counter() - start
        print(f"{resolution:>10} {voxel_size_mm(resolution):>9.2f} {count:>8} {seconds:>8.2f} "
              f"{count / seconds:>7.2f} {1000 * seconds / count:>7.0f}")
    if args.disk and not args.skip_disk:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            generate_population(args.disk, 64, tmp, seed=0, progress=False)
            seconds = time.perf_counter() - start
        print(f"generate_population({args.disk}, 64) to disk (.nii.gz + participants.tsv + montage): "
              f"{seconds:.1f} s = {args.disk / seconds:.1f} vol/s (target: 100 in < 60 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
