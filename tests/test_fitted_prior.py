"""The fitted coarse-level prior: its Gaussian, its fit to the training volumes, the choice made at
the end of training, and how sampling uses it (model/fitted_prior.py, train/fit_prior.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_train_args, write_ellipsoids
from verydeepvae.cli import main
from verydeepvae.config import build_config
from verydeepvae.generate import load_model
from verydeepvae.model import VeryDeepVAE
from verydeepvae.model.fitted_prior import FittedPrior
from verydeepvae.sampling import fitted_levels
from verydeepvae import checkpoint as ckpt, metrics
from verydeepvae.train import fit_prior


def _gaussian(dim_shapes=((2, 1, 1, 1), (1, 2, 2, 2)), seed=0) -> FittedPrior:
    g = torch.Generator().manual_seed(seed)
    dim = sum(int(np.prod(s)) for s in dim_shapes)
    a = torch.randn(dim, dim, generator=g)
    cov = a @ a.T / dim + torch.eye(dim) * 0.1
    return FittedPrior([0, 1], list(dim_shapes), torch.randn(dim, generator=g), torch.linalg.cholesky(cov))


def test_draws_follow_the_gaussian_and_the_temperature():
    prior = _gaussian()
    draws = prior.draw(20000, [1.0, 1.0], torch.Generator().manual_seed(1))
    assert draws[0].shape == (20000, 2, 1, 1, 1) and draws[1].shape == (20000, 1, 2, 2, 2)
    flat = torch.cat([draws[0].flatten(1), draws[1].flatten(1)], 1).double()
    cov = prior.scale_tril.double() @ prior.scale_tril.double().T
    assert torch.allclose(flat.mean(0), prior.mean.double(), atol=0.05)
    assert torch.allclose(torch.cov(flat.T), cov, atol=0.06)
    at_zero = prior.draw(3, [0.0, 0.0], torch.Generator().manual_seed(2))
    assert torch.allclose(at_zero[1][0].flatten(), prior.mean[2:])


def _noise_gaussian(seed=0) -> FittedPrior:
    """A Gaussian over standardised residuals covering 2 of 2 units of layer 0 and 3 of 8 of layer 1."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(5, 5, generator=g)
    return FittedPrior([0, 1], [(2, 1, 1, 1), (1, 2, 2, 2)], torch.randn(5, generator=g),
                       torch.linalg.cholesky(a @ a.T / 5 + torch.eye(5) * 0.1),
                       [torch.tensor([0, 1]), torch.tensor([1, 4, 6])], noise=True)


def test_noise_form_draws_its_units_jointly_and_the_rest_standard_normal():
    prior = _noise_gaussian()
    draws = prior.draw(20000, [1.0, 0.5], torch.Generator().manual_seed(1))
    assert draws[0].shape == (20000, 2, 1, 1, 1) and draws[1].shape == (20000, 1, 2, 2, 2)
    covered = torch.cat([draws[0].flatten(1), draws[1].flatten(1)[:, [1, 4, 6]]], 1).double()
    cov = prior.scale_tril.double() @ prior.scale_tril.double().T
    assert torch.allclose(covered.mean(0), prior.mean.double(), atol=0.05)  # the temperature scales deviations
    assert torch.allclose(torch.cov(covered.T)[:2, :2], cov[:2, :2], atol=0.06)
    assert torch.allclose(covered[:, 2:].std(0), 0.5 * cov.diagonal()[2:].sqrt(), rtol=0.05)
    rest = draws[1].flatten(1)[:, [0, 2, 3, 5, 7]].double()
    assert torch.allclose(rest.mean(0), torch.zeros(5, dtype=torch.float64), atol=0.03)
    assert torch.allclose(rest.std(0), torch.full((5,), 0.5, dtype=torch.float64), atol=0.02)
    assert prior.unit_counts() == [2, 3] and prior.describe()["units"] == [2, 3]


def test_tensors_round_trip_and_damaged_tensors_are_refused():
    noise = _noise_gaussian()
    again = FittedPrior.from_tensors(noise.tensors(), noise.describe())
    assert again.noise and [u.tolist() for u in again.units] == [[0, 1], [1, 4, 6]]
    assert torch.equal(again.scale_tril, noise.scale_tril)
    bad = noise.tensors()
    bad["fitted_prior.units.1"] = torch.tensor([1, 4, 8])  # layer 1 has 8 units: index 8 is outside
    with pytest.raises(ValueError):
        FittedPrior.from_tensors(bad, noise.describe())
    prior = _gaussian()
    again = FittedPrior.from_tensors(prior.tensors(), prior.describe())
    assert again.layers == prior.layers and again.shapes == prior.shapes
    assert torch.equal(again.mean, prior.mean) and torch.equal(again.scale_tril, prior.scale_tril)
    bad = prior.tensors()
    bad["fitted_prior.mean"] = bad["fitted_prior.mean"][:-1]
    with pytest.raises(ValueError):
        FittedPrior.from_tensors(bad, prior.describe())


def _tiny_model() -> VeryDeepVAE:
    torch.manual_seed(0)
    return VeryDeepVAE(build_config(preset="tiny")).eval()


def _some_units_active(monkeypatch, model: VeryDeepVAE, volumes: np.ndarray) -> None:
    """An untrained model's posterior hardly varies: lower the bar to the median unit of the least
    active coarse layer, so that every layer has active units and one of them inactive ones too."""
    layers = fit_prior.coarse_layers(model, max(fit_prior.CANDIDATE_LEVELS))
    activity = fit_prior.posterior_residuals(model, volumes, 3, 0, layers).activity
    bar = min(float(np.median(a)) for a in activity.values() if a.size > 1)
    monkeypatch.setattr(fit_prior, "ACTIVE_VARIANCE", bar)


@pytest.mark.parametrize("levels", [2, 3])
def test_fit_covers_the_active_units_of_the_coarsest_levels(monkeypatch, levels):
    model = _tiny_model()
    layer_levels = model.decoder.layer_levels
    layers = fit_prior.coarse_layers(model, levels)
    top = model.decoder.num_levels - 1
    assert layers and {layer_levels[i] for i in layers} == set(range(top - levels + 1, top + 1))
    volumes = np.random.default_rng(0).random((6,) + (model.resolution,) * 3, dtype=np.float32)
    _some_units_active(monkeypatch, model, volumes)
    prior = fit_prior.fit(model, volumes, batch_size=3, seed=0, levels=levels)
    shapes = model.latent_shapes()
    assert prior.noise and prior.shapes == [shapes[i] for i in layers]
    # the units are those whose posterior-mean residual varies across the volumes
    x = torch.from_numpy(volumes[:, None])
    means = [torch.cat([model.encode(x[s:s + 3], as_noise=True)[i].flatten(1) for s in (0, 3)]) for i in layers]
    active = [torch.nonzero(m.double().var(0, unbiased=False) > fit_prior.ACTIVE_VARIANCE).flatten() for m in means]
    assert [u.tolist() for u in prior.units] == [a.tolist() for a in active]
    assert 0 < prior.dim < sum(int(np.prod(shapes[i])) for i in layers)
    # the mean and the (shrunk) covariance are those of the same posterior draws, made again with
    # the same seed (after each batch's posterior-mean pass), as residuals under the learned prior
    generator = torch.Generator().manual_seed(0)
    rows = []
    for start in (0, 3):
        _, *drawn = model.encode_passes(x[start:start + 3], [False] + [True] * fit_prior.DRAWS_PER_VOLUME,
                                        num_layers=len(layers), as_noise=True, generator=generator)
        rows += [torch.cat([es[i].flatten(1)[:, a] for i, a in zip(layers, active)], 1) for es in drawn]
    draws = torch.cat(rows).double()
    assert torch.allclose(prior.mean, draws.mean(0).float(), atol=1e-5)
    shrunk, _ = metrics.ledoit_wolf_covariance(draws.numpy())
    cov = (prior.scale_tril.double() @ prior.scale_tril.double().T).numpy()
    assert np.allclose(cov, shrunk, rtol=1e-3, atol=1e-5)


def test_no_active_unit_or_too_many_no_fit(monkeypatch):
    model = _tiny_model()
    volumes = np.random.default_rng(0).random((4,) + (model.resolution,) * 3, dtype=np.float32)
    monkeypatch.setattr(fit_prior, "ACTIVE_VARIANCE", float("inf"))
    with pytest.raises(ValueError, match="no active latent unit"):
        fit_prior.fit(model, volumes, batch_size=2, seed=0, levels=2)
    monkeypatch.setattr(fit_prior, "ACTIVE_VARIANCE", -1.0)  # every unit
    monkeypatch.setattr(fit_prior, "MAX_DIMENSIONS", 3)
    with pytest.raises(ValueError, match="more than 3 active units"):
        fit_prior.fit(model, volumes, batch_size=2, seed=0, levels=2)


def test_the_deepest_gaussian_is_compared_with_the_learned_prior_and_kept_when_closer(monkeypatch):
    model = _tiny_model()
    volumes = np.random.default_rng(3).random((6,) + (model.resolution,) * 3, dtype=np.float32)
    _some_units_active(monkeypatch, model, volumes)
    asked = []

    def frechet_to(model, prior, *a, **k):
        asked.append(prior if prior == "learned" else tuple(model.fitted_prior.layers))
        return 50.0 if prior == "learned" else 10.0

    monkeypatch.setattr(fit_prior, "frechet_to", frechet_to)
    tensors, meta = fit_prior.fit_and_choose(model, volumes, batch_size=3, seed=0)
    # one Gaussian, over 1³-4³, is drawn from and compared: no contest between depths
    assert asked == ["learned", tuple(fit_prior.coarse_layers(model, 3))]
    assert meta["used"] and meta["frechet_to_training"] == {"learned": 50.0, "fitted 1³, 2³, 4³": 10.0}
    assert model.fitted_prior.layers == fit_prior.coarse_layers(model, 3) == meta["layers"]
    assert tensors["fitted_prior.mean"].numel() == meta["dim"] == model.fitted_prior.dim
    assert "the Gaussian fitted to the 1³, 2³, 4³ latents" in fit_prior.notice(meta)
    monkeypatch.setattr(fit_prior, "frechet_to", lambda model, prior, *a, **k: 1.0 if prior == "learned" else 5.0)
    tensors, meta = fit_prior.fit_and_choose(model, volumes, batch_size=3, seed=0)
    assert tensors == {} and not meta["used"] and model.fitted_prior is None
    assert "sampling uses the learned prior" in fit_prior.notice(meta)


def test_a_shallower_gaussian_only_when_the_deeper_exceeds_the_dimension_cap(monkeypatch):
    model = _tiny_model()
    assert fit_prior.candidate_levels(model) == [3, 2]
    for preset in ("demo", "32", "128"):
        assert fit_prior.candidate_levels(VeryDeepVAE(build_config(preset=preset))) == [3, 2], preset
    volumes = np.random.default_rng(3).random((6,) + (model.resolution,) * 3, dtype=np.float32)
    monkeypatch.setattr(fit_prior, "ACTIVE_VARIANCE", -1.0)  # every unit active: dims are the layers' sizes
    sizes = model.latent_sizes()
    dims = {n: sum(sizes[i] for i in fit_prior.coarse_layers(model, n)) for n in fit_prior.CANDIDATE_LEVELS}
    monkeypatch.setattr(fit_prior, "MAX_DIMENSIONS", dims[3] - 1)
    monkeypatch.setattr(fit_prior, "frechet_to", lambda model, prior, *a, **k: 1.0 if prior == "learned" else 0.5)
    _, meta = fit_prior.fit_and_choose(model, volumes, batch_size=3, seed=0)
    assert set(meta["frechet_to_training"]) == {"learned", "fitted 1³, 2³"} and meta["used"]
    assert model.fitted_prior.layers == fit_prior.coarse_layers(model, 2)
    monkeypatch.setattr(fit_prior, "MAX_DIMENSIONS", dims[2] - 1)  # neither fits: the learned prior stays
    tensors, meta = fit_prior.fit_and_choose(model, volumes, batch_size=3, seed=0)
    assert tensors == {} and not meta["used"] and "more than" in meta["not_fitted"]
    assert model.fitted_prior is None


def test_sampling_uses_the_fitted_prior_only_when_asked_or_attached(monkeypatch):
    model = _tiny_model()
    with pytest.raises(ValueError, match="no fitted prior"):
        model.sample(2, prior="fitted")
    learned = model.sample(2, generator=torch.Generator().manual_seed(0))
    assert fitted_levels(model) == []  # what reports record: no fitted Gaussian, nothing drawn from one
    volumes = np.random.default_rng(1).random((4,) + (model.resolution,) * 3, dtype=np.float32)
    monkeypatch.setattr(fit_prior, "ACTIVE_VARIANCE", -1.0)
    model.fitted_prior = fit_prior.fit(model, volumes, batch_size=2, seed=0, levels=2)
    assert fitted_levels(model) == [1, 2] and fitted_levels(model, "learned") == []
    # shift the Gaussian far away: samples drawn with it must change, "learned" must not
    model.fitted_prior.mean += 5.0
    fitted = model.sample(2, generator=torch.Generator().manual_seed(0))
    again_learned = model.sample(2, generator=torch.Generator().manual_seed(0), prior="learned")
    assert torch.equal(again_learned, learned)
    assert not torch.allclose(fitted, learned)
    with pytest.raises(ValueError, match="prior must be"):
        model.sample(1, prior="other")


@pytest.mark.slow
def test_training_fits_decides_records_and_sampling_follows(tmp_path: Path, monkeypatch, capsys):
    data = tmp_path / "data"
    write_ellipsoids(data, 8)
    monkeypatch.setattr(fit_prior, "MIN_VOLUMES", 2)  # a tiny data set is fitted too
    monkeypatch.setattr(fit_prior, "ACTIVE_VARIANCE", -1.0)  # 4 steps leave no unit active
    # make the fitted Gaussian win, so that the kept case is exercised end to end
    real = fit_prior.frechet_to
    monkeypatch.setattr(fit_prior, "frechet_to", lambda model, prior, *a, **k:
                        real(model, prior, *a, **k) + (1e6 if prior == "learned" else 0.0))
    run = tmp_path / "run"
    assert main(tiny_train_args(data, run, "--max-steps", "4")) == 0
    out = capsys.readouterr().out
    assert "coarse-level prior: sampling uses the Gaussian fitted to the 1³, 2³" in out
    path = ckpt.list_checkpoints(ckpt.checkpoint_dir(run))[-1]
    checkpoint = ckpt.load_checkpoint(path)
    meta = checkpoint.meta["fitted_prior"]
    # with the configured default of 8 leading components of the 8³ and 16³ layers, fewer when the
    # volumes cannot give 8
    count = min(8, checkpoint.meta["data"]["num_train"] - 1)
    assert meta["components"]["count"] == count and meta["components"]["shapes"] == [[4, 8, 8, 8], [4, 16, 16, 16]]
    assert meta["used"] is True and set(meta["frechet_to_training"]) == {
        "learned", f"fitted 1³, 2³, 4³ + {count} components of 8³, 16³"}
    assert meta["num_volumes"] == checkpoint.meta["data"]["num_train"]
    assert "fitted_prior.mean" in checkpoint.tensors and "fitted_prior.components.basis" in checkpoint.tensors
    model = load_model(checkpoint)
    assert model.fitted_prior is not None and model.fitted_prior.layers == meta["layers"]
    assert model.fitted_prior.components.layers == meta["components"]["layers"]
    assert load_model(checkpoint, use_ema=False).fitted_prior is None  # fitted for the EMA weights only
    from verydeepvae.train.inspect_run import inspect_run

    assert any("coarse-level prior for sampling: the Gaussian fitted to the 1³, 2³" in line for line in inspect_run(run))
    for prior in ("auto", "learned"):
        assert main(["sample", "--checkpoint", str(run), "--num", "2", "--output", str(tmp_path / prior),
                     "--prior", prior, "--no-progress"]) == 0
    record = json.loads((tmp_path / "auto" / "samples.json").read_text())
    assert record["prior"].startswith("fitted Gaussian")
    assert json.loads((tmp_path / "learned" / "samples.json").read_text())["prior"] == "learned prior"
    a = [p.read_bytes() for p in sorted((tmp_path / "auto").glob("sample_*.nii.gz"))]
    b = [p.read_bytes() for p in sorted((tmp_path / "learned").glob("sample_*.nii.gz"))]
    assert a != b


@pytest.mark.slow
def test_too_few_volumes_or_switched_off_no_fit(tmp_path: Path, capsys):
    data = tmp_path / "data"
    write_ellipsoids(data, 6)
    run = tmp_path / "run"
    assert main(tiny_train_args(data, run, "--max-steps", "2", "--verbose")) == 0
    assert f"fewer than {fit_prior.MIN_VOLUMES} usable training volumes" in capsys.readouterr().out
    checkpoint = ckpt.load_checkpoint(ckpt.list_checkpoints(ckpt.checkpoint_dir(run))[-1])
    assert "fitted_prior" not in checkpoint.meta


@pytest.mark.slow
def test_without_fitting_there_is_nothing_and_fitted_is_a_one_line_error(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(fit_prior, "MIN_VOLUMES", 2)
    data = tmp_path / "data"
    write_ellipsoids(data, 6)
    run = tmp_path / "run"
    assert main(tiny_train_args(data, run, "--max-steps", "2", "--set", "fitted_prior=false")) == 0
    checkpoint = ckpt.load_checkpoint(ckpt.list_checkpoints(ckpt.checkpoint_dir(run))[-1])
    assert "fitted_prior" not in checkpoint.meta
    assert not any(k.startswith("fitted_prior.") for k in checkpoint.tensors)
    capsys.readouterr()
    code = main(["sample", "--checkpoint", str(run), "--num", "1", "--output", str(tmp_path / "s"),
                 "--prior", "fitted"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no fitted prior" in err[0]
    assert not (tmp_path / "s").exists()  # refused before the output folder was made


def test_damaged_training_volumes_are_left_out_and_nothing_fits_without_usable_ones():
    model = _tiny_model()
    good = np.random.default_rng(2).random((3,) + (model.resolution,) * 3, dtype=np.float32)
    bad = good[:1].copy()
    bad[0, 0, 0, 0] = np.nan
    picked = fit_prior.training_volumes(list(np.concatenate([good, bad])[:, None]))  # items (1, R, R, R)
    assert picked.shape == good.shape and np.isfinite(picked).all()
    model.encode = lambda *a, **k: [torch.full((1,) + s, float("nan")) for s in model.latent_shapes()]
    tensors, meta = fit_prior.fit_and_choose(model, good, batch_size=3, seed=0)
    assert tensors == {} and meta["used"] is False and model.fitted_prior is None
    assert "learned" in fit_prior.notice(meta)
