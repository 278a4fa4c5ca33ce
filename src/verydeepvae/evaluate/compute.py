"""The report's sections, each a function from volumes (and the model) to a JSON-ready dict.

Volumes are float32 arrays (N, R, R, R) in the model range [0, 1]; ``heldout`` are preprocessed
held-out real volumes, ``samples`` prior samples.  Every distance between sample and real
populations is reported beside the same distance between two random halves of the real set
(``real_vs_real``), with the samples subsampled to the same half size (``samples_vs_real_half``),
so that set-size effects cancel in the comparison.
"""

from __future__ import annotations

import importlib
from typing import Callable

import numpy as np
import torch

from .. import metrics as M
from ..console import bar
from ..errors import UserError
from ..inference import BACKGROUND_LEVEL, LN2, TrainedModel, elbo_terms
from ..json_types import JSONObject
from .population import Distance, DiversitySection, FeatureDescription, NearestTraining
from .sections import LikelihoodSection, ReconstructionSection, Stats
from .texture_section import TEXTURE_NOTE, TextureSection

ACTIVE_THRESHOLD = M.ACTIVE_THRESHOLD


# --- likelihood, KL per layer, active units -------------------------------------------------------


def likelihood_section(trained: TrainedModel, heldout: np.ndarray, batch_size: int, seed: int,
                       show_progress: bool | None, covariates: np.ndarray | None = None) -> LikelihoodSection:
    """Negative ELBO (nats and bits per voxel), its terms, KL per latent layer and active units
    (``covariates`` (N, dim): the held-out volumes' own, for a conditional model)."""
    model, device = trained.model, trained.device
    elbo, nll, kl = [], [], []
    # float64 running moments; float32 for models with very many latent units (128³ presets), to bound memory
    dtype = torch.float64 if model.latent_dimensions() <= 20_000_000 else torch.float32
    stats = [M.RunningVariance(dtype) for _ in range(model.num_layers)]
    for start in bar(range(0, len(heldout), batch_size), desc="likelihood", unit="batch", show=show_progress):
        x = torch.from_numpy(heldout[start:start + batch_size])[:, None].to(device)
        c = _batch_covariates(covariates, start, batch_size, device)
        terms = elbo_terms(model, x, seed + start, covariates=c)
        elbo.append(terms["elbo"])
        nll.append(terms["nll"])
        kl.append(terms["kl_per_layer"])
        for s, z in zip(stats, model.encode(x, covariates=c)):
            s.update(z.cpu())
    elbo, nll, kl = np.concatenate(elbo), np.concatenate(nll), np.concatenate(kl)
    n = len(elbo)
    voxels = model.resolution ** 3
    discrete = bool(model.likelihood.is_discrete)
    layers = []
    for i, (level, shape) in enumerate(zip(model.layer_levels, model.latent_shapes())):
        layers.append({
            "index": i, "level": level, "resolution": model.resolution >> level, "shape": list(shape),
            "kl_nats_per_voxel": float(kl[:, i].mean()), "kl_bits_per_voxel": float(kl[:, i].mean() / LN2),
            "kl_nats_total": float(kl[:, i].mean() * voxels),
        })
    units = None
    if n >= 2:
        names = [f"{i:02d} ({model.resolution >> model.layer_levels[i]}³)" for i in range(len(stats))]
        units = M.active_units_from_variances([s.variance() for s in stats], n, names, ACTIVE_THRESHOLD)
        for layer, counted in zip(layers, units["per_layer"]):
            layer["active_units"], layer["units"] = counted["active"], counted["units"]
        units["definition"] = ("a unit is active when the variance over held-out volumes of its posterior mean "
                               f"exceeds {ACTIVE_THRESHOLD} (Burda et al. 2016); posterior means from one pass "
                               "with every layer at its posterior mean")
    if discrete:
        statement = (f"The output likelihood is a discretised logistic over {model.likelihood.num_bins} intensity "
                     "bins, so the negative ELBO is a true code length: an upper bound on -log2 P(x) of the "
                     "quantised volume, achievable with bits-back coding; it is >= 0 and comparable with "
                     "VDVAE-style bits/dim figures at the same quantisation.")
    else:
        statement = ("The output likelihood is a continuous Gaussian density: the negative ELBO in bits/voxel is a "
                     "differential quantity, can be negative, is not a code length and is not comparable with "
                     "discrete (bits/dim) figures.")
    return LikelihoodSection(
        num_volumes=n, discrete=discrete, statement=statement,
        estimator="one posterior sample per volume (seeded); the negative ELBO bounds the negative "
                  "log-likelihood from above",
        elbo_nats_per_voxel=Stats.of(elbo), elbo_bits_per_voxel=Stats.of(elbo / LN2),
        reconstruction_bits_per_voxel=Stats.of(nll / LN2), kl_bits_per_voxel=Stats.of(kl.sum(1) / LN2),
        per_volume_elbo_bits_per_voxel=(elbo / LN2).tolist(), kl_per_layer=layers, active_units=units)


# --- reconstruction -------------------------------------------------------------------------------


def reconstruction_section(trained: TrainedModel, heldout: np.ndarray, batch_size: int,
                           show_progress: bool | None, covariates: np.ndarray | None = None
                           ) -> tuple[ReconstructionSection, np.ndarray]:
    """PSNR, SSIM and MAE of posterior-mean reconstructions, whole volume and foreground only."""
    model, device = trained.model, trained.device
    recons = []
    for start in bar(range(0, len(heldout), batch_size), desc="reconstruct", unit="batch", show=show_progress):
        x = torch.from_numpy(heldout[start:start + batch_size])[:, None].to(device)
        c = _batch_covariates(covariates, start, batch_size, device)
        recons.append(model.reconstruct(x, covariates=c).float().cpu()[:, 0].numpy())
    recon = np.concatenate(recons)
    mask = heldout > BACKGROUND_LEVEL
    foreground = None
    if mask.reshape(len(mask), -1).any(axis=1).all():
        foreground = {"psnr_db": Stats.of(M.psnr(heldout, recon, mask=mask)),
                      "mae": Stats.of(M.mae(heldout, recon, mask=mask))}
    section = ReconstructionSection(
        num_volumes=len(heldout), latents="posterior mean at every layer", data_range=1.0,
        note="model intensity range [0, 1]; 'foreground' averages over voxels where the input is above "
             "background (> 0.5/255) only, so the empty background does not inflate the scores",
        psnr_db=Stats.of(M.psnr(heldout, recon)), ssim=Stats.of(M.ssim3d(heldout, recon)),
        mae=Stats.of(M.mae(heldout, recon)), foreground=foreground)
    return section, recon


# --- diversity ------------------------------------------------------------------------------------


def diversity_section(samples: np.ndarray, heldout: np.ndarray, num_pairs: int, seed: int) -> DiversitySection:
    pairs = {name: M.pairwise_ms_ssim(volumes, num_pairs=num_pairs, seed=seed) if len(volumes) >= 2 else None
             for name, volumes in (("samples", samples), ("real", heldout))}
    return DiversitySection(
        what="mean 3D MS-SSIM over random pairs of distinct volumes; lower = more diverse; the goal is to match "
             "the real value",
        samples=pairs["samples"], real=pairs["real"], settings=(pairs["samples"] or pairs["real"] or {}).get("settings"))


def texture_section(samples: np.ndarray, heldout: np.ndarray) -> TextureSection:
    """Roughness and fine correlation (metrics/texture.py) of the samples and of the held-out volumes."""
    return TextureSection(what=TEXTURE_NOTE, samples=M.texture_summary(samples), real=M.texture_summary(heldout))


# --- feature distances ----------------------------------------------------------------------------


def feature_extractors(resolution: int, plugin: str | None = None, seed: int = 0, device: str = "cpu"
                       ) -> dict[str, tuple[Callable[[np.ndarray], np.ndarray], FeatureDescription]]:
    """The feature extractors: name -> (function volumes -> (N, F), description).

    The random CNN sees volumes at min(resolution, 64)³ (upsampling a smaller volume adds nothing)."""
    cnn = M.RandomConvFeatures(seed=seed, input_size=max(16, min(64, resolution)), device=device)
    extractors = {
        "random_cnn": (cnn, {**cnn.describe(), "label": "random-3D-CNN features"}),
        "intensity": (M.intensity_features, {
            "kind": "intensity", "dim": len(M.intensity_feature_names()), "label": "intensity statistics",
            "note": "foreground fraction, moments, percentiles and a 16-bin histogram of foreground intensities, "
                    "plus the volume area-averaged to 4³ (metrics.intensity_features)"}),
    }
    if plugin:
        fn, info = load_plugin(plugin)
        extractors["plugin"] = (fn, info)
    return extractors


def load_plugin(spec: str) -> tuple[Callable[[np.ndarray], np.ndarray], FeatureDescription]:
    """``module:callable`` -> a feature function.  A class is instantiated without arguments.

    The callable receives volumes (N, R, R, R) float32 in [0, 1] and returns (N, F) features; an
    optional ``name`` attribute labels it in the report (e.g. "FID-3D (MedicalNet ResNet-50)").
    This runs code you supply; whatever it downloads or loads is its own business.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"--feature-plugin must look like module:callable, got {spec!r}")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise UserError(f"--feature-plugin {spec}: cannot be loaded ({type(error).__name__}: {error})") from None
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise UserError(f"--feature-plugin {spec} is not callable")
    name = str(getattr(obj, "name", spec))
    return obj, {"kind": "plugin", "spec": spec, "label": name, "note": "features from a user-supplied plug-in"}


def distance_section(sample_feats: np.ndarray, real_feats: np.ndarray, seed: int, repeats: int,
                     set_size: int | None = None) -> JSONObject:
    """Fréchet distance and MMD on standardised features (:func:`metrics.pooled_standardiser`): a
    ``FeatureDistances`` but for its ``features``; ``set_size`` as in :func:`metrics.matched_to_baseline`."""
    z = M.pooled_standardiser(real_feats, sample_feats)
    s, r = z(sample_feats), z(real_feats)
    out: JSONObject = {"num_samples": len(s), "num_real": len(r),
                           "standardisation": "z-scores with the pooled held-out real + sample features' mean/std"}
    fns = {"frechet": M.frechet_distance, "mmd": lambda a, b: M.mmd(a, b, kernel="rbf")}
    for name, fn in fns.items():
        entry: Distance = {}
        if len(s) >= 2 and len(r) >= 2:
            entry["samples_vs_real"] = float(fn(s, r))
        if len(r) >= 4:
            entry.update(M.matched_to_baseline(s, r, fn, seed, repeats, set_size))
        out[name] = entry
    out["frechet"]["definition"] = ("squared Fréchet distance between Gaussians fitted to the two feature sets "
                                    "(Ledoit-Wolf covariances); not FID")
    out["mmd"]["definition"] = "unbiased MMD² with an RBF kernel, median-heuristic bandwidth"
    return out


# --- memorisation ---------------------------------------------------------------------------------


class RunningNearest:
    """Nearest-neighbour distances of several query sets to a training set fed in chunks, so only
    one chunk of training volumes is in memory at a time."""

    def __init__(self, queries: dict[str, np.ndarray]):
        self.queries = queries
        self.distances = {k: np.full(len(q), np.inf) for k, q in queries.items()}
        self.indices = {k: np.zeros(len(q), dtype=np.int64) for k, q in queries.items()}

    def update(self, start: int, chunk: np.ndarray) -> None:
        """Fold in training items ``start .. start + len(chunk) - 1``."""
        for k, q in self.queries.items():
            d, idx = M.nearest_neighbour_distances(q, chunk)
            better = d < self.distances[k]
            self.distances[k][better] = d[better]
            self.indices[k][better] = idx[better] + start


def memorisation_entry(sample_d: np.ndarray, heldout_d: np.ndarray, space: str, unit: str) -> NearestTraining:
    summary = M.memorisation_summary(sample_d, heldout_d)
    return {"space": space, "unit": unit, **summary,
            "sample_distances": sample_d.tolist(), "heldout_distances": heldout_d.tolist()}


# --- helpers --------------------------------------------------------------------------------------


def _batch_covariates(covariates: np.ndarray | None, start: int, size: int, device) -> torch.Tensor | None:
    if covariates is None:
        return None
    return torch.from_numpy(np.asarray(covariates[start:start + size], dtype=np.float32)).to(device)
