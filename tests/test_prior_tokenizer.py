"""A prior's export finds the tokenizer it was trained with, by identity (issue 17, failure 1).

A prior run records its tokenizer setting as given, often a path relative to where the run was
started (the demo: ``runs/demo/tokenizer``). The export used to try that path from the current
directory first: run from a checkout that held another ``runs/demo`` (the full demo, from ``make
demo``), the exported prior carried that other tokenizer, and its codes decoded to other images.
Checkpoints now record the tokenizer's identity (sha256 of its ``checksums.sha256``) and absolute
URL; the export takes only a tokenizer with that identity.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from model_zoo import create_model
from model_zoo.package import package_sha256, save_package
from pretrain.resolve import ResolveError, _prior_tokenizer, tokenizer_identity


def _tokenizer(url, seed: int) -> str:
    torch.manual_seed(seed)
    return save_package(create_model("vit-vqgan-ss-tiny").eval(), str(url))


def test_the_recorded_tokenizer_wins_over_a_same_named_one_here(tmp_path, monkeypatch):
    run = tmp_path / "first" / "runs" / "demo"
    ours = _tokenizer(run / "tokenizer", 0)
    decoy = _tokenizer(tmp_path / "other" / "runs" / "demo" / "tokenizer", 1)
    assert package_sha256(ours) != package_sha256(decoy)
    step = str(run / "prior" / "checkpoints" / "step_00000001")
    cfg = SimpleNamespace(tokenizer="runs/demo/tokenizer")
    monkeypatch.chdir(tmp_path / "other")               # where runs/demo/tokenizer is the decoy
    meta = {"tokenizer_package": tokenizer_identity(ours)}
    assert os.path.isabs(meta["tokenizer_package"]["url"])
    assert _prior_tokenizer(cfg, meta, step) == os.path.abspath(ours)
    # without the absolute URL (moved run): the ancestors of the run are searched before here
    meta = {"tokenizer_package": {**tokenizer_identity(ours), "url": "/nonexistent/tokenizer"}}
    assert os.path.abspath(_prior_tokenizer(cfg, meta, step)) == os.path.abspath(ours)
    # an old checkpoint with no identity: still the run's own ancestors first
    assert os.path.abspath(_prior_tokenizer(cfg, {}, step)) == os.path.abspath(ours)
    # the only tokenizer to be found is another one: an error naming it, never a silent swap
    other_step = str(tmp_path / "moved" / "prior" / "checkpoints" / "step_00000001")
    with pytest.raises(ResolveError, match="another tokenizer"):
        _prior_tokenizer(cfg, meta, other_step)
