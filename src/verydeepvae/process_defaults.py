"""Process-wide settings the command line applies before torch loads, and only the command line:
importing the package never changes a user's own program (its environment, threads or signals).

OpenMP threads that spin while waiting make CPU training up to 10x slower as soon as another
process holds a core (measured on 2 cores: 12 s/step spinning against 1.6 s/step passive for the
demo preset), so the CLI asks for passive waiting.  It must be set before torch loads its OpenMP
runtime, and an explicit setting of the user's wins.
"""

from __future__ import annotations

import os


def apply_cli_defaults() -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless it is set (the CLI's and the benchmarks' default)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
