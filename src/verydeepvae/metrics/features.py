"""Feature extractors that need no downloaded weights, for distribution distances and memorisation.

Two extractors, both deterministic and offline:

* ``"random_cnn"`` (:class:`RandomConvFeatures`): a small 3D CNN whose weights are drawn once from
  a fixed seed with its own ``torch.Generator`` and never trained. Randomly initialised networks
  give usable embeddings for comparing distributions (Naeem et al. 2020 used random features for
  precision/recall/density/coverage); they respond to texture, edges and intensity layout at
  several scales. The figures are *not* comparable with any pretrained-network metric from the
  literature; report them as e.g. "Fréchet distance on random-3D-CNN features".
* ``"intensity"`` (:func:`intensity_features`): interpretable statistics of the foreground
  intensity distribution (moments, percentiles, histogram) plus a coarse downsampled volume that
  captures gross shape and layout.

Features of different kinds or scales should be standardised with the *real* set's statistics
(:func:`standardize_features`) before distances that are not scale-invariant (MMD, nearest
neighbours), so that no single feature dominates.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from ._arrays import ArrayLike, as_volume_batch

FEATURE_KINDS = ("random_cnn", "intensity")


class RandomConvFeatures:
    """A fixed, randomly initialised 3D CNN used as a feature extractor (no training, no download).

    Architecture: the input volume is resized to ``input_size``^3 (area averaging when shrinking,
    which avoids aliasing; trilinear when enlarging; non-cubic volumes are stretched to a cube),
    shifted to zero-centred intensities (x - 0.5), then passed through ``len(channels)`` stages of
    3x3x3 convolution (padding 1) -> GELU -> 2x average pooling. After every stage's GELU the
    per-channel spatial mean and standard deviation are pooled, so features cover several scales:
    with the defaults (64^3 input, channels 16/32/64) the output has 2 * (16 + 32 + 64) = 224
    dimensions. Weights are He-normal (std sqrt(2 / fan_in)), biases N(0, 0.1^2), drawn from a
    private ``torch.Generator`` seeded with ``seed``: the extractor is identical across calls,
    processes and global ``torch.manual_seed`` settings, and building it does not consume the
    global RNG. Inputs must be at least 16 voxels per side (smaller volumes carry too little
    structure to upsample meaningfully). ``device`` only changes where the convolutions run
    (about 0.1 s per volume on one CPU core-pair at 64^3); results on other devices match to
    float32 rounding, not bit for bit.
    """

    def __init__(
        self,
        seed: int = 0,
        input_size: int = 64,
        channels: tuple[int, ...] = (16, 32, 64),
        device: str | torch.device = "cpu",
    ):
        if input_size < 2 ** len(channels):
            raise ValueError(f"input_size {input_size} too small for {len(channels)} pooling stages")
        self.seed = int(seed)
        self.input_size = int(input_size)
        self.channels = tuple(int(c) for c in channels)
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(self.seed)  # weights are always drawn on the CPU
        self.weights: list[torch.Tensor] = []
        self.biases: list[torch.Tensor] = []
        cin = 1
        for cout in self.channels:
            fan_in = cin * 27
            w = torch.randn(cout, cin, 3, 3, 3, generator=g, dtype=torch.float32) * (2.0 / fan_in) ** 0.5
            b = torch.randn(cout, generator=g, dtype=torch.float32) * 0.1
            self.weights.append(w.to(self.device))
            self.biases.append(b.to(self.device))
            cin = cout

    @property
    def dim(self) -> int:
        """Number of output features (2 x total channels)."""
        return 2 * sum(self.channels)

    def describe(self) -> dict:
        """A JSON-ready description for the report."""
        return {
            "kind": "random_cnn",
            "seed": self.seed,
            "input_size": self.input_size,
            "channels": list(self.channels),
            "dim": self.dim,
            "note": "fixed random-init 3D CNN (conv3-GELU-avgpool stages, mean+std pooling); no pretrained weights",
        }

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        size = (self.input_size,) * 3
        if tuple(x.shape[2:]) == size:
            return x
        if all(s >= self.input_size for s in x.shape[2:]):
            return F.interpolate(x, size=size, mode="area")
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)

    @torch.no_grad()
    def __call__(self, volumes: ArrayLike, batch_size: int = 8) -> np.ndarray:
        """Features of ``volumes`` ((N, D, H, W) or (D, H, W), intensities in [0, 1]) as (N, dim) float64."""
        vb, _ = as_volume_batch(volumes, "volumes", dtype=np.float32)
        if min(vb.shape[1:]) < 16:
            raise ValueError(f"RandomConvFeatures needs volumes of at least 16^3, got {tuple(vb.shape[1:])}")
        out = []
        for s in range(0, len(vb), max(1, batch_size)):
            x = torch.from_numpy(np.ascontiguousarray(vb[s : s + batch_size]))[:, None].to(self.device)
            x = self._resize(x) - 0.5
            feats = []
            for w, b in zip(self.weights, self.biases):
                x = F.gelu(F.conv3d(x, w, b, padding=1))
                flat = x.flatten(2)
                feats += [flat.mean(dim=2), flat.std(dim=2, unbiased=False)]
                x = F.avg_pool3d(x, 2)
            out.append(torch.cat(feats, dim=1).double().cpu().numpy())
        return np.concatenate(out, axis=0)


PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)


def intensity_feature_names(bins: int = 16, coarse_size: int = 4) -> list[str]:
    """Names of the columns returned by :func:`intensity_features` with the same arguments."""
    names = ["foreground_fraction", "mean", "std", "skewness", "kurtosis"]
    names += [f"p{p}" for p in PERCENTILES]
    names += [f"hist_{i}" for i in range(bins)]
    names += [f"coarse_{i}" for i in range(coarse_size**3)]
    return names


def intensity_features(
    volumes: ArrayLike, foreground_threshold: float = 0.05, bins: int = 16, coarse_size: int = 4
) -> np.ndarray:
    """Hand-crafted intensity statistics per volume, shape (N, F) float64.

    Columns (see :func:`intensity_feature_names`): fraction of voxels above
    ``foreground_threshold`` (brain size); mean, std, skewness and excess kurtosis of foreground
    intensities; their 1/5/10/25/50/75/90/95/99th percentiles; a ``bins``-bin histogram of
    foreground intensities over [0, 1] as fractions; and the whole volume area-averaged to
    ``coarse_size``^3 (gross shape and layout). Intensity-valued columns are in [0, 1] units;
    a volume without foreground gets zeros for the foreground statistics.
    """
    vb, _ = as_volume_batch(volumes, "volumes", dtype=np.float32)
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    for v in vb:
        fg = v[v > foreground_threshold].astype(np.float64)
        if fg.size >= 2:
            sd = fg.std()
            mom = [fg.mean(), sd]
            mom += [float(stats.skew(fg)), float(stats.kurtosis(fg))] if sd > 0 else [0.0, 0.0]
            pct = np.percentile(fg, PERCENTILES)
            hist = np.histogram(np.clip(fg, 0, 1), bins=edges)[0] / fg.size
        else:
            mom, pct, hist = [0.0] * 4, np.zeros(len(PERCENTILES)), np.zeros(bins)
        rows.append(np.concatenate([[fg.size / v.size], mom, pct, hist]))
    coarse = F.interpolate(torch.from_numpy(vb)[:, None], size=(coarse_size,) * 3, mode="area")
    return np.concatenate([np.array(rows), coarse.flatten(1).double().numpy()], axis=1)


def extract_features(volumes: ArrayLike, kind: str = "random_cnn", **kwargs) -> np.ndarray:
    """Features of ``volumes`` with extractor ``kind`` ("random_cnn" or "intensity"), shape (N, F).

    ``kwargs`` go to :class:`RandomConvFeatures` (``seed``, ``input_size``, ``channels``, ``device``) or to
    :func:`intensity_features`.
    """
    if kind == "random_cnn":
        return RandomConvFeatures(**kwargs)(volumes)
    if kind == "intensity":
        return intensity_features(volumes, **kwargs)
    raise ValueError(f"unknown feature kind {kind!r}; expected one of {FEATURE_KINDS}")


def standardize_features(feats: ArrayLike, reference: ArrayLike, eps: float = 1e-8) -> np.ndarray:
    """Z-score ``feats`` with the per-column mean and std of ``reference`` (e.g. the real set).

    Apply the *same* transform to every set being compared (real, samples, baselines) so that
    distances are in units of real-data standard deviations and no feature dominates by scale.
    Constant reference columns are only centred.
    """
    f = np.asarray(feats, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if f.ndim != 2 or r.ndim != 2 or f.shape[1] != r.shape[1]:
        raise ValueError(f"expected (N, F) and (M, F) matrices, got {f.shape} and {r.shape}")
    sd = r.std(axis=0)
    return (f - r.mean(axis=0)) / np.where(sd > eps, sd, 1.0)


def pooled_standardiser(real_feats: ArrayLike, sample_feats: ArrayLike):
    """Z-scoring with the mean and std of the pooled real + sample features, applied alike to every set
    (a function (N, F) -> (N, F)).

    Pooled rather than real-only statistics: a feature that is (nearly) constant over the real volumes
    but not over the samples (e.g. a background corner) would otherwise be divided by ~0 and swamp
    every distance."""
    pooled = np.concatenate([np.asarray(real_feats, np.float64), np.asarray(sample_feats, np.float64)])
    return lambda feats: standardize_features(feats, pooled)
