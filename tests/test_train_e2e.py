"""End to end through the CLI on small generated NIfTI volumes: train, resume, sample, errors."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from verydeepvae.cli import main
from verydeepvae.checkpoint import list_checkpoints, load_checkpoint


def _validation_curve(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["elbo_bits_per_voxel"] for r in records if r["kind"] == "validation"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    from conftest import write_ellipsoids

    root = tmp_path_factory.mktemp("e2e")
    data = root / "data"
    write_ellipsoids(data, 24)
    run = root / "run"
    code = main(["train", "--preset", "tiny", "--data", str(data), "--output-dir", str(run),
                 "--max-steps", "40", "--no-progress", "--set", "validation_every=10"])
    assert code == 0
    return run


@pytest.mark.slow
def test_tiny_training_lowers_held_out_loss(trained_run):
    curve = _validation_curve(trained_run)
    assert len(curve) == 4
    assert curve[-1] < curve[0] - 0.1, curve


@pytest.mark.slow
def test_training_writes_checkpoint_figures_and_samples(trained_run):
    checkpoints = list_checkpoints(trained_run / "checkpoints")
    assert checkpoints and checkpoints[-1].name == "step_00000040.safetensors"
    ckpt = load_checkpoint(checkpoints[-1])
    assert ckpt.step == 40 and ckpt.config.resolution == 16
    assert (trained_run / "figures" / "reconstructions_step_00000040.png").is_file()
    assert (trained_run / "figures" / "samples_step_00000020.png").is_file()
    assert list((trained_run / "tensorboard").glob("events.out.tfevents.*"))
    assert (trained_run / "samples" / "sample_0000.nii.gz").is_file()


@pytest.mark.slow
def test_resume_continues_the_step_count(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    # the data folder lives next to the original run
    data = trained_run.parent / "data"
    code = main(["train", "--preset", "tiny", "--data", str(data), "--output-dir", str(run),
                 "--max-steps", "50", "--resume", "--no-progress"])
    assert code == 0
    newest = list_checkpoints(run / "checkpoints")[-1]
    assert newest.name == "step_00000050.safetensors"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(steps) and steps[-1] == 50 and 45 in steps


@pytest.mark.slow
def test_sample_writes_volumes_with_the_grid_affine(trained_run, tmp_path):
    out = tmp_path / "samples"
    assert main(["sample", "--checkpoint", str(trained_run), "--num", "3", "--temperature", "0.8",
                 "--output-dir", str(out), "--seed", "5", "--no-progress"]) == 0
    files = sorted(out.glob("sample_*.nii.gz"))
    assert len(files) == 3 and (out / "samples.png").is_file()
    image = nib.load(str(files[0]))
    assert image.shape == (16, 16, 16)
    voxel = load_checkpoint(list_checkpoints(trained_run / "checkpoints")[-1]).meta["data"]["voxel_size_mm"]
    assert np.allclose(np.diag(image.affine)[:3], voxel)
    # the grid is centred on the origin
    centre = image.affine @ np.array([7.5, 7.5, 7.5, 1.0])
    assert np.allclose(centre[:3], 0.0, atol=1e-4)
    data = np.asarray(image.dataobj)
    assert 0.0 <= data.min() and data.max() <= 1.0
    # same seed, same volumes
    again = tmp_path / "again"
    assert main(["sample", "--checkpoint", str(trained_run), "--num", "3", "--temperature", "0.8",
                 "--output-dir", str(again), "--seed", "5", "--no-progress"]) == 0
    assert np.array_equal(np.asarray(nib.load(str(again / files[0].name)).dataobj), data)
    record = json.loads((out / "samples.json").read_text())
    assert record["seed"] == 5 and record["weights"] == "ema"


@pytest.mark.parametrize("argv,fragment", [
    (["train", "--preset", "tiny", "--set", "batch_size=-1"], "batch_size must be >= 1"),
    (["train", "--preset", "tiny", "--set", "resolution=24"], "resolution must be a power of two"),
    (["train", "--preset", "tiny", "--set", "channels=8,8"], "channels_per_latent must have 2 entries"),
    (["sample", "--checkpoint", "/nonexistent/run", "--output-dir", "/tmp/x"], "does not exist"),
    (["config", "show", "--config", "/nonexistent.json"], "does not exist"),
])
def test_bad_input_exits_2_with_one_line(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


def test_missing_data_folder_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--preset", "tiny", "--data", str(tmp_path / "missing"),
                 "--output-dir", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]


def test_pickle_checkpoint_is_refused(tmp_path, capsys):
    import torch

    bad = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(1)}, bad)
    assert main(["sample", "--checkpoint", str(bad), "--output-dir", str(tmp_path / "o")]) == 2
    assert "pickle" in capsys.readouterr().err


@pytest.mark.slow
def test_train_without_data_uses_the_phantom_population(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--output-dir", str(run), "--max-steps", "2", "--no-progress",
                 "--set", "subjects_to_plot=0"]) == 0
    split = json.loads((run / "split.json").read_text())
    files = [f for key, value in split.items() if isinstance(value, list) for f in value]
    assert files and all("phantom" in str(f) and str(f).endswith(".nii.gz") for f in files)
