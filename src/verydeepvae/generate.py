"""Reconstruction of input scans, and the names of the generation layer.

A trained model is loaded by :mod:`verydeepvae.inference`; prior samples are drawn and written by
:mod:`verydeepvae.sampling`; input scans are read and results written into their own space by
:mod:`verydeepvae.scan_files`; latent codes and interpolation are :mod:`verydeepvae.latents`.
Those names are also importable from here (``verydeepvae.generate.open_trained`` as documented).

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

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence, TypedDict

import numpy as np
import torch

from . import viz
from .atomic import write_json
from .console import bar
from .data.native_space import native_geometry
from .errors import UserError
from .json_types import JSONObject
from .inference import (BACKGROUND_LEVEL, LN2, TrainedModel, covariate_schema, elbo_terms, intensity_record,  # noqa: F401
                        load_model, open_trained, prior_level, reference_range, to_data_intensity)
from .model import VeryDeepVAE
from .sampling import (MAX_FIGURE_ROWS, MAX_TEMPERATURE, check_prior, check_temperature, describe_prior,  # noqa: F401
                       iter_samples, temperatures_in_range, write_samples)
from .scan_files import (NATIVE_NOTE, input_files, load_preprocessed, output_stems, safe_file_stem,  # noqa: F401
                         unique_names, write_native)
from .volume_io import grid_affine, save_nifti

if TYPE_CHECKING:
    from .data.nifti_load import VolumeMeta


# --- computing: rows of results -------------------------------------------------------------------


@dataclass
class ReconstructedBatch:
    """One batch of reconstructions; volumes (B, R, R, R) float32 in the model range [0, 1]."""

    start: int  # index of the batch's first input file
    inputs: np.ndarray  # the preprocessed inputs
    reconstructions: np.ndarray
    terms: dict[str, np.ndarray]  # elbo_terms: per-volume nats/voxel
    psnr: np.ndarray  # (B,) dB, data range 1
    ssim: np.ndarray  # (B,)
    mae: np.ndarray  # (B,)
    progressive: list[np.ndarray]  # per figure level, (B, R, R, R); empty once the figure is full


def compute_reconstructions(model: VeryDeepVAE, volumes: np.ndarray, device: str, *, level: int | None,
                            posterior_mean: bool, temperature: float, seed: int, batch_size: int,
                            covariates: np.ndarray | None = None) -> Iterator[ReconstructedBatch]:
    """Reconstruct ``volumes`` (N, R, R, R) in batches and measure each (see :func:`reconstruct_files`).

    Two generators seeded from ``seed`` draw the written reconstructions and the figure's extra
    ones, so the written volumes do not depend on how many figure rows are made."""
    from .metrics import mae, psnr, ssim3d

    generator = torch.Generator(device=device).manual_seed(int(seed))
    figure_generator = torch.Generator(device=device).manual_seed(int(seed) + 1)
    for start in range(0, len(volumes), batch_size):
        x = torch.from_numpy(volumes[start:start + batch_size])[:, None].to(device)
        c = None if covariates is None else torch.from_numpy(np.asarray(covariates[start:start + batch_size],
                                                                        dtype=np.float32)).to(device)
        terms = elbo_terms(model, x, seed + start, covariates=c)
        recon = model.reconstruct(x, prior_from_level=level, posterior_mean=posterior_mean, temperature=temperature,
                                  generator=generator, covariates=c).float().cpu()[:, 0].numpy()
        xs = x.cpu()[:, 0].numpy()
        p, s, m = (np.atleast_1d(f(xs, recon)) for f in (psnr, ssim3d, mae))
        progressive = []
        if start < MAX_FIGURE_ROWS:
            progressive = [r.float().cpu()[:, 0].numpy() for r in model.reconstructions(
                x, list(range(1, model.decoder.num_levels)), temperature=temperature, generator=figure_generator,
                covariates=c)]
        yield ReconstructedBatch(start, xs, recon, terms, p, s, m, progressive)


# --- writing --------------------------------------------------------------------------------------


class ReconstructionRow(TypedDict):
    """One input's row of reconstructions.json: its files and measurements (bits/voxel; PSNR in dB,
    SSIM and MAE on the model range)."""

    input: str
    reconstruction: str
    preprocessed_input: str
    reconstruction_native: str
    voxel_size_mm: float
    elbo_bits_per_voxel: float
    nll_bits_per_voxel: float
    kl_bits_per_voxel: float
    psnr_db: float
    ssim: float
    mae: float


def _write_one(batch: ReconstructedBatch, i: int, file: Path, stem: str, meta: VolumeMeta, resolution: int,
               output_dir: Path, intensity: str) -> ReconstructionRow:
    """Write volume ``i`` of ``batch`` (reconstruction, preprocessed input, native-space
    reconstruction) and return its row of reconstructions.json."""
    affine = grid_affine((resolution,) * 3, float(meta["voxel_size_mm"]))
    low_high = (float(meta["clamp_low"]), float(meta["clamp_high"])) if intensity == "data" else None
    out_recon, out_input = batch.reconstructions[i], batch.inputs[i]
    if low_high is not None:
        out_recon, out_input = to_data_intensity(out_recon, *low_high), to_data_intensity(out_input, *low_high)
    recon_path = output_dir / f"{stem}_recon.nii.gz"
    input_path = output_dir / f"{stem}_input.nii.gz"
    save_nifti(out_recon, recon_path, affine, description="verydeepvae reconstruction")
    save_nifti(out_input, input_path, affine, description="verydeepvae preprocessed input")
    native_path = write_native(batch.reconstructions[i], native_geometry(meta, file, resolution),
                               output_dir / f"{stem}_recon_native.nii.gz", low_high,
                               "verydeepvae reconstruction, input scan space")
    terms = batch.terms
    return {
        "input": str(file), "reconstruction": recon_path.name, "preprocessed_input": input_path.name,
        "reconstruction_native": native_path.name,
        "voxel_size_mm": float(meta["voxel_size_mm"]),
        "elbo_bits_per_voxel": float(terms["elbo"][i] / LN2),
        "nll_bits_per_voxel": float(terms["nll"][i] / LN2),
        "kl_bits_per_voxel": float(terms["kl_per_layer"][i].sum() / LN2),
        "psnr_db": float(batch.psnr[i]), "ssim": float(batch.ssim[i]), "mae": float(batch.mae[i]),
    }


def _record(trained: TrainedModel, rows: list[ReconstructionRow], posterior_mean: bool, prior_above: int | None,
            temperature: float, seed: int, intensity: str) -> JSONObject:
    """reconstructions.json: how the reconstructions were made, each file's row, the means and the
    model (its ``ModelRecord``)."""
    return {
        "mode": "posterior mean" if posterior_mean else "posterior sample",
        "prior_above_resolution": prior_above, "temperature": temperature, "seed": seed,
        "likelihood": _likelihood_note(trained.model),
        "intensity": intensity_record(None, "") if intensity == "model" else {
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


def _save_figure(figure_rows: list[list[np.ndarray]], stems: list[str], model: VeryDeepVAE,
                 prior_above: int | None, path: Path) -> None:
    written = "reconstruction" if prior_above is None else f"written (prior above {prior_above}³)"
    titles = ["input", written] + [f"prior above {model.resolution >> lv}³" for lv in range(1, model.decoder.num_levels)]
    viz.save_grid(figure_rows, path, col_titles=titles, row_titles=stems[:len(figure_rows)])


def reconstruct_files(trained: TrainedModel, files: Sequence[str | Path], output_dir: str | Path,
                      posterior_mean: bool = True, prior_above: int | None = None, temperature: float = 0.0,
                      seed: int = 0, batch_size: int = 4, intensity: str = "model",
                      show_progress: bool | None = True, covariates: np.ndarray | None = None) -> JSONObject:
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
    if intensity not in ("model", "data"):
        raise UserError(f"intensity must be 'model' or 'data', got {intensity!r}")
    model = trained.model
    level = prior_level(model, prior_above)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = [Path(f) for f in files]
    volumes, metas = load_preprocessed(files, trained.preprocess_settings, show_progress=show_progress)
    stems = output_stems(files)
    rows: list[ReconstructionRow] = []
    figure_rows: list[list[np.ndarray]] = []
    with bar(total=len(files), desc="reconstruct", unit="vol", show=show_progress) as shown:
        for batch in compute_reconstructions(model, volumes, trained.device, level=level,
                                             posterior_mean=posterior_mean, temperature=temperature, seed=seed,
                                             batch_size=batch_size, covariates=covariates):
            for i in range(min(len(batch.inputs), MAX_FIGURE_ROWS - len(figure_rows))):
                figure_rows.append([batch.inputs[i], batch.reconstructions[i]] + [e[i] for e in batch.progressive])
            for i in range(len(batch.inputs)):
                k = batch.start + i
                rows.append(_write_one(batch, i, files[k], stems[k], metas[k], model.resolution, output_dir,
                                       intensity))
            shown.update(len(batch.inputs))
    _save_figure(figure_rows, stems, model, prior_above, output_dir / "reconstructions.png")
    record = _record(trained, rows, posterior_mean, prior_above, temperature, seed, intensity)
    write_json(output_dir / "reconstructions.json", record)
    return record


def _likelihood_note(model: VeryDeepVAE) -> str:
    if model.likelihood.is_discrete:
        return (f"discretised logistic over {model.likelihood.num_bins} intensity bins: the negative ELBO is a "
                "true code length (bits/voxel >= 0)")
    return ("continuous Gaussian density: the negative ELBO in bits/voxel is a differential quantity, "
            "can be negative and is not a code length")
