"""Using a trained model: load it, sample, reconstruct (latent codes and interpolation: ``latents``).

Every function here writes NIfTI volumes whose affine matches their own voxel grid, a PNG for
people and a JSON record (seed, temperature, checkpoint...), each file atomically.

Input volumes (``reconstruct``, ``encode``, ``interpolate``, and ``evaluate``) go through exactly the
preprocessing the model was trained with (:mod:`verydeepvae.data.nifti_load`, settings from the
checkpoint's own config): RAS+ reorientation, foreground crop, isotropic resampling into the R³
cube, percentile clamp and scaling to [0, 1].  Outputs therefore live in that preprocessed frame
(the R³ grid centred on the origin, with the input's own isotropic voxel size);
``*_input.nii.gz`` is the preprocessed input on the same grid, for side-by-side viewing.  Results of
an input scan (reconstructions, decoded latents of encoded files, the two ends of an interpolation)
are also written resampled back into that scan's own space, ``*_native.nii.gz``: the scan's shape
and affine, so they overlay on it (:mod:`verydeepvae.data.native_space` inverts the geometry).

Intensities: "model" keeps the model range [0, 1]; "data" maps back to an intensity scale of the
data, ``low + v * (high - low)`` with ``low``/``high`` the percentile clamp values (the file's own
for reconstructions, the medians over the training files for samples), and voxels in the model's
lowest intensity bin (``v < 0.5/255``, background) set to 0.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from . import viz
from .atomic import write_json
from .console import bar
from .data.native_space import native_geometry, to_scan_space
from .device import resolve_device
from .errors import CheckpointError, DataError, Stopped, UserError
from .model import VeryDeepVAE
from .model.fitted_prior import FittedPrior
from .train import checkpoint as ckpt
from .volume_io import grid_affine, save_nifti

BACKGROUND_LEVEL = 0.5 / 255.0  # model intensities below this are background (the lowest of 256 bins)
LN2 = math.log(2.0)
MAX_FIGURE_ROWS = 8


# --- the model and its facts ----------------------------------------------------------------------


def load_model(checkpoint: ckpt.Checkpoint, use_ema: bool = True,
               device: str | torch.device = "cpu") -> VeryDeepVAE:
    """Rebuild the model from the checkpoint's own config and load its (EMA) weights."""
    if checkpoint.unverified_notice():
        print(f"verydeepvae: notice: {checkpoint.unverified_notice()}", file=sys.stderr)
    config = checkpoint.config
    schema = covariate_schema(checkpoint)
    model = VeryDeepVAE(config, schema.dim if schema is not None else 0)
    if schema is not None and schema.bank:  # sample() without covariates draws the training scans'
        model.set_covariate_bank(torch.from_numpy(schema.encode(schema.bank_rows())))
    model.inference_precision = config.precision  # generation in the arithmetic it was trained in
    state = checkpoint.state("ema" if use_ema else "model")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} does not match its own architecture "
            f"(missing {len(missing)} tensors, unexpected {len(unexpected)})"
        )
    prior = checkpoint.meta.get("fitted_prior") or {}
    if use_ema and prior.get("used"):  # fitted for the EMA weights, which sample (model/fitted_prior.py)
        try:
            model.fitted_prior = FittedPrior.from_tensors(checkpoint.tensors, prior)
        except (KeyError, ValueError, TypeError) as error:
            raise CheckpointError(f"checkpoint {checkpoint.path} has a damaged fitted prior ({error})") from None
    model = model.to(device).eval()
    if model.fitted_prior is not None:
        model.fitted_prior = model.fitted_prior.to(device)
    return model


def covariate_schema(checkpoint: ckpt.Checkpoint):
    """The covariate schema of a conditional model's checkpoint (data/covariates.py), else None."""
    if not checkpoint.meta.get("covariates"):
        return None
    from .data.covariates import CovariateSchema

    return CovariateSchema.from_json(checkpoint.meta["covariates"], where=f"checkpoint {checkpoint.path}")


@dataclass
class TrainedModel:
    """A model loaded from a checkpoint, with the facts needed to feed it and to write its outputs."""

    model: VeryDeepVAE
    checkpoint: ckpt.Checkpoint
    weights: str  # "ema" or "raw"
    device: str

    @property
    def config(self):
        return self.checkpoint.config

    @property
    def resolution(self) -> int:
        return self.model.resolution

    @property
    def preprocess_settings(self):
        from .data.nifti_load import PreprocessSettings

        return PreprocessSettings.from_config(self.config)

    @property
    def data_meta(self) -> dict[str, Any]:
        return dict(self.checkpoint.meta.get("data", {}) or {})

    @property
    def voxel_size_mm(self) -> float:
        """The model grid's voxel size: the median over the training volumes."""
        return float(self.data_meta.get("voxel_size_mm", 1.0))

    @property
    def covariates(self):
        """The covariate schema of a conditional model (data/covariates.py), None if unconditional."""
        return covariate_schema(self.checkpoint)

    @property
    def intensity_reference(self) -> dict[str, Any]:
        return dict(self.data_meta.get("intensity_reference", {}) or {})

    @property
    def run_dir(self) -> Path:
        """The training output folder (``<run>/checkpoints/step_X.safetensors`` -> ``<run>``)."""
        parent = self.checkpoint.path.resolve().parent
        return parent.parent if parent.name == "checkpoints" else parent

    def record(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint.path), "step": self.checkpoint.step, "weights": self.weights}


def open_trained(path: str | Path, use_ema: bool = True, device: str | None = "auto") -> TrainedModel:
    """Load a checkpoint file (or a run folder's newest checkpoint) for inference."""
    device = str(resolve_device(device))  # "cuda:1" stays "cuda:1"; "cuda" -> "cuda:0"
    checkpoint = ckpt.resolve_checkpoint(path)
    model = load_model(checkpoint, use_ema=use_ema, device=device)
    return TrainedModel(model=model, checkpoint=checkpoint, weights="ema" if use_ema else "raw", device=device)


MAX_TEMPERATURE = 10.0


def temperatures_in_range(values: Sequence[float]) -> bool:
    """Every value between 0 and MAX_TEMPERATURE (NaN is not)."""
    return all(0.0 <= float(v) <= MAX_TEMPERATURE for v in values)


def check_temperature(model: VeryDeepVAE, temperature: float | Sequence[float]) -> float | list[float]:
    """A scalar in [0, MAX_TEMPERATURE] or one such value per resolution level (highest resolution
    first)."""
    values = [temperature] if isinstance(temperature, (int, float)) else list(temperature)
    if not temperatures_in_range(values):
        raise UserError(f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {temperature}")
    if isinstance(temperature, (int, float)):
        return float(temperature)
    if len(values) == 1:
        return float(values[0])
    if len(values) != model.decoder.num_levels:
        raise UserError(f"temperature needs 1 or {model.decoder.num_levels} values (one per resolution level, "
                        f"highest first), got {len(values)}")
    return [float(v) for v in values]


def prior_level(model: VeryDeepVAE, resolution: int | None) -> int | None:
    """The decoder level m such that latents at resolutions finer than ``resolution`` (levels < m)
    come from the prior; None keeps every posterior latent."""
    if resolution is None:
        return None
    resolutions = [model.resolution >> level for level in range(model.decoder.num_levels)]
    if resolution not in resolutions:
        raise UserError(f"--prior-above must be one of the model's resolutions {resolutions}, got {resolution}")
    return resolutions.index(resolution)


# --- intensities ----------------------------------------------------------------------------------


def to_data_intensity(volume: np.ndarray, low: float, high: float) -> np.ndarray:
    """Model intensities in [0, 1] -> ``low + v * (high - low)``; background (v < 0.5/255) -> 0."""
    v = np.asarray(volume, dtype=np.float32)
    out = np.float32(low) + v * np.float32(high - low)
    out[v < BACKGROUND_LEVEL] = 0.0
    return out


def reference_range(reference: dict[str, Any], source: str) -> tuple[float, float]:
    """(low, high) of a checkpoint's intensity reference, or a UserError naming what is missing."""
    low, high = reference.get("low"), reference.get("high")
    if low is None or high is None:
        where = f"checkpoint {source}" if source else "the checkpoint"
        raise UserError(f"{where} records no intensity reference (low/high); use --intensity model")
    return float(low), float(high)


# --- inputs ---------------------------------------------------------------------------------------


def input_files(path: str | Path, pattern: str | None = None) -> list[Path]:
    """One NIfTI file, a folder of them (nested too) or a text/CSV file listing them."""
    from .data import discover

    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"input {p} does not exist (expected a NIfTI file, a folder of them or a list file)")
    if p.is_file() and discover.is_nifti_name(p.name):
        return [p.resolve()]
    return discover.discover_files(p, pattern)


def load_preprocessed(files: Sequence[str | Path], settings, cache_root: str | Path | None = None,
                      show_progress: bool | None = None, desc: str = "preprocessing"
                      ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Volumes (N, R, R, R) float32 in [0, 1] and their preprocessing metadata, exactly as training.

    With ``cache_root`` (a training run's cache), volumes already preprocessed with the same
    settings are read from it (keyed by file content); the cache is never written to here.
    """
    from .data.cache import VolumeCache, file_digest
    from .data.nifti_load import preprocess_file

    cache = VolumeCache(cache_root, settings) if cache_root is not None else None
    R = settings.resolution
    out = np.empty((len(files), R, R, R), dtype=np.float32)
    metas: list[dict[str, Any]] = []
    for i, f in enumerate(bar(list(files), desc=desc, unit="vol", show=show_progress)):
        volume = meta = None
        if cache is not None and cache.folder.is_dir():
            try:
                digest = file_digest(f)
                meta = cache.read_meta(digest)
                if meta is not None:
                    volume = cache.load(digest)
            except OSError:
                volume = meta = None
        if volume is None:
            volume, meta = preprocess_file(f, settings)
        out[i] = volume
        metas.append(meta)
    return out, metas


def output_stems(files: Sequence[str | Path]) -> list[str]:
    """File names without .nii/.nii.gz, made unique (``name``, ``name_2``...) in input order."""
    return unique_names(re.sub(r"\.nii(\.gz)?$", "", Path(f).name, flags=re.IGNORECASE) for f in files)


def unique_names(names: Iterable[str]) -> list[str]:
    """Each name, or ``name_2``, ``name_3``... when it was taken, by an earlier name or by a
    generated one (``a/sub``, ``b/sub``, ``c/sub_2`` -> ``sub``, ``sub_2``, ``sub_2_2``)."""
    taken: set[str] = set()
    result = []
    for name in names:
        candidate, count = name, 1
        while candidate in taken:
            count += 1
            candidate = f"{name}_{count}"
        taken.add(candidate)
        result.append(candidate)
    return result


def safe_file_stem(name: Any, fallback: str) -> str:
    """A name read from a file (e.g. a latents file's ``names``) made safe as an output file stem:
    data, never a path (``../../x`` and ``/abs/x`` become ``x``); ``fallback`` when nothing is left."""
    text = str(name) if isinstance(name, (str, int)) else ""
    stem = re.sub(r"[\x00-\x1f/\\]+", "_", Path(text.replace("\\", "/")).name).strip(" .")
    return stem[:200] if stem else fallback


# --- sampling -------------------------------------------------------------------------------------


def write_samples(model: VeryDeepVAE, output_dir: str | Path, num: int,
                  temperature: float | Sequence[float] = 1.0, seed: int = 0, voxel_size_mm: float = 1.0,
                  batch_size: int = 4, device: str | torch.device = "cpu", show_progress: bool = True,
                  intensity_reference: dict[str, Any] | None = None,
                  extra_record: dict | None = None, covariates: np.ndarray | None = None,
                  prior: str = "auto", guidance: float = 1.0, references: np.ndarray | None = None) -> list[Path]:
    """Draw ``num`` volumes from the prior and write ``sample_XXXX.nii.gz``, a montage and a
    ``samples.json`` record (seed, temperature, checkpoint...).  The same seed gives the same volumes;
    temperature 0 gives the prior means at every layer.  ``covariates`` (num, dim): the encoded
    covariates of each volume of a conditional model (else it draws the training scans'; the
    caller records the requested values in ``extra_record``, see ``conditional.py``).

    ``intensity_reference`` (a checkpoint's ``meta["data"]["intensity_reference"]``) maps the
    model-range intensities back to the training data's scale (see the module notes); None keeps [0, 1].
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()
    low_high = None
    if intensity_reference is not None:
        low_high = reference_range(intensity_reference, "")
    paths: list[Path] = []
    previews = []
    affine = grid_affine((model.resolution,) * 3, voxel_size_mm)
    record = {"num": num, "seed": seed, "temperature": temperature, "voxel_size_mm": voxel_size_mm,
              "prior": describe_prior(model, prior),
              "intensity": _intensity_record(low_high, "median clamp values of the training files")}
    record.update(extra_record or {})
    try:
        for start, volumes in iter_samples(model, num, temperature, seed, batch_size, device, show_progress,
                                           covariates=covariates, prior=prior, guidance=guidance,
                                           references=references):
            for i, volume in enumerate(volumes):
                if len(previews) < MAX_FIGURE_ROWS:
                    previews.append(volume)
                if low_high is not None:
                    volume = to_data_intensity(volume, *low_high)
                path = output_dir / f"sample_{start + i:04d}.nii.gz"
                save_nifti(volume, path, affine, description=f"verydeepvae sample seed {seed} T {temperature}")
                paths.append(path)
    except KeyboardInterrupt as error:  # Ctrl-C or SIGTERM (cli): the volumes written so far stay listed
        write_json(output_dir / "samples.json", {**record, "files": [p.name for p in paths], "interrupted": True})
        raise Stopped(f"interrupted after {len(paths)} of {num} volumes; {output_dir / 'samples.json'} lists the "
                      f"{len(paths)} complete ones (volumes are written atomically)",
                      exit_code=getattr(error, "exit_code", 130)) from None
    viz.save_montage(previews, output_dir / "samples.png", titles=[p.name for p in paths[: len(previews)]],
                     suptitle=f"prior samples, temperature {temperature}, seed {seed}")
    write_json(output_dir / "samples.json", {**record, "files": [p.name for p in paths]})
    return paths


def iter_samples(model: VeryDeepVAE, num: int, temperature: float | Sequence[float] = 1.0, seed: int = 0,
                 batch_size: int = 4, device: str | torch.device = "cpu", show_progress: bool | None = True,
                 covariates: np.ndarray | torch.Tensor | None = None, prior: str = "auto",
                 guidance: float = 1.0, references: np.ndarray | torch.Tensor | None = None
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(index of the first, volumes (B, R, R, R) float32 in [0, 1])`` batches of prior samples
    (``prior``: which prior draws the coarse layers; ``guidance``, ``references`` (num, dim): a
    conditional model's covariate guidance, ``conditional.Conditions``; as in ``VeryDeepVAE.sample``).

    One generator seeded with ``seed`` drives every batch, so the volumes depend only on the seed,
    the temperature and the batch size (and, for a conditional model, ``covariates`` (num, dim):
    each volume's encoded covariates; without them the model draws the training scans')."""
    model = model.to(device).eval()
    check_prior(model, prior)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    if covariates is not None:
        covariates = torch.as_tensor(np.asarray(covariates, dtype=np.float32))
    if references is not None:
        references = torch.as_tensor(np.asarray(references, dtype=np.float32))
    with bar(total=num, unit="vol", desc="sample", show=show_progress) as shown:
        for start in range(0, num, batch_size):
            count = min(batch_size, num - start)
            given = None if covariates is None else covariates[start:start + count].to(device)
            around = None if references is None else references[start:start + count].to(device)
            volumes = model.sample(count, temperature, generator=generator, covariates=given, prior=prior,
                                   guidance=guidance, reference=around).float().cpu()[:, 0].numpy()
            yield start, volumes
            shown.update(count)


def check_prior(model: VeryDeepVAE, prior: str) -> None:
    """A clear error for a ``prior`` the model cannot sample with (``VeryDeepVAE.prior_in_use``)."""
    try:
        model.prior_in_use(prior)
    except ValueError as error:
        raise UserError(str(error)) from None


def describe_prior(model: VeryDeepVAE, prior: str = "auto") -> str:
    """Which prior draws the coarse latents, for samples.json and reports."""
    check_prior(model, prior)  # the one-line error for "fitted" without one, before anything is written
    fitted = model.prior_in_use(prior)
    if fitted is None:
        return "learned prior"
    sizes = sorted({shape[-1] for shape in fitted.shapes})
    return "fitted Gaussian for the " + ", ".join(f"{s}³" for s in sizes) + " latents (model/fitted_prior.py)"


def _intensity_record(low_high: tuple[float, float] | None, what: str) -> dict[str, Any]:
    if low_high is None:
        return {"scale": "model", "note": "model intensities in [0, 1]"}
    return {"scale": "data", "low": low_high[0], "high": low_high[1],
            "mapping": f"low + v * (high - low), background (v < 0.5/255) -> 0; low/high: {what}"}


# --- reconstruction -------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int, device: str | torch.device):
    """Run a block with the global RNG seeded (for model calls without a generator argument),
    restoring the caller's RNG state afterwards."""
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


@torch.no_grad()
def elbo_terms(model: VeryDeepVAE, x01: torch.Tensor, seed: int = 0,
               covariates: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Per-volume negative ELBO, reconstruction term and per-layer KL, in nats per voxel
    (one posterior sample per volume, drawn reproducibly from ``seed``; ``covariates``: those of
    the volumes, for a conditional model)."""
    with _seeded(seed, x01.device), model.inference_autocast(x01.device):
        out = model(x01, covariates=covariates)
    return {"elbo": out.elbo.double().cpu().numpy(), "nll": out.nll.double().cpu().numpy(),
            "kl_per_layer": out.kl_per_layer.double().cpu().numpy()}


def reconstruct_files(trained: TrainedModel, files: Sequence[str | Path], output_dir: str | Path,
                      posterior_mean: bool = True, prior_above: int | None = None, temperature: float = 0.0,
                      seed: int = 0, batch_size: int = 4, intensity: str = "model",
                      show_progress: bool | None = True, covariates: np.ndarray | None = None) -> dict[str, Any]:
    """Reconstruct NIfTI files; write ``<name>_recon.nii.gz``, ``<name>_input.nii.gz`` (the
    preprocessed input), ``reconstructions.png`` and ``reconstructions.json``; return the record.

    ``posterior_mean`` uses the posterior mean at every layer, else a posterior sample (seeded).
    ``prior_above`` = r takes the latents at resolutions finer than r³ from the prior at
    ``temperature`` (the original's "progressive reconstructions"). Per file the record holds the
    negative ELBO in bits/voxel (a code length for the discretised likelihood), its reconstruction
    and KL terms, and PSNR, SSIM and MAE between the preprocessed input and the reconstruction
    (model range, data range 1). The figure shows, per input, the reconstruction and the
    reconstructions with the prior above every resolution (temperature ``temperature``).
    ``covariates`` (N, dim): each file's encoded covariates, for a conditional model.
    """
    from .metrics import mae, psnr, ssim3d

    if intensity not in ("model", "data"):
        raise UserError(f"intensity must be 'model' or 'data', got {intensity!r}")
    model, device = trained.model, trained.device
    level = prior_level(model, prior_above)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = [Path(f) for f in files]
    volumes, metas = load_preprocessed(files, trained.preprocess_settings, show_progress=show_progress)
    stems = output_stems(files)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    figure_generator = torch.Generator(device=device).manual_seed(int(seed) + 1)
    rows: list[dict[str, Any]] = []
    figure_rows: list[list[np.ndarray]] = []
    progressive_levels = list(range(1, model.decoder.num_levels))
    shown = bar(total=len(files), desc="reconstruct", unit="vol", show=show_progress)
    for start in range(0, len(files), batch_size):
        x = torch.from_numpy(volumes[start:start + batch_size])[:, None].to(device)
        c = None if covariates is None else torch.from_numpy(np.asarray(covariates[start:start + batch_size],
                                                                        dtype=np.float32)).to(device)
        terms = elbo_terms(model, x, seed + start, covariates=c)
        recon = model.reconstruct(x, prior_from_level=level, posterior_mean=posterior_mean, temperature=temperature,
                                  generator=generator, covariates=c).float().cpu()[:, 0].numpy()
        xs = x.cpu()[:, 0].numpy()
        p, s, m = (np.atleast_1d(f(xs, recon)) for f in (psnr, ssim3d, mae))
        if len(figure_rows) < MAX_FIGURE_ROWS:
            extra = [model.reconstruct(x, prior_from_level=lv, temperature=temperature, generator=figure_generator,
                                       covariates=c).float().cpu()[:, 0].numpy()
                     for lv in progressive_levels]
            for i in range(min(len(xs), MAX_FIGURE_ROWS - len(figure_rows))):
                figure_rows.append([xs[i], recon[i]] + [e[i] for e in extra])
        for i in range(len(xs)):
            k = start + i
            meta = metas[k]
            affine = grid_affine((model.resolution,) * 3, float(meta["voxel_size_mm"]))
            low_high = (float(meta["clamp_low"]), float(meta["clamp_high"])) if intensity == "data" else None
            out_recon, out_input = recon[i], xs[i]
            if low_high is not None:
                out_recon, out_input = to_data_intensity(out_recon, *low_high), to_data_intensity(out_input, *low_high)
            recon_path = output_dir / f"{stems[k]}_recon.nii.gz"
            input_path = output_dir / f"{stems[k]}_input.nii.gz"
            save_nifti(out_recon, recon_path, affine, description="verydeepvae reconstruction")
            save_nifti(out_input, input_path, affine, description="verydeepvae preprocessed input")
            native_path = write_native(recon[i], native_geometry(meta, files[k], model.resolution),
                                       output_dir / f"{stems[k]}_recon_native.nii.gz", low_high,
                                       "verydeepvae reconstruction, input scan space")
            rows.append({
                "input": str(files[k]), "reconstruction": recon_path.name, "preprocessed_input": input_path.name,
                "reconstruction_native": native_path.name,
                "voxel_size_mm": float(meta["voxel_size_mm"]),
                "elbo_bits_per_voxel": float(terms["elbo"][i] / LN2),
                "nll_bits_per_voxel": float(terms["nll"][i] / LN2),
                "kl_bits_per_voxel": float(terms["kl_per_layer"][i].sum() / LN2),
                "psnr_db": float(p[i]), "ssim": float(s[i]), "mae": float(m[i]),
            })
        shown.update(len(xs))
    shown.close()
    written = "reconstruction" if prior_above is None else f"written (prior above {prior_above}³)"
    titles = ["input", written] + [f"prior above {model.resolution >> lv}³" for lv in progressive_levels]
    viz.save_grid(figure_rows, output_dir / "reconstructions.png", col_titles=titles,
                  row_titles=stems[:len(figure_rows)])
    record = {
        "mode": "posterior mean" if posterior_mean else "posterior sample",
        "prior_above_resolution": prior_above, "temperature": temperature, "seed": seed,
        "likelihood": _likelihood_note(model),
        "intensity": _intensity_record(None, "") if intensity == "model" else {
            "scale": "data", "mapping": "low + v * (high - low), background (v < 0.5/255) -> 0; low/high: each "
                                        "input file's own percentile clamp values"},
        "metrics_note": "PSNR/SSIM/MAE between the preprocessed input and the reconstruction, whole volume, "
                        "model intensity range [0, 1] (data_range 1)",
        "native": NATIVE_NOTE,
        "figure": "reconstructions.png: sagittal, coronal and axial mid-slices; columns input, the written "
                  "reconstruction, then "
                  f"reconstructions with the latents above r³ taken from the prior (temperature {temperature})",
        "files": rows,
        "mean": {k: float(np.mean([r[k] for r in rows])) for k in
                 ("elbo_bits_per_voxel", "psnr_db", "ssim", "mae")},
        **trained.record(),
    }
    write_json(output_dir / "reconstructions.json", record)
    return record


NATIVE_NOTE = ("*_native.nii.gz: the model-grid result resampled (trilinear) into the input scan's own grid, same "
               "shape and affine as the input file, zero outside the preprocessing crop; overlays on the scan")


def write_native(volume: np.ndarray, geometry: dict[str, Any], path: Path,
                 low_high: tuple[float, float] | None, description: str) -> Path:
    """A model-grid volume (model range [0, 1]) written in an input scan's own space (shape,
    affine and sform/qform code of the scan; :mod:`verydeepvae.data.native_space`), in the data's
    intensity scale when ``low_high`` is given (mapped after resampling, so the background test
    sees the resampled values)."""
    native = to_scan_space(volume, geometry)
    if low_high is not None:
        native = to_data_intensity(native, *low_high)
    save_nifti(native, path, np.asarray(geometry["affine"], dtype=float), description=description,
               xform_code=int(geometry.get("xform_code", 1)))  # the scan's own: 0 stays 0
    return path


def _likelihood_note(model: VeryDeepVAE) -> str:
    if model.likelihood.is_discrete:
        return (f"discretised logistic over {model.likelihood.num_bins} intensity bins: the negative ELBO is a "
                "true code length (bits/voxel >= 0)")
    return ("continuous Gaussian density: the negative ELBO in bits/voxel is a differential quantity, "
            "can be negative and is not a code length")
