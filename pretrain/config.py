"""Typed configuration: frozen dataclasses, dotted overrides, the resolved config on disk.

A run is configured by a recipe (a registered function returning a frozen dataclass) plus
``--set a.b=c`` overrides. Each override is checked against the dataclass's type hints: an
unknown key or a value of the wrong type is one clear line naming the key (and the closest valid
key), never a traceback deep inside training. The resolved config is written next to the outputs
(``config.json``) and can be read back strictly with :func:`from_dict`.

Two hooks let a config class check a branch whose schema is not its own type hints (the run's
``model.FIELD=`` against the model preset's config, pretrain/model_overrides.py), keeping this module
generic: ``cfg.__config_override__(path, raw, full)`` is asked first for every override that
reaches ``cfg`` (the remaining dotted ``path``, the value, the whole key) and returns the new
config, or NotImplemented for the typed default; ``obj.__config_check__(prefix)`` is called on
what :func:`from_dict` builds (raising :class:`ConfigError` on a bad value).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from data_pipeline import storage


class ConfigError(ValueError):
    """A bad override or config file; the message is one line naming the key."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):      # "int | None", not "Union" (what __name__ says)
        return " | ".join("None" if a is type(None) else _type_name(a) for a in get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def json_value(value: Any) -> Any:
    """Free-form values (model_args, DeepSpeed passthrough): a command-line string that reads as
    JSON (20, 0.5, true, [8, 8], {"a": 1}) is that value, anything else stays a string."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (a string from the command line, or a JSON value) to type ``tp``."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return json_value(value)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(repr, args))}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"config key '{key}' expects bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ConfigError(f"config key '{key}' expects int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' expects str, got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except ValueError:
                    raise ConfigError(f"config key '{key}' expects a list, got {value!r}") from None
            else:
                value = [v for v in text.split(",") if v.strip()] if text else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if origin is tuple and args:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}' expects {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        return origin(_coerce(v, args[0], key) if args else v for v in value)
    if origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ConfigError(f"config key '{key}' expects a JSON object, got {value!r}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        kt, vt = args if args else (str, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ConfigError(f"config key '{key}' is a section; set its fields as '{key}.FIELD=VALUE'") from None
        if isinstance(value, dict):
            return from_dict(tp, value, prefix=key)
        raise ConfigError(f"config key '{key}' is a section; set its fields as '{key}.FIELD=VALUE'")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}' has a type ({_type_name(tp)}) that cannot be set from {value!r}")


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _unknown(key: str, name: str, choices: typing.Iterable[str]) -> ConfigError:
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" (did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; valid here: {', '.join(choices)}")


def _set(cfg: Any, path: list[str], raw: Any, full: str) -> Any:
    hook = getattr(cfg, "__config_override__", None)
    if hook is not None:
        new = hook(path, raw, full)
        if new is not NotImplemented:
            return new
    name = path[0]
    here = full.rsplit(".", len(path) - 1)[0] if len(path) > 1 else full
    hints = _hints(type(cfg))
    if name not in hints:
        raise _unknown(here, name, hints)
    tp = hints[name]
    current = getattr(cfg, name)
    if len(path) == 1:
        return dataclasses.replace(cfg, **{name: _coerce(raw, tp, full)})
    if dataclasses.is_dataclass(current):
        return dataclasses.replace(cfg, **{name: _set(current, path[1:], raw, full)})
    if get_origin(tp) is dict:
        vt = get_args(tp)[1] if get_args(tp) else Any
        return dataclasses.replace(cfg, **{name: _set_in_dict(current, path[1:], raw, vt, full)})
    raise ConfigError(f"config key '{here}' is a value, not a section: cannot set '{full}'")


def _set_in_dict(current: dict, path: list[str], raw: Any, vt: Any, full: str) -> dict:
    """``model_args.grid_size=[8,8]``; a deeper key sets one entry of a nested dict,
    ``model_args.quantizer.kind=fsq``, which the preset merges into its nested config field by field."""
    new = dict(current)
    if len(path) == 1:
        if isinstance(raw, str) and raw.lower() in ("none", "null", "delete"):
            new.pop(path[0], None)
        else:
            new[path[0]] = _coerce(raw, vt, full)
        return new
    inner = new.get(path[0], {})
    if not isinstance(inner, dict):
        here = full.rsplit(".", len(path) - 1)[0]
        raise ConfigError(f"config key '{here}' is a value, not a section: cannot set '{full}'")
    new[path[0]] = _set_in_dict(inner, path[1:], raw, Any, full)
    return new


def apply_overrides(cfg: Any, overrides: typing.Iterable[str]) -> Any:
    """Apply ``["a.b=c", ...]`` to a frozen dataclass; returns the new config."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like KEY=VALUE (e.g. optim.lr=1e-4)")
        cfg = _set(cfg, key.split("."), raw.strip(), key)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) dataclass config."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        return v
    return conv(cfg)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Rebuild a dataclass from a dict, strictly: unknown keys are errors, types are checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or cls.__name__}' must be a mapping")
    hints = _hints(cls)
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in hints:
            raise _unknown(key, k, hints)
        kwargs[k] = _coerce(v, hints[k], key)
    obj = cls(**kwargs)
    check = getattr(obj, "__config_check__", None)
    if check is not None:
        check(prefix)
    return obj


def dumps(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2) + "\n"


def write_resolved(cfg: Any, url: str, extra: dict[str, Any] | None = None) -> None:
    """Write the resolved config (plus e.g. git revision) as JSON through the storage seam."""
    payload = to_dict(cfg)
    if extra:
        payload = {**payload, "_meta": extra}
    storage.write_json(url, payload)
