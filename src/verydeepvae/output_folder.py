"""Never mix the files of two invocations in one output folder.

A second ``sample`` into a folder that holds an earlier one's volumes left 6 volumes beside a
``samples.json`` that listed 2; ``reconstruct`` and ``evaluate`` leave stale files of the earlier run
among the new ones.  So a command that writes a folder of outputs takes it only when it is new or
empty; with ``--overwrite`` the earlier contents are first moved aside to a sibling folder
``<name>.replaced-<date-time>`` (nothing is deleted).  A command that writes one file (``encode``)
refuses to replace an existing file, or its metadata sidecar, without ``--overwrite``.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Iterable

from .errors import UserError


def claim_folder(folder: str | os.PathLike, command: str, overwrite: bool, notices: list[str] | None = None) -> Path:
    """``folder`` ready for ``command``'s outputs: created if missing; if it holds files, refused
    (one line, nothing touched) unless ``overwrite``, which moves them aside first."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output {folder} is a file, not a folder")
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    if entries and not overwrite:
        shown = ", ".join(p.name for p in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UserError(f"{folder} already holds files ({shown}); {command} writes into a new or empty folder: "
                        "choose another --output, or add --overwrite to move the old files aside")
    if entries:
        target = move_aside(folder, entries)
        message = f"moved the earlier contents of {folder} to {target}"
        if notices is None:
            print(f"verydeepvae: {message}")
        else:
            notices.append(message)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def claim_file(path: str | os.PathLike, companions: Iterable[str | os.PathLike] = (), overwrite: bool = False) -> Path:
    """Refuse to replace ``path`` or one of its ``companions`` (e.g. a metadata sidecar) unless
    ``overwrite``."""
    path = Path(path)
    existing = [Path(p) for p in (path, *companions) if Path(p).exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists; choose another name, or add --overwrite to replace it")
    return path


def move_aside(folder: Path, entries: Iterable[Path], label: str = "replaced") -> Path:
    """Move ``entries`` of ``folder`` into a new sibling folder ``<name>.<label>-<date-time>``."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = folder.with_name(f"{folder.name}.{label}-{stamp}")
    suffix = 1
    while target.exists():
        suffix += 1
        target = folder.with_name(f"{folder.name}.{label}-{stamp}-{suffix}")
    target.mkdir(parents=True)
    for entry in entries:
        os.replace(entry, target / entry.name)
    return target
