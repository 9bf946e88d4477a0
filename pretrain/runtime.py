"""The one DeepSpeed adapter: the only module of the packages that imports ``deepspeed`` (inside
its functions, so importing this module does not load it).

Owns: the version check (:data:`TESTED_DEEPSPEED`), :class:`DeepSpeedSettings` and the config
JSON it resolves to with an ``OptimConfig`` (:func:`build_ds_config`; ``passthrough`` is
deep-merged last, so any DeepSpeed setting can be given), :func:`build_engine` and the patches it
applies, whole ZeRO-3 parameters (:func:`gathered` and the ``ds_*`` attributes behind
:func:`is_partitioned`, :func:`full_numel`, :func:`full_shape`, :func:`local_partition`), and
what checkpoints need of DeepSpeed (universal format, zero_to_fp32, the classes it pickles: the
allowlist of :mod:`pretrain.safe_load`). The rest of a run is plain torch: :mod:`pretrain.optim`,
:mod:`pretrain.ema`, :mod:`pretrain.activation_checkpointing`, :mod:`pretrain.checkpoint`.

DeepSpeed internals patched or reached into here, each explained where it is done: the CPU
shared-memory op build (:func:`_skip_cpu_shm_build`); the output walks of ZeRO-3's module hooks
and the engine's backward prologue (:func:`_hooks_see_dataclasses`, below); the optimizer's step
(:func:`_skip_nonfinite_steps`, below); ``engine.step`` and the ZeRO optimizers' link from a
parameter to its optimizer state (:func:`_row_writes_after_step`, :func:`_full_optimizer_state`);
the backward hooks' private counters (:func:`backward_hooks_paused`); the engine config's
``load_universal_checkpoint`` flag and two faults of the ZeRO-3 universal load
(:func:`load_universal_checkpoint`, :func:`repair_zero3_universal`). These change between minor
releases without notice, so a DeepSpeed outside :data:`TESTED_DEEPSPEED` is refused before a run
starts (:func:`check_deepspeed_version`: one line, exit 2; ``VQSCALE_UNTESTED_DEEPSPEED=1`` runs
anyway).

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

Models stay plain torch: the only model_zoo name used here is ``pop_row_writes`` (the row writes a
model queued).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
import torch.nn as nn

from model_zoo.interfaces import pop_row_writes

from .activation_checkpointing import apply_activation_checkpointing
from .config import ConfigError, json_value
from .distributed import init_distributed
from .optim import OptimConfig, gradient_accumulation_steps, lr_schedule, weight_decay_groups

log = logging.getLogger("vqscale.runtime")

__all__ = ["check_deepspeed_version", "DeepSpeedVersionError", "TESTED_DEEPSPEED", "DeepSpeedSettings",
           "resolve_bf16", "build_ds_config", "build_engine", "apply_row_writes", "gathered",
           "consolidated_state_dict", "is_partitioned", "full_numel", "full_shape", "local_partition",
           "backward_hooks_paused", "universal_checkpoint_info", "to_universal", "load_universal_checkpoint",
           "repair_zero3_universal", "zero_fp32_state_dict", "deepspeed_globals"]


# The DeepSpeed releases this module was validated on: it patches DeepSpeed's private internals
# (the ZeRO-3 hooks, the shm op build, the optimizer's step; see the module docstring), which change
# between minor releases without notice. Checked by hand and by the suite on 0.19.8.
TESTED_DEEPSPEED = ((0, 19), (0, 19))     # (lowest, highest) major.minor


class DeepSpeedVersionError(ConfigError):
    """The installed DeepSpeed is outside the tested range (one line, exit 2)."""


def check_deepspeed_version(version: str | None = None) -> str:
    """Refuse a DeepSpeed outside :data:`TESTED_DEEPSPEED` before anything starts;
    ``VQSCALE_UNTESTED_DEEPSPEED=1`` turns the refusal into a warning. Returns the version."""
    import importlib.metadata
    import re

    version = version or importlib.metadata.version("deepspeed")
    m = re.match(r"(\d+)\.(\d+)", version)
    lo, hi = TESTED_DEEPSPEED
    if m and lo <= (int(m.group(1)), int(m.group(2))) <= hi:
        return version
    msg = (f"DeepSpeed {version} is not a release vqscale was tested on ({lo[0]}.{lo[1]}.x to {hi[0]}.{hi[1]}.x: "
           f"pretrain/runtime.py patches its internals): install one with `pip install 'deepspeed=="
           f"{hi[0]}.{hi[1]}.*'` (make install pins it), or set VQSCALE_UNTESTED_DEEPSPEED=1 to run anyway")
    if os.environ.get("VQSCALE_UNTESTED_DEEPSPEED", "") == "1":
        log.warning("%s", msg)
        return version
    raise DeepSpeedVersionError(msg)


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
    if engine.bfloat16_enabled():
        _norm_statistics_as_weights(engine.module)
    _skip_nonfinite_steps(engine)
    _row_writes_after_step(engine)
    return engine


def _norm_statistics_as_weights(module: nn.Module) -> None:
    """In bf16, DeepSpeed casts the parameters but leaves the buffers in fp32, and batch norm
    needs its running statistics in its weight's dtype (a PatchGAN failed its first forward with
    "expected scalar type BFloat16 but found Float"). Only norm statistics are cast: the
    quantizers' fp32 usage statistics and EMA buffers stay fp32 on purpose."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.weight is not None:
            for name in ("running_mean", "running_var"):
                buf = getattr(m, name)
                if buf is not None and buf.dtype != m.weight.dtype:
                    setattr(m, name, buf.to(m.weight.dtype))


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
                        "is not known to skip non-finite steps (see pretrain/runtime.py)")


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


def is_partitioned(p) -> bool:
    """Whether ZeRO-3 partitions ``p`` (DeepSpeed marks such parameters with ``ds_id``): then
    ``p.data`` is an empty placeholder outside its module's forward, and the whole tensor is read
    or written through :func:`gathered`."""
    return hasattr(p, "ds_id")


def full_numel(p) -> int:
    """The number of elements of the whole parameter (ZeRO-3's ``ds_numel``; ``p.numel()`` would be
    that of the empty placeholder)."""
    return int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel()


def full_shape(p) -> list[int]:
    """The shape of the whole parameter (ZeRO-3's ``ds_shape``)."""
    return list(p.ds_shape) if hasattr(p, "ds_shape") else list(p.shape)


def local_partition(p) -> torch.Tensor | None:
    """This rank's ZeRO-3 partition of ``p`` (``ds_tensor``: elements ``[rank * c, rank * c + c)`` of
    the flattened tensor, ``c = ceil(numel / world)``, zero-padded at the end), or None when ``p``
    is not partitioned."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else None


# ---- an autograd.grad that is not the engine's backward ------------------------------------------
def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif _is_dataclass_instance(value):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


@contextlib.contextmanager
def backward_hooks_paused(outputs: Any, module: nn.Module):
    """While an ``autograd.grad`` that is not the engine's backward runs through the graph of an
    engine's forward (``outputs``: what it returned; ``module``: the engine's module): DeepSpeed's
    output hooks (``OutputBackwardHookManager``: backward prologue once, and a division by the
    accumulation steps per tensor) do nothing, and ZeRO-3's pre-backward module functions
    (parameter fetch, reference count) do nothing; everything is restored after, so the engine's
    real backward runs them exactly as without this call.

    Why by hand: DeepSpeed has no switch for either. The hook managers hang off the output
    tensors (``_backward_hook_managers``) and skip their work once ``preprocess_done`` is set (and
    ``preprocess_per_tensor_fn`` is None); ZeRO-3 counts pending pre-backward calls in each
    module's ``applied_pre_backward_ref_cnt``. All three are private attributes of DeepSpeed
    0.19.8, saved, overridden for the block and put back. Used for GAN's adaptive weight
    (:mod:`pretrain.gan`, point 3 of its docstring)."""
    managers = {}
    for t in _tensors(outputs):
        for m in getattr(t, "_backward_hook_managers", ()):
            managers[id(m)] = m
    saved = [(m, m.preprocess_done, m.preprocess_per_tensor_fn) for m in managers.values()]
    counts = [(mod, mod.__dict__["applied_pre_backward_ref_cnt"]) for mod in module.modules()
              if "applied_pre_backward_ref_cnt" in mod.__dict__]
    for m, _, _ in saved:
        m.preprocess_done, m.preprocess_per_tensor_fn = True, None
    for mod, _ in counts:
        mod.applied_pre_backward_ref_cnt = 0
    try:
        yield
    finally:
        for m, done, fn in saved:
            m.preprocess_done, m.preprocess_per_tensor_fn = done, fn
        for mod, c in counts:
            mod.applied_pre_backward_ref_cnt = c


# ---- checkpoints: the universal format, zero_to_fp32, the pickled classes ---------------------------
def universal_checkpoint_info() -> dict[str, Any]:
    """The client-state entry every engine checkpoint carries: ``ds_to_universal`` (0.19.8) asserts
    that the model states hold it; it is what makes a checkpoint convertible, i.e. loadable on
    another world size."""
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def to_universal(engine_dir: str, out_dir: str) -> str:
    """Convert one engine's DeepSpeed checkpoint folder into the universal format in ``out_dir``:
    ``ds_to_universal`` in-process, one worker (no process pool inside a training rank). Returns
    what it printed (stdout and stderr, kept off the console)."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=engine_dir, output_folder=out_dir, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        ds_to_universal.main(args)
    return out.getvalue()


def load_universal_checkpoint(engine, load_dir: str, tag: str):
    """``engine.load_checkpoint(load_dir, tag=tag)`` from a folder in the universal format; returns
    what it returns (``(path, client_state)``).

    DeepSpeed has no argument for it: it reads the flag ``load_universal_checkpoint`` of the
    engine's private ``_config``, and only at load time. The flag is set for this one call and
    reset after, so the engine's own config (``checkpoint.load_universal=false``) holds otherwise."""
    engine._config.load_universal_checkpoint = True
    try:
        return engine.load_checkpoint(load_dir, tag=tag)
    finally:
        engine._config.load_universal_checkpoint = False


def repair_zero3_universal(engine, universal_dir: str, load) -> None:
    """Undo two faults of DeepSpeed 0.19.8's ZeRO-3 universal load (stage3.py,
    ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``), found by resuming through the
    universal format on the same world size and comparing with a direct resume:

    - one ``step`` tensor object is put in the state of every sub-group; torch's AdamW increments
      it in place, so with two parameter groups it advances twice per step and the second group's
      bias correction is wrong from the first step on. Each sub-group gets its own copy (the ZeRO-3
      optimizer's private ``fp32_partitioned_groups_flat`` are the keys of that state).
    - every parameter group gets the hyperparameters of group 0 (a no-decay group then decays).
      They are restored per group from the converted ``zero/optimizer_state.pt``.

    ``load`` reads that file (:func:`pretrain.safe_load.load`; passed in because safe_load imports
    this module for its allowlist). Nothing happens below stage 3.
    """
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_GROUPS

    opt = engine.optimizer
    base = getattr(opt, "optimizer", None)
    if engine.zero_optimization_stage() != 3 or base is None:
        return
    for flat in getattr(opt, "fp32_partitioned_groups_flat", []):
        st = base.state.get(flat)
        if st is not None and torch.is_tensor(st.get("step")):
            st["step"] = st["step"].clone()
    sd = load(os.path.join(universal_dir, "zero", "optimizer_state.pt"), map_location="cpu")
    saved = sd.get(OPTIMIZER_STATE_DICT, {}).get(PARAM_GROUPS) or sd.get(PARAM_GROUPS) or []
    if len(saved) != len(base.param_groups):
        log.warning("cannot restore per-group optimizer settings after the ZeRO-3 universal load "
                    "(%d saved groups, %d now)", len(saved), len(base.param_groups))
        return
    for group, old in zip(base.param_groups, saved):
        group.update({k: v for k, v in old.items() if k != "params"})


def zero_fp32_state_dict(checkpoint_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """DeepSpeed's zero_to_fp32: the fp32 weights of engine folder ``tag`` of ``checkpoint_dir`` merged
    from its ZeRO shards, without any process group (what it prints is dropped). It loads with
    ``torch.load``: call it inside :func:`pretrain.safe_load.weights_only_loads`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):
        return dict(get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag))


def deepspeed_globals() -> list[Any]:
    """The non-tensor classes DeepSpeed pickles into its checkpoints, the allowlist of
    :mod:`pretrain.safe_load` (imported lazily: DeepSpeed is not needed to read vqscale's own
    files)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [ZeroStageEnum, LossScaler, fragment_address]
