"""Tests for verydeepvae.metrics (offline, CPU; the whole file should run in well under a minute)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from verydeepvae import metrics as M


def blob_volumes(n: int, size: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Brain-like test volumes: a jittered ellipsoid 'brain' with a darker core and smooth texture.

    ``shift`` moves all foreground intensities up, giving a distribution different from shift=0.
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    g = (np.arange(size) + 0.5) / size - 0.5
    zz, yy, xx = np.meshgrid(g, g, g, indexing="ij")
    out = np.zeros((n, size, size, size), dtype=np.float32)
    for i in range(n):
        a, b, c = rng.uniform(0.3, 0.42, 3)
        r = np.sqrt((zz / a) ** 2 + (yy / b) ** 2 + (xx / c) ** 2)
        tex = gaussian_filter(rng.standard_normal((size,) * 3), 1.5)
        tex /= tex.std() + 1e-8
        vol = np.where(r < 1, 0.6 + 0.08 * tex, 0.0)
        vol = np.where(r < rng.uniform(0.3, 0.5), 0.25, vol)
        vol = np.where(r < 1, vol + shift, 0.0)
        out[i] = np.clip(vol, 0, 1)
    return out


def noisy(x: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(x + sigma * rng.standard_normal(x.shape), 0, 1).astype(np.float32)


# ---------------------------------------------------------------- reconstruction


def test_reconstruction_identical_and_noise_ordering():
    x = blob_volumes(3, 32, seed=1)
    assert np.all(np.isinf(M.psnr(x, x)))
    np.testing.assert_allclose(M.ssim3d(x, x), 1.0, atol=1e-9)
    np.testing.assert_allclose(M.mae(x, x), 0.0)
    p, s, e = [], [], []
    for sigma in (0.01, 0.05, 0.2):
        y = noisy(x, sigma)
        p.append(M.psnr(x, y))
        s.append(M.ssim3d(x, y))
        e.append(M.mae(x, y))
        assert p[-1].shape == (3,) and s[-1].shape == (3,) and e[-1].shape == (3,)
    assert np.all(p[0] > p[1]) and np.all(p[1] > p[2])
    assert np.all(s[0] > s[1]) and np.all(s[1] > s[2])
    assert np.all(e[0] < e[1]) and np.all(e[1] < e[2])


def test_reconstruction_single_volume_torch_and_mask():
    x = blob_volumes(1, 32, seed=2)[0]
    y = noisy(x, 0.05)
    v = M.psnr(torch.from_numpy(x), torch.from_numpy(y))
    assert isinstance(v, float)
    # PSNR against the closed form for a known constant error
    assert M.psnr(np.zeros((16,) * 3), np.full((16,) * 3, 0.1)) == pytest.approx(20.0)
    mask = x > 0
    # the zero background picks up (half-clipped) noise too, so restricting to the brain changes MAE
    assert M.mae(x, y, mask=mask) != pytest.approx(M.mae(x, y))
    assert 0 < M.ssim3d(x, y, mask=mask) < 1
    with pytest.raises(ValueError):
        M.psnr(x, y[:-1])


def test_ssim3d_matches_monai():
    from monai.metrics import SSIMMetric

    x = blob_volumes(2, 32, seed=3)
    y = noisy(x, 0.05)
    ref = SSIMMetric(spatial_dims=3, data_range=1.0)(torch.from_numpy(x)[:, None], torch.from_numpy(y)[:, None])
    np.testing.assert_allclose(M.ssim3d(x, y), ref.numpy().ravel(), atol=1e-4)


# ---------------------------------------------------------------- diversity (MS-SSIM)


@pytest.mark.parametrize("size,scales", [(32, 3), (64, 4), (128, 5), (16, 2), (48, 3), (96, 4), (8, 1)])
def test_ms_ssim_settings_fit_monai_condition(size, scales):
    st = M.ms_ssim_settings((size,) * 3)
    assert st.num_scales == scales
    assert sum(st.weights) == pytest.approx(1.0)
    if size >= 16:
        assert st.kernel_size == 7
    div = max(1, st.num_scales - 1) ** 2
    assert size // div > st.kernel_size - 1


def test_ms_ssim_settings_too_small():
    assert M.ms_ssim_settings((5, 5, 5)).kernel_size == 5
    with pytest.raises(ValueError):
        M.ms_ssim_settings((2, 8, 8))


@pytest.mark.parametrize("size", [32, 64])
def test_ms_ssim_identical_is_one_and_noise_lowers_it(size):
    x = blob_volumes(2, size, seed=4)
    np.testing.assert_allclose(M.ms_ssim3d(x, x), 1.0, atol=1e-5)
    a = M.ms_ssim3d(x, noisy(x, 0.05))
    b = M.ms_ssim3d(x, noisy(x, 0.2))
    assert np.all(a < 1) and np.all(b < a)


@pytest.mark.slow
def test_ms_ssim_128():
    x = blob_volumes(2, 128, seed=5)
    np.testing.assert_allclose(M.ms_ssim3d(x, x), 1.0, atol=1e-5)
    r = M.pairwise_ms_ssim(x, num_pairs=10, seed=0)
    assert r["num_pairs"] == 1 and r["settings"]["num_scales"] == 5 and 0 < r["mean"] < 1


def test_pairwise_ms_ssim():
    x = blob_volumes(6, 32, seed=6)
    r = M.pairwise_ms_ssim(x, num_pairs=8, seed=0)
    assert r["num_pairs"] == 8 and 0 < r["mean"] < 1 and r["std"] > 0
    assert r["settings"]["num_scales"] == 3 and r["settings"]["kernel_size"] == 7
    assert M.pairwise_ms_ssim(x, num_pairs=8, seed=0) == r  # reproducible
    copies = np.repeat(x[:1], 4, axis=0)
    rc = M.pairwise_ms_ssim(copies, num_pairs=100, seed=0)
    assert rc["num_pairs"] == 6  # all C(4, 2) distinct pairs
    assert rc["mean"] == pytest.approx(1.0, abs=1e-5)


def test_random_distinct_pairs():
    from verydeepvae.metrics.diversity import random_distinct_pairs

    p = random_distinct_pairs(50, 300, seed=1)
    assert p.shape == (300, 2)
    assert np.all(p[:, 0] < p[:, 1]) and p.max() < 50
    assert len({tuple(r) for r in p}) == 300
    assert len(random_distinct_pairs(5, 100, seed=1)) == 10
