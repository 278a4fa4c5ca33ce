"""``--resume`` with a changed configuration: every key has a rule, and each kind of rule holds
end to end (issue 13, point 4)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from verydeepvae.cli import main
from verydeepvae.config import Config, build_config
from verydeepvae.errors import UserError
from verydeepvae.train import resume_changes as rules
from verydeepvae.checkpoint import list_checkpoints, load_checkpoint


def test_every_configuration_key_has_exactly_one_rule():
    groups = [set(rules.ARCHITECTURE), set(rules.REFUSED), set(rules.KEPT_FROM_RUN), set(rules.NOTICED),
              set(rules.SILENT)]
    fields = {f.name for f in dataclasses.fields(Config)}
    assert set().union(*groups) == fields
    assert sum(len(g) for g in groups) == len(fields)  # no key in two groups


STORED = build_config(preset="tiny").to_dict()


@pytest.mark.parametrize("key, value", [("clamp_percentiles", [1.0, 99.0]), ("crop_to_foreground", False),
                                        ("intensity_anchor_percentile", 90.0), ("optimiser", "adamw")])
def test_refused_changes(key, value):
    with pytest.raises(UserError, match=f"--resume cannot change {key}"):
        rules.apply(build_config(preset="tiny", overrides={key: value}), STORED, [])


def test_a_new_optimiser_is_accepted_when_its_state_is_not_restored():
    cfg = build_config(preset="tiny", overrides={"optimiser": "adamw", "restore_optimiser": False})
    assert rules.apply(cfg, STORED, []).optimiser == "adamw"


@pytest.mark.parametrize("key, value", [("seed", 5), ("train_fraction", 0.5), ("max_niis_to_use", 3),
                                        ("nifti_filename_pattern", "*T1*"), ("phantom_num", 7)])
def test_the_runs_own_data_selection_and_seed_are_kept(key, value):
    notices: list[str] = []
    cfg = rules.apply(build_config(preset="tiny", overrides={key: value}), STORED, notices)
    assert getattr(cfg, key) == STORED[key] and f"keeps the run's {key}" in notices[0]


@pytest.mark.parametrize("key", sorted(k for k, why in rules.NOTICED.items() if why))
def test_honoured_changes_say_what_they_mean(key):
    hints = {f.name: f.type for f in dataclasses.fields(Config)}
    value = {"bool": not STORED[key] if isinstance(STORED[key], bool) else None}["bool"]
    if value is None:
        value = {"max_steps": 7, "total_epochs": 3, "precision": "bf16", "lr_schedule": "constant",
                 "skip_threshold": 50.0, "kl_warmup_resolutions": [16],
                 "kl_free_bits_per_latent_resolutions": [16]}.get(key)
    if value is None:
        value = STORED[key] + 1 if isinstance(STORED[key], int) else (STORED[key] * 0.5 or 0.25)
    notices: list[str] = []
    cfg = rules.apply(build_config(preset="tiny", overrides={key: value}), STORED, notices)
    assert getattr(cfg, key) == value, hints[key]
    assert notices == [f"--resume: {key} {STORED[key]!r} -> {value!r}: {rules.NOTICED[key]}"]


@pytest.mark.parametrize("key, value", [("checkpoint_every", 7), ("num_workers", 0), ("channels_last", True),
                                        ("log_every", 3), ("quality_samples", 0)])
def test_silent_changes(key, value):
    notices: list[str] = []
    assert getattr(rules.apply(build_config(preset="tiny", overrides={key: value}), STORED, notices), key) == value
    assert notices == []


# -- end to end ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from conftest import write_ellipsoids

    root = tmp_path_factory.mktemp("resume_changes")
    write_ellipsoids(root / "data", 8, size=16)
    out = root / "run"
    assert main(["train", "--preset", "tiny", "--data", str(root / "data"), "--output-dir", str(out), "--no-progress",
                 "--max-steps", "2", "--set", "checkpoint_every=2", "--set", "subjects_to_plot=0",
                 "--set", "num_workers=0", "--set", "seed=null"]) == 0
    return out


def _resume(run: Path, tmp_path: Path, *extra: str) -> tuple[int, Path]:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    code = main(["train", "--preset", "tiny", "--data", str(run.parent / "data"), "--output-dir", str(copy),
                 "--resume", "--no-progress", "--set", "subjects_to_plot=0", "--set", "num_workers=0", *extra])
    return code, copy


def test_a_refused_change_leaves_the_run_untouched(run, tmp_path, capsys):
    code, copy = _resume(run, tmp_path, "--max-steps", "3", "--set", "clamp_percentiles=[1,99]")
    assert code == 2 and "--resume cannot change clamp_percentiles" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(copy / "checkpoints")] == ["step_00000002.safetensors"]


def test_a_longer_run_with_a_new_batch_size_continues_with_notices(run, tmp_path, capsys):
    code, copy = _resume(run, tmp_path, "--max-steps", "3", "--set", "batch_size=2", "--set", "seed=123")
    out = capsys.readouterr().out
    assert code == 0
    assert "--resume: batch_size 4 -> 2" in out and "--resume: max_steps 2 -> 3" in out
    assert "keeps the run's seed None" in out
    newest = load_checkpoint(list_checkpoints(copy / "checkpoints")[-1])
    first = load_checkpoint(run / "checkpoints" / "step_00000002.safetensors")
    assert newest.step == 3 and newest.meta["seed"] == first.meta["seed"]  # the run's random seed, not 123
    assert newest.meta["config"]["batch_size"] == 2


def test_new_files_in_the_data_folder_are_not_used_on_resume(run, tmp_path, capsys):
    from conftest import write_ellipsoids

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    data = tmp_path / "data"
    shutil.copytree(run.parent / "data", data)
    write_ellipsoids(data / "new", 3, size=16, seed=9)
    split = json.loads((copy / "split.json").read_text())
    code = main(["train", "--preset", "tiny", "--data", str(data), "--output-dir", str(copy), "--resume",
                 "--no-progress", "--max-steps", "3", "--set", "subjects_to_plot=0", "--set", "num_workers=0"])
    assert code == 0
    assert json.loads((copy / "split.json").read_text())["train"] == split["train"]
