"""One run per output folder: a lock while a run trains in it, and no fresh run on top of an old one.

Two ``train`` processes writing into one folder interleave ``metrics.jsonl`` and overwrite each
other's checkpoints; a fresh run started in a folder that holds an older run leaves its checkpoints
among the old ones, and ``--resume`` or ``sample --checkpoint FOLDER`` then silently takes the
newest of either.  Both are refused here, before anything in the folder is touched.

The lock is an ``fcntl`` lock on ``<output_dir>/.lock``, which records host, PID and start time for
the message a second process prints.  The operating system releases it when the process ends,
however it ends, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

from ..errors import UserError
from ..output_folder import move_aside
from ..checkpoint import checkpoint_dir, list_checkpoints
from .progress import LOG_NAME
from .run_record import RECORD_NAME

LOCK_NAME = ".lock"
KEPT_ON_OVERWRITE = (LOCK_NAME, "cache")  # the preprocessed-volume cache is keyed by its settings
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "figures", "samples", "split.json", RECORD_NAME, LOG_NAME)


class RunLock:
    """An exclusive lock on a run folder, held until :meth:`release` or the end of the process."""

    def __init__(self, fd: int, path: Path):
        self.fd: int | None = fd
        self.path = path

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


def lock(output_dir: Path) -> RunLock | None:
    """Take the folder's lock, or stop with one line naming the process that holds it.

    None where ``fcntl`` does not exist (Windows): no lock, as before."""
    try:
        import fcntl
    except ImportError:
        return None
    path = Path(output_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"{output_dir} is in use by a training run ({holder}); wait for it to finish or stop it, "
                        "or choose another --output") from None
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"PID {os.getpid()} on host {socket.gethostname()}, started {started}\n".encode(), 0)
    return RunLock(fd, path)


def probe(output_dir: Path) -> tuple[bool, str] | None:
    """Whether a process trains in the folder now, and what its lock file says (host, PID, start
    time), without disturbing it: the lock file is opened read-only (never created or truncated)
    and tried with a non-blocking shared lock, let go at once.  A running job holds its lock
    throughout and never notices; only a ``train`` starting in that same microsecond would find the
    folder in use.  None when there is no lock file (no run has trained here) or no ``fcntl``.

    As for the lock itself: on a network file system a process on another host may not be seen."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(Path(output_dir) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True, holder
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, holder
    finally:
        os.close(fd)


def claim(output_dir: Path, fresh: bool, overwrite: bool, notices: list[str]) -> RunLock | None:
    """Lock the folder and, for a ``fresh`` run, clear the way (:func:`prepare_fresh_run`); the
    lock is released again if the folder cannot be used."""
    held = lock(output_dir)
    try:
        if fresh:
            prepare_fresh_run(output_dir, overwrite, notices)
    except BaseException:
        if held is not None:
            held.release()
        raise
    return held


def prepare_fresh_run(output_dir: Path, overwrite: bool, notices: list[str]) -> Path | None:
    """Before a fresh (not resumed) run: refuse a folder that holds another run's checkpoints
    unless ``overwrite``; move an older run's outputs aside to a sibling folder when asked to, or
    when they are only logs of a run that never wrote a checkpoint.  Returns where they went."""
    output_dir = Path(output_dir)
    checkpoints = list_checkpoints(checkpoint_dir(output_dir))
    if checkpoints and not overwrite:
        raise UserError(
            f"{output_dir} holds another run (newest checkpoint {checkpoints[-1].name}); continue it with "
            "--resume, or start over with --overwrite (which moves the old run aside), or choose another "
            "--output")
    leftovers = [p for p in sorted(output_dir.iterdir()) if p.name in RUN_OUTPUTS] if output_dir.is_dir() else []
    if not leftovers:
        return None
    if overwrite:  # everything but the lock and the cache
        leftovers = [p for p in sorted(output_dir.iterdir()) if p.name not in KEPT_ON_OVERWRITE]
    target = move_aside(output_dir, leftovers)
    what = "the previous run" if checkpoints else "the outputs of a previous run that wrote no checkpoint"
    notices.append(f"moved {what} ({', '.join(p.name for p in leftovers)}) to {target}")
    return target


def set_aside_first_attempt(output_dir: Path) -> Path:
    """Move a run's outputs (all but the lock and the data cache) to a sibling folder
    ``<name>.first-attempt-<date-time>`` before the run starts again from step 0
    (train/finest_layer.py); returns where they went."""
    output_dir = Path(output_dir)
    return move_aside(output_dir, [p for p in sorted(output_dir.iterdir()) if p.name not in KEPT_ON_OVERWRITE],
                      label="first-attempt")


def claim_for_training(cfg, runtime, restarted: bool, notices: list[str]) -> RunLock | None:
    """Global rank 0 only: the folder is writable, no other run trains in it (its lock), and a fresh
    run does not land among an older run's files (``restarted``: torchrun brought the workers back)."""
    if not runtime.is_main:
        return None
    output_dir = Path(cfg.output_dir)
    check_writable(output_dir)
    return claim(output_dir, fresh=not (cfg.resume or restarted), overwrite=cfg.overwrite, notices=notices)


def check_writable(directory: Path) -> None:
    """Create ``directory`` if needed and write a probe file in it; one clear error when that fails."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"output directory {directory} is not writable: {error.strerror or error}") from None
