"""Guidance calibration (evaluate/calibration.py, ``verydeepvae calibrate-guidance``, ``--guidance
calibrated|auto``): the choice of scale from the readings, the search against a model whose response
is known, where the calibrated scales are read back, and the command end to end on a tiny model.
Nothing here judges a real model's calibration: that is docs/conditional.md's."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from verydeepvae.data.covariates import Covariate, CovariateSchema
from verydeepvae.errors import UserError
from verydeepvae.evaluate import calibration
from verydeepvae.evaluate.calibration import ScaleReading, choose_scale, real_response
from verydeepvae.evaluate.counterfactual_calibration import (CounterfactualReading, choose_counterfactual_scale,
                                                              counterfactual_scales)
from verydeepvae.guidance import CALIBRATION_FILE, Guidance, read_calibrated, resolve_guidance


def _readings(pairs, unrealistic_from=None):
    """Readings at (scale, slope ratio); from ``unrealistic_from`` on, Fréchet 2 (beyond the 1.5 limit)."""
    realistic = [unrealistic_from is None or s < unrealistic_from for s, _ in pairs]
    return [ScaleReading(s, None, None, r, 1.0 if ok else 2.0, ok) for (s, r), ok in zip(pairs, realistic)]


def test_the_scale_is_interpolated_where_the_slope_ratio_first_reaches_one():
    assert choose_scale(_readings([(1, 0.2), (2, 0.6), (3, 1.4), (4, 0.9)])) == (pytest.approx(2.5), True)
    assert choose_scale(_readings([(1, 0.5), (1.5, 1.0)])) == (pytest.approx(1.5), True)


def test_the_slope_ratio_may_reach_one_before_the_realism_limit_between_two_scales():
    readings = [ScaleReading(1, None, None, 0.5, 1.0, True), ScaleReading(2, None, None, 0.9, 1.2, True),
                ScaleReading(3, None, None, 1.3, 1.8, False)]
    # realism limit at 2.5 (Fréchet 1.2 -> 1.8 crosses 1.5), slope ratio 1.1 there: 1 is reached at 2.25
    assert choose_scale(readings) == (pytest.approx(2.25), True)


def test_a_model_that_overshoots_at_scale_one_is_scaled_down():
    assert choose_scale(_readings([(1, 2.5)])) == (pytest.approx(0.4), True)


def test_unreached_keeps_the_realistic_scale_closest_to_the_real_response():
    assert choose_scale(_readings([(1, 0.1), (2, 0.3), (3, 0.5)])) == (3, False)
    # scale 4 would reach it, but its samples are no longer realistic: the realism limit is half way
    # (Fréchet 1 -> 2 crosses 1.5 at scale 3), where the slope ratio is 0.75
    assert choose_scale(_readings([(1, 0.1), (2, 0.3), (4, 1.2)], unrealistic_from=4)) == (3.0, False)
    assert choose_scale(_readings([(1, -0.2), (2, -0.1)])) == (1.0, False)
    assert choose_scale(_readings([(1, None)])) == (1.0, False)


def test_the_real_response_is_read_on_the_measure_that_tracks_the_covariate():
    own = np.arange(20.0)
    rng = np.random.default_rng(0)
    table = {k: rng.normal(size=20) for k in calibration.MEASURES}
    table["ventricle_ml"] = 0.3 * own + rng.normal(scale=0.1, size=20)
    key, trend = real_response(table, own)
    assert key == "ventricle_ml" and trend["slope"] == pytest.approx(0.3, abs=0.02)
    assert real_response(table, own, ["gm_ml"])[0] == "gm_ml"


class _LinearModel:
    """Stands in for sampling and measuring: the samples' measure rises by ``gain`` x scale x the
    requested value (the training scans' slope is 1)."""

    def __init__(self, gain: float, stream_spread: float = 0.0) -> None:
        self.gain, self.spread, self.scale, self.seed = gain, stream_spread, None, 0

    def sample_at(self, trained, schema, name, values, per_point, temperature, seed, batch_size, show, guidance):
        self.scale, self.seed = guidance.scale(name), seed
        requested = [v for v in values for _ in range(per_point)]
        volumes = np.ones((len(requested), 4, 4, 4), np.float32) * np.asarray(requested, np.float32)[:, None, None, None]
        return volumes, requested, []

    def measure(self, volumes, voxel_size):
        gain = self.gain * (1.0 + self.spread * (self.seed - 1))  # seeds 0, 1, 2: gain x (1 - spread, 1, 1 + spread)
        return {k: volumes.mean(axis=(1, 2, 3)) * gain * self.scale for k in calibration.MEASURES}


class _NoRealism:
    """Every sample set as realistic as the scale-1 samples."""

    def __init__(self, real, device) -> None:
        pass

    def features(self, samples):
        return samples

    def ratio(self, feats) -> float:
        return 1.0


def _calibrate_stub(monkeypatch, model: _LinearModel, **options):
    """calibrate_covariate on ``model``, against training scans whose measure has slope 1."""
    monkeypatch.setattr(calibration, "sample_at", model.sample_at)
    monkeypatch.setattr(calibration, "measure", model.measure)
    monkeypatch.setattr(calibration, "_Realism", _NoRealism)
    schema = CovariateSchema((Covariate("age", "numeric", mean=0.5, sd=0.3, minimum=0.0, maximum=1.0),))
    trained = type("Trained", (), {"device": "cpu", "voxel_size_mm": 6.0})()
    own = np.linspace(0.0, 1.0, 30)
    real_table = {k: own.copy() for k in calibration.MEASURES}  # slope 1 against the scans' own values
    monkeypatch.setattr(CovariateSchema, "bank_rows", lambda self: [{"age": v} for v in own])
    return calibration.calibrate_covariate(trained, schema, "age", np.zeros((30, 4, 4, 4)), real_table, own,
                                           points=5, per_point=2, **options)


@pytest.mark.parametrize("gain, expected, reached", [(0.4, 2.5, True), (2.0, 0.5, True), (0.1, 6.0, False)])
def test_the_search_finds_the_scale_of_a_model_with_a_known_response(monkeypatch, gain, expected, reached):
    result = _calibrate_stub(monkeypatch, _LinearModel(gain))
    assert result.reached is reached and result.scale == pytest.approx(expected, rel=1e-6)
    assert [r.scale for r in result.readings] == sorted(r.scale for r in result.readings)
    for r in result.readings:
        assert r.slope_ratio == pytest.approx(gain * r.scale, rel=1e-6)


def test_streams_are_pooled_and_their_spread_reported(monkeypatch):
    """Three streams whose responses differ by +-20 %: the pooled slope is their mean (the same
    requested values in each), so the scale is the one a single average stream would find, and each
    stream's ratio at that scale is reported."""
    result = _calibrate_stub(monkeypatch, _LinearModel(0.4, stream_spread=0.2), streams=3)
    assert result.reached and result.scale == pytest.approx(2.5, rel=1e-6)
    assert result.stream_ratios_at_scale == pytest.approx([0.8, 1.0, 1.2], rel=1e-6)
    for r in result.readings:
        assert r.stream_ratios == pytest.approx([0.8 * 0.4 * r.scale, 0.4 * r.scale, 1.2 * 0.4 * r.scale], rel=1e-6)


# --- the counterfactuals' own scale ------------------------------------------------------------------

def _cf(scale, ratio, monotonic, kept=True):
    return CounterfactualReading(scale, ratio, monotonic, kept)


def test_the_counterfactual_scale_stops_where_brains_lose_their_monotonic_change():
    assert choose_counterfactual_scale([_cf(1, 0.5, 16), _cf(1.5, 0.8, 16), _cf(2, 1.2, 15)]) == \
        (pytest.approx(1.75), True)  # 0.8 -> 1.2 crosses 1 half way
    assert choose_counterfactual_scale([_cf(1, 0.5, 16), _cf(1.5, 0.7, 15), _cf(2, 0.9, 9, kept=False)]) == (1.5, False)
    assert choose_counterfactual_scale([_cf(0.4, 1.1, 12)]) == (0.4, True)
    assert counterfactual_scales(2.5) == [1.0, 1.2, 1.44, 1.728, 2.074, 2.5]
    assert counterfactual_scales(1.01) == [1.01] and counterfactual_scales(0.4) == [0.4]


def test_counterfactual_search_on_a_model_that_reverses_at_strong_guidance(monkeypatch):
    """Each scan's measure moves by 0.4 x scale per unit from its own value, and above scale 1.6
    turns back at the top of the range for all but two scans: the search keeps 1.44 (change ratio
    0.576) and stops at 1.728, never trying the samples' 3."""
    from verydeepvae.evaluate import counterfactual_calibration as cc

    tried = []

    def sweeper(trained, schema, volume, own, name, values, batch_size):
        def sweep(guidance):
            scale = guidance.scale(name)
            tried.append(scale)
            out = own[name] + 0.4 * scale * (np.asarray(values) - own[name])
            if scale > 1.6 and float(volume.mean()) > 1:
                out[-1] = out[-2] - 1.0
            return out
        return sweep

    monkeypatch.setattr(cc, "counterfactual_sweeper", sweeper)
    monkeypatch.setattr(cc, "measure", lambda outs, vox: {"ventricle_ml": outs})
    schema = CovariateSchema((Covariate("age", "numeric", mean=60.0, sd=10.0, minimum=40.0, maximum=80.0),))
    volumes = np.stack([np.full((2, 2, 2), float(i)) for i in range(6)])  # scans 0 and 1 never reverse
    rows = [{"age": 50.0 + 5 * i} for i in range(6)]
    trained = type("Trained", (), {"voxel_size_mm": 6.0})()
    result = cc.calibrate_counterfactuals(trained, schema, "age", volumes, rows, "ventricle_ml", 1.0, 3.0, points=5)
    assert result.values == [40.0, 50.0, 60.0, 70.0, 80.0] and result.scans == 6
    assert [(r.scale, r.monotonic, r.kept) for r in result.readings] == \
        [(1.0, 6, True), (1.2, 6, True), (1.44, 6, True), (1.728, 2, False)]
    assert result.readings[2].change_ratio == pytest.approx(0.576) and set(tried) == {1.0, 1.2, 1.44, 1.728}
    assert (result.scale, result.reached) == (1.44, False)


@pytest.fixture
def schema():
    return CovariateSchema((Covariate("age", "numeric", mean=60.0, sd=10.0, minimum=40.0, maximum=80.0),
                            Covariate("sex", "categorical", levels=("F", "M"))))


def _write_calibration(run: Path, step: int, guidance) -> None:
    (run / CALIBRATION_FILE).write_text(json.dumps({"step": step, "guidance": guidance}))


def test_auto_and_calibrated_read_the_runs_calibration_for_this_step(tmp_path, schema):
    assert resolve_guidance(None, schema, tmp_path, 10) == (Guidance(), "")
    assert resolve_guidance("auto", schema, tmp_path, 10) == (Guidance(), "")
    with pytest.raises(UserError, match="has no guidance_calibration.json"):
        resolve_guidance("calibrated", schema, tmp_path, 10)
    _write_calibration(tmp_path, 10, {"default": 1.0, "per_covariate": {"age": 2.5}})
    guidance, notice = resolve_guidance("auto", schema, tmp_path, 10)
    assert guidance == Guidance(1.0, {"age": 2.5}) and "calibrated for this checkpoint" in notice
    assert resolve_guidance("calibrated", schema, tmp_path, 10)[0] == guidance
    assert resolve_guidance("3", schema, tmp_path, 10) == (Guidance(3.0), "")  # explicit scales win
    # made for another checkpoint: auto falls back to 1, calibrated says why
    assert resolve_guidance("auto", schema, tmp_path, 20) == (Guidance(), "")
    with pytest.raises(UserError, match="made for step 10, not this checkpoint's step 20"):
        resolve_guidance("calibrated", schema, tmp_path, 20)


def test_a_bad_calibration_file_is_a_user_error(tmp_path, schema):
    (tmp_path / CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(UserError, match="not a readable guidance calibration"):
        read_calibrated(tmp_path, 1)
    _write_calibration(tmp_path, 1, {"default": 1.0, "per_covariate": {"weight": 2.0}})
    with pytest.raises(UserError, match="not conditioned on 'weight'"):
        resolve_guidance("auto", schema, tmp_path, 1)


def test_unconditional_models_take_auto_but_not_calibrated(tmp_path):
    assert resolve_guidance("auto", None, tmp_path, 1)[0].is_identity
    with pytest.raises(UserError, match="for conditional models"):
        resolve_guidance("calibrated", None, tmp_path, 1)


# --- the command on a tiny conditional model --------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from verydeepvae.cli import main

    out = tmp_path_factory.mktemp("calibration") / "run"
    assert main(["train", "--preset", "tiny", "--no-progress", "--set", "phantom_num=12", "--set", "subjects_to_plot=1",
                 "--set", "validation_every=4", "--set", "checkpoint_every=4", "--set", "quality_samples=4",
                 "--output-dir", str(out), "--max-steps", "4", "--condition-on", "age,sex", "-q"]) == 0
    return out


CALIBRATE = ["--points", "3", "--per-point", "2", "--streams", "2", "--scales", "1,2", "--no-progress",
             "--batch-size", "6", "--counterfactual-scans", "3"]


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_calibrate_then_sample_uses_the_calibrated_scales(run, tmp_path, capsys):
    from verydeepvae.cli import main

    run = Path(shutil.copytree(run, tmp_path / "run"))
    assert main(["calibrate-guidance", "--checkpoint", str(run), *CALIBRATE, "--measure", "age=ventricle_ml"]) == 0
    out = capsys.readouterr().out
    assert "calibrated guidance" in out and "sex: scale 1 (categorical" in out
    record = json.loads((run / CALIBRATION_FILE).read_text())
    assert (run / "guidance_calibration.png").stat().st_size > 0
    age = next(c for c in record["covariates"] if c["name"] == "age")
    assert age["measure"] == "ventricle_ml" and record["data"]["num_scans"] >= 3
    readings = [ScaleReading(**r) for r in age["readings"]]
    assert 1 <= len(readings) <= 2 and math.isclose(choose_scale(readings)[0], age["scale"], rel_tol=1e-9)
    chosen = Guidance.from_json(record["guidance"])
    assert chosen.scale("age") == pytest.approx(age["scale"], abs=1e-3) and chosen.scale("sex") == 1.0
    moved = Guidance.from_json(record["counterfactual_guidance"])  # the counterfactuals' own, at most the samples'
    assert age["counterfactual"]["scans"] == 3
    assert age["counterfactual"]["readings"][0]["scale"] == min(1.0, age["scale"])
    assert moved.scale("age") == pytest.approx(age["counterfactual"]["scale"], abs=1e-3)
    assert age["counterfactual"]["scale"] <= age["scale"] + 1e-9

    sample = ["sample", "--checkpoint", str(run), "--num", "2", "--seed", "1", "--condition", "age=80", "--no-progress"]
    assert main(["config", "show", "--checkpoint", str(run)]) == 0
    shown = capsys.readouterr().out
    assert f"guidance calibrated for this checkpoint: {chosen}" in shown
    assert f"counterfactual guidance calibrated for this checkpoint: {moved}" in shown
    scan = json.loads((run / "split.json").read_text())["train"][0]
    assert main(["counterfactual", "--checkpoint", str(run), "--input", scan, "--condition", "age=70", "--no-progress",
                 "--output-dir", str(tmp_path / "cf")]) == 0
    assert "calibrated for this checkpoint's counterfactuals" in capsys.readouterr().err
    assert json.loads((tmp_path / "cf" / "counterfactuals.json").read_text())["guidance"] == moved.to_json()
    assert main([*sample, "--output-dir", str(tmp_path / "auto")]) == 0
    assert "calibrated for this checkpoint" in capsys.readouterr().err
    explicit = f"age={chosen.scale('age')},sex=1"
    assert main([*sample, "--guidance", explicit, "--output-dir", str(tmp_path / "explicit")]) == 0
    assert json.loads((tmp_path / "auto" / "samples.json").read_text())["guidance"] == chosen.to_json()
    import nibabel as nib

    a, b = (np.asarray(nib.load(str(tmp_path / d / "sample_0000.nii.gz")).dataobj) for d in ("auto", "explicit"))
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("extra, fragment", [(["--scales", "2,1"], "ascending order"),
                                             (["--scales", "one"], "comma-separated numbers"),
                                             (["--measure", "age=height"], "the measures are"),
                                             (["--measure", "weight=gm_ml"], "not conditioned on 'weight'"),
                                             (["--points", "2"], "--points and --max-scans must be >= 3"),
                                             (["--counterfactual-scans", "-1"], "--counterfactual-scans >= 0"),
                                             (["--streams", "0"], "--streams >= 1")])
def test_bad_calibration_options_are_one_line(run, tmp_path, capsys, extra, fragment):
    from verydeepvae.cli import main

    assert main(["calibrate-guidance", "--checkpoint", str(run), *CALIBRATE, *extra,
                 "--output-dir", str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "out").exists() and not (run / CALIBRATION_FILE).exists()
