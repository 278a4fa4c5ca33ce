"""The original interface: run_autoencoder.py scripts with a hyper_params dict and the original flags."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from verydeepvae import legacy
from verydeepvae.config import build_config
from verydeepvae.errors import ConfigError, UserError
from verydeepvae.train import distributed
from verydeepvae.checkpoint import architecture_difference, list_checkpoints, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240


# --- the shipped configuration folders ---------------------------------------------------------------


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_shipped_scripts_define_the_original_layer_definitions(resolution):
    script = REPO / f"VeryDeepVAE_{resolution}x{resolution}x{resolution}" / "run_autoencoder.py"
    namespace = runpy.run_path(str(script), run_name="not_main")  # defines hyper_params, trains nothing
    overrides, ignored = legacy.translate(namespace["hyper_params"])
    notices: list[str] = []
    cfg = build_config(overrides=overrides, notices=notices)
    preset = build_config(preset=str(resolution))
    assert architecture_difference(cfg, preset) == []
    assert (cfg.resolution, cfg.batch_size, cfg.seed) == (resolution, preset.batch_size, preset.seed)
    assert namespace["hyper_params"]["CUDA_devices"] == ["0"]
    assert ignored == [] and notices == []


# --- flags, keys and devices ---------------------------------------------------------------------------


@pytest.mark.parametrize("given,expected", [
    (["0"], ["0"]), (["0,1,2,3,4,5,6,7"], [str(i) for i in range(8)]), (["0", "1", "2"], ["0", "1", "2"]),
    ("1,3", ["1", "3"]), ([0, 1], ["0", "1"]), (["0,", "1"], ["0", "1"]),
])
def test_cuda_devices_comma_or_space_separated(given, expected):
    assert legacy.parse_devices(given) == expected


@pytest.mark.parametrize("given", [["a"], ["0,0"], [""], ["-1"]])
def test_bad_cuda_devices_are_a_config_error(given):
    with pytest.raises(ConfigError):
        legacy.parse_devices(given)


def test_parser_accepts_both_generations_of_flags():
    args = legacy.build_parser().parse_args(
        ["--CUDA_devices", "0", "1", "--local-rank=3", "--nifti_dir", "d", "--json_config_file", "c.json",
         "--output_dir", "o", "--master_addr", "h", "--master_port", "1234", "--workers_per_process", "2",
         "--threads_per_rank", "4", "--nifti_filename_pattern", "*.nii"])
    assert args.CUDA_devices == ["0", "1"] and args.local_rank == 3 and args.nifti_dir == "d"
    assert legacy.build_parser().parse_args(["--local_rank", "0"]).local_rank == 0


@pytest.fixture(autouse=True)
def devices_not_yet_applied(monkeypatch):
    monkeypatch.setattr(distributed, "_applied_devices", None)


def test_plan_devices_without_gpu_is_a_cpu_notice():
    visible, notice = legacy.plan_devices(["0", "1"], gpu_count=0, visible=None)
    assert visible is None and "CPU with gloo" in notice and "\n" not in notice


def test_plan_devices_checks_that_devices_exist():
    assert legacy.plan_devices(["0", "1"], gpu_count=2, visible=None) == ("0,1", None)
    with pytest.raises(UserError, match="device 5 does not exist; this machine has 2 CUDA device"):
        legacy.plan_devices(["0", "1", "5"], gpu_count=2, visible=None)


def test_plan_devices_indexes_an_existing_cuda_visible_devices():
    # a scheduler gave us GPUs 4 and 6: CUDA_devices 0,1 are those two
    assert legacy.plan_devices(["0", "1"], gpu_count=8, visible="4,6") == ("4,6", None)
    assert legacy.plan_devices(["1"], gpu_count=8, visible="4,6") == ("6", None)
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES=4,6 makes 2 device"):
        legacy.plan_devices(["2"], gpu_count=8, visible="4,6")


def test_original_keys_are_translated_or_reported():
    original = {"latents_per_channel": [1, 1], "nii_target_shape": [2, 2, 2], "use_DDP": True,
                "likelihood": "Gaussian", "prob_affine": 0.3, "three_d_deform_sigmas": (1, 3), "verbose": True,
                "CUDA_devices": ["0"], "local_rank": 0, "current_dir": "/x", "master_port": 12345}
    overrides, ignored = legacy.translate(original)
    assert overrides == {"latents_per_channel": [1, 1], "nii_target_shape": [2, 2, 2], "likelihood": "gaussian",
                         "prob_affine": 0.3}  # renamed by build_config, as the other original names
    assert sorted(ignored) == ["current_dir", "master_port", "three_d_deform_sigmas", "use_DDP", "verbose"]


@pytest.mark.parametrize("key,value", [("use_nii_data", False), ("likelihood", "Bernoulli"),
                                       ("use_abs_not_square", True), ("sequence_type", "dwi")])
def test_original_values_asking_for_removed_features_are_errors(key, value):
    with pytest.raises(ConfigError, match=key if key != "likelihood" else "Bernoulli"):
        legacy.translate({key: value})


def test_a_later_source_replaces_the_same_setting_under_another_name():
    merged = legacy.merge_keys({"nii_target_shape": [32, 32, 32], "nifti_flair_dir": "a", "batch_size": 2},
                               {"resolution": 16, "data_path": "b"})
    assert merged == {"batch_size": 2, "resolution": 16, "data_path": "b"}


def test_several_devices_without_a_launcher_start_torchrun(monkeypatch, tmp_path):
    script = tmp_path / "run_autoencoder.py"
    script.write_text("# a configuration script\n")
    started: list[list[str]] = []
    monkeypatch.setattr(legacy, "_exec", started.append)
    monkeypatch.setattr(sys.modules["__main__"], "__file__", str(script), raising=False)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    argv = ["--CUDA_devices", "0,1", "--nifti_flair_dir", "/data"]
    assert legacy.run_from_hyper_params({"batch_size": 1}, argv) == 0
    assert started == [[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        str(script.resolve()), *argv]]
    assert legacy.launcher_command(2, "s.py", [], "10.0.0.1", 29400)[3:-1] == [
        "--nproc_per_node=2", "--nnodes=1", "--node_rank=0", "--master_addr=10.0.0.1", "--master_port=29400"]


def test_local_rank_other_than_0_without_a_launcher_is_an_error(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert legacy.run_from_hyper_params({}, ["--CUDA_devices", "0", "--local_rank", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--local_rank 2 without torchrun" in err[0]


def test_a_line_ending_in_backslash_space_is_explained(capsys):
    # the original README has such lines: `run_autoencoder.py \ ` passes " " as an argument
    assert legacy.run_from_hyper_params({}, [" "]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ends with '\\ '" in err[0]


def test_nonexistent_cuda_device_is_one_line_exit_2(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(distributed, "physical_gpu_count", lambda: 1)  # pretend: a machine with one GPU
    assert legacy.run_from_hyper_params({}, ["--CUDA_devices", "3", "--local_rank", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["verydeepvae: error: CUDA_devices 3: device 3 does not exist; this machine has 1 CUDA device(s) (0)"]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_unknown_hyper_params_key_names_the_closest_one(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = legacy.run_from_hyper_params({"bacth_size": 2}, ["--CUDA_devices", "0", "--output_dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'bacth_size'" in err[0] and "batch_size" in err[0]


# --- a seed-style configuration folder, run as the original README shows --------------------------------

TINY_HYPER_PARAMS = """
import sys
from verydeepvae.legacy import run_from_hyper_params

hyper_params = {'total_epochs': 1, 'batch_size': 2, 'learning_rate': 3e-3, 'train_frac': 0.75, 'random_seed': 7}
hyper_params['latents_per_channel'] = [1, 1, 1, 1, 1]
hyper_params['channels_per_latent'] = [4, 4, 4, 4, 8]
hyper_params['channels'] = [8, 12, 16, 16, 16]
hyper_params['kernel_sizes_bottom_up'] = [3, 3, 3, 2, 1]
hyper_params['kernel_sizes_top_down'] = [3, 3, 3, 2, 1]
hyper_params['channels_hidden'] = hyper_params['channels']
hyper_params['channels_top_down'] = hyper_params['channels']
hyper_params['channels_hidden_top_down'] = hyper_params['channels_hidden']
hyper_params['nii_target_shape'] = [16, 16, 16]
hyper_params['max_niis_to_use'] = 10
hyper_params['visualise_training_pipeline_before_starting'] = True
hyper_params['subjects_to_plot'] = 1
hyper_params['workers_per_process'] = 0
hyper_params['use_DDP'] = True
hyper_params['verbose'] = True
hyper_params['CUDA_devices'] = ['0']

if __name__ == '__main__':
    sys.exit(run_from_hyper_params(hyper_params))
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "CUDA_VISIBLE_DEVICES"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def seed_folder(tmp_path_factory) -> tuple[Path, Path]:
    from conftest import write_ellipsoids

    root = tmp_path_factory.mktemp("legacy")
    data = root / "flair"
    write_ellipsoids(data, 12, size=16)
    folder = root / "VeryDeepVAE_16x16x16"
    folder.mkdir()
    (folder / "run_autoencoder.py").write_text(textwrap.dedent(TINY_HYPER_PARAMS))
    return folder, data


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=worker_env(), capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.slow
def test_seed_folder_runs_on_one_device_as_the_readme_shows(seed_folder, tmp_path):
    folder, data = seed_folder
    # python {configuration_directory}/run_autoencoder.py --CUDA_devices 0 --local_rank 0 --nifti_flair_dir D
    result = _run([sys.executable, f"{folder.name}/run_autoencoder.py",
                   "--CUDA_devices", "0", "--local_rank", "0", "--nifti_flair_dir", str(data)], cwd=folder.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    out = folder / "output"  # default: next to the script, like the original's output/ folders
    checkpoint = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert checkpoint.meta["world_size"] == 1 and checkpoint.config.resolution == 16
    assert checkpoint.config.data_path == str(data) and checkpoint.config.max_niis_to_use == 10
    split = json.loads((out / "split.json").read_text())
    assert len(split["train"]) + len(split["validation"]) == 10  # max_niis_to_use
    assert list((out / "pipeline_test").iterdir())  # visualise_training_pipeline_before_starting
    assert result.stdout.count("no CUDA GPU found: running on the CPU with gloo") == 1
    assert "2 original hyper_params keys have no effect here and are ignored: use_DDP, verbose" in result.stdout


@pytest.mark.slow
def test_seed_folder_takes_the_later_flags(seed_folder, tmp_path):
    folder, data = seed_folder
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"total_epochs": 2, "subjects_to_plot": 0, "resolution": 16}))
    out = tmp_path / "out"
    result = _run([sys.executable, str(folder / "run_autoencoder.py"), "--json_config_file", str(config),
                   "--nifti_dir", str(data), "--output_dir", str(out), "--CUDA_devices", "0",
                   "--nifti_filename_pattern", "subject_00[0-7].nii.gz", "--threads_per_rank", "1"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert checkpoint.config.total_epochs == 2 and checkpoint.config.threads_per_rank == 1
    split = json.loads((out / "split.json").read_text())
    assert len(split["train"]) + len(split["validation"]) == 8  # subject_000 ... subject_007


@pytest.mark.slow
def test_seed_folder_runs_under_torch_distributed_run_with_the_seed_flags(seed_folder, tmp_path):
    folder, data = seed_folder
    out = tmp_path / "out"
    # python -m torch.distributed.run --nnodes=1 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=E \
    #   {configuration_directory}/run_autoencoder.py --CUDA_devices 0,1,... --nifti_flair_dir D
    result = _run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                   "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}",
                   f"{folder.name}/run_autoencoder.py", "--CUDA_devices", "0,1", "--nifti_flair_dir", str(data),
                   "--output_dir", str(out)], cwd=folder.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert checkpoint.meta["world_size"] == 2
    assert "rng.rank1.torch" in checkpoint.tensors  # rank 1's own RNG stream is saved for resuming
    assert result.stdout.count("effective batch 4 = batch_size 2 x grad_accumulation 1 x world size 2") == 1
    assert result.stdout.count("done: step") == 1
