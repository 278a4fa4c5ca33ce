"""``visualise_training_pipeline_before_starting``: look at what the model will be trained on.

Writes ``<output_dir>/pipeline_test/``: for the first few training volumes, the preprocessed
volume and one augmented draw as NIfTI (with an affine that matches the model's grid, so they
open the right way round in any viewer) and ``pipeline_test.png``, a montage of mid-slices with
the names of the augmentations that fired.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..viz import save_montage
from ..volume_io import grid_affine, save_nifti
from .augment import sample_generator


def write_pipeline_preview(bundle, output_dir: str | Path, n: int = 4) -> Path:
    """Write the preview folder and return its path."""
    folder = Path(output_dir) / "pipeline_test"
    folder.mkdir(parents=True, exist_ok=True)
    data = bundle.train
    count = min(int(n), len(data))
    volumes, titles = [], []
    for i in range(count):
        plain = data.volume(i)
        affine = grid_affine(plain.shape, bundle.voxel_size_mm)
        stem = _stem(data.files[i])
        if data.augmenter is not None:
            augmented, applied = data.augmenter.apply(torch.from_numpy(plain)[None], sample_generator(i))
            augmented = augmented[0].numpy()
        else:
            augmented, applied = plain, []
        save_nifti(plain, folder / f"{i:02d}_{stem}_preprocessed.nii.gz", affine, "preprocessed")
        save_nifti(augmented, folder / f"{i:02d}_{stem}_augmented.nii.gz", affine,
                   "augmented: " + (", ".join(applied) or "none"))
        volumes += [plain, augmented]
        titles += [f"{stem[:18]}", "aug: " + (", ".join(applied) or "none")]
    if volumes:
        save_montage(volumes, folder / "pipeline_test.png", titles=titles,
                     suptitle=f"training pipeline: {bundle.voxel_size_mm:.2f} mm voxels")
    return folder


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "volume"
