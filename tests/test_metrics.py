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


# ---------------------------------------------------------------- features


def test_random_conv_features_deterministic_and_rng_independent():
    x = blob_volumes(3, 32, seed=7)
    state = torch.get_rng_state()
    f1 = M.RandomConvFeatures(seed=0)(x)
    assert torch.equal(state, torch.get_rng_state())  # building/using it leaves the global RNG alone
    torch.manual_seed(1234)
    torch.rand(100)
    f2 = M.RandomConvFeatures(seed=0)(torch.from_numpy(x))
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(f1, M.extract_features(x, "random_cnn"))
    assert f1.shape == (3, M.RandomConvFeatures().dim) and np.all(np.isfinite(f1))
    assert np.mean(f1.std(axis=0) > 1e-6) > 0.9  # features vary between volumes
    assert not np.allclose(f1, M.RandomConvFeatures(seed=1)(x))
    # per-volume: the same volume gives the same features whatever its batch companions are
    np.testing.assert_allclose(M.RandomConvFeatures(seed=0)(x[1]), f1[1:2], rtol=1e-5, atol=1e-6)


def test_random_conv_features_sizes():
    ext = M.RandomConvFeatures()
    rng = np.random.default_rng(0)
    for shape in [(16, 16, 16), (20, 24, 28), (96, 96, 96)]:
        assert ext(rng.random(shape)).shape == (1, ext.dim)
    with pytest.raises(ValueError):
        ext(rng.random((8, 8, 8)))


def test_intensity_features():
    x = blob_volumes(4, 32, seed=8)
    f = M.intensity_features(x)
    assert f.shape == (4, len(M.intensity_feature_names()))
    np.testing.assert_array_equal(f, M.extract_features(x, "intensity"))
    names = M.intensity_feature_names()
    hist = f[:, [i for i, n in enumerate(names) if n.startswith("hist_")]]
    np.testing.assert_allclose(hist.sum(axis=1), 1.0)
    assert np.all(M.intensity_features(np.zeros((16, 16, 16))) == 0)
    with pytest.raises(ValueError):
        M.extract_features(x, "inception")


# ---------------------------------------------------------------- distances


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # MONAI's reference calls sqrtm(disp=...)
def test_frechet_matches_classical_estimate():
    from monai.metrics import FIDMetric

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((400, 8)), rng.standard_normal((400, 8)) * 1.2 + 0.3
    ref = FIDMetric()(torch.from_numpy(a), torch.from_numpy(b)).item()
    assert M.frechet_distance(a, b, shrinkage=None) == pytest.approx(ref, rel=1e-6)
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # N < F: still finite and zero for identical sets
    small = rng.standard_normal((5, 50))
    assert M.frechet_distance(small, small) == pytest.approx(0.0, abs=1e-8)
    assert np.isfinite(M.frechet_distance(small, rng.standard_normal((6, 50))))


def test_ledoit_wolf_matches_sklearn():
    sk = pytest.importorskip("sklearn.covariance")
    x = np.random.default_rng(1).standard_normal((12, 30))
    cov, shrink = M.ledoit_wolf_covariance(x)
    cov_ref, shrink_ref = sk.ledoit_wolf(x)
    np.testing.assert_allclose(cov, cov_ref, atol=1e-10)
    assert shrink == pytest.approx(shrink_ref)


def test_mmd_basic():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((60, 5))
    assert abs(M.mmd(a, a)) < 0.05
    same = M.mmd(a, rng.standard_normal((60, 5)))
    shifted = M.mmd(a, rng.standard_normal((60, 5)) + 1.0)
    assert shifted > 0.1 > abs(same)
    for kernel in ("polynomial", "linear"):
        assert M.mmd(a, rng.standard_normal((60, 5)) + 1.0, kernel=kernel) > abs(M.mmd(a, a, kernel=kernel))
    with pytest.raises(ValueError):
        M.mmd(a, a, kernel="laplace")


@pytest.mark.parametrize("kind,kwargs", [("random_cnn", {"input_size": 32}), ("intensity", {})])
def test_distances_on_volume_features(kind, kwargs):
    real = M.extract_features(blob_volumes(24, 32, seed=10), kind, **kwargs)
    other = M.extract_features(blob_volumes(12, 32, seed=11, shift=0.1), kind, **kwargs)
    z_real, z_other = M.standardize_features(real, real), M.standardize_features(other, real)
    assert M.frechet_distance(z_real, z_real) == pytest.approx(0.0, abs=1e-8)
    assert abs(M.mmd(z_real, z_real)) < 0.1
    for fn in (M.frechet_distance, M.mmd):
        base = M.real_vs_real_baseline(z_real, fn, seed=0, repeats=3)
        assert fn(z_real[:12], z_other) > base
    assert M.real_vs_real_baseline(z_real, M.mmd, seed=3) == M.real_vs_real_baseline(z_real, M.mmd, seed=3)


def test_matched_baseline_is_the_real_vs_real_baseline_and_its_spread_brackets_the_split_ratios():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((40, 5))
    same = rng.standard_normal((30, 5))
    out = M.matched_to_baseline(same, real, M.frechet_distance, seed=2, repeats=20)
    assert out["real_vs_real"] == M.real_vs_real_baseline(real, M.frechet_distance, seed=2, repeats=20)
    low, high = out["ratio_spread"]
    assert 0 < low < high  # twenty different splits do not all read the same
    far = M.matched_to_baseline(same + 3.0, real, M.frechet_distance, seed=2, repeats=20)
    assert far["ratio_spread"][0] > high  # a shifted population is further than the spread of the same one
    assert "ratio_spread" not in M.matched_to_baseline(same, real, M.frechet_distance, seed=2, repeats=1)


def test_a_fixed_set_size_reads_the_small_set_ratio_with_less_noise_from_more_volumes():
    rng = np.random.default_rng(5)
    population = rng.standard_normal((6400, 6))
    shifted = rng.standard_normal((6400, 6)) + 0.5

    def ratios(num, set_size):  # many independent real and sample draws of one shifted model
        return [M.matched_to_baseline(shifted[i * num:(i + 1) * num], population[i * num:(i + 1) * num],
                                      M.frechet_distance, seed=i, repeats=50, set_size=set_size)["ratio_to_baseline"]
                for i in range(6400 // num)]

    small, large = ratios(40, None), ratios(160, 20)
    assert M.matched_to_baseline(shifted[:160], population[:160], M.frechet_distance, 0, 3, 20)["set_size"] == 20
    assert np.mean(large) == pytest.approx(np.mean(small), rel=0.15)  # the same quantity (sets of 20)...
    assert np.std(large) < 0.75 * np.std(small)  # ...read more steadily (0.45-0.6 over generator seeds)
    with pytest.raises(ValueError, match="set size must be 2 to 20"):
        M.matched_to_baseline(shifted[:40], population[:40], M.frechet_distance, 0, 3, 21)


# ---------------------------------------------------------------- memorisation


def test_memorisation_flags_copies():
    train = blob_volumes(12, 32, seed=20)
    heldout = blob_volumes(8, 32, seed=21)
    copies = noisy(train[[0, 3, 5, 7, 9, 11]], 0.002, seed=1)
    novel = blob_volumes(6, 32, seed=22)
    d_h, _ = M.nearest_neighbour_distances(heldout, train)
    d_c, idx = M.nearest_neighbour_distances(copies, train, batch_size=4)
    d_n, _ = M.nearest_neighbour_distances(novel, train)
    np.testing.assert_array_equal(idx, [0, 3, 5, 7, 9, 11])
    copied = M.memorisation_summary(d_c, d_h)
    fresh = M.memorisation_summary(d_n, d_h)
    assert copied["fraction_below_p5"] == 1.0 and copied["median_ratio"] < 0.2
    assert copied["mannwhitney_p"] < 0.01
    assert fresh["fraction_below_p5"] <= 0.5 and fresh["median_ratio"] > 0.5


def test_nearest_neighbour_batching_and_self_exclusion():
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(3)
    q, r = rng.standard_normal((7, 10)), rng.standard_normal((11, 10))
    full = cdist(q, r)
    for bs in (1, 3, 64):
        d, i = M.nearest_neighbour_distances(q, r, batch_size=bs)
        np.testing.assert_allclose(d, full.min(axis=1), rtol=1e-5)
        np.testing.assert_array_equal(i, full.argmin(axis=1))
    d, i = M.nearest_neighbour_distances(r, r, batch_size=4, exclude_self=True)
    self_d = cdist(r, r) + np.diag(np.full(len(r), np.inf))
    np.testing.assert_allclose(d, self_d.min(axis=1), rtol=1e-5)
    assert np.all(i != np.arange(len(r)))


# ---------------------------------------------------------------- likelihood helpers


def test_active_units():
    rng = np.random.default_rng(4)
    layer0 = np.concatenate([rng.standard_normal((50, 2)), 0.01 * rng.standard_normal((50, 3))], axis=1)
    layer1 = torch.from_numpy(rng.standard_normal((50, 2, 2, 2, 2)))
    r = M.active_units([layer0, layer1], threshold=0.01, names=["top", "8^3"])
    assert [p["active"] for p in r["per_layer"]] == [2, 16]
    assert [p["units"] for p in r["per_layer"]] == [5, 16]
    assert r["total_active"] == 18 and r["total_units"] == 21 and r["per_layer"][0]["name"] == "top"
    with pytest.raises(ValueError):
        M.active_units([layer0, layer0[:10]])


# ---------------------------------------------------------------- tissue volumes


def shell_phantom(size, r_csf, r_wm, r_brain, lesions, seed, noise=0.02, blur=0.6):
    """Nested spheres: CSF core < WM < GM < a 2-voxel outer CSF layer, plus bright lesion balls.

    Returns the blurred, noisy, skull-stripped volume and the label map (1 CSF, 2 GM, 3 WM, 4 lesion).
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    g = np.arange(size) - size / 2 + 0.5
    zz, yy, xx = np.meshgrid(g, g, g, indexing="ij")
    r = np.sqrt(zz**2 + yy**2 + xx**2)
    lab = np.zeros((size,) * 3, dtype=int)
    lab[r < r_brain] = 1
    lab[r < r_brain - 2], lab[r < r_wm], lab[r < r_csf] = 2, 3, 1
    for c, rad in lesions:
        lab[np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < rad] = 4
    v = np.array([0.0, 0.15, 0.55, 0.42, 0.9])[lab]
    v = gaussian_filter(v, blur) + noise * rng.standard_normal(v.shape)
    v = np.where(r < r_brain, np.clip(v, 0.06, 1), 0.0)  # skull-stripped: background exactly 0
    return v, lab


def test_tissue_volumes_recover_known_volumes():
    vox_ml = 0.008  # 2 mm isotropic
    for i, (r_csf, r_wm, lesions) in enumerate([(6, 16, []), (9, 19, [((0, 10, 0), 3.5), ((4, -12, 3), 2.5)])]):
        v, lab = shell_phantom(64, r_csf, r_wm, 28, lesions, seed=i)
        est = M.tissue_volumes(v, vox_ml)
        for k, cls in [("csf_ml", 1), ("gm_ml", 2), ("wm_ml", 3)]:
            true = np.sum(lab == cls) * vox_ml
            assert est[k] == pytest.approx(true, rel=0.1), k  # measured errors are 1-8 %
        true_les = np.sum(lab == 4) * vox_ml
        assert est["lesion_ml"] == pytest.approx(true_les, rel=0.35, abs=0.05)
        assert est["brain_ml"] == pytest.approx(np.sum(lab > 0) * vox_ml, rel=0.02)


def _phantom_tissue_correlations(resolution: int, n: int) -> dict[str, float]:
    """Pearson r between estimated tissue volumes and the phantom's recorded partial-volume sums."""
    from verydeepvae.data import phantom
    ml = phantom.voxel_size_mm(resolution) ** 3 / 1000.0
    est, true = [], []
    for seed in range(n):
        vol, factors = phantom.generate_volume(seed, resolution)[:2]
        est.append(M.tissue_volumes(vol, ml))
        true.append(factors)
    out = {}
    for cls in ("csf", "gm", "wm", "lesion"):
        a = np.array([e[f"{cls}_ml"] for e in est])
        b = np.array([t[f"{cls}_volume_ml"] for t in true])
        out[cls] = float(np.corrcoef(a, b)[0, 1])
    assert np.allclose([e["brain_ml"] for e in est], [t["brain_volume_ml"] for t in true], rtol=0.02)
    return out


def test_tissue_volumes_track_phantom_factors_32():
    r = _phantom_tissue_correlations(32, 12)  # measured: csf 0.92, gm 0.97, wm 0.88
    assert r["csf"] > 0.7 and r["gm"] > 0.7 and r["wm"] > 0.6, r


@pytest.mark.slow
def test_tissue_volumes_track_phantom_factors_64():
    r = _phantom_tissue_correlations(64, 12)  # measured: csf 0.96, gm 0.96, wm 0.88, lesion 0.97
    assert r["csf"] > 0.8 and r["gm"] > 0.8 and r["wm"] > 0.6 and r["lesion"] > 0.7, r


def test_tissue_table_and_wasserstein():
    vols = np.stack([shell_phantom(32, 3 + i % 3, 9, 14, [], seed=i)[0] for i in range(6)])
    table = M.tissue_volume_table(vols, 0.001)
    assert set(table) == {"csf_ml", "gm_ml", "wm_ml", "lesion_ml", "brain_ml"}
    assert table["csf_ml"].shape == (6,) and np.all(np.diff(table["csf_ml"][:3]) > 0)
    w0 = M.wasserstein_by_feature(table, table)
    assert all(v == 0 for v in w0.values())
    shifted = {k: v + 1.5 for k, v in table.items()}
    w = M.wasserstein_by_feature(shifted, table)
    assert all(v == pytest.approx(1.5) for v in w.values())
    with pytest.raises(ValueError):
        M.wasserstein_by_feature({"a": [1.0]}, {"b": [1.0]})
