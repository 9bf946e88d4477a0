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
from model_zoo.package import (CHECKSUMS, WEIGHTS, check_safetensors_file, is_package, package_sha256, read_config,
                               result_scalars, save_package, verify_folder)

from . import safe_load
from .checkpoint import (CheckpointDamaged, list_steps, load_consolidated, resolve_step_url, step_candidates,
                         step_name, verify_step_folder)
from .config import from_dict
from .models import model_from_config
from .recipes import RunConfig

log = logging.getLogger("vqscale.resolve")

__all__ = ["ResolveError", "as_package", "export_run", "export_step", "ema_state_dict"]

PACKAGE_DIR = "package"


class ResolveError(ValueError):
    """A path that is neither a zoo package, a run directory with a checkpoint, nor a step folder."""


def ema_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """Whole fp32 tensors from the EMA shards of ``folder`` (``ema/<engine>/rank*.pt``, any world
    size), without a process group."""
    files = sorted(f for f in os.listdir(folder) if f.startswith("rank") and f.endswith(".pt"))
    states = [safe_load.load(os.path.join(folder, f), map_location="cpu") for f in files]
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


def _load_step_weights(local: str, ema: bool | None) -> tuple[dict[str, torch.Tensor], str]:
    """``ema`` None: the EMA weights when the run kept them, else the live ones; True: the EMA
    weights or an error; False: the live weights."""
    # A GAN run's tokenizer is its "generator" engine (the discriminator is not exported).
    engine = "generator" if os.path.isdir(os.path.join(local, "generator")) else "model"
    sd = load_consolidated(local, engine)
    ema_dir = os.path.join(local, "ema", engine)
    if ema is not False and os.path.isdir(ema_dir):
        sd.update(ema_state_dict(ema_dir))
        return sd, "ema"
    if ema:
        raise ResolveError(f"{local} holds no EMA weights (the run's ema.decay was 0); export without --ema")
    return sd, "live"


def _eval_metrics(run_dir: str, step: int) -> dict[str, float]:
    """The numbers of the run's eval results (``RUN/evals/*.json``) measured at ``step``."""
    out: dict[str, float] = {}
    folder = storage.join(run_dir, "evals")
    for name in storage.listdir(folder):
        if not name.endswith(".json"):
            continue
        try:
            res = storage.read_json(storage.join(folder, name))
        except (OSError, ValueError) as e:
            log.warning("model card: skipping unreadable eval result %s (%s)", name, e)
            continue
        if not isinstance(res, dict) or res.get("step") != step:
            continue
        task = res.get("task") or (res.get("protocol") or {}).get("task") or name[:-5]
        out.update({f"{task}/{k}": v for k, v in result_scalars(res).items()})
    return out


# Training-log numbers that describe the machine or the schedule, not the model.
_NOT_QUALITY = ("per_s", "time", "wait", "lr", "memory", "guard", "grad_norm", "samples_seen")


def _card(cfg, meta: dict, run_dir: str, which: str, num_tokens: int | None) -> dict:
    step, seen = int(meta["step"]), int(meta.get("samples_seen") or 0)
    training = {"recipe": cfg.name, "model": cfg.model, "stage": cfg.stage, "data": cfg.data.url,
                "steps": step, "planned_steps": cfg.steps, "global_batch_size": cfg.global_batch_size,
                ("images_seen" if cfg.stage == "tokenizer" else "sequences_seen"): seen,
                "optimizer": f"AdamW lr {cfg.optim.lr:g}, weight decay {cfg.optim.weight_decay:g}",
                "zero_stage": cfg.deepspeed.zero_stage, "weights": which, "run_dir": run_dir,
                "git_revision": meta.get("git_revision")}
    if cfg.stage == "prior" and num_tokens:
        training["tokens_seen"] = seen * int(num_tokens)
    metrics = {f"train/{k}": v for k, v in result_scalars(meta.get("metrics") or {}).items()
               if not any(w in k for w in _NOT_QUALITY)}
    metrics.update(_eval_metrics(run_dir, step))
    return {"step": step, "weights": which, "training": training, "metrics": metrics}


def tokenizer_identity(url: str) -> dict[str, str]:
    """``{name, sha256, url}`` of a tokenizer package: what a prior's checkpoints record of the
    tokenizer whose codes it models (``url`` absolute, so it does not depend on the directory the
    run was started from)."""
    url = os.fspath(url)
    where = url if storage.is_remote(url) else os.path.abspath(storage.local_path(url))
    return {"name": read_config(url)["name"], "sha256": package_sha256(url), "url": where}


def _tokenizer_candidates(path: str, step_url: str) -> list[str]:
    """Where a prior's ``tokenizer`` setting may point: as given if absolute or remote; a relative
    local path was relative to where the run was started, usually an ancestor of the run
    directory (the demo records ``runs/demo/tokenizer``), so those ancestors come first, nearest
    first, and the current directory last (it may hold another run of the same name)."""
    if storage.is_remote(path) or os.path.isabs(path) or storage.is_remote(step_url):
        return [path]
    out, folder = [], os.path.abspath(storage.local_path(step_url))
    while os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
        out.append(os.path.join(folder, path))
    return out + [os.path.abspath(path)]


def _prior_tokenizer(cfg, meta: dict, step_url: str) -> str:
    """The package of the tokenizer a prior's checkpoint was trained with.

    The checkpoint records its identity (``tokenizer_package``: sha256 and absolute URL, written by
    the Trainer); the first candidate that holds a tokenizer with that sha256 is the one, and a
    tokenizer with another identity is never taken silently (a relative setting resolved from the
    wrong directory once decoded the prior's codes with another run's tokenizer). Checkpoints
    written before the identity was recorded take the first candidate that exists."""
    recorded = meta.get("tokenizer_package") or {}
    want = recorded.get("sha256")
    candidates = ([recorded["url"]] if recorded.get("url") else []) + _tokenizer_candidates(cfg.tokenizer, step_url)
    seen, other = set(), []
    for c in candidates:
        if c in seen or not storage.exists(c):
            continue
        seen.add(c)
        try:
            url = as_package(c, kind="tokenizer")
        except ResolveError as e:
            other.append(f"{c} ({e})")
            continue
        if want is None or package_sha256(url) == want:
            return url
        other.append(f"{c} (another tokenizer, sha256 {package_sha256(url)[:12]})")
    what = f"the tokenizer {recorded.get('name')} with sha256 {want[:12]}" if want else "its tokenizer"
    raise ResolveError(f"{step_url}: cannot find {what} (run setting tokenizer={cfg.tokenizer!r}); looked at "
                       f"{'; '.join(other) or ', '.join(dict.fromkeys(candidates))}. Pass the tokenizer "
                       f"explicitly (vqscale zoo export --tokenizer PATH)")


def export_step(step_url: str, out: str, ema: bool | None = None, dtype: torch.dtype | None = None,
                tokenizer_path: str | None = None) -> str:
    """Write the model of a step folder as a zoo package at ``out``; returns ``out``. ``ema``: see
    :func:`_load_step_weights`; ``dtype``: the dtype of the saved floating-point weights (default:
    float32, as consolidated); ``tokenizer_path``: a prior's tokenizer, instead of the one its
    run recorded. The model card is filled from the run's config, the checkpoint's
    metadata and the run's eval results at that step."""
    meta = storage.read_json(storage.join(step_url, "meta.json"))
    if not meta.get("config"):
        raise ResolveError(f"{step_url}: the checkpoint records no run config, so its model is unknown")
    cfg = from_dict(RunConfig, meta["config"])
    with tempfile.TemporaryDirectory(prefix="vqscale-export-") as tmp:
        local = step_url
        if storage.is_remote(step_url):
            local = os.path.join(tmp, "step")
            storage.download_dir(step_url, local)
        verify_step_folder(storage.local_path(local), step_url)
        sd, which = _load_step_weights(storage.local_path(local), ema)
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
            tokenizer = (as_package(tokenizer_path, kind="tokenizer") if tokenizer_path
                         else _prior_tokenizer(cfg, meta, step_url))
        if dtype is not None:
            model = model.to(dtype)
        run_dir = storage.dirname(storage.dirname(step_url.rstrip("/")))
        save_package(model.eval(), out, name=cfg.model, tokenizer=tokenizer,
                     card_extra=_card(cfg, meta, run_dir, which, getattr(model, "num_tokens", None)))
    log.info("exported %s (%s weights) to %s", step_url, which, out)
    return out


def _step_folder(path: str) -> str:
    """The step folder a run directory (its latest checkpoint) or step folder names."""
    try:
        step = resolve_step_url(path)
    except (OSError, ValueError) as e:
        raise ResolveError(f"{path}: {e}") from None
    if step is None or not storage.exists(storage.join(step, "meta.json")):
        raise ResolveError(f"{path} is not a model-zoo package (no config.json), nor a run directory with "
                           f"a checkpoint (no checkpoints/latest), nor a step folder (no meta.json)")
    return step


def export_run(path: str, out: str, step: int | None = None, ema: bool | None = None,
               dtype: torch.dtype | None = None, tokenizer: str | None = None) -> str:
    """``vqscale zoo export``: the checkpoint of a run directory (its latest, or ``step``) or a
    step folder, consolidated from its engine shards (any ZeRO stage) into a package at ``out``."""
    path = os.fspath(path)
    if step is not None:
        step_url = storage.join(path, "checkpoints", step_name(step))
        if not storage.exists(storage.join(step_url, "meta.json")):
            raise ResolveError(f"{path} has no checkpoint of step {step}; it has steps {list_steps(path)}")
        return export_step(step_url, out, ema=ema, dtype=dtype, tokenizer_path=tokenizer)
    return _newest_verified(path, lambda step: export_step(step, out, ema=ema, dtype=dtype,
                                                           tokenizer_path=tokenizer))


def _newest_verified(path: str, use):
    """``use(step_url)`` on the step folder ``path`` resolves to; for a run directory whose latest
    step is damaged (:mod:`pretrain.checksums`), on the newest older step that verifies, saying so."""
    first = _step_folder(path)
    damaged = []
    for step in [first] + [c for c in step_candidates(path)[0] if c != first]:
        try:
            out = use(step)
        except CheckpointDamaged as e:
            log.error("%s", e)
            damaged.append(str(e))
            continue
        if damaged:
            log.warning("used %s, the newest step of %s that verifies (%d damaged step(s) passed over)",
                        storage.basename(step), path, len(damaged))
        return out
    raise CheckpointDamaged(damaged[0] if len(damaged) == 1 else
                            f"no checkpoint of {path} verifies: {'; '.join(damaged)}")


def _package_in_step(step: str, checksums: str) -> str:
    """The package exported into a step folder, exported now if it is not there yet."""
    url = storage.join(step, PACKAGE_DIR)
    if storage.exists(storage.join(url, checksums)):
        return url              # exported (and so verified) before
    if not storage.is_remote(url) and os.path.isdir(storage.local_path(url)):
        shutil.rmtree(storage.local_path(url))     # an export that died half-way
    export_step(step, url)
    return url


def as_package(path: str, kind: str | None = None) -> str:
    """The zoo package URL for ``path`` (package, run directory or step folder); exported on first
    use. ``kind`` ("tokenizer" or "prior") is checked. Under torch.distributed a collective: rank 0
    exports, the others wait."""
    path = os.fspath(path)
    if is_package(path):
        url = path
    else:
        dist = torch.distributed
        multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        url = None
        if not multi or dist.get_rank() == 0:
            url = _newest_verified(path, lambda step: _package_in_step(step, CHECKSUMS))
        if multi:
            box = [url]
            dist.broadcast_object_list(box, src=0)
            url = box[0]
    if kind is not None:
        meta = read_config(url)
        if meta["kind"] != kind:
            raise ResolveError(f"{path} is a {meta['kind']} package ({meta['name']}), not a {kind}")
    return url


def check_model_path(path: str, kind: str | None = None) -> None:
    """What :func:`as_package` would load, checked before anything starts and without exporting:
    ``path`` is a zoo package (of ``kind``; a local one verified against its checksums, its
    weights a safetensors file), a run directory with a checkpoint or a step folder. Raises
    :class:`ResolveError` or :class:`~model_zoo.package.PackageError` (a pickle given as a prior's
    tokenizer used to fail inside the run's setup, after the process group and config.json)."""
    path = os.fspath(path)
    if is_package(path):
        meta = read_config(path)
        if kind is not None and meta["kind"] != kind:
            raise ResolveError(f"{path} is a {meta['kind']} package ({meta['name']}), not a {kind}")
        if not storage.is_remote(path):
            verify_folder(storage.local_path(path), path)
        else:            # the whole package is downloaded and verified when it is loaded
            check_safetensors_file(storage.join(path, WEIGHTS), f"{path}: {WEIGHTS}")
        return
    if not storage.is_remote(path) and os.path.isfile(storage.local_path(path)):
        raise ResolveError(f"{path} is a file (a pickle?), not a model-zoo package, a run directory or a step folder")
    step = _step_folder(path)
    try:
        stage = (storage.read_json(storage.join(step, "meta.json")).get("config") or {}).get("stage")
    except (OSError, ValueError, AttributeError):
        stage = None        # a damaged step: the load passes over it and says why
    if kind is not None and stage is not None and stage != kind:
        raise ResolveError(f"{path} holds a checkpoint of a {stage} run, not of a {kind}")
