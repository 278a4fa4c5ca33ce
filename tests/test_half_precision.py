"""The original's ``half_precision: true`` on a CPU (its own test configuration does it): bf16 with a
one-line notice; an explicit fp16 on a CPU stays an error (issue 14)."""

from __future__ import annotations

import json

import pytest
import torch

from verydeepvae import legacy
from verydeepvae.config import build_config
from verydeepvae.errors import ConfigError
from verydeepvae.train import precision
from verydeepvae.checkpoint import list_checkpoints, load_checkpoint


def test_half_precision_is_fp16_on_a_gpu_and_bf16_with_a_notice_on_the_cpu(tmp_path):
    path = tmp_path / "original.json"
    path.write_text(json.dumps({"half_precision": True, "nii_target_shape": [16, 16, 16]}))
    cfg = build_config(preset="tiny", config_file=path, overrides={"device": "cpu"})  # no error here any more
    assert cfg.precision == "half"
    notices: list[str] = []
    assert precision.resolve_precision(cfg, torch.device("cpu"), notices).precision == "bf16"
    assert notices == ["half_precision: float16 autocast needs a CUDA GPU, so half precision on cpu is bf16"]
    notices.clear()
    assert precision.resolve_precision(cfg, torch.device("cuda", 0), notices).precision == "fp16"
    assert notices == []
    assert build_config(overrides={"half_precision": False}).precision == "fp32"


def test_an_explicit_fp16_on_the_cpu_is_still_an_error():
    with pytest.raises(ConfigError, match="precision fp16 needs a CUDA device; use bf16 on the CPU"):
        build_config(preset="tiny", overrides={"precision": "fp16", "device": "cpu"})
    auto = build_config(preset="tiny", overrides={"precision": "fp16"})  # device auto: known at run time
    with pytest.raises(ConfigError, match="precision fp16 needs a CUDA device, and this run is on cpu"):
        precision.resolve_precision(auto, torch.device("cpu"), [])


def test_cli_fp16_on_the_cpu_stops_before_the_output_folder_is_touched(tmp_path, capsys):
    from verydeepvae.cli import main

    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--precision", "fp16", "--output", str(out), "--max-steps", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "precision fp16 needs a CUDA device" in err[0], err
    assert not out.exists()


@pytest.mark.slow
def test_the_original_half_precision_configuration_trains_on_the_cpu(tmp_path, capsys):
    from conftest import write_ellipsoids

    write_ellipsoids(tmp_path / "flair", 4, size=16)
    hyper_params = {
        "total_epochs": 1, "batch_size": 2, "train_frac": 0.5, "random_seed": 7, "half_precision": True,
        "latents_per_channel": [1, 1, 1, 1, 1], "channels_per_latent": [2, 2, 2, 2, 4],
        "channels": [4, 4, 4, 4, 4], "kernel_sizes_bottom_up": [3, 3, 3, 2, 1],
        "kernel_sizes_top_down": [3, 3, 3, 2, 1], "nii_target_shape": [16, 16, 16],
        "visualise_training_pipeline_before_starting": False, "subjects_to_plot": 0, "workers_per_process": 0,
        "CUDA_devices": ["0"],
    }
    out = tmp_path / "output"
    code = legacy.run_from_hyper_params(hyper_params, ["--CUDA_devices", "0", "--nifti_flair_dir",
                                                       str(tmp_path / "flair"), "--output_dir", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "half_precision: float16 autocast needs a CUDA GPU, so half precision on cpu is bf16" in captured.out + captured.err
    assert load_checkpoint(list_checkpoints(out / "checkpoints")[-1]).config.precision == "bf16"


def test_precision_and_memory_format_default_to_auto_and_resolve_by_device(monkeypatch):
    cfg = build_config(preset="32")
    assert cfg.precision == "auto" and cfg.channels_last == "auto"
    assert cfg.model.channels_last is False  # unresolved: the contiguous format
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    notices: list[str] = []
    cpu = precision.resolve_memory_format(precision.resolve_precision(cfg, torch.device("cpu"), notices),
                                          torch.device("cpu"), notices)
    assert cpu.precision == "bf16" and cpu.channels_last is True and cpu.model.channels_last is True
    assert notices == ["precision auto: bf16 (this CPU has native bfloat16 instructions)",
                       "channels_last auto: on (the fast memory format for CPU convolutions)"]
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision(cfg, torch.device("cpu"), []).precision == "fp32"
    gpu_notices: list[str] = []
    assert precision.resolve_memory_format(cfg, torch.device("cuda"), gpu_notices).channels_last is False
    assert "off (not measured on cuda" in gpu_notices[0]


def test_explicit_speed_settings_win_and_a_wrong_memory_format_is_one_error():
    for value in (True, False):
        cfg = build_config(preset="tiny", overrides={"channels_last": value, "precision": "fp32"})
        notices: list[str] = []
        resolved = precision.resolve_memory_format(precision.resolve_precision(cfg, torch.device("cpu"), notices),
                                                   torch.device("cpu"), notices)
        assert resolved.channels_last is value and resolved.precision == "fp32" and notices == []
    with pytest.raises(ConfigError, match='channels_last must be true, false or "auto", got \'fast\''):
        build_config(preset="tiny", overrides={"channels_last": "fast"})
