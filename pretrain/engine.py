"""DeepSpeed engines from typed configs, and the EMA of their weights.

Owns: :class:`OptimConfig` and :class:`DeepSpeedSettings` (frozen config sections), the DeepSpeed
config JSON they resolve to (:func:`build_ds_config`; ``passthrough`` is deep-merged last so any
DeepSpeed setting can be given), gradient accumulation derived from the global batch and the world
size, parameter groups (which tensors get weight decay), the LR schedules (warmup + cosine, or warmup +
exponential decay: :func:`lr_schedule`),
activation checkpointing applied from outside the model, DeepSpeed's hooks seeing inside dataclass
outputs, :func:`build_engine`, :func:`consolidated_state_dict` and :class:`EMA`.

Weight decay (decided here, the same for every model): only tensors named ``weight`` with two or
more dimensions (Linear/Conv kernels, equalized-lr layers), never biases, norm scales, embedding
tables (``nn.Embedding``), position embeddings, codebooks, class/mask tokens (parameters not
named ``weight``), nor names a model lists in ``no_weight_decay()`` (timm's convention).
Parameters with ``requires_grad=False`` (frozen text encoders) are given to no optimizer.

Non-finite steps (:func:`_skip_nonfinite_steps`, applied to every engine by :func:`build_engine`):
when any gradient of a global step is NaN/inf on any rank (e.g. one rank's loss was NaN), the
optimizer step is skipped on all ranks: weights, AdamW moments and step counts stay as they were,
the LR schedule does not advance, the accumulated gradients are dropped (the next step starts
clean), ``engine.skipped_steps`` goes up by one, ``engine.was_step_applied()`` is False and
``engine.get_global_grad_norm()`` reads ``inf``. DeepSpeed's own ``_take_model_step`` does the
counting and holds the scheduler back whenever ``engine.optimizer.overflow`` is True; the
optimizers below set that flag identically on every rank:

* ZeRO-1/2 (``DeepSpeedZeroOptimizer``): its step computes the global grad norm (one all-reduce
  SUM over the data-parallel group, so a NaN on any rank reaches all) and skips when it is not
  finite: always for fp32, for bf16 only with ``check_grad_overflow`` (DeepSpeed's default for
  bf16, which adds its own all-reduce MAX of an inf/NaN flag). The norm is not computed with
  ``zero_optimization.compute_grad_norm=false``; there, or where bf16 ``check_grad_overflow`` was
  turned off, ``check_grad_overflow`` is switched on so the flag check runs.
* ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): its step skips whenever the global grad norm (an
  all-reduce over the data-parallel group) is not finite, whatever the dtype (its separate flag
  check runs for fp16 only and is not needed). Nothing is patched.
* Stage 0, bf16 (``FP16_UnfusedOptimizer``; ``FP16_Optimizer`` with DeepSpeed's fused Adam):
  the wrapper checks the gradients, which the engine's all-reduce at the accumulation boundary
  has already made the same on every rank, and skips. Nothing is patched. Likewise
  ``BF16_Optimizer`` (ZeRO-1 in bf16 with ``data_types.grad_accum_dtype=fp32`` in
  ``passthrough``), which skips on a non-finite global grad norm.
* Stage 0, fp32: the engine steps the bare torch optimizer, with no check at all. Its ``step`` is
  wrapped (:func:`_guard_bare_optimizer`): it takes the global grad norm of the (already averaged)
  gradients, agrees on it with one 1-element all-reduce MAX (a non-finite norm on any rank becomes
  inf everywhere), then either skips (``overflow = True``; the engine's ``zero_grad`` drops the
  gradients) or clips to ``grad_clip`` with that norm and steps. The engine's own fp32 clipping
  (``clip_fp32_gradients``, a second norm and all-reduce) is switched off for that engine, so the
  reported ``get_global_grad_norm()`` is the norm before clipping, as at the other stages.

Any other optimizer wrapper makes :func:`build_engine` fail rather than train without the check.
These are the paths of the pinned DeepSpeed 0.19.8 (``constraints.txt``); older releases checked
less (ZeRO-3 only for fp16), and ``tests/test_nonfinite.py`` fails if a DeepSpeed change drops one.
The engine's ``global_steps`` still counts a skipped step (as DeepSpeed does for fp16 overflows).

Dataclass outputs (:func:`_hooks_see_dataclasses`, applied by :func:`build_engine`): tokenizers
return dataclasses (``TokenizerOutput`` holding a ``QuantizerOutput``, ``Tokens`` and dicts of
tensors), and DeepSpeed walks a module's outputs with helpers that know tensors, tuples, lists and
dicts only; anything else passes through untouched. Two walks matter:

* ZeRO-3 (``deepspeed.runtime.zero.utils.apply_to_tensors_only``, imported by name into
  ``parameter_offload``): the forward hook of every submodule passes each output tensor through an
  autograd function whose backward re-gathers that submodule's partitioned parameters before its
  own backward runs. A quantizer returning a ``QuantizerOutput`` got no such tensor, so its
  codebook was still released (0 elements) when autograd accumulated its gradient: ``RuntimeError:
  The size of tensor a (0) must match the size of tensor b (8)`` (8: the code dimension) in
  ``AccumulateGrad`` (ViT-VQGAN, VQGAN), or ``AssertionError: active_backward_submodules is empty
  during backward pass`` (MQ-VAE: a submodule's post-backward release with no gather before it).
* Every stage (``OutputBackwardHookManager._traverse_and_register_hooks`` in
  ``deepspeed.runtime.utils``): ``engine.forward`` hooks the model's output tensors so that the
  first gradient reaching them runs the engine's backward prologue (``engine.backward`` does not
  run it itself). With a dataclass output it never ran, so the ZeRO optimizers' gradient hooks read
  the gradient-accumulation boundary flag of the previous micro-batch (inverted with accumulation
  2, measured at ZeRO-2 and ZeRO-3; the fp32 results measured happened not to change).

Both walks are extended to dataclass instances (not classes): each field is walked as DeepSpeed
walks any value, so tensors, containers and nested dataclasses inside it are reached, and where a
field's value comes back changed the instance is rebuilt as a shallow copy with those fields set
(``object.__setattr__``: frozen dataclasses too; ``__init__``/``__post_init__`` do not run again;
dicts are updated in place as DeepSpeed does). Every other value goes to DeepSpeed's own code, so
models returning tensors or containers behave exactly as before. The patch is applied once per
process (later calls see the marker and return); if DeepSpeed renames either helper,
:func:`build_engine` fails instead of training without it. With it, tokenizers train under ZeRO-3
bitwise like ZeRO-2 in fp32 without gradient clipping (``tests/test_zero3_tokenizer.py``, which
also says why clipping leaves weights of order ``lr`` apart that have zero true gradient).

Model code is single-device code; this module never imports model_zoo.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Union

import torch
import torch.nn as nn

from . import safe_load
from .config import ConfigError, json_value
from .distributed import rank_world

__all__ = ["check_deepspeed_version", "DeepSpeedVersionError", "TESTED_DEEPSPEED", "OptimConfig", "DeepSpeedSettings", "gradient_accumulation_steps", "resolve_bf16",
           "build_ds_config", "weight_decay_groups", "WarmupCosine", "WarmupExponential", "lr_schedule",
           "apply_activation_checkpointing",
           "build_engine", "consolidated_state_dict", "EMA"]


# The DeepSpeed releases this module was validated on: it patches DeepSpeed's private internals
# (the ZeRO-3 hooks, the shm op build, the optimizer's step; see build_engine), which change
# between minor releases without notice. Checked by hand and by the suite on 0.19.8.
TESTED_DEEPSPEED = ((0, 19), (0, 19))     # (lowest, highest) major.minor


class DeepSpeedVersionError(ConfigError):
    """The installed DeepSpeed is outside the tested range (one line, exit 2)."""


def check_deepspeed_version(version: str | None = None) -> str:
    """Refuse a DeepSpeed outside :data:`TESTED_DEEPSPEED` before anything starts;
    ``VQSCALE_UNTESTED_DEEPSPEED=1`` turns the refusal into a warning. Returns the version."""
    import importlib.metadata
    import logging
    import re

    version = version or importlib.metadata.version("deepspeed")
    m = re.match(r"(\d+)\.(\d+)", version)
    lo, hi = TESTED_DEEPSPEED
    if m and lo <= (int(m.group(1)), int(m.group(2))) <= hi:
        return version
    msg = (f"DeepSpeed {version} is not a release vqscale was tested on ({lo[0]}.{lo[1]}.x to {hi[0]}.{hi[1]}.x: "
           f"pretrain/engine.py patches its internals): install one with `pip install 'deepspeed=="
           f"{hi[0]}.{hi[1]}.*'` (make install pins it), or set VQSCALE_UNTESTED_DEEPSPEED=1 to run anyway")
    if os.environ.get("VQSCALE_UNTESTED_DEEPSPEED", "") == "1":
        logging.getLogger("vqscale.engine").warning("%s", msg)
        return version
    raise DeepSpeedVersionError(msg)


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


@dataclass(frozen=True)
class DeepSpeedSettings:
    """The DeepSpeed knobs vqscale names; anything else goes through ``passthrough``."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    bf16: Union[Literal["auto"], bool] = "auto"          # auto: bf16 on CUDA, fp32 on CPU
    offload_optimizer: bool = False
    offload_params: bool = False                        # ZeRO-3 only
    overlap_comm: Union[Literal["auto"], bool] = "auto"  # auto: on with CUDA
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000              # ZeRO-3
    param_persistence_threshold: int = 100_000          # ZeRO-3: smaller tensors stay whole on every rank
    # True / "full": recompute whole blocks in backward; "selective": keep the outputs of matmuls
    # and attention, recompute only the cheap ops between them (torchtitan's op-level SAC)
    activation_checkpointing: Union[bool, Literal["full", "selective"]] = False
    passthrough: dict[str, Any] = field(default_factory=dict)


def _on_cuda() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cuda"


def resolve_bf16(setting: Union[str, bool]) -> bool:
    return _on_cuda() if setting == "auto" else bool(setting)


def gradient_accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """``global = micro * world * accumulation``; the global batch stays fixed when the world changes."""
    per_step = micro_batch_size * world_size
    if micro_batch_size < 1 or global_batch_size < 1 or global_batch_size % per_step:
        raise ValueError(
            f"global batch size {global_batch_size} is not a multiple of micro batch {micro_batch_size} x "
            f"world size {world_size} = {per_step}; choose a micro batch or world size that divides it")
    return global_batch_size // per_step


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        v = json_value(v)          # passthrough strings given in code read as JSON too
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_ds_config(optim: OptimConfig, ds: DeepSpeedSettings, micro_batch_size: int,
                    global_batch_size: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config JSON (a plain dict) for these settings on ``world_size`` ranks."""
    cuda = _on_cuda()
    overlap = cuda if ds.overlap_comm == "auto" else bool(ds.overlap_comm)
    zero: dict[str, Any] = {"stage": ds.zero_stage, "overlap_comm": overlap, "contiguous_gradients": True,
                            "reduce_bucket_size": ds.reduce_bucket_size}
    if ds.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = ds.allgather_bucket_size
    if ds.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = ds.prefetch_bucket_size
        zero["stage3_param_persistence_threshold"] = ds.param_persistence_threshold
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    elif ds.offload_params:
        raise ValueError("offload_params needs zero_stage 3")
    if ds.offload_optimizer:
        if ds.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    cfg: dict[str, Any] = {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(global_batch_size, micro_batch_size, world_size),
        "gradient_clipping": float(optim.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": resolve_bf16(ds.bf16)},
        # torch's AdamW is in DeepSpeed's tested list; other client optimizers must pass too
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,         # vqscale logs its own metrics
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": False},
    }
    if _use_ds_optimizer(optim, ds):
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": optim.lr, "betas": list(optim.betas),
                                                         "eps": optim.eps, "weight_decay": optim.weight_decay}}
    return _deep_merge(cfg, ds.passthrough)


def _use_ds_optimizer(optim: OptimConfig, ds: DeepSpeedSettings) -> bool:
    return optim.optimizer == "deepspeed" or (optim.optimizer == "auto" and ds.offload_optimizer)


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


def _skip_cpu_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce kernel when its comm
    backend starts (about 100 s on a 2-core machine the first time; cached under
    ~/.cache/torch_extensions after). Only ``inference_all_reduce`` uses it; training collectives
    go through torch.distributed (gloo), so on CPU it is skipped (``VQSCALE_DS_SHM=1`` keeps it)."""
    if _on_cuda() or os.environ.get("VQSCALE_DS_SHM") == "1":
        return
    import importlib

    # by module path: the attribute deepspeed.comm.torch is the torch package itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _map_fields(value: Any, fn) -> Any:
    """``value`` (a dataclass instance) with ``fn`` applied to each field: the same object if no
    field changed, else a shallow copy with the changed fields set (frozen ones too)."""
    out = value
    for f in dataclasses.fields(value):
        old = getattr(value, f.name)
        new = fn(old)
        if new is not old:
            if out is value:
                out = copy.copy(value)
            object.__setattr__(out, f.name, new)
    return out


def _hooks_see_dataclasses() -> None:
    """Let DeepSpeed's output walks (ZeRO-3 module hooks, the engine's backward-prologue hooks)
    reach the tensors inside dataclass instances; see the module docstring. Idempotent."""
    from deepspeed.runtime import utils as ds_utils
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero import utils as zero_utils

    inner = zero_utils.apply_to_tensors_only
    if not getattr(inner, "_vqscale_dataclasses", False):
        def apply_to_tensors_only(function, value, warning_msg_fn=None):
            if _is_dataclass_instance(value):
                return _map_fields(value, lambda v: apply_to_tensors_only(function, v, warning_msg_fn))
            return inner(function, value, warning_msg_fn)

        apply_to_tensors_only._vqscale_dataclasses = True
        # DeepSpeed's own recursion (tuples, lists, dicts) looks the name up in zero.utils, so a
        # dataclass inside a container is reached too; parameter_offload imported it by name
        zero_utils.apply_to_tensors_only = apply_to_tensors_only
        parameter_offload.apply_to_tensors_only = apply_to_tensors_only

    manager = ds_utils.OutputBackwardHookManager
    traverse = manager._traverse_and_register_hooks
    if not getattr(traverse, "_vqscale_dataclasses", False):
        def _traverse_and_register_hooks(self, outputs, first_tensor_holder):
            if _is_dataclass_instance(outputs):
                for f in dataclasses.fields(outputs):
                    self._traverse_and_register_hooks(getattr(outputs, f.name), first_tensor_holder)
            else:
                traverse(self, outputs, first_tensor_holder)

        _traverse_and_register_hooks._vqscale_dataclasses = True
        manager._traverse_and_register_hooks = _traverse_and_register_hooks


def build_engine(model: nn.Module, optim_cfg: OptimConfig, ds_settings: DeepSpeedSettings,
                 micro_batch_size: int, global_batch_size: int, param_groups: list[dict] | None = None,
                 name: str = "model"):
    """Wrap ``model`` in a DeepSpeed engine (initializing the process group if needed).

    The model is built whole on every rank and partitioned here. (``deepspeed.zero.Init`` is not
    used: model_zoo models initialize their weights in ``init_weights()`` at the end of
    ``__init__``, which writes nothing into parameters zero.Init has already partitioned; a
    vim-small-tiny built under it kept PyTorch's default init, head std 0.073 instead of 0.02.)

    ``param_groups`` (AdamW groups, e.g. with their own ``lr``) replaces :func:`weight_decay_groups`;
    frozen parameters are dropped from them either way. The engine steps its LambdaLR
    (:func:`lr_schedule`) at each gradient-accumulation boundary.
    """
    import deepspeed
    import torch.distributed as dist

    from .distributed import init_distributed

    if not dist.is_initialized():
        init_distributed()
    _skip_cpu_shm_build()
    _hooks_see_dataclasses()
    world = dist.get_world_size()
    if ds_settings.activation_checkpointing:
        apply_activation_checkpointing(model, ds_settings.activation_checkpointing)
    groups = param_groups if param_groups is not None else weight_decay_groups(model, optim_cfg.weight_decay)
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"engine {name!r}: the model has no trainable parameters")
    cfg = build_ds_config(optim_cfg, ds_settings, micro_batch_size, global_batch_size, world)
    optimizer = None
    if not _use_ds_optimizer(optim_cfg, ds_settings):
        fused = _on_cuda() and not ds_settings.offload_optimizer

        def optimizer(params):
            return torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                                     weight_decay=optim_cfg.weight_decay, fused=fused or None)

    schedule = lr_schedule(optim_cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups, optimizer=optimizer, config=cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    engine.vqscale_name = name
    engine.vqscale_ds_config = cfg
    _skip_nonfinite_steps(engine)
    _row_writes_after_step(engine)
    return engine


# ---- rows written outside the optimizer (dead-code restarts) ---------------------------------------
_MOMENTS = ("exp_avg", "exp_avg_sq")


def _row_writes_after_step(engine) -> None:
    """Wrap ``engine.step``: after every call (each micro-batch; the optimizer steps at the
    accumulation boundary) the row writes the model queued during that micro-batch
    (:func:`model_zoo.interfaces.pop_row_writes`) are applied by :func:`apply_row_writes`, so a
    dead-code restart survives ZeRO's master copy. Applying them per micro-batch, not only at the
    boundary, lets the next micro-batch see the new rows at every stage alike: a module's in-place
    write persists in ZeRO-1/2's full working copy but not in ZeRO-3's gathered one. Models
    without row writes cost one walk over their modules per micro-batch.

    Writes whose mask is all False (a restart check that found no dead code: most steps) are
    dropped here, at the cost of one host read of the masks after the backward (a deliberate sync,
    listed in tests/test_host_sync.py): applying them would all-reduce the full codebook three
    times per micro-batch (master copy and two Adam moments, 24 MiB for vqgan-f8's 8192 x 256
    codes) to write nothing. The host waits for the backward it just queued; at an accumulation
    boundary DeepSpeed's own overflow check has waited for it already."""
    from model_zoo.interfaces import pop_row_writes

    inner = engine.step
    engine.row_writes_applied = {}              # parameter name -> rows written since the EMA's update

    def step(*args, **kwargs):
        out = inner(*args, **kwargs)
        writes = pop_row_writes(engine.module)
        if writes:
            # every rank holds the same masks (decided on rank 0, broadcast): the same decision
            live = torch.stack([w.mask.any() for w in writes]).tolist()
            writes = [w for w, on in zip(writes, live) if on]
        if writes:
            apply_row_writes(engine, writes)
        return out

    engine.step = step


def _full_optimizer_state(engine, p, key: str, getter):
    """``safe_get_full_optimizer_state(p, key)``, or None before the optimizer has any state.

    DeepSpeed 0.19.8's ZeRO-1/2 and bf16 optimizers link a parameter to its optimizer state once,
    right after the first group's first step (``_lazy_init_hp_params_optimizer_state``), when the
    torch optimizer has no state yet for the other parameter groups: parameters outside group 0
    (the codebook is in the no-weight-decay group) stay linked to nothing and the getter raises
    ``ValueError: exp_avg not found``. Linking again once state exists fixes that for good."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)
    if inner is not None and not getattr(inner, "state", None):
        return None                             # before the first optimizer step: no state yet
    for attempt in (0, 1):
        try:
            return getter(p, key)
        except KeyError:
            return None                         # ZeRO-3: this optimizer keeps no such state (not Adam)
        except (ValueError, TypeError):         # not linked ("not found", or no fragment dict at all)
            if attempt or not hasattr(opt, "_hp_optimizer_states_linked"):
                return None
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
    return None


@torch.no_grad()
def apply_row_writes(engine, writes) -> None:
    """Write ``param[mask] = values[mask]`` into every copy the optimizer keeps, and zero those
    rows' Adam moments (a restarted code starts its optimizer state afresh).

    A collective under ZeRO (every rank calls it with the same writes; restarts are decided on
    rank 0 and broadcast). Through DeepSpeed's documented setters: ``safe_get/set_full_fp32_param``
    and ``safe_get/set_full_optimizer_state`` for the fp32 master partitions (ZeRO-1/2/3 and the
    bf16 optimizer); the working copy is the full parameter at ZeRO-1/2 (written in place) and a
    partition at ZeRO-3 (written through ``GatheredParameters`` with a modifier rank). At stage 0
    the parameter is the master copy and the torch optimizer's per-parameter state holds the
    moments. A mask that is all False writes the old values back (the caller drops such writes)."""
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                                 safe_set_full_fp32_param, safe_set_full_optimizer_state)

    names = getattr(engine, "_vqscale_param_names", None)
    if names is None:                           # built once: the module's parameters do not change
        names = engine._vqscale_param_names = {id(p): n for n, p in engine.module.named_parameters()}
    for w in writes:
        p = w.param
        rows = w.mask.reshape(-1, *([1] * (w.values.dim() - 1)))
        master = safe_get_full_fp32_param(p)
        if master is not None:                  # ZeRO-1/2/3 or the bf16 optimizer
            safe_set_full_fp32_param(p, torch.where(rows, w.values.to(master), master).to(master.dtype))
            for key in _MOMENTS:
                state = _full_optimizer_state(engine, p, key, safe_get_full_optimizer_state)
                if state is not None:
                    safe_set_full_optimizer_state(p, state.masked_fill(rows, 0.0), key)
        else:                                   # stage 0: the parameter is what the optimizer steps
            opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
            state = getattr(opt, "state", {}).get(p, {})
            for key in _MOMENTS:
                if isinstance(state.get(key), torch.Tensor):
                    state[key].masked_fill_(rows.to(state[key].device), 0.0)
        with gathered([p], modifier_rank=0):
            p.data.copy_(torch.where(rows, w.values.to(p.data), p.data))
        applied, n = getattr(engine, "row_writes_applied", None), names.get(id(p))
        if applied is not None:
            applied[n] = w.mask.clone() if n not in applied else applied[n] | w.mask


# ---- non-finite steps (see the module docstring) ---------------------------------------------------
def _skip_nonfinite_steps(engine) -> None:
    """Make ``engine`` skip every optimizer step whose gradients are not all finite, with the same
    decision on every rank (``engine.optimizer.overflow`` set, so DeepSpeed counts it in
    ``engine.skipped_steps`` and does not advance the LR schedule). What each stage needs is in the
    module docstring."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if isinstance(opt, DeepSpeedZeroOptimizer):
        # the norm check covers fp32 (and bf16 with the flag check on); else turn the flag check on
        if not opt.compute_grad_norm or (opt.dtype == torch.bfloat16 and not opt.check_grad_overflow):
            opt.check_grad_overflow = True
    elif isinstance(opt, (DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer, FP16_Optimizer, FP16_UnfusedOptimizer)):
        pass                                       # they skip on a non-finite norm / gradient already
    elif isinstance(opt, torch.optim.Optimizer) and opt is engine.basic_optimizer:
        _guard_bare_optimizer(engine)              # stage 0, fp32
    else:
        raise TypeError(f"engine {getattr(engine, 'vqscale_name', '')!r}: optimizer wrapper {type(opt).__name__} "
                        "is not known to skip non-finite steps (see pretrain/engine.py)")


def _guard_bare_optimizer(engine) -> None:
    """Stage 0, fp32: wrap ``engine.optimizer.step`` (the bare torch optimizer) in a check.

    At the accumulation boundary DeepSpeed has already averaged the gradients over the ranks, so
    every rank holds the same gradients. The wrapped step computes their global L2 norm, makes it
    ``inf`` if it is not finite and takes the MAX over the ranks (one 1-element all-reduce: the
    decision is the same everywhere even if the norms were to differ in the last bit). If it is
    ``inf`` the step is skipped and ``overflow`` set; else the gradients are clipped to the
    engine's ``gradient_clipping`` with that norm (the rule of DeepSpeed's ``clip_grad_norm_``:
    ``min(1, clip / (norm + 1e-6))``) and the optimizer steps. ``_global_grad_norm`` (read by
    ``engine.get_global_grad_norm()``) is the norm before clipping, ``inf`` on a skipped step.
    """
    import functools

    import torch.distributed as dist

    opt = engine.optimizer
    params = [p for g in opt.param_groups for p in g["params"]]
    clip = float(engine.gradient_clipping())
    inner = opt.step
    opt.overflow = False
    opt._global_grad_norm = None

    @functools.wraps(inner)         # copies LambdaLR's `_wrapped_by_lr_sched` marker along
    def step(*args, **kwargs):
        grads = [p.grad for p in params if p.grad is not None]
        norm = (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float32)
                                                      for g in grads])) if grads else torch.zeros(()))
        norm = torch.where(torch.isfinite(norm), norm, torch.full_like(norm, math.inf)).reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                      else torch.device("cpu"))
            norm = norm.to(device)
            dist.all_reduce(norm, op=dist.ReduceOp.MAX)
        total = float(norm.item())
        opt.overflow = not math.isfinite(total)
        opt._global_grad_norm = math.inf if opt.overflow else total
        if opt.overflow:
            return None             # the engine's zero_grad() drops the accumulated gradients next
        if clip > 0 and grads:
            coef = torch.clamp(clip / (norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef.to(g.device, g.dtype))
        return inner(*args, **kwargs)

    opt.step = step
    # the wrapped step clips (after its check, with the norm it took); the engine's own fp32
    # clipping, which runs before optimizer.step(), would compute and all-reduce the norm again
    engine.clip_fp32_gradients = lambda: None


def gathered(params: list, modifier_rank: int | None = None):
    """Whole parameters to read (or, with ``modifier_rank``, to write from that rank): ZeRO-3's
    partitions gathered; a no-op for parameters that are not partitioned. The one place outside
    an engine's step that reaches into ZeRO-3's partitioning."""
    part = [p for p in params if hasattr(p, "ds_id")]
    if not part:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(part, modifier_rank=modifier_rank)


def consolidated_state_dict(engine) -> dict[str, torch.Tensor]:
    """The whole module state dict as CPU tensors on every rank (a collective under ZeRO-3, which
    gathers all partitions at once: meant for export and tests, not for every step)."""
    module = engine.module
    with gathered(list(module.parameters())):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


# ---- EMA -----------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of an engine's trainable weights, sharded like ZeRO-3.

    Every rank keeps, for each parameter, only its contiguous slice of the flattened tensor:
    elements ``[rank * c, rank * c + c)`` with ``c = ceil(numel / world)``, which is exactly the
    partition ZeRO-3 keeps in ``param.ds_tensor``. Under ZeRO-3 the update reads that local
    partition (no communication at all); under ZeRO-0/1/2 it slices the full local parameter. So
    the EMA costs ``1/world`` of the fp32 weights per rank at every stage, and is consistent by
    construction: the slices of all ranks tile the tensor. Saved per rank with their offsets, it
    loads at any world size (each rank picks the pieces overlapping its new slice).
    """

    def __init__(self, engine, decay: float = 0.9999, warmup: bool = False):
        self.engine, self.decay, self.warmup = engine, float(decay), warmup
        self.num_updates = 0
        self.rank, self.world = rank_world()
        self.params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
        # other names of the same tensors (tied weights), so full_state_dict fills every key
        canonical = {id(p): n for n, p in self.params.items()}
        self.aliases = {n: canonical[id(p)] for n, p in engine.module.named_parameters(remove_duplicate=False)
                        if id(p) in canonical and canonical[id(p)] != n}
        self.shards = {n: self._local(p).float().clone() for n, p in self.params.items()}

    def _bounds(self, numel: int) -> tuple[int, int]:
        chunk = -(-numel // self.world)
        start = min(self.rank * chunk, numel)
        return start, min(chunk, numel - start)

    def _numel(self, p) -> int:
        return int(p.ds_numel) if hasattr(p, "ds_tensor") else p.numel()

    def _local(self, p) -> torch.Tensor:
        start, n = self._bounds(self._numel(p))
        if hasattr(p, "ds_tensor"):                      # ZeRO-3: the local partition, padded
            return p.ds_tensor.detach().view(-1)[:n]
        return p.detach().reshape(-1)[start:start + n]

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self) -> None:
        """Call after each optimizer step (``engine.is_gradient_accumulation_boundary()``). Rows
        written outside the optimizer since the last update (dead-code restarts, see
        :func:`apply_row_writes`) restart in the average too: it takes their new value, rather than
        a blend of a dead code and its replacement that matches neither."""
        d = self.current_decay()
        for n, p in self.params.items():
            self.shards[n].mul_(d).add_(self._local(p).float(), alpha=1.0 - d)
        for n, mask in getattr(self.engine, "row_writes_applied", {}).items():
            if n in self.shards:
                p = self.params[n]
                shape = list(p.ds_shape) if hasattr(p, "ds_shape") else list(p.shape)
                per_row = int(torch.Size(shape[1:]).numel())
                start, count = self._bounds(self._numel(p))
                rows = mask.to(self.shards[n].device).repeat_interleave(per_row)[start:start + count]
                self.shards[n].copy_(torch.where(rows, self._local(p).float(), self.shards[n]))
        if hasattr(self.engine, "row_writes_applied"):
            self.engine.row_writes_applied.clear()
        self.num_updates += 1

    # -- save / load (per rank, world-size independent) --
    def state_dict(self) -> dict[str, Any]:
        shards = {}
        for n, p in self.params.items():
            numel = self._numel(p)
            shape = list(p.ds_shape) if hasattr(p, "ds_shape") else list(p.shape)
            shards[n] = {"start": self._bounds(numel)[0], "numel": numel, "shape": shape,
                         "data": self.shards[n].cpu()}
        return {"decay": self.decay, "num_updates": self.num_updates, "world_size": self.world,
                "rank": self.rank, "shards": shards}

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        torch.save(self.state_dict(), os.path.join(folder, f"rank{self.rank}.pt"))

    def load(self, folder: str) -> None:
        """Load the shards saved by any world size (reads every rank file of ``folder``)."""
        files = sorted(f for f in os.listdir(folder) if f.startswith("rank") and f.endswith(".pt"))
        states = [safe_load.load(os.path.join(folder, f), map_location="cpu") for f in files]
        if not states or len(states) != states[0]["world_size"]:
            raise FileNotFoundError(f"EMA shards in {folder} are incomplete ({len(states)} files)")
        self.num_updates = int(states[0]["num_updates"])
        for n, p in self.params.items():
            start, count = self._bounds(self._numel(p))
            out = self.shards[n]
            filled = 0
            for st in states:
                piece = st["shards"][n]
                lo, hi = max(start, piece["start"]), min(start + count, piece["start"] + piece["data"].numel())
                if hi > lo:
                    out[lo - start:hi - start].copy_(piece["data"][lo - piece["start"]:hi - piece["start"]])
                    filled += hi - lo
            if filled != count:
                raise ValueError(f"EMA shards in {folder} do not cover {n}")

    # -- whole weights --
    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The module state dict with the EMA (fp32) in place of the trainable weights, on every
        rank (a collective: one all_gather of all shards, plus the ZeRO-3 gather of the rest)."""
        import torch.distributed as dist

        full = consolidated_state_dict(self.engine)
        names = list(self.params)
        chunks = [-(-self._numel(self.params[n]) // self.world) for n in names]
        buf = torch.zeros(sum(chunks), dtype=torch.float32)
        off = 0
        for n, c in zip(names, chunks):
            buf[off:off + self.shards[n].numel()] = self.shards[n].cpu()
            off += c
        if self.world > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            parts = [torch.empty_like(buf, device=device) for _ in range(self.world)]
            dist.all_gather(parts, buf.to(device))
            parts = [t.cpu() for t in parts]
        else:
            parts = [buf]
        off = 0
        for n, c in zip(names, chunks):
            numel = self._numel(self.params[n])
            flat = torch.cat([t[off:off + c] for t in parts])[:numel]
            full[n] = flat.view(full[n].shape)          # fp32, whatever the training dtype
            off += c
        for alias, n in self.aliases.items():
            if alias in full:
                full[alias] = full[n]
        return full

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Evaluate with the EMA weights: load them into the module, restore the live ones after
        (a collective; the optimizer's master weights are untouched)."""
        ema = self.full_state_dict()
        live = consolidated_state_dict(self.engine)
        self._write(ema)
        try:
            yield
        finally:
            self._write(live)

    @torch.no_grad()
    def _write(self, full: dict[str, torch.Tensor]) -> None:
        for n, p in self.params.items():
            with gathered([p], modifier_rank=0):
                p.data.copy_(full[n].to(p.device, p.dtype))
