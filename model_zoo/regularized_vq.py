"""Regularized VQ, the quantization side: Zhang, Zhan, Theobalt & Lu, "Regularized Vector
Quantization for Tokenized Image Synthesis", CVPR 2023 (arXiv:2303.06424). ``VectorQuantizer``
(model_zoo/quantizers.py) calls :func:`regularized_quantize` when its config sets ``prior_kl`` or
``stochastic_mask_ratio``; the probabilistic contrastive loss (eq. 3) is in model_zoo/losses.py.

- Prior distribution regularization (sec. 3.1, eq. 1): ``KL(P_post || U) = sum_n p_n log(N p_n)``
  with ``P_post`` the average of the positions' one-hot assignments, i.e. the distribution of the
  codes actually used, over the global batch (an autograd all-reduce across ranks). Its gradient
  path is the straight-through one-hot of the assignment: forward the hard one-hot, backward the
  relaxation the paper's Algorithm 1 uses for that position (softmax where the argmax was taken,
  Gumbel-softmax where a code was sampled).
- Stochastic mask regularization (sec. 3.2, Algorithm 1): exactly ``round(ratio * P)`` random
  positions of the batch take a code sampled from ``p(k | z)`` (Gumbel-max; 40% in the paper),
  the others the argmax. ``z_q`` is the hard code forward. Backward, the sampled positions go
  through the Gumbel-softmax relaxation as in Algorithm 1 (to the logits: the encoder output and
  the codebook). The argmax positions take VQGAN's straight-through estimator instead of
  Algorithm 1's softmax: they are plain VQ in the forward, the softmax of a peaked ``p(k | z)``
  hands the encoder almost no gradient, and its sharp logits' Jacobian (~1/T) pushes encoder
  outputs off their codes (a tiny VQGAN on digits reconstructed 0.6 dB worse with it than with
  straight-through). The softmax still relaxes those positions' one-hots in the prior KL.
- The commitment and codebook losses are taken against the best-matching code only: against a
  sampled code they would pull ``z_e`` and the codebook toward random codes (every code toward
  the data centroid). The distance ``||z_s - z_q||^2`` between the sampled and the best-matching
  code (0 where the argmax was taken) is returned per position: it weights eq. (3).

Logits. The paper has the encoder predict a token distribution per position; here it is
``p(k | z) = softmax(-||z_e - e_k||^2 / (T s))``, the squared distances in units of the codebook's
spread ``s`` (the mean squared distance between two codes, held constant in backward) at a fixed
temperature ``T = prior_temperature``. Why distances rather than a logit head over the codes: the
best-matching code is then the nearest one, so the argmax positions are exactly VQGAN's, and the
encoder sharpens ``p(k | z)`` by committing to its code (the commitment loss pulls ``z_e`` onto
it, which raises that logit against every other). Why the spread: raw squared distances have no
scale of their own (taming's +-1/K init left a logit span of ~0.02 at temperature 1: sampling was
uniform, the failure this module replaces), while ``d / s`` is invariant to the scale of the
encoder and the codebook, and on an l2-normalized codebook spread over the sphere ``s = 2``, so
one ``T`` means one sharpness everywhere. ``T = 0.1`` makes a code at the spread's distance 10
nats less likely than one the encoder output sits on: peaked, not one-hot (in the training run of
tests/test_regvq.py 52-54% of the sampled positions draw another code than their best match).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .quantizer_base import AllReduceSum, world_size

__all__ = ["prior_kl", "stochastic_mask", "Assignment", "assign", "usage_kl", "code_logits", "regularized_quantize"]


def prior_kl(avg_probs: Tensor, floor: float | Tensor = 1e-30) -> Tensor:
    """eq. (1): ``KL(p || U) = sum_n p_n log(N p_n)`` over the last dimension (N codes). 0 when
    every code is equally likely, ``log N`` at total collapse. ``p_n`` is floored at ``floor``
    inside the log only: ``0 * log 0 = 0`` with a finite gradient."""
    p = avg_probs.float()
    n = p.shape[-1]
    # log(N p) rather than log p + log N: (1/N) * N rounds to exactly 1, so uniform gives exactly 0
    return (p * torch.log(n * torch.clamp_min(p, floor))).sum(-1)


def stochastic_mask(n: int, ratio: float, device: torch.device | str = "cpu",
                    generator: torch.Generator | None = None) -> Tensor:
    """Bool ``[n]`` with exactly ``round(ratio * n)`` True (the positions to sample), uniformly
    placed: a fixed count rather than Bernoulli draws, so the sampled share is the ratio itself."""
    on = generator.device if generator is not None else torch.device(device)
    picked = torch.randperm(n, generator=generator, device=on)[: int(round(ratio * n))]
    return torch.zeros(n, dtype=torch.bool, device=on).index_fill_(0, picked, True).to(device)


@dataclass
class Assignment:
    codes: Tensor      # long [P]: the code each position takes (sampled or argmax)
    best: Tensor       # long [P]: the best-matching code (argmax of the logits)
    onehot: Tensor     # [P, K]: hard one-hot forward, softmax / Gumbel-softmax backward
    sampled: Tensor    # bool [P]: positions whose code was sampled


def assign(logits: Tensor, ratio: float, tau: float = 1.0, generator: torch.Generator | None = None) -> Assignment:
    """Algorithm 1 on logits ``[P, K]``: the argmax everywhere, except ``round(ratio * P)`` random
    positions that take ``argmax(logits + g)``, ``g ~ Gumbel(0, 1)`` (a sample of softmax(logits)).
    The one-hot's backward is ``softmax(logits)`` at argmax positions and
    ``softmax((logits + g) / tau)`` at sampled ones."""
    best = logits.detach().argmax(-1)
    sampled = stochastic_mask(logits.shape[0], ratio, logits.device, generator)
    codes, soft = best, logits.softmax(-1)
    if round(ratio * logits.shape[0]) > 0:   # (a host-side count: no device sync)
        on = generator.device if generator is not None else logits.device
        u = torch.rand(logits.shape, generator=generator, device=on).to(logits.device)
        noisy = logits - torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))    # + Gumbel(0, 1)
        codes = torch.where(sampled, noisy.detach().argmax(-1), best)
        soft = torch.where(sampled[:, None], (noisy / tau).softmax(-1), soft)
    hard = F.one_hot(codes, logits.shape[-1]).to(soft.dtype)
    return Assignment(codes, best, hard + soft - soft.detach(), sampled)


def usage_kl(onehot: Tensor, global_batch: bool = True) -> Tensor:
    """eq. (1) on the average of the one-hot assignments ``[P, K]``: over every rank's positions
    when ``global_batch`` and a process group is up (the autograd all-reduce sums the backward
    too, so after the data-parallel gradient mean each rank has the global objective's gradient).

    ``d KL / d p_n = log(N p_n) + 1`` is -inf at an unused code, where a batch of P positions has no
    resolution finer than 1/P anyway: the log takes ``p_n >= 1/P``, the gradient an unused code
    would have if it had been used once. The value is exact (an unused code adds ``0 * log``)."""
    tot = onehot.sum(0)
    cnt = torch.tensor(float(onehot.shape[0]), device=onehot.device)
    if global_batch and world_size() > 1:
        tot = AllReduceSum.apply(tot)
        dist.all_reduce(cnt)
    return prior_kl(tot / cnt, floor=1.0 / cnt)


def code_logits(ze: Tensor, E: Tensor, temperature: float) -> Tensor:
    """``log p(k | z)`` up to a constant, ``[P, K]``: ``-||z_e - e_k||^2 / (temperature * s)`` with
    ``s`` the mean squared distance between two codes (module docstring; no gradient through it)."""
    d = (ze.pow(2).sum(-1, keepdim=True) + E.pow(2).sum(-1) - 2.0 * ze @ E.t()).clamp_min(0.0)
    spread = 2.0 * (E.detach() - E.detach().mean(0)).pow(2).sum(-1).mean()
    return -d / (temperature * spread.clamp_min(1e-12))


def regularized_quantize(ze: Tensor, E: Tensor, cfg, tau: float, training: bool):
    """Quantize lookup-space inputs ``ze [P, dim]`` with the codebook ``E [K, dim]``. Returns
    ``(z_q, codes, loss, losses, sample_distances)``: ``loss`` = codebook + beta * commitment
    against the best-matching code, ``losses["prior_kl"]`` (if ``cfg.prior_kl``; unweighted, not in
    ``loss``), ``sample_distances [P]`` = ``||z_s - z_q||^2``."""
    logits = code_logits(ze, E, cfg.prior_temperature)
    a = assign(logits, cfg.stochastic_mask_ratio if training else 0.0, tau)
    e_best = E.index_select(0, a.best)
    zq = E.detach().index_select(0, a.codes)
    if training:
        # Sampled positions: the Gumbel-softmax relaxation (Algorithm 1), to the logits: z_e and the
        # codebook. Argmax positions: VQGAN's straight-through to z_e, what they are in the forward.
        soft = (a.onehot - a.onehot.detach()) @ E
        zq = zq + torch.where(a.sampled[:, None], soft, ze - ze.detach())
    losses = {"commitment": F.mse_loss(ze, e_best.detach()),
              "codebook": ze.new_zeros(()) if cfg.ema else F.mse_loss(ze.detach(), e_best)}
    loss = losses["codebook"] + cfg.beta * losses["commitment"]
    if cfg.prior_kl:
        losses["prior_kl"] = usage_kl(a.onehot, global_batch=training)
    sample_distances = (E.index_select(0, a.codes) - e_best).detach().pow(2).sum(-1)
    return zq, a.codes, loss, losses, sample_distances
