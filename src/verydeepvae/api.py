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

from . import conditional
from .config import Config, build_config
from .data.covariates import CovariateRow
from .errors import UserError
from .guidance import Guidance, resolve_guidance
from .inference import TrainedModel, open_trained
from .sampling import check_temperature, iter_samples
from .scan_files import input_files, load_preprocessed, output_stems
from .volume_io import grid_affine
from .volume_io import save_nifti as _save_nifti

# what reconstruct/encode accept: NIfTI paths (a file, a folder, a list file, or a sequence of
# them), or volumes already on the model grid in [0, 1], shaped (R, R, R) or (N, R, R, R)
Inputs = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], np.ndarray, torch.Tensor]
# a conditional model's covariates: one dict for every volume, or a list with one dict per volume
Conditions = Union[CovariateRow, Sequence[CovariateRow], None]
# one guidance scale, one per covariate by name, the CLI's "age=2,lesion_load=5", "calibrated" or "auto"
# (the scales calibrate-guidance measured, or 1 when there are none), or a Guidance
GuidanceLike = Union[float, dict[str, float], str, Guidance]


def _per_volume(given: Conditions, n: int, what: str) -> list[CovariateRow]:
    if given is None:
        return [{} for _ in range(n)]
    if isinstance(given, dict):
        return [dict(given) for _ in range(n)]
    rows = [dict(r) for r in given]
    if len(rows) != n:
        raise UserError(f"{what}: {len(rows)} entries for {n} volumes")
    return rows


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
    # a conditional model's volumes: each one's covariates (``{"age": 75.0, "sex": "F"}``)
    conditions: list[CovariateRow] | None = None

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
    def covariates(self):
        """A conditional model's covariate schema (``.names``, ``.covariates`` with kinds, means, sds,
        levels and training ranges; ``verydeepvae.data.covariates.CovariateSchema``); None if unconditional."""
        return self._trained.covariates

    @property
    def device(self) -> str:
        return self._trained.device

    def _guidance(self, value: GuidanceLike, use: str = "samples") -> Guidance:
        checkpoint = self._trained.checkpoint
        return resolve_guidance(value, self.covariates, self._trained.run_dir, checkpoint.step, "guidance", use)[0]

    def sample(self, n: int, temperature: float | Sequence[float] = 1.0, seed: int = 0,
               batch_size: int = 4, conditions: Conditions = None, prior: str = "auto",
               guidance: GuidanceLike = "auto", voxels: str = "auto") -> Volumes:
        """n volumes from the prior: ``data`` (n, R, R, R).  ``temperature``: one value, or one per
        resolution level (highest resolution first); the same seed, temperature and batch size give
        the same volumes as ``verydeepvae sample``.  A conditional model takes ``conditions``: one
        dict for every volume (``{"age": 75, "sex": "F"}``) or a list of n dicts, each giving any
        subset of the covariates (the rest is drawn from the training scans' given them, as the CLI
        does); ``Volumes.conditions`` holds every volume's full covariates.  ``prior``: "auto" (the
        Gaussian fitted at the end of training for the coarsest latents when the run chose it),
        "learned" or "fitted" (``verydeepvae sample --prior``).  ``guidance``: a conditional model's
        covariate guidance scale (``verydeepvae sample --guidance``; 1 = the model as trained), or one
        per covariate (``{"age": 2, "lesion_load": 5}``, others 1, or the CLI's ``"age=2,lesion_load=5"``);
        "calibrated" the scales ``verydeepvae calibrate-guidance`` measured for this checkpoint, "auto"
        (default) those when measured, else 1.
        ``voxels``: "auto" (as the run's ``sample_voxels`` setting says), "mean", "draw" (each voxel
        drawn from p(x | z), neighbours correlated as in the training volumes when the run measured
        it) or "independent" (drawn, each voxel on its own); ``verydeepvae sample --voxels``."""
        if n < 1 or batch_size < 1:
            raise UserError(f"n and batch_size must be >= 1, got {n} and {batch_size}")
        weights = self._guidance(guidance).weights(self.covariates)
        model = self.torch_module
        temperature = check_temperature(model, temperature)
        vectors, rows, references = None, None, None
        if self.covariates is not None:
            requests = _per_volume(conditions, n, "conditions")
            resolved = conditional.resolve(self.covariates,
                                           [conditional.parse_request(self.covariates, r) for r in requests], seed)
            vectors, rows, references = resolved.vectors, resolved.rows, resolved.references
        elif conditions is not None:
            raise UserError("this model is unconditional; it takes no conditions")
        chunks = [v for _, v in iter_samples(model, n, temperature, seed, batch_size, self.device, False,
                                             covariates=vectors, prior=prior, guidance=weights,
                                             references=references, voxels=voxels)]
        data = np.concatenate(chunks).astype(np.float32)
        return Volumes(data, self._affines(n), [f"sample_{i:04d}" for i in range(n)], rows)

    def reconstruct(self, inputs: Inputs, posterior_mean: bool = True, batch_size: int = 4,
                    covariates: Conditions = None) -> Volumes:
        """Reconstructions (posterior mean at every layer, or a posterior sample) of NIfTI files or
        of model-grid volumes; ``data`` (N, R, R, R).  A conditional model needs each scan's own
        ``covariates`` (a dict for all, or one per volume); for NIfTI paths they are otherwise looked
        up as the CLI does (the run's covariates.json, a participants.tsv next to the scans)."""
        x, affines, names = self._inputs(inputs)
        c = self._scan_covariates(inputs, covariates, x.shape[0])
        out = [self.torch_module.reconstruct(batch, posterior_mean=posterior_mean, covariates=cb).cpu()[:, 0].numpy()
               for batch, cb in zip(self._batches(x, batch_size), self._covariate_batches(c, x.shape[0], batch_size))]
        return Volumes(np.concatenate(out).astype(np.float32), affines, names, self._rows(c))

    def encode(self, inputs: Inputs, batch_size: int = 4, covariates: Conditions = None) -> list[torch.Tensor]:
        """Posterior means of every latent layer, coarsest first: one tensor (N, C, s, s, s) per
        layer, float32 on the CPU (``decode`` takes them back).  ``covariates``: as :meth:`reconstruct`."""
        x, _, _ = self._inputs(inputs)
        c = self._scan_covariates(inputs, covariates, x.shape[0])
        per_batch = [[z.float().cpu() for z in self.torch_module.encode(batch, covariates=cb)]
                     for batch, cb in zip(self._batches(x, batch_size), self._covariate_batches(c, x.shape[0], batch_size))]
        return [torch.cat(layer) for layer in zip(*per_batch)]

    def decode(self, latents: Sequence[torch.Tensor], batch_size: int = 4, covariates: Conditions = None) -> Volumes:
        """Volumes from latents of every layer (as :meth:`encode` returns them); ``data`` (N, R, R, R).
        A conditional model decodes under ``covariates`` (a dict for all, or one per volume, complete)."""
        latents = list(latents)
        if len(latents) != self.torch_module.num_layers:
            raise UserError(f"expected {self.torch_module.num_layers} latent tensors (one per layer), got {len(latents)}")
        n = latents[0].shape[0]
        c = self._complete(covariates, n, "covariates")
        out = []
        with torch.no_grad():
            for start, cb in zip(range(0, n, batch_size), self._covariate_batches(c, n, batch_size)):
                zs = [z[start:start + batch_size].to(self.device) for z in latents]
                out.append(self.torch_module.decode(zs, covariates=cb).cpu()[:, 0].numpy())
        return Volumes(np.concatenate(out).astype(np.float32), self._affines(n), [f"decoded_{i:04d}" for i in range(n)],
                       self._rows(c))

    def counterfactual(self, inputs: Inputs, condition: CovariateRow | None = None,
                       sweep: tuple[str, Sequence[Any]] | None = None, observed: Conditions = None,
                       mode: str = "noise", batch_size: int = 4, guidance: GuidanceLike = "auto") -> Volumes:
        """Counterfactuals of scans (a conditional model; ``verydeepvae counterfactual``'s method,
        ``counterfactual.py``): each scan encoded with its own covariates (``observed``, else looked up
        as :meth:`reconstruct` does) and decoded with ``condition`` applied (``{"age": 80}``), or at
        every value of ``sweep`` (``("age", [50, 60, 70])``).  ``data`` (N x K, R, R, R), scan by
        scan; ``names`` ``<scan>_<covariate>-<value>``; ``conditions`` each volume's covariates.
        ``mode="latents"`` keeps the latents instead of their standardised residuals; ``guidance`` W
        moves the conditioning W times as far from each scan's own values (``--guidance``; one per
        covariate as in :meth:`sample`)."""
        from .counterfactual import counterfactual_volumes, value_label

        schema = conditional.require_schema(self._trained, "counterfactual")
        weights = self._guidance(guidance, "counterfactuals").weights(schema)
        x, affines, names = self._inputs(inputs)
        own = self._scan_covariates(inputs, observed, x.shape[0])
        change = conditional.parse_request(schema, condition or {})
        values = [None] if sweep is None else [schema.get(sweep[0]).parse(v) for v in sweep[1]]
        if not change and sweep is None:
            raise UserError("counterfactual needs a condition and/or a sweep")
        data, out_affines, out_names, rows = [], [], [], []
        for i in range(x.shape[0]):
            targets = [{**own[i], **change, **({} if v is None else {sweep[0]: v})} for v in values]
            _, volumes = counterfactual_volumes(self.torch_module, x[i, 0].numpy(), schema.encode([own[i]])[0],
                                                schema.encode(targets), mode, batch_size, self.device, weights)
            data.append(volumes)
            out_affines += [affines[i]] * len(targets)
            out_names += [f"{names[i]}_" + ("counterfactual" if v is None else value_label(sweep[0], v))
                          for v in values]
            rows += targets
        return Volumes(np.concatenate(data).astype(np.float32), np.stack(out_affines), out_names, rows)

    # -- conditional models ------------------------------------------------------------------------
    def _complete(self, given: Conditions, n: int, what: str) -> list[CovariateRow] | None:
        """Checked complete covariate rows for n volumes (None for an unconditional model)."""
        schema = self.covariates
        if schema is None:
            if given is not None:
                raise UserError(f"this model is unconditional; it takes no {what}")
            return None
        if given is None:
            raise UserError(f"this model is conditioned on {', '.join(schema.names)}: give {what}")
        rows = [conditional.parse_request(schema, r, what) for r in _per_volume(given, n, what)]
        for row in rows:
            absent = [name for name in schema.names if name not in row]
            if absent:
                raise UserError(f"{what}: no value for {absent[0]} (a conditional model needs every covariate here)")
        return rows

    def _scan_covariates(self, inputs: Inputs, given: Conditions, n: int) -> list[CovariateRow] | None:
        if self.covariates is None or given is not None or isinstance(inputs, (np.ndarray, torch.Tensor)):
            return self._complete(given, n, "covariates")
        paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
        rows, _ = conditional.scan_covariates(self._trained, [f for p in paths for f in input_files(p)])
        return rows

    def _covariate_batches(self, rows: list[CovariateRow] | None, n: int, batch_size: int):
        for start in range(0, n, batch_size):
            if rows is None:
                yield None
            else:
                yield torch.from_numpy(self.covariates.encode(rows[start:start + batch_size])).to(self.device)

    @staticmethod
    def _rows(rows: list[CovariateRow] | None) -> list[CovariateRow] | None:
        return None if rows is None else [dict(r) for r in rows]

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
