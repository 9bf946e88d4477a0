"""The typed ``model`` branch of the run config: ``--set model.FIELD[.SUB...]=VALUE``.

``model`` names a registry preset and ``model_args`` holds overrides of that preset's frozen config
dataclass, as a nested dict (what config.json and checkpoints store). An override under ``model.``
(or, as before, ``model_args.``) is walked against the preset's config dataclass like ``optim.lr``
against OptimConfig: an unknown field is one line with the closest valid one, the value is coerced
to the field's type (pretrain.config._coerce), and the checked value goes into ``model_args``
(``--set model.quantizer.codebook_size=1024`` -> ``model_args == {"quantizer": {"codebook_size": 1024}}``).
The same for ``discriminator.model.FIELD=``.

RunConfig and DiscriminatorConfig (pretrain/recipes.py) route their ``model.``/``model_args.``
overrides here through pretrain.config's ``__config_override__`` hook, and the ``model_args`` that
pretrain.config.from_dict reads back through ``__config_check__``; pretrain.models.check_model_args
walks a whole ``model_args`` before it builds the preset on the meta device. pretrain.config stays
generic (it never imports model_zoo); this module imports model_zoo (the registry and the package
format) and nothing of pretrain but pretrain.config (the recipes import it). A preset's config is
built when the preset is first looked at.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Union, get_args, get_origin

import torch

from model_zoo.package import PackageError, model_config
from model_zoo.registry import create_model, model_entry

from .config import ConfigError, _coerce, _set_in_dict, _unknown, json_value, to_dict

__all__ = ["TypedModelArgs", "preset_config", "override_model_args", "checked_model_args", "check_loaded_model_args"]


@functools.lru_cache(maxsize=None)
def preset_config(name: str) -> Any:
    """The frozen config dataclass (an instance: the preset's own values) of registry preset
    ``name``, built once on the meta device; None when the preset's model has no config dataclass
    (its ``model_args`` are then passed on unchecked)."""
    try:
        model_entry(name)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    with torch.device("meta"):
        model = create_model(name)
    try:
        return model_config(model)
    except PackageError:
        return None


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _section(tp: Any) -> type | None:
    """The config dataclass a field of type ``tp`` holds (also ``X | None``), else None."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        found = [a for a in get_args(tp) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        if len(found) == 1:
            return found[0]
    return None


class _Walk:
    """One override ``full`` (or one model_args entry) walked against preset ``preset``'s config;
    the ``where`` of each step is the key so far as the user spelled it (``model``, ``model_args``,
    ``discriminator.model``, then ``.FIELD``...)."""

    def __init__(self, preset: str, full: str):
        self.preset, self.full = preset, full

    def field(self, cls: type, name: str, key: str) -> Any:
        """The type of field ``name`` of ``cls``; an unknown name is the one-line error."""
        fields = _fields(cls)
        if name not in fields:
            e = _unknown(key, name, fields)
            raise ConfigError(f"{e} ({cls.__name__} of model '{self.preset}')") from None
        return fields[name]

    def names(self, cls: type, path: list[str], where: str) -> None:
        """Only the field names of ``path`` (removing an entry checks no value)."""
        for name in path:
            where = f"{where}.{name}"
            cls = _section(self.field(cls, name, where))
            if cls is None:
                return

    def put(self, current: dict, cls: type, path: list[str], raw: Any, where: str) -> dict:
        """``current`` (a model_args level for dataclass ``cls``) with ``path`` set to ``raw``."""
        name, rest = path[0], path[1:]
        key = f"{where}.{name}"
        tp = self.field(cls, name, key)
        new = dict(current)
        sub = _section(tp)
        if not rest:
            value = json_value(raw) if sub is not None and isinstance(raw, str) else raw
            if sub is not None and isinstance(value, dict):      # model.quantizer={"kind": "fsq"}: field by field
                for k, v in value.items():
                    new = self.put(new, cls, [name, str(k)], v, where)
                if not value:
                    new.setdefault(name, {})
                return new
            new[name] = to_dict(_coerce(raw, tp, key))     # as JSON holds it: tuples as lists
            return new
        if sub is None and get_origin(tp) is not dict and tp is not Any:
            raise ConfigError(f"config key '{key}' is a value, not a section: cannot set '{self.full}'")
        inner = new.get(name)
        inner = {} if inner is None else inner
        if not isinstance(inner, dict):
            raise ConfigError(f"config key '{key}' is set to the value {inner!r}, not a section: cannot set "
                              f"'{self.full}'")
        if sub is not None:
            new[name] = self.put(inner, sub, rest, raw, key)
        else:
            vt = get_args(tp)[1] if get_args(tp) else Any
            new[name] = _set_in_dict(inner, rest, raw, vt, self.full)
        return new


def _preset_config(name: str, prefix: str) -> Any:
    """:func:`preset_config`, an unknown preset named as the key that set it (``model``,
    ``discriminator.model``; ``prefix`` is the branch as the user spelled it)."""
    key = prefix[:-len("_args")] if prefix.endswith("model_args") else prefix
    if not name:
        raise ConfigError(f"config key '{key}' names no model preset (it is ''): set {key}=NAME first")
    try:
        return preset_config(name)
    except ConfigError as e:
        raise ConfigError(f"config key '{key}': {e}") from None


def override_model_args(cfg: Any, path: list[str], raw: Any, full: str) -> Any:
    """The ``__config_override__`` of a config with ``model`` (a preset name) and ``model_args``
    (RunConfig, DiscriminatorConfig): ``model.F[.G...]=V`` and ``model_args.F[.G...]=V`` checked
    against the preset's config and stored into ``model_args``; ``model_args=JSON`` replaces the
    whole dict, checked. Anything else (``model=NAME`` included) is NotImplemented: the generic path.
    ``model_args.F=none`` (or null/delete) removes an entry, as it always did."""
    head = path[0]
    if head not in ("model", "model_args") or (head == "model" and len(path) == 1):
        return NotImplemented
    parts = full.split(".")
    prefix = ".".join(parts[:len(parts) - len(path) + 1])
    preset, pcfg = cfg.model, _preset_config(cfg.model, prefix)
    walk = _Walk(preset, full)
    rest = path[1:]
    if not rest:                                   # model_args={"quantizer": {"kind": "fsq"}}
        value = json_value(raw)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{full}' expects a JSON object of {preset}'s config fields, got {raw!r}")
        return dataclasses.replace(cfg, model_args=checked_model_args(preset, value, prefix))
    if head == "model_args" and isinstance(raw, str) and raw.lower() in ("none", "null", "delete"):
        if pcfg is not None:                       # still a typo check of the path
            walk.names(type(pcfg), rest, prefix)
        return dataclasses.replace(cfg, model_args=_set_in_dict(dict(cfg.model_args), rest, raw, Any, full))
    if pcfg is None:                               # a preset without a config dataclass: unchecked
        return dataclasses.replace(cfg, model_args=_set_in_dict(dict(cfg.model_args), rest, raw, Any, full))
    return dataclasses.replace(cfg, model_args=walk.put(dict(cfg.model_args), type(pcfg), rest, raw, prefix))


def checked_model_args(preset: str, model_args: dict[str, Any], prefix: str = "model_args") -> dict[str, Any]:
    """``model_args`` walked against ``preset``'s config field by field (as if each entry had been
    given as ``--set PREFIX.FIELD=VALUE``); returns them with coerced values, or raises the same
    one-line ConfigError as the override would."""
    pcfg = _preset_config(preset, prefix)
    if pcfg is None:
        return dict(model_args)
    out: dict[str, Any] = {}
    for k, v in model_args.items():
        out = _Walk(preset, f"{prefix}.{k}").put(out, type(pcfg), [str(k)], v, prefix)
    return out


def check_loaded_model_args(cfg: Any, prefix: str = "") -> None:
    """The ``__config_check__`` of RunConfig and DiscriminatorConfig: ``model_args`` read back by
    pretrain.config.from_dict (config.json, a checkpoint's meta.json) walked as overrides are."""
    if cfg.model and cfg.model_args:
        checked_model_args(cfg.model, dict(cfg.model_args), f"{prefix}.model_args" if prefix else "model_args")


class TypedModelArgs:
    """Mixin of the configs that pick a registry preset (``model``) and override its config
    (``model_args``): RunConfig and DiscriminatorConfig. pretrain.config calls these hooks for
    ``model.``/``model_args.`` overrides and for a config read back from JSON."""

    def __config_override__(self, path: list[str], raw: Any, full: str) -> Any:
        """``model.FIELD=V`` / ``model_args.FIELD=V``: checked against the preset's config
        dataclass and stored into ``model_args``."""
        return override_model_args(self, path, raw, full)

    def __config_check__(self, prefix: str) -> None:
        check_loaded_model_args(self, prefix)
