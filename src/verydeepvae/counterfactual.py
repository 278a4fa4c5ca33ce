"""Counterfactuals of real scans: the same brain with other covariates (older, more lesions...).

Method (``mode="noise"``, the default): the scan is encoded with its own covariates c; at every
latent layer, coarsest first, the posterior mean z is kept as its standardised residual under the
prior, e = (z - mu_p(c)) / sd_p(c): where this brain sits within the brains of its covariates.
Decoding e with other covariates c' sets z' = mu_p(c') + sd_p(c') e at every layer, each prior
reading the state built from c' and the layers above, so the latents move with the covariates as
the population does, while the scan's own deviations stay.  With c' = c the decoder sees exactly the
posterior means again: the counterfactual at the scan's own values *is* the posterior-mean
reconstruction (the same volume ``reconstruct`` writes).  ``mode="latents"`` keeps z itself and
changes only the decoder's conditioning, a weaker edit where the latents carry what the covariate
explains.  Why noise: ``docs/conditional.md``.

``write_counterfactuals`` writes per scan, on the model grid (as ``reconstruct``; all overlay):
``<name>_input.nii.gz`` (the preprocessed input), ``<name>_recon.nii.gz`` (own covariates),
``<name>_counterfactual.nii.gz`` and ``<name>_difference.nii.gz`` (counterfactual minus
reconstruction) for ``--condition``, ``<name>_<covariate>-<value>.nii.gz`` for every value of a
``--sweep`` and a PNG strip, plus ``counterfactuals.json``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from . import conditional
from .atomic import write_json
from .data.covariates import Value
from .errors import UserError
from .guidance import Guidance, check_guidance
from .console import bar
from .inference import TrainedModel
from .model.vae import GuidanceWeights
from .scan_files import load_preprocessed, output_stems
from .viz_conditional import save_counterfactual_strip
from .volume_io import grid_affine, save_nifti

MODES = ("noise", "latents")


@torch.no_grad()
def counterfactual_volumes(model: Any, x: np.ndarray, observed: np.ndarray, targets: np.ndarray,
                           mode: str = "noise", batch_size: int = 4, device: str | torch.device = "cpu",
                           guidance: GuidanceWeights = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(reconstruction (R, R, R), counterfactuals (K, R, R, R)) of one volume ``x`` (R, R, R) in
    [0, 1], from its encoded covariates ``observed`` (dim,) to each row of ``targets`` (K, dim).
    ``guidance`` w (``Guidance.weights``) scales the change: the decoder's conditioning moves w times
    as far from the scan's own covariates (model/vae.py ``_film``), so the reconstruction at its own
    values is kept."""
    codes, c = encode_scan(model, x, observed, mode, device)
    decode = model.decode_noise if mode == "noise" else model.decode
    recon = decode(codes, covariates=c).float().cpu()[0, 0].numpy()
    volumes = decode_counterfactuals(model, codes, c, targets, mode, batch_size, device, guidance)
    return recon, (volumes if len(volumes) else np.zeros((0,) + recon.shape, np.float32))


@torch.no_grad()
def encode_scan(model: Any, x: np.ndarray, observed: np.ndarray, mode: str = "noise",
                device: str | torch.device = "cpu") -> tuple[list[torch.Tensor], torch.Tensor]:
    """(latent codes, covariates (1, dim)) of one volume ``x`` (R, R, R) with its encoded covariates
    ``observed`` (dim,): what ``decode_counterfactuals`` starts from, so a scan swept several times
    (at several guidance scales) is encoded once."""
    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    x_t = torch.as_tensor(np.asarray(x, np.float32))[None, None].to(device)
    c = torch.as_tensor(np.asarray(observed, np.float32))[None].to(device)
    return model.encode(x_t, covariates=c, as_noise=mode == "noise"), c


@torch.no_grad()
def decode_counterfactuals(model: Any, codes: list[torch.Tensor], c: torch.Tensor, targets: np.ndarray,
                           mode: str = "noise", batch_size: int = 4, device: str | torch.device = "cpu",
                           guidance: GuidanceWeights = 1.0) -> np.ndarray:
    """Counterfactuals (K, R, R, R) of one encoded scan (``encode_scan``) at each row of ``targets``
    (K, dim); ``guidance`` as in ``counterfactual_volumes``."""
    decode = model.decode_noise if mode == "noise" else model.decode
    out = []
    targets = torch.as_tensor(np.asarray(targets, np.float32))
    for start in range(0, len(targets), batch_size):
        chunk = targets[start:start + batch_size].to(device)
        expanded = [code.expand(len(chunk), *code.shape[1:]) for code in codes]
        out.append(decode(expanded, covariates=chunk, guidance=guidance,
                          reference=c.expand(len(chunk), -1)).float().cpu()[:, 0].numpy())
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def value_label(name: str, value: Value) -> str:
    """``age-80``, ``age-72.5``, ``sex-F``: a file-name-safe label of one covariate value."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{name}-{text}")


def write_counterfactuals(trained: TrainedModel, files: Sequence[str | Path], output_dir: str | Path,
                          change: Mapping[str, Any] | None = None, sweep: tuple[str, Sequence[Any]] | None = None,
                          observed: Mapping[str, Any] | None = None, covariates_file: str | Path | None = None,
                          mode: str = "noise", batch_size: int = 4, show_progress: bool | None = None,
                          notices: list[str] | None = None,
                          own: tuple[list[dict[str, Value]], list[str]] | None = None,
                          guidance: Guidance | float = 1.0) -> dict[str, Any]:
    """Counterfactuals of NIfTI scans (module notes); returns the record written as counterfactuals.json.
    ``own``: the scans' covariates and where they came from, when the caller has looked them up
    already (``conditional.scan_covariates``; else from ``observed`` and ``covariates_file``)."""
    schema = conditional.require_schema(trained, "counterfactual")
    guidance = check_guidance(guidance, schema)
    change = conditional.parse_request(schema, change or {}, "--condition")
    if sweep is not None:
        sweep = (sweep[0], [schema.get(sweep[0]).parse(v, "--sweep") for v in sweep[1]])
    if not change and sweep is None:
        raise UserError("counterfactual needs --condition NAME=VALUE and/or --sweep NAME=START:STOP:STEP")
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    files = [Path(f) for f in files]
    own, origins = own or conditional.scan_covariates(trained, files, observed, covariates_file)
    notices = [] if notices is None else notices
    volumes, metas = load_preprocessed(files, trained.preprocess_settings, show_progress=show_progress)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model, stems, rows = trained.model, output_stems(files), []
    for i in bar(range(len(files)), desc="counterfactual", unit="scan", show=show_progress):
        targets, labels = _targets(own[i], change, sweep)
        for target in targets:
            for name, value in target.items():
                note = schema.get(name).out_of_range(value)
                if note and note not in notices:
                    notices.append(note)
        recon, outs = counterfactual_volumes(model, volumes[i], schema.encode([own[i]])[0], schema.encode(targets),
                                             mode, batch_size, trained.device, guidance.weights(schema))
        affine = grid_affine((model.resolution,) * 3, float(metas[i]["voxel_size_mm"]))
        written, entries = _write_scan(output_dir, stems[i], affine, volumes[i], recon, targets, labels, outs)
        figure = f"{stems[i]}_{'sweep' if sweep else 'counterfactual'}.png"
        titles = ["input", "recon. (own)"] + [_title(t, change, sweep) for t in targets]
        save_counterfactual_strip([volumes[i], recon, *outs], titles, recon, output_dir / figure,
                                  suptitle=f"{stems[i]}: own {_describe(own[i])}")
        rows.append({"input": str(files[i]), "observed": own[i], "observed_from": origins[i],
                     "psnr_reconstruction_db": _psnr(volumes[i], recon), "outputs": entries,
                     "files": written, "figure": figure})
    record = {
        "mode": mode, "guidance": guidance.to_json(), "change": change,
        "sweep": {"covariate": sweep[0], "values": sweep[1]} if sweep else None,
        "method": ("noise: each latent layer keeps the scan's standardised residual under the prior, "
                   "(z - prior mean) / prior sd, and the priors follow the new covariates" if mode == "noise" else
                   "latents: the scan's posterior-mean latents are kept; only the decoder's conditioning changes"),
        "difference": "counterfactual minus the reconstruction at the scan's own covariates (model intensities)",
        "grid": "the model grid (preprocessed frame), like reconstruct; every output overlays *_input.nii.gz",
        "covariates": schema.to_json()["covariates"], "notices": list(notices), "scans": rows, **trained.record(),
    }
    write_json(output_dir / "counterfactuals.json", record)
    return record


def _targets(own: dict[str, Value], change: Mapping[str, Value], sweep) -> tuple[list[dict[str, Value]], list[str]]:
    """One scan's target covariates and their file labels: the ``change``, then each sweep value."""
    targets, labels = [], []
    if change:
        targets.append({**own, **change})
        labels.append("counterfactual")
    for value in (sweep[1] if sweep else []):
        targets.append({**own, **change, sweep[0]: value})
        labels.append(value_label(sweep[0], value))
    return targets, labels


def _write_scan(output_dir: Path, stem: str, affine: np.ndarray, volume: np.ndarray, recon: np.ndarray,
                targets: list[dict[str, Value]], labels: list[str], outs: np.ndarray
                ) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """One scan's preprocessed input, reconstruction, counterfactuals and (for ``--condition``) the
    difference map, on the model grid; returns (input/reconstruction file names, one entry per target)."""
    written = {"input": f"{stem}_input.nii.gz", "reconstruction": f"{stem}_recon.nii.gz"}
    save_nifti(volume, output_dir / written["input"], affine, description="verydeepvae preprocessed input")
    save_nifti(recon, output_dir / written["reconstruction"], affine, description="verydeepvae reconstruction")
    entries = []
    for target, label, out in zip(targets, labels, outs):
        name = f"{stem}_{label}.nii.gz"
        save_nifti(out, output_dir / name, affine, description=f"verydeepvae counterfactual {label}"[:79])
        entry = {"covariates": target, "file": name}
        if label == "counterfactual":
            entry["difference"] = f"{stem}_difference.nii.gz"
            save_nifti(out - recon, output_dir / entry["difference"], affine,
                       description="verydeepvae counterfactual minus reconstruction")
        entries.append(entry)
    return written, entries


def _title(target: Mapping[str, Value], change: Mapping[str, Value], sweep) -> str:
    shown = {k: target[k] for k in change}
    if sweep is not None:
        shown[sweep[0]] = target[sweep[0]]
    return _describe(shown)


def _describe(values: Mapping[str, Value]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


def _psnr(x: np.ndarray, y: np.ndarray) -> float:
    from .metrics import psnr

    return float(np.atleast_1d(psnr(x[None], y[None]))[0])
