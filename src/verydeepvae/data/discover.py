"""Finding the input volumes and splitting them into training and validation sets.

* A folder is searched recursively (flat folders and nested layouts such as BIDS both work) for
  ``.nii`` and ``.nii.gz`` files; hidden files and folders (names starting with ``.``) are skipped
  and symlinked folders are followed, each real folder once (a symlink loop such as ``sub/loop -> ..``
  is not walked twice) and each real file once.  Folders that hold outputs of ours (a run folder,
  samples, reconstructions, interpolations, evaluation reports) are skipped with a notice, so a run
  whose output folder lies inside its data never trains on generated volumes.
  ``nifti_filename_pattern`` (a glob such as ``*_T1w.nii.gz``)
  filters by file name, or by path relative to the folder when it contains a ``/``.  The result
  is sorted, so it is the same on every machine.
* A text file lists one path per line (blank lines and ``#`` comments ignored); a ``.csv``/``.tsv``
  file takes the column named ``path``, ``file``, ``filename`` or ``nifti`` if there is a header,
  else the first column.  Relative paths are relative to the list file.  The listed order is kept
  (duplicates dropped), so ``max_niis_to_use`` takes the first N entries of the list.
* The split is a seeded permutation; it is saved as ``split.json`` in the output folder and reused
  whenever that file exists (so a resumed run trains and validates on exactly the same files).
  Files with identical content (copies of one scan) always land on the same side of it.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import write_json
from ..errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LIST_COLUMNS = ("path", "file", "filename", "nifti", "image")
SPLIT_FILE = "split.json"


def is_nifti_name(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


# a folder holding one of these (or checkpoints/ beside metrics.jsonl: a run) holds our outputs
OUTPUT_MARKERS = ("samples.json", "reconstructions.json", "interpolation.json", "report.json")


def discover_files(data_path: str | os.PathLike, pattern: str | None = None,
                   exclude: Sequence[str | os.PathLike] = (), notices: list[str] | None = None) -> list[Path]:
    """All NIfTI files of a folder or a list file, as absolute paths (see the module notes).
    Folders in ``exclude`` (e.g. the run's own output folder) and folders of our outputs are skipped."""
    root = Path(data_path).expanduser()
    if not root.exists():
        raise DataError(f"data_path {root} does not exist (expected a folder of NIfTI files or a file listing them)")
    if root.is_dir():
        skipped: list[Path] = []
        files = _scan_folder(root.resolve(), pattern, {os.path.realpath(p) for p in exclude}, skipped)
        if skipped and notices is not None:
            shown = ", ".join(str(p) for p in skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
            notices.append(f"not searched for training data: {shown} (output folders of verydeepvae)")
        what = f"matching {pattern!r} " if pattern else ""
        if not files:
            raise DataError(
                f"data_path {root} contains no NIfTI files {what}(looked for *.nii and *.nii.gz in it "
                "and its subfolders)"
            )
        return files
    if not root.is_file():  # a FIFO or device: reading it could block forever
        raise DataError(f"data_path {root} is neither a folder nor a regular file")
    if is_nifti_name(root.name):
        raise DataError(
            f"data_path {root} is a single NIfTI file; give the folder that holds the volumes "
            "(or a text file listing them)"
        )
    return _read_list_file(root.resolve(), pattern)


def _scan_folder(root: Path, pattern: str | None, exclude: set[str], skipped: list[Path]) -> list[Path]:
    found, seen_dirs, seen_files = [], set(), set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = os.stat(dirpath)
        if (here.st_dev, here.st_ino) in seen_dirs:  # reached again through a symlink (a loop)
            dirnames[:] = []
            continue
        seen_dirs.add((here.st_dev, here.st_ino))
        if dirpath != str(root) and (os.path.realpath(dirpath) in exclude or _holds_our_outputs(dirpath, filenames,
                                                                                              dirnames)):
            skipped.append(Path(dirpath))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not is_nifti_name(name):
                continue
            path = Path(dirpath) / name
            if pattern and not _matches(path, root, pattern):
                continue
            if path.is_file():
                real = os.path.realpath(path)
                if real not in seen_files:
                    seen_files.add(real)
                    found.append(path)
    return sorted(found, key=lambda p: str(p.relative_to(root)))


def _holds_our_outputs(dirpath: str, filenames: list[str], dirnames: list[str]) -> bool:
    names = set(filenames)
    return bool(names.intersection(OUTPUT_MARKERS)) or ("metrics.jsonl" in names and "checkpoints" in dirnames)


def _matches(path: Path, root: Path, pattern: str) -> bool:
    if "/" in pattern:
        relative = path.relative_to(root).as_posix()
        return fnmatch.fnmatchcase(relative, pattern) or fnmatch.fnmatchcase(relative, pattern.lstrip("/"))
    return fnmatch.fnmatchcase(path.name, pattern)


def _read_list_file(list_file: Path, pattern: str | None) -> list[Path]:
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"data_path {list_file} is neither a folder nor a readable text file listing NIfTI paths ({error})") from None
    entries = _list_entries(list_file, text)
    if not entries:
        raise DataError(f"file list {list_file} lists no paths")
    files: list[Path] = []
    seen = set()
    for line_no, entry in entries:
        path = Path(entry).expanduser()
        if not path.is_absolute():
            path = list_file.parent / path
        path = Path(os.path.normpath(path))
        if not path.is_file():
            problem = "is not a file" if path.exists() else "does not exist"
            raise DataError(f"file list {list_file}, line {line_no}: {path} {problem}")
        if pattern and not fnmatch.fnmatchcase(path.name, pattern):
            continue
        if path not in seen:
            seen.add(path)
            files.append(path)
    if not files:
        raise DataError(f"file list {list_file} lists no files matching {pattern!r}")
    return files


def _list_entries(list_file: Path, text: str) -> list[tuple[int, str]]:
    suffix = list_file.suffix.lower()
    if suffix not in (".csv", ".tsv"):
        return [
            (i, line.strip())
            for i, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    rows = list(csv.reader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
    numbered = [(i, row) for i, row in enumerate(rows, start=1) if row and any(c.strip() for c in row)]
    if not numbered:
        return []
    column = 0
    first = [c.strip() for c in numbered[0][1]]
    header = [c.lower() for c in first]
    looks_like_header = not any(is_nifti_name(c) for c in first)
    if looks_like_header:
        for name in LIST_COLUMNS:
            if name in header:
                column = header.index(name)
                break
        numbered = numbered[1:]
    out = []
    for i, row in numbered:
        if column >= len(row) or not row[column].strip():
            raise DataError(f"file list {list_file}, line {i}: no path in column {column + 1}")
        out.append((i, row[column].strip()))
    return out


# --- the split -----------------------------------------------------------------------------------


def split_files(files: Sequence[Path | str], train_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split; at least one validation file when there are two or more files.

    With a single file, it is used for both training and validation (the caller says so).
    """
    names = [str(f) for f in files]
    n = len(names)
    if n == 0:
        return [], []
    if n == 1:
        return names[:], names[:]
    n_val = expected_validation_count(n, train_fraction)
    order = np.random.default_rng(seed).permutation(n)
    val_idx = set(order[:n_val].tolist())
    train = [names[i] for i in range(n) if i not in val_idx]
    val = [names[i] for i in range(n) if i in val_idx]
    return train, val


def split_keeping_copies_together(files: Sequence[Path | str], train_fraction: float, seed: int,
                                  notices: list[str] | None = None) -> tuple[list[str], list[str]]:
    """:func:`split_files` of the distinct contents, each copy of a file (identical bytes) put on
    its first copy's side, so no scan is validated that was also trained on.  Without copies this
    is exactly :func:`split_files`."""
    names = [str(f) for f in files]
    original = duplicates(names)
    if original and notices is not None:
        example = next(iter(original.items()))
        notices.append(f"{len(original)} input file(s) have the same content as another (e.g. {example[0]} = "
                       f"{example[1]}); each copy is kept on its original's side of the split")
    train, val = split_files([n for n in names if n not in original], train_fraction, seed)
    side = {n: "train" for n in train}
    side.update({n: "val" for n in val if n not in side})
    for copy, first in original.items():
        (train if side[first] == "train" else val).append(copy)
    order = {n: i for i, n in enumerate(names)}
    return sorted(train, key=order.get), sorted(val, key=order.get)


def duplicates(files: Sequence[str]) -> dict[str, str]:
    """``{copy: its first copy}`` for files with identical bytes.  Files are compared by size, then
    by a hash of their first and last MiB, and only then by a hash of their whole content."""
    import hashlib

    def digest(path: str, whole: bool) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as handle:
            if whole:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    h.update(block)
            else:
                h.update(handle.read(1 << 20))
                handle.seek(max(0, os.path.getsize(path) - (1 << 20)))
                h.update(handle.read(1 << 20))
        return h.hexdigest()

    groups: dict[tuple, list[str]] = {}
    for f in files:
        groups.setdefault((os.path.getsize(f),), []).append(f)
    for whole in (False, True):
        refined: dict[tuple, list[str]] = {}
        for key, members in groups.items():
            if len(members) < 2:
                continue
            for f in members:
                refined.setdefault(key + (digest(f, whole),), []).append(f)
        groups = refined
    return {copy: members[0] for members in groups.values() if len(members) > 1 for copy in members[1:]}


def save_split(path: Path, train: list[str], val: list[str], info: dict) -> None:
    write_json(path, {"train": train, "validation": val, **info})


def load_split(path: Path) -> tuple[list[str], list[str], dict]:
    """Read a saved split; every file it names must still exist."""
    try:
        data = json.loads(path.read_text())
        train, val = list(data["train"]), list(data["validation"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(
            f"{path} is not a readable split file ({type(error).__name__}: {error}); "
            "delete it to make a new split"
        ) from None
    missing = [f for f in dict.fromkeys(train + val) if not Path(f).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(
            f"{path} names {len(missing)} file(s) that no longer exist: {shown}. Restore them, or delete "
            f"{path.name} (or use a new output_dir) to split the current data afresh"
        )
    info = {k: v for k, v in data.items() if k not in ("train", "validation")}
    return train, val, info


def cap_files(files: list[Path], max_files: int | None) -> list[Path]:
    """``max_niis_to_use``: the first N files (sorted folder order, or list order), before the split."""
    if max_files is None or max_files >= len(files):
        return list(files)
    return list(files[:max_files])


def expected_validation_count(n: int, train_fraction: float) -> int:
    """How many validation files a split of n files has (for messages and tests)."""
    if n < 2:
        return n
    return min(n - 1, max(1, int(round(n * (1.0 - train_fraction)))))


__all__ = [
    "NIFTI_SUFFIXES",
    "SPLIT_FILE",
    "cap_files",
    "discover_files",
    "expected_validation_count",
    "is_nifti_name",
    "load_split",
    "save_split",
    "split_files",
]
