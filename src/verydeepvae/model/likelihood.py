"""Output distributions p(x | z) over intensities mapped to [-1, 1].

``DiscretisedLogistic`` (default) puts a logistic density on each voxel and integrates it over
the voxel's quantisation bin (256 levels by default, PixelCNN++ / VDVAE style), so its negative
log-likelihood is a true code length: bits/voxel >= 0 and comparable with published VDVAE figures.
With ``num_mixtures`` > 1 it is VDVAE's mixture of such logistics: a voxel the decoder is unsure
about ("sulcal CSF or grey matter?") gets two narrow modes instead of one wide logistic.
``Gaussian`` is the original project's continuous density with a learned per-voxel scale; its
"bits/voxel" is a differential entropy, can be negative, and is not comparable with discrete ones.
Both are evaluated in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import gaussian

LOG_SCALE_MIN = -7.0


class DiscretisedLogistic(nn.Module):
    """Parameter maps (B, num_params, R, R, R): with one component [mean, log-scale] (as in every
    checkpoint written before mixtures existed); with K > 1 [K weight logits, K means, K log-scales]."""

    is_discrete = True

    def __init__(self, num_bins: int = 256, max_scale: float = 0.0, num_mixtures: int = 1):
        super().__init__()
        self.num_bins = num_bins
        self.num_mixtures = num_mixtures
        self.num_params = 2 if num_mixtures == 1 else 3 * num_mixtures
        # a soft ceiling on the per-voxel scale (0: none): keeps the decoder from calling detail it
        # has not encoded "noise" by widening its scale, which leaves the finest latents unused
        self.log_scale_max = math.log(max_scale) if max_scale > 0 else None

    def quantise(self, x: torch.Tensor) -> torch.Tensor:
        """Bin index of every voxel of x in [-1, 1]."""
        k = self.num_bins - 1
        return torch.round((x.float().clamp(-1.0, 1.0) + 1.0) * (k / 2.0))

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log P(bin of x) per voxel, in nats: (B, 1, R, R, R)."""
        log_weights, mean, log_scale = self._split(params)
        k = self.num_bins - 1
        index = self.quantise(x)
        centre = index * (2.0 / k) - 1.0
        half_bin = 1.0 / k
        inv_scale = torch.exp(-log_scale)
        centred = centre - mean
        upper = inv_scale * (centred + half_bin)
        lower = inv_scale * (centred - half_bin)
        log_cdf_upper = upper - F.softplus(upper)  # log sigmoid(upper): used for the lowest bin
        log_survival_lower = -F.softplus(lower)  # log(1 - sigmoid(lower)): used for the highest bin
        mass = torch.sigmoid(upper) - torch.sigmoid(lower)
        middle = inv_scale * centred
        log_density_mid = middle - log_scale - 2.0 * F.softplus(middle) + math.log(2.0 * half_bin)
        interior = torch.where(mass > 1e-5, torch.log(mass.clamp_min(1e-12)), log_density_mid)
        per_component = torch.where(index <= 0, log_cdf_upper,
                                    torch.where(index >= k, log_survival_lower, interior))
        if log_weights is None:
            return per_component
        return torch.logsumexp(log_weights + per_component, dim=1, keepdim=True)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The expected intensity per voxel, (B, 1, R, R, R) in [-1, 1]."""
        log_weights, mean, _ = self._split(params)
        mean = mean.clamp(-1.0, 1.0)
        if log_weights is None:
            return mean
        return (log_weights.exp() * mean).sum(1, keepdim=True)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None,
               scores: torch.Tensor | None = None) -> torch.Tensor:
        """One draw per voxel (a component by its weight, then its logistic), on the bin centres.
        ``scores`` (B, 1, R, R, R), standard normal: the voxel's cumulative probability is Φ(scores)
        instead of independent per voxel (model/voxel_noise.py); each voxel's distribution is the
        same.  A mixture is then inverted as a whole (by bisection), so that its component, too,
        follows the scores."""
        log_weights, mean, log_scale = self._split(params)
        if scores is not None and log_weights is not None:
            x = self._mixture_quantile(log_weights, mean, log_scale, normal_cdf(scores.float()))
        else:
            if log_weights is not None:
                gumbel = -torch.log(-torch.log(
                    torch.rand(log_weights.shape, device=mean.device, generator=generator).clamp(1e-5, 1 - 1e-5)))
                pick = (log_weights + gumbel).argmax(1, keepdim=True)
                mean, log_scale = mean.gather(1, pick), log_scale.gather(1, pick)
            u = torch.rand(mean.shape, device=mean.device, generator=generator) if scores is None \
                else normal_cdf(scores.float())
            u = u.clamp(1e-5, 1 - 1e-5)
            x = mean + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))
        k = self.num_bins - 1
        return (torch.round((x.clamp(-1, 1) + 1) * k / 2) * 2 / k - 1).clamp(-1, 1)

    @staticmethod
    def _mixture_quantile(log_weights: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                          u: torch.Tensor, iterations: int = 24) -> torch.Tensor:
        """The x in [-1, 1] where the mixture's cumulative probability is u (B, 1, ...), by bisection:
        24 halvings of [-1, 1] leave 1.2e-7, far below a bin (2/255); probability below -1 or above
        1 lands on the end, as a clamped draw would."""
        weights, inv_scale = log_weights.exp(), torch.exp(-log_scale)
        low, high = torch.full_like(u, -1.0), torch.full_like(u, 1.0)
        for _ in range(iterations):
            middle = 0.5 * (low + high)
            below = (weights * torch.sigmoid((middle - mean) * inv_scale)).sum(1, keepdim=True) < u
            low, high = torch.where(below, middle, low), torch.where(below, high, middle)
        return 0.5 * (low + high)

    def normal_scores(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Φ⁻¹ of each voxel's cumulative probability under p(x | z) at x in [-1, 1] (the continuous
        logistic or mixture at the value, not the bin): N(0, 1) per voxel when x is drawn from the
        model; (B, 1, R, R, R) float32."""
        log_weights, mean, log_scale = self._split(params)
        cdf = torch.sigmoid((x.float() - mean) * torch.exp(-log_scale))
        if log_weights is not None:
            cdf = (log_weights.exp() * cdf).sum(1, keepdim=True)
        return normal_quantile(cdf)

    def _split(self, params: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(log weights (B, K, ...) or None for one component, means, log-scales), float32."""
        params = _dense_float(params)
        m = self.num_mixtures
        if m == 1:
            log_weights, mean, log_scale = None, params[:, 0:1], params[:, 1:2]
        else:
            log_weights = F.log_softmax(params[:, :m], dim=1)
            mean, log_scale = params[:, m:2 * m], params[:, 2 * m:]
        if self.log_scale_max is not None:
            log_scale = self.log_scale_max - F.softplus(self.log_scale_max - log_scale)
        return log_weights, mean, log_scale.clamp_min(LOG_SCALE_MIN)


class Gaussian(nn.Module):
    is_discrete = False
    num_params = 2

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._split(params)
        return gaussian.gaussian_log_density(x, mean, std)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return self._split(params)[0].clamp(-1.0, 1.0)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None,
               scores: torch.Tensor | None = None) -> torch.Tensor:
        mean, std = self._split(params)
        if scores is not None:  # model/voxel_noise.py: the same N(0, 1) per voxel, correlated between them
            return (mean + std * scores.float()).clamp(-1.0, 1.0)
        return gaussian.draw(mean, std, 1.0, generator).clamp(-1.0, 1.0)

    def normal_scores(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._split(params)
        return (x.float() - mean) / std

    def _split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = _dense_float(params)
        return params[:, 0:1], gaussian.std_from_raw(params[:, 1:2]) + 1e-3


def normal_cdf(g: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(g * (1.0 / math.sqrt(2.0))))


def normal_quantile(u: torch.Tensor) -> torch.Tensor:
    """Φ⁻¹(u), u clamped to [1e-6, 1 - 1e-6] so that the scores stay finite (|g| <= 4.75)."""
    return math.sqrt(2.0) * torch.erfinv(2.0 * u.clamp(1e-6, 1.0 - 1e-6) - 1.0)


def _dense_float(params: torch.Tensor) -> torch.Tensor:
    """float32 and channels-first, so that each parameter map is a dense tensor (in channels-last
    mode a one-channel slice strides over the other channel and elementwise maths slows down)."""
    return params.float().contiguous()


def build_likelihood(name: str, num_bins: int, max_scale: float = 0.0, num_mixtures: int = 1) -> nn.Module:
    if name == "discretised_logistic":
        return DiscretisedLogistic(num_bins, max_scale, num_mixtures)
    if name == "gaussian":
        return Gaussian()
    raise ValueError(f"unknown likelihood {name!r}")
