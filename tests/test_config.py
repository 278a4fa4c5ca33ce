"""Configuration: presets, legacy names, overrides and validation messages."""

import json

import pytest

from verydeepvae.cli import main
from verydeepvae.config import PRESETS, Config, build_config, parse_override
from verydeepvae.errors import ConfigError


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_validates(name):
    cfg = build_config(preset=name)
    assert len(cfg.channels) <= cfg.resolution.bit_length()


@pytest.mark.parametrize("name,batch,latents", [
    ("32", 64, [2, 5, 4, 3, 2, 1]),
    ("64", 8, [2, 6, 5, 4, 3, 2, 1]),
    ("128", 1, [2, 7, 6, 5, 4, 3, 2, 1]),
])
def test_original_presets_keep_original_layer_definitions(name, batch, latents):
    cfg = build_config(preset=name)
    k = len(latents)
    assert cfg.batch_size == batch
    assert cfg.latent_feature_maps_per_resolution == latents
    assert cfg.channels == [20 * (i + 1) for i in range(k)]
    assert cfg.channels_per_latent == [20] * (k - 1) + [200]
    assert cfg.kernel_sizes_bottom_up == cfg.kernel_sizes_top_down == [3] * (k - 2) + [2, 1]


def test_seed_readme_names_are_accepted(tmp_path):
    legacy = {
        "latents_per_channel": [2, 7, 6, 5, 4, 3, 2, 1],
        "channels_per_latent": [20, 20, 20, 20, 20, 20, 20, 200],
        "channels": [20, 40, 60, 80, 100, 120, 140, 160],
        "kernel_sizes_bottom_up": [3, 3, 3, 3, 3, 3, 2, 1],
        "kernel_sizes_top_down": [3, 3, 3, 3, 3, 3, 2, 1],
        "nii_target_shape": [128, 128, 128],
        "batch_size": 1,
        "max_niis_to_use": 50,
        "visualise_training_pipeline_before_starting": True,
        "nifti_flair_dir": "/data/flair",
        "half_precision": True,
        "verbose": True,
    }
    path = tmp_path / "legacy.json"
    path.write_text(json.dumps(legacy))
    notices = []
    cfg = build_config(config_file=path, notices=notices)
    assert cfg.resolution == 128
    assert cfg.latent_feature_maps_per_resolution == [2, 7, 6, 5, 4, 3, 2, 1]
    assert cfg.data_path == "/data/flair"
    assert cfg.precision == "half"  # fp16 on a CUDA GPU, bf16 elsewhere (test_half_precision.py)
    assert cfg.max_niis_to_use == 50
    assert any("verbose" in n for n in notices)


def test_later_names_are_accepted():
    cfg = build_config(overrides={
        "resolution": 16, "channels": [4, 8, 8, 8, 8], "channels_hidden": [2, 4, 4, 4, 4],
        "channels_top_down": [6, 6, 6, 6, 6], "channels_hidden_top_down": [3, 3, 3, 3, 3],
        "channels_per_latent": [2, 2, 2, 2, 2], "latent_feature_maps_per_resolution": [1, 1, 1, 1, 1],
        "kernel_sizes_bottom_up": [3, 3, 3, 2, 1], "kernel_sizes_top_down": [3, 3, 3, 2, 1],
    })
    assert cfg.hidden_top_down_channels == [3] * 5 and cfg.model.channels_hidden_top_down == (3,) * 5


def test_shorter_lists_put_the_top_at_a_coarser_level():
    cfg = build_config(overrides={
        "resolution": 32, "channels": [8, 8, 8], "channels_per_latent": [2, 2, 2],
        "latent_feature_maps_per_resolution": [1, 1, 1], "kernel_sizes_bottom_up": [3, 3, 3],
        "kernel_sizes_top_down": [3, 3, 3],
    })
    assert cfg.level_resolutions() == [32, 16, 8]


@pytest.mark.parametrize("overrides,fragment", [
    ({"foo": 1}, "unknown configuration key 'foo'"),
    ({"batch_size": "100.2"}, "batch_size must be an integer"),
    ({"batch_size": -1}, "batch_size must be >= 1"),
    ({"resolution": 48}, "resolution must be a power of two"),
    ({"channels_per_latent": [20, 20]}, "channels_per_latent must have 6 entries"),
    ({"kernel_sizes_top_down": [3, 3, 3, 3, 2, 9]}, "kernel_sizes_top_down[5] must be between 1 and 7"),
    ({"likelihood": "bernoulli"}, "likelihood must be one of"),
    ({"nii_target_shape": [64, 64, 32]}, "nii_target_shape must be a cube"),
    ({"channels": [8] * 7}, "channels must have between 1 and 6 entries"),
    ({"batch_sise": 2}, "did you mean 'batch_size'"),
    ({"intensity_anchor_percentile": 100}, "intensity_anchor_percentile must be between 1 and 99.9"),
])
def test_invalid_values_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        build_config(overrides=overrides)
    assert fragment in str(info.value)


def test_channels_per_latent_is_never_clamped():
    cfg = build_config(preset="32")
    assert cfg.channels_per_latent[-1] == 200 > cfg.channels[-1]


def test_override_parsing():
    assert parse_override("batch_size=2") == ("batch_size", 2)
    assert parse_override("channels=8,16") == ("channels", [8, 16])
    assert parse_override("channels=[8, 16]") == ("channels", [8, 16])
    assert parse_override("data_path=/a,b") == ("data_path", "/a,b")
    assert parse_override("seed=null") == ("seed", None)


def test_cli_bad_config_exits_2_with_one_line(capsys):
    assert main(["config", "show", "--preset", "tiny", "--set", "batch_size=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["verydeepvae: error: batch_size must be >= 1, got 0"]


def test_cli_config_show_prints_sizes(capsys):
    assert main(["config", "show", "--preset", "32"]) == 0
    out = capsys.readouterr().out
    assert "11,329,482" in out and "latent dimensions: 1,765,640" in out


def test_defaults_are_the_32_preset_architecture():
    default, preset = Config(), build_config(preset="32")
    assert default.channels == preset.channels
    assert default.latent_feature_maps_per_resolution == preset.latent_feature_maps_per_resolution
