"""The conditional model (model/condition.py): unconditional models unchanged, a new conditional
model computes what the unconditional one does, conditioning changes the output, noise abduction
gives back the reconstruction, and the misuse errors."""

from __future__ import annotations

import pytest
import torch

from verydeepvae.config import build_config
from verydeepvae.model import VeryDeepVAE

DIM = 3


@pytest.fixture(scope="module")
def cfg():
    return build_config(preset="tiny")


def _pair(cfg):
    torch.manual_seed(0)
    plain = VeryDeepVAE(cfg).eval()
    torch.manual_seed(0)
    conditional = VeryDeepVAE(cfg, covariate_dim=DIM).eval()
    return plain, conditional


def test_an_unconditional_model_has_no_conditioning_weights(cfg):
    plain, conditional = _pair(cfg)
    assert plain.condition is None and plain.covariate_dim == 0
    assert not any(k.startswith("condition.") for k in plain.state_dict())
    assert "covariate_bank" not in plain.state_dict() and "covariate_bank" not in conditional.state_dict()
    extra = set(conditional.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("condition.") for k in extra)


def test_a_new_conditional_model_computes_what_the_unconditional_one_does(cfg):
    plain, conditional = _pair(cfg)
    # the other modules are built first, so the same seed gives them the same initial weights
    shared = plain.state_dict()
    assert all(torch.equal(shared[k], v) for k, v in conditional.state_dict().items() if k in shared)
    x = torch.rand(2, 1, 16, 16, 16)
    c = torch.randn(2, DIM)
    torch.manual_seed(1)
    a = plain(x)
    torch.manual_seed(1)
    b = conditional(x, covariates=c)
    torch.testing.assert_close(a.elbo, b.elbo)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(plain.sample(2, 1.0, generator=g1), conditional.sample(2, 1.0, generator=g2, covariates=c))


def test_conditioning_changes_the_output(cfg):
    _, model = _pair(cfg)
    with torch.no_grad():
        for layer in model.condition.film:
            layer.weight.normal_(0.0, 0.2)
    young, old = torch.tensor([[-1.5, 1.0, 0.0]]), torch.tensor([[1.5, 1.0, 0.0]])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = model.sample(1, 0.0, generator=g1, covariates=young)
    b = model.sample(1, 0.0, generator=g2, covariates=old)
    assert (a - b).abs().max() > 1e-3
    x = torch.rand(1, 1, 16, 16, 16)
    assert (model.reconstruct(x, covariates=young) - model.reconstruct(x, covariates=old)).abs().max() > 1e-3
    # the loss depends on the covariates too, and its gradient reaches the embedding
    out = model(x, covariates=old)
    out.loss.backward()
    assert model.condition.mlp[0].weight.grad.abs().sum() > 0


def test_noise_abduction_gives_back_the_posterior_mean_reconstruction(cfg):
    _, model = _pair(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    x = torch.rand(2, 1, 16, 16, 16)
    c = torch.randn(2, DIM)
    noise = model.encode(x, covariates=c, as_noise=True)
    torch.testing.assert_close(model.decode_noise(noise, covariates=c), model.reconstruct(x, covariates=c),
                               atol=1e-5, rtol=1e-4)
    zs = model.encode(x, covariates=c)
    torch.testing.assert_close(model.decode(zs, covariates=c), model.reconstruct(x, covariates=c), atol=1e-5, rtol=1e-4)


def test_sampling_without_covariates_draws_from_the_bank(cfg):
    _, model = _pair(cfg)
    with pytest.raises(ValueError, match="no training covariates"):
        model.sample(1)
    model.set_covariate_bank(torch.randn(5, DIM))
    assert model.sample(2).shape == (2, 1, 16, 16, 16)
    assert model.draw_covariates(3, torch.Generator().manual_seed(0)).shape == (3, DIM)


def test_misuse_is_refused(cfg):
    plain, conditional = _pair(cfg)
    x = torch.rand(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="unconditional"):
        plain.reconstruct(x, covariates=torch.zeros(1, DIM))
    with pytest.raises(ValueError, match="conditional: give covariates"):
        conditional.reconstruct(x)
    with pytest.raises(ValueError, match="shaped"):
        conditional.reconstruct(x, covariates=torch.zeros(1, DIM + 1))
    with pytest.raises(ValueError, match="covariates for 2 volumes"):
        conditional.reconstruct(x, covariates=torch.zeros(2, DIM))


def _random_film(model):
    with torch.no_grad():
        for layer in model.condition.film:
            layer.weight.normal_(0.0, 0.2)
            layer.bias.normal_(0.0, 0.1)


def test_guidance_extrapolates_every_levels_film_from_the_reference(cfg):
    _, model = _pair(cfg)
    _random_film(model)
    model.set_covariate_bank(torch.randn(6, DIM))
    c = torch.randn(2, DIM)
    plain = model._film(c, 2)
    assert all(torch.equal(a, b) for pa, pb in zip(plain, model._film(c, 2, guidance=1.0)) for a, b in zip(pa, pb))
    centre = model.condition(model.covariate_bank.mean(0, keepdim=True).expand(2, -1))
    for w in (0.0, 3.0):
        guided = model._film(c, 2, guidance=w)
        for (s, b), (s0, b0), (sg, bg) in zip(plain, centre, guided):
            torch.testing.assert_close(sg, s0 + w * (s - s0))
            torch.testing.assert_close(bg, b0 + w * (b - b0))
    # guidance 0 at any covariates samples what the population centre does
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    centre_c = model.covariate_bank.mean(0, keepdim=True).expand(2, -1)
    torch.testing.assert_close(model.sample(2, 1.0, generator=g1, covariates=c, guidance=0.0),
                               model.sample(2, 1.0, generator=g2, covariates=centre_c))


def test_guidance_around_a_scans_own_values_keeps_its_reconstruction(cfg):
    _, model = _pair(cfg)
    _random_film(model)
    x = torch.rand(2, 1, 16, 16, 16)
    c = torch.randn(2, DIM)
    noise = model.encode(x, covariates=c, as_noise=True)
    torch.testing.assert_close(model.decode_noise(noise, covariates=c, guidance=4.0, reference=c),
                               model.reconstruct(x, covariates=c), atol=1e-5, rtol=1e-4)
    other = c + 1.0
    plain = model.decode_noise(noise, covariates=other)
    guided = model.decode_noise(noise, covariates=other, guidance=4.0, reference=c)
    assert (guided - plain).abs().max() > 1e-4


def test_guidance_needs_a_conditional_model(cfg):
    plain, _ = _pair(cfg)
    with pytest.raises(ValueError, match="guidance needs a conditional model"):
        plain.sample(1, guidance=2.0)


def _films_close(a, b, **tolerance):
    for (sa, ba), (sb, bb) in zip(a, b):
        torch.testing.assert_close(sa, sb, **tolerance)
        torch.testing.assert_close(ba, bb, **tolerance)


def test_one_guidance_weight_per_dimension_generalises_the_single_scale(cfg):
    _, model = _pair(cfg)
    _random_film(model)
    model.set_covariate_bank(torch.randn(6, DIM))
    c, ref = torch.randn(2, DIM), torch.randn(2, DIM)
    # the same weight everywhere is exactly the single scale
    _films_close(model._film(c, 2, guidance=torch.full((DIM,), 3.0), reference=ref),
                 model._film(c, 2, guidance=3.0, reference=ref), rtol=0, atol=0)
    # all ones is the model as trained
    _films_close(model._film(c, 2, guidance=[1.0] * DIM), model._film(c, 2), rtol=0, atol=0)
    # a covariate at its reference value is unaffected by its own weight: moving only the first
    # dimension, weights (3, 0, 7) guide exactly as the single scale 3
    moved = ref.clone()
    moved[:, 0] = c[:, 0]
    _films_close(model._film(moved, 2, guidance=[3.0, 0.0, 7.0], reference=ref),
                 model._film(moved, 2, guidance=3.0, reference=ref))
    # weight 0 for the rest keeps them at the reference: (w, 0, 0) on c is w on c with the rest at ref
    _films_close(model._film(c, 2, guidance=[2.0, 0.0, 0.0], reference=ref),
                 model._film(moved, 2, guidance=2.0, reference=ref))
    with pytest.raises(ValueError, match=f"1 or {DIM} weights"):
        model._film(c, 2, guidance=[1.0, 2.0], reference=ref)


def test_per_covariate_guidance_changes_only_the_guided_covariates_samples(cfg):
    _, model = _pair(cfg)
    _random_film(model)
    model.set_covariate_bank(torch.randn(6, DIM))
    c, ref = torch.randn(2, DIM), torch.randn(2, DIM)

    def draw(guidance):
        return model.sample(2, 1.0, generator=torch.Generator().manual_seed(7), covariates=c, guidance=guidance,
                            reference=ref)

    assert (draw([4.0, 1.0, 1.0]) - draw(1.0)).abs().max() > 1e-4
    torch.testing.assert_close(draw([4.0, 4.0, 4.0]), draw(4.0))
