"""The one resolver for ``--tokenizer``, ``--prior`` and ``--ckpt``: a model-zoo package (folder or
URL), a run directory (its latest checkpoint) or a step folder all become a zoo package URL.

A step folder is exported once into ``STEP/package/`` (a regular zoo package: EMA weights when the
run kept an EMA, else the live weights, of the ``model`` engine, or of the ``generator`` engine of
a GAN run (the tokenizer; the discriminator is not exported); a prior's package carries its
tokenizer's package, found through the run's ``tokenizer`` setting). Step folders are immutable
once ``latest`` has named them, so the export is a cache: it is reused while its checksums file
exists, and goes away with the step folder when the run prunes it. Loading then goes through
:func:`model_zoo.package.load_package`, so every entry point checks the same checksums and records
the same identity (the sha256 of ``checksums.sha256``, which the tokenize job writes into its code
manifest).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import torch

from data_pipeline import storage

log = logging.getLogger("vqscale.resolve")

__all__ = ["ResolveError", "as_package", "export_step", "ema_state_dict"]

PACKAGE_DIR = "package"


class ResolveError(ValueError):
    """A path that is neither a zoo package, a run directory with a checkpoint, nor a step folder."""


def ema_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """Whole fp32 tensors from the EMA shards of ``folder`` (``ema/<engine>/rank*.pt``, any world
    size), without a process group."""
    files = sorted(f for f in os.listdir(folder) if f.startswith("rank") and f.endswith(".pt"))
    states = [torch.load(os.path.join(folder, f), map_location="cpu", weights_only=True) for f in files]
    if not states or len(states) != states[0]["world_size"]:
        raise ResolveError(f"EMA shards in {folder} are incomplete ({len(states)} files)")
    out = {}
    for name, first in states[0]["shards"].items():
        pieces = sorted((st["shards"][name] for st in states), key=lambda p: p["start"])
        flat = torch.cat([p["data"] for p in pieces])[:first["numel"]]
        if flat.numel() != first["numel"]:
            raise ResolveError(f"EMA shards in {folder} do not cover {name}")
        out[name] = flat.view(first["shape"])
    return out


def _load_step_weights(local: str, prefer_ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    from .checkpoint import load_consolidated

    # A GAN run's tokenizer is its "generator" engine (the discriminator is not exported).
    engine = "generator" if os.path.isdir(os.path.join(local, "generator")) else "model"
    sd = load_consolidated(local, engine)
    ema_dir = os.path.join(local, "ema", engine)
    if prefer_ema and os.path.isdir(ema_dir):
        sd.update(ema_state_dict(ema_dir))
        return sd, "ema"
    return sd, "live"


def export_step(step_url: str, out: str, prefer_ema: bool = True) -> str:
    """Write the model of a step folder as a zoo package at ``out``; returns ``out``."""
    from model_zoo.package import save_package

    from .config import from_dict
    from .recipes import RunConfig
    from .trainer import model_from_config

    meta = storage.read_json(storage.join(step_url, "meta.json"))
    if not meta.get("config"):
        raise ResolveError(f"{step_url}: the checkpoint records no run config, so its model is unknown")
    cfg = from_dict(RunConfig, meta["config"])
    with tempfile.TemporaryDirectory(prefix="vqscale-export-") as tmp:
        local = step_url
        if storage.is_remote(step_url):
            local = os.path.join(tmp, "step")
            storage.download_dir(step_url, local)
        sd, which = _load_step_weights(storage.local_path(local), prefer_ema)
        model = model_from_config(cfg, meta.get("trainer_model_args") or None)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        # A text prior's frozen encoder is not saved with it (it is rebuilt from its own weights).
        missing = [k for k in missing if not k.startswith("text_encoder.")]
        if missing or unexpected:
            raise ResolveError(f"{step_url}: weights do not fit {cfg.model}: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        tokenizer = None
        if cfg.stage == "prior":
            if not cfg.tokenizer:
                raise ResolveError(f"{step_url}: the prior's run names no tokenizer (a prior's package holds its "
                                   f"tokenizer); train with --set tokenizer=PATH, or save_package it by hand")
            tokenizer = as_package(cfg.tokenizer, kind="tokenizer")
        save_package(model.eval(), out, name=cfg.model, tokenizer=tokenizer,
                     card_extra={"run_dir": storage.dirname(storage.dirname(step_url)), "step": meta["step"],
                                 "weights": which, "samples_seen": meta.get("samples_seen"),
                                 "git_revision": meta.get("git_revision")})
    log.info("exported %s (%s weights) to %s", step_url, which, out)
    return out


def as_package(path: str, kind: str | None = None) -> str:
    """The zoo package URL for ``path`` (package, run directory or step folder); exported on first
    use. ``kind`` ("tokenizer" or "prior") is checked. Under torch.distributed a collective: rank 0
    exports, the others wait."""
    from model_zoo.package import CHECKSUMS, is_package, read_config

    from .checkpoint import resolve_step_url

    path = os.fspath(path)
    if is_package(path):
        url = path
    else:
        try:
            step = resolve_step_url(path)
        except (OSError, ValueError) as e:
            raise ResolveError(f"{path}: {e}") from None
        if step is None or not storage.exists(storage.join(step, "meta.json")):
            raise ResolveError(f"{path} is not a model-zoo package (no config.json), nor a run directory with "
                               f"a checkpoint (no checkpoints/latest), nor a step folder (no meta.json)")
        url = storage.join(step, PACKAGE_DIR)
        dist = torch.distributed
        multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if (not multi or dist.get_rank() == 0) and not storage.exists(storage.join(url, CHECKSUMS)):
            if not storage.is_remote(url) and os.path.isdir(storage.local_path(url)):
                shutil.rmtree(storage.local_path(url))     # an export that died half-way
            export_step(step, url)
        if multi:
            dist.barrier()
    if kind is not None:
        meta = read_config(url)
        if meta["kind"] != kind:
            raise ResolveError(f"{path} is a {meta['kind']} package ({meta['name']}), not a {kind}")
    return url
