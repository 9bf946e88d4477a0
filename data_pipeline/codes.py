"""Code shards: the stage-2 input that the tokenize job writes and prior training reads.

This module owns DESIGN.md's code shard contract ("Contracts: Code shards"): one code shard per
image shard, with the same shard name, under the output root. A sample is ``KEY.codes.npy``
(int32 ``[N]``, flat raster order), ``KEY.pos.npy`` (int32 ``[N]``, masked tokenizers only: the
sorted flat raster indices of the kept positions), ``KEY.cls``, ``KEY.txt`` and optionally
``KEY.txtemb.npy`` (float16 cached text embedding). The root's ``manifest.json`` is the normal
shard manifest plus ``tokenizer`` (``{name, sha256}``), ``grid_size`` (``[h, w]``) and
``codebook_size``, and, when the samples have class labels, ``labels`` (``[lowest, highest]``; each
shard entry has its own), which a class-conditional prior's run checks its class count against
before it starts (:func:`manifest_labels`).

Writing goes through :class:`~data_pipeline.shards.ShardWriter` (one named shard, atomic), so a
code shard that exists under its final name is complete: :func:`finished_code_shards` and
:func:`code_shard_entry` let a crashed, multi-rank tokenize job resume and finish the manifest.
Reading is the ordinary resumable stream (:mod:`data_pipeline.stream`) with
:class:`CodeDecoder` and :func:`collate_codes`; bad samples are counted as ``missing_codes`` /
``corrupt_codes`` defects.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import storage
from .defects import CORRUPT_CODES, MISSING_CODES, SampleDefect
from .images import read_caption, read_label
from .shards import DEFAULT_RETRY_FOR_S, MANIFEST, ShardWriter, WriterContext, iter_shard, make_manifest
from .sources import DataError, open_sources, parse_mixture
from .stream import StreamingLoader, StreamSpec

CODES, POSITIONS, TEXT_EMB = "codes.npy", "pos.npy", "txtemb.npy"
CODE_FIELDS = ("tokenizer", "grid_size", "codebook_size")
_INT32_MAX = np.iinfo(np.int32).max


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _int_vector(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a 1-D integer array, got dtype {arr.dtype} shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > _INT32_MAX):
        raise ValueError(f"{name} must lie in [0, 2**31): got [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int32)


# --------------------------------------------------------------------------------------- writing


class CodeShardWriter(WriterContext):
    """Writes ONE code shard ``ROOT/NAME`` atomically; :meth:`close` returns its manifest entry
    ``{name, samples, bytes, sha256}``, plus ``labels`` (``[lowest, highest]``) when a sample had
    a label (also kept as :attr:`entry`).

    ``codebook_size`` and ``grid_size``, when given, bound the codes and positions. Every sample
    of a shard must have the same token count and either all or none have positions, because a
    batch stacks them; breaking that is caught here, in the tokenize job, not in training.
    """

    def __init__(self, root: str, name: str, codebook_size: int | None = None,
                 grid_size: tuple[int, int] | None = None):
        if "/" in name or not name.endswith(".tar"):
            raise ValueError(f"code shard name {name!r} must be a plain NAME.tar (its image shard's name)")
        self.root, self.name = root, name
        self.codebook_size = codebook_size
        self.num_positions = None if grid_size is None else int(grid_size[0]) * int(grid_size[1])
        self.entry: dict[str, Any] | None = None
        self._layout: tuple[int, bool] | None = None  # (N, has positions) of the first sample
        self._labels: list[int] | None = None         # [lowest, highest] label written
        self._w = ShardWriter(root, name=name, write_manifest=False)

    def write(self, key: str, codes: Any, positions: Any = None, label: int | None = None,
              caption: str = "", text_embedding: Any = None) -> None:
        """Add one sample (numpy arrays or CPU tensors; a label of None writes no ``KEY.cls``)."""
        c = _int_vector("codes", codes)
        if self.codebook_size is not None and c.size and c.max() >= self.codebook_size:
            raise ValueError(f"code {c.max()} of {key!r} is outside the codebook [0, {self.codebook_size})")
        files = {CODES: _npy(c)}
        if positions is not None:
            p = _int_vector("positions", positions)
            if p.shape != c.shape:
                raise ValueError(f"positions {p.shape} and codes {c.shape} of {key!r} differ in length")
            if p.size > 1 and not (np.diff(p) > 0).all():
                raise ValueError(f"positions of {key!r} must be sorted and unique (flat raster indices)")
            if self.num_positions is not None and p.size and p[-1] >= self.num_positions:
                raise ValueError(f"position {p[-1]} of {key!r} is outside the grid of {self.num_positions}")
            files[POSITIONS] = _npy(p)
        elif self.num_positions is not None and c.size != self.num_positions:
            raise ValueError(f"{key!r} has {c.size} codes and no positions, but the grid has "
                             f"{self.num_positions} (a masked tokenizer must give positions)")
        layout = (c.size, positions is not None)
        if self._layout is not None and layout != self._layout:
            raise ValueError(f"{key!r} has {layout[0]} tokens (positions: {layout[1]}), but this "
                             f"shard's samples have {self._layout[0]} (positions: {self._layout[1]})")
        if label is not None:
            files["cls"] = str(int(label)).encode()
        if not isinstance(caption, str):
            raise ValueError(f"caption of {key!r} must be a str, got {type(caption).__name__}")
        if caption:
            files["txt"] = caption.encode("utf-8")
        if text_embedding is not None:
            e = np.asarray(text_embedding)
            if e.ndim not in (1, 2) or e.dtype.kind != "f":
                raise ValueError(f"text_embedding of {key!r} must be a float array [C] (pooled) or "
                                 f"[L, C] (per token, padding trimmed), got dtype {e.dtype} shape {e.shape}")
            with np.errstate(over="ignore"):
                e16 = e.astype(np.float16)
            if not np.isfinite(e16).all():  # float16 overflows at 65504: store only what it holds
                raise ValueError(f"text_embedding of {key!r} is not finite in float16")
            files[TEXT_EMB] = _npy(e16)
        self._w.write(key, files)  # checks the key (no dot, no duplicate)
        self._layout = layout
        if label is not None:
            lo, hi = self._labels or (int(label), int(label))
            self._labels = [min(lo, int(label)), max(hi, int(label))]

    def close(self) -> dict[str, Any]:
        if self.entry is None:
            self.entry = dict(self._w.close()["shards"][0])
            if self._labels is not None:
                self.entry["labels"] = list(self._labels)
        return self.entry

    def abort(self, exc: BaseException) -> None:
        self._w.abort(exc)  # the half-written shard never appears under its name



def write_code_manifest(root: str, entries: list[dict[str, Any]], tokenizer_name: str,
                        tokenizer_sha256: str, grid_size: tuple[int, int], codebook_size: int,
                        num_tokens: int | None = None) -> dict[str, Any]:
    """Write ``ROOT/manifest.json`` atomically (entries ordered by shard name); returns it.

    ``num_tokens`` (N per sample; the kept count k for masked tokenizers) is optional and, when
    present, lets readers check every sample's length.
    """
    shards = sorted((dict(e) for e in entries), key=lambda e: e["name"])
    names = [e["name"] for e in shards]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate code shard names in the manifest: "
                         f"{sorted({n for n in names if names.count(n) > 1})}")
    h, w = (int(x) for x in grid_size)
    extra: dict[str, Any] = {"tokenizer": {"name": str(tokenizer_name), "sha256": str(tokenizer_sha256)},
                             "grid_size": [h, w], "codebook_size": int(codebook_size)}
    if num_tokens is not None:
        extra["num_tokens"] = int(num_tokens)
    ranges = [e["labels"] for e in shards if e.get("labels")]
    if ranges:
        extra["labels"] = [min(r[0] for r in ranges), max(r[1] for r in ranges)]
    manifest = make_manifest(shards, **extra)
    storage.write_json(storage.join(root, MANIFEST), manifest)
    return manifest


def check_code_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """Raise :class:`DataError` unless ``manifest`` is a code manifest; returns it."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise DataError(f"{where} is not a shard manifest (no 'shards' list)")
    missing = [f for f in CODE_FIELDS if f not in manifest]
    if missing:
        raise DataError(f"{where} is not a code-shard manifest: missing {missing} (is this an image "
                        f"dataset? code shards are written by `vqscale tokenize`)")
    tok, grid = manifest["tokenizer"], manifest["grid_size"]
    if not (isinstance(tok, dict) and "name" in tok and "sha256" in tok):
        raise DataError(f"{where}: 'tokenizer' must be {{name, sha256}}, got {tok!r}")
    if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(x, int) and x > 0 for x in grid)):
        raise DataError(f"{where}: 'grid_size' must be [h, w] of positive ints, got {grid!r}")
    if not (isinstance(manifest["codebook_size"], int) and manifest["codebook_size"] > 0):
        raise DataError(f"{where}: 'codebook_size' must be a positive int, got {manifest['codebook_size']!r}")
    return manifest


def read_code_manifest(root: str) -> dict[str, Any]:
    url = storage.join(root, MANIFEST)
    try:
        manifest = storage.read_json(url)
    except FileNotFoundError:
        raise DataError(f"no code manifest at {url}") from None
    except ValueError as e:
        raise DataError(f"{url} is not valid JSON: {e}") from None
    return check_code_manifest(manifest, url)


def finished_code_shards(root: str) -> set[str]:
    """Names of the code shards that exist under ``root``; each is complete, since a shard only
    appears under its final name once fully written (local temporaries are hidden ``.*.tmp``)."""
    return {n for n in storage.listdir(root) if n.endswith(".tar") and not n.startswith(".")}


def code_shard_entry(root: str, name: str) -> dict[str, Any]:
    """Rebuild the manifest entry ``{name, samples, bytes, sha256}`` of an existing code shard
    (after a resume, for shards an earlier run wrote). A broken shard raises ShardError."""
    url = storage.join(root, name)
    sha, nbytes = hashlib.sha256(), 0
    with storage.open(url, "rb") as f:
        while chunk := f.read(8 << 20):
            sha.update(chunk)
            nbytes += len(chunk)
    samples, labels = 0, []
    for _i, _key, files in iter_shard(url, retries=2):
        samples += 1
        if "cls" in files:
            try:
                labels.append(int(files["cls"].decode().strip()))
            except ValueError:
                pass
    entry = {"name": name, "samples": samples, "bytes": nbytes, "sha256": sha.hexdigest()}
    if labels:
        entry["labels"] = [min(labels), max(labels)]
    return entry


def manifest_labels(url: str) -> dict[str, list[int]]:
    """``{root: [lowest, highest]}``: the class labels the code manifests of ``url`` (a code-shard
    root or a mixture of them) record; roots whose manifest is missing, unreadable or records no
    labels (written before labels were recorded, or unlabelled data) are left out. One small read
    per root, for checks before a run starts."""
    out = {}
    for root, _weight in parse_mixture(url):
        root = root.rstrip("/")
        if root.endswith(".tar") or "{" in root or any(c in root for c in "*?["):
            continue
        try:
            labels = storage.read_json(storage.join(root, MANIFEST)).get("labels")
        except (OSError, ValueError, AttributeError):
            continue
        if (isinstance(labels, list) and len(labels) == 2 and all(isinstance(x, int) for x in labels)
                and 0 <= labels[0] <= labels[1]):
            out[root] = labels
    return out


# --------------------------------------------------------------------------------------- reading


def _load_npy(files: dict[str, bytes], ext: str, kinds: str, ndims: tuple[int, ...] = (1,)) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(files[ext]), allow_pickle=False)
    except (ValueError, EOFError, OSError, TypeError) as e:
        raise SampleDefect(CORRUPT_CODES, f"{ext}: {e!r}"[:200]) from None
    if not isinstance(arr, np.ndarray) or arr.ndim not in ndims or arr.dtype.kind not in kinds:
        raise SampleDefect(CORRUPT_CODES, f"{ext}: expected a {'/'.join(map(str, ndims))}-D array of kind {kinds!r}, got "
                                          f"{getattr(arr, 'dtype', type(arr))} {getattr(arr, 'shape', '')}")
    return arr


@dataclass(frozen=True)
class CodeDecoder:
    """raw sample files -> ``{codes, positions, label, caption, key[, text_embedding]}`` or a
    defect. Each bound that is given is checked: ``codebook_size`` (codes), ``num_tokens`` (N),
    ``grid_size`` (positions inside it; without positions, N must fill it)."""

    codebook_size: int | None = None
    num_tokens: int | None = None
    grid_size: tuple[int, int] | None = None

    def __call__(self, files: dict[str, bytes], key: str,
                 rng: np.random.Generator | None = None) -> dict[str, Any]:
        if CODES not in files:
            raise SampleDefect(MISSING_CODES, f"files: {sorted(files)}")
        codes = _load_npy(files, CODES, "iu").astype(np.int64)
        n = codes.size
        if self.num_tokens is not None and n != self.num_tokens:
            raise SampleDefect(CORRUPT_CODES, f"{n} codes, expected {self.num_tokens}")
        if n and (codes.min() < 0 or (self.codebook_size is not None and codes.max() >= self.codebook_size)):
            raise SampleDefect(CORRUPT_CODES, f"codes in [{codes.min()}, {codes.max()}], "
                                              f"codebook size {self.codebook_size}")
        grid = None if self.grid_size is None else int(self.grid_size[0]) * int(self.grid_size[1])
        positions = None
        if POSITIONS in files:
            pos = _load_npy(files, POSITIONS, "iu").astype(np.int64)
            if pos.size != n:
                raise SampleDefect(CORRUPT_CODES, f"{pos.size} positions for {n} codes")
            if n and (pos[0] < 0 or (n > 1 and not (np.diff(pos) > 0).all())
                      or (grid is not None and pos[-1] >= grid)):
                raise SampleDefect(CORRUPT_CODES, "positions not sorted, unique and inside the grid")
            positions = torch.from_numpy(pos)
        elif grid is not None and n != grid:
            raise SampleDefect(CORRUPT_CODES, f"{n} codes without positions for a grid of {grid}")
        out = {"codes": torch.from_numpy(codes), "positions": positions,
               "label": read_label(files, {}), "caption": read_caption(files), "key": key}
        if TEXT_EMB in files:
            out["text_embedding"] = torch.from_numpy(_load_npy(files, TEXT_EMB, "f", (1, 2)).astype(np.float32))
        return out


def collate_codes(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples: codes/positions ``[B, N]`` long, label ``[B]``, caption/key lists, and when
    every sample has one, ``text_embedding``: ``[B, C]`` for pooled embeddings, or ``[B, L, C]``
    zero-padded to the longest caption with ``text_mask`` ``[B, L]`` (True = a real token) for
    per-token embeddings."""
    lengths = sorted({s["codes"].numel() for s in samples})
    if len(lengths) > 1:
        raise ValueError(f"code samples of different lengths {lengths} in one batch: a dataset must "
                         f"come from one tokenizer with a fixed token count (keys "
                         f"{[s['key'] for s in samples[:4]]}...)")
    with_pos = [s["positions"] is not None for s in samples]
    if any(with_pos) and not all(with_pos):
        raise ValueError("a batch mixes samples with and without positions (masked and unmasked tokenizers)")
    batch: dict[str, Any] = {
        "codes": torch.stack([s["codes"] for s in samples]),
        "positions": torch.stack([s["positions"] for s in samples]) if all(with_pos) else None,
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
    }
    if all("text_embedding" in s for s in samples):
        embs = [s["text_embedding"] for s in samples]
        ndims = {e.ndim for e in embs}
        if ndims == {1}:
            batch["text_embedding"] = torch.stack(embs)
        elif ndims == {2}:
            length = max(e.shape[0] for e in embs)
            out = embs[0].new_zeros(len(embs), length, embs[0].shape[1])
            mask = torch.zeros(len(embs), length, dtype=torch.bool)
            for i, e in enumerate(embs):
                out[i, : e.shape[0]] = e
                mask[i, : e.shape[0]] = True
            batch["text_embedding"], batch["text_mask"] = out, mask
        else:
            raise ValueError("a batch mixes pooled [C] and per-token [L, C] text embeddings")
    return batch


def _manifest_value(sources, field: str, given: Any) -> Any:
    """The value all sources' manifests agree on (None if none has it); ``given`` must match it,
    since a model configured for other codes than the data's would train on garbage."""
    found = {src.url: src.manifest[field] for src in sources
             if src.manifest and src.manifest.get(field) is not None}
    values = {tuple(v) if isinstance(v, list) else v for v in found.values()}
    if len(values) > 1:
        raise DataError(f"the datasets disagree on {field}: {found} (a prior trains on one "
                        f"tokenizer's codes)")
    value = values.pop() if values else None
    if given is not None and value is not None and given != value:
        raise DataError(f"{field}={given!r} was asked for, but the code shards have {value!r}")
    return given if given is not None else value


def code_loader(url: str, batch_size: int, seed: int = 0, rank: int | None = None,
                world_size: int | None = None, num_workers: int = 0, shuffle_buffer: int = 1000,
                interleave: int = 4, max_epochs: int | None = None, drop_last: bool = False,
                codebook_size: int | None = None, num_tokens: int | None = None,
                pin_memory: bool = False, retries: int = 4, retry_backoff: float = 0.5,
                retry_for_s: float = DEFAULT_RETRY_FOR_S, verify_checksums: bool = True):
    """The streaming code loader for ``url`` (a code-shard root or a mixture of them), a
    :class:`~data_pipeline.stream.StreamingLoader` with exact resume. ``codebook_size``,
    ``grid_size`` and ``num_tokens`` from the manifests validate samples unless given; the retry
    and checksum settings are :class:`~data_pipeline.config.DataConfig`'s."""
    sources = open_sources(url)
    for src in sources:  # a manifest must be a code manifest: an image dataset fails here, clearly
        if src.manifest is not None:
            check_code_manifest(src.manifest, storage.join(src.url, MANIFEST))
    # Codes from different tokenizers share no vocabulary, so mixing them is refused.
    shas = {src.url: src.manifest["tokenizer"]["sha256"] for src in sources
            if src.manifest and "tokenizer" in src.manifest}
    if len(set(shas.values())) > 1:
        raise DataError(f"the datasets were tokenized by different tokenizers: {shas}")
    grid = _manifest_value(sources, "grid_size", None)
    spec = StreamSpec(
        sources=sources,
        decode=CodeDecoder(codebook_size=_manifest_value(sources, "codebook_size", codebook_size),
                           num_tokens=_manifest_value(sources, "num_tokens", num_tokens),
                           grid_size=None if grid is None else tuple(grid)),
        collate=collate_codes,
        batch_size=batch_size,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        interleave=interleave,
        retries=retries,
        retry_backoff=retry_backoff,
        retry_for_s=retry_for_s,
        verify_checksums=verify_checksums,
        max_epochs=max_epochs,
        drop_last=drop_last,
    )
    return StreamingLoader(spec, rank=rank, world_size=world_size, num_workers=num_workers,
                           pin_memory=pin_memory)
