"""Atomic file writes: a temporary file in the same folder, flushed, fsynced, then renamed.

A crash at any moment leaves either the old file or the new one, never half of one.  The file gets
the mode a plain ``open()`` would give it (0666 minus the umask: 0644 under the usual 022), not the
private 0600 of the temporary file, so colleagues in the lab group can read the results.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` if the block succeeds.

    ``suffix`` keeps a meaningful extension on the temporary name (nibabel picks the format
    from it, e.g. ``.nii.gz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def current_umask() -> int:
    """The process's umask, read from /proc (Linux) so that no other thread ever sees it changed;
    elsewhere by setting and restoring it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Let ``writer`` produce the file at a temporary path, then move it into place."""
    with atomic_path(path) as tmp:
        writer(tmp)


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str],
                      after: Callable[[Path], None] | None = None) -> None:
    """A .safetensors file, atomically; ``after(tmp)`` runs on the complete temporary file (e.g. to
    hash it).  safetensors reports a failed write (a full disk) as its own SafetensorError; it is
    raised as the OSError it is, so every caller's one-line handling of write errors applies."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    def writer(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as error:
            raise OSError(f"could not write {path}: {str(error).splitlines()[0] if str(error) else 'write failed'}") from None
        if after is not None:
            after(tmp)

    write_with(path, writer)
