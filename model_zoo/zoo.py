"""The model zoo: published packages in a folder or bucket, the local cache, and ``from_pretrained``.

A zoo root (DESIGN.md, "Model-zoo package"), local or at any storage URL::

    packages/NAME/        the package as published (config.json, model.safetensors, README.md,
                          checksums.sha256; a prior's tokenizer/ inside)
    entries/NAME.json     one entry per package, written only by its publisher
    zoo.json              the index, regenerated from entries/ (for people and static hosting)

Concurrent publishers never lose an entry, even on object storage without compare-and-swap:
each writes only its own entry file, then rewrites ``zoo.json`` from a fresh listing of
``entries/`` and lists again after writing, repeating while the listing shows entries the index
it wrote lacks. The last index written is then from a listing taken after every earlier entry was
written (a publisher whose entry lands later also writes later, and re-lists). ``zoo list``
reads ``entries/`` itself, so it is exact even while an index rewrite is in flight.

``pull`` copies a package into ``$VQSCALE_CACHE/zoo/NAME/SHA12/`` (SHA12: the first 12 hex
digits of the sha256 of its checksums file, so a re-published package is a new folder) under a
file lock, verifies every checksum, and renames it into place; a second pull of the same version
reads the verified copy. ``from_pretrained`` takes a zoo name (``VQSCALE_ZOO`` or ``zoo=``), or
a package folder or URL.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import getpass
import hashlib
import os
import re
import shutil
import socket
import tempfile
from typing import Any, Iterator

import torch
from torch import nn

from data_pipeline import storage

from .package import (CHECKSUMS, CONFIG, PackageError, _fetch_verified, _publish, is_package, load_package,
                      load_prior_with_tokenizer, read_config, verify_folder)
from .text_encoders import cache_dir

__all__ = ["ZooError", "zoo_url", "publish", "list_entries", "read_entry", "regenerate_index", "pull",
           "from_pretrained", "ENTRY_SCHEMA"]

ENTRY_SCHEMA = 1
INDEX, ENTRIES, PACKAGES = "zoo.json", "entries", "packages"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ZooError(PackageError):
    """A zoo operation that cannot be done as asked (the message says why)."""


def zoo_url(zoo: str | None = None) -> str:
    url = zoo or os.environ.get("VQSCALE_ZOO")
    if not url:
        raise ZooError("no zoo given: pass --zoo URL (or zoo=) or set VQSCALE_ZOO")
    return os.fspath(url).rstrip("/") or "/"


def _check_name(name: str) -> str:
    if not _NAME.match(name or "") or name.endswith(".json"):
        raise ZooError(f"{name!r} is not a zoo name: letters, digits, '.', '_' and '-', starting with a letter or "
                       f"digit, at most 128 characters")
    return name


def _checksums_sha(url: str) -> str:
    return hashlib.sha256(storage.read_bytes(storage.join(url, CHECKSUMS))).hexdigest()


# ---------------------------------------------------------------------------------- publishing

def publish(package: str, zoo: str | None = None, name: str | None = None) -> dict[str, Any]:
    """Verify ``package`` (folder or URL), copy it to ``ZOO/packages/NAME``, write its entry and
    regenerate the index; returns the entry. ``name`` defaults to the package's registry name; an
    existing entry of that name is replaced (a new version)."""
    root = zoo_url(zoo)
    package = os.fspath(package)
    if not is_package(package):
        raise ZooError(f"{package} is not a model-zoo package (no readable {CONFIG})")
    meta = read_config(package)
    name = _check_name(name or meta["name"])
    target = storage.join(root, PACKAGES, name)
    if storage.is_remote(target):
        stage_parent = None
    else:
        stage_parent = os.path.dirname(os.path.abspath(storage.local_path(target)))
        os.makedirs(stage_parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=stage_parent)
    try:
        folder = os.path.join(tmp, "pkg")
        meta = _fetch_verified(package, folder)       # a tampered package is refused here, before any copy
        _publish(folder, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tok = None
    if meta.get("tokenizer"):
        tmeta = read_config(storage.join(target, meta["tokenizer"]))
        tok = {"name": tmeta["name"], "parameters": tmeta.get("parameters")}
    entry = {
        "entry_schema": ENTRY_SCHEMA, "name": name, "model": meta["name"], "kind": meta["kind"],
        "schema_version": meta["schema_version"], "parameters": meta.get("parameters"), "dtype": meta.get("dtype"),
        "path": f"{PACKAGES}/{name}", "checksums_sha256": _checksums_sha(target), "tokenizer": tok,
        "text_encoder": meta.get("text_encoder"), "card": meta.get("card") or {},
        "published": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "publisher": f"{getpass.getuser()}@{socket.gethostname()}", "source": package,
    }
    storage.write_json(storage.join(root, ENTRIES, f"{name}.json"), entry)
    regenerate_index(root)
    return entry


def _entry_names(root: str) -> set[str]:
    return {n[:-5] for n in storage.listdir(storage.join(root, ENTRIES)) if n.endswith(".json")}


def read_entry(name: str, zoo: str | None = None) -> dict[str, Any]:
    root = zoo_url(zoo)
    url = storage.join(root, ENTRIES, f"{_check_name(name)}.json")
    if not storage.exists(url):
        known = sorted(_entry_names(root))
        import difflib

        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else (f"; it holds {', '.join(known)}" if known else
                                                                    "; it is empty")
        raise ZooError(f"no package {name!r} in the zoo {root}{hint}")
    return storage.read_json(url)


def list_entries(zoo: str | None = None) -> list[dict[str, Any]]:
    """Every entry of the zoo, by name (read from ``entries/``, not from the index)."""
    root = zoo_url(zoo)
    out = []
    for n in sorted(_entry_names(root)):
        try:
            out.append(storage.read_json(storage.join(root, ENTRIES, f"{n}.json")))
        except FileNotFoundError:      # removed between the listing and the read
            continue
    return out


def regenerate_index(zoo: str | None = None, max_rounds: int = 20) -> dict[str, Any]:
    """Rewrite ``zoo.json`` from ``entries/`` until a listing taken after the write shows nothing new."""
    root = zoo_url(zoo)
    for _ in range(max_rounds):
        entries = list_entries(root)
        index = {"zoo_schema": ENTRY_SCHEMA, "entries": entries,
                 "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        storage.write_json(storage.join(root, INDEX), index)
        if _entry_names(root) <= {e["name"] for e in entries}:
            return index
    raise ZooError(f"{root}: entries kept changing while the index was rewritten ({max_rounds} rounds); run "
                   f"`vqscale zoo list` (exact) or publish again to refresh {INDEX}")


# ------------------------------------------------------------------------------- pulling, loading

@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)      # released when the file closes, also if we die
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def pull(name: str, zoo: str | None = None, cache: str | None = None) -> str:
    """The local folder of zoo package ``name``, downloaded into the cache and verified on first use."""
    root = zoo_url(zoo)
    entry = read_entry(name, root)
    src = storage.join(root, entry["path"])
    sha = entry["checksums_sha256"]
    base = os.path.join(cache or cache_dir(), "zoo", _check_name(name))
    dest = os.path.join(base, sha[:12])
    with _file_lock(os.path.join(base, ".lock")):
        if os.path.isfile(os.path.join(dest, CHECKSUMS)):
            return dest                          # verified when it was put there; load_package checks again
        if not storage.exists(storage.join(src, CHECKSUMS)):
            raise ZooError(f"{src}: the package of entry {name!r} is missing or being replaced; try again")
        if _checksums_sha(src) != sha:
            raise ZooError(f"{src} no longer matches its entry {name!r} (re-published while you pulled?); try again")
        tmp = tempfile.mkdtemp(prefix=".pull-", dir=base)
        try:
            storage.download_dir(src, os.path.join(tmp, "pkg"))
            verify_folder(os.path.join(tmp, "pkg"), src)            # every file against its checksum
            with open(os.path.join(tmp, "pkg", CHECKSUMS), "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != sha:
                    raise ZooError(f"{src} changed during the download; try again")
            os.replace(os.path.join(tmp, "pkg"), dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def from_pretrained(name_or_url: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    zoo: str | None = None) -> nn.Module:
    """A ready model in eval mode from a zoo name (pulled into the cache), a package folder or a
    package URL. A prior comes with its tokenizer (from the package's ``tokenizer/``) as
    ``model.tokenizer``, on the same device (and dtype, when one is asked for); it is not a submodule, so the prior's
    ``state_dict`` holds only the prior. Every file is checked against ``checksums.sha256``
    before any weight is read; weights are safetensors only, nothing is unpickled."""
    src = os.fspath(name_or_url)
    if not is_package(src):
        if "://" in src or os.sep in src or src.startswith("."):
            raise ZooError(f"{src} is not a model-zoo package (no readable {CONFIG})")
        src = pull(src, zoo)
    meta = read_config(src)
    if meta["kind"] == "prior" and meta.get("tokenizer"):
        prior, tokenizer = load_prior_with_tokenizer(src, device=device, dtype=dtype)
        object.__setattr__(prior, "tokenizer", tokenizer)   # plain attribute: not in the prior's state_dict
        return prior
    return load_package(src, device=device, dtype=dtype)


def format_entries(entries: list[dict[str, Any]]) -> str:
    """A table of zoo entries for the console."""
    rows = [("name", "model", "kind", "parameters", "dtype", "published")]
    for e in entries:
        rows.append((e["name"], e["model"], e["kind"], f"{e.get('parameters') or 0:,}", str(e.get("dtype")),
                     e.get("published", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
