"""Typed configuration: overrides, one-line errors naming the key, strict round trips, recipes."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import FrozenInstanceError, dataclass, field
from typing import Literal, Optional

import pytest

from data_pipeline.config import DataConfig
from pretrain.config import ConfigError, apply_overrides, from_dict, to_dict, write_resolved
from pretrain.recipes import RunConfig, get_recipe, list_recipes


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "constant"] = "cosine"
    layers: tuple[int, ...] = (1, 2)


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    steps: int = 10
    compile: bool = False
    warmup: Optional[int] = None
    weights: dict[str, float] = field(default_factory=dict)
    optim: Inner = field(default_factory=Inner)


def test_overrides_are_typed():
    cfg = apply_overrides(Outer(), ["steps=1_000", "compile=true", "optim.lr=3e-4", "optim.betas=0.8,0.99",
                                    "optim.schedule=constant", "warmup=none", "weights.l2=1.5",
                                    "optim.layers=[4, 5, 6]", "name=run a"])
    assert cfg.steps == 1000 and cfg.compile is True and cfg.optim.lr == 3e-4
    assert cfg.optim.betas == (0.8, 0.99) and cfg.optim.schedule == "constant"
    assert cfg.warmup is None and cfg.weights == {"l2": 1.5} and cfg.optim.layers == (4, 5, 6)
    assert cfg.name == "run a"
    assert Outer().optim.lr == 1e-3  # the original is untouched
    with pytest.raises(FrozenInstanceError):
        cfg.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("stepz=1", "unknown config key 'stepz' (did you mean 'steps'?)"),
    ("steps=ten", "config key 'steps' expects int, got 'ten'"),
    ("optim.lr=fast", "config key 'optim.lr' expects float, got 'fast'"),
    ("compile=maybe", "config key 'compile' expects bool"),
    ("optim.schedule=linear", "config key 'optim.schedule' must be one of 'cosine', 'constant'"),
    ("optim.betas=1,2,3", "config key 'optim.betas' expects 2 values, got 3"),
    ("steps.x=1", "config key 'steps' is a value, not a section"),
    ("optim=3", "config key 'optim' is a section"),
    ("steps", "must look like KEY=VALUE"),
    ("weights.l2=heavy", "config key 'weights.l2' expects float"),
])
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        apply_overrides(Outer(), [override])
    text = str(info.value)
    assert message in text and "\n" not in text


@pytest.mark.parametrize("override,message", [
    ("deepspeed.activation_checkpointing=partial",
     "config key 'deepspeed.activation_checkpointing' expects bool | 'full' | 'selective', got 'partial'"),
    ("tokenizer_loss.logit_laplace_eps=x", "config key 'tokenizer_loss.logit_laplace_eps' expects float | None"),
])
def test_a_bad_union_value_names_the_types_it_takes(override, message):
    from pretrain.recipes import get_recipe

    with pytest.raises(ConfigError) as info:
        apply_overrides(get_recipe("vit-vqgan-bb-tiny"), [override])
    assert message in str(info.value)


def test_round_trip_is_strict(tmp_path):
    cfg = apply_overrides(Outer(), ["weights.kl=0.1", "optim.betas=0.5,0.6"])
    d = json.loads(json.dumps(to_dict(cfg)))
    assert from_dict(Outer, d) == cfg
    d["optim"]["momentum"] = 0.9
    with pytest.raises(ConfigError, match="unknown config key 'optim.momentum'"):
        from_dict(Outer, d)
    write_resolved(cfg, str(tmp_path / "run" / "config.json"), extra={"git_revision": "abc"})
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["_meta"]["git_revision"] == "abc"
    saved.pop("_meta")
    assert from_dict(Outer, saved) == cfg


def test_recipes_and_data_config():
    assert "vit-vqgan-ss-tiny" in list_recipes()
    cfg = get_recipe("vit-vqgan-ss-tiny")
    assert isinstance(cfg, RunConfig) and isinstance(cfg.data, DataConfig)
    cfg = apply_overrides(cfg, ["data.filters.field_max.pwatermark=0.8", "data.filters.min_width=64",
                                "data.crop=center"])
    assert cfg.data.filters.field_max == {"pwatermark": 0.8} and cfg.data.filters.min_width == 64
    assert from_dict(RunConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown recipe 'vim-bse'.*did you mean 'vim-base'"):
        get_recipe("vim-bse")


def test_cli_reports_a_bad_override_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain.cli", "train", "--recipe", "vit-vqgan-ss-tiny",
                           "--set", "data.resolutoin=3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "vqscale: error: unknown config key 'data.resolutoin' (did you mean 'data.resolution'?); valid here: "
        + ", ".join(sorted(DataConfig.__dataclass_fields__)))


def test_a_deepspeed_outside_the_tested_releases_is_refused_in_one_line(monkeypatch):
    """pretrain/runtime.py patches DeepSpeed internals validated on 0.19: another release stops the
    run before anything starts (ConfigError: one line, exit 2) unless explicitly allowed."""
    import importlib.metadata

    from pretrain.runtime import DeepSpeedVersionError, check_deepspeed_version

    assert check_deepspeed_version() == importlib.metadata.version("deepspeed")     # the pinned one passes
    assert check_deepspeed_version("0.19.2") == "0.19.2"
    for bad in ("0.15.4", "0.20.0", "1.0.0", "garbage"):
        with pytest.raises(DeepSpeedVersionError, match=rf"^DeepSpeed {bad} is not a release vqscale was tested on"):
            check_deepspeed_version(bad)
    monkeypatch.setenv("VQSCALE_UNTESTED_DEEPSPEED", "1")
    assert check_deepspeed_version("0.20.0") == "0.20.0"
