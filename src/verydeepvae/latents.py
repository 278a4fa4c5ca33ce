"""Latent codes of a trained model: encode inputs to a safetensors file, decode such a file back to
volumes, and interpolate between two inputs through every latent layer.

Inputs are preprocessed exactly as in training and outputs are NIfTI volumes on the model's grid,
plus, where an output belongs to one input scan, the same volume in that scan's own space
(``*_native.nii.gz``; see :mod:`verydeepvae.generate`, which this builds on).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import viz
from .atomic import write_json, write_safetensors
from .errors import UserError
from .console import bar
from .data.native_space import checked_geometry, native_geometry
from .inference import TrainedModel, to_data_intensity
from .scan_files import NATIVE_NOTE, load_preprocessed, output_stems, safe_file_stem, unique_names, write_native
from .model import VeryDeepVAE
from .volume_io import grid_affine, save_nifti

LATENTS_FORMAT = "verydeepvae-latents-1"
LATENTS_META_KEY = "verydeepvae"


# --- latents --------------------------------------------------------------------------------------


def latent_layout(model: VeryDeepVAE) -> list[dict[str, Any]]:
    """Index, level, resolution and shape of every latent layer, coarsest first."""
    return [{"index": i, "level": level, "resolution": model.resolution >> level, "shape": list(shape)}
            for i, (level, shape) in enumerate(zip(model.layer_levels, model.latent_shapes()))]


def encode_files(trained: TrainedModel, files: Sequence[str | Path], output_path: str | Path,
                 batch_size: int = 4, show_progress: bool | None = True) -> Path:
    """Posterior means of every latent layer for each file, in one ``.safetensors`` file.

    Tensors ``z.00``, ``z.01``... (coarsest layer first) shaped (N, C, s, s, s), float32, in input
    order; the safetensors header holds the JSON metadata (format, files, layer layout, per-file
    voxel size, clamp values and scan geometry, checkpoint), also written beside it as
    ``<name>.json``. No pickle.
    """
    output_path = Path(output_path)
    if output_path.suffix != ".safetensors":
        raise UserError(f"the latents file must end in .safetensors, got {output_path.name}")
    model, device = trained.model, trained.device
    files = [Path(f) for f in files]
    volumes, metas = load_preprocessed(files, trained.preprocess_settings, show_progress=show_progress)
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(model.num_layers)]
    for start in bar(range(0, len(files), batch_size), desc="encode", unit="batch", show=show_progress):
        x = torch.from_numpy(volumes[start:start + batch_size])[:, None].to(device)
        for i, z in enumerate(model.encode(x)):
            per_layer[i].append(z.float().cpu())
    tensors = {f"z.{i:02d}": torch.cat(zs).contiguous() for i, zs in enumerate(per_layer)}
    meta = {
        "format": LATENTS_FORMAT, "kind": "posterior mean of every latent layer (layers above at their means)",
        "resolution": model.resolution, "layers": latent_layout(model),
        "files": [str(f) for f in files], "names": output_stems(files),
        "voxel_size_mm": [float(m["voxel_size_mm"]) for m in metas],
        "clamp_low": [float(m["clamp_low"]) for m in metas], "clamp_high": [float(m["clamp_high"]) for m in metas],
        # each input scan's own grid and where the model grid sits in it, so decode can write its
        # volumes back in the scan's space without the file (data/native_space.py)
        "scan_geometry": [native_geometry(m, f, model.resolution) for m, f in zip(metas, files)],
        **trained.record(),
    }
    write_safetensors(output_path, tensors, {LATENTS_META_KEY: json.dumps(meta)})
    write_json(output_path.with_suffix(".json"), meta)
    return output_path


def load_latents(path: str | Path) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Read a latents file written by :func:`encode_files`: (per-layer tensors, metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"latents file {path} does not exist")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(LATENTS_META_KEY)
        meta = json.loads(raw) if raw else None
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"latents file {path} cannot be read: {str(error).splitlines()[0] if str(error) else error}") from None
    if not meta or meta.get("format") != LATENTS_FORMAT:
        raise UserError(f"{path} is not a verydeepvae latents file")
    return [tensors[f"z.{i:02d}"] for i in range(len(meta["layers"]))], meta


def decode_latents(trained: TrainedModel, path: str | Path, output_dir: str | Path, batch_size: int = 4,
                   show_progress: bool | None = True) -> list[Path]:
    """Decode a latents file back to volumes ``<name>_decoded.nii.gz`` (each on its input's grid)
    and, where the file records the encoded scan's geometry (``encode`` of NIfTI files does;
    latents files of older versions do not), ``<name>_decoded_native.nii.gz`` in that scan's own
    space.  Returns the model-grid paths (the scan-space ones are :func:`native_path` of them)."""
    model = trained.model
    latents, meta = load_latents(path)
    if meta["layers"] != latent_layout(model):
        raise UserError(f"latents file {path} was made by a model with a different latent layout")
    recorded = meta.get("scan_geometry") if isinstance(meta.get("scan_geometry"), list) else []
    geometries = [checked_geometry(g, f"latents file {path}, volume {k + 1}") if g is not None else None
                  for k, g in enumerate(recorded[:latents[0].shape[0]])]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    n = latents[0].shape[0]
    names = meta.get("names") if isinstance(meta.get("names"), list) else []
    names = unique_names(safe_file_stem(names[k] if k < len(names) else None, f"volume_{k + 1:04d}")
                         for k in range(n))
    sizes = meta.get("voxel_size_mm") if isinstance(meta.get("voxel_size_mm"), list) else []
    paths = []
    for start in bar(range(0, n, batch_size), desc="decode", unit="batch", show=show_progress):
        zs = [z[start:start + batch_size].to(trained.device) for z in latents]
        volumes = model.decode(zs).float().cpu()[:, 0].numpy()
        for i, volume in enumerate(volumes):
            k = start + i
            affine = grid_affine((model.resolution,) * 3, _voxel_size(sizes, k, trained.voxel_size_mm))
            out = output_dir / f"{names[k]}_decoded.nii.gz"
            save_nifti(volume, out, affine, description="verydeepvae decoded latents")
            if k < len(geometries) and geometries[k] is not None:
                write_native(volume, geometries[k], native_path(out), None,
                             "verydeepvae decoded latents, encoded scan space")
            paths.append(out)
    return paths


def native_path(path: Path) -> Path:
    """``x_decoded.nii.gz`` -> ``x_decoded_native.nii.gz``."""
    return path.with_name(path.name.replace(".nii.gz", "_native.nii.gz"))


def _voxel_size(sizes: list, k: int, default: float) -> float:
    """Volume k's voxel size from a latents file, or the model's when it is missing or not a
    positive finite number."""
    value = sizes[k] if k < len(sizes) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return default


# --- interpolation --------------------------------------------------------------------------------


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between two tensors of the same shape, treated as single vectors
    (falls back to linear interpolation when they are almost parallel)."""
    fa, fb = a.double().flatten(), b.double().flatten()
    na, nb = fa.norm(), fb.norm()
    if na < 1e-12 or nb < 1e-12:
        return (1 - t) * a + t * b
    cos = torch.clamp(torch.dot(fa, fb) / (na * nb), -1.0, 1.0)
    omega = torch.arccos(cos)
    if torch.sin(omega) < 1e-6:
        return (1 - t) * a + t * b
    s = torch.sin(omega)
    out = (torch.sin((1 - t) * omega) / s) * fa + (torch.sin(t * omega) / s) * fb
    return out.reshape(a.shape).to(a.dtype)


def _interpolated_frames(model, zs: list[torch.Tensor], ts: list[float], method: str, batch_size: int,
                         show_progress: bool | None) -> list[np.ndarray]:
    """Decode every layer's latents mixed at each t of ``ts`` (``zs``: per layer, A's and B's
    posterior means stacked); volumes (R, R, R) in the model range [0, 1]."""
    frames: list[np.ndarray] = []
    for start in bar(range(0, len(ts), batch_size), desc="interpolate", unit="batch", show=show_progress):
        chunk = ts[start:start + batch_size]
        batch = []
        for z in zs:
            mix = [slerp(z[0], z[1], t) if method == "slerp" else (1 - t) * z[0] + t * z[1] for t in chunk]
            batch.append(torch.stack(mix).float())
        frames.extend(model.decode(batch).float().cpu()[:, 0].numpy())
    return frames


def interpolate(trained: TrainedModel, file_a: str | Path, file_b: str | Path, output_dir: str | Path,
                steps: int = 8, method: str = "slerp", batch_size: int = 4, intensity: str = "model",
                show_progress: bool | None = True) -> list[Path]:
    """Decode ``steps`` volumes between two inputs: ``interp_00.nii.gz`` (= the posterior-mean
    reconstruction of A) ... ``interp_<steps-1>.nii.gz`` (= that of B), ``interpolation.png`` and
    ``interpolation.json``.

    The posterior means of *every* latent layer of A and B are interpolated layer by layer,
    spherically (``slerp``, each layer as one vector) or linearly (``linear``), at t = k/(steps-1).
    The voxel size of frame t is interpolated linearly between the inputs' grids.
    """
    if steps < 2:
        raise UserError(f"--steps must be >= 2 (the two end points included), got {steps}")
    if method not in ("slerp", "linear"):
        raise UserError(f"interpolation method must be 'slerp' or 'linear', got {method!r}")
    model, device = trained.model, trained.device
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = [Path(file_a), Path(file_b)]
    volumes, metas = load_preprocessed(files, trained.preprocess_settings, show_progress=False)
    x = torch.from_numpy(volumes)[:, None].to(device)
    ts = [k / (steps - 1) for k in range(steps)]
    frames = _interpolated_frames(model, model.encode(x), ts, method, batch_size, show_progress)
    va, vb = float(metas[0]["voxel_size_mm"]), float(metas[1]["voxel_size_mm"])
    paths = []
    for k, (t, frame) in enumerate(zip(ts, frames)):
        voxel = (1 - t) * va + t * vb
        out = frame
        if intensity == "data":
            low = (1 - t) * metas[0]["clamp_low"] + t * metas[1]["clamp_low"]
            high = (1 - t) * metas[0]["clamp_high"] + t * metas[1]["clamp_high"]
            out = to_data_intensity(frame, low, high)
        path = output_dir / f"interp_{k:02d}.nii.gz"
        save_nifti(out, path, grid_affine((model.resolution,) * 3, voxel), description=f"verydeepvae interp t={t:.3f}")
        paths.append(path)
    # the two ends are reconstructions of A and B: each also in its own scan's space
    ends = {}
    for end, (frame, meta, file) in {"a": (frames[0], metas[0], files[0]), "b": (frames[-1], metas[1], files[1])}.items():
        low_high = (float(meta["clamp_low"]), float(meta["clamp_high"])) if intensity == "data" else None
        ends[end] = write_native(frame, native_geometry(meta, file, model.resolution),
                                 output_dir / f"{end}_native.nii.gz", low_high,
                                 f"verydeepvae interpolation end {end.upper()}, its scan space").name
    viz.save_strip([volumes[0]] + frames + [volumes[1]], output_dir / "interpolation.png",
               ["A (input)"] + [f"t={t:.2f}" for t in ts] + ["B (input)"],
               f"{method} interpolation of all latent layers: {files[0].name} -> {files[1].name}")
    write_json(output_dir / "interpolation.json", {
        "a": str(files[0]), "b": str(files[1]), "steps": steps, "method": method, "t": ts,
        "files": [p.name for p in paths], "latents": "posterior means of every layer",
        "voxel_size_mm": [(1 - t) * va + t * vb for t in ts], "ends_native": ends,
        "native": NATIVE_NOTE + " (only the two ends: a frame between them belongs to no one scan)",
        **trained.record(),
    })
    return paths
