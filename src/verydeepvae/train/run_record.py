"""The run record, ``<run>/run.json``: what ran, where and with what, written when training starts.

A checkpoint says what the model is; it does not say which command made it, with which versions of
the software, on which machines, or what the program chose by itself (``precision: auto``, a
random seed, the device).  Each training session -- the first start, every ``--resume``, every
restart by torchrun -- appends one entry to ``sessions``; an entry is never changed or removed, so
a run resumed on another cluster keeps the record of both.

The record is also a configuration file: ``--config`` takes it (or the run folder, or one of its
checkpoints) and reads the newest session's ``config``, the configuration as it ran (resolved:
``precision`` as chosen, the seed that was used), with ``resume`` and ``overwrite`` off, so
``verydeepvae train --config runs/a/run.json --output-dir runs/b`` repeats run a in folder b.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence, TypedDict

import torch

from ..atomic import write_text
from ..config import Config, read_config_file
from ..errors import ConfigError
from ..json_types import JSONObject
from .. import checkpoint as ckpt

RECORD_NAME = "run.json"
FORMAT = "verydeepvae-run-record-1"
# settings a run may choose by itself ("auto" / null)
AUTOMATIC = ("precision", "channels_last", "checkpoint_levels", "device", "seed")
PATH_KEYS = ("data_path", "cache_dir", "output_dir")  # recorded absolute: the record works from any folder
GIT_SECONDS = 10


class Software(TypedDict):
    verydeepvae: str
    torch: str
    cuda: str | None
    cudnn: int | None
    numpy: str
    python: str
    platform: str


class SourceCommit(TypedDict):
    commit: str
    modified: bool  # the package's tracked files differ from the commit


class AutomaticChoice(TypedDict):
    configured: Any  # "auto" or null
    chosen: Any


class _SessionData(TypedDict):
    train: int
    validation: int
    voxel_size_mm: float


class SessionData(_SessionData, total=False):
    """The data a session trained on: file counts, the median voxel size, a conditional run's schema."""

    covariates: JSONObject  # CovariateSchema.to_json() without the training rows


class Session(TypedDict):
    """One training session's entry in ``run.json`` (module notes), in the order written."""

    started: str
    command: str
    working_directory: str
    start_step: int
    total_steps: int
    steps_per_epoch: int
    resumed_from: str | None
    restarted_by_torchrun: bool
    host: str
    pid: int
    world_size: int
    devices: list[str]
    software: Software
    git: SourceCommit | None
    data: SessionData
    automatic_choices: dict[str, AutomaticChoice]
    notices: list[str]
    config: JSONObject  # Config.to_dict(), as it ran


class RunRecord(TypedDict):
    format: str
    sessions: list[Session]


def session(resolved: Config, requested: Config, *, start_step: int, total_steps: int, steps_per_epoch: int,
            resumed_from: Path | None, restarted: bool, devices: Sequence[str], world_size: int,
            data: SessionData, notices: Sequence[str], command: Sequence[str] | None = None) -> Session:
    """One session's entry.  ``resolved``: the configuration as it runs (its paths are recorded
    absolute); ``requested``: as it was asked for (the difference is the automatic choices);
    ``devices``: one description per rank."""
    paths = {key: os.path.abspath(os.path.expanduser(getattr(resolved, key))) for key in PATH_KEYS
             if getattr(resolved, key) is not None}
    config = dataclasses.replace(resolved, resume=False, overwrite=False, **paths)
    choices = {key: {"configured": getattr(requested, key), "chosen": getattr(config, key)} for key in AUTOMATIC
               if getattr(requested, key) in ("auto", None) and getattr(requested, key) != getattr(config, key)}
    return {
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["verydeepvae", *command] if command is not None else sys.argv),
        "working_directory": os.getcwd(),
        "start_step": start_step,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "resumed_from": str(resumed_from) if resumed_from is not None else None,
        "restarted_by_torchrun": restarted,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "world_size": world_size,
        "devices": list(devices),
        "software": software(),
        "git": source_commit(),
        "data": data,
        "automatic_choices": choices,
        "notices": list(notices),
        "config": config.to_dict(),
    }


def append(output_dir: Path, entry: Session, notices: list[str]) -> Path:
    """Add ``entry`` to the folder's record (created if missing), atomically.  A record that cannot
    be read is kept beside it under another name, never overwritten."""
    path = Path(output_dir) / RECORD_NAME
    sessions: list[Session] = []
    if path.exists():
        try:
            sessions = read(path)["sessions"]
        except ConfigError as error:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            kept = path.with_name(f"{RECORD_NAME}.unreadable-{stamp}")
            os.replace(path, kept)
            notices.append(f"{error}; it was kept as {kept.name} and a new record begins")
    record: RunRecord = {"format": FORMAT, "sessions": [*sessions, entry]}
    write_text(path, json.dumps(record, indent=2) + "\n")  # in the order written: the configuration last
    return path


def read(path: str | os.PathLike) -> RunRecord:
    """A run record, checked enough that every reader can rely on ``sessions[i]["config"]``."""
    return _checked(_load(Path(path)), path)


def _checked(record: Any, path: str | os.PathLike) -> RunRecord:
    sessions = record.get("sessions") if isinstance(record, dict) else None
    if not _is_record(record) or not isinstance(sessions, list) or not sessions or not all(
            isinstance(s, dict) and isinstance(s.get("config"), dict) for s in sessions):
        raise ConfigError(f"{path} is not a verydeepvae run record ({FORMAT} with sessions)")
    return record


MAX_RECORD_BYTES = 64 << 20  # a session adds a few KiB; a configuration file may have 1 MiB


def _load(path: Path) -> JSONObject:
    return read_config_file(path, max_bytes=MAX_RECORD_BYTES)  # JSON, one-line errors


def _is_record(data: Any) -> bool:
    return isinstance(data, dict) and data.get("format") == FORMAT


def stored_config(path: str | os.PathLike) -> JSONObject | None:
    """The configuration a run folder, a run record or a checkpoint holds, for ``--config``: the
    newest session's (the record's, else the newest checkpoint's), with ``resume`` and
    ``overwrite`` off.  None for any other file (an ordinary configuration file)."""
    path = Path(path)
    if path.is_dir():
        if (path / RECORD_NAME).is_file():
            values = read(path / RECORD_NAME)["sessions"][-1]["config"]
        else:
            found = ckpt.list_checkpoints(ckpt.checkpoint_dir(path)) or ckpt.list_checkpoints(path)
            if not found:
                raise ConfigError(f"--config {path} is a folder without a run record ({RECORD_NAME}) or checkpoints")
            values = _checkpoint_config(found[-1])
    elif path.suffix == ckpt.SUFFIX:
        values = _checkpoint_config(path)
    elif path.suffix == ".json" and path.is_file():
        try:
            data = _load(path)
        except ConfigError:
            return None  # read as an ordinary configuration file, which says what is wrong with it
        if not _is_record(data):
            return None
        values = _checked(data, path)["sessions"][-1]["config"]
    else:
        return None
    return {**values, "resume": False, "overwrite": False}


def _checkpoint_config(path: Path) -> JSONObject:
    """With the seed the run used (a configured null is the random seed drawn, kept beside it)."""
    meta = ckpt.read_metadata(path)
    values = ckpt.config_values(meta, path)
    if isinstance(meta.get("seed"), int) and not isinstance(meta.get("seed"), bool):
        values["seed"] = meta["seed"]
    return values


def describe(entry: Session) -> list[str]:
    """A session's software, code and devices in a few lines (``train --verbose``, ``inspect``)."""
    sw = entry.get("software") or {}
    cuda = f" (CUDA {sw['cuda']})" if sw.get("cuda") else ""
    git = entry.get("git")
    code = (f"git commit {git.get('commit', '?')[:12]}{' with modified files' if git.get('modified') else ''}"
            if isinstance(git, dict) else "not from a git checkout")
    lines = [f"  software: verydeepvae {sw.get('verydeepvae', '?')}, torch {sw.get('torch', '?')}{cuda}, "
             f"Python {sw.get('python', '?')}; {code}",
             f"  devices (world size {entry.get('world_size', '?')}): {', '.join(entry.get('devices') or []) or '?'}"]
    choices = entry.get("automatic_choices") or {}
    if choices:
        lines.append("  chosen automatically: " + ", ".join(
            f"{key} {c.get('configured')} -> {c.get('chosen')}" for key, c in choices.items() if isinstance(c, dict)))
    return lines


# --- what the session ran on ------------------------------------------------------------------------


def software() -> Software:
    import numpy

    from .. import __version__

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"verydeepvae": __version__, "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
            "numpy": numpy.__version__, "python": platform.python_version(), "platform": platform.platform()}


def describe_device(device: torch.device) -> str:
    """This process's device, e.g. ``node7 cuda:0 (NVIDIA A100-SXM4-40GB)`` or ``node7 cpu (AMD EPYC
    7B13, 2 threads)``."""
    host = socket.gethostname()
    if device.type == "cuda":
        return f"{host} {device} ({torch.cuda.get_device_name(device)})"
    return f"{host} cpu ({_cpu_model()}, {torch.get_num_threads()} threads)"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def source_commit() -> SourceCommit | None:
    """The git commit of the code that runs, when it runs from a checkout of this project: None
    when the package is not a file tracked by git (an installed copy, even one installed into a
    virtual environment inside a checkout, whose files git does not track).  ``modified``: the
    package's tracked files differ from that commit."""
    package = Path(__file__).resolve().parents[1]
    try:
        def git(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True,
                                  timeout=GIT_SECONDS, check=False)

        if git("ls-files", "--error-unmatch", "--", "__init__.py").returncode != 0:
            return None
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):  # no git, or it hangs
        return None
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "modified": bool(status.stdout.strip())}


def covariate_record(bundle: Any) -> JSONObject:
    """A conditional run's covariate schema for the run record (its training rows stay in the checkpoint)."""
    schema = getattr(bundle, "covariates", None)
    if schema is None:
        return {}
    return {"covariates": {k: v for k, v in schema.to_json().items() if k != "bank"}}
