"""Logs a person and a cluster can read (issue 14): one rule for progress bars, plain lines where
there is no terminal, --quiet / --verbose, and train.log in the run folder."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    """No module makes its own tqdm bar (train/progress.py only writes lines above the bar)."""
    package = SRC / "verydeepvae"
    users = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                   if "tqdm" in p.read_text() and p.name not in ("console.py", "progress.py"))
    assert users == []
