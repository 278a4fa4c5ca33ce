"""The texture statistics (metrics/texture.py) and their place in the evaluation report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from verydeepvae.evaluate import compute
from verydeepvae.evaluate.report import markdown, summary_lines
from verydeepvae.evaluate.summary import quality_row
from verydeepvae.metrics import texture_comparison, texture_statistics, texture_summary
from verydeepvae.train.quality import texture_against

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "evaluation-example" / "report.json"


def _ball(size: int = 32) -> np.ndarray:
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij")
    return x ** 2 + y ** 2 + z ** 2 < 0.8


def _smooth(size: int = 32) -> np.ndarray:
    """A brain-like ball with slow intensity variation inside and background 0 outside."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij")
    return np.where(_ball(size), 0.5 + 0.2 * np.sin(3 * x) * np.cos(2 * y), 0.0)


def _grainy(sd: float, seed: int = 0) -> np.ndarray:
    """The smooth ball with independent Gaussian noise of ``sd`` on every foreground voxel."""
    noise = np.random.default_rng(seed).normal(0.0, sd, (32, 32, 32))
    return np.where(_ball(), np.clip(_smooth() + noise, 0.06, 1.0), 0.0)


def _structured(seed: int = 0) -> np.ndarray:
    """The smooth ball with spatially correlated texture (noise blurred by one voxel)."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).normal(0.0, 0.3, (32, 32, 32)), 1.0)
    return np.where(_ball(), np.clip(_smooth() + noise, 0.06, 1.0), 0.0)


def test_independent_grain_is_rough_with_no_fine_correlation():
    t = texture_statistics(_grainy(0.05))
    # E|a - b| for two independent N(0, sd) values is 2 sd / sqrt(pi); the smooth part adds little
    assert t["roughness"] == pytest.approx(2 * 0.05 / np.sqrt(np.pi), rel=0.1)
    assert abs(t["fine_correlation"]) < 0.1


def test_texture_tells_grain_smoothness_and_structure_apart():
    smooth, grain, structure = (texture_statistics(v) for v in (_smooth(), _grainy(0.05), _structured()))
    assert smooth["roughness"] < 0.2 * grain["roughness"]
    assert smooth["fine_correlation"] > 0.5
    assert grain["fine_correlation"] < structure["fine_correlation"] < smooth["fine_correlation"]


def test_roughness_scales_with_intensity_and_fine_correlation_does_not():
    volume = _structured(3)  # foreground >= 0.06, so 0.9 x keeps every voxel above the 0.05 threshold
    full, darker = texture_statistics(volume), texture_statistics(volume * 0.9)
    assert darker["roughness"] == pytest.approx(0.9 * full["roughness"], rel=1e-6)
    assert darker["fine_correlation"] == pytest.approx(full["fine_correlation"], abs=1e-9)


def test_shapes_batches_tensors_and_empty_volumes():
    batch = np.stack([_grainy(0.05, seed) for seed in range(3)])
    as_array = texture_statistics(batch)
    as_tensor = texture_statistics(torch.from_numpy(batch).float()[:, None])  # (N, 1, D, H, W)
    assert as_array["roughness"].shape == (3,) and as_array["fine_correlation"].shape == (3,)
    np.testing.assert_allclose(as_tensor["roughness"], as_array["roughness"], rtol=1e-5)
    single = texture_statistics(batch[0])
    assert isinstance(single["roughness"], float) and single["roughness"] == pytest.approx(as_array["roughness"][0])
    empty = texture_statistics(np.zeros((16, 16, 16)))  # background only: nothing to measure
    assert np.isnan(empty["roughness"]) and np.isnan(empty["fine_correlation"])


def test_texture_section_compares_samples_with_real_volumes():
    real = np.stack([_structured(seed) for seed in range(4)])
    samples = np.concatenate([np.stack([_grainy(0.05, seed) for seed in range(3)]), np.zeros((1, 32, 32, 32))])
    section = compute.texture_section(samples, real)
    assert section.measured and section.real["num_volumes"] == 4
    assert section.samples["num_volumes"] == 3  # the empty sample is left out, not averaged in as NaN
    s, r = section.samples["fine_correlation"], section.real["fine_correlation"]
    assert s["p10"] <= s["median"] <= s["p90"] and s["median"] < r["median"]
    text = "\n".join(section.markdown())
    assert "| samples | 3 |" in text and "| real | 4 |" in text
    assert compute.texture_section(np.zeros((2, 16, 16, 16)), real).samples is None


def test_reports_carry_texture_and_older_reports_still_read():
    old = json.loads(EXAMPLE.read_text())
    old.pop("texture", None)  # written before the section existed, and so before its timing
    old.get("timings_seconds", {}).pop("texture", None)
    assert "texture" not in markdown(old) and all("texture" not in line for line in summary_lines(old))
    assert np.isnan(quality_row(old)["roughness_ratio"]) and np.isnan(quality_row(old)["fine_correlation_gap"])
    real = np.stack([_structured(seed) for seed in range(4)])
    new = dict(old, texture=compute.texture_section(np.stack([_grainy(0.05, s) for s in range(4)]), real).to_json())
    assert "| texture: roughness / fine correlation (medians) |" in markdown(new)
    assert any(line.startswith("texture (samples vs real)") for line in summary_lines(new))
    row = quality_row(new)
    t = new["texture"]
    ratio = t["samples"]["roughness"]["median"] / t["real"]["roughness"]["median"]
    assert row["roughness_ratio"] == pytest.approx(ratio)
    assert row["fine_correlation_gap"] < 0  # grain against structured texture


def test_the_training_signal_reads_grain_as_rough_and_uncorrelated():
    real = np.stack([_structured(seed) for seed in range(4)])
    grain = np.stack([_grainy(0.08, seed) for seed in range(4)])
    same = texture_against(real, real)
    assert same["roughness_ratio"] == pytest.approx(1.0) and same["fine_correlation_gap"] == pytest.approx(0.0)
    grainy = texture_against(grain, real)
    assert grainy["roughness_ratio"] > 1 and grainy["fine_correlation_gap"] < 0
    smooth = texture_against(np.stack([_smooth()] * 4), real)
    assert smooth["roughness_ratio"] < 1 and smooth["fine_correlation_gap"] > 0
    assert all(np.isnan(v) for v in texture_against(np.zeros((2, 16, 16, 16)), real).values())
    assert all(np.isnan(v) for v in texture_against(np.full((2, 16, 16, 16), np.nan), real).values())
    # the report's summary and comparison give the same figures as the training signal
    assert texture_comparison(texture_summary(grain), texture_summary(real)) == grainy
