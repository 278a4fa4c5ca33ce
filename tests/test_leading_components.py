"""The leading components of the layers below the fitted Gaussian: their draws, their storage, their
fit to the training volumes and their use in sampling (model/leading_components.py,
train/fit_prior.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from verydeepvae.config import build_config
from verydeepvae.errors import ConfigError
from verydeepvae.model import VeryDeepVAE
from verydeepvae.model.fitted_prior import FittedPrior
from verydeepvae.model.leading_components import LeadingComponents
from verydeepvae.train import fit_prior


def _components(seed=0) -> LeadingComponents:
    """Two components over a (1, 2, 2, 2) layer and a (2, 1, 1, 1) one: D = 10."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(10, 2, generator=g))
    return LeadingComponents([3, 4], [(1, 2, 2, 2), (2, 1, 1, 1)], torch.randn(10, generator=g), basis,
                             torch.tensor([3.0, 0.5]))


def test_draws_spread_along_the_components_and_standard_normal_across_the_rest():
    comp = _components()
    temperatures = [1.0] * 5
    draws = comp.draw(40000, temperatures, torch.Generator().manual_seed(1))
    assert draws[3].shape == (40000, 1, 2, 2, 2) and draws[4].shape == (40000, 2, 1, 1, 1)
    flat = torch.cat([draws[3].flatten(1), draws[4].flatten(1)], 1).double()
    basis = comp.basis.double()
    expected = basis @ torch.diag(comp.scales.double() ** 2) @ basis.T + torch.eye(10, dtype=torch.float64) \
        - basis @ basis.T
    assert torch.allclose(flat.mean(0), comp.mean.double(), atol=0.05)
    assert torch.allclose(torch.cov(flat.T), expected, atol=0.1)
    # the temperature of each layer scales its deviations from the mean
    cooler = comp.draw(40000, [1.0, 1.0, 1.0, 0.0, 0.5], torch.Generator().manual_seed(1))
    assert torch.allclose(cooler[3], comp.mean[:8].reshape(1, 1, 2, 2, 2).expand(40000, -1, -1, -1, -1))
    deviation = cooler[4].flatten(1) - comp.mean[8:]
    assert torch.allclose(deviation, 0.5 * (draws[4].flatten(1) - comp.mean[8:]), atol=1e-5)


def test_tensors_round_trip_alone_and_inside_the_fitted_prior():
    comp = _components()
    again = LeadingComponents.from_tensors(comp.tensors(), comp.describe())
    assert again.layers == [3, 4] and again.shapes == comp.shapes and again.count == 2
    assert all(torch.equal(getattr(again, k), getattr(comp, k)) for k in ("mean", "basis", "scales"))
    bad = comp.tensors()
    bad["fitted_prior.components.scales"] = torch.ones(3)
    with pytest.raises(ValueError, match="do not match"):
        LeadingComponents.from_tensors(bad, comp.describe())
    gaussian = FittedPrior([0], [(2, 1, 1, 1)], torch.zeros(1), torch.eye(1), [torch.tensor([1])], noise=True,
                           components=comp)
    layout = gaussian.describe()
    assert layout["components"] == {"layers": [3, 4], "shapes": [[1, 2, 2, 2], [2, 1, 1, 1]], "count": 2}
    loaded = FittedPrior.from_tensors(gaussian.tensors(), layout)
    assert torch.equal(loaded.components.basis, comp.basis)
    assert gaussian.levels_text() == "1³ + 2 components of 1³, 2³"
    # the decoder's choices: the Gaussian's layer and both component layers, as residuals
    choices = loaded.choices(3, [1.0] * 5, torch.Generator().manual_seed(0))
    assert sorted(choices) == [0, 3, 4] and all(c.noise is not None for c in choices.values())
    # a prior of the earlier form (no components) still loads
    plain = FittedPrior.from_tensors({k: v for k, v in gaussian.tensors().items() if "components" not in k},
                                     {k: v for k, v in layout.items() if k != "components"})
    assert plain.components is None and sorted(plain.choices(1, [1.0] * 5)) == [0]


def test_the_components_cover_whole_levels_below_the_gaussian_within_the_cap(monkeypatch):
    demo = VeryDeepVAE(build_config(preset="demo"))
    levels, sizes = demo.decoder.layer_levels, demo.latent_sizes()
    layers = fit_prior.component_layers(demo, 3)
    assert [32 >> levels[i] for i in layers] == [8, 8, 16, 16, 32]  # every layer below the Gaussian's levels
    assert sum(sizes[i] for i in layers) == 204800
    for preset, expected in (("32", [8, 16, 32]), ("128", [8, 16])):  # 128's 32³ level alone is over the cap
        model = VeryDeepVAE(build_config(preset=preset))
        chosen = fit_prior.component_layers(model, 3)
        assert sorted({model.resolution >> model.decoder.layer_levels[i] for i in chosen}) == expected, preset
    monkeypatch.setattr(fit_prior, "MAX_COMPONENT_DIMENSIONS", 204799)  # 32³ no longer fits: 8³ and 16³
    assert sorted({32 >> levels[i] for i in fit_prior.component_layers(demo, 3)}) == [8, 16]
    assert [32 >> levels[i] for i in fit_prior.component_layers(demo, 2)] == [4, 4, 8, 8, 16, 16]
    monkeypatch.setattr(fit_prior, "MAX_COMPONENT_DIMENSIONS", 10)  # not even 8³
    assert fit_prior.component_layers(demo, 3) == []


def _tiny_model() -> VeryDeepVAE:
    torch.manual_seed(0)
    return VeryDeepVAE(build_config(preset="tiny")).eval()


def test_the_components_are_the_principal_axes_of_the_training_volumes_posterior_means(monkeypatch):
    model = _tiny_model()
    volumes = np.random.default_rng(0).random((7,) + (model.resolution,) * 3, dtype=np.float32)
    layers = fit_prior.component_layers(model, 3)
    assert [model.resolution >> model.decoder.layer_levels[i] for i in layers] == [8, 16]
    residuals = fit_prior.posterior_residuals(model, volumes, 3, 0, fit_prior.coarse_layers(model, 3), layers)
    comp = fit_prior.leading_components(model, residuals, layers, 4)
    x = torch.from_numpy(volumes[:, None])
    means = torch.cat([torch.cat([e[i].flatten(1) for i in layers], 1)
                       for e in (model.encode(x[s:s + 3], as_noise=True) for s in range(0, 7, 3))]).double()
    centred = means - means.mean(0)
    assert torch.allclose(comp.mean.double(), means.mean(0), atol=1e-5)
    assert torch.allclose(comp.basis.T.double() @ comp.basis.double(), torch.eye(4, dtype=torch.float64), atol=1e-5)
    # each component's spread is the training volumes' spread along it, largest first
    along = centred @ comp.basis.double()
    assert torch.allclose(along.std(0), comp.scales.double(), rtol=1e-4)
    assert torch.all(comp.scales[:-1] >= comp.scales[1:])
    # the first is the largest variance of any direction: the top eigenvalue of the covariance (the
    # same as that of the volumes' small Gram matrix over N - 1)
    top = float(torch.linalg.eigvalsh(centred @ centred.T)[-1]) / (len(centred) - 1)
    assert math.isclose(float(comp.scales[0] ** 2), top, rel_tol=1e-3)
    # never more components than the volumes can give
    assert fit_prior.leading_components(model, residuals, layers, 50).count == 6


def test_fit_and_choose_attaches_records_and_samples_with_the_components(monkeypatch):
    model = _tiny_model()
    volumes = np.random.default_rng(3).random((6,) + (model.resolution,) * 3, dtype=np.float32)
    monkeypatch.setattr(fit_prior, "ACTIVE_VARIANCE", -1.0)  # an untrained model: every unit counts
    monkeypatch.setattr(fit_prior, "frechet_to", lambda model, prior, *a, **k: 2.0 if prior == "learned" else 1.0)
    tensors, meta = fit_prior.fit_and_choose(model, volumes, batch_size=3, seed=0, components=3)
    layers = fit_prior.component_layers(model, 3)
    assert meta["used"] and meta["components"] == {"layers": layers, "shapes": [[4, 8, 8, 8], [4, 16, 16, 16]],
                                                   "count": 3}
    assert set(meta["frechet_to_training"]) == {"learned", "fitted 1³, 2³, 4³ + 3 components of 8³, 16³"}
    assert tensors["fitted_prior.components.basis"].shape == (2048 + 16384, 3)
    assert "and 3 leading components of the 8³, 16³ latents" in fit_prior.notice(meta)
    # sampling draws the 8³ and 16³ layers from the components: moving their mean moves the samples
    before = model.sample(2, generator=torch.Generator().manual_seed(0))
    model.fitted_prior.components.mean += 3.0
    assert not torch.allclose(model.sample(2, generator=torch.Generator().manual_seed(0)), before)
    # components=0 keeps the Gaussian alone, as before
    _, plain = fit_prior.fit_and_choose(model, volumes, batch_size=3, seed=0)
    assert "components" not in plain and model.fitted_prior.components is None


def test_the_number_of_components_is_configured_and_checked():
    assert build_config(preset="demo").fitted_prior_components == 8
    assert build_config(preset="demo", overrides={"fitted_prior_components": 0}).fitted_prior_components == 0
    with pytest.raises(ConfigError, match="fitted_prior_components"):
        build_config(preset="demo", overrides={"fitted_prior_components": -1})
