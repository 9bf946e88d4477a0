"""The one storage seam of vqscale: every path is a URL.

A URL is a local path (``/data/x``, ``runs/a``, ``file:///data/x``) or any fsspec URL
(``s3://bucket/prefix``, ``memory://x``). Local paths take a fast path through ``os`` and the
builtin ``open``; only a path with ``://`` goes through fsspec (the split torchtitan's
``tools/filesystem.py`` makes). Project code opens, lists, writes and uploads through this module
and nowhere else, so a new backend or an S3 setting is changed in one place.

S3 settings come from the standard AWS variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``) or from :func:`configure` (the run config's
``storage`` section calls it).

Writes are atomic: a local file is written beside its target and renamed over it; an object on
S3 becomes visible only when its (multipart) upload completes, and an upload interrupted by an
exception is aborted, never committed half-written.

Libraries that only write local folders (DeepSpeed checkpoints, TensorBoard, submitit) write into
:func:`staged_dir`, which is the folder itself for a local URL and a local mirror that is uploaded
on :meth:`StagedDir.sync` and on exit for a remote one.

Settings that cannot work (no credentials, an endpoint nothing answers on, a bucket that does not
exist) are found up front by :func:`check_access`, which commands call before they start: one
short probe per bucket that ends in a :class:`StorageError` naming the URL, the endpoint and what to
do. Once a command runs, storage errors are the ordinary, retried ones (a transient outage in the
middle of a run is ridden out by the readers' retries, not turned into a configuration error).

This module may import fsspec and s3fs only (see DESIGN.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from typing import Any, Iterator

import fsspec

__all__ = [
    "is_remote", "local_path", "join", "basename", "dirname", "filesystem", "configure",
    "open", "exists", "isdir", "listdir", "glob", "size", "makedirs", "remove", "rmtree",
    "read_bytes", "read_text", "read_json", "atomic_open", "write_bytes", "write_text",
    "write_json", "upload_dir", "download_dir", "staged_dir", "StagedDir", "invalidate",
    "StorageError", "check_access",
]

log = logging.getLogger("vqscale.storage")

_builtin_open = open
_lock = threading.Lock()
_fs_cache: dict[tuple, Any] = {}
_options: dict[str, dict[str, Any]] = {}
# Object stores whose fsspec files upload on close and abort the upload on ``discard()``.
_COMMIT_ON_CLOSE = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def is_remote(url: str) -> bool:
    """True for URLs that need fsspec (anything with ``://`` except ``file://``)."""
    url = os.fspath(url)
    return "://" in url and not url.startswith("file://")


def local_path(url: str) -> str:
    """The filesystem path of a local URL (strips ``file://``)."""
    url = os.fspath(url)
    if is_remote(url):
        raise ValueError(f"not a local path: {url}")
    return url[len("file://"):] if url.startswith("file://") else url


def join(base: str, *parts: str) -> str:
    base = os.fspath(base)
    if not is_remote(base):
        return os.path.join(base, *parts)
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def basename(url: str) -> str:
    return os.fspath(url).rstrip("/").rsplit("/", 1)[-1]


def dirname(url: str) -> str:
    url = os.fspath(url)
    if not is_remote(url):
        return os.path.dirname(url)
    head = url.rstrip("/").rsplit("/", 1)[0]
    return head if "://" in head and not head.endswith(":/") else url


def configure(protocol: str = "s3", **options: Any) -> None:
    """Set default storage options for a protocol (e.g. ``configure("s3", endpoint_url=...)``).

    ``endpoint_url`` for S3 is moved into ``client_kwargs`` as s3fs expects. Options given here
    override the environment. Cached filesystems are dropped so the next call sees them.
    """
    opts = {k: v for k, v in options.items() if v is not None}
    with _lock:
        _options[protocol] = opts
        _fs_cache.clear()
        _checked.clear()


def _s3_options() -> dict[str, Any]:
    opts: dict[str, Any] = {
        # Listings are cached by s3fs for the life of the instance; a long job that lists a prefix
        # written by another job must see new objects, so the cache is off.
        "use_listings_cache": False,
        "config_kwargs": {"retries": {"max_attempts": 5, "mode": "adaptive"}},
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        opts.setdefault("client_kwargs", {})["region_name"] = region
    user = dict(_options.get("s3", {}))
    if "endpoint_url" in user:
        opts.setdefault("client_kwargs", {})["endpoint_url"] = user.pop("endpoint_url")
    if "region" in user:
        opts.setdefault("client_kwargs", {})["region_name"] = user.pop("region")
    opts.update(user)
    return opts


def filesystem(url: str) -> tuple[Any, str]:
    """``(fs, path)`` for a URL; filesystems are cached per process and protocol."""
    url = os.fspath(url)
    if not is_remote(url):
        return fsspec.filesystem("file"), os.path.abspath(local_path(url))
    protocol = url.split("://", 1)[0]
    key = (os.getpid(), protocol)
    with _lock:
        fs = _fs_cache.get(key)
        if fs is None:
            opts = _s3_options() if protocol in ("s3", "s3a") else dict(_options.get(protocol, {}))
            fs = fsspec.filesystem(protocol, **opts)
            _fs_cache[key] = fs
    return fs, fs._strip_protocol(url)


def invalidate(url: str | None = None) -> None:
    """Forget cached listings (after another process wrote under ``url``)."""
    if url is not None and not is_remote(url):
        return
    for fs in list(_fs_cache.values()):
        fs.invalidate_cache()


class StorageError(ValueError):
    """A storage setting that cannot work, found up front by :func:`check_access` (no credentials,
    nothing answering at the endpoint, no such bucket); the message names the URL, the endpoint and
    what to do. The command line turns it into one line and exit code 2."""


# The up-front check's budget: botocore "standard" retries (attempts up to 1 s, then 2 s apart)
# with short timeouts, so an endpoint nothing answers on is reported within seconds (a refused
# connection) or about half a minute (one that never answers), not after the minutes the data readers'
# retries would spend. VQSCALE_S3_CHECK_ATTEMPTS overrides the attempts.
CHECK_ATTEMPTS = 3
CHECK_CONNECT_TIMEOUT_S = 5
CHECK_READ_TIMEOUT_S = 10
_checked: set[tuple] = set()
_S3_URL = re.compile(r"\b(s3a?)://([A-Za-z0-9._-]+)[^\s,]*")
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_CONNECTION_ERRORS = {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError",
                      "ProxyConnectionError", "ConnectionError", "TimeoutError"}


def _endpoint() -> str | None:
    return (_s3_options().get("client_kwargs") or {}).get("endpoint_url")


def _error_names(e: BaseException) -> set[str]:
    names: set[str] = set()
    seen = 0
    while e is not None and seen < 5:           # s3fs wraps botocore's errors (``raise ... from``)
        names |= {c.__name__ for c in type(e).__mro__}
        e, seen = e.__cause__ or e.__context__, seen + 1
    return names


def _check_bucket(bucket: str, url: str) -> None:
    import s3fs

    endpoint = _endpoint()
    where = f"the S3 endpoint {endpoint}" if endpoint else "the default AWS S3 endpoint (AWS_ENDPOINT_URL is not set)"
    attempts = max(1, int(os.environ.get("VQSCALE_S3_CHECK_ATTEMPTS") or CHECK_ATTEMPTS))
    opts = _s3_options()
    opts["config_kwargs"] = {**(opts.get("config_kwargs") or {}),
                             "retries": {"max_attempts": attempts, "mode": "standard"},
                             "connect_timeout": CHECK_CONNECT_TIMEOUT_S, "read_timeout": CHECK_READ_TIMEOUT_S}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    fs.retries = 1                      # s3fs's own retry loop; botocore's attempts above are the budget
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except Exception as e:  # noqa: BLE001 - classified below; anything else is left to the command
        names = _error_names(e)
        if names & _CREDENTIAL_ERRORS:
            raise StorageError(f"{url}: no S3 credentials found for {where}: set AWS_ACCESS_KEY_ID and "
                               f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with a credentials file)") from None
        if names & _CONNECTION_ERRORS:
            raise StorageError(f"{url}: cannot reach {where} ({type(e).__name__} after {attempts} attempt"
                               f"{'s' if attempts > 1 else ''}): check AWS_ENDPOINT_URL (or the run's "
                               f"data.s3_endpoint_url) and that the S3 server is up") from None
        if isinstance(e, FileNotFoundError):
            mb = f"aws s3 mb s3://{bucket}" + (f" --endpoint-url {endpoint}" if endpoint else "")
            raise StorageError(f"{url}: the bucket {bucket!r} does not exist at {where}: create it first "
                               f"(e.g. `{mb}`) or fix the bucket name") from None
        # 403 (HEAD has no error code: a policy that allows objects but not the bucket looks the
        # same as bad keys), a wrong region, a server error: the command's own calls say more.
        log.debug("up-front check of s3://%s at %s: %r (left to the command)", bucket, where, e)
        return
    finally:
        with contextlib.suppress(Exception):
            fs.close_session(fs.loop, fs.s3)       # no "unclosed client session" warning at exit
    with _lock:
        _checked.add((os.getpid(), endpoint, bucket))


def check_access(*urls: str | None) -> None:
    """Check up front that the S3 buckets named in ``urls`` can be used: credentials found, the
    endpoint answers, the bucket exists. Raises :class:`StorageError` (one line: the URL, the
    endpoint, what to do). Local paths and other protocols pass; each bucket is checked once per
    process (and again after :func:`configure`). ``urls`` may be mixtures or ``KEY=URL`` overrides:
    every ``s3://BUCKET`` in them is checked. Commands call this when they start, so a long run is
    never stopped by it: errors in the middle of a run stay the readers' retried ones."""
    buckets: dict[str, str] = {}
    for text in urls:
        for m in _S3_URL.finditer(os.fspath(text) if text else ""):
            buckets.setdefault(m.group(2), m.group(0).split("::", 1)[0])
    if not buckets:
        return
    endpoint = _endpoint()
    for bucket, url in buckets.items():
        if (os.getpid(), endpoint, bucket) not in _checked:
            _check_bucket(bucket, url)


def open(url: str, mode: str = "rb", **kwargs: Any):  # noqa: A001 - mirrors builtins.open
    """Open a URL. Local files use the builtin ``open``; remote ones fsspec (``kwargs`` such as
    ``block_size`` or ``cache_type`` pass through)."""
    if not is_remote(url):
        path = local_path(url)
        if any(c in mode for c in "wax"):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return _builtin_open(path, mode)
    fs, path = filesystem(url)
    return fs.open(path, mode, **kwargs)


def exists(url: str) -> bool:
    if not is_remote(url):
        return os.path.exists(local_path(url))
    fs, path = filesystem(url)
    return fs.exists(path)


def isdir(url: str) -> bool:
    if not is_remote(url):
        return os.path.isdir(local_path(url))
    fs, path = filesystem(url)
    return fs.isdir(path)


def _to_url(url: str, fs_path: str) -> str:
    protocol = url.split("://", 1)[0]
    return f"{protocol}://{fs_path}"


def listdir(url: str) -> list[str]:
    """Sorted names (not URLs) of the entries directly under ``url``; [] if it does not exist."""
    if not is_remote(url):
        path = local_path(url)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, path = filesystem(url)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path.rstrip("/"))


def glob(pattern: str) -> list[str]:
    """Sorted URLs matching a glob pattern (one listing call)."""
    if not is_remote(pattern):
        import glob as _glob

        return sorted(_glob.glob(local_path(pattern)))
    fs, path = filesystem(pattern)
    return sorted(_to_url(pattern, p) for p in fs.glob(path))


def size(url: str) -> int:
    if not is_remote(url):
        return os.path.getsize(local_path(url))
    fs, path = filesystem(url)
    return int(fs.size(path))


def makedirs(url: str) -> None:
    """Create a folder; a no-op on object stores, where prefixes need no creation."""
    if not is_remote(url):
        os.makedirs(local_path(url), exist_ok=True)
        return
    fs, path = filesystem(url)
    if url.startswith(("s3://", "s3a://", "gs://", "az://")):
        return
    fs.makedirs(path, exist_ok=True)


def remove(url: str, missing_ok: bool = True) -> None:
    try:
        if not is_remote(url):
            os.remove(local_path(url))
        else:
            fs, path = filesystem(url)
            # S3's DeleteObject succeeds on a missing key, so missing_ok=False must look first.
            if not missing_ok and not fs.exists(path):
                raise FileNotFoundError(url)
            fs.rm_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def rmtree(url: str) -> None:
    if not is_remote(url):
        shutil.rmtree(local_path(url), ignore_errors=True)
        return
    fs, path = filesystem(url)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def read_bytes(url: str) -> bytes:
    with open(url, "rb") as f:
        return f.read()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


@contextlib.contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[io.IOBase]:
    """Open for writing so that readers see the old content or the whole new one, never a part.

    Local: a temporary file in the same folder, fsynced and renamed over the target.
    Remote: the object store commits on close; an exception aborts the upload (``discard``).
    """
    if mode not in ("wb", "w"):
        raise ValueError("atomic_open writes whole files: mode must be 'wb' or 'w'")
    if not is_remote(url):
        path = os.path.abspath(local_path(url))
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        return
    fs, path = filesystem(url)
    if url.split("://", 1)[0] not in _COMMIT_ON_CLOSE:
        # Other fsspec backends may publish the file on open (memory:// replaces the old content
        # with an empty file at once, and its discard() does nothing): stage the bytes in a local
        # temporary file and write the target only once the block has succeeded.
        with tempfile.TemporaryFile() as tmp:
            f = io.TextIOWrapper(tmp, encoding="utf-8") if mode == "w" else tmp
            yield f
            if mode == "w":
                f.flush()
                f.detach()
            tmp.seek(0)
            with fs.open(path, "wb") as out:
                shutil.copyfileobj(tmp, out, 8 << 20)
        return
    f = fs.open(path, "wb")
    raw = f
    if mode == "w":
        f = io.TextIOWrapper(raw, encoding="utf-8")
    try:
        yield f
        if mode == "w":
            f.flush()
            f.detach()
    except BaseException:
        # Abort: a half-written object must never appear under the final name. discard() drops
        # the buffer and aborts the multipart upload; marking the file closed keeps close() and
        # __del__ from committing what was written.
        raw.discard()
        raw.closed = True
        raise
    raw.close()


def write_bytes(url: str, data: bytes) -> None:
    with atomic_open(url, "wb") as f:
        f.write(data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def write_json(url: str, obj: Any, indent: int | None = 2) -> None:
    write_bytes(url, (json.dumps(obj, indent=indent, sort_keys=False) + "\n").encode("utf-8"))


def upload_dir(local_dir: str, url: str, only_changed: dict[str, tuple[int, float]] | None = None) -> int:
    """Copy a local folder tree to ``url``; returns the number of files sent.

    With ``only_changed`` (a dict the caller keeps between calls), files whose size and mtime
    are unchanged since the last upload are skipped.
    """
    sent = 0
    for root, _dirs, files in os.walk(local_dir):
        for name in sorted(files):
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            try:
                st = os.stat(src)
            except FileNotFoundError:
                continue  # a library removed it while we walked (e.g. rotating logs)
            sig = (st.st_size, st.st_mtime)
            if only_changed is not None and only_changed.get(rel) == sig:
                continue
            with _builtin_open(src, "rb") as fin, atomic_open(join(url, rel), "wb") as fout:
                shutil.copyfileobj(fin, fout, 8 << 20)
            if only_changed is not None:
                only_changed[rel] = sig
            sent += 1
    return sent


def download_dir(url: str, local_dir: str) -> int:
    """Copy every object under ``url`` into ``local_dir``; returns the number of files."""
    if not is_remote(url):
        shutil.copytree(local_path(url), local_dir, dirs_exist_ok=True)
        return sum(len(f) for _, _, f in os.walk(local_dir))
    fs, path = filesystem(url)
    count = 0
    for obj in fs.find(path):
        rel = obj[len(path.rstrip("/")) + 1:]
        dst = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        fs.get_file(obj, dst)
        count += 1
    return count


class StagedDir:
    """A local folder standing for ``url``: the folder itself when local, else a mirror that
    :meth:`sync` uploads (changed files only). Use as a context manager; it syncs on exit."""

    def __init__(self, url: str, local_root: str | None = None):
        self.url = os.fspath(url)
        self.remote = is_remote(self.url)
        self._sent: dict[str, tuple[int, float]] = {}
        self._tmp = None
        if not self.remote:
            self.path = os.path.abspath(local_path(self.url))
        else:
            base = local_root or os.environ.get("VQSCALE_STAGE") or None
            if base:
                os.makedirs(base, exist_ok=True)
            self._tmp = tempfile.mkdtemp(prefix="vqscale-stage-", dir=base)
            self.path = self._tmp
        os.makedirs(self.path, exist_ok=True)

    def sync(self) -> int:
        """Upload what changed since the last sync; returns the number of files sent."""
        if not self.remote:
            return 0
        return upload_dir(self.path, self.url, only_changed=self._sent)

    def close(self, sync: bool = True) -> None:
        if sync:
            self.sync()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "StagedDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(sync=True)


def staged_dir(url: str, local_root: str | None = None) -> StagedDir:
    return StagedDir(url, local_root)
