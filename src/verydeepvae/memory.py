"""Training-memory estimate from the architecture alone (``verydeepvae config show --estimate-memory``).

What a training step holds, per sample, is counted from the tensors each block keeps for the
backward pass (activation sizes per block, channels x voxels at the block's resolution):

* pre-activation bottleneck stack on C_in channels with hidden width H: GELU(x) for the first
  convolution (C_in) and, for each of the three inner GELUs, its input and its output (6 H);
* encoder block: its input (C_in) + its stack; the level's output is kept for the decoder;
* latent layer (width W, hidden H, lateral width E, z channels Z): its input and GELU(input) (2 W),
  the prior stack (6 H) and its output (2 Z + W), the posterior stack on [e, h] (E + W + 6 H) and its
  output (2 Z), the noise and the sample (2 Z; the float32 std/KL maths keeps nothing else, see
  ``gaussian.posterior_sample_and_kl``), the state after z is added (W) and the residual block
  (W + 6 H);
* output head and likelihood: the last state twice and about 20 single-channel full-resolution maps
  per mixture component.

With activation checkpointing at a level, each of its latent layers keeps only its input and each
encoder block only its input; during the backward pass one layer at a time is recomputed.  Where a
whole layer's activations would be the largest working set of the step, the recomputation is
itself checkpointed part by part (prior, posterior, residual block: only the parts' outputs plus the
working set of the largest part are held, at the price of running each part a third time); at the
other checkpointed levels a layer is recomputed whole, once (:meth:`MemoryEstimate.nested_levels`).
That recomputation is the ``transient`` term, counted once for the largest checkpointed level.

Fixed memory does not grow with the batch: weights, gradients, two optimiser moments, the EMA copy
and the optimiser's temporary copies (about 7 tensors the size of the weights in all).  On a GPU the
CUDA context (~0.3-0.5 GiB) comes on top and is not counted; on a CPU the process itself (Python,
torch, about 0.3 GiB) is not counted.

This is live tensor memory.  ``tests/test_performance.py`` checks the stored part per level against
the tensors autograd really keeps; ``bench/train_step.py`` prints the estimate beside measured peaks.
On Linux CPUs the peak RSS can exceed it: glibc keeps freed tensors of a few MiB to 32 MiB in its
heap (its mmap threshold adapts upwards), which fragments; ``MALLOC_MMAP_THRESHOLD_=4194304`` in the
environment returns them to the system and brings the RSS back to the estimate (128³, bf16,
channels-last, checkpointing: 5.76 GiB peak RSS by default, 3.87 GiB with it, estimate 3.95 GiB).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .config import Config

FIXED_COPIES_OF_WEIGHTS = 7  # weights, gradients, 2 optimiser moments, EMA, ~2 optimiser temporaries
GRADIENT_WORKING_SET = 3  # gradient tensors alive at once while backpropagating through a block
LIKELIHOOD_MAPS = 20  # full-resolution float32 maps of the likelihood and the loss, per mixture component


@dataclass
class LevelMemory:
    level: int
    resolution: int
    stored: int  # bytes per sample kept for the backward pass without checkpointing
    stored_checkpointed: int  # ... with this level checkpointed
    transient_checkpointed: int  # largest recomputation working set at this level, bytes per sample
    transient: int  # gradient working set without checkpointing, bytes per sample
    transient_whole: int  # ... when checkpointed and a latent layer is recomputed whole (not nested)
    forward_macs: int  # multiply-accumulates of the level's convolutions in one forward pass, per sample


@dataclass
class MemoryEstimate:
    parameters: int
    latent_dimensions: int
    fixed_bytes: int
    levels: list[LevelMemory]
    precision: str

    def per_sample(self, checkpoint_levels: list[int] | None = None) -> int:
        """Activation bytes per sample at the peak of a training step (with :meth:`nested_levels`)."""
        chosen = set(checkpoint_levels or [])
        stored = sum(lv.stored_checkpointed if lv.level in chosen else lv.stored for lv in self.levels)
        return stored + self._largest_transient(chosen)

    def _largest_transient(self, chosen: set[int]) -> int:
        return max([lv.transient_checkpointed for lv in self.levels if lv.level in chosen]
                   + [lv.transient for lv in self.levels if lv.level not in chosen] + [0])

    def recomputation_share(self, level: int) -> float:
        """The work that recomputing ``level`` whole adds to a training step, as a share of the
        step's convolutions (forward + backward, counted as three forward passes)."""
        return self.levels[level].forward_macs / max(1, 3 * sum(lv.forward_macs for lv in self.levels))

    def nested_levels(self, checkpoint_levels: list[int] | None = None) -> list[int]:
        """The checkpointed levels whose latent layers are checkpointed again, part by part, inside
        their recomputation: those where recomputing a layer whole would hold more than the step's
        largest working set with nesting everywhere.  Elsewhere nesting saves no memory at the peak
        and costs a third forward pass of the level (preset 128, levels 0 and 1 checkpointed: level 1
        is recomputed whole, 0.6 GiB against level 0's 1.6 GiB working set).  The estimated peak is
        the same either way."""
        chosen = set(checkpoint_levels or [])
        ceiling = self._largest_transient(chosen)
        return [lv.level for lv in self.levels if lv.level in chosen and lv.transient_whole > ceiling]

    def peak(self, batch_size: int, checkpoint_levels: list[int] | None = None) -> int:
        return self.fixed_bytes + batch_size * self.per_sample(checkpoint_levels)

    def max_batch_size(self, budget_bytes: int, checkpoint_levels: list[int] | None = None) -> int:
        """Largest batch whose estimated peak fits the budget (0 if not even one sample does)."""
        return max(0, (budget_bytes - self.fixed_bytes) // max(1, self.per_sample(checkpoint_levels)))

    def least_recomputation(self, batch_size: int, budget_bytes: int) -> list[int] | None:
        """The first of :func:`checkpoint_candidates` whose estimated peak at ``batch_size`` is within
        ``budget_bytes`` (estimator bytes: a caller with overheads on top divides them out first);
        None when not even checkpointing every level fits."""
        for levels in checkpoint_candidates(len(self.levels)):
            if self.peak(batch_size, levels) <= budget_bytes:
                return levels
        return None


def checkpoint_candidates(num_levels: int) -> list[list[int]]:
    """What ``checkpoint_levels: auto`` tries, least recomputation first: none, then the finest
    levels first ([0], [0, 1], ...) up to all of them.  Level 0 (full resolution) holds most of the
    activations (at 128³, 57 % of the bytes a step stores per sample, level 1 another 37 %), so each
    step down the list saves the most memory for the recomputation it adds."""
    return [list(range(k)) for k in range(num_levels + 1)]


def levels_text(levels: list[int], num_levels: int) -> str:
    """How a checkpoint_levels list is shown: none, all, or the list."""
    if not levels:
        return "none"
    return "all" if list(levels) == list(range(num_levels)) else str(list(levels))


def estimate(cfg: Config) -> MemoryEstimate:
    """Memory of one training step of ``cfg``'s model at its precision (fp32, or bf16/fp16
    autocast: convolution activations in 2 bytes, the float32 KL and likelihood maths in 4)."""
    low = cfg.precision in ("bf16", "fp16", "half")
    act = 2 if low else 4  # bytes of a convolution activation
    f32 = 4
    n = cfg.num_levels
    res = cfg.level_resolutions()
    enc_w = list(cfg.channels)
    enc_h = cfg.hidden_channels
    dec_w = cfg.top_down_channels
    dec_h = cfg.hidden_top_down_channels
    z_ch = cfg.channels_per_latent
    layers = cfg.latent_feature_maps_per_resolution
    blocks = cfg.model.encoder_blocks_per_level()

    levels = []
    for lv in range(n):
        v = res[lv] ** 3
        W, H, E, Z = dec_w[lv], dec_h[lv], enc_w[lv], z_ch[lv]
        coarser = dec_w[lv + 1] if lv < n - 1 else W  # projected into lv at its own v / 8 voxels
        macs = v * _level_macs(cfg, lv, blocks[lv]) + (v // 8) * (coarser * W if coarser != W else 0)
        # encoder blocks: input + stack (bottleneck 6 H, or the plain two-conv branch 2 C)
        enc_stored = enc_ckpt = 0
        enc_transient = 0
        for b in range(blocks[lv]):
            c_in = (1 if lv == 0 else enc_w[lv - 1]) if b == 0 else E
            inner = 6 * enc_h[lv] if cfg.bottleneck_resnet_encoder else 2 * E
            enc_stored += 2 * c_in + inner
            enc_ckpt += c_in
            enc_transient = max(enc_transient, 2 * c_in + inner)
        enc_stored += E  # the level's output, kept for the decoder (and the pooling)
        enc_ckpt += E
        if cfg.downsampling == "conv" and lv < n - 1:
            enc_stored += E
            enc_ckpt += E
        # decoder: the projection into the finer level keeps its input, this level's final state
        up = W if lv > 0 and dec_w[lv - 1] != W else 0
        conv_part = 2 * W + 6 * H + (2 * Z + W) + (E + W + 6 * H) + 2 * Z + Z + W + (W + 6 * H)
        layer_stored = conv_part * act + Z * f32  # + the float32 noise of the sample
        L = layers[lv]
        lateral = E * act if L else 0  # GELU(e), shared by the level's layers
        stored = v * ((enc_stored + up) * act + L * layer_stored + lateral)
        ckpt_stored = v * ((enc_ckpt + up) * act + L * W * act + lateral)
        # recomputing one latent layer: its parts' outputs + the largest part's working set + gradients
        parts_out = (3 * W + 5 * Z) * act + Z * f32
        largest_part = (E + W + 6 * H) * act
        grads = GRADIENT_WORKING_SET * max(W, H, E) * act
        transient_ckpt = v * max(parts_out + largest_part + grads if L else 0, enc_transient * act + grads)
        transient_whole = v * max(layer_stored + grads if L else 0, enc_transient * act + grads)
        transient = v * grads
        if lv == 0:  # output head and likelihood
            head = 2 * W * act + LIKELIHOOD_MAPS * cfg.likelihood_mixtures * f32
            stored += v * head
            ckpt_stored += v * head
        levels.append(LevelMemory(lv, res[lv], stored, ckpt_stored, transient_ckpt, transient, transient_whole, macs))

    params, latent_dims = _sizes(cfg)
    fixed = FIXED_COPIES_OF_WEIGHTS * params * 4 + (params * 2 if low else 0)  # + autocast's weight copies
    return MemoryEstimate(params, latent_dims, fixed, levels, cfg.precision)


def _level_macs(cfg: Config, lv: int, blocks: int) -> int:
    """Multiply-accumulates per voxel of level ``lv``'s convolutions in one forward pass: its encoder
    blocks and its latent layers (prior, posterior, z projection, residual block).  The upsampling
    projection into it (counted by ``estimate``), the output head, learned stride-2 downsampling and
    the element-wise maths are left out."""
    E, EH, W, H, Z = cfg.channels[lv], cfg.hidden_channels[lv], cfg.top_down_channels[lv], \
        cfg.hidden_top_down_channels[lv], cfg.channels_per_latent[lv]
    kb, kt = cfg.kernel_sizes_bottom_up[lv] ** 3, cfg.kernel_sizes_top_down[lv] ** 3
    macs = 0
    for b in range(blocks):
        c_in = (1 if lv == 0 else cfg.channels[lv - 1]) if b == 0 else E
        if cfg.bottleneck_resnet_encoder:
            macs += c_in * EH + 2 * EH * EH * kb + EH * E
        else:
            macs += c_in * E * kb + E * E * kb
        macs += c_in * E if c_in != E else 0  # the skip's projection

    def stack(c_in: int, c_out: int) -> int:  # blocks.ConvStack: 1x1, k³, k³, 1x1
        return c_in * H + 2 * H * H * kt + H * c_out

    layer = stack(W, 2 * Z + W) + stack(E + W, 2 * Z) + Z * W + stack(W, W)
    return macs + cfg.latent_feature_maps_per_resolution[lv] * layer


def _sizes(cfg: Config) -> tuple[int, int]:
    """Parameter count and latent dimensions, from the model built on the meta device (no memory)."""
    import torch

    from .model import VeryDeepVAE

    with torch.device("meta"):
        model = VeryDeepVAE(cfg)
    return sum(p.numel() for p in model.parameters()), model.latent_dimensions()


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str) -> int:
    """'24GiB', '24 GB', '16G', '8000MiB', '1.5e10' -> bytes (G and GB are 10^9, GiB is 2^30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size such as 24GiB, 16GB or 8000MiB, got {text!r}")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"expected a positive size, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def report(cfg: Config, budget_bytes: int | None = None,
           auto: tuple[list[int] | None, str] | None = None) -> str:
    """The ``config show --estimate-memory`` text; ``auto``: the levels ``checkpoint_levels auto``
    picks (None: nothing fits) and a line saying why (``train/memory_plan.for_config_show``),
    marked in the table."""
    est = estimate(cfg)
    configured = cfg.checkpointed_levels()
    every = list(range(cfg.num_levels))
    lines = [
        f"memory estimate for one training step ({cfg.precision}; activations per sample, plus fixed memory):",
        f"  parameters {est.parameters:,}; latent dimensions {est.latent_dimensions:,}",
        f"  fixed: {format_bytes(est.fixed_bytes)} (weights, gradients, optimiser moments, EMA, optimiser temporaries)",
        "  level  resolution  stored/sample  checkpointed/sample",
    ]
    for lv in est.levels:
        lines.append(f"  {lv.level:5d}  {lv.resolution:>9}³  {format_bytes(lv.stored):>13}  "
                     f"{format_bytes(lv.stored_checkpointed):>19}")
    rows = [("no checkpointing", []), ("checkpoint_levels all", every)]
    if configured and configured != every:
        rows.insert(1, (f"checkpoint_levels {configured} (configured)", configured))
    picked = auto[0] if auto else None
    if picked is not None:
        same = [i for i, (_, levels) in enumerate(rows) if levels == picked]
        if same:
            name = rows[same[0]][0]
            rows[same[0]] = (name[:-1] + ", auto)" if name.endswith(")") else name + " (auto)", picked)
        else:
            rows.insert(1, (f"checkpoint_levels {picked} (auto)", picked))
    width = max(len(name) for name, _ in rows)
    lines.append(f"  {'mode':<{width}}  per sample    peak at batch_size {cfg.batch_size}"
                 + ("    largest batch in " + format_bytes(budget_bytes) if budget_bytes else ""))
    for name, levels in rows:
        line = (f"  {name:<{width}}  {format_bytes(est.per_sample(levels)):>10}    "
                f"{format_bytes(est.peak(cfg.batch_size, levels)):>10}")
        if budget_bytes:
            line += f"    {est.max_batch_size(budget_bytes, levels):>6d}"
        lines.append(line)
    if auto:
        lines.append(f"  {auto[1]}")
    lines.append("  (not counted: the CUDA context on a GPU, the Python/torch process itself on a CPU, about 0.3 GiB)")
    return "\n".join(lines)
