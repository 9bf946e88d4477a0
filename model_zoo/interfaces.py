"""The interfaces every tokenizer and quantizer implements (DESIGN.md, "Contracts").

Tokenizer: ``encode(images) -> Tokens`` (``codes`` long ``[B, N]`` in flat raster order over the
token grid; ``positions`` long ``[B, N]``, the sorted flat raster indices of the kept positions for
masked tokenizers such as MQ-VAE, else None), ``decode(codes, positions=None) -> images``, the
attributes ``codebook_size``, ``grid_size`` (h, w) and ``num_tokens`` (N), and for training
``forward(images) -> TokenizerOutput``. Images are float ``[B, 3, H, W]`` in ``[-1, 1]``.

Quantizer: ``forward(z) -> QuantizerOutput`` over features in the last dimension (``[..., C]``),
``lookup(codes) -> z_q`` (the inverse used by ``decode``).

Row writes: a module that sets rows of one of its *parameters* outside the optimizer (a dead-code
restart) also queues them as :class:`RowWrite` and hands them out from ``pop_row_writes()``. A
plain optimizer would keep an in-place write, but a sharded one (ZeRO's fp32 master copy and its
Adam moments) overwrites it at the next step, so whoever owns the optimizer collects them with
:func:`pop_row_writes` after each optimizer step and writes them where that optimizer keeps its
state (pretrain/runtime.py). Models stay plain torch: they only say what they wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RowWrite:
    """``param[mask] = values[mask]`` along the first dimension, decided identically on every rank;
    the optimizer state of those rows (Adam moments) is to be reset as for a fresh parameter."""

    param: nn.Parameter
    mask: torch.Tensor                        # bool [rows]
    values: torch.Tensor                      # [rows, ...] (only the rows under ``mask`` are read)


def pop_row_writes(module: nn.Module) -> list[RowWrite]:
    """The row writes queued by ``module`` and its submodules since the last call (emptied)."""
    out: list[RowWrite] = []
    for m in module.modules():
        if callable(getattr(type(m), "pop_row_writes", None)):
            out.extend(m.pop_row_writes())
    return out


@dataclass
class Tokens:
    codes: torch.Tensor                       # long [B, N]
    positions: torch.Tensor | None = None     # long [B, N], masked tokenizers only


@dataclass
class QuantizerOutput:
    """What a quantizer returns for features ``z`` of shape ``[..., C]``.

    ``z_q`` has the shape of ``z`` and passes gradients straight through to ``z``. ``loss`` is the
    quantizer's own training term (codebook + beta * commitment; commitment only with EMA
    updates). ``losses`` names every term that went into it and the optional regularizers
    (``prior_kl`` for Regularized VQ), already unweighted unless the name says so. ``distances``
    is ``||z - z_q||^2`` per position in the lookup space (``[...]``, detached).
    ``sample_distances`` (Regularized VQ only, else None) is ``||z_s - z_q||^2`` per position
    between the code the position took (sampled by the stochastic mask) and its best-matching
    code, 0 where the argmax was taken (``[...]``, detached): the weight of the probabilistic
    contrastive loss (model_zoo/losses.py). ``stats`` are detached scalars for logging: ``usage``
    (fraction of the codebook used in the batch), ``perplexity``, ``dead_codes``.
    """

    z_q: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    distances: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    sample_distances: torch.Tensor | None = None


@dataclass
class TokenizerOutput:
    """``forward(images)`` for training: the reconstruction and everything losses need."""

    recon: torch.Tensor                        # [B, 3, H, W], no output activation
    quant: QuantizerOutput
    tokens: Tokens
    extra: dict[str, torch.Tensor] = field(default_factory=dict)   # e.g. MQ-VAE mask scores


class Tokenizer(nn.Module):
    """Base class: subclasses set ``codebook_size``, ``grid_size``, ``num_tokens``, ``image_size`` and implement
    ``forward``, ``encode``, ``decode`` and ``last_layer``."""

    codebook_size: int
    grid_size: tuple[int, int]
    num_tokens: int
    image_size: int          # square input side in pixels

    def encode(self, images: torch.Tensor) -> Tokens:
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        raise NotImplementedError

    def last_layer(self) -> torch.Tensor:
        """The weight of the decoder's last layer (the adaptive GAN weight differentiates it)."""
        raise NotImplementedError


class Prior(nn.Module):
    """Base class of the stage-2 priors over tokenizer codes (DESIGN.md, "Prior interface"):
    VIM (model_zoo/vim.py), the text-conditional prior (model_zoo/t2i_prior.py) and Stackformer
    (model_zoo/stackformer.py). Subclasses set ``codebook_size``, ``num_tokens`` and ``grid_size``.

    ``condition`` is model specific: class labels long ``[B]`` (-1 = unconditional) for VIM and
    Stackformer; ``{"tokens": long [B, L]}`` or ``{"embedding": [B, L, C], "mask": bool [B, L]}``
    for the text prior. ``positions`` (long ``[B, N]``) only for masked tokenizers (Stackformer).
    Sampling options are a ``model_zoo.sampling.SamplingConfig``; ``seeds`` (long
    ``[num_samples]``, from ``sampling.sample_seeds``) make each sample independent of the batch.
    """

    codebook_size: int
    num_tokens: int
    grid_size: tuple[int, int]

    def forward(self, codes: torch.Tensor, condition, positions: torch.Tensor | None = None):
        """Teacher forcing: ``logits[:, i]`` predicts ``codes[:, i]`` from the condition and
        ``codes[:, :i]``. ``[B, N, V]`` (Stackformer: ``(code_logits, position_logits)``)."""
        raise NotImplementedError

    def loss(self, codes: torch.Tensor, condition,
             positions: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar next-token cross-entropy and its named terms: :func:`next_token_loss` of
        ``forward`` (which applies the condition dropout in training mode)."""
        return next_token_loss(self(codes, condition, positions), codes, positions)

    def generate(self, condition, num_samples: int, sampling, seeds: torch.Tensor):
        """Sample ``[num_samples, N]`` codes (Stackformer: ``(codes, positions)``)."""
        raise NotImplementedError

    def features(self, codes: torch.Tensor, condition, layer: int,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
        """Block ``layer``'s output averaged over the token positions, ``[B, D]`` (linear probe)."""
        raise NotImplementedError

    def null_condition(self, batch_size: int):
        """The unconditional condition for ``batch_size`` samples (CFG, condition dropout)."""
        raise NotImplementedError


def next_token_loss(out, codes: torch.Tensor,
                    positions: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """THE loss of every prior, from its teacher-forced output (``Prior.forward``): the code
    cross-entropy, plus for Stackformer (``out = (code_logits, position_logits)``) the position
    cross-entropy at the official weight 1.0 (impossible positions are -inf in its logits). The
    prior's ``loss`` and the training objective (which must call ``forward`` through the engine)
    both use it. Terms, detached: ``code_ce``, ``code_accuracy`` and, for Stackformer,
    ``position_ce``, ``position_accuracy``."""
    code_logits, position_logits = out if isinstance(out, tuple) else (out, None)
    loss = code_ce = F.cross_entropy(code_logits.flatten(0, 1).float(), codes.flatten())
    terms = {"code_ce": code_ce.detach(), "code_accuracy": (code_logits.detach().argmax(-1) == codes).float().mean()}
    if position_logits is not None:
        position_ce = F.cross_entropy(position_logits.flatten(0, 1).float(), positions.flatten())
        loss = code_ce + position_ce
        terms["position_ce"] = position_ce.detach()
        terms["position_accuracy"] = (position_logits.detach().argmax(-1) == positions).float().mean()
    return loss, terms


def class_labels(condition, batch_size: int, high: int, device: torch.device, message: str) -> torch.Tensor:
    """Class ids ``[B]`` from ``condition`` (None, an int, a sequence or a tensor; one label is
    broadcast to the batch), on ``device``, checked to lie in ``[-1, high]``.

    The range check runs where the labels are: on the host before they are copied (free), and on
    an accelerator (or inside a compiled graph) as an asynchronous device assert. An eager
    ``bool(...)`` there would make every training step wait for the device (a host sync) just to
    read one flag (and would break a compiled graph)."""
    y = torch.as_tensor(-1 if condition is None else condition, dtype=torch.long).reshape(-1)
    if y.numel() == 1 and batch_size != 1:
        y = y.expand(batch_size)
    if y.shape[0] != batch_size:
        raise ValueError(f"{y.shape[0]} labels for a batch of {batch_size}")
    ok = ((y >= -1) & (y <= high)).all()
    if y.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)
    return y.to(device, non_blocking=True)
