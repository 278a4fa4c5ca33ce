"""Using a trained model: load it from a checkpoint and write samples as NIfTI + PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from . import viz
from .atomic import write_json
from .model import VeryDeepVAE
from .train import checkpoint as ckpt
from .volume_io import grid_affine, save_nifti


def load_model(checkpoint: ckpt.Checkpoint, use_ema: bool = True,
               device: str | torch.device = "cpu") -> VeryDeepVAE:
    """Rebuild the model from the checkpoint's own config and load its (EMA) weights."""
    model = VeryDeepVAE(checkpoint.config)
    state = checkpoint.state("ema" if use_ema else "model")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        from .errors import CheckpointError

        raise CheckpointError(
            f"checkpoint {checkpoint.path} does not match its own architecture "
            f"(missing {len(missing)} tensors, unexpected {len(unexpected)})"
        )
    return model.to(device).eval()


def write_samples(model: VeryDeepVAE, output_dir: str | Path, num: int,
                  temperature: float | Sequence[float] = 1.0, seed: int = 0, voxel_size_mm: float = 1.0,
                  batch_size: int = 4, device: str | torch.device = "cpu", show_progress: bool = True,
                  intensity_scale: float | None = None, extra_record: dict | None = None) -> list[Path]:
    """Draw ``num`` volumes from the prior and write ``sample_XXXX.nii.gz``, a montage and a
    ``samples.json`` record (seed, temperature, checkpoint...).  The same seed gives the same volumes.

    ``intensity_scale`` multiplies the model-range [0, 1] intensities (to map them back to the
    training data's typical scale); None keeps [0, 1].
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    affine = grid_affine((model.resolution,) * 3, voxel_size_mm)
    paths: list[Path] = []
    previews = []
    with tqdm(total=num, unit="vol", desc="sample", disable=not show_progress) as bar:
        for start in range(0, num, batch_size):
            count = min(batch_size, num - start)
            volumes = model.sample(count, temperature, generator=generator).float().cpu()
            for i in range(count):
                volume = volumes[i, 0].numpy()
                if len(previews) < 8:
                    previews.append(volume)
                if intensity_scale is not None:
                    volume = volume * intensity_scale
                path = output_dir / f"sample_{start + i:04d}.nii.gz"
                save_nifti(volume, path, affine, description=f"verydeepvae sample seed {seed} T {temperature}")
                paths.append(path)
            bar.update(count)
    viz.save_montage(previews, output_dir / "samples.png", titles=[p.name for p in paths[: len(previews)]],
                     suptitle=f"prior samples, temperature {temperature}, seed {seed}")
    record = {"num": num, "seed": seed, "temperature": temperature, "voxel_size_mm": voxel_size_mm,
              "intensity_scale": intensity_scale, "files": [p.name for p in paths]}
    record.update(extra_record or {})
    write_json(output_dir / "samples.json", record)
    return paths
