"""Run-directory checkpoints: save, keep the last K, resume on the same or another world size.

Layout (DESIGN.md)::

    RUN_DIR/checkpoints/step_00001000/
        model/ (or generator/ + discriminator/ ...)   one DeepSpeed checkpoint per named engine
        ema/<engine>/rank{r}.pt                        EMA shards (pretrain.ema.EMA), optional
        rng/rank{r}.pt                                 python/numpy/torch/cuda RNG of every rank
        loader_state.json                              the data loader's state (given by the caller)
        meta.json                                      step, samples seen, world size, config, git, metrics
        checksums.sha256                               sha256 of every file above (pretrain.checksums)
        universal/<engine>/                            cache: the engine converted to DeepSpeed's
                                                       universal format (made on a world-size change)
    RUN_DIR/checkpoints/latest                         "step_00001000": written last, atomically

A step folder counts only once ``latest`` names it: every rank's files are written (and, for a
remote run directory, uploaded) before rank 0 writes ``meta.json``, the checksum manifest and then
``latest``, so a crash during a save leaves the previous checkpoint as ``latest``. A load checks the
folder against its manifest first; a damaged step is passed over for the newest older one that
verifies (saying which file was wrong), or the load stops with :class:`CheckpointDamaged`. DeepSpeed's own ``latest`` file is not
written (``save_latest=False``; the engine folder name is DeepSpeed's ``tag``).

Remote run directories (``s3://...``): every rank writes into a local staging folder
(:class:`data_pipeline.storage.StagedDir`) and uploads its own files; ``latest`` is uploaded last.
To load, local rank 0 of each node downloads the step folder once into a node-local folder.

Resume: on the same world size DeepSpeed loads its shards directly and every rank gets its RNG
back, so the continuation is bit-identical (fp32). On another world size an engine with
partitioned optimizer state (ZeRO-1/2/3) is converted with ``deepspeed.checkpoint.ds_to_universal``
(in-process; cached under ``universal/``; for a remote run directory redone per node and not
uploaded) and loaded with ``checkpoint.load_universal``; weights, AdamW moments and step counts,
per-group settings, the LR schedule and the global step carry over, plus buffers and frozen
parameters (which DeepSpeed's universal load skips; restored here), but not the RNG (ranks
re-seed). Stage 0 keeps whole optimizer state and loads directly on any world size.
Tests: ZeRO-2 and ZeRO-3, fp32, 2 -> 1 processes, continuation equal to the 2-process one.
Checked by hand (DeepSpeed 0.19.8, CPU, gloo): ZeRO-0/1/2/3 in fp32 and bf16 2 -> 1, ZeRO-2/3
1 -> 2, tied embeddings. DeepSpeed also drops ``zero_to_fp32.py``/``zero_to_torch.py`` into the
step folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from data_pipeline import storage

from . import safe_load
from .checksums import MANIFEST, CheckpointDamaged, check_files, hash_files, manifest_text, read_manifest
from .distributed import barrier, rank_world
from .repro import git_revision
from .runtime import (full_numel, gathered, load_universal_checkpoint, repair_zero3_universal, to_universal,
                      universal_checkpoint_info, zero_fp32_state_dict)

log = logging.getLogger("vqscale.checkpoint")

__all__ = ["step_name", "parse_step", "list_steps", "latest_step_url", "resolve_step_url", "step_candidates",
           "save_checkpoint", "load_checkpoint", "Resumed", "prune_checkpoints", "load_consolidated",
           "verify_step_folder", "CheckpointDamaged"]

_STEP_RE = re.compile(r"^step_(\d{8,})$")
# Fault injection for tests: the name of a point in save_checkpoint where it raises (all ranks).
FAULT_POINT: str | None = None


class InjectedFault(RuntimeError):
    pass


def step_name(step: int) -> str:
    return f"step_{int(step):08d}"


def parse_step(name: str) -> int | None:
    m = _STEP_RE.match(storage.basename(name))
    return int(m.group(1)) if m else None


def _ckpt_root(run_dir: str) -> str:
    return storage.join(run_dir, "checkpoints")


def list_steps(run_dir: str) -> list[int]:
    return sorted(s for s in (parse_step(n) for n in storage.listdir(_ckpt_root(run_dir))) if s is not None)


def latest_step_url(run_dir: str) -> str | None:
    """The step folder that ``RUN_DIR/checkpoints/latest`` names, or None."""
    latest = storage.join(_ckpt_root(run_dir), "latest")
    if not storage.exists(latest):
        return None
    name = storage.read_text(latest).strip()
    if parse_step(name) is None:
        raise ValueError(f"{latest} names {name!r}, not a step folder")
    return storage.join(_ckpt_root(run_dir), name)


def _step_or_run(url: str) -> tuple[str, bool]:
    """``(url, True)`` for a step folder, else ``(its run directory, False)`` (a run directory or
    its ``checkpoints/``)."""
    url = os.fspath(url).rstrip("/") if storage.is_remote(os.fspath(url)) else os.fspath(url)
    if parse_step(url) is not None:
        return url, True
    return (storage.dirname(url) if storage.basename(url) == "checkpoints" else url), False


def resolve_step_url(url: str) -> str | None:
    """A step folder given itself, a run directory (its ``latest``) or its ``checkpoints/``."""
    url, is_step = _step_or_run(url)
    return url if is_step else latest_step_url(url)


# ---- helpers -------------------------------------------------------------------------------------
def _broadcast(obj: Any) -> Any:
    """Rank 0's value on every rank (decisions that must agree, e.g. which folder to load)."""
    import torch.distributed as dist

    box = [obj]
    if rank_world()[1] > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    world = rank_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _merge_sums(parts: list[dict[str, str]]) -> dict[str, str]:
    """One manifest from the ranks' shares. A file two ranks staged with different bytes (the store
    keeps whichever upload came last) is left out rather than listed with a sum that may be wrong."""
    merged: dict[str, str] = {}
    clash: set[str] = set()
    for part in parts:
        for rel, digest in part.items():
            if merged.setdefault(rel, digest) != digest:
                clash.add(rel)
    for rel in clash:
        log.warning("%s was written with different bytes by two ranks; the checksum manifest leaves it out", rel)
        merged.pop(rel)
    return merged


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _as_dict(engines) -> dict[str, Any]:
    if isinstance(engines, Mapping):
        return dict(engines)
    return {getattr(engines, "vqscale_name", "model"): engines}


def _rng_state() -> dict[str, Any]:
    """Every generator as plain tensors/numbers, so it loads with ``weights_only=True``."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def _set_rng_state(st: dict[str, Any]) -> None:
    py = st["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    nps = st["numpy"]
    np.random.set_state((nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached_gaussian"]))
    torch.set_rng_state(st["torch"])
    if st["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---- save ----------------------------------------------------------------------------------------
def save_checkpoint(run_dir: str, step: int, engines, *, samples_seen: int = 0,
                    loader_state: dict | None = None, config: dict | None = None, metrics: dict | None = None,
                    emas: Mapping[str, Any] | None = None, keep_last: int | None = 3,
                    extra_meta: dict | None = None) -> str:
    """Save a checkpoint of ``engines`` (an engine, or a dict name -> engine) at ``step``.

    A collective: every rank calls it with the same arguments (``loader_state`` is used from
    rank 0). Returns the step folder URL. Saving the step that ``latest`` already names is a
    no-op (e.g. a job stopped right after resuming).
    """
    engines = _as_dict(engines)
    emas = dict(emas or {})
    rank, world = rank_world()
    root = _ckpt_root(run_dir)
    # what makes a checkpoint convertible, i.e. loadable on another world size
    client_state = {"vqscale_step": int(step), **universal_checkpoint_info()}
    name = step_name(step)
    step_url = storage.join(root, name)
    current = _broadcast(storage.read_text(storage.join(root, "latest")).strip()
                         if rank == 0 and storage.exists(storage.join(root, "latest")) else None)
    if current == name:
        log.info("checkpoint %s is already the latest; not saved again", name)
        return step_url
    t0 = time.time()
    if rank == 0 and storage.exists(step_url):
        storage.rmtree(step_url)        # left by a save that crashed before `latest`
    barrier()
    stage = storage.StagedDir(step_url) if storage.is_remote(step_url) else None
    local = stage.path if stage else storage.local_path(step_url)
    try:
        for ename, engine in engines.items():
            engine.save_checkpoint(local, tag=ename, client_state=client_state, save_latest=False)
        for ename, ema in emas.items():
            ema.save(os.path.join(local, "ema", ename))
        os.makedirs(os.path.join(local, "rng"), exist_ok=True)
        torch.save(_rng_state(), os.path.join(local, "rng", f"rank{rank}.pt"))
        if rank == 0 and loader_state is not None:
            with open(os.path.join(local, "loader_state.json"), "w") as f:
                json.dump(loader_state, f)
        if stage:
            stage.sync()                # each rank uploads the files it wrote
        barrier()                      # every shard of every rank is durable
        # Each rank hashes its share: the files it staged, or every world-th file of the shared folder.
        sums = _merge_sums(_all_gather(hash_files(local) if stage else hash_files(local, rank, world)))
        if rank == 0:
            meta = {"format": 1, "step": int(step), "samples_seen": int(samples_seen), "world_size": world,
                    "engines": {n: {"zero_stage": int(e.zero_optimization_stage()),
                                    "bf16": bool(e.bfloat16_enabled())} for n, e in engines.items()},
                    "emas": sorted(emas), "loader_state": loader_state is not None, "config": config,
                    "metrics": metrics or {}, "git_revision": git_revision(), "time": time.time(),
                    "checksums": True, **(extra_meta or {})}
            data = (json.dumps(meta, indent=2) + "\n").encode("utf-8")
            storage.write_bytes(storage.join(step_url, "meta.json"), data)
            sums["meta.json"] = hashlib.sha256(data).hexdigest()
            if FAULT_POINT == "before_manifest":
                raise InjectedFault("injected fault before the checksum manifest")
            storage.write_text(storage.join(step_url, MANIFEST), manifest_text(sums))
        if FAULT_POINT == "before_latest":
            raise InjectedFault("injected fault before `latest`")
        if rank == 0:
            storage.write_text(storage.join(root, "latest"), name + "\n")   # atomic, and last
            if keep_last:
                prune_checkpoints(run_dir, keep_last, current_step=step)
        barrier()
    finally:
        if stage:
            stage.close(sync=False)
    log.info("saved checkpoint %s in %.2fs", step_url, time.time() - t0)
    return step_url


def prune_checkpoints(run_dir: str, keep_last: int, current_step: int) -> list[int]:
    """Delete step folders beyond the newest ``keep_last`` up to ``current_step``, and every folder
    newer than it (left by a timeline abandoned on resume, or a crashed save). Returns the deleted
    steps. Called by rank 0 after ``latest`` names ``current_step``."""
    steps = list_steps(run_dir)
    older = [s for s in steps if s <= current_step]
    doomed = sorted([s for s in steps if s > current_step] + older[:max(0, len(older) - max(1, keep_last))])
    for s in doomed:
        storage.rmtree(storage.join(_ckpt_root(run_dir), step_name(s)))
    return doomed


# ---- load ----------------------------------------------------------------------------------------
@dataclass
class Resumed:
    """What a resume restored; the Trainer continues from ``step``."""

    step: int
    samples_seen: int
    step_url: str
    meta: dict[str, Any]
    loader_state: dict | None
    universal: bool                 # loaded through the universal format (world size changed)
    weights_only: bool
    rng_restored: bool
    client_states: dict[str, Any] = field(default_factory=dict)


def _node_stage_dir(step_url: str) -> str:
    base = os.environ.get("VQSCALE_STAGE") or tempfile.gettempdir()
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or str(os.getppid())
    tag = hashlib.sha1(f"{step_url}|{job}".encode()).hexdigest()[:16]
    return os.path.join(base, f"vqscale-load-{tag}")


def _needs_universal(folder: str) -> bool:
    """Partitioned optimizer state (ZeRO-1/2/3, or bf16 at stage 0) is tied to its world size."""
    return any(f.endswith("optim_states.pt") for f in os.listdir(folder))


def _convert_universal(engine_dir: str, out_dir: str) -> None:
    """``ds_to_universal`` in-process (:func:`pretrain.runtime.to_universal`), into a temporary
    folder renamed into place so a half-converted cache is never used."""
    tmp = out_dir + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    out = to_universal(engine_dir, tmp)
    log.debug("ds_to_universal output:\n%s", out)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    log.info("converted %s to the universal format in %.2fs", engine_dir, time.time() - t0)


def _plan(local: str, engines: Mapping[str, Any], universal: bool | str, resized: bool) -> dict[str, bool] | str:
    """Per engine: load through the universal format? (or an error message, raised on all ranks)"""
    plan = {}
    for n in engines:
        folder = os.path.join(local, n)
        if not os.path.isdir(folder):
            return f"{local} has no engine folder {n!r} (has: {', '.join(sorted(os.listdir(local)))})"
        plan[n] = bool(universal is True or (universal == "auto" and resized and _needs_universal(folder)))
    return plan


def _model_state_files(engine_dir: str) -> list[str]:
    files = [f for f in os.listdir(engine_dir) if f.endswith("model_states.pt")]
    rank_of = lambda f: int(m.group(1)) if (m := re.search(r"zero_pp_rank_(\d+)_", f)) else -1  # noqa: E731
    return [os.path.join(engine_dir, f) for f in sorted(files, key=rank_of)]


@torch.no_grad()
def _restore_fixed_state(engine, engine_dir: str) -> int:
    """Buffers and frozen parameters from a DeepSpeed checkpoint folder into ``engine``.

    DeepSpeed 0.19.8's universal load restores only what the optimizer holds: it skips the module
    state dict, so buffers (BatchNorm statistics, EMA codebooks) and frozen parameters would keep
    their freshly initialized values. They are read from the source checkpoint's model states:
    whole in ZeRO-0/1/2's ``module``, as per-rank ``frozen_param_fragments`` under ZeRO-3.
    Returns the number of tensors restored.
    """
    states = [safe_load.load(f, map_location="cpu") for f in _model_state_files(engine_dir)]
    module_sd, frozen_shapes = states[0]["module"], states[0].get("frozen_param_shapes") or {}
    count = 0
    for name, buf in engine.module.named_buffers():
        if name in module_sd:
            buf.copy_(module_sd[name].to(buf.dtype))
            count += 1
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            continue
        numel = full_numel(p)
        if name in module_sd and module_sd[name].numel() == numel:
            value = module_sd[name]
        elif name in frozen_shapes:
            frags = [st["frozen_param_fragments"][name].reshape(-1) for st in states]
            value = torch.cat(frags)[:numel].view(frozen_shapes[name])
        else:
            raise KeyError(f"frozen parameter {name} is not in the checkpoint {engine_dir}")
        with gathered([p], modifier_rank=0):
            p.data.copy_(value.view(p.shape).to(p.dtype))
        count += 1
    return count


@torch.no_grad()
def _load_weights(engine, full: dict[str, torch.Tensor]) -> None:
    """Whole fp32 weights into an engine of any stage and world size, then the optimizer's fp32
    master copies from them. Optimizer moments, schedule and step counts are left as they are."""
    missing = [n for n in engine.module.state_dict() if n not in full]
    if missing:
        raise KeyError(f"the checkpoint lacks {len(missing)} tensors of the model, e.g. {missing[:3]}")
    for name, p in engine.module.named_parameters():
        with gathered([p], modifier_rank=0):
            p.data.copy_(full[name].reshape(p.data.shape).to(p.dtype))
    for name, buf in engine.module.named_buffers():
        if name in full:
            buf.copy_(full[name].to(buf.dtype))
    if hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()


def step_candidates(url: str) -> tuple[list[str], str | None]:
    """Step folders to try, newest first: a step folder alone; for a run directory its ``latest``
    and then its older steps, the fallbacks. Plus a note when ``latest`` itself is unreadable (then
    every step folder is a candidate)."""
    url, is_step = _step_or_run(url)
    if is_step:
        return [url], None
    folder = lambda s: storage.join(_ckpt_root(url), step_name(s))  # noqa: E731
    try:
        latest = latest_step_url(url)
    except (OSError, ValueError) as e:
        return [folder(s) for s in reversed(list_steps(url))], f"{_ckpt_root(url)}/latest is unreadable ({e})"
    if latest is None:
        return [], None
    top = parse_step(latest)
    return [latest] + [folder(s) for s in reversed(list_steps(url)) if s < top], None


def _fetch_and_check(step_url: str, remote: bool) -> tuple[str, list[str] | None]:
    """A collective: the step folder as a local folder (downloaded once per node when remote) and
    the problems its manifest finds, gathered from every process ([]: verified; None: a folder
    written before manifests, unverified)."""
    rank, world = rank_world()
    if remote:
        local = _node_stage_dir(step_url)
        if _local_rank() == 0:
            shutil.rmtree(local, ignore_errors=True)
            storage.download_dir(step_url, local)
        barrier()
        index, count = _local_rank(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    else:
        local, index, count = storage.local_path(step_url), rank, world
    sums = read_manifest(local, step_url)
    if isinstance(sums, dict):
        mine: list[str] | None = check_files(local, sums, index, count)
    else:
        mine = None if sums is None else ([sums] if index == 0 else [])
    parts = _all_gather(mine)
    if any(p is None for p in parts):
        return local, None
    return local, sorted({p for part in parts for p in part})


def _verified_step(url: str, remote: bool, adopt: bool) -> tuple[str, str] | None:
    """(step folder URL, local folder) of the newest candidate step that verifies against its
    checksum manifest, saying which damaged ones it passed over; None when there is nothing to
    load. ``adopt``: a run resuming itself points ``latest`` at the step it fell back to, so the
    next save replaces the damaged steps instead of finding its own step "already saved"."""
    rank, _ = rank_world()
    candidates, note = _broadcast(step_candidates(url) if rank == 0 else None)
    if note and rank == 0:
        log.error("%s", note)
    if not candidates:
        if note:
            raise CheckpointDamaged(f"{note} and no step folder is left; restore it or start afresh (--no-resume)")
        return None
    damaged: list[str] = []
    for step_url in candidates:
        local, problems = _fetch_and_check(step_url, remote)
        if not problems:
            break
        if rank == 0:
            log.error("checkpoint %s is damaged: %s", step_url, "; ".join(problems))
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        damaged.append(f"{storage.basename(step_url)}: {problems[0]}{more}")
        if remote and _local_rank() == 0:
            shutil.rmtree(local, ignore_errors=True)
    else:
        raise CheckpointDamaged(f"no checkpoint of {url} verifies against its {MANIFEST} "
                                f"({'; '.join(damaged)}): restore the files, or start afresh (--no-resume or a "
                                f"new run_dir)")
    if problems is None and rank == 0:
        log.warning("%s has no %s (written before checksum manifests): loaded unverified", step_url, MANIFEST)
    if damaged and rank == 0:
        log.warning("resuming from %s, the newest step that verifies, instead of the damaged %s",
                    storage.basename(step_url), ", ".join(d.split(":")[0] for d in damaged))
    if (damaged or note) and rank == 0:
        if adopt and parse_step(storage.basename(os.fspath(url).rstrip("/"))) is None:
            root = storage.dirname(step_url)
            storage.write_text(storage.join(root, "latest"), storage.basename(step_url) + "\n")
            log.warning("%s/latest now names %s; the damaged step folders are deleted at the next save",
                        root, storage.basename(step_url))
    return step_url, local


def _as_saved(engines: dict[str, Any], emas: dict[str, Any], saved: set[str],
              step_url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The engines (and EMAs) to load, by the names ``step_url`` saved them under. A tokenizer's
    engine is "generator" in a run with a discriminator and "model" in one without, so a load
    crosses the two: a GAN run from a single-engine checkpoint (also the layout GAN recipes wrote
    until their discriminator started, before the discriminator engine was always built) loads its
    "model" into the generator, the discriminator keeping its fresh state; a run without a
    discriminator from a GAN checkpoint loads its generator."""
    for mine, theirs, note in (("generator", "model", "a single-engine tokenizer: loading it into the "
                                "generator; the discriminator starts fresh"),
                               ("model", "generator", "a GAN run: loading its generator (the discriminator "
                                "is not used)")):
        if mine in engines and mine not in saved and theirs in saved:
            log.info("%s holds %s", step_url, note)
            return {theirs: engines[mine]}, ({theirs: emas[mine]} if mine in emas else {})
    return engines, emas


def load_checkpoint(url: str, engines, *, emas: Mapping[str, Any] | None = None,
                    weights_only: bool = False, restore_rng: bool = True,
                    universal: bool | str = "auto") -> Resumed | None:
    """Resume ``engines`` from a run directory's ``latest``, or from a given step folder.

    A collective. Returns None when there is nothing to resume (a fresh run). ``universal``:
    "auto" converts only when the world size differs and an engine's state is partitioned;
    True forces the conversion (any world size). ``weights_only``: a warm start; the weights
    (and EMA) are loaded on any stage and world size, the optimizer, schedule, step counters and
    RNG stay fresh. (DeepSpeed's own ``load_optimizer_states=False`` is not used: under ZeRO-3
    it looks for DeepSpeed's ``latest`` file, which vqscale does not write.)
    """
    engines = _as_dict(engines)
    emas = dict(emas or {})
    rank, world = rank_world()
    remote = storage.is_remote(os.fspath(url))
    picked = _verified_step(url, remote, adopt=not weights_only)
    if picked is None:
        return None
    step_url, local = picked
    meta = storage.read_json(os.path.join(local, "meta.json"))
    engines, emas = _as_saved(engines, emas, set(meta.get("engines", {})), step_url)
    # Who converts: the process that owns the folder (rank 0 on a shared run directory, local
    # rank 0 for a node-local download). Everyone agrees on the plan from rank 0's listing.
    converter = (_local_rank() == 0) if remote else (rank == 0)
    plan = _broadcast(_plan(local, engines, False if weights_only else universal, meta["world_size"] != world)
                      if rank == 0 else None)
    if isinstance(plan, str):
        raise FileNotFoundError(plan)
    client_states: dict[str, Any] = {}
    try:
        # DeepSpeed's own loads (its checkpoint engine, ds_to_universal) ask for
        # weights_only=False; within this block they cannot run code from the files.
        with safe_load.weights_only_loads():
            for ename, engine in engines.items():
                if weights_only:
                    _load_weights(engine, load_consolidated(local, ename))
                    continue
                if plan[ename]:
                    out = os.path.join(local, "universal", ename)
                    if converter and not os.path.isdir(out):
                        _convert_universal(os.path.join(local, ename), out)
                    barrier()
                    path, client = load_universal_checkpoint(engine, os.path.join(local, "universal"), ename)
                    repair_zero3_universal(engine, out, safe_load.load)
                    _restore_fixed_state(engine, os.path.join(local, ename))
                else:
                    path, client = engine.load_checkpoint(local, tag=ename)
                if path is None:
                    raise FileNotFoundError(f"DeepSpeed found no checkpoint for engine {ename!r} in {step_url}")
                client_states[ename] = {k: v for k, v in (client or {}).items() if k.startswith("vqscale")}
        for ename, ema in emas.items():
            folder = os.path.join(local, "ema", ename)
            if os.path.isdir(folder):
                ema.load(folder)
            else:
                log.warning("%s has no EMA for %s; the EMA starts from the current weights", step_url, ename)
        loader_path = os.path.join(local, "loader_state.json")
        loader_state = json.load(open(loader_path)) if os.path.exists(loader_path) else None
        rng_path = os.path.join(local, "rng", f"rank{rank}.pt")
        rng_restored = False
        if restore_rng and not weights_only and meta["world_size"] == world and os.path.exists(rng_path):
            _set_rng_state(safe_load.load(rng_path, map_location="cpu"))
            rng_restored = True
    finally:
        if remote:
            barrier()
            if _local_rank() == 0:
                shutil.rmtree(local, ignore_errors=True)
    log.info("resumed from %s (step %d%s)", step_url, meta["step"], ", universal" if any(plan.values()) else "")
    return Resumed(step=int(meta["step"]), samples_seen=int(meta.get("samples_seen", 0)), step_url=step_url,
                   meta=meta, loader_state=loader_state, universal=any(plan.values()), weights_only=weights_only,
                   rng_restored=rng_restored, client_states=client_states)


def verify_step_folder(local: str, step_url: str) -> None:
    """Check a local step folder against its manifest without a process group (export); raise
    :class:`CheckpointDamaged` naming the first problem."""
    sums = read_manifest(local, step_url)
    if sums is None:
        log.warning("%s has no %s (written before checksum manifests): read unverified", step_url, MANIFEST)
        return
    problems = [sums] if isinstance(sums, str) else check_files(local, sums)
    if problems:
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise CheckpointDamaged(f"checkpoint {step_url} is damaged: {problems[0]}{more}")


def load_consolidated(step_url: str, engine: str = "model") -> dict[str, torch.Tensor]:
    """The fp32 state dict of one engine of a step folder, without any process group (for evals
    and export): ZeRO shards merged by DeepSpeed's zero_to_fp32, and whatever it leaves out
    (ZeRO-1's frozen parameters; everything at stage 0) from the model states. Local folders only
    (stage a remote one with storage.download_dir)."""
    folder = os.path.join(storage.local_path(step_url), engine)
    out: dict[str, torch.Tensor] = {}
    if _needs_universal(folder):
        with safe_load.weights_only_loads():
            out = zero_fp32_state_dict(storage.local_path(step_url), engine)
    module = safe_load.load(_model_state_files(folder)[0], map_location="cpu")["module"]
    for k, v in module.items():        # ZeRO-3 keeps empty placeholders here
        if k not in out and v.numel() > 0:
            out[k] = v.float() if v.is_floating_point() else v
    return out
