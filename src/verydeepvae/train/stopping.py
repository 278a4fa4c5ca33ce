"""Stopping a run cleanly: SIGTERM / SIGINT (Ctrl-C, a cluster's time limit, torchrun) are noted,
the loop finishes its step, saves a checkpoint and ends; a second signal stops at once."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class StopRequest:
    """The stop signal received, if any (``signum``: None until one arrives)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        """SIGTERM and SIGINT set :attr:`signum` while the block runs (main thread only; elsewhere
        Python cannot install handlers and the block runs as it is)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, _frame):
            if self.signum is not None:  # second signal: stop now
                raise KeyboardInterrupt
            self.signum = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
