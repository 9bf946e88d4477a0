"""The registry of named model presets (timm's ``@register_model``, torchtitan's model specs).

A preset is a function returning a ready ``nn.Module``; keyword overrides replace fields of the
model's frozen config dataclass. Every preset is registered once ``model_zoo`` is imported (its
``__init__`` imports the model files, and importing this module imports the package first). Names are hyphenated and shared with recipes (DESIGN.md):
``vit-vqgan-ss``, ``vqgan-f16``, ``mq-vae-f8``, ... and each has a tiny CPU twin ``NAME-tiny``.
Full-size presets can be built without memory on the meta device::

    with torch.device("meta"):
        model = create_model("vit-vqgan-sl")
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from torch import nn

KINDS = ("tokenizer", "prior", "discriminator", "perceptual", "text_encoder")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str
    fn: Callable[..., nn.Module]
    paper: str = ""


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, kind: str = "tokenizer", paper: str = ""):
    """Decorator: register ``fn(**overrides) -> nn.Module`` under ``name``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = ModelEntry(name, kind, fn, paper)
        return fn
    return deco


def list_models(kind: str | None = None, tiny: bool | None = None) -> list[str]:
    """Registered names, optionally of one kind and only (or never) the ``-tiny`` twins."""
    names = [n for n, e in _MODELS.items() if kind is None or e.kind == kind]
    if tiny is not None:
        names = [n for n in names if n.endswith("-tiny") == tiny]
    return sorted(names)


def model_entry(name: str) -> ModelEntry:
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_MODELS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise KeyError(f"unknown model '{name}'{hint}; known: {', '.join(sorted(_MODELS))}") from None


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered preset; ``overrides`` replace fields of its config dataclass."""
    model = model_entry(name).fn(**overrides)
    model.registry_name = name   # the zoo package format records which preset rebuilds it
    return model
