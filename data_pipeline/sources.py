"""From a dataset URL to its list of shards, without listing a bucket more than once.

A source is one dataset: a folder or prefix with ``manifest.json`` (one GET, however many
shards), a brace pattern (``s3://b/laion-{000000..099999}.tar``, expanded locally, no request at
all), a glob, a single ``.tar``, or a folder without a manifest (listed once). Each rank opens
its sources once in the main process; dataloader workers receive the shard list by pickling,
so a dataset of 100,000 shards costs each rank one request, never one per worker.

Several sources mix by weight: ``"s3://a/::0.7,s3://b/::0.3"``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from braceexpand import braceexpand

from . import storage
from .shards import MANIFEST


class DataError(ValueError):
    """A dataset that cannot be used as configured (no shards, too few shards, bad spec)."""


@dataclass(frozen=True)
class Shard:
    name: str
    url: str
    samples: int | None = None
    bytes: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Source:
    url: str
    shards: tuple[Shard, ...]
    weight: float = 1.0
    manifest: dict[str, Any] | None = None

    @property
    def total_samples(self) -> int | None:
        counts = [s.samples for s in self.shards]
        return None if any(c is None for c in counts) else int(sum(counts))

    @property
    def fingerprint(self) -> str:
        """Identifies the shard list; a loader state saved for another list is refused."""
        h = hashlib.sha1()
        for s in self.shards:
            # Names and sample counts, not URLs: the same dataset copied from a local folder to
            # s3:// keeps its fingerprint, so a run can resume after moving its data.
            h.update(f"{s.name}\0{s.samples}\0".encode())
        return f"{len(self.shards)}:{h.hexdigest()[:16]}"


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """``"URL::0.7,URL::0.3"`` -> [(URL, 0.7), (URL, 0.3)]; a plain URL has weight 1.

    Commas inside brace patterns (``{a,b}``) are not separators.
    """
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out = []
    for p in (p.strip() for p in parts):
        if not p:
            continue
        url, sep, w = p.rpartition("::")
        if not sep:
            url, w = p, "1"
        try:
            weight = float(w)
        except ValueError:
            raise DataError(f"bad mixture weight {w!r} in {p!r}: expected URL::WEIGHT") from None
        if not weight > 0:
            raise DataError(f"mixture weight must be positive in {p!r}")
        out.append((url, weight))
    if not out:
        raise DataError("no dataset URL given (--data is empty)")
    return out


def _shards_from_manifest(root: str, manifest: dict[str, Any]) -> tuple[Shard, ...]:
    try:
        entries = manifest["shards"]
        return tuple(Shard(name=e["name"], url=storage.join(root, e["name"]), samples=e.get("samples"),
                           bytes=e.get("bytes"), sha256=e.get("sha256")) for e in entries)
    except (KeyError, TypeError) as e:
        raise DataError(f"{storage.join(root, MANIFEST)} is not a shard manifest: {e!r}") from None


def open_source(url: str, weight: float = 1.0) -> Source:
    """Resolve one dataset URL to its shards (see the module docstring for the forms)."""
    url = url.rstrip("/") if not url.endswith("://") else url
    if "{" in url:
        names = list(braceexpand(url))
        shards = tuple(Shard(name=storage.basename(u), url=u) for u in names)
        return _checked(url, Source(url, shards, weight))
    if url.endswith(".tar"):
        if any(c in url for c in "*?["):
            urls = storage.glob(url)
        else:
            urls = [url]
        return _checked(url, Source(url, tuple(Shard(storage.basename(u), u) for u in urls), weight))
    manifest_url = storage.join(url, MANIFEST)
    try:
        manifest = storage.read_json(manifest_url)
    except FileNotFoundError:
        manifest = None
    except ValueError as e:
        raise DataError(f"{manifest_url} is not valid JSON: {e}") from None
    if manifest is not None:
        return _checked(url, Source(url, _shards_from_manifest(url, manifest), weight, manifest))
    names = [n for n in storage.listdir(url) if n.endswith(".tar")]
    return _checked(url, Source(url, tuple(Shard(n, storage.join(url, n)) for n in names), weight))


def _checked(url: str, source: Source) -> Source:
    if not source.shards:
        raise DataError(f"no shards found at {url!r}: expected a folder or prefix with manifest.json "
                        f"or *.tar files, a brace pattern like data-{{000000..000099}}.tar, or a .tar URL")
    return source


def open_sources(spec: str) -> list[Source]:
    """Resolve a (possibly mixed) ``--data`` spec."""
    return [open_source(url, weight) for url, weight in parse_mixture(spec)]
