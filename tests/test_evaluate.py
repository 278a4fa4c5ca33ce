"""The evaluation report: data selection rules, the sections' known answers, the whole command."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from verydeepvae import metrics as M
from verydeepvae.cli import main
from verydeepvae.data.phantom import generate_population, read_participants
from verydeepvae.evaluate import EvaluationOptions, run_evaluation, select_data
from verydeepvae.evaluate import compute, morphometry
from verydeepvae.evaluate.population import spread_text
from verydeepvae.generate import open_trained


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny 16³ model trained for 20 steps on 16 phantom brains (32³ files): 12 train / 4 validation."""
    root = tmp_path_factory.mktemp("evaluate")
    generate_population(16, 32, root / "phantoms", seed=0, montage=False, progress=False)
    out = root / "run"
    assert main(["train", "--preset", "tiny", "--data", str(root / "phantoms"), "--output-dir", str(out),
                 "--max-steps", "20", "--no-progress", "--set", "train_fraction=0.75",
                 "--set", "validation_every=20", "--set", "checkpoint_every=20", "--set", "figures_every=1000"]) == 0
    return out


@pytest.fixture(scope="module")
def trained(run):
    return open_trained(run, device="cpu")


@pytest.fixture(scope="module")
def report(run, trained, tmp_path_factory):
    """The report on the run's own held-out split."""
    out = tmp_path_factory.mktemp("report")
    options = EvaluationOptions(num_samples=6, num_pairs=10, baseline_repeats=3, show_progress=False)
    return run_evaluation(trained, None, out, options)


# --- which data ----------------------------------------------------------------------------------


def _fake_run(tmp_path: Path, train: list[Path], val: list[Path]) -> SimpleNamespace:
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "split.json").write_text(json.dumps({"train": [str(p) for p in train],
                                                    "validation": [str(p) for p in val],
                                                    "data_source": str(train[0].parent)}))
    return SimpleNamespace(run_dir=run_dir)


def test_held_out_files_follow_the_split(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    files = [data / f"v{i}.nii.gz" for i in range(6)]
    for f in files:
        f.write_bytes(b"x")
    other = tmp_path / "other"
    other.mkdir()
    extra = other / "new.nii.gz"
    extra.write_bytes(b"x")
    fake = _fake_run(tmp_path, files[:4], files[4:])
    sel = select_data(fake, None)
    assert sel.heldout_files == [str(f) for f in files[4:]] and sel.train_files == [str(f) for f in files[:4]]
    sel = select_data(fake, data)  # the training data itself: only its validation files are held out
    assert [Path(f).name for f in sel.heldout_files] == ["v4.nii.gz", "v5.nii.gz"]
    assert any("training files" in n for n in sel.notes)
    sel = select_data(fake, other)  # other data: all of it
    assert [Path(f).name for f in sel.heldout_files] == ["new.nii.gz"] and len(sel.train_files) == 4
    capped = select_data(fake, None, max_train=2, seed=3)
    assert len(capped.train_files) == 2 and set(capped.train_files) <= {str(f) for f in files[:4]}
    no_split = SimpleNamespace(run_dir=tmp_path / "elsewhere")
    sel = select_data(no_split, data)
    assert len(sel.heldout_files) == 6 and sel.train_files == [] and "no split.json" in sel.heldout_rule
    from verydeepvae.errors import UserError

    with pytest.raises(UserError, match="give --data"):
        select_data(no_split, None)
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    (only_train / "v0.nii.gz").symlink_to(files[0])
    with pytest.raises(UserError, match="no held-out"):
        select_data(_fake_run(tmp_path / "t", [only_train / "v0.nii.gz"], files[4:]), only_train)


# --- sections with known answers ------------------------------------------------------------------


def test_streaming_active_units_match_the_metric():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(12, 3, 2, 2, 2)) * np.array([0.01, 0.5, 2.0])[None, :, None, None, None]
    stats = M.RunningVariance()
    for start in range(0, 12, 5):
        stats.update(torch.from_numpy(z[start:start + 5]))
    var = stats.variance()
    np.testing.assert_allclose(var, z.reshape(12, -1).var(axis=0), rtol=1e-10)
    assert int(np.sum(var > 0.01)) == M.active_units([z])["total_active"] == 16


def test_distances_are_at_the_baseline_for_the_same_distribution_and_far_above_for_another():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(40, 5))
    same = compute.distance_section(rng.normal(size=(40, 5)), real, seed=0, repeats=5)
    shifted = compute.distance_section(rng.normal(size=(40, 5)) + 3.0, real, seed=0, repeats=5)
    assert same["frechet"]["ratio_to_baseline"] < 3
    assert shifted["frechet"]["ratio_to_baseline"] > 10
    assert shifted["mmd"]["samples_vs_real_half"] > 10 * max(abs(same["mmd"]["samples_vs_real_half"]), 0.01)
    assert same["frechet"]["real_vs_real"] == pytest.approx(
        M.real_vs_real_baseline(M.pooled_standardiser(real, real)(real), M.frechet_distance, seed=0, repeats=5),
        rel=0.5)


def test_constant_real_features_do_not_blow_up_the_distances():
    rng = np.random.default_rng(2)
    real = np.concatenate([rng.normal(size=(20, 3)), np.zeros((20, 1))], axis=1)
    samples = np.concatenate([rng.normal(size=(20, 3)), rng.normal(0, 1e-3, size=(20, 1))], axis=1)
    out = compute.distance_section(samples, real, seed=0, repeats=3)
    assert out["frechet"]["samples_vs_real"] < 50


def test_wasserstein_with_baseline_recovers_a_known_shift():
    rng = np.random.default_rng(3)
    real = {"gm_ml": rng.normal(600, 20, 200)}
    gen = {"gm_ml": real["gm_ml"] + 50.0}
    out = morphometry.wasserstein_with_baseline(gen, real, seed=0, repeats=3)["features"]["gm_ml"]
    assert out["samples_vs_real_ml"] == pytest.approx(50.0, abs=1e-9)
    assert out["samples_vs_real_in_real_sd"] == pytest.approx(50.0 / np.std(real["gm_ml"]))
    assert out["real_vs_real_half_ml"] < 8 < 40 < out["samples_vs_real_half_ml"]


def test_running_nearest_matches_the_one_shot_search():
    rng = np.random.default_rng(4)
    queries = {"a": rng.normal(size=(5, 7)), "b": rng.normal(size=(3, 7))}
    train = rng.normal(size=(11, 7))
    near = compute.RunningNearest(queries)
    for start in range(0, 11, 4):
        near.update(start, train[start:start + 4])
    for k, q in queries.items():
        d, i = M.nearest_neighbour_distances(q, train)
        np.testing.assert_allclose(near.distances[k], d)
        assert np.array_equal(near.indices[k], i)


@pytest.mark.slow
def test_phantom_volume_estimates_recover_participants_tsv(tmp_path):
    """Estimates from 64³ phantoms preprocessed as for training vs the recorded volumes."""
    from verydeepvae.data.nifti_load import PreprocessSettings, preprocess_file

    paths = generate_population(20, 64, tmp_path, seed=11, montage=False, progress=False)
    rows = read_participants(tmp_path / "participants.tsv")
    volumes, sizes = [], []
    for p in paths:
        v, meta = preprocess_file(p, PreprocessSettings(resolution=64))
        volumes.append(v)
        sizes.append(meta["voxel_size_mm"])
    table = morphometry.volume_table(volumes, sizes)
    recorded = {k: np.array([float(r[c]) for r in rows]) for k, c in morphometry.RECORDED.items()}
    r = {k: v["pearson_r"] for k, v in morphometry.recovery(table, recorded).items()}
    # measured on this population: brain 1.00, GM 0.99, WM 0.98, lesion 0.95, CSF 0.93, ventricles 0.88
    # (docs/morphometry.md); the population is deterministic, the margins are for future changes
    assert r["brain_ml"] > 0.95 and r["lesion_ml"] > 0.85 and r["gm_ml"] > 0.9, r
    assert r["ventricle_ml"] > 0.75 and r["wm_ml"] > 0.85 and r["csf_ml"] > 0.8, r


def _untrained(**overrides):
    from verydeepvae.config import build_config
    from verydeepvae.generate import TrainedModel
    from verydeepvae.model import VeryDeepVAE

    cfg = build_config(preset="tiny", overrides=overrides)
    fake = SimpleNamespace(config=cfg, meta={}, path=Path("untrained.safetensors"), step=0)
    return TrainedModel(model=VeryDeepVAE(cfg).eval(), checkpoint=fake, weights="raw", device="cpu")


def test_a_continuous_likelihood_is_not_called_a_code_length():
    volumes = np.random.default_rng(5).uniform(0, 1, (3, 16, 16, 16)).astype(np.float32)
    gaussian = compute.likelihood_section(_untrained(likelihood="gaussian"), volumes, 2, 0, False)
    assert not gaussian.discrete and "not a code length" in gaussian.statement
    discrete = compute.likelihood_section(_untrained(), volumes, 2, 0, False)
    assert discrete.discrete and "true code length" in discrete.statement
    assert discrete.elbo_bits_per_voxel.mean > 0
    assert len(discrete.per_volume_elbo_bits_per_voxel) == 3
    assert discrete.to_json()["elbo_bits_per_voxel"]["mean"] == discrete.elbo_bits_per_voxel.mean


# --- the report -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_on_the_runs_own_split(report, run):
    r = report.data
    split = json.loads((run / "split.json").read_text())
    assert r["data"]["heldout_files"] == split["validation"] and r["data"]["num_train"] == len(split["train"])
    lik = r["likelihood"]
    assert lik["discrete"] and "true code length" in lik["statement"]
    assert lik["elbo_bits_per_voxel"]["mean"] == pytest.approx(lik["elbo_nats_per_voxel"]["mean"] / math.log(2))
    assert lik["elbo_bits_per_voxel"]["mean"] > 0
    layers = lik["kl_per_layer"]
    assert len(layers) == 5 and [layer["resolution"] for layer in layers] == [1, 2, 4, 8, 16]
    assert sum(layer["kl_bits_per_voxel"] for layer in layers) == pytest.approx(lik["kl_bits_per_voxel"]["mean"])
    assert lik["active_units"]["total_units"] == 18728
    for key in ("psnr_db", "ssim", "mae"):
        assert math.isfinite(r["reconstruction"][key]["mean"])
    assert r["diversity"]["samples"]["num_volumes"] == 6 and r["diversity"]["real"]["num_volumes"] == 4
    assert r["texture"]["real"]["num_volumes"] == 4  # phantoms always have an interior; samples may not yet
    assert r["texture"]["samples"] is None or 1 <= r["texture"]["samples"]["num_volumes"] <= 6
    for name in ("random_cnn", "intensity"):
        assert r["distances"][name]["frechet"]["real_vs_real"] >= 0
        assert "samples_vs_real_half" in r["distances"][name]["mmd"]
    mem = r["memorisation"]
    assert len(mem["voxels"]["sample_distances"]) == 6 and len(mem["voxels"]["heldout_distances"]) == 4
    assert mem["closest_samples"][0]["nearest_training_file"] in split["train"]
    assert mem["heldout_copies"] == []  # the split's own validation files are other subjects
    morph = r["morphometry"]  # the phantom folder has participants.tsv: on automatically
    assert set(morph["comparison"]["features"]) == set(morphometry.FEATURES)
    assert morph["estimator_check"]["num_volumes"] == 4
    out = report.output_dir
    saved = json.loads((out / "report.json").read_text())  # strict JSON (no NaN)
    assert saved["format"] == "verydeepvae-evaluation-1"
    for name in ("samples", "real", "reconstructions", "kl_per_layer", "nearest_training", "closest_samples",
                 "tissue_volumes", "estimator_check"):
        assert (out / "figures" / f"{name}.png").is_file(), name
    text = (out / "report.md").read_text()
    assert "bits/voxel" in text and "true code length" in text and "real vs real" in text
    low, high = r["distances"]["random_cnn"]["frechet"]["ratio_spread"]  # how far one split's ratio strays
    assert 0 < low <= high and f"| {spread_text([low, high])} |" in text
    assert re.sub(r"not FID|FID-3D", "", text).count("FID") == 0  # never called FID
    for link in re.findall(r"\]\((figures/[^)]+)\)", text):
        assert (out / link).is_file(), link


@pytest.mark.slow
def test_evaluate_command_on_other_data_with_a_plugin(run, tmp_path, monkeypatch, capsys):
    generate_population(6, 32, tmp_path / "new", seed=9, montage=False, progress=False)
    (tmp_path / "plugin_feats.py").write_text(
        "import numpy as np\n"
        "class Coarse:\n"
        "    name = 'coarse voxels (test plug-in)'\n"
        "    def __call__(self, volumes):\n"
        "        return np.asarray(volumes)[:, ::4, ::4, ::4].reshape(len(volumes), -1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "report"
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(tmp_path / "new"), "--output-dir", str(out),
                 "--num-samples", "4", "--num-pairs", "5", "--feature-plugin", "plugin_feats:Coarse",
                 "--set-size", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "bits/voxel" in printed and "report.md" in printed
    r = json.loads((out / "report.json").read_text())
    assert r["data"]["num_heldout"] == 6 and "not training files" in r["data"]["heldout_rule"]
    assert r["distances"]["plugin"]["features"]["label"] == "coarse voxels (test plug-in)"
    assert r["morphometry"]["estimator_check"]["num_volumes"] == 6
    assert r["distances"]["random_cnn"]["frechet"]["set_size"] == 2 == r["morphometry"]["comparison"]["set_size"]
    assert "coarse voxels (test plug-in)" in (out / "report.md").read_text()
    sys.modules.pop("plugin_feats", None)


@pytest.mark.slow
def test_held_out_copies_of_training_volumes_are_flagged(run, tmp_path, capsys):
    """A held-out folder that repeats training subjects under other names (a phantom population made
    with the training seed does): the report names the copies and says the readings are not held out."""
    import shutil

    split = json.loads((run / "split.json").read_text())
    data = tmp_path / "heldout"
    generate_population(4, 32, data, seed=9, montage=False, progress=False)
    copied = split["train"][:2]
    for i, f in enumerate(copied):
        shutil.copy(f, data / f"renamed_{i}.nii.gz")
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(data), "--output-dir", str(tmp_path / "o"),
                 "--num-samples", "4", "--num-pairs", "5", "--set-size", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "2 of the 6 held-out volumes are copies of training volumes" in printed
    r = json.loads((tmp_path / "o" / "report.json").read_text())
    pairs = {(Path(c["heldout_file"]).name, c["training_file"]) for c in r["memorisation"]["heldout_copies"]}
    assert pairs == {(f"renamed_{i}.nii.gz", f) for i, f in enumerate(copied)}
    assert "copies of training volumes" in (tmp_path / "o" / "report.md").read_text()
    from verydeepvae.evaluate.summary import quality_row

    assert quality_row(r)["heldout_copies"] == 2


@pytest.mark.slow
def test_evaluate_is_reproducible(run, trained, report, tmp_path):
    options = EvaluationOptions(num_samples=6, num_pairs=10, baseline_repeats=3, show_progress=False)
    again = run_evaluation(trained, None, tmp_path, options).data
    for section in ("likelihood", "reconstruction", "diversity", "texture", "distances", "memorisation"):
        assert json.dumps(again[section], sort_keys=True, default=str) == \
            json.dumps(report.data[section], sort_keys=True, default=str), section


@pytest.mark.slow
@pytest.mark.parametrize("args,fragment", [
    (["--num-samples", "0"], "--num-samples"),
    (["--feature-plugin", "nonexistent_module_xyz:f"], "--feature-plugin"),
    (["--temperature", "-1"], "--temperature"),
    (["--data", "/nonexistent/folder"], "does not exist"),
    (["--set-size", "1"], "--set-size must be 2 to --num"),
    (["--set-size", "3"], "at most half the 4 held-out volumes"),
])
def test_evaluate_user_errors_exit_2(run, tmp_path, capsys, args, fragment):
    assert main(["evaluate", "--checkpoint", str(run), "--output-dir", str(tmp_path / "o"), "--no-progress",
                 *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


def test_drawn_samples_are_pictured_beside_their_mean(trained, tmp_path, monkeypatch):
    """--voxels draw: the report's sample figure shows each drawn sample beside the mean of p(x | z) of
    the same latents, and asking for those means moves no sample."""
    from verydeepvae import viz
    from verydeepvae.evaluate.report import FIGURE_ROWS, write_figures
    from verydeepvae.evaluate.run import compute_report
    from verydeepvae.sampling import iter_sample_batches

    options = EvaluationOptions(num_samples=FIGURE_ROWS + 2, num_pairs=10, baseline_repeats=3, show_progress=False,
                                voxels="draw", seed=4)
    result = compute_report(trained, None, options)
    arrays = result["arrays"]
    batches = list(iter_sample_batches(trained.model, FIGURE_ROWS + 2, 1.0, 4, options.batch_size, "cpu", False,
                                       voxels="draw", means=True))
    assert np.array_equal(arrays["samples"], np.concatenate([b.volumes for b in batches]))
    assert len(arrays["sample_means"]) == FIGURE_ROWS  # only what the figure shows is kept
    assert np.array_equal(np.stack(arrays["sample_means"]), np.concatenate([b.means for b in batches])[:FIGURE_ROWS])
    pictured = []
    monkeypatch.setattr(viz, "save_side_by_side", lambda left, right, path, *a, **kw: pictured.append(
        (path.name, len(left), kw.get("suptitle"))))
    write_figures(result["report"], arrays, tmp_path)
    assert ("samples.png", FIGURE_ROWS, "prior samples, temperature 1.0, voxels drawn") in pictured
