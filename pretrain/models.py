"""The run's model: a registry preset (``RunConfig.model``) built with the run's ``model_args`` and
what the data derives (a prior's grid and codebook from its code manifest), and the check that
those arguments fit the preset, done on the meta device before a run starts or a job is queued.

Shared by the Trainer, the FLOP counter, the export (``pretrain.resolve``) and ``vqscale submit``,
so it sits below all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import ConfigError

if TYPE_CHECKING:
    from .recipes import RunConfig

__all__ = ["model_from_config", "check_model_args", "preset_args"]


def _tuples(v: Any) -> Any:
    """JSON lists as the tuples the presets' frozen configs hold."""
    if isinstance(v, list):
        return tuple(_tuples(x) for x in v)
    if isinstance(v, dict):
        return {k: _tuples(x) for k, x in v.items()}
    return v


def preset_args(cfg: RunConfig) -> dict[str, Any]:
    """``cfg.model_args`` as keyword arguments of the preset."""
    return _tuples(dict(cfg.model_args))


def model_from_config(cfg: RunConfig, derived: dict[str, Any] | None = None, device=None) -> nn.Module:
    """The run's model: ``cfg.model`` with ``cfg.model_args``, plus ``derived`` values (from the
    data, e.g. a prior's grid and codebook from the code manifest) for fields the preset's config
    has and ``model_args`` does not set."""
    from model_zoo.package import model_config
    from model_zoo.registry import create_model

    args = preset_args(cfg)
    if derived:
        with torch.device("meta"):
            names = {f.name for f in dataclasses.fields(model_config(create_model(cfg.model, **args)))}
        args.update({k: _tuples(v) for k, v in derived.items() if k in names and k not in args and v is not None})
    ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    with ctx:
        return create_model(cfg.model, **args)


def check_model_args(cfg: RunConfig) -> None:
    """``model_args`` that the preset's config does not take (a mistyped ``--set model_args.X=``)
    or rejects: a config error naming the preset, found by building it on the meta device before
    anything starts (it was a TypeError from inside the run's setup, after the process group)."""
    if not cfg.model_args:
        return
    from model_zoo.registry import create_model

    try:
        with torch.device("meta"):
            create_model(cfg.model, **preset_args(cfg))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model_args {json.dumps(cfg.model_args)} for model {cfg.model!r}: {e}") from None
