"""The training recipe's model pieces (docs/training-recipe.md): per-level decoder biases, KL
balancing, the quality summary row and the quality benchmark on a tiny budget."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from verydeepvae.config import build_config
from verydeepvae.errors import ConfigError
from verydeepvae.train.optim import free_nats_at, layer_kl_weights
from verydeepvae.evaluate.summary import prior_label, quality_row
from verydeepvae.model import VeryDeepVAE
from verydeepvae.model.kl_objective import balanced_kl_coefficients, free_bits_kl
from verydeepvae.checkpoint import Checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _tiny(**overrides):
    return build_config("tiny", overrides=overrides)


def test_decoder_biases_exist_up_to_the_configured_resolution():
    model = VeryDeepVAE(_tiny(bias_max_resolution=8))
    sizes = sorted(p.shape[-1] for p in model.decoder.biases.values())
    assert sizes == [2, 4, 8]  # tiny: 16, 8, 4, 2, 1; none at the top (the learned constant) or above 8
    assert all(float(p.detach().abs().sum()) == 0.0 for p in model.decoder.biases.values())  # start at zero
    assert len(VeryDeepVAE(_tiny(bias_max_resolution=0)).decoder.biases) == 0


def test_a_decoder_bias_moves_the_output_at_its_positions_only():
    torch.manual_seed(0)
    model = VeryDeepVAE(_tiny(bias_max_resolution=16)).eval()
    z = [torch.zeros(1, *shape) for shape in model.latent_shapes()]
    before = model.decode(z)
    with torch.no_grad():
        model.decoder.biases["0"][0, :, 0, 0, 0] += 1.0  # one voxel of the full-resolution level
    changed = (model.decode(z) - before).abs() > 1e-6
    assert changed[0, 0, 0, 0, 0]
    assert not changed[0, 0, 8:, 8:, 8:].any()  # beyond the receptive field of the last layer


def test_checkpoints_written_before_the_biases_existed_rebuild_without_them():
    cfg = _tiny().to_dict()
    del cfg["bias_max_resolution"]
    old = Checkpoint(path=Path("old.safetensors"), meta={"config": cfg, "step": 1}, tensors={})
    assert old.config.bias_max_resolution == 0
    assert Checkpoint(path=Path("new.safetensors"), meta={"config": _tiny().to_dict(), "step": 1},
                      tensors={}).config.bias_max_resolution == _tiny().bias_max_resolution


def test_balanced_kl_coefficients_favour_layers_that_carry_little_information():
    kl = torch.tensor([[0.0, 10.0, 1.0], [0.0, 30.0, 3.0]])  # nats per volume, (batch, layers)
    sizes = [10, 10, 1000]
    c = balanced_kl_coefficients(kl, sizes)
    assert c.mean().item() == pytest.approx(1.0)
    assert c[0] < c[2] < c[1]  # per dimension: 0, 2, 0.002 nats; the floor keeps every weight > 0
    assert c[0] > 0


def test_kl_balancing_only_acts_during_the_warm_up():
    torch.manual_seed(0)
    model = VeryDeepVAE(_tiny())
    x = torch.rand(2, 1, 16, 16, 16)
    torch.manual_seed(1)
    plain = model(x, 1.0, kl_balance=False).loss
    torch.manual_seed(1)
    balanced = model(x, 1.0, kl_balance=True).loss
    assert torch.equal(plain, balanced)
    torch.manual_seed(1)
    warm = model(x, 0.5, kl_balance=True)
    kl = warm.kl_per_layer.detach()
    expected = (warm.nll + 0.5 * (kl * balanced_kl_coefficients(kl * model.num_voxels, model.latent_sizes())).sum(1)).mean()
    assert warm.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_kl_warm_up_restricted_to_the_finest_level_leaves_the_other_layers_at_full_weight():
    cfg = _tiny(kl_warmup_steps=100, kl_warmup_resolutions=[16])
    model = VeryDeepVAE(cfg)
    weights = layer_kl_weights(25, cfg, model.layer_levels)
    at_16 = torch.tensor([level == 0 for level in model.layer_levels])
    assert torch.all(weights[at_16] == 0.25) and torch.all(weights[~at_16] == 1.0)
    assert layer_kl_weights(100, cfg, model.layer_levels) == 1.0  # the warm-up is over
    assert layer_kl_weights(25, _tiny(kl_warmup_steps=100), model.layer_levels) == 0.25  # every layer
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16, 16)
    torch.manual_seed(1)
    out = model(x, weights)
    expected = (out.nll + (out.kl_per_layer * weights).sum(1)).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_free_bits_stop_the_kl_gradient_of_a_layer_below_its_allowance_only():
    kl = torch.tensor([[0.5, 3.0, 10.0], [1.5, 5.0, 30.0]], requires_grad=True)  # batch means 1, 4, 20
    free_bits_kl(kl, torch.tensor([2.0, 2.0, 25.0])).sum().backward()
    # layer 0 is under its 2 nats and layer 2 under its 25: no pull towards the prior; layer 1 pays
    assert kl.grad.tolist() == [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    assert free_bits_kl(kl, torch.tensor([2.0, 2.0, 25.0])).mean(0).tolist() == pytest.approx([2.0, 4.0, 25.0])
    # one number for every layer, as kl_free_bits alone gives
    assert free_bits_kl(kl, 2.0).mean(0).tolist() == pytest.approx([2.0, 4.0, 20.0])


def test_free_bits_per_latent_grow_with_each_layer_size_and_enter_the_loss_not_the_bound():
    cfg = _tiny(kl_free_bits=2.0, kl_free_bits_per_latent=0.01)
    model = VeryDeepVAE(cfg)
    free = model.free_nats(cfg.kl_free_bits, cfg.kl_free_bits_per_latent)
    assert free == pytest.approx([2.0 + 0.01 * size for size in model.latent_sizes()])
    assert model.free_nats(2.0) == [2.0] * model.num_layers
    assert free[-1] > 10 * free[0]  # the finest layer's allowance dwarfs the coarsest's
    shapes = model.latent_shapes()
    finest = shapes[-1][1]
    # limited to the finest size, that layer keeps its allowance and every other keeps kl_free_bits
    assert model.free_nats(2.0, 0.01, resolutions=[finest]) == \
        pytest.approx([f if side == finest else 2.0 for f, (_, side, _, _) in zip(free, shapes)])
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16, 16)
    torch.manual_seed(1)
    plain = model(x)
    torch.manual_seed(1)
    freed = model(x, free_bits=free)
    assert torch.equal(plain.elbo, freed.elbo)  # the bound is the bound
    kl = plain.kl_per_layer.mean(0) * model.num_voxels  # nats per volume
    exempt = torch.clamp(torch.tensor(free) - kl, min=0.0) / model.num_voxels
    assert freed.loss.item() == pytest.approx(plain.loss.item() + exempt.sum().item(), rel=1e-5)
    with pytest.raises(ConfigError, match="kl_free_bits_per_latent"):
        _tiny(kl_free_bits_per_latent=-1)


def test_training_passes_each_layer_its_allowance(tmp_path, free_bits_seen):
    from verydeepvae.train.loop import train

    seen = free_bits_seen
    cfg = _tiny(kl_free_bits=1.5, kl_free_bits_per_latent=0.02, kl_free_bits_per_latent_resolutions=[16],
                kl_free_bits_per_latent_steps=2, max_steps=3, phantom_num=4, validation_every=100,
                checkpoint_every=100, figures_every=100, subjects_to_plot=0, quality_samples=0,
                output_dir=str(tmp_path / "run"))
    train(cfg, show_progress=False)
    expected = VeryDeepVAE(cfg).free_nats(1.5, 0.02, [16])
    assert seen[:2] == [pytest.approx(expected)] * 2
    assert seen[2] == 1.5  # after kl_free_bits_per_latent_steps only kl_free_bits is left
    assert expected != pytest.approx(VeryDeepVAE(cfg).free_nats(1.5, 0.02))  # the coarser layers get none


def test_the_per_latent_allowance_lasts_its_steps_and_no_longer():
    allowance = [2.5, 9.0]
    lasting = _tiny(kl_free_bits=2.0, kl_free_bits_per_latent=0.01, kl_free_bits_per_latent_steps=100)
    assert [free_nats_at(step, lasting, allowance) for step in (0, 99, 100, 5000)] == [allowance] * 2 + [2.0] * 2
    whole_run = _tiny(kl_free_bits=2.0, kl_free_bits_per_latent=0.01)
    assert free_nats_at(10**6, whole_run, allowance) == allowance
    with pytest.raises(ConfigError, match="kl_free_bits_per_latent_steps"):
        _tiny(kl_free_bits_per_latent_steps=-1)


def test_kl_warmup_resolutions_must_be_resolutions_of_the_model():
    with pytest.raises(ConfigError, match=re.escape("resolutions of this model's levels (16, 8, 4, 2, 1), got 12")):
        _tiny(kl_warmup_steps=10, kl_warmup_resolutions=[12])
    with pytest.raises(ConfigError, match="kl_free_bits_per_latent_resolutions entries must be resolutions"):
        _tiny(kl_free_bits_per_latent=0.001, kl_free_bits_per_latent_resolutions=[3])
    assert layer_kl_weights(0, _tiny(kl_warmup_resolutions=[16]), [0]) == 1.0  # no warm-up: no effect


def test_quality_row_reads_the_headline_figures_of_a_report():
    report = {
        "likelihood": {"elbo_bits_per_voxel": {"mean": 1.5}, "kl_bits_per_voxel": {"mean": 0.1},
                       "kl_per_layer": [{"resolution": 1, "active_units": 0}, {"resolution": 2, "active_units": 3},
                                        {"resolution": 2, "active_units": 1}]},
        "distances": {"random_cnn": {"frechet": {"ratio_to_baseline": 2.5}, "mmd": {"ratio_to_baseline": 4.0}}},
        "diversity": {"samples": {"mean": 0.9}, "real": {"mean": 0.85}},
        "memorisation": {"voxels": {"median_ratio": 1.1}},
        "samples": {"prior_levels": [1, 2, 4]},
        "morphometry": {"comparison": {"features": {"gm_ml": {"samples_vs_real_half_ml": 30.0,
                                                              "real_vs_real_half_ml": 10.0}}}},
    }
    row = quality_row(report)
    assert row["dead_levels"] == [1] and row["active_levels"] == 1 and row["active_units"] == {"2": 4, "1": 0}
    assert row["frechet_ratio"] == 2.5 and row["mmd_ratio"] == 4.0
    assert row["ms_ssim_gap"] == pytest.approx(0.05)
    assert row["w1_ratio_gm_ml"] == pytest.approx(3.0)
    assert math.isnan(row["w1_ratio_wm_ml"])  # missing sections are NaN, not errors
    assert row["prior"] == "fitted 1³-4³"
    assert math.isnan(quality_row({})["bits_per_voxel"])
    assert quality_row({})["prior"] == "?"  # a report from before the record
    assert prior_label([]) == "learned" and prior_label([1]) == "fitted 1³"


@pytest.mark.slow
def test_quality_benchmark_runs_on_a_tiny_budget(tmp_path):
    out = tmp_path / "quality"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "quality.py"), "--preset", "tiny", "--steps", "4", "--evaluations", "2",
         "--heldout-num", "6", "--samples", "6", "--set-size", "2", "--output-dir", str(out), "--set", "phantom_num=10",
         # a threshold no layer stays under: the run starts again after its first step (train/finest_layer.py)
         "--set", "finest_layer_restart_step=1", "--set", "finest_layer_restart_kl=1e9", "--set", "log_every=1"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "quality.json").read_text())
    assert [row["step"] for row in summary["rows"]] == [2, 4]
    first = summary["first_attempt"]  # its training time counts in the table's minutes
    assert first["step"] == 1 and first["seconds"] > 0 and summary["rows"][0]["minutes"] * 60 > first["seconds"]
    assert "the run started again at step 1" in result.stdout
    assert all(math.isfinite(row["bits_per_voxel"]) for row in summary["rows"])
    assert (out / "learning_curves.png").stat().st_size > 0
    assert "FD x" in result.stdout
    report = json.loads((out / "evaluation_step_00000004" / "report.json").read_text())
    assert report["data"]["num_heldout"] == 6 and report["distances"]["random_cnn"]["frechet"]["set_size"] == 2


def test_quality_benchmark_refuses_held_out_phantoms_of_the_training_population(tmp_path):
    """The same population seed makes the same subjects: "held-out" phantoms would be training ones."""
    out = tmp_path / "quality"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "quality.py"), "--preset", "tiny", "--steps", "2", "--set", "seed=3",
         "--heldout-seed", "3", "--output-dir", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "the training phantoms have population seed 3" in result.stderr
    assert not (out / "run").exists()


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_precision_auto_picks_bf16_only_where_it_is_native(monkeypatch, native, expected):
    from verydeepvae.train import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    notices: list[str] = []
    resolved = precision.resolve_precision(_tiny(precision="auto"), torch.device("cpu"), notices)
    assert resolved.precision == expected
    assert notices == [f"precision auto: {expected} (this CPU {'has' if native else 'has no'} native bfloat16 instructions)"]
    explicit = _tiny(precision="fp32")
    assert precision.resolve_precision(explicit, torch.device("cpu"), notices) is explicit  # explicit settings win


@pytest.mark.slow
def test_quality_benchmark_fills_a_wall_clock_budget(tmp_path):
    """--minutes: a calibration run with one validation, then a run whose length it chose."""
    out = tmp_path / "quality"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "quality.py"), "--preset", "tiny", "--minutes", "0.15",
         "--evaluations", "2", "--heldout-num", "6", "--samples", "6", "--output-dir", str(out),
         "--set", "phantom_num=10"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "quality.json").read_text())
    assert summary["seconds_per_step_calibrated"] > 0
    assert summary["seconds_per_validation_calibrated"] >= 0
    assert summary["steps"] >= 2 and summary["steps"] % 2 == 0
    assert [row["step"] for row in summary["rows"]] == [summary["steps"] // 2, summary["steps"]]
    assert "s per validation" in result.stdout


def test_make_demo_trains_as_many_steps_as_fit_in_the_time_left():
    from verydeepvae.demo_steps import MIN_STEPS, STEP_ROUNDING, planned_steps

    assert planned_steps(450, None, 0.0) == (450, "")  # nothing timed (a GPU): the preset's steps, nothing said
    steps, reason = planned_steps(450, 0.5, 400.0)  # they fit: all of them, and the measurement said
    assert steps == 450 and "0.50 s" in reason and "all 450 steps fit" in reason
    steps, reason = planned_steps(450, 1.2, 400.0)
    assert MIN_STEPS < steps < 450 and steps % STEP_ROUNDING == 0
    assert steps * 1.2 <= 400.0 < (steps + STEP_ROUNDING) * 1.2  # the most that fit
    assert "1.20 s" in reason and f"{steps} of its 450 steps fit" in reason and "DEMO_STEPS=450" in reason
    faster, _ = planned_steps(450, 1.0, 400.0)
    assert faster > steps  # a faster machine trains more
    steps, reason = planned_steps(450, 2.5, 300.0)  # not even the fewest fit: those, and how far past
    assert steps == MIN_STEPS and "past the 10-minute budget" in reason
    assert planned_steps(450, 1.0, -50.0)[0] == MIN_STEPS  # the time already spent: still the fewest
    assert planned_steps(100, 2.5, 10.0)[0] == 100  # never more than the preset asks for


def test_the_demo_probe_times_real_training_steps():
    from verydeepvae.demo_steps import seconds_per_training_step

    cfg = build_config("tiny")
    seconds = seconds_per_training_step(cfg, torch.device("cpu"), steps=2)
    assert math.isfinite(seconds) and seconds > 0.0


def test_the_demo_step_count_is_a_number_the_makefile_can_pass_on():
    from verydeepvae.demo_steps import MIN_STEPS

    full = build_config("demo").max_steps
    out = subprocess.run([sys.executable, "-m", "verydeepvae.demo_steps", "--started", "0"], capture_output=True,
                         text=True, check=True)  # started in 1970: no time left, the fewest steps
    if torch.cuda.is_available():  # a GPU is not timed: the preset's steps
        assert int(out.stdout.strip()) == full
    else:
        assert int(out.stdout.strip()) == MIN_STEPS and "past the 10-minute budget" in out.stderr
    makefile = (ROOT / "Makefile").read_text()
    assert "-m verydeepvae.demo_steps --started $(STARTED)" in makefile and "--set max_steps=$$steps" in makefile
