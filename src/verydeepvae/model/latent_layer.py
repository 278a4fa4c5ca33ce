"""One stochastic layer of the top-down decoder (VDVAE's DecBlock).

prior p(z | h) and its feature residual from the decoder state h; posterior q(z | x, h) from the
encoder activation at the same resolution and h; z is projected back into h; one residual block
follows.  The prior's output convolution starts at zero, so every prior is N(0, 1) at
initialisation and contributes nothing to h.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import gaussian
from .blocks import Conv3d, ConvStack, ResBlock, maybe_checkpoint


@dataclass
class LatentChoice:
    """How a layer picks z: from the posterior (sample or mean) or from the prior at a temperature."""

    use_posterior: bool = True
    posterior_mean: bool = False
    temperature: float = 1.0
    z: torch.Tensor | None = None  # a given latent (decoding stored codes) overrides all else
    # a given standardised residual: z = prior mean + prior std * noise (counterfactuals keep a
    # scan's noise while the prior moves with the covariates)
    noise: torch.Tensor | None = None
    return_noise: bool = False  # report (z - prior mean) / prior std instead of z


class LatentLayer(nn.Module):
    def __init__(self, width: int, hidden: int, encoder_width: int, z_channels: int,
                 kernel_size: int, residual_scale: float):
        super().__init__()
        self.z_channels = z_channels
        self.width = width
        self.checkpointed = False  # set by VeryDeepVAE from Config.checkpoint_levels
        self.nested = False  # its recomputation checkpointed again, part by part (VeryDeepVAE.set_checkpoint_levels)
        self.prior = ConvStack(width, hidden, 2 * z_channels + width, kernel_size, zero_last=True)
        self.posterior = ConvStack(encoder_width + width, hidden, 2 * z_channels, kernel_size)
        self.z_proj = Conv3d(z_channels, width, 1)
        self.z_proj.scale_weight_(residual_scale)
        self.res = ResBlock(width, hidden, width, kernel_size, residual_scale)

    def prior_params(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p_mean, p_raw, feature = self._prior(F.gelu(h))
        return p_mean, gaussian.std_from_raw(p_raw), feature

    def forward(self, h: torch.Tensor, e_act: torch.Tensor | None, choice: LatentChoice,
                generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Returns (new h, KL per sample summed over this layer's elements or None, z used).

        ``e_act`` is GELU(encoder activation at this level), computed once per level by the
        decoder for all of its layers.  When checkpointed, the whole layer is recomputed in the
        backward pass, and inside that recomputation the prior, posterior and residual networks
        are checkpointed again when ``nested``, so at most one network's activations are held at a
        time.  Not with an explicit ``generator``, whose state checkpointing could not restore.
        """
        on = self.checkpointed and generator is None
        return maybe_checkpoint(on, self._forward, h, e_act, choice, generator)

    def _forward(self, h: torch.Tensor, e_act: torch.Tensor | None, choice: LatentChoice,
                 generator: torch.Generator | None):
        on = self.checkpointed and self.nested and generator is None
        g = F.gelu(h)  # the first activation of both the prior and the posterior network
        p_mean, p_raw, feature = maybe_checkpoint(on, self._prior, g)
        kl = None
        if choice.z is not None:
            z = choice.z.float()
        elif choice.noise is not None:
            z = p_mean.float() + gaussian.std_from_raw(p_raw) * choice.noise.float()
        elif choice.use_posterior:
            if e_act is None:
                raise ValueError("the posterior needs encoder activations")
            q_mean, q_raw = maybe_checkpoint(on, self._posterior, g, e_act)
            if choice.posterior_mean:
                z = q_mean.float()
                kl = gaussian.kl_diagonal_gaussians(q_mean, gaussian.std_from_raw(q_raw), p_mean,
                                                    gaussian.std_from_raw(p_raw)).flatten(1).sum(1)
            else:
                eps = torch.randn(q_mean.shape, device=q_mean.device, dtype=torch.float32, generator=generator)
                z, kl = gaussian.posterior_sample_and_kl(q_mean, q_raw, p_mean, p_raw, eps)
        else:
            z = gaussian.draw(p_mean, gaussian.std_from_raw(p_raw), choice.temperature, generator)
        h = h + feature + self.z_proj(z.to(h.dtype))
        if choice.return_noise:
            z = (z - p_mean.float()) / gaussian.std_from_raw(p_raw)
        return self.res(h), kl, z

    def _prior(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, raw std, feature residual): views of the prior network's output."""
        zc = self.z_channels
        # split, not slicing: its backward is one concatenation, not a zero-filled copy per piece
        p_mean, p_raw, feature = self.prior.from_activated(g).split([zc, zc, self.width], dim=1)
        return p_mean, p_raw, feature

    def _posterior(self, g: torch.Tensor, e_act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, raw std): views of the posterior network's output."""
        out = self.posterior.from_activated(torch.cat([e_act, g], dim=1))
        q_mean, q_raw = out.chunk(2, dim=1)
        return q_mean, q_raw
