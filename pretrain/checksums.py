"""The checksum manifest of a checkpoint step folder: written once every rank's files are complete,
checked before a resume or an export loads anything from the folder.

``STEP/checksums.sha256`` has the ``sha256sum`` format of a model-zoo package's manifest
(``sha256sum -c checksums.sha256`` checks a step folder by hand). It lists every file the save
wrote, ``meta.json`` included, and is written after them and before ``latest`` moves; files added
later (the universal-format cache, an exported package) are not listed and not checked.
``meta.json`` records ``"checksums": true``, so a folder whose manifest went missing is told apart
from one written before manifests existed (which loads unverified, with a warning).

Hashing is spread over the ranks: on a shared folder rank r hashes every world-th file; when each
rank staged its own files for upload it hashes those. Checking is spread the same way over the
processes that see one copy of the folder (all ranks on a shared folder, a node's local ranks for a
node-local download), and the problems found are gathered, so every rank takes the same decision.
"""

from __future__ import annotations

import os
from typing import Iterable

from data_pipeline import storage
from model_zoo.package import CHECKSUMS, PackageError, local_files, parse_checksums, sha256_file

__all__ = ["MANIFEST", "CheckpointDamaged", "hash_files", "manifest_text", "read_manifest", "check_files"]

MANIFEST = CHECKSUMS


class CheckpointDamaged(RuntimeError):
    """A step folder whose files do not match its manifest (or that cannot be read), and no older
    step that verifies to fall back to. The message is one line naming the file."""


def hash_files(folder: str, index: int = 0, count: int = 1, skip: Iterable[str] = ()) -> dict[str, str]:
    """sha256 of every ``count``-th file under ``folder`` (relative ``/`` paths), starting at ``index``."""
    skip = set(skip) | {MANIFEST}
    files = [f for f in local_files(folder) if f not in skip]
    return {rel: sha256_file(os.path.join(folder, *rel.split("/"))) for rel in files[index::count]}


def manifest_text(sums: dict[str, str]) -> str:
    return "".join(f"{digest}  {rel}\n" for rel, digest in sorted(sums.items()))


def read_manifest(folder: str, where: str) -> dict[str, str] | None | str:
    """The manifest of a local step folder: the sums, None when there is none (and ``meta.json`` does
    not promise one: a folder written before manifests), or a one-line problem."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        meta = os.path.join(folder, "meta.json")
        if not os.path.isfile(meta):
            return "meta.json: missing"
        try:
            promised = bool(storage.read_json(meta).get("checksums"))
        except (OSError, ValueError, AttributeError) as e:
            return f"meta.json: unreadable ({type(e).__name__})"
        return f"{MANIFEST}: missing" if promised else None
    try:
        with open(path, encoding="utf-8") as f:
            sums = parse_checksums(f.read(), storage.join(where, MANIFEST))
    except (OSError, UnicodeDecodeError, PackageError) as e:
        return f"{MANIFEST}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return sums if sums else f"{MANIFEST}: empty"


def check_files(folder: str, sums: dict[str, str], index: int = 0, count: int = 1) -> list[str]:
    """The problems of every ``count``-th listed file from ``index``: missing or changed."""
    problems = []
    for rel in sorted(sums)[index::count]:
        path = os.path.join(folder, *rel.split("/"))
        if not os.path.isfile(path):
            problems.append(f"{rel}: missing")
        elif sha256_file(path) != sums[rel]:
            problems.append(f"{rel}: checksum mismatch (corrupt or modified)")
    return problems
