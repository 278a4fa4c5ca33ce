"""The report's texture section: voxel-to-voxel roughness and fine correlation of the samples beside
the real volumes' (``metrics/texture.py``).  Like ``population.py``: its JSON form and how it reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

from ..json_types import JSONObject
from .text import num


class TextureSpread(TypedDict):
    """One texture statistic over a set of volumes: median and 10th-90th percentile."""

    median: float
    p10: float
    p90: float


class TextureOfSet(TypedDict):
    """metrics.texture_statistics summarised over one set of volumes (those with an interior)."""

    num_volumes: int
    roughness: TextureSpread
    fine_correlation: TextureSpread


TEXTURE_NOTE = (
    "Texture inside the brain (voxels above 0.05, holes filled, eroded by 2 voxels): roughness = mean absolute "
    "difference between face neighbours (model intensity); fine correlation = correlation between face neighbours "
    "of the volume minus its 1-voxel Gaussian blur. Independent grain (voxels drawn from p(x | z)) gives a fine "
    "correlation near 0, often with more roughness than real volumes have; a smooth output (the mean of p(x | z)) "
    "low roughness and a high fine correlation; the goal is to match the real volumes on both")


@dataclass
class TextureSection:
    """Texture of samples and of real volumes (metrics/texture.py); None: no volume with an interior."""

    what: str
    samples: TextureOfSet | None
    real: TextureOfSet | None

    def to_json(self) -> JSONObject:
        return dict(vars(self))

    @classmethod
    def from_json(cls, data: JSONObject | None) -> TextureSection:
        data = data or {}  # reports written before the section existed
        return cls(data.get("what", ""), data.get("samples"), data.get("real"))

    @property
    def measured(self) -> bool:
        return bool(self.samples and self.real)

    @staticmethod
    def _median(of: TextureOfSet, name: str) -> str:
        return num(of[name]["median"], 3)

    def summary_rows(self) -> list[str]:
        if not self.measured:
            return []
        s, r, m = self.samples, self.real, self._median
        return [f"| texture: roughness / fine correlation (medians) | {m(s, 'roughness')} / "
                f"{m(s, 'fine_correlation')} | {m(r, 'roughness')} / {m(r, 'fine_correlation')} real |"]

    def console_lines(self) -> list[str]:
        if not self.measured:
            return []
        s, r, m = self.samples, self.real, self._median
        return [f"texture (samples vs real): roughness {m(s, 'roughness')} vs {m(r, 'roughness')}, "
                f"fine correlation {m(s, 'fine_correlation')} vs {m(r, 'fine_correlation')}"]

    def markdown(self) -> list[str]:
        if not self.measured:
            return []
        out = [self.what + ".", "", "| volumes | n | roughness, median (10th-90th percentile) | "
               "fine correlation, median (10th-90th percentile) |", "|---|---|---|---|"]
        for name, e in (("samples", self.samples), ("real", self.real)):
            cells = [f"{num(e[k]['median'], 3)} ({num(e[k]['p10'], 3)}-{num(e[k]['p90'], 3)})"
                     for k in ("roughness", "fine_correlation")]
            out.append(f"| {name} | {e['num_volumes']} | {cells[0]} | {cells[1]} |")
        return out + [""]
