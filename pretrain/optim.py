"""The optimizer side of a run that does not depend on DeepSpeed: :class:`OptimConfig` (AdamW and its
LR schedule, a frozen config section), the parameter groups (which tensors get weight decay), the
LR multipliers (warmup + cosine, or warmup + exponential decay: :func:`lr_schedule`) and gradient
accumulation derived from the global batch and the world size. :mod:`pretrain.runtime` hands
these to DeepSpeed.

Weight decay (decided here, the same for every model): only tensors named ``weight`` with two or
more dimensions (Linear/Conv kernels, equalized-lr layers), never biases, norm scales, embedding
tables (``nn.Embedding``), position embeddings, codebooks, class/mask tokens (parameters not
named ``weight``), nor names a model lists in ``no_weight_decay()`` (timm's convention).
Parameters with ``requires_grad=False`` (frozen text encoders) are given to no optimizer.

Model code is single-device code; this module never imports model_zoo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch.nn as nn

__all__ = ["OptimConfig", "gradient_accumulation_steps", "weight_decay_groups", "WarmupCosine",
           "WarmupExponential", "lr_schedule"]


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a linear warmup to ``lr`` over ``warmup_steps``, then (``schedule``):

    * ``"cosine"`` (the default): a cosine decay to ``lr * min_lr_ratio`` at ``total_steps``;
    * ``"exponential"``: constant until ``decay_start``, then an exponential decay reaching
      ``lr * min_lr_ratio`` at ``total_steps``, ``lr * min_lr_ratio ** ((t - decay_start) /
      (total_steps - decay_start))`` (VIM's schedule: 4.5e-4 from 5k steps, decayed from 80k to 1e-5).

    Both stay at their final value after ``total_steps``; ``total_steps = 0`` is constant after
    the warmup. :func:`lr_schedule` builds the multiplier."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)   # recipes set the papers' values (ViT-VQGAN: 0.9, 0.99)
    weight_decay: float = 1e-4
    eps: float = 1e-8
    warmup_steps: int = 0
    total_steps: int = 1000                    # 0: constant after warmup
    min_lr_ratio: float = 0.1                  # the final lr, as a fraction of lr (both schedules)
    schedule: Literal["cosine", "exponential"] = "cosine"
    decay_start: int = 0                       # exponential: the step its decay starts (>= warmup_steps)
    grad_clip: float = 1.0                     # 0 disables clipping
    # auto: DeepSpeed's own AdamW (DeepSpeedCPUAdam) when the optimizer is offloaded, else torch's
    optimizer: Literal["auto", "torch", "deepspeed"] = "auto"


def gradient_accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """``global = micro * world * accumulation``; the global batch stays fixed when the world changes."""
    per_step = micro_batch_size * world_size
    if micro_batch_size < 1 or global_batch_size < 1 or global_batch_size % per_step:
        raise ValueError(
            f"global batch size {global_batch_size} is not a multiple of micro batch {micro_batch_size} x "
            f"world size {world_size} = {per_step}; choose a micro batch or world size that divides it")
    return global_batch_size // per_step


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups (decay / no decay) of the trainable parameters; see the module docstring."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decide: dict[int, tuple[nn.Parameter, bool]] = {}     # by identity: a tied weight is one tensor
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if not p.requires_grad:
                continue
            ok = p_name == "weight" and p.ndim >= 2 and not isinstance(module, nn.Embedding) and full not in skip
            # tied to an embedding table (a shared output head): no decay, whichever owner comes first
            decide[id(p)] = (p, ok and decide.get(id(p), (p, True))[1])
    decay = [p for p, d in decide.values() if d]
    no_decay = [p for p, d in decide.values() if not d]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class WarmupCosine:
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at
    ``total``. A callable object (not a lambda) so LambdaLR's state_dict can save it."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = int(warmup), int(total), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.total <= self.warmup:
            return 1.0
        t = min(1.0, (step - self.warmup) / (self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class WarmupExponential:
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, 1 until ``decay_start``, then
    ``min_ratio ** ((step - start) / (total - start))`` (``start = max(decay_start, warmup)``),
    which reaches ``min_ratio`` at ``total`` and stays there. A callable object (LambdaLR's
    state_dict can save it)."""

    def __init__(self, warmup: int, decay_start: int, total: int, min_ratio: float):
        self.warmup, self.decay_start, self.total = int(warmup), int(decay_start), int(total)
        self.min_ratio = float(min_ratio)
        if not 0.0 < self.min_ratio <= 1.0:
            raise ValueError(f"the exponential schedule needs 0 < min_lr_ratio <= 1, got {self.min_ratio}")

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        start = max(self.decay_start, self.warmup)
        if self.total <= start or step < start:
            return 1.0
        t = min(1.0, (step - start) / (self.total - start))
        return self.min_ratio ** t


def lr_schedule(optim_cfg: OptimConfig):
    """The LR multiplier (a LambdaLR ``lr_lambda``) of ``optim_cfg.schedule``."""
    if optim_cfg.schedule == "cosine":
        return WarmupCosine(optim_cfg.warmup_steps, optim_cfg.total_steps, optim_cfg.min_lr_ratio)
    if optim_cfg.schedule == "exponential":
        return WarmupExponential(optim_cfg.warmup_steps, optim_cfg.decay_start, optim_cfg.total_steps,
                                 optim_cfg.min_lr_ratio)
    raise ValueError(f"optim.schedule must be 'cosine' or 'exponential', got {optim_cfg.schedule!r}")
