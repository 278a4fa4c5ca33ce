"""One run per folder, no fresh run on top of an old one, outputs readable by the group (issue 13)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from verydeepvae.atomic import write_text
from verydeepvae.cli import main
from verydeepvae.train import run_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from conftest import write_ellipsoids

    folder = tmp_path_factory.mktemp("safety") / "data"
    write_ellipsoids(folder, 8, size=16)
    return folder


def _train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--preset", "tiny", "--data", str(data), "--output-dir", str(out), "--no-progress",
                 "--max-steps", "2", "--set", "checkpoint_every=2", "--set", "subjects_to_plot=0",
                 "--set", "num_workers=0", *extra])


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.name != ".lock"}


def test_a_second_run_in_a_folder_in_use_is_refused_and_the_first_is_undisturbed(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    held = run_folder.lock(out)  # a run training in the folder now
    try:
        before = _snapshot(out)
        assert _train(data, out) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"PID {os.getpid()} on host {socket.gethostname()}" in line and "in use by a training run" in line
        assert _snapshot(out) == before
        assert _train(data, out, "--resume") == 2  # --resume too
    finally:
        held.release()
    assert _train(data, out) == 0  # free again


def test_the_lock_of_a_killed_process_does_not_block_the_next_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from verydeepvae.train import run_folder; "
         f"run_folder.lock(__import__('pathlib').Path({str(out)!r})); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(Exception, match=f"PID {holder.pid}"):
            run_folder.lock(out)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    deadline = time.time() + 10
    while True:
        try:
            run_folder.lock(out).release()
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.1)


def test_a_fresh_run_into_a_folder_with_another_runs_checkpoints_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(data, out) == 0
    capsys.readouterr()
    before = _snapshot(out)
    assert _train(data, out) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds another run (newest checkpoint step_00000002.safetensors)" in line
    assert "--resume" in line and "--overwrite" in line
    assert _snapshot(out) == before  # nothing touched


def test_overwrite_moves_the_old_run_aside_and_keeps_the_cache(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(data, out) == 0
    old_checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step_*.safetensors"))
    capsys.readouterr()
    assert _train(data, out, "--overwrite", "--max-steps", "4", "--set", "checkpoint_every=4") == 0
    printed = capsys.readouterr().out
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and f"moved the previous run" in printed and str(aside[0]) in printed
    assert sorted(p.name for p in (aside[0] / "checkpoints").glob("step_*.safetensors")) == old_checkpoints
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*.safetensors")) == ["step_00000004.safetensors"]
    assert (out / "cache").is_dir() and not (aside[0] / "cache").exists()
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"step": 2,' in line]
    assert len(steps) <= 2  # the new run's own records only (one train, one validation at most)


def test_logs_of_a_run_that_wrote_no_checkpoint_are_moved_aside_with_a_notice(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 7, "kind": "train"}\n')
    assert _train(data, out) == 0
    printed = capsys.readouterr().out
    assert "outputs of a previous run that wrote no checkpoint" in printed
    assert '"step": 7' not in (out / "metrics.jsonl").read_text()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_outputs_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode


def test_checkpoints_and_figures_are_readable_by_the_group(data, tmp_path):
    previous = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert _train(data, out) == 0
    finally:
        os.umask(previous)
    for path in [*(out / "checkpoints").glob("step_*"), out / "split.json"]:
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_the_built_in_phantom_population_folder_is_readable_by_the_group(tmp_path):
    from verydeepvae.config import build_config
    from verydeepvae.data.datasets import phantom_folder

    previous = os.umask(0o022)
    try:
        folder = phantom_folder(build_config(preset="tiny", overrides={"phantom_num": 2}), tmp_path, False)
    finally:
        os.umask(previous)
    assert folder.stat().st_mode & 0o777 == 0o755
