"""What training writes for people to look at besides the curves: reconstructions and prior samples
of the EMA model every ``figures_every`` steps, and the final folder of samples (rank 0 only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config
from ..model import VeryDeepVAE, autocast_for
from ..sampling import iter_sample_batches, write_samples
from .batches import covariates_of
from .reporting import Reporter


VOXELS_PER_PASS = 4 * 32 ** 3  # the figures' volumes per forward pass: 4 at 32³, one at 64³ and above


def volumes_per_pass(resolution: int) -> int:
    """How many volumes a figure's forward pass takes at once: one from 64³ up, where a batch of
    ``subjects_to_plot`` full-precision volumes can need more memory than the training step itself
    (at 128³, 4 reconstructions in fp32 hold ~12.7 GiB); several below, where a pass of one small
    volume is mostly per-layer overhead (at 32³ on 2 CPU cores, a subject's six reconstruction rows
    took 3.1 s alone and 4 subjects' 1.6-2.1 s together)."""
    return max(1, VOXELS_PER_PASS // resolution ** 3)


@torch.no_grad()
def training_figures(model: VeryDeepVAE, cfg: Config, val: Any, device: torch.device, seed: int,
                     reporter: Reporter, step: int) -> Path:
    """Reconstructions and samples of ``model`` (the EMA one) under the training precision,
    :func:`volumes_per_pass` volumes at a time.  Returns the sample figure's path."""
    model = model.eval()
    n = min(cfg.subjects_to_plot, len(val))
    per_pass = volumes_per_pass(cfg.resolution)
    with autocast_for(cfg.precision, device):
        if n > 0:
            x = torch.stack([val[i] for i in range(n)]).to(device)
            c = covariates_of(val, range(n), device)
            levels = [None] + list(range(1, model.decoder.num_levels))
            names = ["reconstruction"] + [f"prior <{cfg.resolution >> (level - 1)}³" for level in levels[1:]]
            reporter.reconstruction_figure(step, x, list(zip(names, _progressive(model, x, c, levels, per_pass))))
        wanted = max(1, cfg.subjects_to_plot)
        batches = list(iter_sample_batches(model, wanted, 1.0, seed, per_pass, device, False, means=True))
    samples = np.concatenate([batch.volumes for batch in batches])
    means = None if batches[0].means is None else np.concatenate([batch.means for batch in batches])
    return reporter.sample_figure(step, samples, 1.0, means)


def final_samples(model: VeryDeepVAE, bundle: Any, cfg: Config, seed: int, device: torch.device,
                  output_dir: Path) -> None:
    """``<run>/samples``: ``max(1, subjects_to_plot)`` prior samples of the EMA model, at temperature
    1, written as ``verydeepvae sample`` writes them (a conditional run's covariates drawn from the
    training scans' and recorded per volume), in the training precision as that command computes
    them, so that the same seed gives the same volumes."""
    num = max(1, cfg.subjects_to_plot)
    covariates, record = None, None
    schema = getattr(bundle, "covariates", None)
    if schema is not None:  # covariates drawn from the training scans', recorded per volume
        from ..conditional import resolve

        conditions = resolve(schema, [{} for _ in range(num)], seed)
        covariates = conditions.vectors
        record = {"conditions": conditions.record([f"sample_{i:04d}.nii.gz" for i in range(num)])}
    with autocast_for(cfg.precision, device):
        write_samples(model, output_dir / "samples", num=num,
                      temperature=1.0, seed=seed, voxel_size_mm=float(bundle.voxel_size_mm),
                      batch_size=cfg.batch_size, device=device, show_progress=False,
                      extra_record=record, covariates=covariates)


def _progressive(model: VeryDeepVAE, x: torch.Tensor, covariates: torch.Tensor | None,
                 levels: list[int | None], per_pass: int) -> list[torch.Tensor]:
    """``model.reconstructions`` of ``x`` at each of ``levels`` (prior from that level on, at
    temperature 0), ``per_pass`` volumes at a time (bounded memory), with their ``covariates`` when
    there are (a conditional model); one (N, 1, D, H, W) tensor per level."""
    passes = [model.reconstructions(x[i:i + per_pass], levels, temperature=0.0,
                                    covariates=None if covariates is None else covariates[i:i + per_pass])
              for i in range(0, x.shape[0], per_pass)]
    return [torch.cat([rows[k] for rows in passes]) for k in range(len(levels))]
