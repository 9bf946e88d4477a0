"""What every quantizer of model_zoo shares: ``VectorQuantizer`` (quantizers.py: VQ, EMA, Gumbel,
Regularized VQ, SimVQ) and the codebook-free ones (scalar_quantizers.py: FSQ, LFQ).

- The lookup space: an optional linear projection ``in_dim -> dim`` before quantization and
  ``dim -> in_dim`` after it (the factorized codes of ViT-VQGAN, Yu et al. 2021), and quantization
  in fp32 even under bf16 autocast.
- Codebook-usage statistics: per-code counts all-reduced across ranks in training (every rank logs
  the global batch's usage and perplexity), an EMA of them (``cluster_size``) for ``dead_codes``.
- :class:`AllReduceSum`, the autograd all-reduce through which a loss of the global batch (the
  Regularized VQ prior KL, the LFQ batch entropy) gets its data-parallel gradient.

Collectives run only in training mode (where all ranks step in lockstep); eval forwards are local.
This module imports nothing from the other quantizer modules (they import it): the config is a
``model_zoo.quantizers.QuantizerConfig``, read by field name.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .interfaces import QuantizerOutput, RowWrite

__all__ = ["AllReduceSum", "QuantizerBase", "histogram", "no_autocast", "world_size"]


def histogram(codes: Tensor, k: int) -> Tensor:
    """Counts per code as float (scatter_add rather than bincount: it also runs on meta)."""
    return torch.zeros(k, device=codes.device).scatter_add_(0, codes, torch.ones_like(codes, dtype=torch.float))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def no_autocast(device: torch.device):
    """Autocast off on ``device`` (autocast has no meta backend: a full-size model is traced on
    meta without it)."""
    return torch.autocast(device.type, enabled=False) if device.type != "meta" else contextlib.nullcontext()


class AllReduceSum(torch.autograd.Function):
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


# Buffers that hold running statistics (or a frozen fp32 codebook): kept in fp32 whatever dtype the
# module is cast to (DeepSpeed's bf16 mode calls module.bfloat16(); an EMA with decay 0.99 stalls at
# bf16 precision).
_FP32_BUFFERS = ("embed", "embed_avg", "cluster_size")


class QuantizerBase(nn.Module):
    """``forward(z[..., in_dim]) -> QuantizerOutput``; ``lookup(codes) -> [..., in_dim]``.

    Subclasses implement ``_quantize(ze [P, dim] fp32) -> (z_q [P, dim], codes [P], loss,
    distances [P], losses, stats[, sample_distances [P]])`` (the last: Regularized VQ) and ``_vectors(codes) -> [..., dim]`` (the lookup-space code
    vectors, fp32). Buffers: ``cluster_size`` (EMA of the per-code assignment counts, the usage
    counter behind ``dead_codes``), ``steps`` (training forwards seen)."""

    def __init__(self, in_dim: int, cfg, dim: int):
        super().__init__()
        if not cfg.factorized and dim != in_dim:
            raise ValueError(f"factorized=False needs the lookup dim to equal in_dim, got {dim} != {in_dim}")
        self.config, self.in_dim, self.dim = cfg, in_dim, dim
        self.proj_in = nn.Linear(in_dim, dim) if cfg.factorized else nn.Identity()
        self.proj_out = nn.Linear(dim, in_dim) if cfg.factorized else nn.Identity()
        self.register_buffer("cluster_size", torch.empty(cfg.codebook_size))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # Fresh and restarted codes start with this usage count, twice the dead threshold, so a code
        # that is never chosen is declared dead after ln(2) / (1 - decay) steps (~69 at 0.99): a grace
        # period instead of declaring the whole codebook dead at step 0.
        self._init_count = max(2.0 * cfg.dead_threshold, 1.0)
        self._step = 0          # set_step(): the trainer's global step, for schedules

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Statistics and projections (no data-dependent ops: works on the meta device, and after
        ``to_empty()`` materialises a meta-built model)."""
        self.cluster_size.fill_(self._init_count)
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

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def set_step(self, step: int) -> None:
        self._step = int(step)

    def pop_row_writes(self) -> list[RowWrite]:
        """Rows of a parameter written outside the optimizer since the last call (none by default;
        see model_zoo.interfaces)."""
        return []

    # ---- lookup and forward -------------------------------------------------------------------
    def _project_out(self, zq: Tensor) -> Tensor:
        if isinstance(self.proj_out, nn.Linear):
            return self.proj_out(zq.to(self.proj_out.weight.dtype))
        return zq

    def _vectors(self, codes: Tensor) -> Tensor:
        raise NotImplementedError

    def lookup(self, codes: Tensor) -> Tensor:
        """Code indices ``[...]`` -> ``[..., in_dim]``: what ``decode`` feeds the decoder."""
        with no_autocast(codes.device):
            v = self._vectors(codes)
        return self._project_out(v)

    def forward(self, z: Tensor) -> QuantizerOutput:
        lead = z.shape[:-1]
        ze = self.proj_in(z.reshape(-1, self.in_dim))
        # Distances, rounding, softmaxes and statistics in fp32 even under bf16 autocast: bf16's 8-bit
        # mantissa cannot separate neighbouring codes (2 - 2cos differs in the 3rd digit), hold a code
        # index above 256 (lucidrains/vector-quantize-pytorch#114: FSQ lost half its codes) or
        # accumulate EMAs.
        with no_autocast(z.device):
            zq, codes, loss, dist_, losses, stats, *sampled = self._quantize(ze.float())
        z_q = self._project_out(zq).to(z.dtype).reshape(z.shape)
        return QuantizerOutput(z_q=z_q, codes=codes.reshape(lead), loss=loss,
                               distances=dist_.reshape(lead), losses=losses, stats=stats,
                               sample_distances=sampled[0].reshape(lead) if sampled else None)

    def _quantize(self, ze: Tensor):
        raise NotImplementedError

    # ---- statistics ---------------------------------------------------------------------------
    def _stats(self, counts: Tensor) -> dict[str, Tensor]:
        p = counts / counts.sum().clamp_min(1.0)
        entropy = -(p * p.clamp_min(1e-30).log()).sum()
        return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp(),
                "dead_codes": (self.cluster_size < self.config.dead_threshold).sum().float()}

    @torch.no_grad()
    def _usage(self, codes: Tensor) -> dict[str, Tensor]:
        """Usage statistics of ``codes``; in training over the global batch (counts all-reduced),
        also advancing the usage EMA and ``steps``."""
        counts = histogram(codes, self.config.codebook_size)
        if self.training:
            if world_size() > 1:
                dist.all_reduce(counts)
            self.cluster_size.mul_(self.config.decay).add_(counts, alpha=1 - self.config.decay)
            self.steps.add_(1)
        return self._stats(counts)
