"""Exact-order resume of :mod:`data_pipeline.stream` on an unchanged layout: the slot record.

A *slot record* is the whole state of one reader slot (one rank's worker), JSON-shaped so that
it can sit in a checkpoint's ``loader_state.json``::

    {"rng": <numpy bit-generator state>,        # shuffles, interleave, mixture, random crops
     "finished": bool,                          # a finite stream's closing message was delivered
     "sources": [{                              # one per dataset of the mixture
         "plan": {"EPOCH": [[shard, cursor, [pending...]], ...]},  # explicit deals (see below)
         "dealt": [epoch, pos],                 # tasks of `epoch` before `pos` were opened;
                                                # pos None: `epoch` not entered yet
         "last": int | None,                    # first epoch not to read (max_epochs)
         "open": [[epoch, shard, cursor, [unread_pending...]], ...],  # in interleave order
         "retiring": [[epoch, shard, cursor], ...],  # read to the end, samples still buffered
         "buffer": "<packed (epoch, shard, index) triples, in buffer order>",
         "watch": {"EPOCH": {...}},             # the empty-source watch of the stream
         "exhausted": bool,
         "draining": bool}]}                    # reads were given up: the buffer drains first

The plan holds the deals of the epochs that had progress when the slot's shards were dealt
(a resume on another layout): those deals depend on the state they were dealt from, so they
travel explicitly. Every other epoch is dealt fresh from ``(seed, epoch)`` and needs nothing.

Workers attach a record without ``plan`` and ``last`` to every batch (they do not change while
a worker runs); the main process completes it from the record the slot started with
(:func:`advance`). A state is restored exactly only if it holds a record for every slot of the
same layout (:func:`saved_slots`); anything else is resumed set-exactly by a fresh deal.
"""

from __future__ import annotations

import base64
import zlib
from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np

from .defects import DefectLog, TRUNCATED_SHARD
from .shards import ShardError, iter_shard


def layout(seed: int, world_size: int, workers: int, max_epochs: int | None) -> dict[str, Any]:
    """What must be unchanged for the slot records to be valid and the batches the same."""
    return {"seed": int(seed), "world_size": int(world_size), "workers": int(workers),
            "max_epochs": max_epochs}


def pack_ids(triples: Sequence[tuple[int, int, int]]) -> str:
    # A shuffle buffer of 1000 in each of thousands of slots: names must stay a few bytes each.
    arr = np.asarray(triples, dtype="<i8").reshape(-1, 3)
    return base64.b64encode(zlib.compress(arr.tobytes(), 1)).decode()


def unpack_ids(text: str) -> list[tuple[int, int, int]]:
    arr = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<i8").reshape(-1, 3)
    return [tuple(int(x) for x in row) for row in arr]


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return rng.bit_generator.state  # plain ints and strs (PCG64's 128-bit ints are fine in JSON)


def rng_from_state(state: dict[str, Any]) -> np.random.Generator:
    bitgen = getattr(np.random, state["bit_generator"])()
    bitgen.state = state
    return np.random.Generator(bitgen)


def advance(start: dict[str, Any], snap: dict[str, Any] | None) -> dict[str, Any]:
    """The slot's record after the batch of ``snap``, for a slot that started from ``start``."""
    if snap is None:
        return start
    sources = []
    for first, now in zip(start["sources"], snap["sources"]):
        epoch, pos = now["dealt"]
        plan = {}
        for k, tasks in first["plan"].items():
            if int(k) > epoch:
                plan[k] = tasks
            elif int(k) == epoch:
                # Kept as the remaining tasks, so the restored slot starts that list at 0.
                plan[k] = tasks[pos or 0:]
        dealt = [epoch, 0 if str(epoch) in plan and pos is not None else pos]
        sources.append({**now, "plan": plan, "dealt": dealt, "last": first["last"]})
    return {"rng": snap["rng"], "finished": snap["finished"], "sources": sources}


def merge_exact(deltas: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Every rank's slot records, or None unless all ranks of one layout reported them all."""
    found = [d.get("exact") for d in deltas]
    if not found or any(x is None for x in found):
        return None
    lay = found[0]["layout"]
    if any(x["layout"] != lay for x in found):
        return None
    slots: dict[str, Any] = {}
    nexts: dict[str, int] = {}
    for x in found:
        slots.update(x["slots"])
        nexts[str(x["rank"])] = int(x["next"])
    if len(slots) != lay["world_size"] * lay["workers"] or len(nexts) != lay["world_size"]:
        return None  # a partial view (one simulated rank): restoring it would mix layouts
    return {"layout": lay, "next": nexts, "slots": slots}


def saved_slots(state: dict[str, Any], lay: dict[str, Any], nsources: int) -> dict[str, Any] | None:
    """The state's exact records if they fit this layout (all slots present), else None."""
    ex = state.get("exact")
    if not ex or ex.get("layout") != lay:
        return None
    slots = ex.get("slots", {})
    nslots = lay["world_size"] * lay["workers"]
    if sorted(slots) != sorted(str(s) for s in range(nslots)):
        return None
    if any(len(rec["sources"]) != nsources for rec in slots.values()):
        return None
    return ex


def reread_buffer(url_of: Callable[[int], str], triples: list[tuple[int, int, int]], retries: int,
                  backoff: float, defects: DefectLog,
                  retry_for_s: float = 0.0) -> list[tuple[int, int, int, str, dict[str, bytes]]]:
    """The buffered samples named by ``triples`` read again from their shards, in that order.

    A sample that can no longer be read (its shard broke since) is counted as lost, and the
    stream goes on without it: the order after it can then no longer be the uninterrupted one.
    """
    wanted: dict[tuple[int, int], set[int]] = defaultdict(set)
    for e, s, i in triples:
        wanted[(e, s)].add(i)
    got: dict[tuple[int, int, int], tuple[str, dict[str, bytes]]] = {}
    for (e, s), idx in wanted.items():
        reason = TRUNCATED_SHARD
        it = iter_shard(url_of(s), retries=retries, backoff=backoff, want=idx.__contains__, retry_for_s=retry_for_s)
        left = len(idx)
        try:
            for i, key, files in it:
                got[(e, s, i)] = (key, files)
                left -= 1
                if not left:
                    break
        except ShardError as err:
            reason = err.reason
        finally:
            it.close()
        if left:
            defects.defect(reason, url_of(s), detail=f"{left} buffered samples not re-read on resume")
            defects.lost_samples += left
    return [(e, s, i, *got[(e, s, i)]) for e, s, i in triples if (e, s, i) in got]
