"""The memory estimate (memory.py) matches the model: stored activations against what autograd keeps,
work per level against the convolutions, batch-size arithmetic, size parsing and `config show
--estimate-memory`.  Measured peaks live in bench/train_step.py."""

from __future__ import annotations

import pytest
import torch

from verydeepvae import memory
from verydeepvae.cli import main
from verydeepvae.config import build_config
from verydeepvae.model import VeryDeepVAE


@pytest.mark.parametrize("preset,precision", [("tiny", "fp32"), ("demo", "fp32"), ("demo", "bf16")])
def test_estimated_activations_match_what_autograd_keeps(preset, precision):
    """Per level (8³ and finer), the estimate of stored activations is within 10% of the bytes
    that autograd actually keeps for the backward pass (saved tensors, weights excluded)."""
    cfg = build_config(preset=preset, overrides={"precision": precision})
    model = VeryDeepVAE(cfg)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, tuple[int, int]] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and t.dim() == 5:
            kept[storage.data_ptr()] = (storage.nbytes(), t.shape[-1])
        return t

    x = torch.rand(1, 1, cfg.resolution, cfg.resolution, cfg.resolution)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        model(x)
    estimate = memory.estimate(cfg)
    for level in estimate.levels:
        if level.resolution < 8:
            continue
        measured = sum(n for n, size in kept.values() if size == level.resolution)
        assert level.stored == pytest.approx(measured, rel=0.10), level


@pytest.mark.parametrize("preset,bottleneck", [("tiny", True), ("demo", True), ("demo", False)])
def test_estimated_work_per_level_is_what_the_convolutions_do(preset, bottleneck):
    """The multiply-accumulates the estimate counts per level are exactly those of the level's
    convolutions in a forward pass (encoder blocks, latent layers, the upsampling projection)."""
    cfg = build_config(preset=preset, overrides={"bottleneck_resnet_encoder": bottleneck})
    model = VeryDeepVAE(cfg)
    layer_levels = dict(enumerate(model.decoder.layer_levels))
    counted: dict[int, int] = {}

    def level_of(name: str) -> int | None:
        part, group, index = (name.split(".") + ["", "", ""])[:3]
        if (part, group) in (("encoder", "levels"), ("decoder", "upsamples")):
            return int(index)
        return layer_levels[int(index)] if (part, group) == ("decoder", "layers") else None

    def hook(conv, _inputs, output, level):
        counted[level] = counted.get(level, 0) + output[0].numel() * conv.in_channels * conv.weight[0, 0].numel()

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv3d) and level_of(name) is not None:
            module.register_forward_hook(lambda m, i, o, lv=level_of(name): hook(m, i, o, lv))
    with torch.no_grad():
        model(torch.rand(1, 1, cfg.resolution, cfg.resolution, cfg.resolution))
    est = memory.estimate(cfg)
    assert [lv.forward_macs for lv in est.levels] == [counted[lv.level] for lv in est.levels]
    assert sum(est.recomputation_share(lv.level) for lv in est.levels) == pytest.approx(1 / 3)


def test_memory_estimate_structure():
    cfg = build_config(preset="32")
    est = memory.estimate(cfg)
    assert est.parameters == sum(p.numel() for p in VeryDeepVAE(cfg).parameters())
    assert [lv.resolution for lv in est.levels] == cfg.level_resolutions()
    every = list(range(cfg.num_levels))
    assert est.per_sample(every) < est.per_sample([0]) < est.per_sample([])
    assert est.peak(1) < est.peak(2) < est.peak(4)
    assert est.peak(4) - est.peak(2) == 2 * est.per_sample([])
    for batch in (1, 3, 8):
        assert est.max_batch_size(est.peak(batch)) == batch
        assert est.max_batch_size(est.peak(batch) - 1) == batch - 1
    assert est.max_batch_size(est.fixed_bytes // 2) == 0
    bf16 = memory.estimate(build_config(preset="32", overrides={"precision": "bf16"}))
    assert bf16.per_sample([]) < 0.7 * est.per_sample([])


@pytest.mark.parametrize("text,expected", [("24GiB", 24 * 2**30), ("16 GB", 16 * 10**9), ("8000MiB", 8000 * 2**20),
                                           ("1.5G", 1_500_000_000), ("1e9", 10**9)])
def test_parse_size(text, expected):
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "24XB", "-3GiB", "GiB", "0"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(ValueError):
        memory.parse_size(text)


def test_config_show_estimates_memory(capsys):
    assert main(["config", "show", "--preset", "64", "--estimate-memory", "--gpu-memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "memory estimate" in out and "largest batch in 24.00 GiB" in out
    assert "no checkpointing" in out and "checkpoint_levels all" in out


@pytest.mark.parametrize("argv,fragment", [
    (["--gpu-memory", "24GiB"], "--gpu-memory needs --estimate-memory"),
    (["--estimate-memory", "--gpu-memory", "lots"], "--gpu-memory"),
])
def test_config_show_memory_flag_errors(argv, fragment, capsys):
    assert main(["config", "show", "--preset", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1
