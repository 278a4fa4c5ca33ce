"""Model: shapes, sizes, initialisation, resampling and the maths of the KL and the likelihoods."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from verydeepvae import sampling
from verydeepvae.config import build_config
from verydeepvae.errors import UserError
from verydeepvae.model import VeryDeepVAE
from verydeepvae.model import gaussian
from verydeepvae.model.blocks import Conv3d
from verydeepvae.model.likelihood import DiscretisedLogistic, Gaussian

# Parameter counts of the original project's presets (measured upstream) beside ours.  Ours are
# larger because channels_per_latent 200 at 1³ is used as configured (the original silently
# clamped it to the level's width), and because the top layer has a prior network fed by a learned
# constant (VDVAE) instead of a fixed N(0, I).  With the decoder's per-voxel biases (VDVAE's bias_xs,
# up to 32³ by default) they are larger still; without them (bias_max_resolution=0) within 2 %.
ORIGINAL = {"32": 10_340_000, "64": 19_270_000, "128": 32_750_000}
OURS = {"32": 10_473_642, "64": 19_431_202, "128": 32_939_362}
OURS_WITH_BIASES = {"32": 11_329_482, "64": 21_036_002, "128": 35_293_122}
ORIGINAL_LATENT_DIMS = {"32": 1_765_560, "64": 14_872_780, "128": 124_973_280}


@pytest.mark.parametrize("name", ["32", "64", "128"])
def test_preset_parameter_counts(name):
    assert sum(p.numel() for p in VeryDeepVAE(build_config(preset=name)).parameters()) == OURS_WITH_BIASES[name]
    model = VeryDeepVAE(build_config(preset=name, overrides={"bias_max_resolution": 0}))
    count = sum(p.numel() for p in model.parameters())
    assert count == OURS[name]
    assert abs(count - ORIGINAL[name]) / ORIGINAL[name] < 0.02
    # the only latent-size difference: 200 instead of the clamped width at 1³
    cfg = build_config(preset=name)
    assert model.latent_dimensions() == ORIGINAL_LATENT_DIMS[name] + (200 - cfg.channels[-1])
    assert model.num_layers == sum(cfg.latent_feature_maps_per_resolution)


def test_encoder_matches_original_size_exactly():
    model = VeryDeepVAE(build_config(preset="32"))
    assert sum(p.numel() for p in model.encoder.parameters()) == 1_842_620


@pytest.mark.parametrize("name", ["tiny", "demo", "32"])
def test_forward_shapes(name):
    cfg = build_config(preset=name)
    model = VeryDeepVAE(cfg)
    x = torch.rand(2, 1, cfg.resolution, cfg.resolution, cfg.resolution)
    out = model(x)
    assert out.params.shape == (2, model.likelihood.num_params) + (cfg.resolution,) * 3
    assert out.kl_per_layer.shape == (2, model.num_layers)
    assert out.elbo.shape == (2,) and torch.isfinite(out.loss)
    assert model.sample(1).shape == (1, 1) + (cfg.resolution,) * 3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["64", "128"])
def test_sample_shapes_large_presets(name):
    cfg = build_config(preset=name)
    model = VeryDeepVAE(cfg)
    volume = model.sample(1)
    assert volume.shape == (1, 1) + (cfg.resolution,) * 3
    assert 0.0 <= volume.min() and volume.max() <= 1.0


def test_priors_are_standard_normal_at_initialisation():
    cfg = build_config(preset="tiny")
    model = VeryDeepVAE(cfg)
    h = torch.randn(2, cfg.channels[0], 4, 4, 4)
    for layer in model.decoder.layers:
        h = torch.randn(2, layer.width, 4, 4, 4)
        mean, std, feature = layer.prior_params(h)
        assert torch.all(mean == 0) and torch.allclose(std, torch.ones_like(std)) and torch.all(feature == 0)


def test_residual_branches_are_depth_scaled():
    cfg = build_config(preset="tiny")
    torch.manual_seed(0)
    model = VeryDeepVAE(cfg)
    depth = sum(cfg.latent_feature_maps_per_resolution)
    for layer in model.decoder.layers:
        assert layer.res.residual_scale == pytest.approx(1 / math.sqrt(depth))
    # the scaled weights are 1/sqrt(depth) times a default-initialised conv of the same shape
    torch.manual_seed(0)
    reference = VeryDeepVAE(build_config(preset="tiny", overrides={"latent_feature_maps_per_resolution": [1, 0, 0, 0, 1]}))
    ref_depth = 2
    layer, ref_layer = model.decoder.layers[0], reference.decoder.layers[0]
    ratio = (layer.z_proj.conv.weight.std() / ref_layer.z_proj.conv.weight.std()).item()
    assert ratio == pytest.approx(math.sqrt(ref_depth / depth), rel=0.25)
    for block in model.encoder.levels:
        for res in block:
            assert res.residual_scale == pytest.approx(1 / math.sqrt(model.encoder.depth))


def test_no_batch_norm_anywhere():
    model = VeryDeepVAE(build_config(preset="32"))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_analytic_kl_matches_monte_carlo():
    torch.manual_seed(0)
    q_mean, q_std = torch.tensor([0.3, -1.0]), torch.tensor([0.5, 1.5])
    p_mean, p_std = torch.tensor([0.0, 0.5]), torch.tensor([1.0, 0.8])
    analytic = gaussian.kl_diagonal_gaussians(q_mean, q_std, p_mean, p_std)
    z = q_mean + q_std * torch.randn(400_000, 2)
    mc = (gaussian.gaussian_log_density(z, q_mean, q_std) - gaussian.gaussian_log_density(z, p_mean, p_std)).mean(0)
    assert torch.allclose(analytic, mc, atol=0.01)


def test_softplus_std_is_one_at_zero():
    assert gaussian.std_from_raw(torch.zeros(3)).tolist() == pytest.approx([1.0, 1.0, 1.0])


@pytest.mark.parametrize("mean,log_scale", [(0.0, -2.0), (0.9, -4.0), (-1.2, 0.5), (0.3, -6.5)])
def test_discretised_probabilities_sum_to_one(mean, log_scale):
    lik = DiscretisedLogistic(256)
    bins = torch.linspace(-1, 1, 256).view(1, 1, 256, 1, 1)
    params = torch.empty(1, 2, 256, 1, 1)
    params[:, 0] = mean
    params[:, 1] = log_scale
    total = lik.log_prob(params, bins).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=2e-3)


def test_a_scale_ceiling_bounds_the_scale_and_keeps_small_scales():
    capped, free = DiscretisedLogistic(256, max_scale=0.04), DiscretisedLogistic(256)
    params = torch.zeros(1, 2, 5, 1, 1)
    params[:, 1, :, 0, 0] = torch.tensor([-6.0, -4.0, -3.0, 0.0, 3.0])
    scale = capped._split(params)[2].exp().flatten()
    assert torch.all(scale <= 0.04) and scale[0] == pytest.approx(math.exp(-6.0), rel=0.1)  # soft: nearly unchanged
    assert torch.all(scale[1:] < free._split(params)[2].exp().flatten()[1:])
    # still a distribution over the bins
    bins = torch.linspace(-1, 1, 256).view(1, 1, 256, 1, 1)
    wide = torch.zeros(1, 2, 256, 1, 1)
    wide[:, 1] = 2.0
    assert capped.log_prob(wide, bins).exp().sum().item() == pytest.approx(1.0, abs=2e-3)


def test_a_mixture_is_a_distribution_over_the_bins_and_one_component_is_the_plain_logistic():
    mixture, plain = DiscretisedLogistic(256, num_mixtures=3), DiscretisedLogistic(256)
    assert (mixture.num_params, plain.num_params) == (9, 2)
    bins = torch.linspace(-1, 1, 256).view(1, 1, 256, 1, 1)
    params = torch.empty(1, 9, 256, 1, 1)
    params[:, :3] = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1, 1)  # weight logits
    params[:, 3:6] = torch.tensor([-0.8, 0.1, 0.6]).view(1, 3, 1, 1, 1)  # means
    params[:, 6:] = torch.tensor([-4.0, -2.0, -5.0]).view(1, 3, 1, 1, 1)  # log-scales
    assert mixture.log_prob(params, bins).exp().sum().item() == pytest.approx(1.0, abs=2e-3)
    # three components with the same mean and scale are that one logistic, whatever the weights
    same = torch.zeros(1, 9, 256, 1, 1)
    same[:, :3] = torch.tensor([0.3, -2.0, 1.0]).view(1, 3, 1, 1, 1)
    same[:, 3:6], same[:, 6:] = 0.2, -3.0
    one = torch.zeros(1, 2, 256, 1, 1)
    one[:, 0], one[:, 1] = 0.2, -3.0
    assert torch.allclose(mixture.log_prob(same, bins), plain.log_prob(one, bins), atol=1e-5)


def test_a_mixture_draws_its_components_by_weight_and_its_mean_weighs_them():
    lik = DiscretisedLogistic(256, num_mixtures=2)
    params = torch.zeros(1, 6, 20, 20, 20)
    params[:, 0], params[:, 1] = math.log(0.25), math.log(0.75)  # weights 1/4 and 3/4
    params[:, 2], params[:, 3] = -0.8, 0.6  # two tissues
    params[:, 4:] = -7.0  # narrow
    drawn = lik.sample(params, torch.Generator().manual_seed(0))
    near_first = (drawn - -0.8).abs() < 0.02
    assert torch.all(near_first | ((drawn - 0.6).abs() < 0.02))  # every voxel one tissue, not a blend
    assert near_first.float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert torch.allclose(lik.mean(params), torch.full((1, 1, 20, 20, 20), 0.25 * -0.8 + 0.75 * 0.6), atol=1e-5)


def test_discretised_nll_is_a_code_length():
    lik = DiscretisedLogistic(256)
    params = torch.randn(2, 2, 4, 4, 4)
    x = torch.rand(2, 1, 4, 4, 4) * 2 - 1
    assert torch.all(-lik.log_prob(params, x) >= 0)


def test_gaussian_likelihood_is_a_density():
    lik = Gaussian()
    params = torch.zeros(1, 2, 1, 1, 1)
    x = torch.zeros(1, 1, 1, 1, 1)
    std = gaussian.std_from_raw(torch.zeros(1)) + 1e-3
    expected = -math.log(std.item()) - 0.5 * math.log(2 * math.pi)
    assert lik.log_prob(params, x).item() == pytest.approx(expected, rel=1e-5)


def test_temperature_zero_gives_prior_means_and_is_deterministic():
    model = VeryDeepVAE(build_config(preset="tiny"))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    a = model.sample(2, 0.0, generator=g1)
    b = model.sample(2, 0.0, generator=g2)
    assert torch.equal(a, b)
    c = model.sample(2, 1.0, generator=torch.Generator().manual_seed(3))
    d = model.sample(2, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(c, d)


def test_encode_decode_round_trip_matches_posterior_mean_reconstruction():
    model = VeryDeepVAE(build_config(preset="tiny"))
    x = torch.rand(2, 1, 16, 16, 16)
    assert torch.allclose(model.decode(model.encode(x)), model.reconstruct(x), atol=1e-6)


def test_progressive_reconstructions_share_one_encoder_pass_and_match_reconstruct():
    torch.manual_seed(0)
    model = VeryDeepVAE(build_config(preset="tiny")).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    levels = [None] + list(range(1, model.decoder.num_levels))
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))
    together = model.reconstructions(x, levels)
    assert len(calls) == 1 and len(together) == len(levels) > 2
    for level, volume in zip(levels, together):
        assert torch.equal(volume, model.reconstruct(x, prior_from_level=level))
    assert len(calls) == 1 + len(levels)
    # drawn from the prior: the same random stream as one reconstruct per level
    drawn = model.reconstructions(x, levels[1:], temperature=1.0, generator=torch.Generator().manual_seed(4))
    one_by_one = torch.Generator().manual_seed(4)
    for level, volume in zip(levels[1:], drawn):
        assert torch.equal(volume, model.reconstruct(x, prior_from_level=level, temperature=1.0, generator=one_by_one))


def test_encode_passes_share_one_encoder_pass_and_stopping_early_leaves_the_coarse_layers_unchanged():
    torch.manual_seed(0)
    model = VeryDeepVAE(build_config(preset="tiny")).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))
    means, drawn = model.encode_passes(x, [False, True], num_layers=2, as_noise=True,
                                       generator=torch.Generator().manual_seed(5))
    assert len(calls) == 1 and len(means) == len(drawn) == 2  # one bottom-up pass, two short top-down ones
    full_means = model.encode(x, as_noise=True)
    assert len(full_means) == model.num_layers > 2 and len(calls) == 2
    for i in range(2):
        assert torch.equal(means[i], full_means[i])
    # the draws of the first pass are those a full draw makes from a generator in the same state
    full_drawn = model.encode(x, as_noise=True, generator=torch.Generator().manual_seed(5), draw=True)
    repeat = model.encode_passes(x, [True], num_layers=2, as_noise=True, generator=torch.Generator().manual_seed(5))[0]
    for i in range(2):
        assert torch.equal(repeat[i], full_drawn[i]) and not torch.equal(repeat[i], full_means[i])
    # one stop per pass: the means run deeper than the draws, which are those of the short pass
    deep, short = model.encode_passes(x, [False, True], num_layers=[4, 2], as_noise=True,
                                      generator=torch.Generator().manual_seed(5))
    assert len(deep) == 4 and len(short) == 2
    assert all(torch.equal(deep[i], full_means[i]) for i in range(4))
    assert all(torch.equal(short[i], repeat[i]) for i in range(2))


def test_a_finest_level_without_latent_layers_is_still_decoded_to_full_resolution():
    cfg = build_config(preset="tiny", overrides={
        "resolution": 2, "channels": [1, 2], "channels_per_latent": [1, 1], "latent_feature_maps_per_resolution": [0, 1],
        "kernel_sizes_bottom_up": [1, 1], "kernel_sizes_top_down": [1, 1]})
    model = VeryDeepVAE(cfg)
    x = torch.rand(1, 1, 2, 2, 2)
    assert model(x).params.shape[2:] == x.shape[2:] and model.sample(1).shape == x.shape
    assert len(model.encode_passes(x, [False], num_layers=1)[0]) == 1


def test_a_mixture_model_trains_and_samples_and_its_setting_is_checked():
    model = VeryDeepVAE(build_config(preset="tiny", overrides={"likelihood_mixtures": 4, "sample_voxels": "draw"}))
    assert model.output_head.conv.out_channels == 12
    out = model(torch.rand(2, 1, 16, 16, 16))
    out.loss.backward()
    assert out.params.shape[1] == 12 and torch.isfinite(out.loss)
    volumes = model.sample(2, 1.0, generator=torch.Generator().manual_seed(0))
    assert volumes.shape == (2, 1, 16, 16, 16) and 0.0 <= volumes.min() and volumes.max() <= 1.0
    assert sampling.describe_voxels(model) == "each voxel drawn from p(x | z), a mixture of 4 discretised logistics"
    with pytest.raises(Exception, match="likelihood_mixtures applies to the discretised_logistic"):
        build_config(preset="tiny", overrides={"likelihood_mixtures": 4, "likelihood": "gaussian"})


def test_sample_voxels_says_whether_samples_draw_their_voxels(tmp_path):
    drawing = VeryDeepVAE(build_config(preset="tiny", overrides={"sample_voxels": "draw"}))
    assert drawing.draws_voxels and not VeryDeepVAE(build_config(preset="tiny")).draws_voxels
    assert build_config(preset="demo").sample_voxels == "draw"
    volumes = drawing.sample(2, 1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(volumes, drawing.sample(2, 1.0, generator=torch.Generator().manual_seed(0), draw_voxels=True))
    assert not torch.equal(volumes, drawing.sample(2, 1.0, generator=torch.Generator().manual_seed(0),
                                                   draw_voxels=False))
    record = json.loads((sampling.write_samples(drawing, tmp_path, 1, show_progress=False)[0].parent
                         / "samples.json").read_text())
    assert record["voxels"] == "each voxel drawn from p(x | z)"
    # --voxels mean: the smooth output instead, recorded as such
    smooth = np.concatenate([v for _, v in sampling.iter_samples(drawing, 2, 1.0, 0, 2, show_progress=False,
                                                                 voxels="mean")])
    assert np.array_equal(smooth, drawing.sample(2, 1.0, generator=torch.Generator().manual_seed(0),
                                                 draw_voxels=False)[:, 0].numpy())
    assert sampling.describe_voxels(drawing, "mean") == "the mean of p(x | z)"
    with pytest.raises(UserError, match="voxels must be one of auto, mean, draw"):
        sampling.voxels_draw("sharp")
    with pytest.raises(Exception, match="sample_voxels"):
        build_config(preset="tiny", overrides={"sample_voxels": "sharp"})


def test_mean_and_draw_of_the_same_latents(tmp_path, monkeypatch):
    drawing = VeryDeepVAE(build_config(preset="tiny", overrides={"sample_voxels": "draw"}))
    mean, drawn = drawing.sample_mean_and_draw(2, 1.0, generator=torch.Generator().manual_seed(3))
    # the same latents as sample() with the same seed: the draw is the files', the mean the smooth readout's
    assert torch.equal(drawn, drawing.sample(2, 1.0, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(mean, drawing.sample(2, 1.0, generator=torch.Generator().manual_seed(3), draw_voxels=False))
    batches = list(sampling.iter_sample_batches(drawing, 3, 1.0, 3, 2, show_progress=False, means=True))
    assert [b.start for b in batches] == [0, 2] and all(b.means.shape == b.volumes.shape for b in batches)
    plain = np.concatenate([v for _, v in sampling.iter_samples(drawing, 3, 1.0, 3, 2, show_progress=False)])
    assert np.array_equal(np.concatenate([b.volumes for b in batches]), plain)  # asking for means moves nothing
    assert np.array_equal(batches[0].means, mean[:, 0].numpy())
    # mean readouts have no second picture to show
    smooth = next(sampling.iter_sample_batches(drawing, 1, show_progress=False, voxels="mean", means=True))
    assert smooth.means is None
    # samples.png of drawn samples: each sample's mean beside its draw, one row per file
    shown = {}
    monkeypatch.setattr(sampling.viz, "save_side_by_side",
                        lambda left, right, path, *titles, **kw: shown.update(left=left, right=right, **kw))
    paths = sampling.write_samples(drawing, tmp_path / "d", 3, seed=3, batch_size=2, show_progress=False)
    assert len(shown["left"]) == len(shown["right"]) == 3 and shown["row_labels"] == [p.name for p in paths]
    assert np.array_equal(shown["left"][0], mean[0, 0].numpy())
    assert np.array_equal(shown["right"][2], plain[2]) and "voxels drawn" in shown["suptitle"]
    shown.clear()
    sampling.write_samples(drawing, tmp_path / "m", 1, voxels="mean", show_progress=False)
    assert shown == {} and (tmp_path / "m" / "samples.png").exists()  # the plain montage


def test_training_sample_figure_shows_the_mean_beside_each_draw(tmp_path, monkeypatch):
    from verydeepvae.train.figures import training_figures
    from verydeepvae.train.reporting import Reporter

    seen = []
    monkeypatch.setattr(sampling.viz, "save_side_by_side", lambda left, right, path, *a, **kw: seen.append(
        (np.stack(left), np.stack(right), kw["suptitle"])))
    models = {}
    for voxels in ("draw", "mean"):
        cfg = build_config(preset="tiny", overrides={"sample_voxels": voxels, "subjects_to_plot": 2})
        model = models[voxels] = VeryDeepVAE(cfg)
        reporter = Reporter(tmp_path / voxels, enabled=True)
        path = training_figures(model, cfg, [], torch.device("cpu"), 5, reporter, 3)  # no validation volumes
        reporter.flush()
        assert path == tmp_path / voxels / "figures" / "samples_step_00000003.png"
    mean, drawn = models["draw"].sample_mean_and_draw(2, 1.0, generator=torch.Generator().manual_seed(5))
    assert len(seen) == 1  # only the drawing model pairs; the mean model's figure is the plain montage
    assert np.array_equal(seen[0][0], mean[:, 0].numpy()) and np.array_equal(seen[0][1], drawn[:, 0].numpy())
    assert seen[0][2] == "prior samples, step 3, temperature 1.0, voxels drawn"
    assert (tmp_path / "mean" / "figures" / "samples_step_00000003.png").is_file()


def test_loss_is_per_voxel():
    model = VeryDeepVAE(build_config(preset="tiny"))
    out = model(torch.rand(1, 1, 16, 16, 16))
    # a freshly initialised discretised model is within a factor of a uniform code (8 bits/voxel)
    assert 0.5 * math.log(256) < out.elbo.item() < 3 * math.log(256)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_hand_written_resampling_is_torch_s_in_values_gradients_and_layout(channels_last, size):
    """Nearest ×2 upsampling and 2×2×2 average pooling (written by hand for speed) give what
    F.interpolate and F.avg_pool3d give, forward and backward, and keep channels-last tensors so."""
    from verydeepvae.model.blocks import Upsample, avg_pool_2x, upsample_nearest_2x

    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = torch.randn(2, 5, size, size, size).contiguous(memory_format=fmt).requires_grad_()
    ref = x.detach().clone().requires_grad_()
    up, up_ref = upsample_nearest_2x(x, channels_last), F.interpolate(ref, scale_factor=2, mode="nearest")
    grad = torch.randn_like(up_ref)
    up.backward(grad)
    up_ref.backward(grad)
    assert torch.equal(up, up_ref)
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-6, atol=1e-6)
    if channels_last:
        assert up.is_contiguous(memory_format=torch.channels_last_3d)

    big = torch.randn(2, 5, 2 * size, 2 * size, 2 * size).contiguous(memory_format=fmt).requires_grad_()
    big_ref = big.detach().clone().requires_grad_()
    pooled, pooled_ref = avg_pool_2x(big, channels_last), F.avg_pool3d(big_ref, 2)
    pooled.backward(grad[:, :, :size, :size, :size])
    pooled_ref.backward(grad[:, :, :size, :size, :size])
    torch.testing.assert_close(pooled, pooled_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(big.grad, big_ref.grad, rtol=1e-6, atol=1e-6)
    if channels_last and size > 1:
        assert pooled.is_contiguous(memory_format=torch.channels_last_3d)

    # the decoder's upsampling projects before copying, which changes nothing
    module = Upsample(5, 3)
    module.channels_last = channels_last
    torch.testing.assert_close(module(x), module.project(F.interpolate(x, scale_factor=2, mode="nearest")),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel,size", [(3, 2), (5, 4), (3, 4)])
def test_a_kernel_wider_than_its_grid_gets_true_gradients_under_bfloat16_autocast(kernel, size):
    """torch's CPU bfloat16 convolution gives wrong or non-finite weight gradients when the kernel is
    wider than the grid (3 on 2³: wrong in 60 of 60 trials); our Conv3d computes those in float32."""
    torch.manual_seed(0)
    for _ in range(5):
        conv = Conv3d(16, 16, kernel)
        nn.init.normal_(conv.conv.weight, std=0.05)
        x = torch.randn(2, 16, size, size, size).contiguous(memory_format=torch.channels_last_3d)
        upstream = torch.randn(2, 16, size, size, size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        assert out.dtype == torch.bfloat16  # what autocast would have given, for the layers after it
        out.float().backward(upstream)
        got = conv.conv.weight.grad.clone()
        conv.zero_grad()
        reference = conv.double()
        reference(x.double()).backward(upstream.double())
        expected = reference.conv.weight.grad
        assert torch.isfinite(got).all()
        assert (got.double() - expected).abs().max() <= 0.03 * expected.abs().max()
