"""Conditional generation: turning requested covariates into the model's input, and finding the
covariates of real scans.

* Requests (``sample --condition age=75 --condition sex=F``, or ``--conditions FILE`` with one row
  per volume) may give any subset of the model's covariates.  Values are checked against the
  schema (a number, or one of the levels seen in training); a numeric value outside the training
  range is allowed, with a notice.  The covariates left unspecified are drawn from the training
  scans' *given* the specified ones (:meth:`CovariateSchema.complete`), from a NumPy generator
  seeded with the sampling seed, so the same seed gives the same conditions and volumes.
* A real scan's own covariates (for ``reconstruct``, ``counterfactual``, ``evaluate``) are found,
  per covariate, in this order: values given explicitly (``--observed age=62``), a covariate file
  given now (``--covariates FILE``), the training run's ``covariates.json`` (scans it trained or
  validated on), a ``participants.tsv`` next to the scan (the phantom population's).  A covariate
  found nowhere is a one-line error saying how to give it: a conditional model cannot encode a
  scan without its covariates.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, TypedDict

import numpy as np

from .data import covariate_table as ct
from .data.covariates import CovariateRow, CovariateSchema, Value
from .errors import UserError

MAX_SWEEP_VALUES = 200


def require_schema(trained: Any, what: str) -> CovariateSchema:
    """The covariate schema of a conditional model, or a UserError naming ``what`` needs one."""
    schema = trained.covariates
    if schema is None:
        raise UserError(f"checkpoint {trained.checkpoint.path} is an unconditional model; {what} needs a model "
                        "trained with --condition-on")
    return schema


def parse_request(schema: CovariateSchema, assignments: Mapping[str, Any], where: str = "") -> dict[str, Value]:
    """Named raw values -> checked values (numbers, or levels)."""
    return {name: schema.get(name).parse(value, where) for name, value in assignments.items()}


def read_conditions_file(path: str | os.PathLike, schema: CovariateSchema) -> list[dict[str, Value]]:
    """One request per row of a TSV/CSV whose columns are covariates; empty cells are unspecified."""
    table = ct.read_table(path, "conditions file")
    unknown = [c for c in table.header if c not in schema.names]
    if unknown:
        raise UserError(f"conditions {table.path}: column {unknown[0]!r} is not a covariate of the model "
                        f"(its covariates: {', '.join(schema.names)})")
    requests = []
    for i, row in enumerate(table.rows):
        given = {name: value for name, value in zip(table.header, row) if value.lower() not in ct.MISSING}
        requests.append(parse_request(schema, given, f"conditions {table.path}, row {table.lines[i]}"))
    return requests


class SampleConditions(TypedDict):
    """One sample's entry in samples.json: its file, every covariate's value, and which were drawn."""

    file: str
    covariates: CovariateRow
    drawn: list[str]


@dataclass
class Conditions:
    """Complete covariates of the volumes to generate: raw ``rows``, their encoding ``vectors``
    (N, dim) float32, which covariates were ``drawn`` per row, notices for the user, and the
    ``references`` (N, dim) that covariate guidance scales around: each vector with its *requested*
    covariates moved to the training population's centre (drawn ones keep their values), so
    guidance strengthens what was asked for and nothing else."""

    rows: list[dict[str, Value]]
    vectors: np.ndarray
    drawn: list[list[str]]
    notices: list[str] = field(default_factory=list)
    references: np.ndarray | None = None

    def record(self, names: Sequence[str]) -> list[SampleConditions]:
        """Per volume: the file name, every covariate's value, and which were drawn (samples.json)."""
        return [{"file": name, "covariates": row, "drawn": drawn}
                for name, row, drawn in zip(names, self.rows, self.drawn)]


def resolve(schema: CovariateSchema, requests: Sequence[Mapping[str, Value]], seed: int = 0) -> Conditions:
    """Complete each request from the training distribution and encode it (module notes)."""
    rng = np.random.default_rng([int(seed), 0xC0DE])
    rows = schema.complete(list(requests), rng)
    notices = sorted({note for request in requests for name, value in request.items()
                      if (note := schema.get(name).out_of_range(value))})
    drawn = [[n for n in schema.names if n not in request] for request in requests]
    vectors = schema.encode(rows)
    centre = schema.centre()
    references = vectors.copy()
    for i, request in enumerate(requests):
        for name in request:
            references[i, schema.slots(name)] = centre[schema.slots(name)]
    return Conditions(rows, vectors, drawn, notices, references.astype(np.float32))


def sweep_values(schema: CovariateSchema, text: str) -> tuple[str, list[Value]]:
    """``age=50:90:5`` (start:stop:step, stop included) or ``sex=F,M`` -> (name, values)."""
    name, sep, spec = str(text).partition("=")
    name, spec = name.strip(), spec.strip()
    if not sep or not name or not spec:
        raise UserError(f"--sweep expects name=start:stop:step (e.g. age=50:90:5) or name=a,b,c, got {text!r}")
    covariate = schema.get(name)
    if ":" in spec:
        if covariate.kind != "numeric":
            raise UserError(f"--sweep {name}: a range needs a numeric covariate; list its levels instead "
                            f"({name}={','.join(covariate.levels)})")
        try:
            start, stop, step = (float(v) for v in spec.split(":"))
        except ValueError:
            raise UserError(f"--sweep {name}: expected start:stop:step numbers, got {spec!r}") from None
        if not (math.isfinite(start) and math.isfinite(stop) and math.isfinite(step)) or step <= 0 or stop < start:
            raise UserError(f"--sweep {name}: needs start <= stop and a step > 0, got {spec!r}")
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        if count > MAX_SWEEP_VALUES:
            raise UserError(f"--sweep {name}: {count} values; at most {MAX_SWEEP_VALUES}")
        return name, [round(start + i * step, 10) for i in range(count)]
    values = [covariate.parse(v.strip(), f"--sweep {name}") for v in spec.split(",") if v.strip()]
    if not values or len(values) > MAX_SWEEP_VALUES:
        raise UserError(f"--sweep {name}: give between 1 and {MAX_SWEEP_VALUES} values")
    return name, values


# --- the covariates of real scans ------------------------------------------------------------------


def scan_covariates(trained: Any, files: Sequence[str | os.PathLike], given: Mapping[str, Any] | None = None,
                    covariates_file: str | os.PathLike | None = None) -> tuple[list[dict[str, Value]], list[str]]:
    """Every scan's own covariates (raw values) and where they came from (module notes)."""
    schema = require_schema(trained, "this")
    fixed = parse_request(schema, given or {}, "--observed")
    sources: list[tuple[str, dict[str, dict[str, Value]]]] = []
    if covariates_file is not None:
        sources.append((str(covariates_file), _table_values(covariates_file, schema, files, strict=True)))
    run = _run_values(trained)
    if run:
        sources.append((f"{trained.run_dir / 'covariates.json'}", run))
    for folder in sorted({str(Path(f).parent) for f in files}):
        tsv = Path(folder) / "participants.tsv"
        if tsv.is_file():
            sources.append((str(tsv), _table_values(tsv, schema, files, strict=False)))
    rows, origins = [], []
    for f in files:
        row, used = dict(fixed), ["--observed"] if fixed else []
        for label, values in sources:
            found = values.get(str(f)) or values.get(os.path.realpath(f))
            if not found:
                continue
            missing = {k: v for k, v in found.items() if k not in row}
            if missing:
                row.update(missing)
                used.append(label)
        absent = [n for n in schema.names if n not in row]
        if absent:
            raise UserError(f"no {absent[0]} for scan {f}: a conditional model needs each scan's own covariates; give "
                            f"--observed {absent[0]}=VALUE, or --covariates FILE with a row for it")
        rows.append({n: row[n] for n in schema.names})
        origins.append(", ".join(used))
    return rows, origins


def _run_values(trained: Any) -> dict[str, dict[str, Value]]:
    from .data.run_covariates import load

    try:
        loaded = load(trained.run_dir)
    except UserError:
        return {}
    if loaded is None:
        return {}
    values = loaded[1]
    return {**values, **{os.path.realpath(k): v for k, v in values.items()}}


def _table_values(path: str | os.PathLike, schema: CovariateSchema, files: Sequence[str | os.PathLike],
                  strict: bool) -> dict[str, dict[str, Value]]:
    """Values of the schema's covariates found in a table (those it has); ``strict``: a problem in a
    file the user named is an error, while a participants.tsv found by the way is used where it can be."""
    try:
        table = ct.read_table(path)
        id_column = table.id_column
        found, _ = ct.match_rows(table, files)
    except UserError:
        if strict:
            raise
        return {}
    present = [c for c in schema.covariates if c.name in table.header and c.name != id_column]
    out: dict[str, dict[str, Value]] = {}
    for f, row in found.items():
        values = {}
        for c in present:
            text = table.rows[row][table.column(c.name)]
            if text.lower() in ct.MISSING:
                continue
            try:
                values[c.name] = c.parse(text, table.where(row, c.name))
            except UserError:
                if strict:
                    raise
        out[f] = values
    return out
