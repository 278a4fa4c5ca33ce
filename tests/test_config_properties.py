"""Property-based: every generated configuration either validates and builds a model whose
forward pass runs on a tiny input, or is rejected with a ConfigError; never a crash in the model."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from verydeepvae.config import build_config
from verydeepvae.errors import ConfigError
from verydeepvae.model import VeryDeepVAE


@st.composite
def configurations(draw):
    """Mostly valid configurations; a third of them carry one random defect."""
    resolution = draw(st.sampled_from([2, 4, 8, 16]))
    levels = draw(st.integers(1, resolution.bit_length()))

    def per_level(values):
        return draw(st.lists(values, min_size=levels, max_size=levels))

    overrides = {
        "resolution": resolution,
        "channels": per_level(st.integers(1, 6)),
        "channels_per_latent": per_level(st.integers(1, 4)),
        "latent_feature_maps_per_resolution": per_level(st.integers(0, 2))[:-1] + [draw(st.integers(1, 2))],
        "kernel_sizes_bottom_up": per_level(st.integers(1, 4)),
        "kernel_sizes_top_down": per_level(st.integers(1, 4)),
        "downsampling": draw(st.sampled_from(["avgpool", "nearest", "conv"])),
        "likelihood": draw(st.sampled_from(["discretised_logistic", "gaussian"])),
        "bottleneck_resnet_encoder": draw(st.booleans()),
        "only_use_one_conv_block_at_top": draw(st.booleans()),
    }
    if draw(st.booleans()):
        overrides["channels_hidden"] = per_level(st.integers(1, 6))
    defect = draw(st.sampled_from([None] * 16 + list(range(8))))
    key = draw(st.sampled_from(["channels", "channels_per_latent", "latent_feature_maps_per_resolution",
                                "kernel_sizes_bottom_up", "kernel_sizes_top_down"]))
    if defect == 0:
        overrides[key] = overrides[key][:-1] or [1, 1]
    elif defect == 1:
        overrides[key] = overrides[key] + [1]
    elif defect == 2:
        overrides[key] = [draw(st.integers(-2, 0))] + overrides[key][1:]
    elif defect == 3:
        overrides["kernel_sizes_top_down"] = [draw(st.integers(8, 12))] * levels
    elif defect == 4:
        overrides["resolution"] = draw(st.sampled_from([0, 3, 12, 24]))
    elif defect == 5:
        overrides[key] = "wide"
    elif defect == 6:
        overrides["downsampling"] = "maxpool"
    elif defect == 7:
        overrides["latent_feature_maps_per_resolution"] = overrides["latent_feature_maps_per_resolution"][:-1] + [0]
    return overrides


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configurations())
def test_config_validates_and_runs_or_is_rejected(overrides):
    try:
        cfg = build_config(overrides=overrides)
    except ConfigError as error:
        assert str(error) and "\n" not in str(error)
        return
    model = VeryDeepVAE(cfg)
    x = torch.rand(1, 1, cfg.resolution, cfg.resolution, cfg.resolution)
    out = model(x)
    assert torch.isfinite(out.loss)
    assert model.sample(1).shape == x.shape
