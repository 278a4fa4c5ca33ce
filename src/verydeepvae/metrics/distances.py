"""Distances between two sets of feature vectors (N, F) and (M, F), plus a real-vs-real baseline.

* :func:`frechet_distance`: squared Fréchet (2-Wasserstein) distance between Gaussians fitted to the
  two sets. On random-3D-CNN features call it "Fréchet distance on random-3D-CNN features"; it is
  not comparable with published pretrained-network figures.
* :func:`mmd`: unbiased estimate of the squared maximum mean discrepancy.
* :func:`real_vs_real_baseline`: the same distance between two random halves of the real set,
  i.e. the value expected from sampling noise alone. Report every figure beside it.

Both distances depend on the number of samples (the Fréchet distance is biased upwards at small N,
the MMD estimate is noisy), so only compare figures computed with similar set sizes. The baseline
uses N/2 real vectors per half (or a chosen set size, :func:`matched_to_baseline`); for a
like-for-like comparison, also compute the sample distance with as many samples against as many
held-out real vectors.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy.linalg import eigh
from scipy.spatial.distance import cdist, pdist

from ._arrays import ArrayLike, as_feature_matrix


def _two_sets(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    fa = as_feature_matrix(a, "feats_a")
    fb = as_feature_matrix(b, "feats_b")
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feature dimensions differ: {fa.shape[1]} vs {fb.shape[1]}")
    return fa, fb


def ledoit_wolf_covariance(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf (2004) shrunk covariance of rows of ``x`` and the shrinkage used, in [0, 1].

    Shrinks the sample covariance S (1/N normalisation) towards mu * I, mu = trace(S)/F, with the
    weight that minimises the expected Frobenius error; well conditioned even when N <= F.
    (Same estimator as ``sklearn.covariance.ledoit_wolf``, written out to avoid the dependency.)
    """
    n, f = x.shape
    xc = x - x.mean(axis=0)
    s = xc.T @ xc / n
    mu = np.trace(s) / f
    delta = np.sum((s - mu * np.eye(f)) ** 2)
    x2 = xc**2
    beta_ = np.sum(x2.T @ x2) / n - np.sum(s**2)
    beta = min(beta_ / n, delta) if delta > 0 else 0.0
    shrink = 0.0 if delta == 0 else beta / delta
    return shrink * mu * np.eye(f) + (1 - shrink) * s, float(shrink)


def _gaussian_fit(x: np.ndarray, shrinkage: str | float | None) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    if len(x) < 2:
        raise ValueError("need at least 2 feature vectors per set to estimate a covariance")
    if shrinkage == "ledoit-wolf":
        cov, _ = ledoit_wolf_covariance(x)
    elif shrinkage is None:
        cov = np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])
    else:
        lam = float(shrinkage)
        if not 0 <= lam <= 1:
            raise ValueError(f"shrinkage must be 'ledoit-wolf', None or a number in [0, 1], got {shrinkage}")
        s = np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])
        cov = (1 - lam) * s + lam * np.trace(s) / x.shape[1] * np.eye(x.shape[1])
    return mean, cov


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    w, v = eigh(c)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(
    feats_a: ArrayLike, feats_b: ArrayLike, shrinkage: str | float | None = "ledoit-wolf"
) -> float:
    """Squared Fréchet distance between Gaussians fitted to two feature sets (units: feature units^2).

    ``d^2 = |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2)``. 0 for
    identical sets; larger = more different first and second moments.

    Covariances: with N <= F (few volumes, many features) the sample covariance is singular and
    the usual estimate is dominated by noise, so by default both covariances are Ledoit-Wolf
    shrunk (``shrinkage="ledoit-wolf"``), which is well conditioned at any N and tends to the
    sample covariance as N grows. ``shrinkage=None`` gives the classical estimate (unbiased sample
    covariance; meaningful only when N is well above F); a number in [0, 1] uses that fixed
    shrinkage towards a scaled identity. The matrix square root is taken through symmetric
    eigendecompositions (scipy.linalg.eigh), which is exact for PSD matrices and, unlike
    ``scipy.linalg.sqrtm`` of the non-symmetric product C_a C_b, never yields complex values.
    """
    fa, fb = _two_sets(feats_a, feats_b)
    mu_a, ca = _gaussian_fit(fa, shrinkage)
    mu_b, cb = _gaussian_fit(fb, shrinkage)
    sa = _psd_sqrt(ca)
    m = sa @ cb @ sa
    tr_sqrt = np.sum(np.sqrt(np.clip(eigh(0.5 * (m + m.T), eigvals_only=True), 0, None)))
    d = float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca) + np.trace(cb) - 2 * tr_sqrt)
    return max(d, 0.0)


def _median_bandwidth(x: np.ndarray, max_points: int = 2000) -> float:
    if len(x) > max_points:  # the median is stable; bound the O(N^2) cost deterministically
        x = x[np.linspace(0, len(x) - 1, max_points).astype(int)]
    d = pdist(x)
    d = d[d > 0]
    return float(np.median(d)) if d.size else 1.0


def mmd(
    feats_a: ArrayLike,
    feats_b: ArrayLike,
    kernel: str = "rbf",
    bandwidth: str | float = "median",
) -> float:
    """Unbiased estimate of the squared maximum mean discrepancy (MMD^2) between two feature sets.

    ``MMD^2 = E k(a, a') + E k(b, b') - 2 E k(a, b)``, with the within-set expectations taken over
    distinct pairs only (Gretton et al. 2012, eq. 3), so the estimate is unbiased and can be
    slightly *negative* when the sets come from the same distribution; identical sets of N
    vectors give about ``-2 (1 - mean off-diagonal k) / N``, i.e. ~0. Dimensionless for the RBF
    kernel (values in about [-2/N, 2]).

    Kernels: ``"rbf"`` k = exp(-|a - b|^2 / (2 sigma^2)) with ``bandwidth`` sigma, by default the
    median pairwise distance of the pooled sets (median heuristic); ``"polynomial"``
    k = (a.b / F + 1)^3 (the cubic kernel of Bińkowski et al. 2018); ``"linear"`` k = a.b (equal to the squared distance of
    the means up to the unbiased correction; MONAI's ``MMDMetric`` default). Standardise features
    first (:func:`~verydeepvae.metrics.features.standardize_features`) so the scale is meaningful.
    """
    fa, fb = _two_sets(feats_a, feats_b)
    n, m = len(fa), len(fb)
    if n < 2 or m < 2:
        raise ValueError("mmd needs at least 2 vectors per set")
    if kernel == "rbf":
        if bandwidth == "median":
            sigma = _median_bandwidth(np.concatenate([fa, fb]))
        else:
            sigma = float(bandwidth)
            if sigma <= 0:
                raise ValueError(f"bandwidth must be positive, got {bandwidth}")

        def k(x, y):
            return np.exp(-cdist(x, y, "sqeuclidean") / (2 * sigma**2))

    elif kernel == "polynomial":
        dim = fa.shape[1]

        def k(x, y):
            return (x @ y.T / dim + 1.0) ** 3

    elif kernel == "linear":

        def k(x, y):
            return x @ y.T

    else:
        raise ValueError(f"unknown kernel {kernel!r}; expected 'rbf', 'polynomial' or 'linear'")
    kaa, kbb, kab = k(fa, fa), k(fb, fb), k(fa, fb)
    term_a = (kaa.sum() - np.trace(kaa)) / (n * (n - 1))
    term_b = (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
    return float(term_a + term_b - 2 * kab.mean())


def real_vs_real_baseline(
    real_feats: ArrayLike,
    fn: Callable[[np.ndarray, np.ndarray], float],
    seed: int = 0,
    repeats: int = 5,
) -> float:
    """The distance ``fn`` between two random disjoint halves of the real feature set.

    This is the value sampling noise alone produces at N/2 vectors per set, so a generated-vs-real
    figure is only meaningful next to it. The mean over ``repeats`` independent random splits is
    returned: a single split is noisy (on 80 phantom volumes the Fréchet baseline on random-CNN
    features varied by +-20 % between splits, because one unusual volume lands in one half). ``fn`` is any of the distances here, e.g.
    ``real_vs_real_baseline(real, frechet_distance)`` or ``lambda a, b: mmd(a, b, kernel="rbf")``.
    Reproducible from ``seed``.
    """
    r = as_feature_matrix(real_feats, "real_feats")
    return float(np.mean([fn(r[a], r[b]) for a, b in _real_halves(len(r), seed, repeats)]))


def _real_halves(num_real: int, seed: int, repeats: int, set_size: int | None = None
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Indices of ``repeats`` random pairs of disjoint sets of ``set_size`` (default and at most
    ``num_real // 2``, at least 2) out of ``num_real`` (>= 4) vectors, reproducible from ``seed``: the
    baseline and the matched sample distances use the same splits."""
    if num_real < 4:
        raise ValueError(f"need at least 4 real feature vectors to split in two halves, got {num_real}")
    half = num_real // 2 if set_size is None else int(set_size)
    if not 2 <= half <= num_real // 2:
        raise ValueError(f"set size must be 2 to {num_real // 2} (half of {num_real} real vectors), got {half}")
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(num_real) for _ in range(max(1, int(repeats)))]
    return [(perm[:half], perm[half : 2 * half]) for perm in perms]


def matched_to_baseline(samples: np.ndarray, real: np.ndarray, fn: Callable[[np.ndarray, np.ndarray], float],
                        seed: int, repeats: int, set_size: int | None = None) -> dict:
    """``fn(real half A, real half B)`` (:func:`real_vs_real_baseline`) beside ``fn(samples subset
    of the same size, real half A)``, both averaged over ``repeats`` random splits, so the two
    figures suffer the same set-size bias; their ratio is the report's headline (1 = as close as
    real data is to itself).  ``samples`` (S, F), ``real`` (N >= 4, F) feature matrices.

    ``ratio_spread`` is the 10th and 90th percentile of the ratio split by split (when every
    split's baseline is positive): how far one split's reading strays, so that two models are not
    ranked on a difference the splits alone produce (on 48 held-out phantoms the random-CNN Fréchet
    ratio of one model moved by a factor of 2-3 between sample streams).

    ``set_size`` (default: half the real vectors) decouples the sets' size from the number of real
    vectors: the ratio's scale depends on the set size (both distances carry a bias of about 1/size),
    its noise on how many real and sampled vectors the repeats draw from, so more held-out volumes
    and more samples read the same quantity as 48 held-out volumes do, with less noise."""
    splits = _real_halves(len(real), seed, repeats, set_size)
    half = len(splits[0][0])
    pick_rng = np.random.default_rng(seed + 1)
    baselines, values, ratios = [], [], []
    for a, b in splits:
        pick = pick_rng.permutation(len(samples))[:half]
        baselines.append(float(fn(real[a], real[b])))
        if len(pick) >= 2:
            values.append(float(fn(samples[pick], real[a])))
            ratios.append(values[-1] / baselines[-1] if baselines[-1] > 0 else math.nan)
    baseline = float(np.mean(baselines))
    out = {"real_vs_real": baseline, "set_size": half, "repeats": repeats}
    if values:
        out["samples_vs_real_half"] = float(np.mean(values))
        out["ratio_to_baseline"] = out["samples_vs_real_half"] / baseline if baseline > 0 else None
        if len(ratios) >= 2 and all(math.isfinite(r) for r in ratios):
            out["ratio_spread"] = [float(v) for v in np.percentile(ratios, [10, 90])]
    return out
