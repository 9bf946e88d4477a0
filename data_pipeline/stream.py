"""The resumable sharded stream: shards → ranks × workers → shuffled samples → batches.

Design (what makes resume exact at any world size):

* **Shard order from (seed, epoch).** Each epoch permutes a source's shards; the shards still to
  be read in that epoch are dealt round-robin to the ``ranks × workers`` reader slots, so slots
  never overlap and their union is the epoch.
* **A deterministic order inside each shard**: tar order. A sample is named by
  ``(epoch, shard, index)``.
* **Interleave and shuffle.** A slot keeps ``interleave`` shards open, draws the next sample
  from a random one, and feeds a buffer of raw bytes (decoded late, only when it leaves the
  buffer) from which a random sample is taken.
* **A cursor per shard.** Because of the buffer, "consumed" is a set, not a count. Per shard the
  state keeps ``cursor`` (samples read from the tar so far) and ``pending`` (indices below the
  cursor that were read but not yet delivered: they sit in a buffer). Consumed = ``[0, cursor)``
  minus ``pending``. Shards fully consumed are a bitmap. This state belongs to no rank or worker:
  on resume it is dealt again over whatever slots the new job has.
* **Snapshots travel with the batches.** A worker attaches its progress to every batch it emits;
  the main process keeps the latest per worker, so the saved state covers exactly the batches
  the training loop received (not those prefetched), and ranks' states merge by taking, per
  shard, the record with the larger cursor.
* **Exact order on an unchanged layout.** The progress above is exact as a *set*; the order
  also depends on each slot's RNG (shuffle, interleave and mixture draws, random crops), its
  buffer, its open shards and its deal of shards. So each snapshot also carries its slot's
  whole reader state (:mod:`data_pipeline.resume_exact`: buffered samples by name, not bytes),
  and the saved state keeps one such record per slot and, per rank, which worker the
  round-robin of the ``DataLoader`` serves next. A resume with the same ranks, workers, seed
  and ``max_epochs`` restores every slot (re-reading its buffered samples from their shards)
  and rotates the workers' roles so that the rank's round-robin goes on with the worker that
  was next: its batches are those the uninterrupted run gives, samples, order and crops. On any
  other layout the records are dropped and the shards re-dealt as above. Either way the
  per-shard progress stays the source of truth, so a later resume on another layout stays exact
  as a set.

Policies:

* **Epoch tail**: nothing is dropped. A slot that finishes its shards of epoch ``e`` goes on
  with its shards of ``e + 1``, so every rank yields full batches forever and no rank waits for
  another; the last incomplete global batch of an epoch is completed with samples of the next.
  "Steps per epoch" is nominal (``samples // global batch``). Every sample of every epoch is
  delivered exactly once across crashes and world-size changes.
* **Defects**: a skipped sample (corrupt, filtered, in a broken shard) counts as consumed; it is
  counted by reason and never retried. Samples a manifest promised but a broken shard did not
  deliver are counted as ``lost_samples``. A read that fails is retried for ``retry_for_s``
  before its shard is given up; a reader that gave up hands out its buffer before it reads on, so
  the counts travel with batches even while the source is down. :meth:`StreamingLoader.data_totals`
  sums them over ranks for the logs, and :func:`check_lost_fraction` is the give-up policy.
* **Too few shards**: a source with fewer shards than ``ranks × workers`` is an error at
  start-up (every slot needs a shard of every fresh epoch).
* A finite stream (``max_epochs``, for evaluation) ends after that many epochs per slot; its last
  batch may be short unless ``drop_last``.
"""

from __future__ import annotations

import base64
import functools
import pickle
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import resume_exact as exact
from .defects import REASONS, TRUNCATED_SHARD, DefectLog, SampleDefect, SampleFiltered
from .shards import DEFAULT_RETRY_FOR_S, ShardError, iter_shard
from .sources import DataError, Source

STATE_VERSION = 1


# ------------------------------------------------------------------------------ progress records


@dataclass
class _EpochProgress:
    done: set[int] = field(default_factory=set)
    partial: dict[int, tuple[int, frozenset[int]]] = field(default_factory=dict)

    def mark_done(self, s: int) -> None:
        self.done.add(s)
        self.partial.pop(s, None)

    def mark_partial(self, s: int, cursor: int, pending: frozenset[int]) -> None:
        """Keep the record with more progress: the larger cursor; for equal cursors the smaller
        pending set (the owner re-read some of the base state's pending samples)."""
        if s in self.done:
            return
        old = self.partial.get(s)
        if old is None or cursor > old[0]:
            self.partial[s] = (cursor, pending)
        elif cursor == old[0]:
            self.partial[s] = (cursor, old[1] & pending)


class SourceProgress:
    """Which samples of one source have been consumed, epoch by epoch."""

    def __init__(self, num_shards: int, first_epoch: int = 0):
        self.num_shards = num_shards
        self.first_epoch = first_epoch  # every epoch before it is complete
        self.epochs: dict[int, _EpochProgress] = {}

    def epoch(self, e: int) -> _EpochProgress:
        return self.epochs.setdefault(e, _EpochProgress())

    def compact(self) -> None:
        for e in [e for e in self.epochs if e < self.first_epoch]:
            del self.epochs[e]
        while True:
            rec = self.epochs.get(self.first_epoch)
            if rec is None or len(rec.done) < self.num_shards:
                break
            del self.epochs[self.first_epoch]
            self.first_epoch += 1

    def remaining(self, e: int, order: np.ndarray) -> list[tuple[int, int, frozenset[int]]]:
        """Shards of epoch ``e`` not fully consumed, in ``order``: ``(shard, cursor, pending)``."""
        if e < self.first_epoch:
            return []
        rec = self.epochs.get(e)
        if rec is None:
            return [(int(s), 0, frozenset()) for s in order]
        out = []
        for s in order:
            s = int(s)
            if s in rec.done:
                continue
            cursor, pending = rec.partial.get(s, (0, frozenset()))
            out.append((s, cursor, pending))
        return out

    def consumed(self, e: int, s: int, i: int) -> bool:
        if e < self.first_epoch:
            return True
        rec = self.epochs.get(e)
        if rec is None:
            return False
        if s in rec.done:
            return True
        cursor, pending = rec.partial.get(s, (0, frozenset()))
        return i < cursor and i not in pending

    def to_json(self) -> dict[str, Any]:
        epochs = {}
        for e, rec in sorted(self.epochs.items()):
            bits = np.zeros(self.num_shards, dtype=bool)
            bits[list(rec.done)] = True
            epochs[str(e)] = {
                "done": base64.b64encode(np.packbits(bits).tobytes()).decode(),
                "partial": {str(s): [c, sorted(p)] for s, (c, p) in sorted(rec.partial.items())},
            }
        return {"num_shards": self.num_shards, "first_epoch": self.first_epoch, "epochs": epochs}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SourceProgress":
        sp = cls(int(d["num_shards"]), int(d.get("first_epoch", 0)))
        for e, rec in d.get("epochs", {}).items():
            ep = sp.epoch(int(e))
            done = rec.get("done", [])
            if isinstance(done, str):
                bits = np.unpackbits(np.frombuffer(base64.b64decode(done), dtype=np.uint8))[: sp.num_shards]
                done = np.flatnonzero(bits).tolist()
            ep.done.update(int(s) for s in done)
            for s, (c, p) in rec.get("partial", {}).items():
                ep.mark_partial(int(s), int(c), frozenset(int(i) for i in p))
        return sp

    def merge(self, other: "SourceProgress") -> None:
        self.first_epoch = max(self.first_epoch, other.first_epoch)
        for e, rec in other.epochs.items():
            mine = self.epoch(e)
            for s in rec.done:
                mine.mark_done(s)
            for s, (c, p) in rec.partial.items():
                mine.mark_partial(s, c, p)
        self.compact()


def initial_state(sources: Sequence[Source]) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "sources": [{"url": src.url, "fingerprint": src.fingerprint,
                     **SourceProgress(len(src.shards)).to_json()} for src in sources],
        "samples": 0,
        "defects": DefectLog().to_state(),
    }


def merge_states(base: dict[str, Any], deltas: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Fold per-rank progress (``StreamingLoader.local_delta``) into a saved global state."""
    out = {"version": STATE_VERSION, "sources": [], "samples": int(base["samples"])}
    for i, src in enumerate(base["sources"]):
        sp = SourceProgress.from_json(src)
        for d in deltas:
            sp.merge(SourceProgress.from_json({"num_shards": sp.num_shards, **d["sources"][i]}))
        out["sources"].append({"url": src["url"], "fingerprint": src["fingerprint"], **sp.to_json()})
    out["samples"] += sum(int(d["samples"]) for d in deltas)
    out["defects"] = DefectLog.merged([base["defects"], *(d["defects"] for d in deltas)]).to_state()
    # The base's slot records are superseded: every rank reports all of its slots.
    slots = exact.merge_exact(deltas)
    if slots is not None:
        out["exact"] = slots
    return out


def shard_order(seed: int, source_index: int, epoch: int, num_shards: int) -> np.ndarray:
    return np.random.default_rng([seed, source_index, epoch, 0x5A4D]).permutation(num_shards)


def slot_shards(progress: SourceProgress, seed: int, source_index: int, epoch: int, slot: int,
                nslots: int) -> list[tuple[int, int, frozenset[int]]]:
    """The shards (with cursor and pending set) that reader ``slot`` of ``nslots`` reads in
    ``epoch``: the epoch's unfinished shards in seeded order, dealt round-robin."""
    order = shard_order(seed, source_index, epoch, progress.num_shards)
    return progress.remaining(epoch, order)[slot::nslots]


def start_record(spec: "StreamSpec", state: dict[str, Any], slot: int, nslots: int) -> dict[str, Any]:
    """The exact record of a slot that starts from ``state`` by a fresh deal (see
    :mod:`data_pipeline.resume_exact`)."""
    # A fresh stream per (seed, layout, resume point): deterministic for a given checkpoint.
    rng = np.random.default_rng([spec.seed, nslots, slot, int(state["samples"]), 0x57AE])
    sources = []
    for i in range(len(spec.sources)):
        progress = SourceProgress.from_json(state["sources"][i])
        first = progress.first_epoch
        last = None if spec.max_epochs is None else first + spec.max_epochs
        # Epochs with progress are dealt from it now; those without are dealt fresh, later.
        plan = {str(e): [[s, c, sorted(p)] for s, c, p in
                         slot_shards(progress, spec.seed, i, e, slot, nslots)]
                for e in sorted(progress.epochs) if e >= first and (last is None or e < last)}
        sources.append({"plan": plan, "dealt": [first, None], "last": last, "open": [],
                        "retiring": [], "buffer": exact.pack_ids([]), "watch": {},
                        "exhausted": False})
    return {"rng": exact.rng_state(rng), "finished": False, "sources": sources}


# ---------------------------------------------------------------------------------- worker side


@dataclass
class StreamSpec:
    """Everything a worker needs; pickled into each dataloader worker."""

    sources: list[Source]
    decode: Callable[[dict[str, bytes], str, np.random.Generator], dict[str, Any]]
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    batch_size: int
    seed: int = 0
    prefilter: Callable[[dict[str, bytes]], str | None] | None = None
    shuffle_buffer: int = 1000
    interleave: int = 4
    retries: int = 4
    retry_backoff: float = 0.5
    retry_for_s: float = DEFAULT_RETRY_FOR_S   # a failing read is retried at least this long
    verify_checksums: bool = True   # a shard read to its end is checked against the manifest's sha256
    max_epochs: int | None = None   # None: endless (training)
    drop_last: bool = False         # only meaningful for a finite stream


class _OpenShard:
    """One shard being read by a slot, with the bookkeeping for its cursor and pending set."""

    def __init__(self, epoch: int, shard: int, url: str, expected: int | None, cursor: int,
                 pending: frozenset[int], spec: StreamSpec, sha256: str | None = None):
        self.epoch, self.shard, self.url, self.expected = epoch, shard, url, expected
        self.cursor = cursor
        self.unread_pending = set(pending)   # consumed-state holes not yet re-read
        self.in_buffer = 0
        self.read_done = False
        self.gave_up = False                 # its reads failed through the whole retry budget
        want = (lambda i: i >= cursor or i in pending) if (cursor or pending) else None
        self._it = iter_shard(url, retries=spec.retries, backoff=spec.retry_backoff, want=want,
                              retry_for_s=spec.retry_for_s, sha256=sha256 if spec.verify_checksums else None)

    def next(self, defects: DefectLog):
        """The next wanted sample ``(index, key, files)``, or None at the end of the shard."""
        try:
            i, key, files = next(self._it)
        except StopIteration as stop:
            total = stop.value
            if self.expected is not None and total is not None and total < self.expected:
                defects.defect(TRUNCATED_SHARD, self.url, detail=f"{total} of {self.expected} samples")
                defects.lost_samples += self.expected - total
            self._end(defects)
            return None
        except ShardError as e:
            self.gave_up = e.gave_up
            defects.defect(e.reason, self.url, detail=e.detail)
            if self.expected is not None:
                defects.lost_samples += max(0, self.expected - max(e.read, self.cursor))
            self._end(defects)
            return None
        self.unread_pending.discard(i)
        self.cursor = max(self.cursor, i + 1)
        return i, key, files

    def _end(self, defects: DefectLog) -> None:
        self.read_done = True
        if self.unread_pending:  # holes past the point where the shard broke can never be read
            defects.lost_samples += len(self.unread_pending)
            self.unread_pending.clear()

    @property
    def done(self) -> bool:
        return self.read_done and self.in_buffer == 0 and not self.unread_pending


class _SourceReader:
    """One slot's reader of one source: tasks across epochs, interleaved shards, shuffle buffer."""

    def __init__(self, spec: StreamSpec, index: int, record: dict[str, Any], slot: int,
                 nslots: int, rng: np.random.Generator, defects: DefectLog):
        """Restores the reader from its part of a slot record (:func:`start_record` for a fresh
        deal); the shards and samples it names are reopened and read again."""
        self.spec, self.index, self.source = spec, index, spec.sources[index]
        self.slot, self.nslots = slot, nslots
        self.rng, self.defects = rng, defects
        self.plan = {int(e): [(int(s), int(c), frozenset(int(i) for i in p)) for s, c, p in tasks]
                     for e, tasks in record["plan"].items()}
        self.epoch, self.pos = int(record["dealt"][0]), record["dealt"][1]
        self.last = record["last"]
        self._deal: tuple[int | None, list] = (None, [])
        self._watch: dict[int, dict[str, int]] = {int(e): dict(w) for e, w in record["watch"].items()}
        self.exhausted = bool(record["exhausted"])
        self.draining = bool(record.get("draining", False))
        self.open: list[_OpenShard] = []
        self.active: dict[tuple[int, int], _OpenShard] = {}
        self.buffer: list[tuple[int, int, int, str, dict[str, bytes]]] = []
        self.done_delta: list[tuple[int, int]] = []
        for e, s, cursor, unread in record["open"]:
            self.open.append(self._open(int(e), int(s), int(cursor), frozenset(int(i) for i in unread)))
        for e, s, cursor in record["retiring"]:
            self._open(int(e), int(s), int(cursor), frozenset()).read_done = True
        ids = exact.unpack_ids(record["buffer"])
        if ids:
            url_of = lambda s: self.source.shards[s].url  # noqa: E731
            for entry in exact.reread_buffer(url_of, ids, spec.retries, spec.retry_backoff, defects,
                                             retry_for_s=spec.retry_for_s):
                self.active[(entry[0], entry[1])].in_buffer += 1
                self.buffer.append(entry)
            for sh in list(self.active.values()):  # one whose samples could not be re-read
                if sh.read_done:
                    self._retire_if_done(sh)

    def _open(self, e: int, s: int, cursor: int, pending: frozenset[int]) -> "_OpenShard":
        sh = self.source.shards[s]
        task = self.active[(e, s)] = _OpenShard(e, s, sh.url, sh.samples, cursor, pending, self.spec,
                                                sh.sha256)
        return task

    def _tasks_of(self, e: int) -> list[tuple[int, int, frozenset[int]]]:
        if self._deal[0] != e:
            if e in self.plan:
                tasks = self.plan[e]
            else:
                order = shard_order(self.spec.seed, self.index, e, len(self.source.shards))
                tasks = [(int(s), 0, frozenset()) for s in order[self.slot::self.nslots]]
            self._deal = (e, tasks)
        return self._deal[1]

    def _enter(self, e: int) -> None:
        self.epoch, self.pos = e, 0
        tasks = self._tasks_of(e)
        # An endless stream over a source that yields nothing would spin forever: watch each
        # fresh epoch, and fail once all of this slot's shards of it ended with no sample.
        if e not in self.plan and tasks and self.last is None:
            self._watch[e] = {"shards": len(tasks), "ended": 0, "buffered": 0, "resolved": 0, "ok": 0}

    def _next_task(self) -> "_OpenShard | None":
        """The next shard of this slot's deal, epoch after epoch; None at the end (max_epochs)."""
        while self.last is None or self.epoch < self.last:
            if self.pos is None:
                self._enter(self.epoch)
            tasks = self._tasks_of(self.epoch)
            if self.pos < len(tasks):
                s, cursor, pending = tasks[self.pos]
                self.pos += 1
                return self._open(self.epoch, s, cursor, pending)
            self.epoch, self.pos = self.epoch + 1, None
        return None

    def _shard_ended(self, sh: _OpenShard) -> None:
        if sh.epoch in self._watch:
            self._watch[sh.epoch]["ended"] += 1
            self._check(sh.epoch)

    def note(self, epoch: int, ok: bool) -> None:
        """Called once per sample taken from the buffer: decoded (ok) or skipped."""
        w = self._watch.get(epoch)
        if w is not None:
            w["resolved"] += 1
            w["ok"] += ok
            self._check(epoch)

    def _check(self, epoch: int) -> None:
        w = self._watch[epoch]
        if w["ended"] < w["shards"] or w["resolved"] < w["buffered"]:
            return
        del self._watch[epoch]
        if not w["ok"]:
            raise DataError(f"no usable sample in {w['shards']} shards of {self.source.url} "
                            f"(epoch {epoch}): defects so far {dict(self.defects.by_reason)}, "
                            f"filtered {dict(self.defects.filtered)}, lost samples {self.defects.lost_samples}; "
                            f"the data or the filters leave nothing to train on, or the source could not be "
                            f"read for data.retry_for_s={self.spec.retry_for_s:g}s")

    def _read_one(self) -> bool | None:
        """Read one sample into the buffer: True; False when this slot has no shard left (a
        finite stream's end); None when a shard's reads were just given up (after
        ``retry_for_s``): the reader then drains its buffer before it tries the next shard, so
        the samples already read go out, with the count of what was lost, instead of waiting
        while shard after shard of a source that is down fails (see :meth:`pop`)."""
        while True:
            while len(self.open) < self.spec.interleave:
                task = self._next_task()
                if task is None:
                    break
                self.open.append(task)
            if not self.open:
                return False
            j = int(self.rng.integers(len(self.open)))
            sh = self.open[j]
            item = sh.next(self.defects)
            if item is None:
                self.open.pop(j)
                self._retire_if_done(sh)
                self._shard_ended(sh)
                if sh.gave_up:
                    self.draining = True
                    return None
                continue
            i, key, files = item
            if self.spec.prefilter is not None:
                reason = self.spec.prefilter(files)
                if reason is not None:
                    self.defects.filter(reason)
                    continue
            sh.in_buffer += 1
            self.buffer.append((sh.epoch, sh.shard, i, key, files))
            if sh.epoch in self._watch:
                self._watch[sh.epoch]["buffered"] += 1
            return True

    def _retire_if_done(self, sh: _OpenShard) -> None:
        if sh.done:
            self.active.pop((sh.epoch, sh.shard), None)
            self.done_delta.append((sh.epoch, sh.shard))

    def pop(self):
        """A random sample from the buffer (refilled first, except while it drains after reads
        were given up), or None when the source is over, or when the buffer is empty right after
        reads were given up (the next call goes on reading)."""
        read: bool | None = True
        if not (self.draining and self.buffer):
            self.draining = False
            while len(self.buffer) < self.spec.shuffle_buffer:
                read = self._read_one()
                if not read:
                    break
        if not self.buffer:
            if read is None:
                return None
            self.exhausted = True
            return None
        j = int(self.rng.integers(len(self.buffer)))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        entry = self.buffer.pop()
        sh = self.active[(entry[0], entry[1])]
        sh.in_buffer -= 1
        self._retire_if_done(sh)
        return entry

    def snapshot(self) -> dict[str, Any]:
        """Progress of the shards this slot holds, plus shards finished since the last one."""
        in_buf: dict[tuple[int, int], list[int]] = defaultdict(list)
        for e, s, i, _k, _f in self.buffer:
            in_buf[(e, s)].append(i)
        active = {k: (sh.cursor, frozenset(sh.unread_pending).union(in_buf.get(k, ())))
                  for k, sh in self.active.items()}
        done, self.done_delta = self.done_delta, []
        return {"active": active, "done": done}

    def exact(self) -> dict[str, Any]:
        """This reader's part of the slot record, less ``plan`` and ``last`` (the main process
        knows them: :func:`data_pipeline.resume_exact.advance`)."""
        return {"dealt": [self.epoch, self.pos],
                "open": [[sh.epoch, sh.shard, sh.cursor, sorted(sh.unread_pending)] for sh in self.open],
                "retiring": [[e, s, sh.cursor] for (e, s), sh in self.active.items() if sh.read_done],
                "buffer": exact.pack_ids([entry[:3] for entry in self.buffer]),
                "watch": {str(e): dict(w) for e, w in self._watch.items()},
                "exhausted": self.exhausted, "draining": self.draining}


WORKER_TERM_GRACE_S = 300


def _shield_worker_from_job_signals(closing, _worker_id: int) -> None:
    """Keep a loader worker alive through the job's stop signals, and no longer than its loader.

    Slurm delivers ``scancel --signal`` and pre-emption's SIGTERM to every process of the job
    step, loader workers included. A worker that dies of it makes the main process raise at its
    next batch, possibly in the middle of the checkpoint the same signal asked for. The main
    process owns the decision to stop (``pretrain.distributed.StopFlag``) and shuts its workers
    down through their queues; a worker ignores SIGUSR1/SIGUSR2 and, on SIGTERM, only arms an
    alarm that ends it after ``WORKER_TERM_GRACE_S`` should that orderly shutdown never come
    (its parent's watchdog ends it sooner if the parent dies).

    ``closing`` (a shared flag) tells the two SIGTERMs apart: the main process sets it once its
    iteration is over, before the ``DataLoader`` or ``multiprocessing``'s exit handler terminate
    the workers that have not left through their queues (one busy retrying a read, or all of
    them when the process exits on an error with the iterator still referenced by the
    traceback). Such a SIGTERM ends the worker at once (exit status 0). Without the flag every
    failed run waited out the alarm: ``multiprocessing`` joins its terminated children at exit,
    so a fatal error took 5 minutes to end the process.
    """
    import os
    import signal

    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)

    def on_term(*_):
        if closing.value:
            os._exit(0)
        signal.alarm(WORKER_TERM_GRACE_S)

    signal.signal(signal.SIGTERM, on_term)


# The closing flags of the iterations with live workers, set at interpreter exit before
# multiprocessing's own exit handler (registered earlier, so it runs later) terminates them.
_LIVE_FLAGS: list[Any] = []
_ATEXIT_REGISTERED = False


def _closing_flag():
    """A new shared flag for :func:`_shield_worker_from_job_signals`, also set on interpreter exit."""
    global _ATEXIT_REGISTERED
    import multiprocessing.util  # noqa: F401 - its exit handler must be registered before ours

    import torch.multiprocessing as tmp

    flag = tmp.get_context().Value("b", 0, lock=False)
    if not _ATEXIT_REGISTERED:
        import atexit

        atexit.register(_set_all_closing)
        _ATEXIT_REGISTERED = True
    _LIVE_FLAGS.append(flag)
    return flag


def _release_flag(flag) -> None:
    flag.value = 1
    _LIVE_FLAGS[:] = [f for f in _LIVE_FLAGS if f is not flag]


def _set_all_closing() -> None:
    for flag in _LIVE_FLAGS:
        flag.value = 1


# Small tensors leave a worker by value, inside the pickle. A tensor's default way out (its storage
# moved to shared memory, its file descriptor fetched by the main process over a socket from the
# worker's resource-sharer thread, which must win the worker's GIL) cost ~0.5 ms per tensor: 3 per
# code batch made 1.7 ms of every next(). By value: vim-large's wait at an H100 step fell from
# 3.3% to 1.7% of the step (benchmarks/bench_data_wait.py). Large tensors (images, written
# straight into shared memory by their collate) still travel by descriptor.
BY_VALUE_MAX_BYTES = 256 * 1024


class _ByValue:
    """A small tensor's bytes, dtype and shape; ``DataLoader``'s pin-memory thread pins it through
    :meth:`pin_memory`, and :func:`_unwrap` rebuilds it where nothing pinned it."""

    __slots__ = ("data", "dtype", "shape")

    def __init__(self, t: torch.Tensor):
        self.data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        self.dtype, self.shape = t.dtype, tuple(t.shape)

    def tensor(self) -> torch.Tensor:
        if not self.data:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(bytearray(self.data), dtype=torch.uint8).view(self.dtype).reshape(self.shape)

    def pin_memory(self, *_args) -> torch.Tensor:
        return self.tensor().pin_memory()


def _by_value(batch: dict[str, Any]) -> dict[str, Any]:
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.is_contiguous() and v.nbytes <= BY_VALUE_MAX_BYTES:
            batch[k] = _ByValue(v)
    return batch


def _unwrap(batch: dict[str, Any]) -> dict[str, Any]:
    for k, v in batch.items():
        if isinstance(v, _ByValue):
            batch[k] = v.tensor()
    return batch


class ShardStream(IterableDataset):
    """Yields collated batches, each with its worker's progress under ``"__state__"``.

    ``starts`` holds the slot record (:mod:`data_pipeline.resume_exact`) each worker role of
    this rank starts from; worker ``w`` plays role ``(w + offset) % workers``, so that after an
    exact resume the ``DataLoader``'s round-robin, which starts at worker 0, starts at the role
    that was next.
    """

    def __init__(self, spec: StreamSpec, starts: Sequence[dict[str, Any]], rank: int,
                 world_size: int, offset: int = 0):
        super().__init__()
        self.spec, self.starts, self.rank, self.world_size = spec, list(starts), rank, world_size
        self.offset = offset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        if nworkers != len(self.starts):
            raise RuntimeError(f"{nworkers} workers for {len(self.starts)} slot records")
        role = (wid + self.offset) % nworkers
        slot, nslots = self.rank * nworkers + role, self.world_size * nworkers
        spec, record = self.spec, self.starts[role]
        if record["finished"]:
            return  # this role's finite stream ended before the state was saved
        rng = exact.rng_from_state(record["rng"])
        defects = DefectLog()
        readers = [_SourceReader(spec, i, record["sources"][i], slot, nslots, rng, defects)
                   for i in range(len(spec.sources))]
        weights = np.array([s.weight for s in spec.sources], dtype=np.float64)
        while True:
            samples, epochs = [], []
            while len(samples) < spec.batch_size:
                live = [r for r in readers if not r.exhausted]
                if not live:
                    break
                if len(live) == 1:
                    reader = live[0]
                else:
                    w = np.array([weights[r.index] for r in live])
                    reader = live[int(rng.choice(len(live), p=w / w.sum()))]
                entry = reader.pop()
                if entry is None:
                    continue
                e, s, i, key, files = entry
                try:
                    samples.append(spec.decode(files, key, rng))
                    epochs.append(e)
                    reader.note(e, True)
                except SampleDefect as d:
                    defects.defect(d.reason, reader.source.shards[s].url, key, d.detail)
                    reader.note(e, False)
                except SampleFiltered as f:
                    defects.filter(f.reason)
                    reader.note(e, False)
            if not samples or (len(samples) < spec.batch_size and spec.drop_last):
                # The end of a finite stream: a last message with no samples carries the progress
                # and the defects counted since the last batch, so none of them is lost.
                snap = {"worker": role, "sources": [r.snapshot() for r in readers], "samples": 0,
                        "defects": defects.take_delta(), "exact": self._exact(rng, readers, True)}
                yield {"__state__": pickle.dumps(snap, protocol=pickle.HIGHEST_PROTOCOL)}
                return
            batch = spec.collate(samples)
            # Which epoch of its dataset each sample belongs to: near an epoch boundary a batch
            # mixes the tail of one epoch with the head of the next.
            batch["epoch"] = torch.tensor(epochs, dtype=torch.long)
            snap = {"worker": role, "sources": [r.snapshot() for r in readers],
                    "samples": len(samples), "defects": defects.take_delta(),
                    "exact": self._exact(rng, readers, False)}
            batch["__state__"] = pickle.dumps(snap, protocol=pickle.HIGHEST_PROTOCOL)
            yield _by_value(batch) if get_worker_info() is not None else batch

    @staticmethod
    def _exact(rng: np.random.Generator, readers: list[_SourceReader], finished: bool) -> dict[str, Any]:
        return {"rng": exact.rng_state(rng), "finished": finished,
                "sources": [r.exact() for r in readers]}


# --------------------------------------------------------------------------------- main process


class _RankProgress:
    """The main process's view of what its workers delivered to the training loop."""

    def __init__(self, nsources: int):
        self.done: list[set[tuple[int, int]]] = [set() for _ in range(nsources)]
        self.active: list[dict[int, dict]] = [dict() for _ in range(nsources)]
        self.samples = 0
        self.defects = DefectLog()
        self.exact: dict[int, dict[str, Any]] = {}   # role -> its slot record, less its plan
        self.last_role: int | None = None

    def update(self, snap: dict[str, Any]) -> None:
        role = snap["worker"]
        for i, src in enumerate(snap["sources"]):
            self.done[i].update(src["done"])
            self.active[i][role] = src["active"]
        self.samples += snap["samples"]
        self.defects.add_state(snap["defects"])
        self.exact[role] = snap["exact"]
        self.last_role = role

    def delta(self) -> dict[str, Any]:
        sources = []
        for i in range(len(self.done)):
            epochs: dict[str, dict[str, Any]] = {}
            for e, s in self.done[i]:
                epochs.setdefault(str(e), {"done": [], "partial": {}})["done"].append(s)
            # Workers own disjoint shards, so their active records never collide.
            for active in self.active[i].values():
                for (e, s), (c, p) in active.items():
                    epochs.setdefault(str(e), {"done": [], "partial": {}})["partial"][str(s)] = [c, sorted(p)]
            sources.append({"epochs": epochs})
        return {"sources": sources, "samples": self.samples, "defects": self.defects.to_state()}


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StreamingLoader:
    """A rank's loader: wraps a ``DataLoader`` over :class:`ShardStream` and tracks exactly what
    it delivered, so that :meth:`state_dict` can be saved in a checkpoint and restored on any
    number of ranks and workers with :meth:`load_state_dict`.

    ``postprocess`` runs in the main process on each batch (e.g. uint8 → float on the GPU).
    """

    def __init__(self, spec: StreamSpec, rank: int | None = None, world_size: int | None = None,
                 num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 2,
                 postprocess: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
        r, w = _dist_info()
        self.spec = spec
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.postprocess = postprocess
        nslots = self.world_size * max(1, num_workers)
        for src in spec.sources:
            if len(src.shards) < nslots:
                raise DataError(
                    f"{src.url} has {len(src.shards)} shards but {self.world_size} ranks x "
                    f"{max(1, num_workers)} workers = {nslots} readers each need at least one: "
                    f"reshard it smaller (vqscale data shard --shard-size) or use fewer workers")
        self._base = initial_state(spec.sources)
        self._progress = _RankProgress(len(spec.sources))
        self._starts: tuple[list[dict[str, Any]], int] | None = None

    # -- state
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        if len(state["sources"]) != len(self.spec.sources):
            raise DataError(f"loader state has {len(state['sources'])} datasets, config has "
                            f"{len(self.spec.sources)}")
        for saved, src in zip(state["sources"], self.spec.sources):
            if saved["fingerprint"] != src.fingerprint:
                raise DataError(f"loader state was saved for a different shard list of {src.url} "
                                f"({saved['fingerprint']} != {src.fingerprint})")
        self._base = state
        self._progress = _RankProgress(len(self.spec.sources))
        self._starts = None

    def _layout(self) -> dict[str, Any]:
        return exact.layout(self.spec.seed, self.world_size, max(1, self.num_workers),
                            self.spec.max_epochs)

    def _slot_starts(self) -> tuple[list[dict[str, Any]], int]:
        """The record each worker role of this rank starts from, and the role worker 0 plays:
        the saved ones if the state fits this layout exactly, else a fresh deal."""
        if self._starts is None:
            workers = max(1, self.num_workers)
            first = self.rank * workers
            saved = exact.saved_slots(self._base, self._layout(), len(self.spec.sources))
            if saved is not None:
                self._starts = ([saved["slots"][str(first + w)] for w in range(workers)],
                                int(saved["next"][str(self.rank)]))
            else:
                nslots = self.world_size * workers
                self._starts = ([start_record(self.spec, self._base, first + w, nslots)
                                 for w in range(workers)], 0)
        return self._starts

    def local_delta(self) -> dict[str, Any]:
        """This rank's progress since the state was loaded (merge with :func:`merge_states`)."""
        delta = self._progress.delta()
        starts, offset = self._slot_starts()
        workers = len(starts)
        last = self._progress.last_role
        # Roles that delivered nothing since the load are still at their start record.
        slots = {str(self.rank * workers + w): exact.advance(starts[w], self._progress.exact.get(w))
                 for w in range(workers)}
        delta["exact"] = {"layout": self._layout(), "rank": self.rank, "slots": slots,
                          "next": offset if last is None else (last + 1) % workers}
        return delta

    def state_dict(self) -> dict[str, Any]:
        """The global state; under torch.distributed a collective that every rank must call."""
        delta = self.local_delta()
        r, w = _dist_info()
        if w > 1:
            deltas: list[Any] = [None] * w
            torch.distributed.all_gather_object(deltas, delta)
        else:
            deltas = [delta]
        return merge_states(self._base, deltas)

    @property
    def samples_seen(self) -> int:
        return int(self._base["samples"]) + self._progress.samples

    @property
    def defects(self) -> DefectLog:
        return DefectLog.merged([self._base["defects"], self._progress.defects.to_state()])

    @property
    def steps_per_epoch(self) -> int | None:
        """Nominal: samples of the first dataset per epoch // global batch (None if unknown)."""
        n = self.spec.sources[0].total_samples
        return None if n is None else max(1, n // (self.spec.batch_size * self.world_size))

    # -- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._progress.last_role is not None:
            # Iterating again continues where the last iteration stopped (a collective under
            # torch.distributed, like state_dict).
            self.load_state_dict(self.state_dict())
        starts, offset = self._slot_starts()
        ds = ShardStream(self.spec, starts, self.rank, self.world_size, offset)
        kwargs: dict[str, Any] = {}
        closing = None
        if self.num_workers > 0:
            closing = _closing_flag()
            kwargs = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False,
                      "worker_init_fn": functools.partial(_shield_worker_from_job_signals, closing)}
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory and torch.cuda.is_available(), **kwargs)
        it = iter(loader)
        try:
            for batch in it:
                self._progress.update(pickle.loads(batch.pop("__state__")))
                if not batch:
                    continue  # a worker's closing message: progress only
                batch = _unwrap(batch)
                yield self.postprocess(batch) if self.postprocess else batch
        finally:
            # Ended, closed or failed: the workers go now. A worker that does not leave through
            # its queue within the DataLoader's grace (busy retrying a read) is terminated, and
            # the flag makes that SIGTERM end it (see _shield_worker_from_job_signals).
            if closing is not None:
                _release_flag(closing)
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del it

    # -- what the data cost: defects and lost samples, for logs, status and the give-up policy
    def data_totals(self) -> dict[str, float]:
        """The run's data counts so far, over every rank (a collective under torch.distributed,
        like :meth:`state_dict`): the count of each defect reason (:data:`data_pipeline.defects.
        REASONS`), ``defects`` (their sum), ``filtered``, ``lost_samples``, ``samples`` (delivered
        to training) and ``lost_fraction`` (:func:`lost_fraction`). They include what the loaded
        state (a checkpoint) counted before, and what the workers counted up to the batches
        delivered so far."""
        mine = self._progress.defects
        local = [float(mine.by_reason.get(r, 0)) for r in REASONS]
        local += [float(sum(mine.filtered.values())), float(mine.lost_samples), float(self._progress.samples)]
        r, w = _dist_info()
        if w > 1:
            backend = torch.distributed.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            t = torch.tensor(local, dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t)
            local = t.cpu().tolist()
        base = self._base.get("defects", {})
        by_reason = base.get("by_reason", {})
        out = {reason: by_reason.get(reason, 0) + v for reason, v in zip(REASONS, local)}
        out["defects"] = sum(out.values()) + sum(v for k, v in by_reason.items() if k not in REASONS)
        out["filtered"] = sum(base.get("filtered", {}).values()) + local[len(REASONS)]
        out["lost_samples"] = int(base.get("lost_samples", 0)) + local[len(REASONS) + 1]
        out["samples"] = int(self._base["samples"]) + local[len(REASONS) + 2]
        out = {k: float(v) for k, v in out.items()}
        out["lost_fraction"] = lost_fraction(out["lost_samples"], out["samples"], self.epoch_samples)
        return out

    @property
    def epoch_samples(self) -> int | None:
        """Samples in one epoch of every dataset (None if a manifest does not say)."""
        counts = [src.total_samples for src in self.spec.sources]
        return None if any(c is None for c in counts) else int(sum(counts))


def lost_fraction(lost: float, delivered: float, epoch_samples: int | None = None) -> float:
    """Lost samples over the samples the run has asked for so far (delivered + lost), but over
    no fewer than one epoch of the data: a shard lost in the first minutes of a run is judged
    against the dataset, not against the few batches read before it."""
    total = max(lost + delivered, float(epoch_samples or 0))
    return lost / total if total > 0 else 0.0


class DataLossError(DataError):
    """The run lost more of its data than ``data.max_lost_fraction`` allows."""


def check_lost_fraction(totals: dict[str, float], max_fraction: float, retry_for_s: float | None = None) -> None:
    """Raise :class:`DataLossError` (one line) when ``totals`` (:meth:`StreamingLoader.data_totals`)
    lost more than ``max_fraction`` of the samples; ``max_fraction >= 1`` never stops."""
    frac = totals.get("lost_fraction", 0.0)
    if max_fraction >= 1 or frac <= max_fraction:
        return
    reasons = ", ".join(f"{k} {int(totals[k])}" for k in REASONS if totals.get(k))
    hint = (f" (a read is retried for data.retry_for_s={retry_for_s:g}s before its shard counts as lost)"
            if retry_for_s is not None else "")
    raise DataLossError(
        f"{int(totals['lost_samples'])} samples lost, {frac:.1%} of the data read so far, more than "
        f"data.max_lost_fraction={max_fraction:g}: {reasons or 'no defect counted'}{hint}; fix or restore "
        f"the data (vqscale data inspect) and resume from the last checkpoint, which reads again what "
        f"was lost after it, or raise data.max_lost_fraction")
