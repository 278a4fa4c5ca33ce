"""The validation pass (train/validation.py): every volume is passed once by one rank, the batch
limit is honoured, and the logged figures are the per-volume means in bits per voxel."""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import pytest
import torch

from verydeepvae.config import build_config
from verydeepvae.model import VeryDeepVAE
from verydeepvae.train.distributed import Runtime
from verydeepvae.train.validation import local_sums, validation_values

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setting():
    cfg = replace(build_config(preset="tiny"), batch_size=2)
    torch.manual_seed(0)
    model = VeryDeepVAE(cfg)
    volumes = [torch.rand(1, cfg.resolution, cfg.resolution, cfg.resolution) for _ in range(5)]
    return cfg, model, volumes


def _sums(cfg, model, volumes, rank=0, world_size=1):
    runtime = Runtime(rank=rank, local_rank=rank, world_size=world_size, device=CPU)
    torch.manual_seed(7)  # the posterior draws
    return local_sums(model, volumes, runtime, cfg, CPU, contextlib.nullcontext)


def test_each_volume_is_passed_once_by_exactly_one_rank(setting):
    cfg, model, volumes = setting
    marked = [torch.full_like(v, i / 10) for i, v in enumerate(volumes)]  # a volume known by its value
    seen = {}

    def record(rank):
        def hook(module, args, kwargs):
            seen.setdefault(rank, []).extend(round(x.flatten()[0].item() * 10) for x in args[0])
        return hook

    for rank in (0, 1):
        handle = model.register_forward_pre_hook(record(rank), with_kwargs=True)
        try:
            assert _sums(cfg, model, marked, rank, 2).count.item() == len(seen[rank])
        finally:
            handle.remove()
    assert sorted(seen[0] + seen[1]) == list(range(5)) and not set(seen[0]) & set(seen[1])


def test_the_batch_limit_stops_the_pass(setting):
    cfg, model, volumes = setting
    limited = _sums(replace(cfg, max_validation_batches=1), model, volumes)
    assert limited.count.item() == cfg.batch_size


def test_the_figures_are_per_volume_means_in_bits(setting):
    cfg, model, volumes = setting
    sums = _sums(cfg, model, volumes)
    elbo, values = validation_values(sums, model.layer_levels, cfg.resolution)
    assert elbo == pytest.approx(sums.elbo.item() / 5)
    assert values["elbo_bits_per_voxel"] == pytest.approx(elbo / math.log(2))
    layers = [k for k in values if k.startswith("kl_layer/")]
    assert len(layers) == model.num_layers
    assert sum(values[k] for k in layers) == pytest.approx(values["kl_bits_per_voxel"])
    assert values["elbo_bits_per_voxel"] >= values["nll_bits_per_voxel"]
