"""The Python API: a trained model in a notebook or a script, in three lines.

    import verydeepvae
    model = verydeepvae.load("runs/demo")
    model.sample(4, temperature=0.8, seed=1).save("samples/")

Everything here wraps what the command line uses (``generate``, ``latents``, ``train.loop``), so
a volume sampled here is the volume ``verydeepvae sample`` writes for the same seed, temperature
and batch size.  Volumes are NumPy arrays on the model grid with their affine; latents are torch
tensors.  Nothing here changes the process environment (see ``process_defaults``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

from .config import Config, build_config
from .errors import UserError
from .generate import (TrainedModel, check_temperature, input_files, iter_samples, load_preprocessed, open_trained,
                       output_stems)
from .volume_io import grid_affine
from .volume_io import save_nifti as _save_nifti

# what reconstruct/encode accept: NIfTI paths (a file, a folder, a list file, or a sequence of
# them), or volumes already on the model grid in [0, 1], shaped (R, R, R) or (N, R, R, R)
Inputs = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], np.ndarray, torch.Tensor]


@dataclass
class Volumes:
    """Volumes on the model grid.

    ``data``: (N, R, R, R) float32, model intensities in [0, 1], RAS+ array order;
    ``affines``: (N, 4, 4) voxel-to-world matrices in mm (each volume's own voxel size);
    ``names``: one file stem per volume, used by :meth:`save`.
    """

    data: np.ndarray
    affines: np.ndarray
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, i: int) -> np.ndarray:
        """Volume i, (R, R, R)."""
        return self.data[i]

    def save(self, folder: str | os.PathLike) -> list[Path]:
        """Write ``<folder>/<name>.nii.gz`` for every volume (atomically); returns the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for volume, affine, name in zip(self.data, self.affines, self.names):
            path = folder / f"{name}.nii.gz"
            _save_nifti(volume, path, affine, description="verydeepvae")
            paths.append(path)
        return paths


class Model:
    """A trained model (EMA weights unless loaded with ``weights="raw"``), ready to use.

    ``torch_module`` is the underlying :class:`verydeepvae.model.VeryDeepVAE`, for anything the
    methods here do not cover.
    """

    def __init__(self, trained: TrainedModel):
        self._trained = trained

    def __repr__(self) -> str:
        return (f"verydeepvae.Model({self._trained.checkpoint.path}, step {self.step}, {self.resolution}³, "
                f"{self._trained.weights} weights, device {self.device})")

    @property
    def torch_module(self):
        return self._trained.model

    @property
    def config(self) -> Config:
        return self._trained.config

    @property
    def resolution(self) -> int:
        """R: volumes are R³."""
        return self._trained.resolution

    @property
    def voxel_size_mm(self) -> float:
        """The model grid's voxel size (the median over its training volumes), mm."""
        return self._trained.voxel_size_mm

    @property
    def step(self) -> int:
        return self._trained.checkpoint.step

    @property
    def device(self) -> str:
        return self._trained.device

    def sample(self, n: int, temperature: float | Sequence[float] = 1.0, seed: int = 0,
               batch_size: int = 4) -> Volumes:
        """n volumes from the prior: ``data`` (n, R, R, R).  ``temperature``: one value, or one per
        resolution level (highest resolution first); the same seed, temperature and batch size give
        the same volumes as ``verydeepvae sample``."""
        if n < 1 or batch_size < 1:
            raise UserError(f"n and batch_size must be >= 1, got {n} and {batch_size}")
        model = self.torch_module
        temperature = check_temperature(model, temperature)
        chunks = [v for _, v in iter_samples(model, n, temperature, seed, batch_size, self.device, False)]
        data = np.concatenate(chunks).astype(np.float32)
        return Volumes(data, self._affines(n), [f"sample_{i:04d}" for i in range(n)])

    def reconstruct(self, inputs: Inputs, posterior_mean: bool = True, batch_size: int = 4) -> Volumes:
        """Reconstructions (posterior mean at every layer, or a posterior sample) of NIfTI files or
        of model-grid volumes; ``data`` (N, R, R, R)."""
        x, affines, names = self._inputs(inputs)
        out = [self.torch_module.reconstruct(batch, posterior_mean=posterior_mean).cpu()[:, 0].numpy()
               for batch in self._batches(x, batch_size)]
        return Volumes(np.concatenate(out).astype(np.float32), affines, names)

    def encode(self, inputs: Inputs, batch_size: int = 4) -> list[torch.Tensor]:
        """Posterior means of every latent layer, coarsest first: one tensor (N, C, s, s, s) per
        layer, float32 on the CPU (``decode`` takes them back)."""
        x, _, _ = self._inputs(inputs)
        per_batch = [[z.float().cpu() for z in self.torch_module.encode(batch)] for batch in self._batches(x, batch_size)]
        return [torch.cat(layer) for layer in zip(*per_batch)]

    def decode(self, latents: Sequence[torch.Tensor], batch_size: int = 4) -> Volumes:
        """Volumes from latents of every layer (as :meth:`encode` returns them); ``data`` (N, R, R, R)."""
        latents = list(latents)
        if len(latents) != self.torch_module.num_layers:
            raise UserError(f"expected {self.torch_module.num_layers} latent tensors (one per layer), got {len(latents)}")
        n = latents[0].shape[0]
        out = []
        with torch.no_grad():
            for start in range(0, n, batch_size):
                zs = [z[start:start + batch_size].to(self.device) for z in latents]
                out.append(self.torch_module.decode(zs).cpu()[:, 0].numpy())
        return Volumes(np.concatenate(out).astype(np.float32), self._affines(n), [f"decoded_{i:04d}" for i in range(n)])

    # -- helpers -----------------------------------------------------------------------------------
    def _affines(self, n: int, sizes: Sequence[float] | None = None) -> np.ndarray:
        sizes = [self.voxel_size_mm] * n if sizes is None else list(sizes)
        return np.stack([grid_affine((self.resolution,) * 3, float(s)) for s in sizes])

    def _batches(self, x: torch.Tensor, batch_size: int):
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, x.shape[0], batch_size):
            yield x[start:start + batch_size].to(self.device)

    def _inputs(self, inputs: Inputs) -> tuple[torch.Tensor, np.ndarray, list[str]]:
        """(N, 1, R, R, R) float32 in [0, 1], their affines and names, from paths or arrays."""
        R = self.resolution
        if isinstance(inputs, (np.ndarray, torch.Tensor)):
            x = torch.as_tensor(np.asarray(inputs, dtype=np.float32))
            if x.dim() == 3:
                x = x[None]
            if x.dim() != 4 or tuple(x.shape[1:]) != (R, R, R):
                raise UserError(f"volumes must be shaped ({R}, {R}, {R}) or (N, {R}, {R}, {R}) (the model grid; "
                                f"give NIfTI paths to preprocess scans), got {tuple(x.shape)}")
            n = x.shape[0]
            return x[:, None], self._affines(n), [f"volume_{i:04d}" for i in range(n)]
        paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
        files = [f for p in paths for f in input_files(p)]
        volumes, metas = load_preprocessed(files, self._trained.preprocess_settings, show_progress=False)
        affines = self._affines(len(files), [m["voxel_size_mm"] for m in metas])
        return torch.from_numpy(volumes)[:, None], affines, output_stems(files)


def load(run_or_checkpoint: str | os.PathLike, device: str | None = "auto", weights: str = "ema") -> Model:
    """A trained model from a run folder (its newest loadable checkpoint) or a checkpoint file.
    ``device``: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N"; ``weights``: "ema"
    (the averaged weights, as the CLI uses) or "raw"."""
    if weights not in ("ema", "raw"):
        raise UserError(f"weights must be 'ema' or 'raw', got {weights!r}")
    return Model(open_trained(run_or_checkpoint, use_ema=weights == "ema", device=device))


def save_nifti(volume: np.ndarray, path: str | os.PathLike, affine: np.ndarray | None = None,
               voxel_size_mm: float = 1.0) -> Path:
    """Write one (R, R, R) volume as float32 NIfTI (atomically); without ``affine``, a grid of
    ``voxel_size_mm`` voxels centred on the origin.  Returns the path."""
    volume = np.asarray(volume, dtype=np.float32)
    if affine is None:
        affine = grid_affine(volume.shape, voxel_size_mm)
    _save_nifti(volume, path, np.asarray(affine, dtype=float), description="verydeepvae")
    return Path(path)


def fit(preset: str | None = None, config: str | os.PathLike | None = None, show_progress: bool = False,
        **settings: Any):
    """Train (or, with ``resume=True``, resume) a model, as ``verydeepvae train`` does (named
    ``fit`` because ``verydeepvae.train`` is the training subpackage): a preset
    and/or a configuration file, then any configuration key as a keyword (``data_path``,
    ``output_dir``, ``max_steps``...).  Returns the run's result (``output_dir``, ``step``,
    ``checkpoint``, ``validation``); ``load(result.output_dir)`` opens the model."""
    from .train.loop import train as _train

    notices: list[str] = []
    cfg = build_config(preset=preset, config_file=config, overrides=settings, notices=notices)
    return _train(cfg, notices=notices, show_progress=show_progress)
