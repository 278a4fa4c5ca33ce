"""The covariates of a training run: where they come from, the checks made before anything is
written, and ``covariates.json`` in the run folder.

* Source: ``covariates_file`` (``--covariates``), or without ``data_path`` the phantom population's
  own ``participants.tsv`` (matched by ``participant_id``), so ``train --condition-on age`` needs no
  file.  A phantom folder written before age and sex existed gets those columns first
  (:func:`verydeepvae.data.phantom.complete_participants`).
* :func:`check_before_training` runs before the output folder is claimed: the file, its columns and
  every scan's row and values are checked, and the first problem stops the run as one line naming
  the file, row and column (exit status 2, nothing written).  With ``skip_bad_files`` scans whose
  row is missing or bad are left out instead (listed as notices and in ``skipped_files.txt``).
* ``covariates.json`` (written once, like ``split.json``) holds the schema and every training and
  validation scan's raw values; a resumed run reads it, so its covariates and their standardisation
  never change under it, whatever happened to the covariate file since.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..atomic import write_json
from ..errors import DataError
from . import covariate_table as ct
from .covariates import CovariateSchema, Value, build_schema

COVARIATES_FILE = "covariates.json"


@dataclass
class ScanCovariates:
    """Raw covariate values of scans, and the scans that have none (or bad ones)."""

    values: dict[str, dict[str, Value]]
    kinds: dict[str, str]
    source: str
    matched_by: str
    problems: list[tuple[str, str]] = field(default_factory=list)

    def schema(self, train_files: Sequence[str], seed: int = 0) -> CovariateSchema:
        return build_schema({f: self.values[f] for f in self.values}, train_files, self.kinds, self.source,
                            self.matched_by, seed)


def read_scan_covariates(table_path: str | Path, condition_on: Sequence[str],
                         files: Sequence[str | Path]) -> ScanCovariates:
    """Each scan's covariates from a TSV/CSV; file-level problems raise, per-scan ones are listed."""
    table = ct.read_table(table_path)
    wanted = ct.parse_condition_on(condition_on)
    ct.check_columns(table, [name for name, _ in wanted])
    found, problems = ct.match_rows(table, files)
    kinds = ct.column_kinds(table, wanted, sorted(set(found.values())))
    values: dict[str, dict[str, Value]] = {}
    for f in files:
        if str(f) not in found:
            continue
        row, problem = ct.row_values(table, found[str(f)], kinds)
        if problem is None:
            values[str(f)] = row
        else:
            problems.append((str(f), problem))
    order = {str(f): i for i, f in enumerate(files)}
    problems.sort(key=lambda p: order.get(p[0], 0))
    return ScanCovariates(values, kinds, str(table.path), table.id_column, problems)


def first_problem(problems: Sequence[tuple[str, str]]) -> DataError:
    """One line: the first problem, and how many more there are."""
    more = len(problems) - 1
    tail = (f" (and {more} more scan{'s' if more > 1 else ''} with covariate problems; --skip-bad-files leaves such "
            "scans out)") if more else " (--skip-bad-files leaves such scans out)"
    return DataError(problems[0][1] + tail)


def source_table(cfg: Any, phantom_root: Path | None) -> Path:
    if cfg.covariates_file:
        return Path(cfg.covariates_file).expanduser()
    if phantom_root is None:  # a bug: config validation requires covariates_file with data_path
        raise DataError("no covariates file")
    return phantom_root / "participants.tsv"


def check_before_training(cfg: Any) -> None:
    """The checks of the module notes, for a fresh run (a resumed run has its covariates.json).
    Reads files only; raises the first problem as one line."""
    if not cfg.condition_on or cfg.resume:
        return
    if cfg.data_path is None and cfg.covariates_file is None:
        from .phantom import CONDITIONABLE

        for name, _ in ct.parse_condition_on(cfg.condition_on):
            if name not in CONDITIONABLE:
                import difflib

                close = difflib.get_close_matches(name, CONDITIONABLE, n=1)
                raise DataError(f"the phantom population has no factor {name!r} to condition on"
                                + (f"; did you mean {close[0]!r}?" if close else "")
                                + f" (its factors: {', '.join(CONDITIONABLE[:8])}, ... see participants.tsv)")
        return
    table = ct.read_table(cfg.covariates_file)
    ct.check_columns(table, [name for name, _ in ct.parse_condition_on(cfg.condition_on)])
    if cfg.data_path is None:  # a user file for the phantom population: its scans do not exist yet
        return
    from . import discover

    files = discover.cap_files(discover.discover_files(cfg.data_path, cfg.nifti_filename_pattern,
                                                       exclude=[cfg.output_dir]), cfg.max_niis_to_use)
    found = read_scan_covariates(cfg.covariates_file, cfg.condition_on, files)
    if found.problems and not cfg.skip_bad_files:
        raise first_problem(found.problems)
    if not found.values:
        raise DataError(f"covariates {cfg.covariates_file}: none of the {len(files)} scans has usable covariates")
    for name in found.kinds:  # (build_schema checks the training scans alone, once they are split)
        seen = {row[name] for row in found.values.values()}
        if len(seen) < 2:
            raise DataError(f"covariates {found.source}: column {name} has the same value ({next(iter(seen))!r}) for "
                            "every scan, so it cannot condition the model")


def for_files(cfg: Any, files: Sequence[str | Path], phantom_root: Path | None) -> ScanCovariates:
    """Covariates of a fresh run's scans (raising the first per-scan problem unless skip_bad_files)."""
    if cfg.covariates_file is None and phantom_root is not None:
        from .phantom import complete_participants

        complete_participants(phantom_root)
    found = read_scan_covariates(source_table(cfg, phantom_root), cfg.condition_on, files)
    if found.problems and not cfg.skip_bad_files:
        raise first_problem(found.problems)
    if not found.values:
        raise DataError(f"covariates {found.source}: none of the {len(files)} scans has usable covariates")
    return found


def save(output_dir: str | Path, schema: CovariateSchema, values: dict[str, dict[str, Value]]) -> Path:
    path = Path(output_dir) / COVARIATES_FILE
    write_json(path, {"schema": schema.to_json(), "files": values})
    return path


def load(output_dir: str | Path) -> tuple[CovariateSchema, dict[str, dict[str, Value]]] | None:
    """A run's covariates.json (schema, values per file), or None when there is none."""
    path = Path(output_dir) / COVARIATES_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        values = {str(k): dict(v) for k, v in data["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(f"{path} is not a readable covariates file ({type(error).__name__})") from None
    return CovariateSchema.from_json(data["schema"], where=str(path)), values
