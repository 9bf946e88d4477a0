"""Codebook-free quantizers: every code is a point of a fixed grid, reachable by construction, so
the vocabulary is used in full without codebook losses or dead-code restarts. (SimVQ, the third
route to full use this project implements, is a ``VectorQuantizer`` option: model_zoo/quantizers.py.)

- FSQ (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple", arXiv:2309.15505):
  each of the ``d = len(levels)`` lookup dimensions is bounded, ``f(z) = tanh(z + s) * h - o``
  with ``h = (L - 1)(1 + 1e-3) / 2``, ``o = 0.5`` for even ``L`` (else 0) and ``s = atanh(o / h)``,
  so it rounds to exactly ``L`` integers; the rounding is straight-through and the output is the
  integer divided by ``L // 2`` (in ``[-1, 1]``). The code is the mixed-radix number of the digits
  (``integer + L // 2``, first dimension least significant), ``codebook_size = prod(levels)``.
  No parameters besides the projections, no auxiliary loss.
- LFQ, lookup-free quantization (Yu et al. 2023, MAGVIT-2, "Language Model Beats Diffusion -
  Tokenizer is Key to Visual Generation", arXiv:2310.05737; Open-MAGVIT2, Luo et al. 2024,
  arXiv:2409.04410): the code of ``z`` in ``bits`` dimensions is its sign pattern
  (``q = sign(z)`` in ``{-1, 1}``, straight-through; bit ``i`` is 1 where ``z_i > 0``, first
  dimension most significant), ``codebook_size = 2 ** bits``. The entropy loss acts on the code
  distribution ``p(c|z) = softmax_c(2 z.c / T)`` (the softmax of ``-||z - c||^2 / T``) of the
  pre-quantization ``z``: it minimises the per-sample entropy (confident codes) and maximises the
  entropy of the batch-averaged distribution (diverse codes):
  ``loss = beta * ||z - sg(q)||^2 + w * (H[p(c|z)] - gamma * H[E_batch p(c|z)])``.
  ``p(c|z)`` factorises over bits (``p(bit_i = 1) = sigmoid(4 z_i / T)``), so the per-sample
  entropy is a sum of binary entropies, exact at any size. The batch average does not factorise:
  up to ``lfq_entropy_group_bits`` bits it is exact over all ``2 ** bits`` codes; above, the bits
  are split into near-equal contiguous groups (18 -> 9 + 9 with the default 9, Open-MAGVIT2's
  factorisation) and the batch entropy is the sum of the groups' marginal entropies. That sum
  bounds the joint entropy from above and reaches its maximum ``bits * log 2`` when every group is
  used uniformly, which is what it enforces; it costs ``[P, 2^9]`` per group instead of
  ``[P, 2^18]``. The batch average is summed over ranks in fp32 by an autograd all-reduce, so under
  data parallelism the loss and (after the gradient mean) its gradient are the global batch's.

Priors over large LFQ vocabularies: the priors here (VIM, the text prior, Stackformer) predict
``codebook_size`` logits per token, fine up to ~2^14. At MAGVIT-2's 2^18 a softmax head would be
a 262,144-way output layer (about 400M weights at width 1536, and a ``[B, N, 262144]`` logit
tensor, 8.6 GB in fp32 for 8 x 1024 tokens). Open-MAGVIT2's prior instead factorises each token
into sub-tokens of 2^9 (the same 9 + 9 bit groups), predicted by two heads, the second given the
first; that factorised head is left for later.

Both quantizers report ``usage``, ``perplexity`` and ``dead_codes`` as the vq kind does (counts
all-reduced in training, a usage EMA), and return the losses ``commitment`` and ``codebook`` (0
where the method has none). ``l2_normalize``, ``restart_dead`` and ``data_init`` do not apply (no
codebook rows); the config is a model_zoo.quantizers.QuantizerConfig, which builds these through
``build_quantizer``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .quantizer_base import AllReduceSum, QuantizerBase, world_size

__all__ = ["FSQuantizer", "LFQuantizer"]

_FSQ_EPS = 1e-3   # the bound's margin: the extreme levels are reached at finite z


class FSQuantizer(QuantizerBase):
    """Finite scalar quantization over ``len(cfg.fsq_levels)`` lookup dimensions."""

    def __init__(self, in_dim: int, cfg):
        levels = tuple(cfg.fsq_levels)
        if not levels or min(levels) < 2:
            raise ValueError(f"kind='fsq' needs fsq_levels, each >= 2 (e.g. (8, 5, 5, 5)), got {levels}")
        if math.prod(levels) != cfg.codebook_size:
            raise ValueError(f"kind='fsq': codebook_size must equal prod(fsq_levels) = {math.prod(levels)} "
                             f"for fsq_levels={levels}, got {cfg.codebook_size}")
        super().__init__(in_dim, cfg, len(levels))
        self.levels = levels
        self.basis = tuple(math.prod(levels[:i]) for i in range(len(levels)))
        self.reset_parameters()

    def _grid(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Levels and half widths ``L // 2`` as fp32 ``[d]``."""
        levels = torch.tensor(self.levels, dtype=torch.float32, device=device)
        return levels, torch.floor(levels / 2)

    def bound(self, z: Tensor) -> Tensor:
        levels, _ = self._grid(z.device)
        h = (levels - 1) * (1 + _FSQ_EPS) / 2
        offset = (1 - torch.remainder(levels, 2)) * 0.5   # even levels: the grid is shifted by half a step
        return torch.tanh(z + torch.atanh(offset / h)) * h - offset

    def _quantize(self, ze: Tensor):
        _, half = self._grid(ze.device)
        bounded = self.bound(ze)
        rounded = bounded.detach().round()
        # straight-through, written so the forward value is the grid point exactly (x + (r - x) is not)
        zq = (rounded + (bounded - bounded.detach())) / half
        digits = (rounded + half).long()    # 0 .. L-1; the index in int64, never in a float format
        codes = (digits * torch.tensor(self.basis, device=ze.device)).sum(-1)
        zero = ze.new_zeros(())
        distances = ((bounded.detach() - rounded) / half).pow(2).sum(-1)   # rounding error, output units
        return zq, codes, zero, distances, {"commitment": zero, "codebook": zero}, self._usage(codes)

    def _vectors(self, codes: Tensor) -> Tensor:
        levels, half = self._grid(codes.device)
        digits = torch.div(codes.unsqueeze(-1), torch.tensor(self.basis, device=codes.device),
                           rounding_mode="floor") % levels.long()
        return (digits.float() - half) / half


def _signs(codes: Tensor, bits: int) -> Tensor:
    """Code indices ``[...]`` -> their vectors in ``{-1, 1}^bits`` (first dimension the most
    significant bit)."""
    shifts = torch.arange(bits - 1, -1, -1, device=codes.device)
    return ((codes.unsqueeze(-1) >> shifts) & 1).float() * 2 - 1


def _entropy(p: Tensor) -> Tensor:
    # the clamp keeps 0 log 0 = 0 with a finite gradient (the sharp default temperature underflows)
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


class LFQuantizer(QuantizerBase):
    """Lookup-free quantization over ``log2(codebook_size)`` lookup dimensions, with the MAGVIT-2
    entropy loss (module docstring)."""

    def __init__(self, in_dim: int, cfg):
        k = cfg.codebook_size
        bits = k.bit_length() - 1
        if k < 2 or 2 ** bits != k:
            raise ValueError(f"kind='lfq': codebook_size must be 2 ** bits (e.g. 2 ** 18 = 262144), got {k}")
        if cfg.lfq_temperature <= 0 or cfg.lfq_entropy_group_bits < 1:
            raise ValueError("kind='lfq' needs lfq_temperature > 0 and lfq_entropy_group_bits >= 1")
        super().__init__(in_dim, cfg, bits)
        self.bits = bits
        n = -(-bits // cfg.lfq_entropy_group_bits)
        self.groups = tuple(bits // n + (1 if i < bits % n else 0) for i in range(n))
        self.reset_parameters()

    def _weights(self, device: torch.device) -> Tensor:
        return 2 ** torch.arange(self.bits - 1, -1, -1, device=device)

    def entropies(self, ze: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean per-sample entropy, batch entropy)`` of ``p(c|z)`` for lookup-space ``ze [P, bits]``
        (fp32); in training the batch average is the global batch's."""
        t = self.config.lfq_temperature
        a = 4 * ze / t                              # logit of bit i being 1
        p = torch.sigmoid(a)
        per_sample = (p * F.softplus(-a) + (1 - p) * F.softplus(a)).sum(-1).mean()
        sums, start = [], 0
        for nb in self.groups:
            every_code = _signs(torch.arange(2 ** nb, device=ze.device), nb)
            probs = (2 * ze[:, start:start + nb] @ every_code.t() / t).softmax(-1)
            sums.append(probs.sum(0))
            start += nb
        total = torch.cat(sums)
        count = torch.tensor(float(ze.shape[0]), device=ze.device)
        if self.training and world_size() > 1:
            total = AllReduceSum.apply(total)       # one collective for every group
            dist.all_reduce(count)
        avg = (total / count).split([2 ** nb for nb in self.groups])
        return per_sample, sum(_entropy(g) for g in avg)

    def _quantize(self, ze: Tensor):
        cfg = self.config
        positive = ze.detach() > 0
        q = positive.float() * 2 - 1
        zq = q + (ze - ze.detach())                 # straight-through, forward value exactly q
        codes = (positive.long() * self._weights(ze.device)).sum(-1)
        per_sample, batch = self.entropies(ze)
        entropy = per_sample - cfg.lfq_diversity_gamma * batch
        losses = {"commitment": F.mse_loss(ze, q), "codebook": ze.new_zeros(()), "entropy": entropy,
                  "per_sample_entropy": per_sample, "batch_entropy": batch}
        loss = cfg.beta * losses["commitment"] + cfg.lfq_entropy_weight * entropy
        distances = (ze.detach() - q).pow(2).sum(-1)
        return zq, codes, loss, distances, losses, self._usage(codes)

    def _vectors(self, codes: Tensor) -> Tensor:
        return _signs(codes, self.bits)
