"""``vqscale tokenize``: image shards -> code shards, on every rank, resumable (DESIGN.md, "Code shards").

The job between the two stages. Each rank of a torchrun job (``RANK``/``WORLD_SIZE``; a gloo or
NCCL process group when ``WORLD_SIZE > 1``) takes the image shards ``j`` with ``j % world == rank``,
reads each in tar order (``iter_shard``), decodes and centre-crops every image to the tokenizer's
resolution (deterministic: no random crop), encodes batches (eval, no_grad) and writes ONE code
shard with the image shard's name under ``--out`` (``CodeShardWriter``: codes, positions for
masked tokenizers, label, caption, optionally the caption's per-token text embedding). Batches
never cross shards, so a shard's bytes do not depend on the world size or on which rank wrote it.

Bad input is skipped and counted with the pipeline's defect vocabulary (data_pipeline/defects.py):
a sample that does not decode is left out of its code shard; a truncated or unreadable image shard
gives a code shard of the samples before the damage. A shard whose reads keep failing (``io_error``,
possibly transient) is NOT written: the job finishes the other shards, writes no manifest and exits
1, and a re-run retries it.

Resume: a code shard appears under its final name only once complete (atomic writes), so shards
already under ``--out`` (``finished_code_shards``) are skipped: a crashed job re-run never redoes
or duplicates one. At the end every rank rebuilds the entries of its skipped shards
(``code_shard_entry``) and rank 0 writes ``manifest.json`` (``write_code_manifest``) over every
shard of ``--data`` that has a code shard.

Identity: ``tokenizer.sha256`` is the sha256 of the package's ``checksums.sha256`` file. That file
lists the sha256 of every file of the package (weights, config, card), so any change to weights or
config changes it, and reading it is one small GET instead of hashing gigabytes of weights on S3
(loading verifies every listed checksum anyway). Re-exporting the same weights with another model
card therefore counts as another tokenizer: conservative, never mixing. Before any shard, rank 0
writes ``--out/tokenizer.json`` (tokenizer name and sha256, resolution, token grid, text encoder,
the dataset's fingerprint); a later run whose tokenizer, settings or dataset differ, or an ``--out``
holding shards or a manifest from anything else, is refused with a :class:`TokenizeError`.

Summary (stdout, one JSON line, rank 0): shards done/skipped/failed, samples, defects by reason,
lost samples, seconds and images/s (samples encoded this run / wall time of the shard loop).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

import torch
import torch.distributed

from data_pipeline import storage
from data_pipeline.codes import (CodeShardWriter, check_code_manifest, code_shard_entry,
                                 finished_code_shards, write_code_manifest)
from data_pipeline.defects import (CORRUPT_METADATA, IO_ERROR, TRUNCATED_SHARD, UNREADABLE_SHARD, DefectLog,
                                   SampleDefect)
from data_pipeline.images import ImageDecoder, to_model_range
from data_pipeline.shards import MANIFEST, ShardError, iter_shard
from data_pipeline.sources import DataError, Shard, open_source, parse_mixture
from model_zoo import create_model, model_entry
from model_zoo.package import CHECKSUMS, load_package, package_sha256, read_config
from model_zoo.text_encoders import to_cached_batch

from .resolve import ResolveError, as_package

log = logging.getLogger("vqscale.tokenize")

GUARD = "tokenizer.json"
# Test hook: "K" raises in the middle of the shard after the K-th this process wrote (after its first
# batch); "K:kill" SIGKILLs the process there instead, leaving what a killed job leaves.
CRASH_ENV = "VQSCALE_TOKENIZE_CRASH_AFTER"
GUARD_FIELDS = ("tokenizer", "resolution", "text_encoder", "data_fingerprint")


class TokenizeError(ValueError):
    """A tokenize job that cannot run as asked (the message says why and what to do)."""


# ------------------------------------------------------------------------------ environment

@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False     # this job initialized the process group, so it destroys it


def dist_env(device: str) -> DistEnv:
    """The torchrun environment; joins (or creates) the process group when ``WORLD_SIZE > 1``.
    (torchrun variables only; Slurm ``srun`` steps need pretrain/distributed.py's detection.)"""
    import torch.distributed as dist

    env = DistEnv(*(int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))))
    if env.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        env.owns_group = True
    return env


def _gather(env: DistEnv, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (rank order), on every rank."""
    if env.world_size == 1:
        return [obj]
    out: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _broadcast(env: DistEnv, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (and a barrier)."""
    box = [obj]
    if env.world_size > 1:
        torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# -------------------------------------------------------------------------------- tokenizer

def resolve_tokenizer(path: str) -> tuple[str, dict[str, Any]]:
    """``(package URL, its config.json)`` for ``path``: a zoo package, a run directory or a step
    folder (:func:`pretrain.resolve.as_package`); anything else is a clear error."""
    try:
        path = as_package(path)
    except ResolveError as e:
        raise TokenizeError(f"--tokenizer {e}") from None
    meta = read_config(path)
    if meta["kind"] == "prior" and meta.get("tokenizer"):
        raise TokenizeError(f"--tokenizer {path} is a prior's package ({meta['name']}): pass its tokenizer, "
                            f"{storage.join(path, meta['tokenizer'])}")
    if meta["kind"] != "tokenizer":
        raise TokenizeError(f"--tokenizer {path} is a {meta['kind']} package ({meta['name']}), not a tokenizer")
    if not storage.exists(storage.join(path, CHECKSUMS)):
        raise TokenizeError(f"--tokenizer {path} is an incomplete package: no {CHECKSUMS}")
    return path, meta


def load_tokenizer(path: str, device: str) -> tuple[torch.nn.Module, dict[str, str]]:
    """``(model in eval mode, {name, sha256})``; the sha256 is that of ``checksums.sha256``."""
    path, meta = resolve_tokenizer(path)
    before = package_sha256(path)
    model = load_package(path, device=device)   # verifies every file against those checksums
    if package_sha256(path) != before:          # re-published while we loaded: identity unknown
        raise TokenizeError(f"--tokenizer {path} changed while it was being loaded; run again")
    return model, {"name": meta["name"], "sha256": before}


@torch.no_grad()
def token_layout(tokenizer, resolution: int, device: str) -> dict[str, Any]:
    """Grid, codebook and token count at ``resolution``, checked by encoding one blank image."""
    size = int(tokenizer.image_size)
    gh, gw = (int(x) for x in tokenizer.grid_size)
    if resolution != size:   # convolutional tokenizers scale their grid with the input
        if (gh * resolution) % size or (gw * resolution) % size:
            raise TokenizeError(f"--resolution {resolution} does not give a whole token grid for a tokenizer "
                                f"trained at {size} px with a {gh}x{gw} grid")
        gh, gw = gh * resolution // size, gw * resolution // size
    dtype = next(tokenizer.parameters()).dtype
    try:
        probe = tokenizer.encode(torch.zeros(1, 3, resolution, resolution, device=device, dtype=dtype))
    except Exception as e:  # noqa: BLE001 - reported as a usage error: wrong resolution for this model
        raise TokenizeError(f"the tokenizer cannot encode {resolution} px images (it was trained at {size} px): "
                            f"{e!r}"[:400]) from None
    n = int(probe.codes.shape[1])
    masked = probe.positions is not None
    if not masked and n != gh * gw:
        raise TokenizeError(f"at {resolution} px the tokenizer gives {n} tokens, not the {gh}x{gw} grid expected")
    return {"grid_size": [gh, gw], "codebook_size": int(tokenizer.codebook_size), "num_tokens": n,
            "positions": masked}


# ------------------------------------------------------------------------------ --out guard

def _guard(identity: dict[str, str], resolution: int, layout: dict[str, Any], text_encoder: str | None,
           data: str, fingerprint: str, package: str) -> dict[str, Any]:
    return {"tokenizer": dict(identity), "package": package, "resolution": resolution, **layout,
            "text_encoder": text_encoder, "data": data, "data_fingerprint": fingerprint,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def prepare_out(out: str, guard: dict[str, Any], source_names: set[str]) -> int:
    """Refuse an ``--out`` made by another tokenizer/setting/dataset, else write the guard file
    (before any shard). Removes stale local temporaries of killed writers; returns their count."""
    sha = guard["tokenizer"]["sha256"]
    guard_url = storage.join(out, GUARD)
    names = storage.listdir(out)
    old = None
    if GUARD in names:
        try:
            old = storage.read_json(guard_url)
        except ValueError as e:
            raise TokenizeError(f"{guard_url} is not valid JSON ({e}); --out is not a tokenize output") from None
        for field in GUARD_FIELDS:
            if old.get(field) != guard[field]:
                what = ("was tokenized by another tokenizer" if field == "tokenizer" else
                        f"was written with another {field.replace('_', ' ')}")
                raise TokenizeError(f"--out {out} {what}: {old.get(field)!r} there, {guard[field]!r} now. "
                                    f"Refusing to mix codes: use another --out (or delete that one)")
    if MANIFEST in names:
        url = storage.join(out, MANIFEST)
        try:
            manifest = check_code_manifest(storage.read_json(url), url)
        except (DataError, ValueError) as e:
            raise TokenizeError(f"--out {out} holds a manifest that is not a code-shard manifest ({e}); "
                                f"refusing to write code shards there (is it the image dataset?)") from None
        if manifest["tokenizer"]["sha256"] != sha:
            raise TokenizeError(f"--out {out} holds codes of tokenizer {manifest['tokenizer']} but this is "
                                f"{guard['tokenizer']}. Refusing to mix codes: use another --out")
    shards = finished_code_shards(out)
    if shards and old is None and MANIFEST not in names:
        raise TokenizeError(f"--out {out} already holds {len(shards)} shards (e.g. {sorted(shards)[0]}) with no "
                            f"{GUARD}: made by something else or another tokenizer; use another --out")
    stray = sorted(shards - source_names)
    if stray:
        raise TokenizeError(f"--out {out} holds shards that are not in --data ({stray[:3]}...); use another --out")
    removed = 0
    if not storage.is_remote(out):   # a SIGKILLed writer leaves its hidden temporary (S3 uploads just vanish)
        for n in names:
            if n.startswith(".") and n.endswith(".tmp") and n[1:].split(".tar.", 1)[0] + ".tar" in source_names:
                storage.remove(storage.join(out, n))
                removed += 1
    if old is None:
        storage.write_json(guard_url, guard)
    return removed


# ----------------------------------------------------------------------------------- shards

@dataclass
class _Job:
    tokenizer: torch.nn.Module
    device: str
    dtype: torch.dtype
    decoder: ImageDecoder
    batch_size: int
    out: str
    layout: dict[str, Any]
    text_encoder: Any
    pool: ThreadPoolExecutor
    retries: int = 4


class _ShardFailed(Exception):
    """A shard whose reads failed after all retries: not written, retried by a re-run."""


def _decode(decoder: ImageDecoder, key: str, files: dict[str, bytes]):
    try:
        return decoder(files, key, None)
    except SampleDefect as d:
        return d


def _raw_batches(it: Iterator, batch_size: int, box: dict[str, Any]) -> Iterator[list]:
    """Groups of ``(key, files)``; a ShardError ends the stream and is left in ``box``."""
    batch: list = []
    try:
        while True:
            try:
                _i, key, files = next(it)
            except StopIteration as stop:
                box["read"] = stop.value or 0   # sample groups in the shard
                break
            batch.append((key, files))
            if len(batch) == batch_size:
                yield batch
                batch = []
    except ShardError as e:
        box["error"], box["read"] = e, e.read
    if batch:
        yield batch


_END = object()


def _decoded_batches(job: _Job, url: str, box: dict[str, Any], depth: int = 3) -> Iterator[list]:
    """``[(key, sample or SampleDefect)]`` batches of one shard, in tar order. A thread reads the
    tar up to ``depth`` batches ahead and hands each image to the decode pool (PIL releases the
    GIL), so reading, decoding and encoding overlap; the order of samples is not affected."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in _raw_batches(iter_shard(url, retries=job.retries), job.batch_size, box):
                if not put([(key, job.pool.submit(_decode, job.decoder, key, files)) for key, files in batch]):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            box["fatal"] = e
        put(_END)

    reader = threading.Thread(target=produce, name="tokenize-reader", daemon=True)
    reader.start()
    try:
        while (item := q.get()) is not _END:
            yield [(key, fut.result()) for key, fut in item]
        if "fatal" in box:
            raise box["fatal"]
    finally:   # also when the consumer stops early (a crash): the reader must not linger
        stop.set()
        reader.join()


@torch.no_grad()
def _encode(job: _Job, samples: list[dict[str, Any]]):
    images = torch.stack([s["image"] for s in samples]).permute(0, 3, 1, 2)
    batch = to_model_range({"image": images, "label": torch.zeros(len(samples), dtype=torch.long)},
                           job.device, job.dtype)
    tokens = job.tokenizer.encode(batch["image"])
    codes = tokens.codes.cpu().numpy()
    positions = None if tokens.positions is None else tokens.positions.cpu().numpy()
    embs = None
    if job.text_encoder is not None:
        hidden, mask = job.text_encoder.encode_text([s["caption"] for s in samples])
        embs = to_cached_batch(hidden, mask)
    return codes, positions, embs


def _retryable(err: ShardError) -> bool:
    """Reads that failed (after retries) or a shard that could not be opened (missing, no access):
    maybe transient, so the shard is not written and a re-run tries again. A shard that opened but
    is not a tar, or is cut short, is bad data: its code shard holds what could be read."""
    if err.reason == IO_ERROR:
        return True
    return err.reason == UNREADABLE_SHARD and not isinstance(err.__cause__, (tarfile.ReadError, EOFError))


def _crash(mode: str, name: str) -> None:
    if mode == "kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"{CRASH_ENV}: simulated crash while writing {name}")


def tokenize_shard(job: _Job, shard: Shard, defects: DefectLog, crash: str | None = None) -> dict[str, Any]:
    """Write the code shard of ``shard``; returns its manifest entry (raises _ShardFailed)."""
    box: dict[str, Any] = {}
    seen: set[str] = set()
    with CodeShardWriter(job.out, shard.name, job.layout["codebook_size"], job.layout["grid_size"]) as w, \
            contextlib.closing(_decoded_batches(job, shard.url, box)) as batches:
        for decoded in batches:
            ok = []
            for key, res in decoded:
                if isinstance(res, SampleDefect):
                    defects.defect(res.reason, shard.name, key, res.detail)
                elif key in seen:   # the writer refuses duplicate keys; the first one is kept
                    defects.defect(CORRUPT_METADATA, shard.name, key, "duplicate sample key in the shard")
                else:
                    seen.add(key)
                    ok.append(res)
            if not ok:
                continue
            codes, positions, embs = _encode(job, ok)
            for i, s in enumerate(ok):
                w.write(s["key"], codes[i], None if positions is None else positions[i],
                        label=None if s["label"] < 0 else s["label"], caption=s["caption"],
                        text_embedding=None if embs is None else embs[i])
            if crash is not None:
                _crash(crash, shard.name)
        err = box.get("error")
        if err is not None:
            defects.defect(err.reason, shard.name, detail=err.detail)
            if _retryable(err):
                raise _ShardFailed(f"{shard.name}: {err}")   # aborts the writer: nothing under the name
    entry = w.close()
    read = box.get("read", 0)
    if shard.samples is not None and read < shard.samples:   # promised by the image manifest, not there
        if err is None:   # a tar cut at a member boundary reads as a clean, short one
            defects.defect(TRUNCATED_SHARD, shard.name, detail=f"{read} of {shard.samples} samples")
        defects.lost_samples += shard.samples - read
    return entry


# -------------------------------------------------------------------------------------- job

def _source(data: str) -> tuple[str, tuple[Shard, ...], str]:
    specs = parse_mixture(data)
    if len(specs) != 1:
        raise TokenizeError(f"--data names {len(specs)} datasets: tokenize one dataset at a time "
                            f"(a mixture's weights mean nothing here; each gets its own --out)")
    src = open_source(specs[0][0])
    names = [s.name for s in src.shards]
    if len(set(names)) != len(names):
        raise TokenizeError(f"--data {data} has several shards with one name; code shards are named after them")
    return src.url, src.shards, src.fingerprint


def run_tokenize(tokenizer: str, data: str, out: str, batch_size: int = 64, resolution: int | None = None,
                 device: str | None = None, text_encoder: str | None = None, limit_shards: int | None = None,
                 decode_threads: int | None = None, progress: bool = True, retries: int = 4) -> dict[str, Any]:
    """The ``vqscale tokenize`` job on this rank; returns the job's summary (the same on every rank)."""
    from tqdm import tqdm

    if batch_size < 1 or (limit_shards is not None and limit_shards < 0):
        raise TokenizeError(f"--batch-size must be >= 1 and --limit-shards >= 0, got {batch_size}, {limit_shards}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TokenizeError("--device cuda: no CUDA device is available")
    env = dist_env(device)
    try:
        if device == "cuda":
            device = f"cuda:{env.local_rank}"
            torch.cuda.set_device(device)
        result = _run(env, tokenizer, data, out, batch_size, resolution, device, text_encoder, limit_shards,
                      decode_threads, progress and env.rank == 0, retries, tqdm)
        if env.owns_group and env.world_size > 1:
            # The last collective (an object broadcast) can return on the sender before the peers
            # are done with it; tearing gloo down then aborted a rank at exit in a loaded CI run.
            torch.distributed.barrier()
        return result
    finally:
        if env.owns_group:
            torch.distributed.destroy_process_group()


def _run(env, tokenizer_path, data, out, batch_size, resolution, device, text_encoder, limit_shards,
         decode_threads, progress, retries, tqdm) -> dict[str, Any]:
    t_start = time.perf_counter()
    model, identity = load_tokenizer(tokenizer_path, device)
    resolution = int(resolution or model.image_size)
    layout = token_layout(model, resolution, device)
    enc = None
    if text_encoder:
        try:
            if model_entry(text_encoder).kind != "text_encoder":
                raise TokenizeError(f"--text-encoder {text_encoder} is a {model_entry(text_encoder).kind}")
            enc = create_model(text_encoder).to(device)
        except KeyError as e:
            raise TokenizeError(f"--text-encoder: {e.args[0]}") from None
        except FileNotFoundError as e:   # TextEncoderWeightsNotFound: says where it looked
            raise TokenizeError(f"--text-encoder {text_encoder}: {e}") from None
    src_url, shards, fingerprint = _source(data)
    guard = _guard(identity, resolution, layout, text_encoder, src_url, fingerprint, tokenizer_path)
    problem, stale = None, 0
    if env.rank == 0:
        try:
            stale = prepare_out(out, guard, {s.name for s in shards})
        except TokenizeError as e:
            problem = str(e)
    problem, stale = _broadcast(env, (problem, stale))   # also the barrier: no rank writes before the guard
    if problem:
        raise TokenizeError(problem)

    done_before = finished_code_shards(out)
    limit = len(shards) if limit_shards is None else min(limit_shards, len(shards))
    mine = [(j, s) for j, s in enumerate(shards) if j % env.world_size == env.rank]
    todo = [s for j, s in mine if j < limit and s.name not in done_before]
    crash_after, _, crash_mode = os.environ.get(CRASH_ENV, "-1").partition(":")
    crash_after = int(crash_after)
    job = _Job(model, device, next(model.parameters()).dtype, ImageDecoder(resolution, crop="center"),
               batch_size, out, layout, enc,
               ThreadPoolExecutor(max(1, decode_threads or min(8, os.cpu_count() or 1))), retries)
    defects = DefectLog()
    entries, failed, samples = [], [], 0
    t0 = time.perf_counter()
    try:
        with tqdm(total=len(todo), desc=f"tokenize -> {out}", unit="shard", disable=not progress) as bar:
            for shard in todo:
                try:
                    entry = tokenize_shard(job, shard, defects,
                                           crash=crash_mode if len(entries) == crash_after else None)
                except _ShardFailed as e:
                    log.error("rank %d: shard not written (re-run to retry): %s", env.rank, e)
                    failed.append(shard.name)
                else:
                    entries.append(entry)
                    samples += entry["samples"]
                    log.info("rank %d/%d wrote %s: %d samples", env.rank, env.world_size, shard.name,
                             entry["samples"])
                bar.update(1)
    finally:
        job.pool.shutdown(wait=True, cancel_futures=True)
    loop_s = time.perf_counter() - t0
    # Entries of shards finished by earlier runs: each rank re-reads its own share in parallel.
    entries += [code_shard_entry(out, s.name) for _j, s in mine if s.name in done_before]
    parts = _gather(env, {"entries": entries, "failed": failed, "samples": samples, "loop_s": loop_s,
                          "defects": defects.to_state(), "done": len(todo) - len(failed),
                          "skipped": sum(s.name in done_before for _j, s in mine)})
    all_failed = sorted(n for p in parts for n in p["failed"])
    manifest_url = None
    if env.rank == 0 and not all_failed:
        all_entries = [e for p in parts for e in p["entries"]]
        write_code_manifest(out, all_entries, identity["name"], identity["sha256"], layout["grid_size"],
                            layout["codebook_size"], layout["num_tokens"])
        manifest_url = storage.join(out, MANIFEST)
    manifest_url = _broadcast(env, manifest_url)   # the barrier: the job ends once the manifest exists
    merged = DefectLog.merged(p["defects"] for p in parts)
    total_samples = sum(p["samples"] for p in parts)
    loop_max = max(p["loop_s"] for p in parts)
    return {
        "out": out, "tokenizer": identity, "resolution": resolution, **layout,
        "text_encoder": text_encoder, "world_size": env.world_size, "shards": limit,
        "shards_done": sum(p["done"] for p in parts), "shards_skipped": sum(p["skipped"] for p in parts),
        "shards_failed": all_failed, "samples": total_samples,
        "defects": {**merged.summary(), "examples": merged.examples[:5]}, "lost_samples": merged.lost_samples,
        "stale_temporaries_removed": stale, "manifest": manifest_url,
        "seconds": round(time.perf_counter() - t_start, 3),
        "images_per_s": round(total_samples / loop_max, 1) if loop_max > 0 and total_samples else 0.0,
        "device": device,
    }


def main_tokenize(args) -> int:
    """CLI glue: ``args`` from the ``tokenize`` sub-parser of pretrain/cli.py."""
    summary = run_tokenize(args.tokenizer, args.data, args.out, batch_size=args.batch_size,
                           resolution=args.resolution, device=args.device, text_encoder=args.text_encoder,
                           limit_shards=args.limit_shards, decode_threads=args.decode_threads)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary), flush=True)
    return 1 if summary["shards_failed"] else 0
