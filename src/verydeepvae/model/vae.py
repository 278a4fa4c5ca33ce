"""The very deep VAE: encoder + decoder + output head + likelihood, and what users do with it.

Intensities enter and leave in [0, 1]; inside, the model works on [-1, 1].  The loss is the
negative ELBO per voxel (nats), so thresholds such as the gradient clip mean the same at 32³ and
128³.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ModelConfig
from .blocks import Conv3d, Downsample, Upsample
from .condition import ConditionEmbedding, embedding_width
from .decoder import Decoder
from .encoder import Encoder
from .fitted_prior import FittedPrior
from .kl_objective import balanced_kl_coefficients, free_bits_kl
from .latent_layer import LatentChoice
from .likelihood import build_likelihood
from .voxel_noise import VoxelNoise, draw_voxels

# a covariate guidance scale: one for every covariate, or one per covariate dimension (dim,)
GuidanceWeights = float | Sequence[float] | torch.Tensor


def _is_identity(guidance: GuidanceWeights) -> bool:
    """Whether ``guidance`` leaves the model as trained (every weight 1).  A plain number (what every
    training step passes) is compared without a tensor: reading a tensor's value back would break
    torch.compile's graph in the middle of the forward pass."""
    if isinstance(guidance, (int, float)):
        return guidance == 1.0
    return bool(torch.all(torch.as_tensor(guidance, dtype=torch.float32) == 1.0))


@dataclass
class ModelOutput:
    loss: torch.Tensor  # scalar to minimise: mean over the batch of nll + kl_weight * kl (nats/voxel)
    elbo: torch.Tensor  # (B,) negative ELBO per voxel, nats (kl weight 1)
    nll: torch.Tensor  # (B,) reconstruction term per voxel, nats
    kl_per_layer: torch.Tensor  # (B, layers) KL of each latent layer per image voxel, nats
    params: torch.Tensor  # output distribution parameters (B, likelihood.num_params, R, R, R)


class VeryDeepVAE(nn.Module):
    """``covariate_dim`` > 0 makes a conditional model (model/condition.py): every method that runs
    the decoder then takes ``covariates`` (B, covariate_dim), encoded as in data/covariates.py."""

    def __init__(self, cfg: ModelConfig | Config, covariate_dim: int = 0):
        super().__init__()
        cfg = cfg.model if isinstance(cfg, Config) else cfg  # the architecture alone
        self.resolution = cfg.resolution
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.likelihood = build_likelihood(cfg.likelihood, cfg.num_bins, cfg.output_scale_max,
                                           cfg.likelihood_mixtures)
        self.output_head = Conv3d(cfg.channels_top_down[0], self.likelihood.num_params, 1)
        # whether ``sample`` draws every voxel from p(x | z) unless told: the mean blurs what the
        # decoder is unsure of (thin CSF) into grey matter, a draw keeps it (docs/training-recipe.md)
        self.draws_voxels = cfg.sample_voxels == "draw"
        # created last, so the other modules' initial weights are those of the unconditional model
        widths = cfg.channels_top_down
        self.condition = ConditionEmbedding(covariate_dim, widths, embedding_width(widths[-1])) if covariate_dim else None
        # training covariate vectors (N, covariate_dim): ``sample`` without covariates draws from them
        # (not saved with the weights: the checkpoint's covariate schema holds them)
        self.register_buffer("covariate_bank", torch.zeros(0, max(covariate_dim, 0)), persistent=False)
        self.num_voxels = cfg.resolution ** 3
        self.set_checkpoint_levels(cfg.checkpointed_levels)
        self.channels_last = False
        if cfg.channels_last:
            self.set_channels_last(True)
        # the arithmetic of sample/reconstruct/encode/decode (inference.load_model sets the precision
        # the model was trained in): a batch then needs the memory of training's arithmetic, not
        # of float32 (at 128³, 4 float32 reconstructions hold ~12.7 GiB)
        self.inference_precision = "fp32"
        # a Gaussian for the coarsest layers fitted after training (model/fitted_prior.py), set by
        # inference.load_model when the checkpoint's training run chose it; None: the learned prior
        self.fitted_prior: FittedPrior | None = None
        # how drawn voxels correlate between neighbours, measured after training (model/voxel_noise.py)
        self.voxel_noise: VoxelNoise | None = None  # set by inference.load_model; None: independent

    # -- speed/memory modes (Config's performance section) ---------------------------------------
    def set_checkpoint_levels(self, levels: Sequence[int], nested: Sequence[int] | None = None) -> None:
        """Recompute activations in the backward pass for the encoder blocks and latent layers of
        these resolution levels (0 = full resolution) instead of storing them.  At the ``nested``
        levels (default: all of them) a latent layer's recomputation is checkpointed again, part by
        part, which holds less at once but runs each part a third time; training passes
        ``memory.MemoryEstimate.nested_levels``, the levels where that lowers the peak."""
        levels = set(levels)
        nested = levels if nested is None else levels & set(nested)
        for level, blocks in enumerate(self.encoder.levels):
            for block in blocks:
                block.checkpointed = level in levels
        for layer, level in zip(self.decoder.layers, self.decoder.layer_levels):
            layer.checkpointed = level in levels
            layer.nested = level in nested
            layer.res.checkpointed = level in nested

    def set_channels_last(self, enabled: bool = True) -> None:
        """Keep weights and activations in the channels-last-3D memory format (often faster on
        CPUs and on tensor-core GPUs); results are the same up to float rounding."""
        self.channels_last = enabled
        self.to(memory_format=torch.channels_last_3d if enabled else torch.contiguous_format)
        for module in self.modules():
            if isinstance(module, Conv3d) and module.conv.in_channels == 1:
                module.output_format = torch.channels_last_3d if enabled else None
            if isinstance(module, (Downsample, Upsample)):
                module.channels_last = enabled

    # -- conditioning ----------------------------------------------------------------------------
    @property
    def covariate_dim(self) -> int:
        return 0 if self.condition is None else self.condition.covariate_dim

    def set_covariate_bank(self, vectors: torch.Tensor) -> None:
        """The encoded covariates of the training scans (N, covariate_dim), drawn from by ``sample``."""
        vectors = torch.as_tensor(vectors, dtype=torch.float32)
        if vectors.dim() != 2 or vectors.shape[1] != self.covariate_dim:
            raise ValueError(f"expected covariate vectors (N, {self.covariate_dim}), got {tuple(vectors.shape)}")
        self.covariate_bank = vectors.to(self.covariate_bank.device)

    def _film(self, covariates: torch.Tensor | None, batch: int, guidance: GuidanceWeights = 1.0,
              reference: torch.Tensor | None = None):
        """The decoder's per-level FiLM for these covariates; None for an unconditional model.

        ``guidance`` w != 1 scales the covariates' effect, as classifier-free guidance does in
        diffusion models: every level's FiLM becomes F(ref) + w (F(c) - F(ref)), where the reference
        ``reference`` (B, dim) defaults to the training scans' mean covariates (the population
        centre); callers pass c with only the requested covariates moved there
        (``conditional.Conditions.references``), or a scan's own covariates for a counterfactual.
        Models trained for a few thousand steps learn the covariates' effect too weakly
        (docs/conditional.md); w > 1 restores it, w = 1 is the model as trained.

        ``guidance`` may also be one weight per covariate dimension (dim,), so each covariate gets
        its own scale (``_guided_film``)."""
        if self.condition is None:
            if covariates is not None:
                raise ValueError("this model is unconditional; it takes no covariates")
            if not _is_identity(guidance):
                raise ValueError("guidance needs a conditional model")
            return None
        if covariates is None:
            raise ValueError(f"this model is conditional: give covariates ({batch}, {self.covariate_dim})")
        if covariates.shape[0] != batch:
            raise ValueError(f"covariates for {covariates.shape[0]} volumes, expected {batch}")
        device = self.covariate_bank.device
        covariates = covariates.to(device)
        if _is_identity(guidance):
            return self.condition(covariates)
        if reference is None:
            if len(self.covariate_bank) == 0:
                raise ValueError("guidance needs the training scans' covariates (or a reference)")
            reference = self.covariate_bank.mean(0, keepdim=True).expand(batch, -1)
        return self._guided_film(covariates, reference.to(device), guidance)

    def _guided_film(self, covariates: torch.Tensor, reference: torch.Tensor, guidance: GuidanceWeights):
        """FiLM guided with a scale per covariate dimension, walked as a chain: starting from the
        reference, the covariates' dimensions are moved to their requested values one run of equal
        weight at a time, each step's change of the FiLM scaled by that run's weight.  The steps sum
        to F(c) - F(ref), so one weight for all is exactly F(ref) + w (F(c) - F(ref)); with several,
        each covariate's effect is scaled by its own weight, measured given the ones moved before it
        (schema order; how much the order matters was not measured).  A covariate's dimensions (a
        one-hot) always share one weight."""
        weights = torch.as_tensor(guidance, dtype=torch.float32).flatten()
        if weights.numel() == 1:
            weights = weights.expand(self.covariate_dim)
        if weights.numel() != self.covariate_dim:
            raise ValueError(f"guidance needs 1 or {self.covariate_dim} weights, got {weights.numel()}")
        runs, start = [], 0
        for end in range(1, self.covariate_dim + 1):
            if end == self.covariate_dim or weights[end] != weights[start]:
                runs.append((start, end, float(weights[start])))
                start = end
        moved = reference.clone()
        before = self.condition(moved)
        steps = []
        for start, end, w in runs:
            moved[:, start:end] = covariates[:, start:end]
            after = self.condition(moved)
            steps.append((w - 1.0, [(s - s0, b - b0) for (s, b), (s0, b0) in zip(after, before)]))
            before = after
        # F(c) + sum (w - 1) step rather than F(ref) + sum w step: equal in exact arithmetic, but a
        # step of weight 1 (or one that moves nothing) then adds an exact zero, so every covariate
        # at scale 1 gives the model as trained bit for bit, as _is_identity's shortcut does.
        guided = list(before)
        for extra, step in steps:
            guided = [(gs + extra * ds, gb + extra * db) for (gs, gb), (ds, db) in zip(guided, step)]
        return guided

    def draw_covariates(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n covariate vectors drawn from the training scans' (uniformly, with replacement)."""
        if len(self.covariate_bank) == 0:
            raise ValueError("this conditional model has no training covariates to draw from; give covariates")
        index = torch.randint(len(self.covariate_bank), (n,), generator=generator, device=self.covariate_bank.device)
        return self.covariate_bank[index]

    def _input(self, x01: torch.Tensor) -> torch.Tensor:
        x = x01 * 2.0 - 1.0
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x

    # -- structure -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    @property
    def layer_levels(self) -> list[int]:
        return list(self.decoder.layer_levels)

    def latent_shapes(self) -> list[tuple[int, int, int, int]]:
        """(channels, size, size, size) of every latent layer, coarsest first."""
        shapes = []
        for layer, level in zip(self.decoder.layers, self.decoder.layer_levels):
            s = self.resolution >> level
            shapes.append((layer.z_channels, s, s, s))
        return shapes

    def latent_sizes(self) -> list[int]:
        """Number of latent dimensions of every layer, coarsest first."""
        return [math.prod(s) for s in self.latent_shapes()]

    def latent_dimensions(self) -> int:
        return sum(self.latent_sizes())

    def free_nats(self, per_layer: float, per_latent: float = 0.0,
                  resolutions: Sequence[int] | None = None) -> list[float]:
        """Free nats per volume of every latent layer, coarsest first: ``per_layer`` for each, plus
        ``per_latent`` for each of its latent dimensions, so the large fine layers (131,072
        dimensions at 32³ in the demo) get an allowance that keeps them in play while the coarse
        ones (32 dimensions at 1³) keep about ``per_layer``.  ``resolutions`` (voxels per side)
        limits the per-dimension part to the layers at those sizes; None gives it to every layer."""
        return [per_layer + (per_latent * math.prod(shape) if resolutions is None or shape[1] in resolutions else 0.0)
                for shape in self.latent_shapes()]

    # -- training --------------------------------------------------------------------------------
    def forward(self, x01: torch.Tensor, kl_weight: float | torch.Tensor = 1.0, kl_balance: bool = False,
                free_bits: float | Sequence[float] = 0.0, covariates: torch.Tensor | None = None) -> ModelOutput:
        """Loss terms of a batch of volumes in [0, 1].  ``kl_weight`` < 1 during a KL warm-up: one
        number, or one per latent layer (coarsest first, as ``layer_levels``); with
        ``kl_balance`` the KL of each layer is weighted by :func:`balanced_kl_coefficients` then;
        ``free_bits`` (nats per volume: one number for every latent layer, or one per layer as
        :meth:`free_nats` gives) exempts that much of each layer's KL from the loss
        (:func:`free_bits_kl`).  ``elbo`` is always the true bound.  ``covariates``: those of a
        conditional model's volumes."""
        x = self._input(x01)
        film = self._film(covariates, x.shape[0])
        activations = self.encoder(x)
        choices = [LatentChoice()] * self.num_layers
        h, kls, _ = self.decoder(activations, choices, x.shape[0], keep_z=False, film=film)
        params = self.output_head(F.gelu(h))
        nll = -self.likelihood.log_prob(params, x).flatten(1).sum(1) / self.num_voxels
        kl = torch.stack(kls, dim=1) / self.num_voxels
        elbo = nll + kl.sum(1)
        kl_term = kl
        if kl_balance and bool((torch.as_tensor(kl_weight) < 1.0).any()):
            kl_term = kl * balanced_kl_coefficients(kl.detach() * self.num_voxels, self.latent_sizes())
        free = [float(free_bits)] * self.num_layers if isinstance(free_bits, (int, float)) else list(free_bits)
        if max(free) > 0.0:  # decided in Python: no device sync in the training step
            kl_term = free_bits_kl(kl_term, kl.new_tensor(free) / self.num_voxels)
        loss = (nll + (kl_weight * kl_term).sum(-1)).mean()
        return ModelOutput(loss=loss, elbo=elbo, nll=nll, kl_per_layer=kl, params=params)

    # -- generation ------------------------------------------------------------------------------
    def inference_autocast(self, device: torch.device | str):
        """Autocast of ``inference_precision`` on ``device`` (:func:`autocast_for`)."""
        return autocast_for(self.inference_precision, device)

    def layer_temperatures(self, temperature: float | Sequence[float]) -> list[float]:
        """One temperature per layer from a scalar or one value per resolution level."""
        if isinstance(temperature, (int, float)):
            return [float(temperature)] * self.num_layers
        values = list(temperature)
        if len(values) != self.decoder.num_levels:
            raise ValueError(
                f"expected one temperature per resolution level ({self.decoder.num_levels}, "
                f"highest resolution first), got {len(values)}"
            )
        return [float(values[level]) for level in self.decoder.layer_levels]

    @torch.no_grad()
    def sample(self, n: int, temperature: float | Sequence[float] = 1.0,
               generator: torch.Generator | None = None, draw_voxels: bool | None = None,
               covariates: torch.Tensor | None = None, prior: str = "auto", guidance: GuidanceWeights = 1.0,
               reference: torch.Tensor | None = None, correlated_voxels: bool = True) -> torch.Tensor:
        """n volumes in [0, 1] from the prior.  With ``draw_voxels`` each voxel is drawn from p(x | z)
        too, else the output is p(x | z)'s mean; None: as the configuration's ``sample_voxels`` says
        (:attr:`draws_voxels`), neighbours correlated by :attr:`voxel_noise` if ``correlated_voxels``.
        A conditional model samples p(x | covariates); without ``covariates`` it first draws them from
        the training scans' (:meth:`draw_covariates`), i.e. it samples the training population.
        ``prior``: "learned" draws every layer from its learned prior, "fitted" the coarsest layers
        from ``fitted_prior`` (an error without one), "auto" the fitted one when there is one.
        ``guidance``: the covariates' effect scaled around ``reference`` (default: the population centre; ``_film``)."""
        draw = self.draws_voxels if draw_voxels is None else draw_voxels
        with self.inference_autocast(self.output_head.conv.weight.device):
            params = self._prior_output(n, temperature, generator, covariates, prior, guidance, reference)
            return self._to_volume(params, draw, generator, correlated_voxels)

    @torch.no_grad()
    def sample_mean_and_draw(self, n: int, temperature: float | Sequence[float] = 1.0,
                             generator: torch.Generator | None = None, covariates: torch.Tensor | None = None,
                             prior: str = "auto", guidance: GuidanceWeights = 1.0,
                             reference: torch.Tensor | None = None, correlated_voxels: bool = True
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean of p(x | z), a draw from p(x | z)) of the same n prior samples z, each (n, 1, R, R, R)
        in [0, 1]: the anatomy the model places beside the voxel-level uncertainty it leaves, for a
        figure that shows both.  The draw equals ``sample(..., draw_voxels=True)`` with the same
        generator state (the mean consumes no randomness)."""
        with self.inference_autocast(self.output_head.conv.weight.device):
            params = self._prior_output(n, temperature, generator, covariates, prior, guidance, reference)
            return self._to_volume(params, False, None), self._to_volume(params, True, generator, correlated_voxels)

    def _prior_output(self, n: int, temperature: float | Sequence[float], generator: torch.Generator | None,
                      covariates: torch.Tensor | None, prior: str, guidance: GuidanceWeights,
                      reference: torch.Tensor | None) -> torch.Tensor:
        """The output head's parameters of p(x | z) for n latents drawn top-down from the prior
        (``sample``'s arguments)."""
        temps = self.layer_temperatures(temperature)
        fitted = self.prior_in_use(prior)
        given = fitted.choices(n, temps, generator) if fitted is not None else {}
        choices = [given.get(i) or LatentChoice(use_posterior=False, temperature=t) for i, t in enumerate(temps)]
        if self.condition is not None and covariates is None:
            covariates = self.draw_covariates(n, generator)
        film = self._film(covariates, n, guidance, reference)
        h, _, _ = self.decoder(None, choices, n, generator, film=film)
        return self.output_head(F.gelu(h))

    def prior_in_use(self, prior: str = "auto") -> FittedPrior | None:
        """The fitted prior ``sample`` draws the coarse layers from under ``prior`` (None: the learned one)."""
        if prior not in ("auto", "learned", "fitted"):
            raise ValueError(f'prior must be "auto", "learned" or "fitted", got {prior!r}')
        if prior == "fitted" and self.fitted_prior is None:
            raise ValueError("this model has no fitted prior (its training run kept the learned one, or the "
                             "checkpoint predates fitted priors, or raw weights are used)")
        return None if prior == "learned" else self.fitted_prior

    @torch.no_grad()
    def reconstruct(self, x01: torch.Tensor, prior_from_level: int | None = None,
                    posterior_mean: bool = True, temperature: float = 0.0,
                    generator: torch.Generator | None = None, covariates: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction in [0, 1].  With ``prior_from_level`` = m, latent layers at levels < m
        (resolutions finer than R/2^m) come from the prior at ``temperature`` instead of the
        posterior: the original's "progressive reconstructions"."""
        return self.reconstructions(x01, [prior_from_level], posterior_mean, temperature, generator, covariates)[0]

    @torch.no_grad()
    def reconstructions(self, x01: torch.Tensor, prior_from_levels: Sequence[int | None],
                        posterior_mean: bool = True, temperature: float = 0.0,
                        generator: torch.Generator | None = None,
                        covariates: torch.Tensor | None = None) -> list[torch.Tensor]:
        """:meth:`reconstruct` at each of ``prior_from_levels``, in that order, from one bottom-up
        pass: a training figure's progressive reconstructions cost one encoder pass per volume,
        not one per row."""
        film = self._film(covariates, x01.shape[0])
        out = []
        with self.inference_autocast(x01.device):
            x = self._input(x01)
            activations = self.encoder(x)
            for prior_from_level in prior_from_levels:
                choices = [LatentChoice(use_posterior=prior_from_level is None or level >= prior_from_level,
                                        posterior_mean=posterior_mean, temperature=temperature)
                           for level in self.decoder.layer_levels]
                h, _, _ = self.decoder(activations, choices, x.shape[0], generator, film=film)
                out.append(self._to_volume(self.output_head(F.gelu(h)), False, generator))
        return out

    @torch.no_grad()
    def encode(self, x01: torch.Tensor, covariates: torch.Tensor | None = None,
               as_noise: bool = False, generator: torch.Generator | None = None,
               draw: bool = False) -> list[torch.Tensor]:
        """Posterior means of every latent layer, coarsest first (with ``draw``: one posterior
        sample per layer, each layer's given the drawn layers above it).  With ``as_noise``, each as
        its standardised residual under the prior, (z - prior mean) / prior std: the scan's "noise",
        which :meth:`decode_noise` turns back into the same volume under the same covariates and
        into its counterfactual under others."""
        return self.encode_passes(x01, [draw], covariates=covariates, as_noise=as_noise, generator=generator)[0]

    @torch.no_grad()
    def encode_passes(self, x01: torch.Tensor, draws: Sequence[bool],
                      num_layers: int | Sequence[int | None] | None = None,
                      covariates: torch.Tensor | None = None, as_noise: bool = False,
                      generator: torch.Generator | None = None) -> list[list[torch.Tensor]]:
        """Several :meth:`encode` results of the same volumes from one bottom-up pass: one top-down
        pass per entry of ``draws`` (True: posterior draws, False: posterior means), in that order
        and from the same ``generator``, each stopping after the ``num_layers`` coarsest layers
        (None: every layer), or after one such number per pass.  Fitting a prior to the top of the
        hierarchy needs only its coarse layers, three times per volume (train/fit_prior.py): for the
        32³ demo's 95 training volumes, one encoder pass and three short top-down ones take 5.5 s on
        2 CPU cores, three full :meth:`encode` calls 36 s."""
        film = self._film(covariates, x01.shape[0])
        passes = []
        with self.inference_autocast(x01.device):
            x = self._input(x01)
            activations = self.encoder(x)
            stops = list(num_layers) if isinstance(num_layers, Sequence) else [num_layers] * len(draws)
            for draw, stop in zip(draws, stops, strict=True):
                choices = [LatentChoice(posterior_mean=not draw, return_noise=as_noise)] * self.num_layers
                passes.append(self.decoder(activations, choices, x.shape[0], generator, film=film,
                                           num_layers=stop)[2])
        return passes

    @torch.no_grad()
    def decode(self, latents: Sequence[torch.Tensor], covariates: torch.Tensor | None = None,
               guidance: GuidanceWeights = 1.0, reference: torch.Tensor | None = None) -> torch.Tensor:
        """Volumes in [0, 1] from given latents of every layer (as returned by ``encode``);
        ``guidance`` and ``reference`` as in ``_film`` (a counterfactual's reference: the scan's own covariates)."""
        if len(latents) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} latent tensors, got {len(latents)}")
        return self._decode_choices([LatentChoice(z=z) for z in latents], latents[0], covariates, guidance, reference)

    @torch.no_grad()
    def decode_noise(self, noise: Sequence[torch.Tensor], covariates: torch.Tensor | None = None,
                     guidance: GuidanceWeights = 1.0, reference: torch.Tensor | None = None) -> torch.Tensor:
        """Volumes in [0, 1] with z = prior mean + prior std * noise at every layer (the noise as
        returned by ``encode(..., as_noise=True)``), the priors following ``covariates``
        (``guidance``, ``reference``: as in ``decode``)."""
        if len(noise) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} noise tensors, got {len(noise)}")
        return self._decode_choices([LatentChoice(noise=e) for e in noise], noise[0], covariates, guidance, reference)

    def _decode_choices(self, choices: list[LatentChoice], first: torch.Tensor, covariates: torch.Tensor | None,
                        guidance: GuidanceWeights = 1.0, reference: torch.Tensor | None = None) -> torch.Tensor:
        film = self._film(covariates, first.shape[0], guidance, reference)
        with self.inference_autocast(first.device):
            h, _, _ = self.decoder(None, choices, first.shape[0], film=film)
            return self._to_volume(self.output_head(F.gelu(h)), False, None)

    def _to_volume(self, params: torch.Tensor, draw: bool, generator: torch.Generator | None,
                   correlated: bool = True) -> torch.Tensor:
        """p(x | z)'s mean, or a draw (neighbours following :attr:`voxel_noise` if ``correlated``), in [0, 1]."""
        noise = self.voxel_noise if correlated else None
        x = draw_voxels(self.likelihood, params, generator, noise) if draw else self.likelihood.mean(params)
        return ((x + 1.0) / 2.0).float()


def autocast_for(precision: str, device: torch.device | str):
    """The autocast context of a precision setting, for training and generation alike: bf16 or
    fp16 autocast (float16 only on CUDA), nothing for fp32.  The KL and the likelihood are computed
    in float32 inside it all the same (gaussian.py, likelihood.py)."""
    device = torch.device(device)
    if precision == "bf16" or (precision == "fp16" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()
