"""Reading a covariate file (TSV/CSV, one row per scan) and finding each scan's row and values.

The file is a table with a header.  Scans are matched by the first of these columns it has:

* ``path``: the scan's path (relative paths are relative to the covariate file's folder);
* ``filename``: the scan's file name (``sub-01_FLAIR.nii.gz``, or without ``.nii``/``.nii.gz``);
* ``participant_id`` (BIDS ``participants.tsv``): the file name without extension equals the id,
  or starts with the id followed by ``_`` (``sub-01_ses-2_FLAIR``), or one of the scan's parent
  folders is named after it (``sub-01/anat/...``).  Every session of a participant then gets the
  participant's row; give per-session values with a ``path`` or ``filename`` column instead.

Each covariate column is numeric or categorical: ``name:numeric`` / ``name:categorical`` in
``--condition-on`` says which; otherwise a column is numeric when more than half of its non-missing
values are finite numbers (so a stray ``abc`` in an age column is an error at its row, not a
silent switch to categorical), else categorical.  Missing values are empty cells and ``n/a``,
``NA``, ``nan``, ``none``, ``null`` (any case; BIDS writes ``n/a``).

Every problem is one line naming the file, the row (its line number in the file, the header being
line 1) and the column; problems that concern one scan (no row, a missing or non-numeric value)
are returned per scan, so ``--skip-bad-files`` can leave those scans out, while problems with the
file itself (unreadable, no id column, unknown column, duplicate ids) always stop the run.
"""

from __future__ import annotations

import csv
import difflib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import DataError

ID_COLUMNS = ("path", "filename", "participant_id")  # the first one the file has matches the scans
MISSING = frozenset({"", "n/a", "na", "nan", "none", "null"})
KINDS = ("numeric", "categorical")
MAX_TABLE_BYTES = 200 * 1024 * 1024


class CovariateError(DataError):
    """A covariate file that cannot be used at all (as opposed to one scan's bad row)."""


@dataclass
class Table:
    """A covariate file: its header and data rows (strings, whitespace stripped)."""

    path: Path
    header: list[str]
    rows: list[list[str]]
    lines: list[int]  # line number of each data row in the file (header = 1)

    def column(self, name: str) -> int:
        return self.header.index(name)

    @property
    def id_column(self) -> str:
        for name in ID_COLUMNS:
            if name in self.header:
                return name
        raise CovariateError(f"covariates {self.path} has none of the columns {', '.join(ID_COLUMNS)} to match "
                             f"scans by (its columns: {_listed(self.header)})")

    def where(self, row: int, column: str | None = None) -> str:
        """``covariates FILE, row N (id)[, column C]`` for messages."""
        ident = self.rows[row][self.column(self.id_column)] if self.id_column in self.header else ""
        text = f"covariates {self.path}, row {self.lines[row]}" + (f" ({ident})" if ident else "")
        return text + (f", column {column}" if column else "")


def read_table(path: str | os.PathLike, what: str = "covariates file") -> Table:
    """Read a TSV (``.tsv``, or tab-separated) or CSV file with a header row; ``what`` names it in messages."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CovariateError(f"{what} {path} does not exist" if not path.exists() else
                             f"{what} {path} is not a regular file")
    try:
        if path.stat().st_size > MAX_TABLE_BYTES:
            raise CovariateError(f"{what} {path} is larger than {MAX_TABLE_BYTES // 2**20} MiB")
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise CovariateError(f"{what} {path} is not UTF-8 text") from None
    except OSError as error:
        raise CovariateError(f"{what} {path} cannot be read ({error.strerror or error})") from None
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise CovariateError(f"{what} {path} is empty (expected a header row, then one row per scan)")
    suffix = path.suffix.lower()
    delimiter = "\t" if suffix == ".tsv" or (suffix != ".csv" and "\t" in lines[first]) else ","
    parsed = list(csv.reader(lines, delimiter=delimiter))
    header = [cell.strip() for cell in parsed[first]]
    if any(not name for name in header):
        raise CovariateError(f"{what} {path}: the header (line {first + 1}) has an empty column name")
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise CovariateError(f"{what} {path}: column {name!r} appears twice in the header")
        seen.add(name)
    rows, numbers = [], []
    for index in range(first + 1, len(parsed)):
        cells = [cell.strip() for cell in parsed[index]]
        if not any(cells):
            continue
        if len(cells) != len(header):
            raise CovariateError(f"{what} {path}, row {index + 1}: {len(cells)} fields, but the header has "
                                 f"{len(header)} ({'tab' if delimiter == chr(9) else 'comma'}-separated)")
        rows.append(cells)
        numbers.append(index + 1)
    if not rows:
        raise CovariateError(f"{what} {path} has a header but no rows")
    return Table(path, header, rows, numbers)


def parse_condition_on(names: Sequence[str]) -> list[tuple[str, str | None]]:
    """``["age", "sex:categorical"]`` -> ``[("age", None), ("sex", "categorical")]`` (None: decided
    from the values)."""
    out: list[tuple[str, str | None]] = []
    for entry in names:
        name, _, kind = str(entry).partition(":")
        out.append((name.strip(), kind.strip() or None))
    return out


def check_columns(table: Table, wanted: Sequence[str]) -> None:
    """Every covariate is a column of the file, and none is the column that matches scans."""
    for name in wanted:
        if name in ID_COLUMNS and name == table.id_column:
            raise CovariateError(f"covariates {table.path}: {name!r} identifies the scans and cannot be a covariate")
        if name not in table.header:
            close = difflib.get_close_matches(name, table.header, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise CovariateError(f"covariates {table.path} has no column {name!r} (its columns: "
                                 f"{_listed(table.header)}){hint}")


def match_rows(table: Table, files: Sequence[str | os.PathLike]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Each scan's row: ``({file: row index}, [(file, problem)])`` for scans with no row or several."""
    id_column = table.id_column
    col = table.column(id_column)
    keys: dict[str, int] = {}
    for i, row in enumerate(table.rows):
        value = row[col]
        if value.lower() in MISSING:
            raise CovariateError(f"{table.where(i, id_column)}: missing value {value!r} (every row needs its "
                                 f"{id_column})")
        key = _path_key(table.path.parent, value) if id_column == "path" else value
        if key in keys:
            raise CovariateError(f"covariates {table.path}: rows {table.lines[keys[key]]} and {table.lines[i]} both "
                                 f"have {id_column} {value!r}")
        keys[key] = i
    found: dict[str, int] = {}
    problems: list[tuple[str, str]] = []
    for f in files:
        candidates = _candidates(Path(f), id_column)
        hits = sorted({keys[c] for c in candidates if c in keys})
        if len(hits) == 1:
            found[str(f)] = hits[0]
        elif not hits:
            problems.append((str(f), f"covariates {table.path}: no row for scan {f} (matched by its {id_column} "
                                     f"column: {_how(id_column)})"))
        else:
            rows = " and ".join(str(table.lines[h]) for h in hits)
            problems.append((str(f), f"covariates {table.path}: scan {f} matches rows {rows} (by {id_column}); "
                                     "give one row per scan"))
    return found, problems


def column_kinds(table: Table, wanted: Sequence[tuple[str, str | None]], rows: Sequence[int]) -> dict[str, str]:
    """numeric or categorical for each covariate (explicit kinds win; see the module notes)."""
    kinds = {}
    for name, kind in wanted:
        if kind is not None:
            if kind not in KINDS:
                raise CovariateError(f"--condition-on {name}:{kind}: the kind must be numeric or categorical")
            kinds[name] = kind
            continue
        col = table.column(name)
        present = [table.rows[r][col] for r in rows if table.rows[r][col].lower() not in MISSING]
        numeric = sum(1 for v in present if _finite(v) is not None)
        kinds[name] = "numeric" if present and numeric * 2 > len(present) else "categorical"
    return kinds


def row_values(table: Table, row: int, kinds: dict[str, str]) -> tuple[dict[str, float | str], str | None]:
    """The covariates of one row (floats for numeric, strings for categorical), or the first problem."""
    values: dict[str, float | str] = {}
    for name, kind in kinds.items():
        text = table.rows[row][table.column(name)]
        if text.lower() in MISSING:
            return values, f"{table.where(row, name)}: missing value{f' ({text!r})' if text else ''}"
        if kind == "numeric":
            number = _finite(text)
            if number is None:
                return values, f"{table.where(row, name)}: {text[:40]!r} is not a finite number (the column is numeric)"
            values[name] = number
        else:
            values[name] = text
    return values, None


def _finite(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _path_key(base: Path, value: str) -> str:
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    return os.path.realpath(path)


def _stem(name: str) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", name, flags=re.IGNORECASE)


def _candidates(path: Path, id_column: str) -> list[str]:
    if id_column == "path":
        return [os.path.realpath(path)]
    if id_column == "filename":
        return [path.name, _stem(path.name)]
    stem = _stem(path.name)
    parts = stem.split("_")
    prefixes = ["_".join(parts[:k]) for k in range(1, len(parts) + 1)]
    return prefixes + [parent.name for parent in path.parents if parent.name]


def _how(id_column: str) -> str:
    return {"path": "the scan's path", "filename": "the scan's file name",
            "participant_id": "the file name, up to an underscore, or a parent folder"}[id_column]


def _listed(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")
