"""The sample-quality signal logged at each validation (train/quality.py): what it logs, that it
can be turned off, and that it leaves the training trajectory bit for bit unchanged."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from verydeepvae.config import build_config
from verydeepvae.errors import ConfigError
from verydeepvae.model import VeryDeepVAE
from verydeepvae.train import quality
from verydeepvae.checkpoint import list_checkpoints, load_checkpoint
from verydeepvae.train.loop import train
from verydeepvae.train.progress import unused_level_warning, validation_line

LEVELS = ("res16", "res8", "res4", "res2", "res1")  # the tiny preset's latent levels
FRECHET_KEYS = {"frechet_samples", "frechet_real_vs_real", "frechet_ratio"}
TEXTURE_KEYS = {"roughness_ratio", "fine_correlation_gap"}  # computed with the Fréchet keys, from the same samples


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """Two 6-step tiny runs, validating every 2 steps, identical except quality_samples (8 and 0)."""
    from conftest import write_ellipsoids

    root = tmp_path_factory.mktemp("quality")
    write_ellipsoids(root / "data", 16, size=16)
    out = {}
    for samples in (8, 0):
        cfg = build_config("tiny", overrides={
            "data_path": str(root / "data"), "output_dir": str(root / f"run{samples}"),
            "cache_dir": str(root / "cache"), "train_fraction": 0.75, "max_steps": 6, "log_every": 2,
            "validation_every": 2, "checkpoint_every": 6, "subjects_to_plot": 0, "quality_samples": samples})
        assert train(cfg, show_progress=False).step == 6
        out[samples] = Path(cfg.output_dir)
    return out


@pytest.mark.slow
def test_validation_logs_active_units_per_level_and_the_frechet_ratio(runs):
    records = _records(runs[8], "quality")
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert math.isfinite(r["frechet_ratio"]) and r["frechet_ratio"] > 0
        assert r["frechet_ratio"] == pytest.approx(r["frechet_samples"] / r["frechet_real_vs_real"])
        assert TEXTURE_KEYS <= set(r)  # NaN is allowed: an untrained model's samples may have no interior
        for level in LEVELS:
            assert r[f"active_units_{level}"] >= 0
        assert 0 <= r["dead_levels"] <= len(LEVELS)
        assert r["dead_levels"] == sum(r[f"active_units_{level}"] == 0 for level in LEVELS)
        assert r["seconds"] > 0
    # TensorBoard has them too, and the validation history in the checkpoint keeps the headline figures
    assert list((runs[8] / "tensorboard").glob("events.out.tfevents.*"))
    history = load_checkpoint(list_checkpoints(runs[8] / "checkpoints")[-1]).meta["validation_history"]
    assert [h["frechet_ratio"] for h in history] == [r["frechet_ratio"] for r in records]
    assert [h["dead_levels"] for h in history] == [r["dead_levels"] for r in records]


@pytest.mark.slow
def test_the_log_names_unused_levels_and_the_end_of_the_run_warns_about_them(runs):
    log = (runs[8] / "train.log").read_text()
    lines = [line for line in log.splitlines() if "validation at step" in line]
    records = _records(runs[8], "quality")
    assert len(lines) == len(records) == 3
    for line, r in zip(lines, records):
        unused = [level for level in LEVELS if r[f"active_units_{level}"] == 0]
        assert f"dead latent levels {len(unused)}" in line
        for level in unused:
            assert f"{level[3:]}³" in line.split("dead latent levels")[1]
    # 4 validation volumes are too few to call a level unused; without the signal there is no claim
    assert "training ended with latent level" not in log
    assert "training ended with latent level" not in (runs[0] / "train.log").read_text()


@pytest.mark.slow
def test_a_run_that_ends_with_unused_levels_says_so(tmp_path):
    from conftest import write_ellipsoids

    write_ellipsoids(tmp_path / "data", 36, size=16)
    cfg = build_config("tiny", overrides={
        "data_path": str(tmp_path / "data"), "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"),
        "train_fraction": 0.5, "max_steps": 2, "log_every": 2, "validation_every": 2, "checkpoint_every": 2,
        "subjects_to_plot": 0, "quality_samples": 4})
    train(cfg, show_progress=False)
    last = _records(Path(cfg.output_dir), "quality")[-1]
    assert last["dead_levels"] == len(LEVELS)  # two steps: the model encodes nothing yet
    log = (Path(cfg.output_dir) / "train.log").read_text()
    assert "warning: training ended with latent level(s) 16³, 8³, 4³, 2³, 1³ unused" in log
    assert "train for more steps" in log and log.splitlines()[-1].endswith("finished at step 2")


def test_the_unused_level_warning_names_the_levels_and_the_remedies_not_yet_in_the_configuration():
    quality = {"active_units_res32": 0.0, "active_units_res16": 812.0, "active_units_res4": 40.0,
               "active_units_res2": 0.0, "active_units_res1": 1.0, "dead_levels": 2.0}
    text = unused_level_warning(quality, build_config("demo"), 20)
    assert "latent level(s) 32³, 2³ unused" in text
    assert "--set kl_free_bits_per_latent=0.001 (for a 32³ layer" in text and "--set kl_free_bits=2" in text

    def advice(**overrides):
        return unused_level_warning(quality, build_config("demo", overrides=overrides), 20)

    # what the configuration already has is not suggested again: the next larger allowance is
    assert "kl_free_bits=2" not in advice(kl_free_bits=2)
    assert "kl_free_bits_per_latent=0.003" in advice(kl_free_bits=2, kl_free_bits_per_latent=0.001)
    assert "--set" not in advice(kl_free_bits=2, kl_free_bits_per_latent=0.003)
    # an allowance at the finest layer alone, or one that ends, is not the one that kept it
    assert "kl_free_bits_per_latent=0.001" in advice(kl_free_bits_per_latent=0.001,
                                                     kl_free_bits_per_latent_resolutions=[32])
    assert "kl_free_bits_per_latent=0.001" in advice(kl_free_bits_per_latent=0.003,
                                                     kl_free_bits_per_latent_steps=1500)
    # only a coarse level unused: only the coarse remedy
    coarse = dict(quality, active_units_res32=9000.0, dead_levels=1.0)
    text = unused_level_warning(coarse, build_config("demo"), 20)
    assert "level(s) 2³ unused" in text and "--set kl_free_bits=2" in text and "per_latent" not in text
    assert unused_level_warning(dict(coarse, active_units_res2=8.0, dead_levels=0.0), build_config("demo"),
                                20) is None
    # no level in use: the model has not learned to encode yet, and no allowance is the remedy
    nothing = {k: 0.0 for k in quality} | {"dead_levels": 5.0}
    text = unused_level_warning(nothing, build_config("demo"), 20)
    assert "train for more steps" in text and "--set" not in text
    # too few validation volumes to call a level unused (the demo's 5): no warning
    assert unused_level_warning(quality, build_config("demo"), 15) is None
    # the validation line names them too
    values = {"elbo_bits_per_voxel": 1.7, "nll_bits_per_voxel": 1.6, "kl_bits_per_voxel": 0.1}
    assert validation_line(450, values, quality).endswith("; dead latent levels 2 (32³, 2³)")
    assert validation_line(450, values, dict(coarse, active_units_res2=8.0, dead_levels=0.0)).endswith(
        "; dead latent levels 0")
    textured = dict(quality, frechet_ratio=2.5, roughness_ratio=1.27, fine_correlation_gap=-0.265)
    assert "; Fréchet ratio 2.50; texture: roughness 1.27x real, fine correlation -0.27 from real; dead latent" in \
        validation_line(450, values, textured)
    assert "texture" not in validation_line(450, values, dict(textured, roughness_ratio=math.nan))


@pytest.mark.slow
def test_quality_samples_0_logs_nothing(runs):
    assert _records(runs[0], "quality") == []
    assert len(_records(runs[0], "validation")) == 3
    history = load_checkpoint(list_checkpoints(runs[0] / "checkpoints")[-1]).meta["validation_history"]
    assert all("frechet_ratio" not in h for h in history)


@pytest.mark.slow
def test_the_signal_does_not_change_the_training_trajectory(runs):
    a = load_checkpoint(list_checkpoints(runs[8] / "checkpoints")[-1])
    b = load_checkpoint(list_checkpoints(runs[0] / "checkpoints")[-1])
    assert a.step == b.step == 6
    for prefix in ("model", "ema", "optim"):
        sa, sb = a.state(prefix), b.state(prefix)
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{prefix}.{key} differs with the quality signal on"
    # the logged validation losses agree too
    assert _records(runs[8], "validation") == _records(runs[0], "validation")


def test_sample_quality_on_random_volumes_returns_the_documented_keys():
    cfg = build_config("tiny")
    torch.manual_seed(0)
    model = VeryDeepVAE(cfg)
    rng = np.random.default_rng(0)
    volumes = rng.uniform(0, 1, (6, 16, 16, 16)).astype(np.float32)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    out = quality.sample_quality(model, volumes, volumes, num_samples=8, batch_size=4, device="cpu", seed=3)
    assert set(out) == {f"active_units_{level}" for level in LEVELS} | {"dead_levels", "seconds"} | FRECHET_KEYS | \
        TEXTURE_KEYS
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert out["frechet_ratio"] > 0 and out["frechet_real_vs_real"] > 0
    # the global RNG streams are untouched, the model's mode restored, the result reproducible
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(x, y) for x, y in zip(np.random.get_state(), numpy_state))
    assert model.training
    again = quality.sample_quality(model, volumes, volumes, num_samples=8, batch_size=4, device="cpu", seed=3)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in out.items() if k != "seconds"}
    # too few volumes or samples: that part is left out
    few = quality.sample_quality(model, volumes[:1], volumes, num_samples=3, batch_size=4, device="cpu", seed=3)
    assert set(few) == {"seconds"}


def _balls(n: int, size: int = 16) -> np.ndarray:
    """``n`` noisy bright balls in a dark background, (n, size, size, size) in [0, 1]: an interior to measure in."""
    rng = np.random.default_rng(1)
    grid = np.indices((size,) * 3) - (size - 1) / 2
    ball = (np.sqrt((grid ** 2).sum(0)) < size * 0.4).astype(np.float32)
    return np.clip(ball * (0.6 + 0.1 * rng.standard_normal((n, size, size, size))), 0, 1).astype(np.float32)


def test_the_signal_draws_voxels_with_the_noise_measured_on_the_encoded_volumes(monkeypatch):
    """A model that draws its voxels is sampled, within the signal, with the voxel noise of the first
    16 encoded volumes (as the final model is with that of the training volumes); its own is back after."""
    from verydeepvae.model.voxel_noise import VoxelNoise
    from verydeepvae.train.fit_voxel_noise import measure

    torch.manual_seed(0)
    model = VeryDeepVAE(build_config("tiny", overrides={"sample_voxels": "draw"}))
    volumes = _balls(20)
    own = VoxelNoise((0.5, 0.5, 0.5))
    model.voxel_noise = own
    seen = []
    sample = model.sample
    monkeypatch.setattr(model, "sample", lambda *a, **k: (seen.append(model.voxel_noise), sample(*a, **k))[1])
    torch_state = torch.get_rng_state()
    out = quality.sample_quality(model, volumes, volumes, num_samples=8, batch_size=4, device="cpu", seed=3)
    model.eval()
    with torch.no_grad():
        expected = measure(model, volumes[:quality.NOISE_VOLUMES], 4, seed=3)
    assert seen and all(noise == expected for noise in seen) and expected != own
    assert model.voxel_noise is own and torch.equal(torch.get_rng_state(), torch_state)
    assert {"roughness_ratio", "fine_correlation_gap"} <= set(out)
    # nothing to measure in (no brain), or a model that outputs the mean: its own noise stays
    seen.clear()
    quality.sample_quality(model, np.zeros_like(volumes), volumes, num_samples=8, batch_size=4, device="cpu", seed=3)
    model.draws_voxels = False
    quality.sample_quality(model, volumes, volumes, num_samples=8, batch_size=4, device="cpu", seed=3)
    assert seen == [own] * 4 and model.voxel_noise is own


def test_a_conditional_models_signal_measures_the_voxel_noise_with_each_volumes_covariates(monkeypatch):
    from verydeepvae.train import fit_voxel_noise

    torch.manual_seed(0)
    model = VeryDeepVAE(build_config("tiny", overrides={"sample_voxels": "draw"}), 2)
    model.set_covariate_bank(torch.zeros(3, 2))
    volumes = _balls(6)
    covariates = np.arange(12, dtype=np.float32).reshape(6, 2) / 12
    items = [(torch.from_numpy(v)[None], torch.from_numpy(c)) for v, c in zip(volumes, covariates)]
    given = []
    measure = fit_voxel_noise.measure
    monkeypatch.setattr(fit_voxel_noise, "measure", lambda *a, **k: (given.append(a[4]), measure(*a, **k))[1])
    out = quality.sample_quality(model, items, volumes, num_samples=8, batch_size=4, device="cpu", seed=3)
    assert len(given) == 1 and np.array_equal(given[0], covariates)
    assert math.isfinite(out["roughness_ratio"]) and model.voxel_noise is None


class Fake:
    """A dataset of constant 4³ volumes: ``volume(i)`` (unaugmented) is base + i, or NaN when i is
    broken; an item (``[i]``, "augmented") is -1."""

    def __init__(self, base: float, n: int, broken: frozenset = frozenset()):
        self.base, self.n, self.broken = base, n, broken

    def __len__(self):
        return self.n

    def volume(self, i):  # the unaugmented volume
        return np.full((4, 4, 4), np.nan if i in self.broken else self.base + i, np.float32)

    def __getitem__(self, i):  # an "augmented" one, which must not be used for training volumes
        return torch.full((1, 4, 4, 4), -1.0)


def test_reference_volumes_are_validation_first_then_unaugmented_training_volumes():
    val, tr = Fake(100, 3), Fake(0, 10)
    ref = quality.reference_volumes(val, tr, 8, seed=1)
    assert ref.shape == (8, 4, 4, 4) and ref.dtype == np.float32
    firsts = ref[:, 0, 0, 0].tolist()
    assert sorted(firsts[:3]) == [100, 101, 102] and len(set(firsts)) == 8 and all(0 <= v < 10 for v in firsts[3:])
    assert np.array_equal(ref, quality.reference_volumes(val, tr, 8, seed=1))  # deterministic
    assert quality.reference_volumes(Fake(100, 20), tr, 8, seed=1)[:, 0, 0, 0].min() >= 100  # enough validation
    # broken (non-finite) volumes are passed over; with too few volumes, all there are
    patchy = quality.reference_volumes(val, Fake(0, 10, frozenset(range(0, 10, 2))), 8, seed=1)
    assert patchy.shape[0] == 8 and np.isfinite(patchy).all()
    assert quality.reference_volumes(val, Fake(0, 2), 8, seed=1).shape[0] == 5


def test_active_units_are_counted_over_validation_topped_up_with_unaugmented_training_volumes():
    val = Fake(100, 3)
    items = quality.active_unit_volumes(val, Fake(0, 30, frozenset({0, 1, 2, 3})), 16, seed=1)
    assert len(items) == 16
    assert [float(x[0, 0, 0, 0]) for x in items[:3]] == [-1.0] * 3  # the validation items, as validation reads them
    topped = [float(x[0, 0, 0, 0]) for x in items[3:]]
    assert all(x.shape == (1, 4, 4, 4) for x in items[3:]) and len(set(topped)) == 13
    assert all(4 <= v < 30 for v in topped)  # unaugmented, and the non-finite ones passed over
    again = quality.active_unit_volumes(val, Fake(0, 30, frozenset({0, 1, 2, 3})), 16, seed=1)
    assert [float(x[0, 0, 0, 0]) for x in again[3:]] == topped  # the same ones at every validation
    assert quality.active_unit_volumes(Fake(100, 20), Fake(0, 30), 16, seed=1).n == 20  # enough: validation itself
    assert len(quality.active_unit_volumes(val, Fake(0, 5), 16, seed=1)) == 8  # all there are
    # a conditional run: each training volume with its covariates
    conditional = Fake(0, 30)
    conditional.covariates = torch.arange(30.0)[:, None]
    pairs = quality.active_unit_volumes([(torch.zeros(1, 4, 4, 4), torch.tensor([-1.0]))], conditional, 4, seed=1)
    assert all(float(v[0, 0, 0, 0]) == float(c[0]) for v, c in pairs[1:])


def test_a_level_used_by_few_volumes_is_not_read_as_unused(monkeypatch):
    """The validation signal counts active units over at least 16 volumes: a level whose posterior
    mean varies over the training volumes is alive even when the 2 validation volumes agree."""
    cfg = build_config("tiny", overrides={"quality_samples": 0})
    model = VeryDeepVAE(cfg)
    shapes = [z.shape[1:] for z in model.encode(torch.zeros(1, 1, 16, 16, 16))]
    # every latent the volume's mean brightness: a unit varies exactly when the volumes' brightness does
    monkeypatch.setattr(model, "encode", lambda x: [x.mean((1, 2, 3, 4)).view(-1, 1, 1, 1, 1).expand(-1, *s)
                                                    for s in shapes])

    class Volumes(list):
        def volume(self, i):
            return self[i][0].numpy()

    val = Volumes([torch.full((1, 16, 16, 16), 0.5)] * 2)
    train = Volumes(torch.full((1, 16, 16, 16), float(c)) for c in np.linspace(0, 1, 20))
    values, _ = quality.validation_signal(model, SimpleNamespace(val=val, train=train), cfg, torch.device("cpu"), 0,
                                          None)
    assert quality.sample_quality(model, val, np.zeros((0, 1, 1, 1)), 0, 4, "cpu", 0)["dead_levels"] == len(LEVELS)
    assert values["dead_levels"] == 0


def test_quality_samples_must_not_be_negative():
    assert build_config("tiny").quality_samples == 8
    with pytest.raises(ConfigError, match="quality_samples must be >= 0"):
        build_config("tiny", overrides={"quality_samples": -1})
