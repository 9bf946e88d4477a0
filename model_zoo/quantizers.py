"""Vector quantizers for discrete image tokenizers, the typed ``QuantizerConfig`` of every
quantizer, and ``build_quantizer(in_dim, cfg)``, the factory the tokenizers call: ``kind`` "vq" and
"gumbel" build a ``VectorQuantizer`` (here), "fsq" and "lfq" the codebook-free quantizers of
model_zoo/scalar_quantizers.py (FSQ, Mentzer et al. 2023; LFQ with the MAGVIT-2 entropy loss, Yu et
al. 2023). What all of them share (projections, fp32 quantization, usage statistics, the autograd
all-reduce) is in model_zoo/quantizer_base.py.

``VectorQuantizer`` implements the codebook quantizers of the papers vqscale reproduces:

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
  Synthesis", arXiv:2303.06424), ``prior_kl`` / ``stochastic_mask_ratio`` (vq kind):
  model_zoo/regularized_vq.py, called from ``_quantize``: the prior KL of the codes actually used,
  40% of the positions sampled, VQ losses against the best-matching code only.
- SimVQ (Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized Models with One
  Linear Layer", arXiv:2411.02038), ``simvq=True``: the codebook is ``C W^T``, ``C`` a frozen
  random ``[K, dim]`` buffer (N(0, 1/dim), from a fixed seed so every rank has the same) and ``W``
  one learnable ``[dim, dim]`` map. The codebook loss ``||sg(z_e) - e||^2`` trains ``W``, which
  moves every code at once, so codes that are never selected still follow the encoder and the
  codebook does not collapse. Restarts and ``data_init`` are off (no rows of its own to rewrite).
- The rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation
  Trick", arXiv:2410.06424), ``rotation_trick=True`` (vq kind): instead of copying the gradient
  straight through, ``z_q`` is ``z_e`` rotated onto its code and rescaled, with rotation and scale
  held constant, so the gradient reaching ``z_e`` is the decoder's gradient rotated the same way:
  its angle to ``z_e`` is the one it had to the code (:func:`rotate_to`).

Dead codes (low EMA usage) are restarted from current encoder outputs. Under torch.distributed
every codebook statistic is all-reduced, and restarts are decided on rank 0 from all-gathered
candidates and broadcast, so every rank keeps a bit-identical codebook. A parameter codebook's
restarted rows are also queued (``pop_row_writes``, model_zoo.interfaces.RowWrite): a sharded
optimizer keeps its own fp32 copy and would undo the in-place write at its next step, so the
runtime that owns the optimizer writes them there too and resets their Adam moments
(pretrain/runtime.py). Collectives run only in
training mode (where all ranks step in lockstep); eval forwards are local, so a single rank can
encode or decode on its own. Everything also runs without a process group.

The Gumbel kind's assignment distribution is ``p(k|z) = softmax(-||z_e - e_k||^2 /
prior_temperature)`` in the lookup space (Regularized VQ's: model_zoo/regularized_vq.py).
"""

from __future__ import annotations

import dataclasses
import math

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .interfaces import RowWrite
from .quantizer_base import QuantizerBase, no_autocast
from .quantizer_base import histogram as _histogram
from .quantizer_base import world_size as _world_size
from .regularized_vq import prior_kl, regularized_quantize, usage_kl
from .scalar_quantizers import FSQuantizer, LFQuantizer

__all__ = ["QuantizerConfig", "VectorQuantizer", "build_quantizer", "prior_kl", "rotate_to"]


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
    kind: Literal["vq", "gumbel", "fsq", "lfq"] = "vq"
    # Codebooks that reach full use (module docstring). SimVQ and the rotation trick change the vq
    # kind; fsq and lfq have no codebook (lookup dim len(fsq_levels) or log2(codebook_size), not dim).
    simvq: bool = False            # codebook = frozen random buffer @ one learnable dim x dim map
    rotation_trick: bool = False   # vq kind: gradient through the rotation + rescale taking z_e to its code
    fsq_levels: tuple[int, ...] = ()     # kind "fsq": levels per dimension; codebook_size == prod(levels)
    lfq_entropy_weight: float = 0.1      # kind "lfq": weight of per-sample entropy - gamma * batch entropy
    lfq_diversity_gamma: float = 1.0     # weight of the batch entropy inside that term
    lfq_temperature: float = 0.01        # softmax temperature of the code distribution of the entropies
    lfq_entropy_group_bits: int = 9      # batch entropy exact up to this many bits, else over groups of bits
    tau_start: float = 1.0         # Gumbel temperature schedule: exponential anneal from start to end
    tau_end: float = 1 / 16
    tau_anneal_steps: int = 150_000
    kl_weight_gumbel: float = 0.0  # optional DALL-E KL to uniform for the gumbel kind (returned in losses)
    stochastic_mask_ratio: float = 0.0   # Regularized VQ: fraction of positions quantized by Gumbel sampling (0.4 in the paper)
    prior_kl: bool = False               # Regularized VQ: compute the prior-distribution KL term (eq. 1)
    # Regularized VQ: p(k|z) = softmax(-||z_e - e_k||^2 / (prior_temperature * codebook spread)),
    # its sampling distribution (model_zoo/regularized_vq.py); the gumbel kind's logits are
    # -||z_e - e_k||^2 / prior_temperature
    prior_temperature: float = 1.0

    def __post_init__(self):
        # JSON and --set overrides give lists; a frozen config must stay hashable and compare equal
        object.__setattr__(self, "fsq_levels", tuple(int(v) for v in self.fsq_levels))


def rotate_to(z: Tensor, q: Tensor, eps: float = 1e-12) -> Tensor:
    """The rotation trick (Fifty et al. 2024, sec. 4.2): forward value ``q``; backward
    ``dL/dz = lam * R^T dL/dq`` with ``lam = ||q|| / ||z||`` and ``R`` the rotation in the plane of
    ``z`` and ``q`` taking ``z/||z||`` to ``q/||q||`` (both held constant). With ``u = z/||z||``,
    ``h = q/||q||``, ``w = (u + h)/||u + h||``: ``R = I - 2 w w^T + 2 h u^T``, applied to the
    vectors directly (no ``[P, dim, dim]`` matrices). ``u = -h`` leaves ``w = 0``, still exact."""
    zn = z.detach().norm(dim=-1, keepdim=True).clamp_min(eps)
    qn = q.detach().norm(dim=-1, keepdim=True)
    u, h = z.detach() / zn, q.detach() / qn.clamp_min(eps)
    w = F.normalize(u + h, dim=-1)
    rotated = (z - 2 * (z * w).sum(-1, keepdim=True) * w + 2 * (z * u).sum(-1, keepdim=True) * h) * (qn / zn)
    # rotated equals q up to rounding; the forward value is q exactly, as with straight-through
    return rotated + (q.detach() - rotated).detach()


_SIMVQ_SEED = 20241104   # the frozen SimVQ codebook's generator seed (identical on every rank and rebuild)


class VectorQuantizer(QuantizerBase):
    """``forward(z[..., in_dim]) -> QuantizerOutput``; ``lookup(codes) -> [..., in_dim]``.

    Buffers (all in the state_dict): ``cluster_size`` (EMA of per-code assignment counts, also the
    usage counter for dead-code detection without EMA updates), ``embed_avg`` (EMA of embedding
    sums, EMA only), ``steps`` (training forwards seen, for ``restart_every``). With ``ema`` the
    codebook ``embed`` is a buffer, otherwise a parameter; the state_dict key is ``embed`` in both.
    With ``simvq`` ``embed`` is the frozen random buffer and ``embed_proj`` ([dim, dim]) the
    learnable map: the codebook is ``embed @ embed_proj.T``.

    ``loss`` = codebook + beta * commitment (vq kind; no codebook term with EMA), or
    ``kl_weight_gumbel * gumbel_kl`` (gumbel kind). ``losses["prior_kl"]`` is unweighted and NOT in
    ``loss``: the tokenizer owns its weight. Losses are mean squared errors over elements.
    """

    def __init__(self, in_dim: int, cfg: QuantizerConfig):
        if cfg.kind not in ("vq", "gumbel"):
            raise ValueError(f"VectorQuantizer takes kind 'vq' or 'gumbel', got {cfg.kind!r} "
                             "(build_quantizer builds every kind)")
        if not 0.0 <= cfg.stochastic_mask_ratio <= 1.0:
            raise ValueError("stochastic_mask_ratio must be in [0, 1]")
        if cfg.restart_every < 1:
            raise ValueError("restart_every must be >= 1")
        if cfg.simvq and cfg.ema:
            raise ValueError("simvq=True trains its codebook through the linear map: it needs ema=False")
        if cfg.rotation_trick and (cfg.kind != "vq" or cfg.stochastic_mask_ratio > 0):
            raise ValueError("rotation_trick replaces the straight-through estimator of the vq kind's argmax; "
                             "it needs kind='vq' and stochastic_mask_ratio=0")
        if cfg.simvq:
            # C W has no rows of its own to restart or to place on encoder outputs, and every code
            # moves with W, which is what keeps codes alive (the paper's point): both are off.
            cfg = dataclasses.replace(cfg, restart_dead=False, data_init=False)
        super().__init__(in_dim, cfg, cfg.dim)
        k, d = cfg.codebook_size, cfg.dim
        embed = torch.empty(k, d)
        if cfg.ema or cfg.simvq:
            self.register_buffer("embed", embed)
        else:
            self.embed = nn.Parameter(embed)
        if cfg.ema:
            self.register_buffer("embed_avg", torch.empty(k, d))
        if cfg.simvq:
            self.embed_proj = nn.Parameter(torch.empty(d, d))
        self._row_write: RowWrite | None = None   # restarts of a parameter codebook, for the optimizer's owner
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise codebook and statistics (no data-dependent ops: works on the meta device, and
        after ``to_empty()`` materialises a meta-built model)."""
        super().reset_parameters()
        cfg, k = self.config, self.config.codebook_size
        if cfg.simvq:
            # The official SimVQ init, N(0, 1/dim), from a fixed seed: DeepSpeed broadcasts parameters
            # only, not buffers, and the trainer seeds each rank differently, so a frozen codebook drawn
            # from the global RNG would differ between ranks.
            g = torch.Generator().manual_seed(_SIMVQ_SEED)
            self.embed.copy_(torch.randn(k, cfg.dim, generator=g) * cfg.dim ** -0.5)
            nn.init.kaiming_uniform_(self.embed_proj, a=math.sqrt(5))   # nn.Linear's init
        elif cfg.l2_normalize:  # random directions on the unit sphere
            self.embed.normal_()
            self.embed.copy_(F.normalize(self.embed, dim=-1))
        else:                   # small uniform, as in taming-transformers' VQGAN
            self.embed.uniform_(-1.0 / k, 1.0 / k)
        if cfg.ema:   # embed_avg / cluster_size is then the code itself: unused codes do not drift
            self.embed_avg.copy_(self.embed * self._init_count)

    # ---- schedule -----------------------------------------------------------------------------
    @property
    def tau(self) -> float:
        """Gumbel temperature: exponential anneal ``start * (end/start)^(step/T)``, then ``end``."""
        cfg = self.config
        if cfg.tau_anneal_steps <= 0:
            return cfg.tau_end
        frac = min(max(self._step, 0) / cfg.tau_anneal_steps, 1.0)
        return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** frac

    # ---- lookup -------------------------------------------------------------------------------
    def codebook(self) -> Tensor:
        """The lookup-space codebook ``[K, dim]`` in fp32, l2-normalized if configured.

        Always a copy: the graph of this step then never holds the ``embed`` storage itself, so the
        in-place EMA update and dead-code restart after the forward cannot invalidate backward."""
        if self.config.simvq:
            with no_autocast(self.embed.device):
                e = self.embed.float() @ self.embed_proj.float().t()
        else:
            e = self.embed.to(torch.float32, copy=True)
        return F.normalize(e, dim=-1) if self.config.l2_normalize else e

    def _vectors(self, codes: Tensor) -> Tensor:
        return F.embedding(codes, self.codebook())

    # ---- forward ------------------------------------------------------------------------------
    def _quantize(self, ze: Tensor):
        cfg, k = self.config, self.config.codebook_size
        train = self.training
        if cfg.l2_normalize:
            ze = F.normalize(ze, dim=-1)
        E = self.codebook()
        if cfg.kind == "vq" and (cfg.prior_kl or cfg.stochastic_mask_ratio > 0):
            zq, codes, loss, losses, sample_distances = regularized_quantize(ze, E, cfg, self.tau, train)
            distances = (ze.detach() - E.detach().index_select(0, codes)).pow(2).sum(-1)
            stats = self._statistics(codes, ze.detach()) if train else self._stats(_histogram(codes, k))
            return zq, codes, loss, distances, losses, stats, sample_distances
        relax = train and cfg.kind == "gumbel"
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
        else:
            codes = nearest
            e = E.index_select(0, codes)
            if grad and cfg.rotation_trick:
                zq = rotate_to(ze, e.detach())
            else:
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
        if cfg.prior_kl:   # the gumbel kind: eq. (1) on its straight-through one-hots, global batch
            hard = y if relax else F.one_hot(codes, k).to(probs.dtype) + probs - probs.detach()
            losses["prior_kl"] = usage_kl(hard, global_batch=train)
        distances = (ze.detach() - e_sel.detach()).pow(2).sum(-1)
        stats = self._statistics(codes, ze.detach()) if train else self._stats(
            _histogram(codes, k))
        return zq, codes, loss, distances, losses, stats

    def pop_row_writes(self) -> list[RowWrite]:
        """Restarted rows of a parameter codebook since the last call (see model_zoo.interfaces)."""
        w, self._row_write = self._row_write, None
        return [w] if w is not None else []

    # ---- statistics, EMA, restarts ------------------------------------------------------------
    @torch.no_grad()
    def _statistics(self, codes: Tensor, ze: Tensor) -> dict[str, Tensor]:
        """Training step: all-reduce the batch statistics, update the EMAs, restart dead codes."""
        cfg, k = self.config, self.config.codebook_size
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
        cfg, k = self.config, self.config.codebook_size
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


def build_quantizer(in_dim: int, cfg: QuantizerConfig) -> QuantizerBase:
    """The quantizer ``cfg.kind`` names, over features of width ``in_dim``: what every tokenizer
    calls (``vq`` / ``gumbel``: :class:`VectorQuantizer`, SimVQ and the rotation trick included;
    ``fsq`` and ``lfq``: model_zoo.scalar_quantizers)."""
    if cfg.kind in ("fsq", "lfq"):
        unsupported = {"ema": cfg.ema, "simvq": cfg.simvq, "rotation_trick": cfg.rotation_trick,
                       "prior_kl": cfg.prior_kl, "stochastic_mask_ratio": cfg.stochastic_mask_ratio > 0,
                       "kl_weight_gumbel": cfg.kl_weight_gumbel > 0}
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise ValueError(f"kind={cfg.kind!r} has no codebook to apply {', '.join(bad)} to")
        return (FSQuantizer if cfg.kind == "fsq" else LFQuantizer)(in_dim, cfg)
    return VectorQuantizer(in_dim, cfg)
