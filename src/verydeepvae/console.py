"""What a person sees while a command works: one rule for progress bars, and how much to say.

A progress bar redraws itself with carriage returns.  On a terminal that is one tidy line; in a
file or a pipe (a cluster job's log, ``cmd > log 2>&1``) every redraw stays, and the log fills with
``\\r`` frames nobody can read.  So every bar of the program is made by :func:`bar`, which shows it
only where :func:`show_bar` says so: when not turned off, for more than one item, and only when
stderr (where tqdm draws) is a terminal or a Jupyter notebook (where tqdm draws a widget instead).
Training prints a plain line every ``log_every`` steps where no bar is shown (train/progress.py).

Verbosity, for the commands that take ``--quiet`` / ``--verbose``: :data:`QUIET` says nothing but
errors and the final result line, :data:`NORMAL` adds progress, notices and warnings,
:data:`VERBOSE` adds a line for every checkpoint and figure written.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, TextIO

QUIET, NORMAL, VERBOSE = 0, 1, 2


def is_terminal(stream: TextIO | None) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes, closed streams)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def in_notebook() -> bool:
    """Whether tqdm would draw a notebook widget (no carriage returns) rather than a text bar."""
    from tqdm import autonotebook, std

    return autonotebook.tqdm is not std.tqdm


def show_bar(show: bool | None = None, n: int | None = None) -> bool:
    """The one rule for a progress bar.  ``show``: False turns bars off (``--no-progress``,
    ``--quiet``, a rank other than 0); None or True allow one.  ``n``: the number of items, when
    known (a bar for one item only flickers)."""
    if show is False or (n is not None and n < 2):
        return False
    return is_terminal(sys.stderr) or in_notebook()


def bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str | None = None,
        unit: str = "it", show: bool | None = None, **kwargs: Any):
    """A tqdm progress bar that follows :func:`show_bar` (a hidden one prints nothing at all)."""
    from tqdm.auto import tqdm

    n = total
    if n is None and iterable is not None and hasattr(iterable, "__len__"):
        n = len(iterable)  # type: ignore[arg-type]
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not show_bar(show, n), dynamic_ncols=True,
                **kwargs)
