"""A cheap sample-quality signal for every validation: active latent units, a Fréchet ratio and texture.

The ELBO alone does not show whether *samples* improve; ``verydeepvae evaluate`` does, but it is
a separate, heavy run.  :func:`sample_quality` is the few-second version the training loop logs at
each validation (rank 0 only, ``quality/...`` in TensorBoard, ``"kind": "quality"`` in
``metrics.jsonl``).  It uses the same definitions as the evaluation report
(``evaluate/compute.py``), on far fewer volumes, so treat it as a trend, not a result.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Sequence

import numpy as np
import torch

from .. import metrics

# the most validation volumes encoded for the active-unit count: enough for the variance of a
# posterior mean, and a bound on the cost with large validation sets
ACTIVE_UNITS_MAX_VOLUMES = 64
# the fewest volumes the count encodes (validation ones first, then training ones): over fewer, a
# level in use too often reads unused.  The 450-step demo's 2³ level (5 of 64 units active over 48
# held-out phantoms) read unused in 15 % of random sets of 5 of its training phantoms (the demo
# validates on 5), 7 % of sets of 8, and none of 16 or more (forty-sixth session).
ACTIVE_UNITS_MIN_VOLUMES = 16
FRECHET_REPEATS = 5  # random real half splits averaged over (evaluate's baseline_repeats default)
# the encoded volumes (the first ones) on which the voxel noise of the signal's draws is measured: a
# trend, not the final measurement; on the 450-step demo model 16 training volumes gave correlations
# of 0.23 / 0.41 / 0.43 against 0.27 / 0.44 / 0.39 from the 64 the end of training uses (forty-ninth session)
NOISE_VOLUMES = 16


def sample_quality(model: Any, validation: Sequence[Any], reference: np.ndarray, num_samples: int,
                   batch_size: int, device: torch.device | str, seed: int) -> dict[str, float]:
    """Active units per resolution level and the Fréchet ratio of prior samples; returns ``{name: value}``.

    * ``active_units_res{r}`` (count of latent units, one per channel-voxel, summed over the latent
      layers at resolution r³) and ``dead_levels`` (levels with latent layers but no active unit):
      a unit is active when the variance over ``validation`` of its posterior mean
      (``model.encode``) exceeds 0.01 (Burda et al. 2016; ``metrics.ACTIVE_THRESHOLD``).
      At most the first 64 volumes of ``validation`` (a sequence of (1, R, R, R) or (R, R, R)
      volumes in [0, 1], e.g. a dataset; for a conditional model (volume, covariates) pairs) are
      encoded; needs at least 2, else these keys are absent.
    * ``frechet_samples``, ``frechet_real_vs_real`` (squared Fréchet distances on z-scored
      random-3D-CNN features, in squared standard deviations) and ``frechet_ratio`` = their
      quotient (dimensionless):
      ``num_samples`` prior samples at temperature 1 against the real volumes ``reference``
      ((N, R, R, R) in [0, 1]).  As in the evaluation report, a subset of the samples is compared
      with a random half A of the real set and divided by the distance between the real halves A
      and B of the same size (``metrics.matched_to_baseline``, mean over 5 splits), so set-size
      effects cancel: 1 means the samples are as close to real volumes as real volumes are to
      each other; larger is worse.  Drawn voxels follow the voxel noise of ``validation``
      (:func:`_measured_voxel_noise`), as the final samples follow the training volumes'.  With
      few volumes (8 by default) it is noisy and only the trend means something.  Needs
      ``num_samples`` >= 4 and 4 reference volumes, else these keys are absent; non-finite
      samples give NaN.
    * ``roughness_ratio`` (the samples' median voxel-to-voxel roughness over the real volumes') and
      ``fine_correlation_gap`` (their median fine correlation minus the real volumes'), as
      ``evaluate.summary.quality_row`` gives them (``metrics.texture_statistics``): grain reads a
      ratio above 1 and a negative gap, an over-smooth output a ratio below 1 and a positive gap;
      both move towards 1 and 0 as the samples take on the real texture.  With the Fréchet keys;
      NaN when no sample or no real volume has a brain interior to measure.
    * ``seconds``: the wall time of this call.

    Cheap: ``num_samples`` prior samples, one encoder pass over at most 64 validation volumes and a
    small random CNN (no pretrained network, features at <= 64³); 1-2 s for 8 samples at 32³
    (demo preset, 16 volumes encoded) on one CPU core; the texture adds about 0.05 s there and
    0.4 s per volume (samples and reference volumes) at 128³, the voxel noise 1.3-1.6 s at 32³ on
    2 cores.  At 128³ drawing the samples costs more (a decoder pass per sample), and in a
    distributed run the other ranks wait for rank 0 at their next collective meanwhile; set
    ``quality_samples=0`` in the configuration to turn the signal off.

    Runs under ``torch.no_grad()`` in eval mode (the mode is restored).  Randomness comes only from
    a ``torch.Generator`` and numpy ``default_rng`` seeded with ``seed`` -- the same samples' noise
    at every validation, and the global torch/numpy RNG streams are left untouched, so training
    with and without it is bitwise the same.
    """
    started = time.perf_counter()
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        with torch.no_grad():
            out.update(_active_units(model, validation, batch_size, device))
            if num_samples >= 4 and len(reference) >= 4:
                with _measured_voxel_noise(model, validation, batch_size, seed):
                    out.update(_frechet(model, reference, num_samples, batch_size, device, seed))
    finally:
        model.train(was_training)
    out["seconds"] = time.perf_counter() - started
    return out


def reference_volumes(validation: Sequence[Any], train: Sequence[Any], num: int, seed: int) -> np.ndarray:
    """``num`` real volumes (num, R, R, R) float32 (fewer if there are not as many): validation
    volumes, topped up with unaugmented training volumes (``dataset.volume(i)`` when the dataset
    has it) when there are fewer than ``num``; both picked in the order of ``default_rng(seed)``
    permutations, so the same volumes at every validation.  Volumes with non-finite values are
    passed over."""
    rng = np.random.default_rng(seed)
    picked: list[np.ndarray] = []
    for dataset in (validation, train):
        picked += [volume for _, volume in _finite_volumes(dataset, rng.permutation(len(dataset)), num - len(picked))]
    if not picked:
        return np.zeros((0, 1, 1, 1), np.float32)
    return np.stack(picked).astype(np.float32, copy=False)


def active_unit_volumes(validation: Sequence[Any], train: Sequence[Any], num: int, seed: int) -> Sequence[Any]:
    """What the active-unit count encodes: ``validation`` itself when it has ``num`` items, else its
    items topped up to ``num`` with unaugmented training volumes ((1, R, R, R) tensors, paired with
    their covariates when ``train`` has them, as a conditional model's validation items are),
    picked in the order of a ``default_rng(seed)`` permutation -- the same ones at every
    validation; volumes with non-finite values are passed over.  Whether a unit is used is a
    property of the encoder, so training volumes serve as well as unseen ones here (the evaluation
    report counts over held-out volumes)."""
    if len(validation) >= num or len(train) == 0:
        return validation
    items = [validation[i] for i in range(len(validation))]
    covariates = getattr(train, "covariates", None)
    order = np.random.default_rng(seed).permutation(len(train))
    for i, volume in _finite_volumes(train, order, num - len(items)):
        volume = torch.from_numpy(volume)[None]
        items.append(volume if covariates is None else (volume, covariates[i]))
    return items


def _finite_volumes(dataset: Any, order: np.ndarray, num: int) -> list[tuple[int, np.ndarray]]:
    """The first ``num`` volumes of ``dataset`` in ``order`` with only finite values, as (index,
    unaugmented (R, R, R) volume) pairs: read one by one, so no more than needed are loaded."""
    found: list[tuple[int, np.ndarray]] = []
    for i in order:
        if len(found) >= num:
            break
        volume = _volume(dataset, int(i))
        if np.isfinite(volume).all():
            found.append((int(i), volume))
    return found


def _volume(dataset: Any, index: int) -> np.ndarray:
    """Volume ``index`` as (R, R, R): ``dataset.volume`` (the unaugmented one) when it has it."""
    item = dataset.volume(index) if hasattr(dataset, "volume") else dataset[index]
    if isinstance(item, torch.Tensor):
        item = item.detach().float().cpu().numpy()
    item = np.asarray(item, np.float32)
    return item[0] if item.ndim == 4 else item


def _active_units(model, validation, batch_size, device) -> dict[str, float]:
    n = min(len(validation), ACTIVE_UNITS_MAX_VOLUMES)
    if n < 2:
        return {}
    # as the evaluation report: float64 moments, float32 for very many latent units (memory)
    dtype = torch.float64 if model.latent_dimensions() <= 20_000_000 else torch.float32
    stats = [metrics.RunningVariance(dtype) for _ in range(model.num_layers)]
    for x, covariates in _batches(validation, n, batch_size, device):
        for s, z in zip(stats, model.encode(x, covariates=covariates) if covariates is not None else model.encode(x)):
            s.update(z)
    levels = sorted(set(model.layer_levels))
    active = dict.fromkeys(levels, 0)
    for level, s in zip(model.layer_levels, stats):
        active[level] += int(np.sum(s.variance() > metrics.ACTIVE_THRESHOLD))
    out = {f"active_units_res{model.resolution >> level}": float(active[level]) for level in levels}
    out["dead_levels"] = float(sum(1 for level in levels if active[level] == 0))
    return out


def _batches(items: Sequence[Any], n: int, batch_size: int, device: torch.device):
    """The first ``n`` of ``items`` as (x (B, 1, R, R, R) float32, covariates (B, dim) or None) batches."""
    for start in range(0, n, batch_size):
        batch = [items[i] for i in range(start, min(n, start + batch_size))]
        covariates = None
        if batch and isinstance(batch[0], tuple):  # (volume, covariates) of a conditional model
            covariates = torch.stack([torch.as_tensor(c) for _, c in batch]).to(device)
            batch = [v for v, _ in batch]
        yield torch.stack([_as_input(item) for item in batch]).to(device), covariates


@contextlib.contextmanager
def _measured_voxel_noise(model, validation, batch_size, seed):
    """Within the block, ``model.voxel_noise`` is the one measured on the first :data:`NOISE_VOLUMES`
    of ``validation`` (``train/fit_voxel_noise.measure``: the neighbour correlation of their
    deviations from p(x | z)), when the model draws its voxels and there are enough finite ones,
    so that the signal reads the texture the final samples will have; the model's own is restored
    after (and kept when nothing can be measured).  Costs a forward pass over those volumes: 2.1 s
    -> 3.5 s per validation of the demo model on 2 CPU cores."""
    from .fit_voxel_noise import MIN_VOLUMES, measure

    kept = model.voxel_noise
    n = min(len(validation), NOISE_VOLUMES)
    if model.draws_voxels and n >= MIN_VOLUMES:
        x, covariates = next(_batches(validation, n, n, torch.device("cpu")))  # all n in one batch
        volumes = x[:, 0].numpy()
        finite = np.isfinite(volumes).reshape(n, -1).all(1)
        given = None if covariates is None else covariates.float().numpy()[finite]
        if finite.sum() >= MIN_VOLUMES:
            device = model.output_head.conv.weight.device
            try:
                with model.inference_autocast(device):
                    model.voxel_noise = measure(model, volumes[finite], batch_size, seed, given)
            except ValueError:  # no brain interior to measure in: the model's own (during training none)
                pass
    try:
        yield
    finally:
        model.voxel_noise = kept


def _frechet(model, reference, num_samples, batch_size, device, seed) -> dict[str, float]:
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = np.concatenate([
        model.sample(min(batch_size, num_samples - start), 1.0, generator=generator).float().cpu()[:, 0].numpy()
        for start in range(0, num_samples, batch_size)])
    return {**frechet_ratio(samples, reference, device, seed), **texture_against(samples, reference)}


def texture_against(samples: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """``roughness_ratio`` and ``fine_correlation_gap`` (``metrics.texture_comparison``) of ``samples``
    against ``reference``, both (N, R, R, R) in [0, 1]; NaN for non-finite samples."""
    if not np.isfinite(samples).all():
        return {"roughness_ratio": math.nan, "fine_correlation_gap": math.nan}
    return metrics.texture_comparison(metrics.texture_summary(samples), metrics.texture_summary(reference))


def frechet_ratio(samples: np.ndarray, reference: np.ndarray, device: torch.device | str = "cpu",
                  seed: int = 0) -> dict[str, float]:
    """``frechet_samples``, ``frechet_real_vs_real`` and ``frechet_ratio`` (``sample_quality``) of any
    volumes (N, R, R, R) in [0, 1] against real ones; also what ``bench/conditional.py`` uses to
    tell guided samples that still look like brains from ones driven out of the data."""
    if not np.isfinite(samples).all():
        return {"frechet_samples": math.nan, "frechet_real_vs_real": math.nan, "frechet_ratio": math.nan}
    resolution = samples.shape[-1]
    features = metrics.RandomConvFeatures(seed=0, input_size=max(16, min(64, resolution)), device=device)
    real_feats, sample_feats = features(reference), features(samples)
    with _one_blas_thread():
        z = metrics.pooled_standardiser(real_feats, sample_feats)
        matched = metrics.matched_to_baseline(z(sample_feats), z(real_feats), metrics.frechet_distance, seed, FRECHET_REPEATS)
    ratio = matched.get("ratio_to_baseline")
    return {"frechet_samples": float(matched.get("samples_vs_real_half", math.nan)),
            "frechet_real_vs_real": float(matched["real_vs_real"]),
            "frechet_ratio": float(ratio) if ratio is not None else math.nan}


def _one_blas_thread():
    """Single-threaded BLAS for the small (224 x 224) eigendecompositions: several OpenBLAS threads
    on cores busy with training or data loading made them 20x slower (0.2 s -> 4 s)."""
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn (a nilearn dependency)
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _as_input(item: Any) -> torch.Tensor:
    """One volume as a (1, R, R, R) float32 tensor."""
    x = torch.as_tensor(np.asarray(item, np.float32)) if not isinstance(item, torch.Tensor) else item.float()
    return x[None] if x.dim() == 3 else x


def validation_signal(model: Any, bundle: Any, cfg: Any, device: torch.device, seed: int,
                      reference: np.ndarray | None) -> tuple[dict[str, float], np.ndarray]:
    """:func:`sample_quality` at a validation of a training run: active units over the validation
    volumes that validation itself uses (topped up with training volumes to 16,
    :func:`active_unit_volumes`), the Fréchet ratio and texture against ``reference`` real volumes
    (read from the run's data on the first call; the same ones every time).  Returns (the values,
    the reference volumes)."""
    from torch.utils.data import Subset

    val = bundle.val
    used = len(val)  # active units over the validation volumes that validation itself uses
    if cfg.max_validation_batches is not None:
        used = min(used, cfg.max_validation_batches * cfg.batch_size)
    if reference is None:
        reference = reference_volumes(val, bundle.train, cfg.quality_samples, seed)
    if getattr(val, "covariates", None) is not None:
        from ..data.datasets import WithCovariates

        val = WithCovariates(val)  # (volume, covariates) items: encoding needs both
    encoded = active_unit_volumes(Subset(val, range(used)), bundle.train, ACTIVE_UNITS_MIN_VOLUMES, seed)
    values = sample_quality(model, encoded, reference, cfg.quality_samples, cfg.batch_size, device, seed)
    return values, reference
