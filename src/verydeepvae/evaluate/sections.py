"""The report's sections about the model on held-out volumes, each a small dataclass that knows its
JSON form (``to_json`` / ``from_json``: the keys and values ``report.json`` has always had) and how
it reads (``markdown``: its section of report.md; ``summary_rows``: its rows of the summary table;
``console_lines``: what ``verydeepvae evaluate`` prints).  Population sections (diversity,
distances, memorisation, tissue volumes) are in ``population.py``.

Units: likelihoods in nats or bits per voxel as each name says; PSNR in dB, SSIM and MAE on the
model intensity range [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np

from ..json_types import JSONObject
from .text import mean_sd, num


class _LayerKL(TypedDict):
    index: int
    level: int
    resolution: int
    shape: list[int]
    kl_nats_per_voxel: float
    kl_bits_per_voxel: float
    kl_nats_total: float  # over the whole volume


class LayerKL(_LayerKL, total=False):
    """One latent layer's KL over the held-out volumes, with its active units (2 or more volumes)."""

    active_units: int
    units: int


class LayerUnits(TypedDict):
    name: str
    active: int
    units: int
    fraction: float


class ActiveUnits(TypedDict):
    """metrics.active_units_from_variances with the definition the report states."""

    threshold: float
    num_volumes: int
    per_layer: list[LayerUnits]
    total_active: int
    total_units: int
    fraction_active: float
    definition: str


@dataclass
class Stats:
    """Summary of per-volume values; non-finite values are left out of all but ``n``."""

    mean: float
    std: float
    sem: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Any) -> Stats:
        v = np.asarray(values, dtype=np.float64).ravel()
        finite = v[np.isfinite(v)]
        if finite.size == 0:
            nan = float("nan")
            return cls(nan, nan, nan, nan, nan, int(v.size))
        sem = float(finite.std(ddof=1) / math.sqrt(finite.size)) if finite.size > 1 else float("nan")
        return cls(float(finite.mean()), float(finite.std()), sem, float(finite.min()), float(finite.max()),
                   int(v.size))

    def to_json(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "sem": self.sem, "min": self.min, "max": self.max, "n": self.n}

    @classmethod
    def from_json(cls, data: JSONObject) -> Stats:
        return cls(**{k: data[k] for k in ("mean", "std", "sem", "min", "max", "n")})


@dataclass
class LikelihoodSection:
    """Negative ELBO and its terms over held-out volumes, KL per latent layer, active units."""

    num_volumes: int
    discrete: bool  # a discretised likelihood: the negative ELBO is a code length
    statement: str
    estimator: str
    elbo_nats_per_voxel: Stats
    elbo_bits_per_voxel: Stats
    reconstruction_bits_per_voxel: Stats
    kl_bits_per_voxel: Stats
    per_volume_elbo_bits_per_voxel: list[float]
    kl_per_layer: list[LayerKL]
    active_units: ActiveUnits | None  # None below 2 volumes

    STATS = ("elbo_nats_per_voxel", "elbo_bits_per_voxel", "reconstruction_bits_per_voxel", "kl_bits_per_voxel")

    def to_json(self) -> JSONObject:
        out = dict(vars(self))
        out.update({k: getattr(self, k).to_json() for k in self.STATS})
        return out

    @classmethod
    def from_json(cls, data: JSONObject) -> LikelihoodSection:
        return cls(**{**data, **{k: Stats.from_json(data[k]) for k in cls.STATS}})

    def summary_rows(self) -> list[str]:
        kind = "discrete likelihood: a true code length" if self.discrete else "continuous density: not a code length"
        return [f"| held-out negative ELBO, bits/voxel | {mean_sd(self.elbo_bits_per_voxel)} | {kind} |"]

    def console_lines(self) -> list[str]:
        return [f"held-out negative ELBO: {mean_sd(self.elbo_bits_per_voxel)} bits/voxel "
                f"({mean_sd(self.elbo_nats_per_voxel)} nats/voxel) on {self.num_volumes} volumes"]

    def markdown(self, figures: dict[str, str]) -> list[str]:
        out = ["## Likelihood", "", self.statement, "",
               f"Estimator: {self.estimator}. {self.num_volumes} held-out volumes.", "",
               "| quantity | nats/voxel | bits/voxel |", "|---|---|---|",
               f"| negative ELBO | {mean_sd(self.elbo_nats_per_voxel)} | {mean_sd(self.elbo_bits_per_voxel)} |",
               f"| reconstruction term | | {mean_sd(self.reconstruction_bits_per_voxel)} |",
               f"| KL (all layers) | | {mean_sd(self.kl_bits_per_voxel)} |", ""]
        units = self.active_units
        if units:
            out += [f"Active latent units: **{units['total_active']:,} of {units['total_units']:,}** "
                    f"({100 * units['fraction_active']:.1f} %); {units['definition']}.", ""]
        if "kl_per_layer" in figures:
            out += [f"![KL per layer]({figures['kl_per_layer']})", ""]
        out += ["| layer | resolution | z shape | KL bits/voxel | KL nats (whole volume) | active units |",
                "|---|---|---|---|---|---|"]
        for layer in self.kl_per_layer:
            active = f"{layer['active_units']} / {layer['units']}" if "active_units" in layer else "n/a"
            out.append(f"| {layer['index']} | {layer['resolution']}³ | {'×'.join(map(str, layer['shape']))} | "
                       f"{num(layer['kl_bits_per_voxel'])} | {num(layer['kl_nats_total'])} | {active} |")
        return out + [""]


@dataclass
class ReconstructionSection:
    """Posterior-mean reconstructions of held-out volumes: PSNR (dB), SSIM and MAE over the whole
    volume and, when every input has one, over its foreground."""

    num_volumes: int
    latents: str
    data_range: float
    note: str
    psnr_db: Stats
    ssim: Stats
    mae: Stats
    foreground: dict[str, Stats] | None = None  # psnr_db and mae over voxels above background

    def to_json(self) -> JSONObject:
        out = {"num_volumes": self.num_volumes, "latents": self.latents, "data_range": self.data_range,
               "note": self.note, "psnr_db": self.psnr_db.to_json(), "ssim": self.ssim.to_json(),
               "mae": self.mae.to_json()}
        if self.foreground is not None:
            out["foreground"] = {k: v.to_json() for k, v in self.foreground.items()}
        return out

    @classmethod
    def from_json(cls, data: JSONObject) -> ReconstructionSection:
        foreground = data.get("foreground")
        return cls(data["num_volumes"], data["latents"], data["data_range"], data["note"],
                   *(Stats.from_json(data[k]) for k in ("psnr_db", "ssim", "mae")),
                   foreground={k: Stats.from_json(v) for k, v in foreground.items()} if foreground else None)

    def summary_rows(self) -> list[str]:
        return [f"| reconstruction PSNR (dB) / SSIM / MAE | {num(self.psnr_db.mean)} / {num(self.ssim.mean)} / "
                f"{num(self.mae.mean)} | posterior mean, held-out |"]

    def console_lines(self) -> list[str]:
        return [f"reconstruction: PSNR {mean_sd(self.psnr_db)} dB, SSIM {mean_sd(self.ssim)}, MAE {mean_sd(self.mae)}"]

    def markdown(self, figures: dict[str, str]) -> list[str]:
        out = ["## Reconstruction", "", f"{self.latents}; {self.note}.", "",
               "| | PSNR (dB) | SSIM | MAE |", "|---|---|---|---|",
               f"| whole volume | {mean_sd(self.psnr_db)} | {mean_sd(self.ssim)} | {mean_sd(self.mae)} |"]
        if self.foreground is not None:
            out.append(f"| foreground | {mean_sd(self.foreground['psnr_db'])} | | {mean_sd(self.foreground['mae'])} |")
        return out + ["", f"![reconstructions]({figures.get('reconstructions', '')})", ""]
