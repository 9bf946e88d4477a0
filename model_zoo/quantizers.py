"""Vector quantizers for discrete image tokenizers.

One module, ``VectorQuantizer``, implements the quantizers of the papers vqscale reproduces:

- VQ-VAE (van den Oord et al., 2017, "Neural Discrete Representation Learning"): nearest-code
  lookup, straight-through gradient estimator, codebook loss ``||sg(z_e) - e||^2`` and commitment
  loss ``beta * ||z_e - sg(e)||^2``.
- EMA codebook updates (van den Oord et al., 2017, appendix; Razavi et al., 2019, "Generating
  Diverse High-Fidelity Images with VQ-VAE-2"): the codebook is the running mean of the encoder
  outputs assigned to each code (EMA of cluster sizes and embedding sums, Laplace smoothing);
  only the commitment term remains in the loss.
- Factorized, l2-normalized codes (Yu et al., 2021, "Vector-quantized Image Modeling with Improved
  VQGAN", ViT-VQGAN): a linear projection in_dim -> dim (32) before the lookup and dim -> in_dim
  after it; inputs and codes are l2-normalized so the lookup is by cosine similarity.
- Gumbel-softmax quantization (Jang et al., 2017, "Categorical Reparameterization with
  Gumbel-Softmax"; Ramesh et al., 2021, DALL-E's dVAE): codes sampled with a relaxed one-hot at an
  annealed temperature, an optional KL to the uniform prior.
- Regularized VQ (Zhang et al., CVPR 2023, "Regularized Vector Quantization for Tokenized Image
  Synthesis"): prior distribution regularization, ``KL(p || uniform) = sum_n p_n log(N p_n)`` of
  the batch-averaged soft assignment ``p``, and stochastic mask regularization, a random fraction
  of positions quantized by Gumbel sampling (Gumbel-softmax relaxation backward) and the rest by
  argmax (softmax relaxation backward).

Dead codes (low EMA usage) are restarted from current encoder outputs. Under torch.distributed
every codebook statistic is all-reduced, and restarts are decided on rank 0 from all-gathered
candidates and broadcast, so every rank keeps a bit-identical codebook. A parameter codebook's
restarted rows are also queued (``pop_row_writes``, model_zoo.interfaces.RowWrite): a sharded
optimizer keeps its own fp32 copy and would undo the in-place write at its next step, so the
runtime that owns the optimizer writes them there too and resets their Adam moments
(pretrain/engine.py). Collectives run only in
training mode (where all ranks step in lockstep); eval forwards are local, so a single rank can
encode or decode on its own. Everything also runs without a process group.

The assignment distribution is ``p(k|z) = softmax(-||z_e - e_k||^2 / prior_temperature)`` in the
lookup space; it gives the Gumbel logits, Regularized VQ's sampling distribution and its prior KL.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .interfaces import QuantizerOutput, RowWrite

__all__ = ["QuantizerConfig", "VectorQuantizer", "prior_kl"]


@dataclass(frozen=True)
class QuantizerConfig:
    codebook_size: int = 8192
    dim: int = 32                  # lookup-space dimension; if factorized, in_dim -> dim -> in_dim linear projections
    factorized: bool = True        # False: no projections (dim must equal in_dim)
    l2_normalize: bool = True      # l2-normalize lookup-space inputs and codes (cosine-similarity lookup)
    beta: float = 0.25             # commitment weight
    ema: bool = False              # EMA codebook updates (decay) instead of a codebook loss
    decay: float = 0.99
    eps: float = 1e-5
    restart_dead: bool = True      # restart dead codes from current encoder outputs (EMA and non-EMA)
    dead_threshold: float = 1.0    # a code whose EMA usage count falls below this is dead
    restart_every: int = 1         # check for dead codes every N training steps
    data_init: bool = True         # at the first training step every code restarts from an encoder output
    kind: Literal["vq", "gumbel"] = "vq"
    tau_start: float = 1.0         # Gumbel temperature schedule: exponential anneal from start to end
    tau_end: float = 1 / 16
    tau_anneal_steps: int = 150_000
    kl_weight_gumbel: float = 0.0  # optional DALL-E KL to uniform for the gumbel kind (returned in losses)
    stochastic_mask_ratio: float = 0.0   # Regularized VQ: fraction of positions quantized by Gumbel sampling (0.4 in the paper)
    prior_kl: bool = False               # Regularized VQ: compute the prior-distribution KL term
    prior_temperature: float = 1.0       # softmax temperature of the soft assignments used for the KL


def _histogram(codes: Tensor, k: int) -> Tensor:
    """Counts per code as float (scatter_add rather than bincount: it also runs on meta)."""
    return torch.zeros(k, device=codes.device).scatter_add_(0, codes, torch.ones_like(codes, dtype=torch.float))


def prior_kl(avg_probs: Tensor) -> Tensor:
    """Regularized VQ's prior distribution term: ``KL(p || U) = sum_n p_n log(N p_n)`` over the
    last dimension (N codes). 0 when every code is equally likely, ``log N`` at total collapse."""
    p = avg_probs.float()
    n = p.shape[-1]
    # log(N p) rather than log p + log N: (1/N) * N rounds to exactly 1, so uniform gives exactly 0;
    # the clamp keeps 0 * log 0 = 0 with a finite gradient.
    return (p * torch.log((p * n).clamp_min(1e-30))).sum(-1)


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradient over ranks too (d sum_r x_r / d x_r is the
    identity, but every rank's loss depends on every x_r). Our own blocking collective rather
    than torch.distributed.nn's: that one is deprecated and its functional-collective machinery
    aborted a gloo process at exit ("terminate called without an active exception") in CI."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        g = grad.clone()
        dist.all_reduce(g)
        return g


# Buffers that hold running statistics: kept in fp32 whatever dtype the module is cast to
# (DeepSpeed's bf16 mode calls module.bfloat16(); an EMA with decay 0.99 stalls at bf16 precision).
_FP32_BUFFERS = ("embed", "embed_avg", "cluster_size")


class VectorQuantizer(nn.Module):
    """``forward(z[..., in_dim]) -> QuantizerOutput``; ``lookup(codes) -> [..., in_dim]``.

    Buffers (all in the state_dict): ``cluster_size`` (EMA of per-code assignment counts, also the
    usage counter for dead-code detection without EMA updates), ``embed_avg`` (EMA of embedding
    sums, EMA only), ``steps`` (training forwards seen, for ``restart_every``). With ``ema`` the
    codebook ``embed`` is a buffer, otherwise a parameter; the state_dict key is ``embed`` in both.

    ``loss`` = codebook + beta * commitment (vq kind; no codebook term with EMA), or
    ``kl_weight_gumbel * gumbel_kl`` (gumbel kind). ``losses["prior_kl"]`` is unweighted and NOT in
    ``loss``: the tokenizer owns its weight. Losses are mean squared errors over elements.
    """

    def __init__(self, in_dim: int, cfg: QuantizerConfig):
        super().__init__()
        if cfg.kind not in ("vq", "gumbel"):
            raise ValueError(f"kind must be 'vq' or 'gumbel', got {cfg.kind!r}")
        if not cfg.factorized and cfg.dim != in_dim:
            raise ValueError(f"factorized=False needs dim == in_dim, got {cfg.dim} != {in_dim}")
        if not 0.0 <= cfg.stochastic_mask_ratio <= 1.0:
            raise ValueError("stochastic_mask_ratio must be in [0, 1]")
        if cfg.restart_every < 1:
            raise ValueError("restart_every must be >= 1")
        self.cfg, self.in_dim = cfg, in_dim
        k, d = cfg.codebook_size, cfg.dim
        self.proj_in = nn.Linear(in_dim, d) if cfg.factorized else nn.Identity()
        self.proj_out = nn.Linear(d, in_dim) if cfg.factorized else nn.Identity()
        embed = torch.empty(k, d)
        if cfg.ema:
            self.register_buffer("embed", embed)
            self.register_buffer("embed_avg", torch.empty(k, d))
        else:
            self.embed = nn.Parameter(embed)
        self.register_buffer("cluster_size", torch.empty(k))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # Fresh and restarted codes start with this usage count, twice the dead threshold, so a code
        # that is never chosen is declared dead after ln(2) / (1 - decay) steps (~69 at 0.99): a grace
        # period instead of restarting the whole codebook at step 0. With the EMA, embed_avg starts at
        # embed * count so embed_avg / cluster_size is the code itself and unused codes do not drift.
        self._init_count = max(2.0 * cfg.dead_threshold, 1.0)
        self._step = 0          # set_step(): the trainer's global step, for the temperature schedule
        self._row_write: RowWrite | None = None   # restarts of a parameter codebook, for the optimizer's owner
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise codebook and statistics (no data-dependent ops: works on the meta device, and
        after ``to_empty()`` materialises a meta-built model)."""
        cfg, k = self.cfg, self.cfg.codebook_size
        if cfg.l2_normalize:    # random directions on the unit sphere
            self.embed.normal_()
            self.embed.copy_(F.normalize(self.embed, dim=-1))
        else:                   # small uniform, as in taming-transformers' VQGAN
            self.embed.uniform_(-1.0 / k, 1.0 / k)
        self.cluster_size.fill_(self._init_count)
        if cfg.ema:
            self.embed_avg.copy_(self.embed * self._init_count)
        self.steps.zero_()
        for m in (self.proj_in, self.proj_out):
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def _apply(self, fn, recurse=True):
        # Keep the statistics buffers in fp32 (with their original values, not a bf16 round trip)
        # when the module is cast; device moves still apply.
        before = {n: self._buffers.get(n) for n in _FP32_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers.get(name)
            if old is not None and new is not None and new.dtype != old.dtype and old.dtype == torch.float32:
                self._buffers[name] = old.to(new.device)
        return self

    # ---- schedule -----------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    def set_step(self, step: int) -> None:
        self._step = int(step)

    @property
    def tau(self) -> float:
        """Gumbel temperature: exponential anneal ``start * (end/start)^(step/T)``, then ``end``."""
        cfg = self.cfg
        if cfg.tau_anneal_steps <= 0:
            return cfg.tau_end
        frac = min(max(self._step, 0) / cfg.tau_anneal_steps, 1.0)
        return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** frac

    # ---- lookup -------------------------------------------------------------------------------
    def codebook(self) -> Tensor:
        """The lookup-space codebook ``[K, dim]`` in fp32, l2-normalized if configured.

        Always a copy: the graph of this step then never holds the ``embed`` storage itself, so the
        in-place EMA update and dead-code restart after the forward cannot invalidate backward."""
        e = self.embed.to(torch.float32, copy=True)
        return F.normalize(e, dim=-1) if self.cfg.l2_normalize else e

    def _project_out(self, zq: Tensor) -> Tensor:
        if isinstance(self.proj_out, nn.Linear):
            return self.proj_out(zq.to(self.proj_out.weight.dtype))
        return zq

    def lookup(self, codes: Tensor) -> Tensor:
        """Code indices ``[...]`` -> ``[..., in_dim]``: what ``decode`` feeds the decoder."""
        return self._project_out(F.embedding(codes, self.codebook()))

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, z: Tensor) -> QuantizerOutput:
        cfg = self.cfg
        lead = z.shape[:-1]
        ze = self.proj_in(z.reshape(-1, self.in_dim))
        # Distances, softmaxes and statistics in fp32 even under bf16 autocast: bf16's 8-bit mantissa
        # cannot separate neighbouring codes (2 - 2cos differs in the 3rd digit) or accumulate EMAs.
        # (autocast has no meta backend: a full-size model is traced on meta without it)
        no_autocast = (torch.autocast(z.device.type, enabled=False) if z.device.type != "meta"
                       else contextlib.nullcontext())
        with no_autocast:
            zq, codes, loss, dist_, losses, stats = self._quantize(ze.float())
        z_q = self._project_out(zq).to(z.dtype).reshape(z.shape)
        return QuantizerOutput(z_q=z_q, codes=codes.reshape(lead), loss=loss,
                               distances=dist_.reshape(lead), losses=losses, stats=stats)

    def _quantize(self, ze: Tensor):
        cfg, k = self.cfg, self.cfg.codebook_size
        train = self.training
        if cfg.l2_normalize:
            ze = F.normalize(ze, dim=-1)
        E = self.codebook()
        relax = train and (cfg.kind == "gumbel" or cfg.stochastic_mask_ratio > 0)
        need_logits = relax or cfg.prior_kl or (cfg.kind == "gumbel" and cfg.kl_weight_gumbel > 0)
        # The full [P, K] distance matrix carries gradient only when a soft assignment is used.
        with torch.set_grad_enabled(torch.is_grad_enabled() and need_logits):
            d = (ze.pow(2).sum(-1, keepdim=True) + E.pow(2).sum(-1)
                 - 2.0 * ze @ E.t()).clamp_min_(0.0)
        nearest = d.detach().argmin(-1)
        logits = -d / cfg.prior_temperature if need_logits else None
        probs = logits.softmax(-1) if need_logits else None
        grad = torch.is_grad_enabled()

        if relax and cfg.kind == "gumbel":
            # Hard one-hot forward, Gumbel-softmax gradient (straight-through Gumbel-softmax).
            y = F.gumbel_softmax(logits, tau=self.tau, hard=True)
            codes = y.detach().argmax(-1)
            zq = y @ E
        elif relax:
            # Regularized VQ stochastic mask: exactly round(ratio * P) random positions take a code
            # SAMPLED from p(k|z) (Gumbel-max), the rest the argmax. Forward value is the hard code;
            # backward goes through the relaxation: Gumbel-softmax(tau) rows at sampled positions,
            # the plain softmax at argmax positions: z_q = hard + soft - sg(soft), soft = probs @ E.
            n = ze.shape[0]
            picked = torch.randperm(n, device=ze.device)[: int(round(cfg.stochastic_mask_ratio * n))]
            g = -torch.empty(picked.numel(), k, device=ze.device).exponential_().log()   # Gumbel(0,1)
            noisy = logits.index_select(0, picked) + g
            codes = nearest.index_copy(0, picked, noisy.detach().argmax(-1))
            soft_p = probs.index_copy(0, picked, (noisy / self.tau).softmax(-1))
            soft = soft_p @ E
            zq = E.detach().index_select(0, codes) + (soft - soft.detach())
        else:
            codes = nearest
            e = E.index_select(0, codes)
            # Straight-through: forward value e, gradient identity to z_e (in the lookup space).
            zq = ze + (e - ze).detach() if grad else e

        e_sel = E.index_select(0, codes)
        zero = ze.new_zeros(())
        losses: dict[str, Tensor] = {}
        if cfg.kind == "vq":
            losses["commitment"] = F.mse_loss(ze, e_sel.detach())
            losses["codebook"] = zero if cfg.ema else F.mse_loss(ze.detach(), e_sel)
            loss = losses["codebook"] + cfg.beta * losses["commitment"]
        else:  # gradients reach the codebook through the relaxed one-hot, no auxiliary VQ losses
            losses["commitment"], losses["codebook"] = zero, zero
            loss = zero
            if cfg.kl_weight_gumbel > 0:    # DALL-E: KL(q(k|z) || uniform), mean over positions
                losses["gumbel_kl"] = prior_kl(probs).mean()
                loss = loss + cfg.kl_weight_gumbel * losses["gumbel_kl"]
        if cfg.prior_kl:
            # p_n: soft assignments averaged over every position of the global batch. The
            # autograd all-reduce sums the backward too, so after the data-parallel gradient mean
            # each rank's gradient is the global objective's.
            tot = probs.sum(0)
            cnt = torch.tensor(float(probs.shape[0]), device=ze.device)
            if train and _world_size() > 1:
                tot = _AllReduceSum.apply(tot)
                dist.all_reduce(cnt)
            losses["prior_kl"] = prior_kl(tot / cnt)
        distances = (ze.detach() - e_sel.detach()).pow(2).sum(-1)
        stats = self._statistics(codes, ze.detach()) if train else self._stats(
            _histogram(codes, k))
        return zq, codes, loss, distances, losses, stats

    def pop_row_writes(self) -> list[RowWrite]:
        """Restarted rows of a parameter codebook since the last call (see model_zoo.interfaces)."""
        w, self._row_write = self._row_write, None
        return [w] if w is not None else []

    # ---- statistics, EMA, restarts ------------------------------------------------------------
    def _stats(self, counts: Tensor) -> dict[str, Tensor]:
        p = counts / counts.sum().clamp_min(1.0)
        entropy = -(p * p.clamp_min(1e-30).log()).sum()
        return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp(),
                "dead_codes": (self.cluster_size < self.cfg.dead_threshold).sum().float()}

    @torch.no_grad()
    def _statistics(self, codes: Tensor, ze: Tensor) -> dict[str, Tensor]:
        """Training step: all-reduce the batch statistics, update the EMAs, restart dead codes."""
        cfg, k = self.cfg, self.cfg.codebook_size
        world = _world_size()
        counts = _histogram(codes, k)
        if cfg.ema:
            sums = torch.zeros(k, ze.shape[1], device=ze.device).index_add_(0, codes, ze)
            flat = torch.cat([counts, sums.flatten()])      # one collective for both
            if world > 1:
                dist.all_reduce(flat)
            counts, sums = flat[:k], flat[k:].view(k, -1)
        elif world > 1:
            dist.all_reduce(counts)
        decay = cfg.decay
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        if cfg.ema:
            self.embed_avg.mul_(decay).add_(sums, alpha=1 - decay)
            n = self.cluster_size.sum()
            # Laplace smoothing: no division by ~0 for codes that were never assigned.
            smoothed = (self.cluster_size + cfg.eps) / (n + k * cfg.eps) * n
            self.embed.copy_(self.embed_avg / smoothed.unsqueeze(1))
        self.steps.add_(1)
        restarted = torch.zeros((), device=ze.device)
        check = cfg.restart_dead and (cfg.restart_every == 1 or int(self.steps) % cfg.restart_every == 0)
        if check or (cfg.data_init and int(self.steps) == 1):
            restarted = self._restart(ze, world)
        stats = self._stats(counts)
        stats["restarted"] = restarted
        return stats

    def _restart(self, ze: Tensor, world: int) -> Tensor:
        """Re-initialise dead codes from current lookup-space encoder outputs.

        Fixed-size collectives, no host synchronisation, identical on every rank: each rank
        contributes ceil(K / world) random rows of its batch, all-gathered and interleaved (code j
        takes a candidate from rank j % world); the dead set is decided on rank 0 and broadcast."""
        cfg, k = self.cfg, self.cfg.codebook_size
        dead = self.cluster_size < cfg.dead_threshold if cfg.restart_dead else torch.zeros_like(self.cluster_size,
                                                                                                dtype=torch.bool)
        if cfg.data_init:
            # The first training step (steps was just incremented to 1) restarts every code: random
            # codes on the sphere sit far from the concentrated outputs of a fresh encoder, so one or
            # two of them win every position and the rest never get a gradient (the demo's
            # tokenizer used 6 of 64 codes at step 1 and never recovered within its grace period).
            dead = dead | (self.steps == 1)
        dead = dead.float()
        m = -(-k // world)
        n = ze.shape[0]
        idx = (torch.randperm(n, device=ze.device)[:m] if n >= m
               else torch.randint(n, (m,), device=ze.device))
        cand = ze.index_select(0, idx).contiguous()
        if world > 1:
            pool = [torch.empty_like(cand) for _ in range(world)]
            dist.all_gather(pool, cand)
            cand = torch.stack(pool, 1).reshape(world * m, -1)   # row j comes from rank j % world
            dist.broadcast(dead, src=0)   # rank 0 is the single source of truth for the decision
        new, mask = cand[:k], dead.bool()
        # Revived codes get the fresh-code usage count (grace period) and, with EMA, a consistent
        # embed_avg so the next EMA step keeps them where they were put.
        self.embed.copy_(torch.where(mask[:, None], new.to(self.embed.dtype), self.embed))
        if isinstance(self.embed, nn.Parameter):
            # A sharded optimizer (ZeRO's fp32 master copy) would undo the in-place write at its next
            # step: queue it for the optimizer's owner too (no host sync: the mask stays a tensor,
            # possibly all False). Restarts of several micro-batches before one step merge.
            values = new.to(self.embed.dtype)
            if self._row_write is not None:
                old = self._row_write
                values = torch.where(mask[:, None], values, old.values)
                mask = mask | old.mask
            self._row_write = RowWrite(self.embed, mask, values)
        self.cluster_size.masked_fill_(mask, self._init_count)
        if cfg.ema:
            self.embed_avg.copy_(torch.where(mask[:, None], new * self._init_count, self.embed_avg))
        return dead.sum()
