"""Logs a person and a cluster can read (issue 14): one rule for progress bars, plain lines where
there is no terminal, --quiet / --verbose, and train.log in the run folder."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_train_args
from verydeepvae import console
from verydeepvae.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_is_shown_only_on_a_terminal_for_more_than_one_item(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a file or a pipe
    assert not console.show_bar(None, 10) and not console.show_bar(True, 10)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert console.show_bar(None, 10) and console.show_bar(True, 10)
    assert not console.show_bar(False, 10) and not console.show_bar(None, 1)


def test_hidden_bars_write_nothing_and_shown_ones_draw(monkeypatch):
    for stream, drawn in ((io.StringIO(), False), (_Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert list(console.bar(range(3), desc="work", show=True)) == [0, 1, 2]
        assert ("\r" in stream.getvalue()) == drawn and ("work" in stream.getvalue()) == drawn


def test_every_progress_bar_of_the_program_goes_through_the_one_rule():
    """No module but console.py makes a tqdm bar itself (tqdm.write and tqdm.format_interval are fine)."""
    import re

    package = SRC / "verydeepvae"
    makers = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                    if re.search(r"\btqdm\(", p.read_text()) and p.name != "console.py")
    assert makers == []


@pytest.fixture(scope="module")
def redirected(tmp_path_factory) -> tuple[Path, Path, str]:
    """A 4-step run whose stdout and stderr go to a file, as in a cluster job."""
    from conftest import write_ellipsoids

    root = tmp_path_factory.mktemp("logs")
    data, run, log = root / "data", root / "run", root / "job.log"
    write_ellipsoids(data, 8, size=16)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    with open(log, "wb") as handle:
        args = tiny_train_args(data, run, "--max-steps", "4", "--precision", "auto")
        code = subprocess.run([sys.executable, "-m", "verydeepvae", *args], stdout=handle, stderr=subprocess.STDOUT,
                              env=env, timeout=600).returncode
    assert code == 0, log.read_text()
    return data, run, log.read_bytes().decode()


@pytest.mark.slow
def test_a_redirected_train_log_has_plain_lines_and_no_carriage_returns(redirected):
    _, _, text = redirected
    assert "\r" not in text
    lines = text.splitlines()
    steps = [line for line in lines if " step " in line and "/4 (" in line]
    assert [s.split(" step ")[1].split(" ")[0] for s in steps] == ["2/4", "4/4"]  # one line every log_every steps
    assert all("bits=" in s and "s/step" in s and "left" in s for s in steps)
    assert any(line.startswith("validation at step 4: ") for line in lines)
    assert "notice: precision auto:" in text and lines[-1].startswith("done: step 4;")


@pytest.mark.slow
def test_train_log_in_the_run_folder_keeps_notices_validations_and_the_end_and_grows_on_resume(redirected, tmp_path,
                                                                                            capsys):
    import shutil

    data, first, _ = redirected
    run = tmp_path / "run"
    shutil.copytree(first, run)
    log = (run / "train.log").read_text()
    assert "\r" not in log
    assert "notice: precision auto:" in log and "validation at step 2: " in log and log.splitlines()[-1].endswith(
        "finished at step 4")
    assert all(line[:4].isdigit() and line[10] == " " for line in log.splitlines())  # every line has its time

    # --quiet: nothing but the final line on the console; the log still gets everything
    capsys.readouterr()
    assert main(tiny_train_args(data, run, "--max-steps", "6", "--resume", "--quiet")) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.splitlines() == [out.strip()] and out.startswith("done: step 6;")
    grown = (run / "train.log").read_text()
    assert grown.startswith(log) and "steps 4 -> 6" in grown and "notice: resumed from" in grown
    assert grown.splitlines()[-1].endswith("finished at step 6")


def test_warnings_and_a_stop_go_to_the_log_too(tmp_path, capsys):
    """Python's warnings and how a session ended reach train.log; --quiet keeps warnings off the console."""
    import warnings

    from verydeepvae.train.progress import TrainConsole

    quiet = TrainConsole(tmp_path, enabled=True, verbosity=console.QUIET)
    quiet.open(total=10, initial=0)
    with quiet.python_warnings():
        warnings.warn("something odd", UserWarning)
    quiet.warning("the sample-quality signal failed")
    quiet.report(5, {"bits": "1.0"}, 1.0)
    quiet.close("stopped: training stopped by signal at step 5")
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    log = (tmp_path / "train.log").read_text().splitlines()
    assert "warning: UserWarning: something odd" in log[0] and log[1].endswith(
        "warning: the sample-quality signal failed") and log[2].endswith("stopped: training stopped by signal at step 5")

    loud = TrainConsole(tmp_path, enabled=True, verbosity=console.VERBOSE, show_progress=False)
    loud.open(total=10, initial=0)
    loud.report(5, {"bits": "1.0"}, 2.0)
    loud.say("checkpoint step_00000005.safetensors written", console.VERBOSE)
    loud.close()
    out = capsys.readouterr().out.splitlines()
    assert "step 5/10 (50%) bits=1.0 0.50 s/step, 00:02 left" in out[0] and out[1].startswith("checkpoint step_")
