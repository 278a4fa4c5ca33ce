"""Drawing volumes from a trained model's prior: the batches (:func:`iter_samples`), the checks of
what a caller asks for (temperature, which prior) and the writer of a folder of samples
(:func:`write_samples`) that both ``verydeepvae sample`` and the end of training use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from . import viz
from .atomic import write_json
from .config import VOXEL_CHOICES
from .console import bar
from .errors import Stopped, UserError
from .inference import intensity_record, reference_range, to_data_intensity
from .model import VeryDeepVAE
from .model.fitted_prior import levels_text, resolutions
from .model.vae import GuidanceWeights
from .volume_io import grid_affine, save_nifti

if TYPE_CHECKING:
    from .data.nifti_load import IntensityReference

MAX_FIGURE_ROWS = 8
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


def write_samples(model: VeryDeepVAE, output_dir: str | Path, num: int,
                  temperature: float | Sequence[float] = 1.0, seed: int = 0, voxel_size_mm: float = 1.0,
                  batch_size: int = 4, device: str | torch.device = "cpu", show_progress: bool = True,
                  intensity_reference: IntensityReference | None = None,
                  extra_record: dict | None = None, covariates: np.ndarray | None = None,
                  prior: str = "auto", guidance: GuidanceWeights = 1.0, references: np.ndarray | None = None,
                  voxels: str = "auto") -> list[Path]:
    """Draw ``num`` volumes from the prior and write ``sample_XXXX.nii.gz``, a montage and a
    ``samples.json`` record (seed, temperature, checkpoint...).  The same seed gives the same volumes;
    temperature 0 gives the prior means at every layer.  ``voxels``: see :data:`VOXELS`.  ``covariates``
    (num, dim): the encoded covariates of each volume of a conditional model (else it draws the
    training scans'; the caller records the requested values in ``extra_record``, see ``conditional.py``).

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
    previews, preview_means = [], []
    affine = grid_affine((model.resolution,) * 3, voxel_size_mm)
    record = {"num": num, "seed": seed, "temperature": temperature, "voxel_size_mm": voxel_size_mm,
              "prior": describe_prior(model, prior), "voxels": describe_voxels(model, voxels),
              "intensity": intensity_record(low_high, "median clamp values of the training files")}
    record.update(extra_record or {})
    try:
        for start, volumes, means in iter_sample_batches(model, num, temperature, seed, batch_size, device,
                                                         show_progress, covariates, prior, guidance, references,
                                                         voxels, means=True):
            for i, volume in enumerate(volumes):
                if len(previews) < MAX_FIGURE_ROWS:
                    previews.append(volume)
                    if means is not None:
                        preview_means.append(means[i])
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
    viz.save_samples_figure(previews, preview_means, output_dir / "samples.png",
                            [p.name for p in paths[: len(previews)]],
                            f"prior samples, temperature {temperature}, seed {seed}")
    write_json(output_dir / "samples.json", {**record, "files": [p.name for p in paths]})
    return paths


class SampleBatch(NamedTuple):
    """One batch of prior samples: the index of its first volume, the volumes (B, R, R, R) float32
    in [0, 1], and, when asked for and the voxels are drawn, the mean of p(x | z) of the same
    latents (else None)."""
    start: int
    volumes: np.ndarray
    means: np.ndarray | None


def iter_samples(model: VeryDeepVAE, num: int, temperature: float | Sequence[float] = 1.0, seed: int = 0,
                 batch_size: int = 4, device: str | torch.device = "cpu", show_progress: bool | None = True,
                 covariates: np.ndarray | torch.Tensor | None = None, prior: str = "auto",
                 guidance: GuidanceWeights = 1.0, references: np.ndarray | torch.Tensor | None = None,
                 voxels: str = "auto") -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(index of the first, volumes (B, R, R, R) float32 in [0, 1])`` batches of prior samples
    (``prior``: which prior draws the coarse layers; ``guidance`` (``Guidance.weights``), ``references``
    (num, dim): a conditional model's covariate guidance, ``conditional.Conditions``; as in
    ``VeryDeepVAE.sample``).

    One generator seeded with ``seed`` drives every batch, so the volumes depend only on the seed,
    the temperature and the batch size (and, for a conditional model, ``covariates`` (num, dim):
    each volume's encoded covariates; without them the model draws the training scans')."""
    for batch in iter_sample_batches(model, num, temperature, seed, batch_size, device, show_progress,
                                     covariates, prior, guidance, references, voxels):
        yield batch.start, batch.volumes


def iter_sample_batches(model: VeryDeepVAE, num: int, temperature: float | Sequence[float] = 1.0, seed: int = 0,
                        batch_size: int = 4, device: str | torch.device = "cpu", show_progress: bool | None = True,
                        covariates: np.ndarray | torch.Tensor | None = None, prior: str = "auto",
                        guidance: GuidanceWeights = 1.0, references: np.ndarray | torch.Tensor | None = None,
                        voxels: str = "auto", means: bool = False) -> Iterator[SampleBatch]:
    """:func:`iter_samples`' batches as :class:`SampleBatch`; with ``means`` a batch whose voxels are
    drawn carries the mean of p(x | z) of the same latents too (the volumes are the same either way)."""
    model = model.to(device).eval()
    check_prior(model, prior)
    draw = voxels_draw(voxels)
    with_means = means and draws(model, voxels)
    correlated = voxels != "independent"
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
            chosen = dict(generator=generator, covariates=given, prior=prior, guidance=guidance, reference=around,
                          correlated_voxels=correlated)
            if with_means:
                mean, volumes = model.sample_mean_and_draw(count, temperature, **chosen)
            else:
                mean, volumes = None, model.sample(count, temperature, draw_voxels=draw, **chosen)
            yield SampleBatch(start, _numpy(volumes), None if mean is None else _numpy(mean))
            shown.update(count)


def _numpy(volumes: torch.Tensor) -> np.ndarray:
    """(B, 1, R, R, R) tensor -> (B, R, R, R) float32 array."""
    return volumes.float().cpu()[:, 0].numpy()


def check_prior(model: VeryDeepVAE, prior: str) -> None:
    """A clear error for a ``prior`` the model cannot sample with (``VeryDeepVAE.prior_in_use``)."""
    try:
        model.prior_in_use(prior)
    except ValueError as error:
        raise UserError(str(error)) from None


VOXELS = VOXEL_CHOICES
"""How a sample's voxels come from p(x | z): "auto" as the run's ``sample_voxels`` says
(``VeryDeepVAE.draws_voxels``), "mean", "draw" (with the neighbour correlation measured at the end
of training, model/voxel_noise.py, when the model has one) or "independent" (drawn, each voxel on its
own: the draws before that measurement existed)."""


def voxels_draw(voxels: str) -> bool | None:
    """``VeryDeepVAE.sample``'s ``draw_voxels`` for a :data:`VOXELS` choice (None: the model's default)."""
    if voxels not in VOXELS:
        raise UserError(f"voxels must be one of {', '.join(VOXELS)}, got {voxels!r}")
    return None if voxels == "auto" else voxels in ("draw", "independent")


def draws(model: VeryDeepVAE, voxels: str = "auto") -> bool:
    """Whether ``model``'s samples draw their voxels under a :data:`VOXELS` choice."""
    draw = voxels_draw(voxels)
    return model.draws_voxels if draw is None else draw


DRAWN = "each voxel drawn from p(x | z)"


def describe_voxels(model: VeryDeepVAE, voxels: str = "auto") -> str:
    """How a sample's voxels come from p(x | z), for samples.json and reports (starts with
    :data:`DRAWN` when they are drawn)."""
    if not draws(model, voxels):
        return "the mean of p(x | z)"
    mixtures = getattr(model.likelihood, "num_mixtures", 1)
    text = f"{DRAWN}, a mixture of {mixtures} discretised logistics" if mixtures > 1 else DRAWN
    if model.voxel_noise is not None and voxels != "independent":
        return text + (f", neighbours correlated as in the training volumes ({model.voxel_noise.text()} along "
                       "depth / height / width; model/voxel_noise.py)")
    return text + ", independently" if model.voxel_noise is not None else text


def fitted_levels(model: VeryDeepVAE, prior: str = "auto") -> list[int]:
    """Resolutions (edge length, coarsest first) whose latents the fitted Gaussian draws under
    ``prior``; empty when the learned prior draws every layer."""
    fitted = model.prior_in_use(prior)
    return [] if fitted is None else resolutions(fitted.shapes)


def describe_prior(model: VeryDeepVAE, prior: str = "auto") -> str:
    """Which prior draws the coarse latents, for samples.json and reports."""
    check_prior(model, prior)  # the one-line error for "fitted" without one, before anything is written
    fitted = model.prior_in_use(prior)
    if fitted is None:
        return "learned prior"
    text = f"fitted Gaussian for the {levels_text(fitted.shapes)} latents"
    if fitted.components is not None:
        text += (f" and {fitted.components.count} leading components of the "
                 f"{levels_text(fitted.components.shapes)} latents")
    return text + " (model/fitted_prior.py)"
