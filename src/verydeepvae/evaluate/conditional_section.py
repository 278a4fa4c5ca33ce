"""The conditional-generation section of the report as named records (how it is computed:
``conditional.py``): a dataclass like those in ``sections.py`` with its JSON form (the keys
``report.json`` has always had) and how it reads, over typed dicts for the nested measurements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypedDict, Union

import numpy as np

from ..data.covariates import Value
from ..guidance import Guidance
from ..json_types import JSONObject


class Trend(TypedDict):
    """Spearman correlation (and its p-value) and least-squares slope of y against x; None: too few
    points or no spread."""

    n: int
    spearman: float | None
    spearman_p: float | None
    slope: float | None


class _MannWhitneyCounts(TypedDict):
    p: float | None  # None: fewer than 2 finite values on a side
    n: list[int]


class MannWhitney(_MannWhitneyCounts, total=False):
    """A two-sided Mann-Whitney U test between the samples at the lowest and at the highest value."""

    median_low: float
    median_high: float


class NumericMeasure(TypedDict):
    """One measurement against a numeric covariate: samples against the requested value beside real
    volumes against their own."""

    samples: Trend
    real: Trend
    slope_ratio: float | None
    lowest_vs_highest: MannWhitney


class LevelMeans(TypedDict):
    """One measurement's mean at one level of a categorical covariate (None: no finite values)."""

    samples_mean: float | None
    real_mean: float | None


CategoricalMeasure = dict[str, LevelMeans]  # level -> its means
Measure = Union[NumericMeasure, CategoricalMeasure]


class CounterfactualMeasure(TypedDict):
    """One measurement of counterfactuals: its change from the reconstruction against the requested change."""

    change_vs_requested: Trend
    monotonic_fraction: float | None  # None: the real slope gives no direction
    mean_change_per_value: list[float]


class _CounterfactualScans(TypedDict):
    num_scans: int
    psnr_own_values_db: list[float]
    note: str


class CounterfactualTruth(TypedDict):
    """The same scans' true counterfactuals (held-out phantoms re-rendered, ``evaluate/phantom_truth.py``)."""

    monotonic_fraction: dict[str, float | None]  # per measure, read as the model's counterfactuals are
    psnr_counterfactual_db: float  # the counterfactuals against the true volumes, mean over scans and values
    psnr_unchanged_db: float  # the unchanged reconstruction against them: what moving nothing would get


class Counterfactuals(_CounterfactualScans, total=False):
    """Held-out scans swept along a numeric covariate; ``measures`` when tissue is measured, ``truth`` when
    the scans are phantoms whose true counterfactuals can be rendered."""

    measures: dict[str, CounterfactualMeasure]
    truth: CounterfactualTruth


class _Sweep(TypedDict):
    kind: str  # "numeric" or "categorical"
    values: list[Value]
    requested: list[Value]


class CovariateEntry(_Sweep, total=False):
    """One covariate's part of the section; the measurements only when tissue is measured."""

    samples_measured: dict[str, list[float]]
    real_values: list[Value]
    measures: dict[str, Measure]
    primary: str | None  # numeric: the measure the real volumes follow most strongly
    counterfactual: Counterfactuals  # numeric covariates, with held-out volumes


@dataclass
class ConditionalSection:
    """Do samples and counterfactuals follow the requested covariates? (module notes of ``conditional.py``)"""

    what: str
    covariates: list[JSONObject]  # CovariateSchema.to_json()["covariates"]
    points: int
    per_point: int
    guidance: float | JSONObject  # Guidance.to_json
    measured: bool  # tissue measured (phantom or FLAIR-like data)
    units: dict[str, str]
    labels: dict[str, str]
    per_covariate: dict[str, CovariateEntry] = field(default_factory=dict)
    counterfactual_guidance: float | JSONObject | None = None  # Guidance.to_json; None: ``guidance``

    def to_json(self) -> JSONObject:
        return dict(vars(self))

    @classmethod
    def from_json(cls, data: JSONObject) -> ConditionalSection:
        return cls(**{"guidance": 1.0, **data})  # reports before guidance have none

    def console_lines(self) -> list[str]:
        lines = []
        for name, per in self.per_covariate.items():
            primary = per.get("primary")
            if not primary:
                continue
            m = per["measures"][primary]
            lines.append(f"conditioned on {name}: {self.labels[primary]} of samples vs requested {name}: Spearman "
                         f"{_n(m['samples']['spearman'])}, slope {_n(m['samples']['slope'])} (real: "
                         f"{_n(m['real']['spearman'])}, {_n(m['real']['slope'])}; ratio {_n(m['slope_ratio'])})")
        return lines

    def markdown(self, figures: dict[str, str]) -> list[str]:
        out = ["## Conditional generation", "", self.what, ""]
        guidance = Guidance.from_json(self.guidance)
        counterfactual = guidance if self.counterfactual_guidance is None else \
            Guidance.from_json(self.counterfactual_guidance)
        if not (guidance.is_identity and counterfactual.is_identity):
            out += [f"Covariate guidance {guidance} for samples, {counterfactual} for counterfactuals: the requested "
                    "covariate's effect on the decoder scaled that many times (from the population centre for "
                    "samples, from each scan's own values for counterfactuals).", ""]
        for name, per in self.per_covariate.items():
            out += [f"### {name} ({per['kind']})", "",
                    f"Samples at {', '.join(fmt(name, v) for v in per['values'])}, {self.per_point} each.", ""]
            if f"conditional_{name}_samples" in figures:
                out += [f"![samples across {name}]({figures[f'conditional_{name}_samples']})", ""]
            if "measures" not in per:
                out += ["Tissue is not measured for these data (see Tissue volumes).", ""]
                continue
            out += self._measures_table(per) + [""]
            if f"conditional_{name}_trend" in figures:
                out += [f"![{name} trend]({figures[f'conditional_{name}_trend']})", ""]
            cf = per.get("counterfactual")
            if cf:
                out += self._counterfactual_lines(name, cf, figures)
        return out

    def _measures_table(self, per: CovariateEntry) -> list[str]:
        if per["kind"] == "numeric":
            out = ["| measure | samples: Spearman / slope per unit | real: Spearman / slope | slope ratio | "
                   "lowest vs highest value: Mann-Whitney p |", "|---|---|---|---|---|"]
            for k, m in per["measures"].items():
                star = " (primary)" if k == per.get("primary") else ""
                out.append(f"| {self.labels[k]}{star} | {_n(m['samples']['spearman'])} / {_n(m['samples']['slope'])} "
                           f"| {_n(m['real']['spearman'])} / {_n(m['real']['slope'])} | {_n(m['slope_ratio'])} | "
                           f"{_n(m['lowest_vs_highest']['p'])} |")
            return out
        out = ["| measure | " + " | ".join(f"{lv}: samples / real" for lv in per["values"]) + " |",
               "|---|" + "---|" * len(per["values"])]
        for k, m in per["measures"].items():
            out.append(f"| {self.labels[k]} | " + " | ".join(f"{_n(m[str(lv)]['samples_mean'])} / "
                                                            f"{_n(m[str(lv)]['real_mean'])}" for lv in per["values"])
                       + " |")
        return out

    def _counterfactual_lines(self, name: str, cf: Counterfactuals, figures: dict[str, str]) -> list[str]:
        out = [f"Counterfactuals of {cf['num_scans']} held-out scans along {name}; reconstruction at their own "
               f"values: PSNR {_n(float(np.mean(cf['psnr_own_values_db'])))} dB ({cf['note']}).", ""]
        truth = cf.get("truth")
        if "measures" in cf:
            extra = (" true counterfactuals: monotonic |", "---|") if truth else ("", "")
            out += ["| measure | change vs requested change: Spearman / slope | monotonic along the sweep |" + extra[0],
                    "|---|---|---|" + extra[1]]
            for k, m in cf["measures"].items():
                t = m["change_vs_requested"]
                out.append(f"| {self.labels[k]} | {_n(t['spearman'])} / {_n(t['slope'])} | "
                           f"{_n(m['monotonic_fraction'])} |" + (f" {_n(truth['monotonic_fraction'].get(k))} |"
                                                                 if truth else ""))
            out.append("")
        if truth:
            out += [f"The held-out scans are phantoms, so their true counterfactuals (each re-rendered at every value, "
                    f"all else kept) are measured the same way (last column): the estimator does not read even the "
                    f"truth as monotonic for every scan. Against the true volumes the counterfactuals reach a PSNR of "
                    f"{_n(truth['psnr_counterfactual_db'])} dB, the unchanged reconstructions "
                    f"{_n(truth['psnr_unchanged_db'])} dB.", ""]
        if f"counterfactual_{name}" in figures:
            out += [f"![counterfactuals along {name}]({figures[f'counterfactual_{name}']})", ""]
        return out


def fmt(name: str, value: Value) -> str:
    """A covariate at a value, as figures and tables title it."""
    return f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}"


def _n(value: Any) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
