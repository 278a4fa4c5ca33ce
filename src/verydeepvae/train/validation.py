"""The validation pass: the validation volumes through the EMA model, and the figures made of them.

Apart from the loop (loop.py) because it is a computation of its own: each rank sums its share of
the volumes (``local_sums``), the loop all-reduces the sums, and ``validation_values`` turns the
combined sums into the logged figures.  Units: nats per voxel in the sums, bits per voxel in the
figures (as ``stats.py``).
"""

from __future__ import annotations

from typing import Callable, ContextManager, Sequence

import torch

from ..config import Config
from .batches import covariates_of
from .distributed import Runtime
from .stats import ValidationSums, layer_kl_values, loss_values


@torch.no_grad()
def local_sums(model: torch.nn.Module, data, runtime: Runtime, cfg: Config, device: torch.device,
               autocast: Callable[[], ContextManager]) -> ValidationSums:
    """This rank's share of ``data`` (every ``world_size``-th volume from ``rank``) through ``model``
    in batches of ``cfg.batch_size``, at most ``cfg.max_validation_batches`` of them, summed."""
    model.eval()
    indices = list(range(runtime.rank, len(data), runtime.world_size))
    sums = ValidationSums.zeros(model.num_layers, device)
    limit = cfg.max_validation_batches
    for b, start in enumerate(range(0, len(indices), cfg.batch_size)):
        if limit is not None and b >= limit:
            break
        batch = indices[start:start + cfg.batch_size]
        x = torch.stack([data[i] for i in batch]).to(device)
        with autocast():
            out = model(x, covariates=covariates_of(data, batch, device))
        sums.elbo += out.elbo.double().sum()
        sums.nll += out.nll.double().sum()
        sums.count += x.shape[0]
        sums.kl += out.kl_per_layer.double().sum(0)
    return sums


def validation_values(sums: ValidationSums, layer_levels: Sequence[int],
                      resolution: int) -> tuple[float, dict[str, float]]:
    """The mean negative ELBO over every validation volume (nats/voxel) and the logged figures:
    loss, ELBO, reconstruction and KL in bits/voxel, and the KL of each latent layer."""
    count = max(sums.count.item(), 1.0)
    elbo, nll = sums.elbo.item() / count, sums.nll.item() / count
    kl = (sums.kl / count).tolist()
    return elbo, {**loss_values(elbo, nll, sum(kl)), **layer_kl_values(kl, layer_levels, resolution)}
