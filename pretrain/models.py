"""The run's model: a registry preset (``RunConfig.model``) built with the run's ``model_args`` and
what the data derives (a prior's grid and codebook from its code manifest), and the check that
those arguments fit the preset, done on the meta device before a run starts or a job is queued.
The typed ``model`` branch of the run config (``--set model.quantizer.codebook_size=1024`` checked
against the preset's config dataclass) is :mod:`pretrain.model_overrides`, below this module and
the recipes.

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

from model_zoo.package import model_config
from model_zoo.registry import create_model

from .config import ConfigError, to_dict
from .model_overrides import checked_model_args

if TYPE_CHECKING:
    from .recipes import DiscriminatorConfig, RunConfig

__all__ = ["model_from_config", "check_model_args", "preset_args"]


def _tuples(v: Any) -> Any:
    """JSON lists as the tuples the presets' frozen configs hold."""
    if isinstance(v, list):
        return tuple(_tuples(x) for x in v)
    if isinstance(v, dict):
        return {k: _tuples(x) for k, x in v.items()}
    return v


def preset_args(cfg: RunConfig | DiscriminatorConfig) -> dict[str, Any]:
    """``cfg.model_args`` as keyword arguments of the preset ``cfg.model`` (the run's model or the
    discriminator)."""
    return _tuples(dict(cfg.model_args))


def model_from_config(cfg: RunConfig, derived: dict[str, Any] | None = None, device=None) -> nn.Module:
    """The run's model: ``cfg.model`` with ``cfg.model_args``, plus ``derived`` values (from the
    data, e.g. a prior's grid and codebook from the code manifest) for fields the preset's config
    has and ``model_args`` does not set."""
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
    anything starts (it was a TypeError from inside the run's setup, after the process group).
    First every entry is walked against the preset's config dataclass (an unknown preset, field or
    a value of the wrong type: the one-line error of ``--set model.FIELD=``), for model_args that
    came from a recipe or a config file rather than an override; the discriminator's too."""
    checked_model_args(cfg.model, dict(cfg.model_args))
    disc = getattr(cfg, "discriminator", None)
    checks = [(cfg.model, preset_args(cfg), "model_args")]
    if disc is not None and disc.model:
        checked_model_args(disc.model, dict(disc.model_args), "discriminator.model_args")
        checks.append((disc.model, preset_args(disc), "discriminator.model_args"))
    for name, args, key in checks:
        if not args:
            continue
        try:
            with torch.device("meta"):
                create_model(name, **args)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key} {json.dumps(to_dict(args))} for model {name!r}: {e}") from None

