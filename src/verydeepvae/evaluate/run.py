"""One evaluation: pick the data, compute every section, write the report."""

from __future__ import annotations

import datetime
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import metrics
from ..console import bar
from ..data.nifti_load import VolumeMeta
from ..errors import UserError
from ..guidance import Guidance, as_guidance
from ..inference import TrainedModel
from ..sampling import check_temperature, describe_prior, describe_voxels, fitted_levels, iter_sample_batches
from ..scan_files import load_preprocessed
from . import compute, morphometry
from .data import EvaluationData, participant_id, select_data
from .population import DistancesSection, MemorisationSection, MorphometrySection
from .report import FIGURE_ROWS

FORMAT = "verydeepvae-evaluation-1"
TRAIN_CHUNK = 32
# a held-out volume within this RMS difference (model range) of a training volume is a copy of it:
# float64 round-off of identical volumes is about 1e-8, real neighbours differ by 1e-2 and more
COPY_RMS = 1e-4


@dataclass
class EvaluationOptions:
    """What to compute; the defaults are modest so a CPU run takes minutes at 32³."""

    num_samples: int = 32
    temperature: float | Sequence[float] = 1.0
    seed: int = 0
    batch_size: int = 4
    max_heldout: int | None = 100
    max_train: int | None = 1000
    num_pairs: int = 100
    # random real half splits the baselines (and the samples' matched subsets) are averaged over:
    # with 5, the random-CNN Fréchet ratio of one model on one held-out set of 48 ranged from 4.8 to
    # 15.8 between evaluation seeds, almost all of it the baseline's noise; with 100, 6.2 to 7.2
    # (docs/training-recipe.md)
    baseline_repeats: int = 50
    # volumes per set in the matched distances (None: half the held-out volumes). 24 with 96+
    # held-out volumes and 96+ samples reads what 48 held-out volumes read, with less noise
    set_size: int | None = None
    prior: str = "auto"  # which prior draws the coarse latents of the samples (VeryDeepVAE.sample)
    voxels: str = "auto"  # how the samples' voxels come from p(x | z) (sampling.VOXELS)
    guidance: Guidance | float = 1.0  # a conditional model's covariate guidance (guidance.py)
    counterfactual_guidance: Guidance | float | None = None  # its counterfactuals' (None: ``guidance``)
    feature_seed: int = 0
    morphometry: str = "auto"  # auto (when participants.tsv with phantom volumes is found), on, off
    feature_plugin: str | None = None
    pattern: str | None = None
    show_progress: bool | None = None
    # conditional models (evaluate/conditional.py): the held-out scans' covariates (default: the
    # run's covariates.json or a participants.tsv next to them), values per covariate, samples per
    # value (None: max(4, num_samples // condition_points)), held-out scans given counterfactuals
    covariates_file: str | None = None
    condition_points: int = 5
    condition_samples: int | None = None
    max_counterfactual: int = 8


@dataclass
class Report:
    data: dict[str, Any]
    output_dir: Path

    def summary(self) -> str:
        from .report import summary_lines

        return "\n".join(summary_lines(self.data) + [
            f"report: {self.output_dir / 'report.md'} (figures in {self.output_dir / 'figures'}), "
            f"machine-readable: {self.output_dir / 'report.json'}"])


def run_evaluation(trained: TrainedModel, data_path: str | Path | None, output_dir: str | Path,
                   options: EvaluationOptions | None = None) -> Report:
    """Compute the evaluation report and write report.json, report.md and figures/ to ``output_dir``."""
    from .report import write_report

    options = options or EvaluationOptions()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data = compute_report(trained, data_path, options)
    write_report(data["report"], data["arrays"], output_dir)
    return Report(data["report"], output_dir)


class _Laps:
    """Seconds spent on each part of the evaluation (``timings_seconds`` of the report)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.clock = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.clock, 2)
        self.clock = now

    def total(self) -> dict[str, float]:
        self.timings["total"] = round(sum(self.timings.values()), 2)
        return self.timings


def compute_report(trained: TrainedModel, data_path: str | Path | None, options: EvaluationOptions) -> dict[str, Any]:
    """Everything the report holds: ``{"report": JSON-ready dict, "arrays": volumes for the figures}``."""
    temperature = check_temperature(trained.model, options.temperature)
    lap, show = _Laps(), options.show_progress
    extractors = compute.feature_extractors(trained.resolution, options.feature_plugin, options.feature_seed,
                                            trained.device)  # first: a bad plug-in fails before any long work
    sel = select_data(trained, data_path, options.pattern, options.max_heldout, options.max_train, options.seed)
    check_set_size(options, len(sel.heldout_files))
    cache_root = _cache_root(trained)
    heldout_rows = covariates = None
    if trained.covariates is not None:  # a conditional model encodes a scan with its own covariates
        from ..conditional import scan_covariates

        heldout_rows, _ = scan_covariates(trained, sel.heldout_files, None, options.covariates_file)
        covariates = trained.covariates.encode(heldout_rows)
    heldout, metas = load_preprocessed(sel.heldout_files, trained.preprocess_settings, cache_root, show,
                                       desc="held-out volumes")
    lap("load_heldout")
    report: dict[str, Any] = {
        "format": FORMAT,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "model": _model_facts(trained),
        "data": sel.describe(),
        "options": {**{k: v for k, v in asdict(options).items() if k != "show_progress"},
                    "guidance": as_guidance(options.guidance).to_json(),
                    "counterfactual_guidance": as_guidance(options.guidance if options.counterfactual_guidance is None
                                                           else options.counterfactual_guidance).to_json()},
    }
    report["options"]["temperature"] = temperature
    recon, samples, sample_means = _model_sections(report, trained, heldout, covariates, temperature, options, lap)
    feats = _distances(report, extractors, heldout, samples, options)
    lap("distances")
    memorisation, closest = _memorisation(trained, sel, heldout, samples, feats, extractors, cache_root, options,
                                          show)
    report["memorisation"] = memorisation.to_json()
    lap("memorisation")
    morph, tables = _morphometry_if_enabled(trained, sel, heldout, metas, samples, options)
    report["morphometry"] = morph.to_json()
    lap("morphometry")
    conditional_arrays = None
    if trained.covariates is not None:
        conditional, conditional_arrays = _conditional(trained, heldout, heldout_rows, tables, temperature, options,
                                                       sel.heldout_files, sel.participants)
        report["conditional"] = conditional.to_json()
        lap("conditional")
    report["timings_seconds"] = lap.total()
    report["software"] = _software()
    arrays = {"samples": samples, "sample_means": sample_means, "heldout": heldout, "recon": recon,
              "closest": closest, "tables": tables,
              "conditional": conditional_arrays,
              "heldout_names": [participant_id(f) for f in sel.heldout_files]}
    return {"report": report, "arrays": arrays}


def check_set_size(options: EvaluationOptions, num_heldout: int | None = None) -> None:
    """--set-size must leave two disjoint real sets and be matched by as many samples (else the
    sample distance would carry a larger small-set bias than the baseline it is divided by).
    Without ``num_heldout`` (before the data is selected) only the samples' bound is checked."""
    size = options.set_size
    if size is None:
        return
    if num_heldout is None:
        if not 2 <= size <= options.num_samples:
            raise UserError(f"--set-size must be 2 to --num ({options.num_samples}), got {size}")
    elif not 2 <= size <= min(num_heldout // 2, options.num_samples):
        raise UserError(f"--set-size {size} needs 2 to {min(num_heldout // 2, options.num_samples)} here: at most "
                        f"half the {num_heldout} held-out volumes and at most the {options.num_samples} samples")


def _model_sections(report: dict[str, Any], trained: TrainedModel, heldout: np.ndarray,
                    covariates: np.ndarray | None, temperature: Any, options: EvaluationOptions,
                    lap: _Laps) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Likelihood, reconstruction, samples, diversity and texture into ``report``; returns the
    reconstructions and the samples, (N, R, R, R) each in the model range [0, 1], and, when the
    samples' voxels are drawn, the mean of p(x | z) of the first :data:`FIGURE_ROWS` (for the
    figure; else empty)."""
    show = options.show_progress
    report["likelihood"] = compute.likelihood_section(trained, heldout, options.batch_size, options.seed, show,
                                                      covariates).to_json()
    lap("likelihood")
    reconstruction, recon = compute.reconstruction_section(trained, heldout, options.batch_size, show, covariates)
    report["reconstruction"] = reconstruction.to_json()
    lap("reconstruction")
    chunks, means = [], []
    for batch in iter_sample_batches(trained.model, options.num_samples, temperature, options.seed,
                                     options.batch_size, trained.device, show, prior=options.prior,
                                     voxels=options.voxels, means=True):
        chunks.append(batch.volumes)
        if batch.means is not None:
            means.extend(batch.means[:FIGURE_ROWS - len(means)])
    samples = np.concatenate(chunks)
    voxels = describe_voxels(trained.model, options.voxels)
    report["samples"] = {"num": len(samples), "temperature": temperature, "seed": options.seed,
                         "batch_size": options.batch_size, "prior": describe_prior(trained.model, options.prior),
                         "prior_levels": fitted_levels(trained.model, options.prior),
                         "voxels": voxels, "note": f"prior samples, output = {voxels}; the same seed, "
                                                   "temperature and batch size give the same volumes"}
    lap("sampling")
    report["diversity"] = compute.diversity_section(samples, heldout, options.num_pairs, options.seed).to_json()
    lap("diversity")
    report["texture"] = compute.texture_section(samples, heldout).to_json()
    lap("texture")
    return recon, samples, means


def _distances(report: dict[str, Any], extractors, heldout: np.ndarray, samples: np.ndarray,
               options: EvaluationOptions) -> dict[str, dict[str, np.ndarray]]:
    """The distances section into ``report``; returns each extractor's features (real, samples)."""
    feats: dict[str, dict[str, np.ndarray]] = {}
    by_features = {}
    for name, (fn, info) in extractors.items():
        feats[name] = {"real": np.asarray(fn(heldout), dtype=np.float64),
                       "samples": np.asarray(fn(samples), dtype=np.float64)}
        by_features[name] = {"features": info, **compute.distance_section(
            feats[name]["samples"], feats[name]["real"], options.seed, options.baseline_repeats, options.set_size)}
    report["distances"] = DistancesSection(by_features).to_json()
    return feats


def _conditional(trained: TrainedModel, heldout: np.ndarray, heldout_rows, tables, temperature: Any,
                 options: EvaluationOptions, heldout_files, participants):
    from .conditional import conditional_section
    from .phantom_truth import phantom_rows

    # participants.tsv was read with the held-out files (EvaluationData.participants): no second read
    truth_rows = phantom_rows(heldout_files, participants) if tables and participants is not None else None
    per_point = options.condition_samples or max(4, options.num_samples // max(1, options.condition_points))
    return conditional_section(trained, heldout, heldout_rows, tables["real"] if tables else None, temperature,
                               options.seed, options.batch_size, options.condition_points, per_point,
                               options.max_counterfactual, options.show_progress, options.guidance,
                               options.counterfactual_guidance, truth_rows)


def _morphometry_if_enabled(trained: TrainedModel, sel: EvaluationData, heldout: np.ndarray,
                            metas: list[VolumeMeta], samples: np.ndarray,
                            options: EvaluationOptions) -> tuple[MorphometrySection, dict[str, Any] | None]:
    enabled = options.morphometry == "on" or (options.morphometry == "auto" and sel.participants is not None)
    if enabled:
        return _morphometry(trained, sel, heldout, metas, samples, options)
    why = "off (--morphometry off)" if options.morphometry == "off" else \
        "no participants.tsv with phantom volumes next to the held-out files (use --morphometry on for FLAIR data)"
    return MorphometrySection(skipped=why), None


def _cache_root(trained: TrainedModel) -> Path | None:
    cfg = trained.config
    if getattr(cfg, "cache_dir", None):
        return Path(cfg.cache_dir).expanduser()
    root = trained.run_dir / "cache"
    return root if root.is_dir() else None


def _model_facts(trained: TrainedModel) -> dict[str, Any]:
    model, cfg = trained.model, trained.config
    return {
        **trained.record(), "resolution": model.resolution, "voxel_size_mm": trained.voxel_size_mm,
        "parameters": int(sum(p.numel() for p in model.parameters())), "latent_layers": model.num_layers,
        "latent_dimensions": int(model.latent_dimensions()), "likelihood": cfg.likelihood,
        "discrete_likelihood": bool(model.likelihood.is_discrete), "device": trained.device,
        "conditioned_on": trained.covariates.names if trained.covariates is not None else None,
    }


def _memorisation(trained: TrainedModel, sel: EvaluationData, heldout: np.ndarray, samples: np.ndarray,
                  feats: dict[str, dict[str, np.ndarray]], extractors, cache_root: Path | None,
                  options: EvaluationOptions, show: bool | None) -> tuple[MemorisationSection, Any]:
    if not sel.train_files:
        return MemorisationSection(skipped="no training files known (" + sel.train_rule + ")"), None
    cnn = extractors["random_cnn"][0]
    real_cnn = feats["random_cnn"]["real"]
    queries_vox = {"samples": samples.reshape(len(samples), -1), "heldout": heldout.reshape(len(heldout), -1)}
    z = metrics.pooled_standardiser(real_cnn, feats["random_cnn"]["samples"])
    queries_cnn = {"samples": z(feats["random_cnn"]["samples"]), "heldout": z(real_cnn)}
    near_vox, near_cnn = compute.RunningNearest(queries_vox), compute.RunningNearest(queries_cnn)
    for start in bar(range(0, len(sel.train_files), TRAIN_CHUNK), desc="training volumes", unit="chunk",
                     show=show):
        vols, _ = load_preprocessed(sel.train_files[start:start + TRAIN_CHUNK], trained.preprocess_settings,
                                    cache_root, show_progress=False)
        near_vox.update(start, vols.reshape(len(vols), -1))
        near_cnn.update(start, z(cnn(vols)))
    voxels = heldout[0].size
    spaces = {
        "voxels": compute.memorisation_entry(near_vox.distances["samples"], near_vox.distances["heldout"], "voxels",
                                             f"L2 norm over the {voxels} voxels (model range)"),
        "random_cnn": compute.memorisation_entry(near_cnn.distances["samples"], near_cnn.distances["heldout"],
                                                 "random-3D-CNN features", "L2, features standardised with the "
                                                 "pooled held-out + sample statistics"),
    }
    copies = [{"heldout_file": sel.heldout_files[i], "training_file": sel.train_files[near_vox.indices["heldout"][i]]}
              for i in np.flatnonzero(near_vox.distances["heldout"] / np.sqrt(voxels) < COPY_RMS)]
    order = np.argsort(near_vox.distances["samples"])[:4]
    nearest_idx = near_vox.indices["samples"][order]
    nearest_files = [sel.train_files[i] for i in nearest_idx]
    nearest_vols, _ = load_preprocessed(nearest_files, trained.preprocess_settings, cache_root, show_progress=False)
    section = MemorisationSection(
        train_rule=sel.train_rule, num_train=len(sel.train_files),
        method="distance of each sample to its nearest training volume, beside the same for held-out real "
               "volumes (never trained on); median_ratio well below 1 or many samples below the held-out 5th "
               "percentile suggest copying",
        spaces=spaces,
        closest_samples=[{"sample": int(s), "distance": float(near_vox.distances["samples"][s]),
                          "nearest_training_file": f} for s, f in zip(order, nearest_files)],
        heldout_copies=copies)
    return section, {"samples": samples[order], "train": nearest_vols, "order": order.tolist(),
                     "distances": near_vox.distances["samples"][order].tolist()}


def _morphometry(trained: TrainedModel, sel: EvaluationData, heldout: np.ndarray, metas: list[VolumeMeta],
                 samples: np.ndarray, options: EvaluationOptions) -> tuple[MorphometrySection, dict[str, Any]]:
    vox = trained.voxel_size_mm
    real = morphometry.volume_table(heldout, vox)
    gen = morphometry.volume_table(samples, vox)
    section = MorphometrySection(
        method="partial-volume tissue fractions of FLAIR-like intensities normalised to the volume's own "
               "white-matter level (metrics.tissue.flair_partial_volumes, fitted to and validated against the "
               "phantom's true fractions, docs/morphometry.md); ventricles = deep CSF",
        units=f"ml on the model grid at the training median voxel size ({vox:.3f} mm), for samples and real "
              "volumes alike (preprocessing fits every brain to the cube, so absolute head size is normalised)",
        labels=morphometry.LABELS,
        comparison=morphometry.wasserstein_with_baseline(gen, real, options.seed, options.baseline_repeats,
                                                            options.set_size),
        real={k: v.tolist() for k, v in real.items()}, samples={k: v.tolist() for k, v in gen.items()})
    tables = {"real": real, "samples": gen}
    if sel.participants is not None:
        pairs = [(i, sel.participants[participant_id(f)]) for i, f in enumerate(sel.heldout_files)
                 if participant_id(f) in sel.participants]
        idx = [i for i, _ in pairs]
        physical = morphometry.volume_table(heldout[idx], [metas[i]["voxel_size_mm"] for i in idx])
        recorded = {k: np.array([float(row[c]) for _, row in pairs]) for k, c in morphometry.RECORDED.items()}
        section.estimator_check = {
            "what": "estimates from the preprocessed held-out volumes (each at its own voxel size, physical ml) "
                    "against the volumes recorded in participants.tsv when the phantoms were generated",
            "participants_file": sel.participants_file, "num_volumes": len(idx),
            "features": morphometry.recovery(physical, recorded),
        }
        tables["check"] = {"estimated": physical, "recorded": recorded}
    return section, tables


def _software() -> dict[str, str]:
    import torch

    from .. import __version__

    return {"verydeepvae": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}
