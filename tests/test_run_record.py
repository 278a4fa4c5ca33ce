"""Run records and inspection (issue 14): run.json, --config from a run, `verydeepvae inspect`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from conftest import tiny_train_args
from verydeepvae.cli import main
from verydeepvae.train import run_folder
from verydeepvae.checkpoint import list_checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, str]:
    from conftest import write_ellipsoids

    root = tmp_path_factory.mktemp("record")
    data, run = root / "data", root / "run"
    write_ellipsoids(data, 8, size=16)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(tiny_train_args(data, run, "--max-steps", "4", "--precision", "auto", "--device", "auto",
                                "--verbose")) == 0
    return data, run, printed.getvalue()


def _shown_config(capsys, source: Path) -> dict:
    capsys.readouterr()
    assert main(["config", "show", "--config", str(source), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_train_records_what_ran_where_and_with_what(trained):
    data, run, _ = trained
    record = json.loads((run / "run.json").read_text())
    assert record["format"] == "verydeepvae-run-record-1" and len(record["sessions"]) == 1
    s = record["sessions"][0]
    assert s["command"].startswith(f"verydeepvae train --preset tiny --data {data} ") and s["command"].endswith(
        "--verbose")
    assert s["working_directory"] == os.getcwd() and s["host"] == socket.gethostname() and s["world_size"] == 1
    assert s["start_step"] == 0 and s["total_steps"] == 4 and s["resumed_from"] is None
    assert s["devices"][0].startswith(f"{socket.gethostname()} cpu (")
    import torch

    assert s["software"]["torch"] == torch.__version__ and s["software"]["python"] and s["software"]["verydeepvae"]
    assert s["git"] is None or (len(s["git"]["commit"]) == 40 and isinstance(s["git"]["modified"], bool))
    # automatic choices are recorded as they were made, and the configuration holds the choice
    chosen = s["automatic_choices"]
    assert chosen["precision"]["configured"] == "auto" and chosen["precision"]["chosen"] in ("bf16", "fp32")
    assert chosen["device"] == {"configured": "auto", "chosen": "cpu"}
    assert s["config"]["precision"] == chosen["precision"]["chosen"] and s["config"]["device"] == "cpu"
    assert any(n.startswith("precision auto: ") for n in s["notices"])
    assert s["config"]["resume"] is False and s["config"]["data_path"] == str(data.resolve())


@pytest.mark.slow
def test_verbose_training_prints_checkpoints_and_the_software(trained):
    _, _, printed = trained
    assert "checkpoint step_00000004.safetensors written" in printed
    assert "  software: verydeepvae " in printed and "  chosen automatically: " in printed


@pytest.mark.slow
def test_the_record_a_run_folder_and_a_checkpoint_are_configurations_as_they_are(trained, capsys):
    _, run, _ = trained
    recorded = json.loads((run / "run.json").read_text())["sessions"][-1]["config"]
    checkpoint = list_checkpoints(run / "checkpoints")[-1]
    assert _shown_config(capsys, run / "run.json") == recorded
    assert _shown_config(capsys, run) == recorded
    # the checkpoint (which failed with a UTF-8 decode error) holds the configuration as asked for,
    # with relative paths and device auto, and the precision as chosen
    shown = _shown_config(capsys, checkpoint)
    differ = ("data_path", "output_dir", "device")
    assert {k: v for k, v in shown.items() if k not in differ} == {k: v for k, v in recorded.items() if k not in differ}
    capsys.readouterr()
    assert main(["config", "show", "--config", str(checkpoint)]) == 0  # with the model summary
    assert "parameters:" in capsys.readouterr().out


@pytest.mark.slow
def test_a_folder_without_a_record_takes_the_newest_checkpoints_configuration(trained, tmp_path, capsys):
    _, first, _ = trained
    run = tmp_path / "old"
    shutil.copytree(first, run)
    (run / "run.json").unlink()  # a run of an earlier version
    assert _shown_config(capsys, run)["resolution"] == 16
    assert main(["config", "show", "--config", str(tmp_path / "nothing_here"), "--json"]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["config", "show", "--config", str(tmp_path / "empty"), "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "without a run record (run.json) or checkpoints" in err[1]


@pytest.mark.slow
def test_resume_appends_a_session_and_keeps_the_first(trained, tmp_path):
    data, first, _ = trained
    run = tmp_path / "run"
    shutil.copytree(first, run)
    before = json.loads((run / "run.json").read_text())["sessions"]
    assert main(tiny_train_args(data, run, "--max-steps", "6", "--resume", "--quiet")) == 0
    sessions = json.loads((run / "run.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[0] == before[0]
    assert sessions[1]["start_step"] == 4 and sessions[1]["resumed_from"].endswith("step_00000004.safetensors")
    assert "--resume --quiet" in sessions[1]["command"]
    # a record nobody can read is kept aside, never overwritten
    (run / "run.json").write_text("{not json")
    assert main(tiny_train_args(data, run, "--max-steps", "7", "--resume", "--quiet")) == 0
    kept = list(run.glob("run.json.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_text() == "{not json"
    assert len(json.loads((run / "run.json").read_text())["sessions"]) == 1


@pytest.mark.slow
def test_inspect_shows_the_run_on_one_screen(trained, capsys):
    _, run, _ = trained
    capsys.readouterr()
    assert main(["inspect", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) <= 25 and all(len(line) < 400 for line in lines)
    text = "\n".join(lines)
    assert "status: not training (last: PID" in text
    assert "model: 16³" in text and "steps: 4 of 4 (100 %)" in text
    assert "newest checkpoint: checkpoints/step_00000004.safetensors" in text
    assert "best checkpoint: checkpoints/step_00000004.safetensors (validation at step 4: " in text
    assert "last validation (step 4): " in text and "sample quality (step 4): Fréchet ratio" in text
    assert "chosen automatically: " in text and "last line: finished at step 4" in text


@pytest.mark.slow
def test_inspect_sees_a_process_training_now_without_disturbing_it(trained, capsys):
    _, run, _ = trained
    held = run_folder.lock(run)  # as a training process holds it
    try:
        capsys.readouterr()
        assert main(["inspect", str(run)]) == 0
        assert f"status: training now (PID {os.getpid()} on host {socket.gethostname()}" in capsys.readouterr().out
        assert run_folder.probe(run)[0] is True  # still held: the probe took nothing away
    finally:
        held.release()
    assert run_folder.probe(run)[0] is False


def test_inspect_of_something_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a run folder" in err[0]
    assert run_folder.probe(tmp_path) is None and not (tmp_path / ".lock").exists()  # the probe creates nothing
