"""Webdataset shards: writing them (streaming, with a manifest) and reading them robustly.

Layout (img2dataset's, see DESIGN.md): a tar of sample groups ``KEY.jpg|png|webp``, ``KEY.txt``,
``KEY.json``, ``KEY.cls``; a dataset root holds ``NAME-000000.tar ...`` and ``manifest.json``
(``shards``: ``[{name, samples, bytes, sha256}]``, plus ``samples`` and ``created``).

Writing streams: each shard goes straight to its URL through the storage seam (a multipart upload
on S3) while its sha256 is computed on the fly, so no dataset or shard is held in memory. Tars are
written with fixed metadata (mtime 0, no owner) so the same samples give byte-identical shards.

Reading streams the tar with :mod:`tarfile` over an fsspec file object (webdataset 1.0.2 has no
s3 opener; its own reader reads these shards too, which the tests check). It yields
``(index, key, files)`` where ``index`` counts sample groups in tar order: that
order is the deterministic in-shard order the resumable stream's cursors refer to. Transient
read errors are retried with backoff by reopening the object and seeking back to the byte
offset, at least ``retries`` times and for at least ``retry_for_s`` seconds (a store that is
restarting comes back within minutes); a shard that stays broken ends with a :class:`ShardError`
naming why, after every sample before the damage has been yielded. Given the manifest's sha256,
a shard read to its end is checked against it (``checksum_mismatch``: its bytes changed after the
manifest was written).
"""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
import time
from datetime import datetime, timezone
from typing import Any, Iterator

from . import storage
from .defects import CHECKSUM_MISMATCH, IO_ERROR, TRUNCATED_SHARD, UNREADABLE_SHARD

log = logging.getLogger("vqscale.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MANIFEST = "manifest.json"
DEFAULT_SHARD_BYTES = 256 * 1024 * 1024
# Read size for remote shards: large sequential ranges keep the number of GETs per shard small.
REMOTE_BLOCK = 16 * 1024 * 1024
# How long the training stream keeps retrying a read that fails (``data.retry_for_s``): long enough
# to ride out a restart of the object store. The longest wait between two tries is MAX_RETRY_DELAY_S.
DEFAULT_RETRY_FOR_S = 600.0
MAX_RETRY_DELAY_S = 10.0


class ShardError(Exception):
    """A shard that could not be read to its end; ``reason`` is a defects reason. ``gave_up``:
    its reads kept failing through the whole retry budget (the source may be down), as opposed
    to bytes that are broken or a shard that is not there."""

    def __init__(self, reason: str, url: str, read: int, detail: str = "", gave_up: bool = False):
        super().__init__(f"{reason} in {url} after {read} samples: {detail}")
        self.reason = reason
        self.url = url
        self.read = read
        self.detail = detail
        self.gave_up = gave_up


def _gave_up(e: BaseException) -> bool:
    return isinstance(e, OSError) and not isinstance(e, _NOT_TRANSIENT)


# --------------------------------------------------------------------------------------- writing


class _HashingWriter(io.RawIOBase):
    """Forwards writes and keeps sha256 and byte count of everything written."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.f.write(b)
        self.sha.update(b)
        self.nbytes += len(b)
        return len(b)


def split_key(fname: str) -> tuple[str, str]:
    """``dir/KEY.codes.npy`` -> (``dir/KEY``, ``codes.npy``): the extension starts at the first
    dot of the base name, as webdataset groups them."""
    head, _, base = fname.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower() if dot else ""


class WriterContext:
    """``with writer:`` closes (commits) on success and aborts on an exception, so a shard that
    was not finished never appears under its name."""

    def close(self):
        raise NotImplementedError

    def abort(self, exc: BaseException) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.abort(exc)
        else:
            self.close()


class ShardWriter(WriterContext):
    """Writes samples into ``ROOT/PREFIX-000000.tar, ...`` and a manifest on :meth:`close`.

    A new shard starts when the current one reaches ``max_bytes`` or ``max_samples``.
    ``extra`` is merged into the manifest (code shards add tokenizer, grid and codebook size).
    With ``name``, exactly one shard of that name is written (a code shard takes its image
    shard's name): it never rolls over, and it is written even when empty, so that its
    existence records that its source was processed.
    """

    def __init__(self, root: str, prefix: str = "data", max_bytes: int = DEFAULT_SHARD_BYTES,
                 max_samples: int | None = None, extra: dict[str, Any] | None = None,
                 write_manifest: bool = True, name: str | None = None):
        self.root = root
        self.name = name
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.max_samples = max_samples
        self.extra = dict(extra or {})
        self.write_manifest = write_manifest
        self.shards: list[dict[str, Any]] = []
        self._ctx = None
        self._hash: _HashingWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._keys: set[str] = set()
        storage.makedirs(root)

    # A shard is a context (atomic_open) held open across write() calls.
    def _open_next(self) -> None:
        name = self.name if self.name is not None else f"{self.prefix}-{len(self.shards):06d}.tar"
        self._name = name
        self._ctx = storage.atomic_open(storage.join(self.root, name), "wb")
        f = self._ctx.__enter__()
        self._hash = _HashingWriter(f)
        self._tar = tarfile.open(fileobj=self._hash, mode="w|", format=tarfile.USTAR_FORMAT)
        self._count = 0
        self._keys = set()

    def _finish(self, exc: BaseException | None = None) -> None:
        if self._tar is None:
            return
        tar, ctx, h = self._tar, self._ctx, self._hash
        self._tar = self._ctx = self._hash = None
        if exc is not None:
            tar.fileobj.closed = True  # aborted: the tar stream must not flush into the dead file later
            ctx.__exit__(type(exc), exc, exc.__traceback__)
            return
        tar.close()
        ctx.__exit__(None, None, None)
        self.shards.append({"name": self._name, "samples": self._count, "bytes": h.nbytes,
                            "sha256": h.sha.hexdigest()})

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Add one sample: ``files`` maps extensions (``jpg``, ``txt``, ``codes.npy``) to bytes."""
        if "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"sample key {key!r} must not contain a dot (it separates extensions)")
        if self._tar is None:
            self._open_next()
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in shard {self._name}")
        self._keys.add(key)
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self.name is None and (self._hash.nbytes >= self.max_bytes
                                  or (self.max_samples and self._count >= self.max_samples)):
            self._finish()

    def close(self) -> dict[str, Any]:
        """Finish the last shard and write the manifest; returns the manifest."""
        if self.name is not None and self._tar is None and not self.shards:
            self._open_next()
        self._finish()
        manifest = make_manifest(self.shards, **self.extra)
        if self.write_manifest:
            storage.write_json(storage.join(self.root, MANIFEST), manifest)
        return manifest

    def abort(self, exc: BaseException) -> None:
        self._finish(exc)


def make_manifest(shards: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "shards": list(shards),
        "samples": int(sum(s.get("samples") or 0 for s in shards)),
        "bytes": int(sum(s.get("bytes") or 0 for s in shards)),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


# --------------------------------------------------------------------------------------- reading

_NOT_TRANSIENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class RetryingReader(io.RawIOBase):
    """A read-only file over a URL that survives transient errors.

    On a failed open or read it waits (exponential backoff), reopens the object and seeks to the
    byte offset reached so far, so a dropped connection in the middle of a 256 MB shard costs one
    range request, not the shard. Gives up once a failure in a row has been retried ``retries``
    times and ``retry_for_s`` seconds have passed since its first try (the waits double from
    ``backoff`` up to :data:`MAX_RETRY_DELAY_S`). ``hash=True`` keeps the sha256 of the bytes read
    (:meth:`hexdigest`).
    """

    def __init__(self, url: str, retries: int = 4, backoff: float = 0.5, retry_for_s: float = 0.0,
                 hash: bool = False):
        self.url = url
        self.name = url
        self.retries = retries
        self.backoff = backoff
        self.retry_for_s = retry_for_s
        self.pos = 0
        self.retried = 0
        self._sha = hashlib.sha256() if hash else None
        self._f = None
        self._call(lambda: None)  # open now, so a missing shard fails here

    def _open(self):
        kwargs = {"block_size": REMOTE_BLOCK, "cache_type": "readahead"} if storage.is_remote(self.url) else {}
        f = storage.open(self.url, "rb", **kwargs)
        if self.pos:
            f.seek(self.pos)
        return f

    def _call(self, fn):
        attempt, first = 0, time.monotonic()
        while True:
            try:
                if self._f is None:
                    self._f = self._open()
                return fn()
            except _NOT_TRANSIENT:
                raise
            except Exception as e:  # noqa: BLE001 - any I/O-layer failure is retried, then reported
                self._close_quietly()
                waited = time.monotonic() - first
                if attempt >= self.retries and waited >= self.retry_for_s:
                    raise OSError(f"reading {self.url} at byte {self.pos} failed after {attempt} retries "
                                  f"over {waited:.0f}s: {e!r}") from e
                self.retried += 1
                delay = min(self.backoff * (2 ** min(attempt, 30)), MAX_RETRY_DELAY_S)
                if attempt >= self.retries:       # only the time budget is left: never sleep past it
                    delay = min(delay, self.retry_for_s - waited)
                attempt += 1
                log.warning("read error on %s at byte %d (%r); retry %d in %.1fs (%.0fs of at least %.0fs spent)",
                            self.url, self.pos, e, attempt, delay, waited, self.retry_for_s)
                time.sleep(max(0.0, delay))

    def hexdigest(self) -> str | None:
        """The sha256 of the bytes read so far (None unless made with ``hash=True``)."""
        return self._sha.hexdigest() if self._sha is not None else None

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._call(lambda: self._f.read(n))
        self.pos += len(data)
        if self._sha is not None:
            self._sha.update(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def _close_quietly(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - the connection is already broken; we reopen anyway
                log.debug("closing a broken handle of %s failed", self.url, exc_info=True)

    def close(self) -> None:
        self._close_quietly()
        super().close()

    def __enter__(self) -> "RetryingReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_BLOCK = 512


class TruncatedMember(tarfile.ReadError):
    """The stream ended inside the data of ``member`` (its header was complete)."""

    def __init__(self, member: str):
        super().__init__(f"unexpected end of data in {member}")
        self.member = member


def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for sizes of 8 GiB and more
        n = int.from_bytes(field[1:], "big")
        return -n if field[:1] == b"\xff" else n
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        key, _, value = data[sp + 1: pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def tar_members(f) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular files of a tar stream, read sequentially.

    A lean reader of the ustar/GNU/pax formats that tar writers (ours, webdataset's, img2dataset's,
    GNU tar) produce: one read per header and one per member, which makes it several times cheaper
    per sample than :mod:`tarfile`'s stream mode, a cost the loader pays for every image. Header
    checksums are verified; a stream that ends inside a header or a member raises
    ``tarfile.ReadError``. Gzip-compressed shards are detected by their magic bytes.
    """
    head = f.read(_BLOCK)
    if head[:2] == b"\x1f\x8b":
        import gzip

        class _Prefixed(io.RawIOBase):  # put the sniffed block back in front of the stream
            def __init__(self, first, rest):
                self.first, self.rest = first, rest

            def readable(self):
                return True

            def readinto(self, b):
                if self.first:
                    n = min(len(b), len(self.first))
                    b[:n], self.first = self.first[:n], self.first[n:]
                    return n
                data = self.rest.read(len(b))
                b[: len(data)] = data
                return len(data)

        f = gzip.GzipFile(fileobj=io.BufferedReader(_Prefixed(head, f), 1 << 20))
        head = f.read(_BLOCK)
    long_name: str | None = None
    pax: dict[str, str] = {}
    first = True
    while True:
        if len(head) < _BLOCK:
            if not head and not first:
                return  # end of stream without the optional zero blocks
            raise tarfile.ReadError("unexpected end of data" if head or not first else "empty file")
        if head == b"\0" * _BLOCK:
            return
        try:
            stored = _octal(head[148:156])
            size = int(pax["size"]) if "size" in pax else _octal(head[124:136])
        except ValueError:
            raise tarfile.ReadError("invalid header") from None
        if stored != sum(head[:148]) + 8 * 32 + sum(head[156:]) or size < 0:
            raise tarfile.ReadError("invalid header (bad checksum)")
        first = False
        kind = head[156:157]
        name = pax.get("path") or long_name
        if name is None:
            name = head[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if head[257:262] == b"ustar" and head[345:346] != b"\0":
                prefix = head[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
                name = f"{prefix}/{name}"
        padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        data = f.read(padded) if padded else b""
        if len(data) < padded:
            raise TruncatedMember(name)
        data = data[:size]
        if kind == b"L":                      # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
        elif kind == b"x":                    # pax header for the next member
            try:
                pax = _pax_records(data)
            except ValueError:
                raise tarfile.ReadError("invalid pax header") from None
        elif kind == b"g":                    # pax global header: nothing we use
            pass
        else:
            if kind in (b"0", b"\0", b"7"):
                yield name, data
            long_name, pax = None, {}
        head = f.read(_BLOCK)


def iter_shard(url: str, retries: int = 4, backoff: float = 0.5,
               want=None, retry_for_s: float = 0.0,
               sha256: str | None = None) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Yield ``(index, key, files)`` for each sample group of a tar shard, in tar order.

    ``want(index) -> bool`` lets a resuming reader skip samples it has already consumed (their
    bytes are read past but not returned). Ends with :class:`ShardError` if the shard cannot be
    opened (``unreadable_shard``), ends inside a member (``truncated_shard``; the incomplete last
    group is dropped) or keeps failing mid-stream (``io_error``; see :class:`RetryingReader` for
    ``retries``, ``backoff`` and ``retry_for_s``). Given ``sha256`` (the manifest's), a shard read
    to its end whose bytes hash to something else ends with ``checksum_mismatch`` after its last
    sample. The generator's return value is the number of sample groups in the shard.
    """
    index = 0
    try:
        reader = RetryingReader(url, retries=retries, backoff=backoff, retry_for_s=retry_for_s,
                                hash=bool(sha256))
    except Exception as e:  # noqa: BLE001 - reported as a shard defect by the caller
        raise ShardError(UNREADABLE_SHARD, url, 0, repr(e), gave_up=_gave_up(e)) from e
    with reader:
        key = None
        files: dict[str, bytes] = {}
        stream = io.BufferedReader(reader, 1 << 20)
        try:
            for name, data in tar_members(stream):
                if name.rsplit("/", 1)[-1].startswith("__"):
                    continue
                k, ext = split_key(name)
                if k != key:
                    # A new key closes the previous group; a member is returned only once its
                    # data is complete, so a shard cut inside a member still delivers every
                    # complete sample before it.
                    if key is not None:
                        if want is None or want(index):
                            yield index, key, files
                        index += 1
                    key, files = k, {}
                files[ext] = data
        except (tarfile.ReadError, EOFError) as e:
            # Not a tar at all, or a tar cut short: everything complete before it was yielded.
            if isinstance(e, TruncatedMember) and key is not None and split_key(e.member)[0] != key:
                # The cut member starts a new sample, so the group before it is complete.
                if want is None or want(index):
                    yield index, key, files
                index += 1
                key = None
            reason = TRUNCATED_SHARD if (index > 0 or key is not None) else UNREADABLE_SHARD
            raise ShardError(reason, url, index, str(e)) from e
        except OSError as e:
            raise ShardError(IO_ERROR if index else UNREADABLE_SHARD, url, index, str(e), gave_up=_gave_up(e)) from e
        if key is not None:
            if want is None or want(index):
                yield index, key, files
            index += 1
        if sha256:
            try:
                while stream.read(1 << 20):     # the tar's end padding: the manifest hashed every byte
                    pass
            except OSError as e:
                raise ShardError(IO_ERROR, url, index, str(e), gave_up=_gave_up(e)) from e
            digest = reader.hexdigest()
            if digest != sha256:
                raise ShardError(CHECKSUM_MISMATCH, url, index,
                                 f"sha256 {digest} of {reader.pos} bytes read, the manifest says {sha256}")
    return index
