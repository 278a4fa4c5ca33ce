"""A run whose finest latent layer is unused at ``finest_layer_restart_step`` starts again with the
allowance (train/finest_layer.py): the check, the restart end to end, and a resume of the second
attempt with the original command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from verydeepvae.checkpoint import list_checkpoints, load_checkpoint
from verydeepvae.config import build_config
from verydeepvae.errors import ConfigError
from verydeepvae.model import VeryDeepVAE
from verydeepvae.train import distributed, finest_layer
from verydeepvae.train import resume_changes
from verydeepvae.train.inspect_run import inspect_run
from verydeepvae.train.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RUNTIME = distributed.Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def _tiny(**overrides):
    return build_config("tiny", overrides=overrides)


def _run(tmp_path: Path, **overrides):
    """A few steps of the tiny preset on its phantoms, quietly, with nothing but checkpoints written."""
    settings = dict(max_steps=6, phantom_num=8, log_every=1, validation_every=100, checkpoint_every=2,
                    figures_every=100, subjects_to_plot=0, quality_samples=0, output_dir=str(tmp_path / "run"))
    return _tiny(**{**settings, **overrides})


def test_the_check_averages_the_finest_layers_over_its_window_and_decides_at_its_step():
    cfg = _tiny(finest_layer_restart_step=60, finest_layer_restart_kl=0.001)
    levels = [4, 3, 2, 1, 0, 0]  # two layers at the finest level: their KL adds up
    check = finest_layer.FinestLayerCheck(cfg, levels, start_step=0, total_steps=100)
    nats = 0.0004 * torch.log(torch.tensor(2.0)).item()  # 0.0004 bits/voxel in each finest layer
    for step in range(1, 61):
        kl = torch.tensor([9.0, 9.0, 9.0, 9.0, nats, nats], dtype=torch.float64)
        if step <= 60 - finest_layer.WINDOW:
            kl[4:] = 5.0  # outside the window: not counted
        check.record(step, kl)
        if step < 60:
            assert check.unused_at(step, RUNTIME) is None  # decided at its step only
    assert check.count == finest_layer.WINDOW
    assert check.unused_at(60, RUNTIME) == pytest.approx(0.0008)  # both layers, in bits/voxel
    live = finest_layer.FinestLayerCheck(_tiny(finest_layer_restart_step=60, finest_layer_restart_kl=0.0007),
                                         levels, 0, 100)
    for step in range(1, 61):
        live.record(step, torch.tensor([0.0] * 4 + [nats, nats], dtype=torch.float64))
    assert live.unused_at(60, RUNTIME) is None  # 0.0008 bits/voxel is above this threshold


@pytest.mark.parametrize("overrides, start, total", [
    ({"finest_layer_restart_step": 0}, 0, 100),  # off
    ({"finest_layer_restart_step": 50}, 50, 100),  # a resumed run that has passed it
    ({"finest_layer_restart_step": 50}, 0, 50),  # the run ends there: nothing to gain
    ({"finest_layer_restart_step": 50, "kl_free_bits_per_latent": 0.001}, 0, 100),  # it has the allowance
])
def test_the_check_stays_out_of_the_way_where_it_cannot_help(overrides, start, total):
    check = finest_layer.FinestLayerCheck(_tiny(**overrides), [1, 0], start, total)
    assert check.step is None
    for step in range(start + 1, total + 1):
        check.record(step, torch.zeros(2, dtype=torch.float64))
        assert check.unused_at(step, RUNTIME) is None


def test_a_partial_allowance_does_not_count_as_having_it():
    at_32_only = _tiny(finest_layer_restart_step=50, kl_free_bits_per_latent=0.001,
                       kl_free_bits_per_latent_resolutions=[16])
    assert not finest_layer.has_allowance(at_32_only)
    again = finest_layer.restart_config(at_32_only)
    assert (again.kl_free_bits_per_latent, again.kl_free_bits_per_latent_resolutions,
            again.kl_free_bits_per_latent_steps) == (0.001, None, 0)
    assert finest_layer.restart_config(_tiny(kl_free_bits_per_latent=0.003)).kl_free_bits_per_latent == 0.003
    with pytest.raises(ConfigError, match="finest_layer_restart_kl"):
        _tiny(finest_layer_restart_kl=-1)


def test_a_run_whose_finest_layer_is_unused_starts_again_with_the_allowance(tmp_path, free_bits_seen):
    seen = free_bits_seen
    # a threshold no layer stays under: the first attempt always ends at step 3
    cfg = _run(tmp_path, kl_free_bits=1.0, finest_layer_restart_step=3, finest_layer_restart_kl=1e9)
    result = train(cfg, show_progress=False)
    run = tmp_path / "run"
    first = [p for p in tmp_path.iterdir() if p.name.startswith("run.first-attempt-")]
    assert len(first) == 1 and result.step == 6
    # the first attempt: 3 steps, its checkpoint of step 2, and its log says why it stopped
    assert [p.name for p in list_checkpoints(first[0] / "checkpoints")] == ["step_00000002.safetensors"]
    assert "stopped: the finest latent layer carried" in (first[0] / "train.log").read_text()
    assert not (first[0] / "cache").exists() and (run / "cache").is_dir()  # the data cache stays
    # the second attempt: steps 1-6 once each, with the allowance at every layer from its first step
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    model = VeryDeepVAE(cfg)
    assert seen[:3] == [[1.0] * model.num_layers] * 3
    assert seen[3:] == [pytest.approx(model.free_nats(1.0, finest_layer.ALLOWANCE))] * 6
    checkpoint = load_checkpoint(list_checkpoints(run / "checkpoints")[-1])
    assert checkpoint.meta["config"]["kl_free_bits_per_latent"] == finest_layer.ALLOWANCE
    record = checkpoint.meta[finest_layer.RECORD_KEY]
    assert record["step"] == 3 and record["steps_averaged"] == 3 and record["first_attempt"] == str(first[0])
    assert record["kl_bits_per_voxel"] > 0
    assert record["asked"] == {"kl_free_bits_per_latent": 0.0, "kl_free_bits_per_latent_resolutions": None,
                               "kl_free_bits_per_latent_steps": 0}
    sessions = json.loads((run / "run.json").read_text())["sessions"]
    assert len(sessions) == 1 and any("training started again from step 0" in n for n in sessions[0]["notices"])
    shown = "\n".join(inspect_run(run))
    assert "started again at step 3" in shown and "kl_free_bits_per_latent 0.001 since" in shown

    # resumed with the command as first given (no allowance asked): the run keeps its own
    seen.clear()
    resumed = train(_run(tmp_path, kl_free_bits=1.0, finest_layer_restart_step=3, finest_layer_restart_kl=1e9,
                         max_steps=8, resume=True), show_progress=False)
    assert resumed.step == 8 and seen == [pytest.approx(model.free_nats(1.0, finest_layer.ALLOWANCE))] * 2
    last = json.loads((run / "run.json").read_text())["sessions"][-1]
    assert any("--resume keeps the allowance this run took" in n for n in last["notices"])
    assert load_checkpoint(list_checkpoints(run / "checkpoints")[-1]).meta[finest_layer.RECORD_KEY] == record
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run.first-attempt-")]) == 1


def test_a_resumed_first_attempt_starts_again_from_step_0(tmp_path):
    """A run extended past the check step (--resume --max-steps) is checked there like any other."""
    settings = dict(kl_free_bits=1.0, finest_layer_restart_step=3, finest_layer_restart_kl=1e9)
    assert train(_run(tmp_path, max_steps=2, **settings), show_progress=False).step == 2  # ends before the check
    result = train(_run(tmp_path, max_steps=6, resume=True, **settings), show_progress=False)
    assert result.step == 6
    first = [p for p in tmp_path.iterdir() if p.name.startswith("run.first-attempt-")]
    assert len(first) == 1 and len(json.loads((first[0] / "run.json").read_text())["sessions"]) == 2
    session = json.loads((tmp_path / "run" / "run.json").read_text())["sessions"]
    assert len(session) == 1 and session[0]["start_step"] == 0 and session[0]["resumed_from"] is None
    assert not any("no checkpoint" in n for n in session[0]["notices"])
    assert session[0]["config"]["kl_free_bits_per_latent"] == finest_layer.ALLOWANCE


def test_a_live_finest_layer_trains_on_undisturbed(tmp_path):
    result = train(_run(tmp_path, finest_layer_restart_step=3, finest_layer_restart_kl=0.0), show_progress=False)
    assert result.step == 6 and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert finest_layer.RECORD_KEY not in load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[-1]).meta


def test_resume_keeps_the_runs_allowance_unless_the_command_asks_for_another():
    asked = {"kl_free_bits_per_latent": 0.0, "kl_free_bits_per_latent_resolutions": None,
             "kl_free_bits_per_latent_steps": 0}
    record = {"step": 500, "asked": asked}
    stored = {**_tiny(kl_free_bits_per_latent=0.001).to_dict()}
    notices: list[str] = []
    kept = resume_changes.apply(_tiny(), stored, notices, record)
    assert kept.kl_free_bits_per_latent == 0.001
    assert notices == ["--resume keeps the allowance this run took when it started again at step 500 (its finest "
                       "latent layer was unused): kl_free_bits_per_latent 0.001"]
    notices = []
    other = resume_changes.apply(_tiny(kl_free_bits_per_latent=0.003), stored, notices, record)
    assert other.kl_free_bits_per_latent == 0.003
    assert notices == ["--resume: kl_free_bits_per_latent 0.001 -> 0.003: the loss changes from the next step"]
    assert resume_changes.apply(_tiny(), stored, [], None).kl_free_bits_per_latent == 0.0  # no restart: as before
