"""Token sampling for the stage-2 priors: temperature, top-k / top-p filtering, classifier-free
guidance, and reproducible per-sample randomness.

Reproducibility contract: a sample's tokens depend only on its own seed (and the model), never on
the batch size, the other samples in the batch or the number of processes that share the work.
A global ``torch.Generator`` cannot give that (its stream is consumed row after row), so the
noise is *counter-based* (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011):
the uniform for sample ``i``, step ``t`` and vocabulary entry ``v`` is a hash of
``(seed_i, t, v)``, computed by a vectorized splitmix64 (Steele et al. 2014) in plain torch int64
arithmetic (multiplication wraps modulo 2^64; right shifts are arithmetic in torch, so they are
masked to act as logical shifts). A token is then drawn with the Gumbel-max trick,
``argmax(logits / T + Gumbel(u))``, which is an exact sample from ``softmax(logits / T)``
restricted to the filtered set. Seeds for a run come from ``sample_seeds(seed, global indices)``,
so rank ``r`` generating indices ``[a, b)`` reproduces exactly the rows ``[a, b)`` of a
single-process run.

Classifier-free guidance (Ho & Salimans 2021): ``uncond + s * (cond - uncond)``; ``s = 1`` is the
conditional model and ``s = 0`` the unconditional one (both returned exactly, no arithmetic).

Priors that draw two kinds of token (Stackformer: a code, then its position) read the position
draws' filter from ``position_top_k`` / ``position_top_p`` (None: the codes' ``top_k`` /
``top_p``) through :meth:`SamplingConfig.for_positions`; the official MQ-VAE code samples codes
with top-k 100 and positions with top-k 10, both with top-p 0.95
(models/stage2_masked/stackformer_class.py, ``log_images``).

Rejection sampling (VIM, Yu et al. 2021): draw more candidates than wanted, have a classifier
score them, keep the best-scored fraction (the acceptance rate). Tokens know nothing of images,
so the priors do not do it: :func:`num_candidates` and :func:`keep_best` are the arithmetic, and
the caller that decodes images and holds a classifier applies them (``pretrain.sample``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_k: int = 0          # 0 = off
    top_p: float = 1.0      # 1.0 = off
    guidance_scale: float = 1.0   # logits = uncond + s * (cond - uncond); 1 = conditional, 0 = unconditional
    use_cache: bool = True
    position_top_k: int | None = None     # Stackformer's position draws (None: top_k)
    position_top_p: float | None = None   # Stackformer's position draws (None: top_p)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        for name in ("top_k", "position_top_k"):
            k = getattr(self, name)
            if k is not None and k < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off), got {k}")
        for name in ("top_p", "position_top_p"):
            p = getattr(self, name)
            if p is not None and not 0.0 < p <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {p}")

    def for_positions(self) -> "SamplingConfig":
        """The settings of a position draw: ``position_top_k`` / ``position_top_p`` in place of
        ``top_k`` / ``top_p`` where they are set (temperature and guidance are shared)."""
        k = self.top_k if self.position_top_k is None else self.position_top_k
        p = self.top_p if self.position_top_p is None else self.position_top_p
        return replace(self, top_k=k, top_p=p)


# ---- rejection sampling ------------------------------------------------------------------------

def num_candidates(num: int, acceptance_rate: float) -> int:
    """How many candidates to draw so that keeping ``num`` of them keeps about ``acceptance_rate``
    of them: ``ceil(num / acceptance_rate)`` (1.0: ``num``, no rejection)."""
    if not 0.0 < acceptance_rate <= 1.0:
        raise ValueError(f"acceptance rate must be in (0, 1], got {acceptance_rate}")
    return max(int(num), math.ceil(int(num) / float(acceptance_rate) - 1e-9))


def keep_best(scores: torch.Tensor, num: int) -> torch.Tensor:
    """Indices (ascending, so kept samples stay in candidate order) of the ``num`` highest
    ``scores [n]``; ties go to the earlier candidate, so the choice does not depend on the batch."""
    scores = torch.as_tensor(scores).reshape(-1)
    if not 0 <= num <= scores.numel():
        raise ValueError(f"cannot keep {num} of {scores.numel()} candidates")
    if torch.isnan(scores).any():
        raise ValueError("a classifier score is NaN")
    order = torch.argsort(scores.double().cpu(), descending=True, stable=True)
    return order[:num].sort().values


# ---- counter-based hashing ---------------------------------------------------------------------

def _i64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= (1 << 63) else c


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_M1 = _i64(0xBF58476D1CE4E5B9)
_M2 = _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic: mask off the sign fill)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors (a bijection of the 64-bit words)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def uniform_noise(seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Float64 uniforms in (0, 1), ``[B, vocab]``: a pure function of ``(seed_b, step, v)``."""
    seeds = seeds.to(torch.int64)
    h = splitmix64(splitmix64(seeds) + int(step))                       # [B], chained so that
    v = torch.arange(vocab, device=seeds.device, dtype=torch.int64)     # (seed, step) pairs and
    bits = _shr(splitmix64(h[:, None] + v * _GOLDEN), 11)               # v never collide
    return (bits.to(torch.float64) + 0.5) * (1.0 / (1 << 53))           # top 53 bits, open interval


def sample_seeds(seed: int, sample_indices: torch.Tensor) -> torch.Tensor:
    """Per-sample int64 seeds from a run seed and the samples' *global* indices."""
    idx = torch.as_tensor(sample_indices, dtype=torch.int64)
    return splitmix64(splitmix64(torch.full_like(idx, int(seed))) ^ idx)


# ---- logits processing -------------------------------------------------------------------------

def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``-inf`` outside the allowed set, the logits unchanged inside it.

    top-k keeps exactly the ``k`` largest logits (ties broken by ``torch.topk``); top-p (nucleus,
    Holtzman et al. 2020) then keeps the smallest set of the most probable tokens whose cumulative
    probability (of the softmax after top-k) reaches ``p``; the most probable token is always kept.
    """
    vocab = logits.shape[-1]
    out = logits
    if 0 < top_k < vocab:
        idx = logits.topk(top_k, dim=-1).indices
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
        out = out.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs          # mass strictly above each token
        drop_sorted = before >= top_p                  # the first token has before == 0: kept
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def guided_rows(seeds, labels: torch.Tensor, sampling: SamplingConfig,
                null_label: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """What a class-conditional sampler runs: ``(seeds [n] long, row labels, guidance scale)``.
    ``seeds`` must hold one seed per label; with guidance (scale != 1) the conditional rows are
    followed by as many ``null_label`` rows, so one forward per step serves both halves."""
    n = labels.shape[0]
    seeds = torch.as_tensor(seeds, dtype=torch.long, device=labels.device).reshape(-1)
    if seeds.shape[0] != n:
        raise ValueError(f"{seeds.shape[0]} seeds for {n} samples")
    scale = float(sampling.guidance_scale)
    if scale != 1.0:
        labels = torch.cat([labels, torch.full_like(labels, null_label)])
    return seeds, labels, scale


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``."""
    scale = float(scale)
    if scale == 1.0:
        return cond
    if scale == 0.0:
        return uncond
    return uncond + scale * (cond - uncond)


def sample_tokens(logits: torch.Tensor, cfg: SamplingConfig, seeds: torch.Tensor, step: int) -> torch.Tensor:
    """One token per row of ``logits [B, V]``: temperature, top-k/top-p, then Gumbel-max with
    counter-based noise from ``(seeds[b], step)``. ``temperature == 0`` is greedy (argmax)."""
    if logits.dim() != 2 or seeds.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [B, V] and seeds [B], got {tuple(logits.shape)} and {tuple(seeds.shape)}")
    logits = logits if logits.dtype == torch.float64 else logits.float()   # fp32, or fp64 for an fp64 model
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    u = uniform_noise(seeds.to(logits.device), step, logits.shape[-1])
    gumbel = -torch.log(-torch.log(u))
    # float64: -inf stays -inf, and the noise keeps its full resolution next to the logits.
    return (logits.double() + gumbel).argmax(dim=-1)
