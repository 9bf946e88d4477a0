"""Activation checkpointing applied from outside the model: recompute every ``*Block`` held in an
``nn.ModuleList`` in the backward pass instead of keeping its activations.

Two modes (``DeepSpeedSettings.activation_checkpointing``): "full" (or True) recomputes whole
blocks; "selective" keeps the outputs of matmuls and attention and recomputes only the cheap ops
between them (torchtitan's op-level SAC, :func:`_selective_policy`). Plain torch
(``torch.utils.checkpoint``, non-reentrant), so it works under any ZeRO stage and without
DeepSpeed; :func:`pretrain.runtime.build_engine` applies it when the settings ask for it.

Model code is single-device code; this module never imports model_zoo.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["apply_activation_checkpointing"]


def _is_block(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Block")


def _selective_policy():
    """Save what is expensive to recompute (matmuls, attention), recompute the rest (norms,
    activations, dropout, residual adds): no matmul runs twice, and the elementwise
    activations, about half of a block's saved bytes, are not kept (benchmarks/bench_memory.py)."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu")
    save = {getattr(aten, n).default for n in names if hasattr(aten, n)}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_activation_checkpointing(model: nn.Module, mode: bool | str = "full") -> int:
    """Recompute every ``*Block`` held in an ``nn.ModuleList`` (transformer, ViT, de-mask and
    VQGAN resnet/attention blocks) in the backward pass; returns how many were wrapped.
    ``mode``: "full" (or True) recomputes the whole block; "selective" keeps matmul and attention
    outputs and recomputes only the ops between them.

    The instance's ``forward`` is replaced, not the module, so parameter names and checkpoints do
    not change. torch's non-reentrant checkpoint is used (it supports keyword arguments).
    """
    import functools
    import inspect

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    if mode not in (True, "full", "selective"):
        raise ValueError(f"activation checkpointing mode must be full or selective, got {mode!r}")
    extra = {}
    if mode == "selective":
        extra = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _selective_policy())}
        if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters:
            # what SAC keeps goes through saved_tensors_hooks like any saved tensor (offloading
            # hooks and the memory benchmark see it); torch's future default
            extra["respect_saved_tensors_hooks"] = True
    count = 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList):
            continue
        for block in module:
            if not _is_block(block) or getattr(block, "_vqscale_checkpointed", False):
                continue
            inner = block.forward

            def forward(*args, _inner=inner, _block=block, **kwargs):
                if _block.training and torch.is_grad_enabled():
                    return checkpoint(_inner, *args, use_reentrant=False, **extra, **kwargs)
                return _inner(*args, **kwargs)

            block.forward = forward
            block._vqscale_checkpointed = True
            count += 1
    return count
