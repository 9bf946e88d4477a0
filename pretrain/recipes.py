"""Recipes: named, typed run configurations (torchtitan's ``llama3_debugmodel``, big_vision's
``runlocal``). A recipe is a registered function returning a :class:`RunConfig`; the command line
takes a recipe name plus ``--set`` overrides. Every recipe that targets a cluster has a tiny CPU
twin named with the suffix ``-tiny``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from data_pipeline.config import DataConfig

from .config import ConfigError


@dataclass(frozen=True)
class RunConfig:
    """The resolved configuration of a run; written to ``RUN_DIR/config.json``."""

    name: str = "demo"
    seed: int = 0
    run_dir: str = "runs/demo"
    global_batch_size: int = 32     # stays fixed when the world size changes
    steps: int = 20
    data: DataConfig = field(default_factory=DataConfig)


_RECIPES: dict[str, Callable[[], RunConfig]] = {}


def register_recipe(name: str):
    def deco(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
        if name in _RECIPES:
            raise ValueError(f"recipe {name!r} registered twice")
        _RECIPES[name] = fn
        return fn
    return deco


def list_recipes() -> list[str]:
    return sorted(_RECIPES)


def get_recipe(name: str) -> RunConfig:
    try:
        fn = _RECIPES[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(_RECIPES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown recipe '{name}'{hint}; known: {', '.join(list_recipes())}") from None
    return fn()


@register_recipe("demo")
def demo() -> RunConfig:
    """The main job on embedded defaults: the bundled demo images, small, on CPU."""
    return RunConfig(
        name="demo",
        run_dir="runs/demo",
        global_batch_size=32,
        steps=40,
        data=DataConfig(url="", resolution=64, num_workers=2, shuffle_buffer=256, interleave=4),
    )
