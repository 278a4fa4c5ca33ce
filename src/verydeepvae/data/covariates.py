"""Covariates of a conditional model: the schema (names, kinds, standardisation, levels) and the
vector the model sees.

A numeric covariate becomes one number, ``(value - mean) / sd`` with the mean and (population)
standard deviation of the training scans; a categorical one becomes a one-hot block over its levels
(sorted, as seen in the training and validation scans).  The vector is the blocks in the order of
``--condition-on``, float32, shape (N, :attr:`CovariateSchema.dim`).

The schema travels in the checkpoint's metadata (``meta["covariates"]``, JSON), so a trained model
encodes a requested ``age=75`` exactly as it encoded the training ages.  It also keeps a *bank* of
the training scans' raw covariate rows (at most :data:`MAX_BANK`, a seeded subset): the training
distribution from which covariates a user leaves unspecified are drawn (:meth:`CovariateSchema.complete`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import CheckpointError, UserError
from ..json_types import JSONObject

MAX_BANK = 5000
# bandwidth, in training standard deviations, of the kernel that draws unspecified covariates near
# the specified ones (complete): narrow enough that age 85 draws lesion loads of 80-90 year-olds
KERNEL_SD = 0.25
Value = float | str
CovariateRow = dict[str, Value]  # one scan's or sample's covariates by name, e.g. {"age": 75.0, "sex": "F"}


@dataclass(frozen=True)
class Covariate:
    """One covariate: ``kind`` numeric (``mean``, ``sd``, training ``minimum``/``maximum``, in the
    column's own unit) or categorical (``levels``)."""

    name: str
    kind: str
    mean: float = 0.0
    sd: float = 1.0
    minimum: float = math.nan
    maximum: float = math.nan
    levels: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        return 1 if self.kind == "numeric" else len(self.levels)

    def encode(self, value: Value) -> list[float]:
        if self.kind == "numeric":
            return [(float(value) - self.mean) / self.sd]
        return [1.0 if level == value else 0.0 for level in self.levels]

    def parse(self, text: Any, where: str = "") -> Value:
        """A requested value: a finite number, or one of the levels; a UserError naming both otherwise."""
        prefix = f"{where}: " if where else ""
        if self.kind == "numeric":
            try:
                value = float(text)
            except (TypeError, ValueError):
                value = math.nan
            if not math.isfinite(value):
                raise UserError(f"{prefix}{self.name} must be a number, got {str(text)[:40]!r}")
            return value
        value = str(text).strip()
        if value not in self.levels:
            raise UserError(f"{prefix}{self.name} must be one of {', '.join(self.levels)} (the levels seen in "
                            f"training), got {value[:40]!r}")
        return value

    def out_of_range(self, value: Value) -> str | None:
        """A notice when a numeric value lies outside the training range (the model extrapolates)."""
        if self.kind != "numeric" or self.minimum <= float(value) <= self.maximum:
            return None
        return (f"{self.name}={float(value):g} is outside the training range {self.minimum:g} to {self.maximum:g}: "
                "the model extrapolates, so treat these volumes with care")

    def describe(self) -> str:
        if self.kind == "numeric":
            return (f"{self.name}: numeric, standardised with mean {self.mean:.4g} and sd {self.sd:.4g}; training "
                    f"range {self.minimum:.4g} to {self.maximum:.4g}")
        return f"{self.name}: categorical, one-hot over {', '.join(self.levels)}"


@dataclass
class CovariateSchema:
    covariates: tuple[Covariate, ...]
    source: str = ""  # the covariate file (or the phantom's participants.tsv)
    matched_by: str = ""  # the column that matched scans to rows
    bank: list[list[Value]] = field(default_factory=list)  # raw training rows, in covariate order

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.covariates]

    @property
    def dim(self) -> int:
        return sum(c.width for c in self.covariates)

    def get(self, name: str) -> Covariate:
        for c in self.covariates:
            if c.name == name:
                return c
        raise UserError(f"the model is not conditioned on {name!r}; its covariates are {', '.join(self.names)}")

    def slots(self, name: str) -> slice:
        """Where ``name`` sits in the encoded vector."""
        start = 0
        for c in self.covariates:
            if c.name == name:
                return slice(start, start + c.width)
            start += c.width
        raise KeyError(name)

    def encode(self, rows: Sequence[Mapping[str, Value]]) -> np.ndarray:
        """(N, dim) float32 from complete rows of raw values."""
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        for i, row in enumerate(rows):
            out[i] = [x for c in self.covariates for x in c.encode(row[c.name])]
        return out

    def bank_rows(self) -> list[dict[str, Value]]:
        return [dict(zip(self.names, row)) for row in self.bank]

    def centre(self) -> np.ndarray:
        """(dim,) the training scans' mean encoded covariates (zeros without training rows): the
        population centre that covariate guidance scales from, as the model's bank mean is."""
        bank = self.encode(self.bank_rows())
        return bank.mean(axis=0) if len(bank) else np.zeros(self.dim, np.float32)

    def complete(self, partial: Sequence[Mapping[str, Value]], rng: np.random.Generator) -> list[dict[str, Value]]:
        """Full rows from rows giving any subset of the covariates: the rest is taken from one training
        row drawn with weights exp(-z²/2) per specified numeric covariate (z: distance in units of
        KERNEL_SD training sds) and only among rows with the specified levels (ignored when no
        training row has them), so unspecified covariates follow the training distribution *given*
        the specified ones (e.g. lesion load given age).  One draw per row, always (reproducible)."""
        names = self.names
        bank = self.bank
        if not bank:
            raise UserError("the checkpoint holds no training covariates to draw unspecified ones from; "
                            f"give every covariate ({', '.join(names)})")
        columns = {c.name: [row[i] for row in bank] for i, c in enumerate(self.covariates)}
        out = []
        for request in partial:
            log_w = np.zeros(len(bank))
            allowed = np.ones(len(bank), dtype=bool)
            for c in self.covariates:
                if c.name not in request:
                    continue
                if c.kind == "numeric":
                    z = (np.asarray(columns[c.name], float) - float(request[c.name])) / (KERNEL_SD * c.sd)
                    log_w -= 0.5 * z ** 2
                else:
                    allowed &= np.asarray([v == request[c.name] for v in columns[c.name]])
            if allowed.any():
                log_w = np.where(allowed, log_w, -np.inf)
            weights = np.exp(log_w - log_w.max())
            pick = int(rng.choice(len(bank), p=weights / weights.sum()))
            out.append({**dict(zip(names, bank[pick])), **request})
        return out

    def to_json(self) -> JSONObject:
        return {"covariates": [_covariate_json(c) for c in self.covariates], "source": self.source,
                "matched_by": self.matched_by, "dim": self.dim, "bank": self.bank,
                "encoding": "numeric: (value - mean) / sd; categorical: one-hot over levels; in this order"}

    @classmethod
    def from_json(cls, data: Any, where: str = "checkpoint") -> "CovariateSchema":
        try:
            covariates = []
            for entry in data["covariates"]:
                kind = entry["kind"]
                if kind == "numeric":
                    sd = float(entry["sd"])
                    if not (math.isfinite(sd) and sd > 0):
                        raise ValueError(f"sd of {entry['name']} is {sd}")
                    covariates.append(Covariate(str(entry["name"]), kind, float(entry["mean"]), sd,
                                                float(entry["minimum"]), float(entry["maximum"])))
                elif kind == "categorical":
                    levels = tuple(str(v) for v in entry["levels"])
                    if not levels:
                        raise ValueError(f"{entry['name']} has no levels")
                    covariates.append(Covariate(str(entry["name"]), kind, levels=levels))
                else:
                    raise ValueError(f"unknown kind {kind!r}")
            bank = [list(row) for row in data.get("bank", [])]
            if not covariates or any(len(row) != len(covariates) for row in bank):
                raise ValueError("no covariates, or bank rows of the wrong length")
            return cls(tuple(covariates), str(data.get("source", "")), str(data.get("matched_by", "")), bank)
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{where} has an unreadable covariate schema ({type(error).__name__}: "
                                  f"{str(error)[:80]})") from None

    def summary_lines(self) -> list[str]:
        lines = [f"conditioned on {', '.join(self.names)} ({self.dim} inputs); values from {self.source}"
                 + (f", matched by {self.matched_by}" if self.matched_by else "")]
        return lines + [f"  {c.describe()}" for c in self.covariates]


def _covariate_json(c: Covariate) -> JSONObject:
    if c.kind == "numeric":
        return {"name": c.name, "kind": c.kind, "mean": c.mean, "sd": c.sd, "minimum": c.minimum, "maximum": c.maximum}
    return {"name": c.name, "kind": c.kind, "levels": list(c.levels)}


def build_schema(values: Mapping[str, Mapping[str, Value]], train_files: Sequence[str], kinds: Mapping[str, str],
                 source: str, matched_by: str, seed: int = 0) -> CovariateSchema:
    """The schema of the training scans' values (levels from every scan in ``values``).  A covariate
    that does not vary over the training scans cannot condition anything: a UserError."""
    train = [values[f] for f in train_files]
    covariates = []
    for name, kind in kinds.items():
        if kind == "numeric":
            column = np.asarray([float(row[name]) for row in train])
            sd = float(column.std())
            if not sd > 0:
                raise UserError(f"covariates {source}: column {name} has the same value ({column[0]:g}) for every "
                                "training scan, so it cannot condition the model")
            covariates.append(Covariate(name, kind, float(column.mean()), sd, float(column.min()), float(column.max())))
        else:
            levels = tuple(sorted({str(row[name]) for row in values.values()}))
            if len({str(row[name]) for row in train}) < 2:
                raise UserError(f"covariates {source}: column {name} has one level ({levels[0]!r}) over the training "
                                "scans, so it cannot condition the model")
            covariates.append(Covariate(name, kind, levels=levels))
    order = np.random.default_rng(seed).permutation(len(train))[:MAX_BANK]
    bank = [[train[i][c.name] for c in covariates] for i in sorted(order.tolist())]
    return CovariateSchema(tuple(covariates), source, matched_by, bank)


def parse_assignments(items: Sequence[str], what: str = "--condition") -> dict[str, str]:
    """``["age=75", "sex=F"]`` -> ``{"age": "75", "sex": "F"}``; a name given twice is an error."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise UserError(f"{what} expects name=value (e.g. age=75), got {str(item)[:60]!r}")
        if name in out:
            raise UserError(f"{what} gives {name} twice")
        out[name] = value
    return out
