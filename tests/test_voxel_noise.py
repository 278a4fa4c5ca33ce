"""Drawn voxels that correlate between neighbours as the training volumes do: the correlated
normal field, the copula draw that keeps each voxel's distribution, the measurement at the end of
training, and how checkpoints and sampling carry it (model/voxel_noise.py, train/fit_voxel_noise.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import tiny_train_args, write_ellipsoids
from verydeepvae import checkpoint as ckpt
from verydeepvae.cli import main
from verydeepvae.errors import CheckpointError
from verydeepvae.generate import load_model
from verydeepvae.model.likelihood import DiscretisedLogistic, Gaussian
from verydeepvae.model.voxel_noise import VoxelNoise, kernel_sigma, neighbour_correlation
from verydeepvae.sampling import describe_voxels, voxels_draw
from verydeepvae.train import fit_voxel_noise


def _neighbour_correlations(field: torch.Tensor) -> list[float]:
    """Pearson correlation between face neighbours along depth, height and width of (B, 1, D, H, W)."""
    out = []
    for dim in (2, 3, 4):
        a = field.narrow(dim, 1, field.shape[dim] - 1).flatten().double()
        b = field.narrow(dim, 0, field.shape[dim] - 1).flatten().double()
        out.append(float(torch.corrcoef(torch.stack([a, b]))[0, 1]))
    return out


def test_the_kernel_width_inverts_the_neighbour_correlation():
    for rho in (0.05, 0.2, 0.36, 0.6, 0.9):
        assert neighbour_correlation(kernel_sigma(rho)) == pytest.approx(rho, abs=1e-6)
    assert kernel_sigma(0.0) == 0.0 and kernel_sigma(-0.2) == 0.0 and neighbour_correlation(0.0) == 0.0
    assert kernel_sigma(0.99) == kernel_sigma(0.95)  # capped: the kernel would grow without bound


def test_the_field_is_standard_normal_with_the_asked_correlation_along_each_axis_and_at_the_edges():
    noise = VoxelNoise((0.1, 0.45, 0.0))
    field = noise.scores((6, 1, 32, 32, 32), torch.Generator().manual_seed(0))
    assert field.shape == (6, 1, 32, 32, 32) and field.dtype == torch.float32
    assert float(field.mean()) == pytest.approx(0.0, abs=0.02)
    assert float(field.std()) == pytest.approx(1.0, abs=0.02)
    # padded before filtering, so the border has the same variance as the centre
    assert float(field[..., :2, :, :].std()) == pytest.approx(1.0, abs=0.03)
    for measured, asked in zip(_neighbour_correlations(field), noise.correlations):
        assert measured == pytest.approx(asked, abs=0.02)
    again = noise.scores((6, 1, 32, 32, 32), torch.Generator().manual_seed(0))
    assert torch.equal(field, again)  # the generator decides the field


def test_the_field_is_float32_under_bfloat16_autocast():
    noise = VoxelNoise((0.4, 0.4, 0.4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        field = noise.scores((1, 1, 16, 16, 16), torch.Generator().manual_seed(1))
    assert field.dtype == torch.float32  # in bfloat16, Φ(g) would round to 1 in the tails


@pytest.mark.parametrize("likelihood, params", [
    (DiscretisedLogistic(), torch.tensor([0.1, np.log(0.08)])),
    (DiscretisedLogistic(num_mixtures=2), torch.tensor([0.3, -0.3, -0.5, 0.4, np.log(0.05), np.log(0.1)])),
    (Gaussian(), torch.tensor([0.1, -3.0])),  # s.d. 0.17
])
def test_correlated_draws_keep_each_voxels_distribution_and_their_scores_recover_the_field(likelihood, params):
    shape = (4, 1, 24, 24, 24)
    params = params.view(1, -1, 1, 1, 1).expand(shape[0], -1, *shape[2:]).contiguous().float()
    field = VoxelNoise((0.5, 0.5, 0.5)).scores(shape, torch.Generator().manual_seed(2))
    correlated = likelihood.sample(params, torch.Generator().manual_seed(3), field)
    independent = likelihood.sample(params, torch.Generator().manual_seed(4))
    quantiles = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    assert torch.allclose(torch.quantile(correlated.double().flatten(), quantiles),
                          torch.quantile(independent.double().flatten(), quantiles), atol=0.02)
    assert _neighbour_correlations(independent)[0] == pytest.approx(0.0, abs=0.03)
    assert min(_neighbour_correlations(correlated)) > 0.3
    scores = likelihood.normal_scores(params, correlated)
    inside = (field.abs() < 2.5) & (correlated.abs() < 1.0)  # away from the clamps at ±1
    r = torch.corrcoef(torch.stack([scores[inside].double(), field[inside].double()]))[0, 1]
    assert float(r) > 0.97


def _ball_volumes(noise: VoxelNoise, count: int = 6, size: int = 24, scale: float = 0.03):
    """Volumes in [0, 1]: a bright ball with logistic deviations of ``scale`` driven by ``noise``'s
    field, and the discretised-logistic parameters (in [-1, 1]) that describe them."""
    axis = np.linspace(-1, 1, size)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    mean01 = np.where(x ** 2 + y ** 2 + z ** 2 < 0.7, 0.6, 0.0).astype(np.float32)
    mean = torch.from_numpy(mean01 * 2 - 1)[None, None].expand(count, 1, -1, -1, -1)
    params = torch.cat([mean, torch.full_like(mean, float(np.log(scale * 2)))], 1)
    g = noise.scores((count, 1, size, size, size), torch.Generator().manual_seed(5))
    u = torch.special.ndtr(g)
    x_11 = mean + scale * 2 * (torch.log(u) - torch.log1p(-u))
    return ((x_11 + 1) / 2).clamp(0, 1)[:, 0].numpy().astype(np.float32), params


class _Described:
    """Stands in for a model whose p(x | z) for the posterior is known: ``params`` for every volume."""

    def __init__(self, params: torch.Tensor):
        self.params = params
        self.likelihood = DiscretisedLogistic()
        self.output_head = SimpleNamespace(conv=SimpleNamespace(weight=torch.zeros(1)))
        self.covariates_seen: list = []

    def __call__(self, x01: torch.Tensor, covariates=None) -> SimpleNamespace:  # VeryDeepVAE.forward's output
        self.covariates_seen.append(covariates)
        return SimpleNamespace(params=self.params[: len(x01)])


def test_the_measurement_finds_the_correlation_the_volumes_were_made_with():
    truth = VoxelNoise((0.15, 0.45, 0.3))
    volumes, params = _ball_volumes(truth)
    fake = _Described(params)
    found = fit_voxel_noise.measure(fake, volumes, 6, seed=0)
    for measured, made in zip(found.correlations, truth.correlations):
        assert measured == pytest.approx(made, abs=0.04)
    independent, params = _ball_volumes(VoxelNoise((0.0, 0.0, 0.0)))
    fake = _Described(params)
    assert max(fit_voxel_noise.measure(fake, independent, 6, seed=0).correlations) < 0.04
    with pytest.raises(ValueError, match="no neighbouring voxels inside the brain"):  # empty volumes
        fit_voxel_noise.measure(fake, np.zeros_like(independent), 6, seed=0)
    # a conditional model is given each volume's covariates, batch by batch
    fake, covariates = _Described(params), np.arange(12, dtype=np.float32).reshape(6, 2)
    fit_voxel_noise.measure(fake, independent, 4, seed=0, covariates=covariates)
    assert [c.tolist() for c in fake.covariates_seen] == [covariates[:4].tolist(), covariates[4:].tolist()]


def test_records_round_trip_and_damaged_ones_are_refused():
    noise = VoxelNoise((0.27, 0.44, 0.39))
    record = noise.record(64)
    assert VoxelNoise.from_record(json.loads(json.dumps(record))) == noise and record["num_volumes"] == 64
    assert noise.text() == "0.27 / 0.44 / 0.39"
    for bad in ({"correlations": [0.2, 0.3]}, {"correlations": [0.2, 0.3, float("nan")]},
                {"correlations": [0.2, 0.3, 1.5]}, {}):
        with pytest.raises((ValueError, KeyError, TypeError)):
            VoxelNoise.from_record(bad)


def test_voxel_choices():
    assert voxels_draw("independent") is True and voxels_draw("draw") is True and voxels_draw("mean") is False
    assert voxels_draw("auto") is None


def _tiny_run(tmp_path: Path, volumes: int, *settings: str) -> Path:
    """A run folder of the tiny preset trained on ``volumes`` ellipsoids with ``settings``."""
    data, run = tmp_path / "data", tmp_path / "run"
    write_ellipsoids(data, volumes)
    assert main(tiny_train_args(data, run, *settings)) == 0
    return run


@pytest.mark.slow
def test_training_measures_records_and_sampling_follows(tmp_path: Path, capsys):
    run = _tiny_run(tmp_path, 8, "--max-steps", "4", "--set", "sample_voxels=draw")
    out = capsys.readouterr().out
    assert "drawn voxels: neighbour correlation" in out
    path = ckpt.list_checkpoints(ckpt.checkpoint_dir(run))[-1]
    checkpoint = ckpt.load_checkpoint(path)
    record = checkpoint.meta["voxel_noise"]
    assert len(record["correlations"]) == 3 and record["num_volumes"] == checkpoint.meta["data"]["num_train"]
    model = load_model(checkpoint)
    assert model.voxel_noise == VoxelNoise.from_record(record)
    # the run's own final samples were drawn with the stored (rounded) correlations: sampling the
    # checkpoint again with the same seed gives the same files
    assert main(["sample", "--checkpoint", str(run), "--num", "1", "--output", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    first, again = (np.asarray(nib.load(folder / "sample_0000.nii.gz").dataobj) for folder in
                    (run / "samples", tmp_path / "again"))
    np.testing.assert_array_equal(first, again)
    assert load_model(checkpoint, use_ema=False).voxel_noise is None  # measured for the EMA weights
    assert "correlated as in the training volumes" in describe_voxels(model, "draw")
    assert describe_voxels(model, "independent").endswith("independently")
    assert describe_voxels(model, "mean") == "the mean of p(x | z)"
    from verydeepvae.train.inspect_run import inspect_run

    assert any("drawn voxels: neighbour correlation" in line for line in inspect_run(run))
    written = {}
    for voxels in ("draw", "independent"):
        folder = tmp_path / voxels
        assert main(["sample", "--checkpoint", str(run), "--num", "2", "--output", str(folder), "--voxels", voxels,
                     "--no-progress", "--seed", "3"]) == 0
        written[voxels] = [p.read_bytes() for p in sorted(folder.glob("sample_*.nii.gz"))]
        assert json.loads((folder / "samples.json").read_text())["voxels"] == describe_voxels(model, voxels)
    assert written["draw"] != written["independent"]
    # the choice touches only the voxels' draw: the latents, and so the mean of p(x | z), are the same
    generator = torch.Generator().manual_seed(0)
    mean_a, _ = model.sample_mean_and_draw(2, generator=generator)
    generator = torch.Generator().manual_seed(0)
    mean_b, _ = model.sample_mean_and_draw(2, generator=generator, correlated_voxels=False)
    assert torch.equal(mean_a, mean_b)


@pytest.mark.slow
def test_switched_off_or_damaged(tmp_path: Path, capsys):
    run = _tiny_run(tmp_path, 6, "--max-steps", "2", "--set", "fit_voxel_noise=false")
    path = ckpt.list_checkpoints(ckpt.checkpoint_dir(run))[-1]
    checkpoint = ckpt.load_checkpoint(path)
    assert "voxel_noise" not in checkpoint.meta and load_model(checkpoint).voxel_noise is None
    checkpoint.meta["voxel_noise"] = {"correlations": [0.1, 0.2]}
    with pytest.raises(CheckpointError, match="damaged voxel-noise record"):
        load_model(checkpoint)
