#!/usr/bin/env python
"""Data pipeline speed: volumes per second with a cold cache and a warm one (with augmentation).

    python bench/data_pipeline.py                    # 64^3 and 128^3, 8 generated volumes each
    python bench/data_pipeline.py --n 16 --workers 2 --resolutions 64

The inputs are generated head-like volumes in two typical shapes, stored as int16 .nii.gz:
half 1 mm isotropic 182x218x182 (MNI-like T1), half 0.9x0.9x3 mm 256x256x56 (clinical FLAIR,
LPS-oriented).  Columns:

* cold: check + content hash + decode + reorient + intensity + resample + cache write, per file
  (what the first run pays once, before training);
* warm: ``dataset[i]`` from the cache without augmentation (validation, and every later epoch);
* warm+aug: ``dataset[i]`` with the default augmentation probabilities;
* warm+aug all: every transform except elastic firing on every volume (worst case);
* warm+elastic: elastic deformation alone on every volume (off by default).

Prints figures only; nothing is asserted.  Per process; DataLoader workers multiply the warm
figures roughly by the number of cores they get.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

from verydeepvae.process_defaults import apply_cli_defaults

apply_cli_defaults()  # as the CLI does, before anything loads torch (a bounded OpenMP spin, process_defaults.py)

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from verydeepvae.data.augment import Augmenter, AugmentSettings
from verydeepvae.data.cache import VolumeCache
from verydeepvae.data.datasets import VolumeDataset, prepare_files
from verydeepvae.data.nifti_load import PreprocessSettings


def make_head(shape: tuple[int, int, int], zooms: tuple[float, float, float], lps: bool, seed: int) -> nib.Nifti1Image:
    rng = np.random.default_rng(seed)
    signs = np.array([-1.0, -1.0, 1.0]) if lps else np.ones(3)
    affine = np.diag(list(signs * np.array(zooms)) + [1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    axes = [(np.arange(n) - (n - 1) / 2) * z for n, z in zip(shape, zooms)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    radii = np.array([70.0, 90.0, 70.0]) * rng.uniform(0.9, 1.1, 3)
    r = np.sqrt((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2)
    brain = (r < 1.0) * (600 + 200 * np.cos(x / 6.0) * np.sin(y / 7.0)) + (r < 0.3) * -300
    volume = brain + rng.normal(0, 15, shape) * (r < 1.1) + np.abs(rng.normal(0, 5, shape))
    return nib.Nifti1Image(np.clip(volume, 0, 4000).astype(np.int16), affine)


def write_inputs(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        if i % 2 == 0:
            image = make_head((182, 218, 182), (1.0, 1.0, 1.0), lps=False, seed=i)
        else:
            image = make_head((256, 256, 56), (0.9, 0.9, 3.0), lps=True, seed=i)
        path = folder / f"sub-{i:03d}.nii.gz"
        nib.save(image, str(path))
        paths.append(path)
    return paths


def rate(dataset: VolumeDataset, repeats: int) -> float:
    dataset[0]  # warm-up (first allocation)
    start = time.perf_counter()
    count = 0
    for _ in range(repeats):
        for i in range(len(dataset)):
            dataset[i]
            count += 1
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="data pipeline speed (cold and warm cache)")
    parser.add_argument("--n", type=int, default=8, help="generated input volumes")
    parser.add_argument("--resolutions", default="64,128")
    parser.add_argument("--workers", type=int, default=1, help="preprocessing processes for the cold pass")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the data for warm figures")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # like a DataLoader worker
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        files = write_inputs(root / "in", args.n)
        size_mb = sum(p.stat().st_size for p in files) / 1e6
        print(f"{args.n} inputs ({size_mb:.0f} MB .nii.gz) written in {time.perf_counter() - start:.1f} s; "
              f"cpus={os.cpu_count()}, torch threads=1, cold-pass workers={args.workers}")
        header = f"{'R':>4} {'vox mm':>7} {'cold':>7} {'warm':>7} {'warm+aug':>9} {'aug all':>8} {'elastic':>8}  (volumes/s)"
        print(header)
        for resolution in (int(r) for r in args.resolutions.split(",")):
            settings = PreprocessSettings(resolution=resolution)
            cache = VolumeCache(root / f"cache{resolution}", settings)
            start = time.perf_counter()
            prepared, bad = prepare_files(files, cache, workers=args.workers, show_progress=False)
            cold = len(files) / (time.perf_counter() - start)
            assert not bad, bad
            names = [str(f) for f in files]
            digests = [prepared[n][0] for n in names]
            voxel = float(np.median([prepared[n][1]["voxel_size_mm"] for n in names]))
            plain = VolumeDataset(names, digests, cache)
            warm = rate(plain, args.repeats)
            defaults = AugmentSettings()
            everything = dataclasses.replace(defaults, affine=1, bias_field=1, gamma=1, anisotropy=1, haircut=1)
            elastic = AugmentSettings(0, 1, 0, 0, 0, 0)
            warm_up = Augmenter(AugmentSettings(1, 1, 1, 1, 1, 1), resolution)  # MONAI's first calls are slow
            warm_up(torch.from_numpy(plain.volume(0))[None], np.random.default_rng(0))
            aug = rate(VolumeDataset(names, digests, cache, Augmenter(defaults, resolution)), args.repeats)
            aug_all = rate(VolumeDataset(names, digests, cache, Augmenter(everything, resolution)), 1)
            ela = rate(VolumeDataset(names[:2], digests[:2], cache, Augmenter(elastic, resolution)), 1)
            print(f"{resolution:>4} {voxel:>7.2f} {cold:>7.2f} {warm:>7.1f} {aug:>9.1f} {aug_all:>8.1f} {ela:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
