"""The report's sections that compare the population of samples with real volumes: diversity,
feature distances, memorisation and tissue volumes (texture: ``texture_section.py``).  Like
``sections.py``: a small dataclass per section with its JSON form (the keys ``report.json`` has
always had) and how it reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

from ..json_types import JSONObject
from .text import num


def spread_text(spread: list[float] | None) -> str:
    """A distance ratio's 10th-90th percentile over splits as ``low-high``, or ``n/a``."""
    return f"{num(spread[0], 3)}-{num(spread[1], 3)}" if spread else "n/a"


DISTANCES_NOTE = (
    "Each distance is computed on features z-scored with the pooled (held-out real + sample) statistics, between "
    "a random subset of samples and one random half of the real set, beside the same distance between "
    "the two real halves (sampling noise alone), averaged over random splits; the full-set value is also "
    "given. These use no downloaded weights and are **not FID**: the numbers are comparable only with "
    "figures computed by the same extractor and set sizes. The ratio split by split (10th-90th percentile) shows how far "
    "one split's reading strays: two models whose ratios lie inside each other's range are not told apart.")


class MsSsimSettings(TypedDict):
    """metrics.MSSSIMSettings.to_dict: how MS-SSIM was computed for volumes of this shape."""

    volume_shape: list[int]
    num_scales: int
    weights: list[float]
    kernel_size: int
    kernel_sigma: float
    data_range: float
    note: str


class PairwiseMsSsim(TypedDict):
    """metrics.pairwise_ms_ssim: MS-SSIM over random pairs of one set of volumes."""

    mean: float
    std: float
    num_pairs: int
    num_volumes: int
    seed: int
    settings: MsSsimSettings


class FeatureDescription(TypedDict, total=False):
    """A feature extractor as the report names it (random_cnn also gives seed, input_size, channels)."""

    kind: str  # "random_cnn", "intensity" or "plugin"
    label: str
    note: str
    dim: int
    seed: int
    input_size: int
    channels: list[int]
    spec: str  # a plug-in's module:callable


class Distance(TypedDict, total=False):
    """One distance between sample and real features (metrics.matched_to_baseline and the full-set value)."""

    definition: str
    samples_vs_real: float  # all samples against all real volumes (2 or more of each)
    real_vs_real: float  # the baseline: two random halves of the real set (4 or more real volumes)
    set_size: int
    repeats: int
    samples_vs_real_half: float
    ratio_to_baseline: float | None
    ratio_spread: list[float]  # 10th and 90th percentile of the ratio split by split


class FeatureDistances(TypedDict):
    """evaluate.compute.distance_section under the extractor's description."""

    features: FeatureDescription
    num_samples: int
    num_real: int
    standardisation: str
    frechet: Distance
    mmd: Distance


class NearestTraining(TypedDict, total=False):
    """compute.memorisation_entry: metrics.memorisation_summary in one space, with the distances."""

    space: str
    unit: str
    num_samples: int
    num_heldout: int
    median_sample: float
    median_heldout: float
    median_ratio: float
    heldout_p5: float
    fraction_below_p5: float
    min_sample: float
    min_heldout: float
    mannwhitney_p: float
    sample_distances: list[float]
    heldout_distances: list[float]


class ClosestSample(TypedDict):
    sample: int
    distance: float
    nearest_training_file: str


class TissueComparison(TypedDict, total=False):
    """One tissue's volumes, samples against real (morphometry.wasserstein_with_baseline); the half-set
    figures need 4 or more real volumes."""

    samples_vs_real_ml: float
    samples_vs_real_in_real_sd: float
    real_mean_ml: float
    real_sd_ml: float
    samples_mean_ml: float
    samples_sd_ml: float
    samples_vs_real_half_ml: float
    real_vs_real_half_ml: float


class WassersteinComparison(TypedDict, total=False):
    features: dict[str, TissueComparison]
    set_size: int  # the half-set size, with 4 or more real volumes


class Recovery(TypedDict):
    """morphometry.recovery: the estimator against one recorded volume."""

    pearson_r: float
    mean_estimate_ml: float
    mean_recorded_ml: float
    ratio: float
    recorded_column: str


class EstimatorCheck(TypedDict):
    what: str
    participants_file: str
    num_volumes: int
    features: dict[str, Recovery]


@dataclass
class DiversitySection:
    """Mean 3D MS-SSIM between random pairs of samples and of real volumes (None: fewer than 2)."""

    what: str
    samples: PairwiseMsSsim | None
    real: PairwiseMsSsim | None
    settings: MsSsimSettings | None

    def to_json(self) -> JSONObject:
        return dict(vars(self))

    @classmethod
    def from_json(cls, data: JSONObject) -> DiversitySection:
        return cls(data["what"], data.get("samples"), data.get("real"), data.get("settings"))

    @property
    def measured(self) -> bool:
        return bool(self.samples and self.real)

    def summary_rows(self) -> list[str]:
        if not self.measured:
            return []
        return [f"| 3D MS-SSIM between pairs (diversity) | {num(self.samples['mean'])} | "
                f"{num(self.real['mean'])} between real pairs |"]

    def console_lines(self) -> list[str]:
        if not self.measured:
            return []
        return [f"MS-SSIM between pairs: samples {num(self.samples['mean'])}, real {num(self.real['mean'])}"]

    def markdown(self) -> list[str]:
        if not self.measured:
            return []
        st = self.settings
        out = ["| pairs of | mean MS-SSIM | std | pairs |", "|---|---|---|---|"]
        for name, e in (("samples", self.samples), ("real", self.real)):
            out.append(f"| {name} | {num(e['mean'])} | {num(e['std'])} | {e['num_pairs']} |")
        return out + ["", f"Settings for {'×'.join(map(str, st['volume_shape']))} volumes: {st['num_scales']} scales, "
                          f"{st['kernel_size']}-voxel Gaussian window (sigma {st['kernel_sigma']}), weights "
                          f"{', '.join(num(w) for w in st['weights'])}: {st['note']}.", ""]


@dataclass
class DistancesSection:
    """Fréchet distance and MMD between sample and real features, per feature extractor (name ->
    its description under ``features`` and the two distances beside their real-vs-real baselines)."""

    by_features: dict[str, FeatureDistances]

    KINDS = (("frechet", "Fréchet"), ("mmd", "MMD²"))

    def to_json(self) -> JSONObject:
        return dict(self.by_features)

    @classmethod
    def from_json(cls, data: JSONObject) -> DistancesSection:
        return cls(dict(data))

    def summary_rows(self) -> list[str]:
        rows = []
        for entry in self.by_features.values():
            for key, what in (("frechet", "Fréchet distance"), ("mmd", "MMD²")):
                e = entry[key]
                if "samples_vs_real_half" in e:
                    rows.append(f"| {what} on {entry['features']['label']} (sets of {e['set_size']}) | "
                                f"{num(e['samples_vs_real_half'])} | {num(e['real_vs_real'])} real vs real |")
        return rows

    def console_lines(self) -> list[str]:
        lines = []
        for entry in self.by_features.values():
            fr = entry["frechet"]
            if "samples_vs_real_half" in fr:
                spread = f"; ratio {spread_text(fr['ratio_spread'])} in 80 % of splits" if "ratio_spread" in fr else ""
                lines.append(f"Fréchet distance on {entry['features']['label']}: samples "
                             f"{num(fr['samples_vs_real_half'])} vs real-vs-real {num(fr['real_vs_real'])} "
                             f"(sets of {fr['set_size']}{spread})")
        return lines

    def markdown(self) -> list[str]:
        out = ["## Distances between sample and real populations", "", DISTANCES_NOTE, "",
               "| features | distance | samples vs real (half sets) | real vs real | ratio | ratio, 10th-90th percentile "
               "over splits | samples vs real (all) |",
               "|---|---|---|---|---|---|---|"]
        for entry in self.by_features.values():
            for key, what in self.KINDS:
                e = entry[key]
                out.append(f"| {entry['features']['label']} | {what} | {num(e.get('samples_vs_real_half'))} | "
                           f"{num(e.get('real_vs_real'))} | {num(e.get('ratio_to_baseline'), 3)} | "
                           f"{spread_text(e.get('ratio_spread'))} | {num(e.get('samples_vs_real'))} |")
        out.append("")
        for entry in self.by_features.values():
            f = entry["features"]
            out.append(f"- **{f['label']}**: {f.get('note', '')}" + (f" (seed {f['seed']}, input {f['input_size']}³, "
                       f"channels {f['channels']}, {f['dim']} features)" if f["kind"] == "random_cnn" else ""))
        first = next(iter(self.by_features.values()))
        return out + [f"- Fréchet: {first['frechet']['definition']}. MMD: {first['mmd']['definition']}.", ""]


@dataclass
class MemorisationSection:
    """Each sample's distance to its nearest training volume beside held-out volumes' (in voxels and
    in random-CNN feature space), or why the check was skipped."""

    skipped: str | None = None
    train_rule: str = ""
    num_train: int = 0
    method: str = ""
    spaces: dict[str, NearestTraining] = field(default_factory=dict)  # "voxels", "random_cnn"
    closest_samples: list[ClosestSample] = field(default_factory=list)
    # held-out volumes whose content equals a training volume's (other file names, same voxels):
    # {"heldout_file", "training_file"}; every held-out reading is then partly a training reading
    heldout_copies: list[dict[str, str]] = field(default_factory=list)

    SPACES = ("voxels", "random_cnn")

    def to_json(self) -> JSONObject:
        if self.skipped is not None:
            return {"skipped": self.skipped}
        return {"train_rule": self.train_rule, "num_train": self.num_train, "method": self.method, **self.spaces,
                "closest_samples": self.closest_samples, "heldout_copies": self.heldout_copies}

    @classmethod
    def from_json(cls, data: JSONObject) -> MemorisationSection:
        if "skipped" in data:
            return cls(skipped=data["skipped"])
        return cls(None, data["train_rule"], data["num_train"], data["method"],
                   {k: data[k] for k in cls.SPACES}, data.get("closest_samples", []), data.get("heldout_copies", []))

    def copies_warning(self) -> str | None:
        """One line when held-out volumes duplicate training volumes, else None."""
        if not self.heldout_copies:
            return None
        first = self.heldout_copies[0]
        num_heldout = len(self.spaces["voxels"]["heldout_distances"])
        return (f"warning: {len(self.heldout_copies)} of the {num_heldout} held-out volumes are copies of training "
                f"volumes (e.g. {_short(first['heldout_file'])} = {_short(first['training_file'])}), so the "
                "held-out readings are partly training readings; a phantom population made with the training "
                "seed repeats its subjects")

    def summary_rows(self) -> list[str]:
        if self.skipped is not None:
            return []
        warning = self.copies_warning()
        return ["| nearest-training distance, median sample / median held-out (voxels) | "
                f"{num(self.spaces['voxels']['median_ratio'])} | "
                + (f"**{warning}** |" if warning else "1 = as novel as unseen real brains |")]

    def console_lines(self) -> list[str]:
        if self.skipped is not None:
            return []
        warning = self.copies_warning()
        return ["memorisation: median nearest-training distance ratio samples/held-out "
                f"{num(self.spaces['voxels']['median_ratio'])} (voxels), "
                f"{num(self.spaces['random_cnn']['median_ratio'])} (features)"] + ([warning] if warning else [])

    def markdown(self, figures: dict[str, str]) -> list[str]:
        out = ["## Memorisation", ""]
        if self.skipped is not None:
            return out + [f"Skipped: {self.skipped}.", ""]
        warning = self.copies_warning()
        if warning:
            out += [f"**{warning[0].upper() + warning[1:]}.**", ""]
        out += [self.method + f". Training set: {self.num_train} volumes ({self.train_rule}).", "",
                "| space | median sample→train | median held-out→train | ratio | held-out 5th pct | "
                "samples below it | Mann-Whitney p (samples closer) |", "|---|---|---|---|---|---|---|"]
        for key in self.SPACES:
            e = self.spaces[key]
            out.append(f"| {e['space']} | {num(e['median_sample'])} | {num(e['median_heldout'])} | "
                       f"{num(e['median_ratio'], 3)} | {num(e['heldout_p5'])} | {num(e['fraction_below_p5'], 3)} | "
                       f"{num(e['mannwhitney_p'], 3)} |")
        return out + ["", f"![nearest training distances]({figures.get('nearest_training', '')})",
                      f"![closest samples]({figures.get('closest_samples', '')})", ""]


def _short(path: str) -> str:
    """A file named with its folder (held-out and training copies often share a file name)."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}"


@dataclass
class MorphometrySection:
    """Estimated tissue volumes (ml) of samples and real volumes with Wasserstein distances, and the
    estimator checked against recorded volumes; or why it was skipped."""

    skipped: str | None = None
    method: str = ""
    units: str = ""
    labels: dict[str, str] = field(default_factory=dict)  # tissue key -> its name
    comparison: WassersteinComparison = field(default_factory=dict)
    real: dict[str, list[float]] = field(default_factory=dict)  # ml per volume, per tissue
    samples: dict[str, list[float]] = field(default_factory=dict)
    estimator_check: EstimatorCheck | None = None

    def to_json(self) -> JSONObject:
        if self.skipped is not None:
            return {"skipped": self.skipped}
        out = {"method": self.method, "units": self.units, "labels": self.labels, "comparison": self.comparison,
               "real": self.real, "samples": self.samples}
        if self.estimator_check is not None:
            out["estimator_check"] = self.estimator_check
        return out

    @classmethod
    def from_json(cls, data: JSONObject) -> MorphometrySection:
        if "skipped" in data:
            return cls(skipped=data["skipped"])
        return cls(None, data["method"], data["units"], data["labels"], data["comparison"], data["real"],
                   data["samples"], data.get("estimator_check"))

    def summary_rows(self) -> list[str]:
        if self.skipped is not None:
            return []
        return [f"| W1 distance, {self.labels[k]} volume (ml) | {num(e['samples_vs_real_half_ml'])} | "
                f"{num(e['real_vs_real_half_ml'])} real vs real |"
                for k, e in self.comparison["features"].items() if "samples_vs_real_half_ml" in e]

    def markdown(self, figures: dict[str, str]) -> list[str]:
        out = ["## Tissue volumes", ""]
        if self.skipped is not None:
            return out + [f"Skipped: {self.skipped}.", ""]
        out += [f"Method: {self.method}. Units: {self.units}.", "",
                "| volume | real mean ± sd (ml) | samples mean ± sd (ml) | W1 samples vs real (half sets) | "
                "W1 real vs real | W1 all samples vs all real (in real sd) |", "|---|---|---|---|---|---|"]
        for k, e in self.comparison["features"].items():
            out.append(f"| {self.labels[k]} | {num(e['real_mean_ml'])} ± {num(e['real_sd_ml'], 3)} | "
                       f"{num(e['samples_mean_ml'])} ± {num(e['samples_sd_ml'], 3)} | "
                       f"{num(e.get('samples_vs_real_half_ml'))} | {num(e.get('real_vs_real_half_ml'))} | "
                       f"{num(e['samples_vs_real_in_real_sd'], 3)} |")
        out += ["", f"![tissue volumes]({figures.get('tissue_volumes', '')})", ""]
        check = self.estimator_check
        if check:
            out += [f"Estimator check ({check['num_volumes']} volumes, `{check['participants_file']}`): "
                    f"{check['what']}.", "", "| volume | Pearson r | mean estimate (ml) | mean recorded (ml) |",
                    "|---|---|---|---|"]
            for k, e in check["features"].items():
                out.append(f"| {self.labels[k]} | {num(e['pearson_r'], 3)} | {num(e['mean_estimate_ml'])} | "
                           f"{num(e['mean_recorded_ml'])} |")
            out += ["", f"![estimator check]({figures.get('estimator_check', '')})", ""]
        return out
