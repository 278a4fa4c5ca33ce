"""Which volumes an evaluation uses: held-out real volumes, training volumes, phantom factors.

Rules (also stated in every report):

* The run's ``split.json`` (in the checkpoint's run folder) names the files the model was trained
  on.  Without ``--data`` its validation files are the held-out set.  With ``--data``, every file
  given that is *not* one of the split's training files is held out: evaluating on the training
  data itself holds out exactly its validation files, evaluating on other data holds out all of it.
  Without a ``split.json`` all given files are treated as held-out (nothing says otherwise).
* The training set for the memorisation check is the split's training files that still exist;
  without a split the check is skipped.
* Both sets are capped (``max_heldout``, ``max_train``) by a seeded random subset, kept in file order.
* ``participants.tsv`` next to the held-out files (the phantom population writes one) supplies the
  generating factors, matched by participant id = file name without extension.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..inference import TrainedModel
from ..scan_files import input_files

PHANTOM_COLUMNS = ("gm_volume_ml", "wm_volume_ml", "ventricle_volume_ml", "lesion_volume_ml", "brain_volume_ml")


@dataclass
class EvaluationData:
    heldout_files: list[str]
    train_files: list[str]
    heldout_rule: str
    train_rule: str
    data_source: str
    participants: dict[str, dict[str, str]] | None = None  # participant id -> row
    participants_file: str | None = None
    notes: list[str] = field(default_factory=list)
    num_heldout_available: int = 0
    num_train_available: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.data_source, "heldout_rule": self.heldout_rule, "train_rule": self.train_rule,
            "num_heldout": len(self.heldout_files), "num_heldout_available": self.num_heldout_available,
            "num_train": len(self.train_files), "num_train_available": self.num_train_available,
            "participants_file": self.participants_file, "notes": list(self.notes),
            "heldout_files": list(self.heldout_files),
        }


def read_split(run_dir: Path) -> tuple[list[str], list[str], dict[str, Any]] | None:
    """(train, validation, info) of a run's split.json, or None; files that no longer exist are kept
    in the lists (the caller filters and reports them)."""
    path = run_dir / "split.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return list(data["train"]), list(data["validation"]), data
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not a readable split file ({type(error).__name__}: {error})") from None


def select_data(trained: TrainedModel, data_path: str | Path | None, pattern: str | None = None,
                max_heldout: int | None = None, max_train: int | None = None, seed: int = 0) -> EvaluationData:
    """Held-out and training files for an evaluation (see the module notes)."""
    split = read_split(trained.run_dir)
    notes: list[str] = []
    if data_path is None:
        if split is None:
            raise UserError(f"no split.json in the run folder {trained.run_dir}; give --data (a folder of NIfTI "
                            "files to evaluate on)")
        train, val, info = split
        given = [f for f in val if Path(f).is_file()]
        source = str(info.get("data_source", trained.run_dir / "split.json"))
        heldout_rule = "the validation files of the run's split.json (never trained on)"
        if len(given) < len(val):
            notes.append(f"{len(val) - len(given)} validation files of split.json no longer exist")
    else:
        given = [str(f) for f in input_files(data_path, pattern)]
        source = str(Path(data_path).expanduser())
        heldout_rule = ("all given files that are not training files of the run's split.json"
                        if split is not None else "all given files (the run folder has no split.json)")
    train_set: set[str] = set()
    train_files: list[str] = []
    if split is not None:
        train_all = split[0]
        train_set = {str(Path(f).resolve()) for f in train_all}
        train_files = [f for f in train_all if Path(f).is_file()]
        if len(train_files) < len(train_all):
            notes.append(f"{len(train_all) - len(train_files)} training files of split.json no longer exist")
        train_rule = "the training files of the run's split.json"
    else:
        train_rule = "unknown (no split.json): the memorisation check is skipped"
    heldout = [f for f in given if str(Path(f).resolve()) not in train_set]
    if data_path is not None and len(heldout) < len(given):
        notes.append(f"{len(given) - len(heldout)} of the {len(given)} given files are training files and were "
                     "left out of the held-out set")
    if not heldout:
        raise UserError(f"no held-out volumes to evaluate on in {source}: every file is a training file "
                        "of this run")
    data = EvaluationData(
        heldout_files=_cap(heldout, max_heldout, seed), train_files=_cap(train_files, max_train, seed + 1),
        heldout_rule=heldout_rule, train_rule=train_rule, data_source=source, notes=notes,
        num_heldout_available=len(heldout), num_train_available=len(train_files),
    )
    for what, kept, total in (("held-out", data.heldout_files, len(heldout)),
                              ("training", data.train_files, len(train_files))):
        if len(kept) < total:
            notes.append(f"using a seeded random {len(kept)} of {total} {what} files")
    _attach_participants(data)
    return data


def _cap(files: list[str], limit: int | None, seed: int) -> list[str]:
    if limit is None or len(files) <= limit:
        return list(files)
    keep = np.sort(np.random.default_rng(seed).permutation(len(files))[:limit])
    return [files[i] for i in keep]


def _display(path: Path) -> str:
    """A path relative to the working directory when it is inside it (shorter, and no machine layout)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def participant_id(path: str | Path) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", Path(path).name, flags=re.IGNORECASE)


def _attach_participants(data: EvaluationData) -> None:
    """Read participants.tsv from the held-out files' folder(s), if there is one with volume columns."""
    from ..data.phantom import read_participants

    folders = sorted({str(Path(f).parent) for f in data.heldout_files})
    rows: dict[str, dict[str, str]] = {}
    used = []
    for folder in folders:
        tsv = Path(folder) / "participants.tsv"
        if not tsv.is_file():
            continue
        try:
            table = read_participants(tsv)
        except (OSError, UnicodeDecodeError, IndexError):
            continue
        if not table or not all(c in table[0] for c in PHANTOM_COLUMNS + ("participant_id",)):
            continue
        rows.update({r["participant_id"]: r for r in table})
        used.append(_display(tsv))
    matched = [f for f in data.heldout_files if participant_id(f) in rows]
    if matched:
        data.participants = rows
        data.participants_file = ", ".join(used)
