"""A real single-machine Slurm cluster for tests (Debian's ``slurm-wlm`` 22.05 and ``munge``).

``SlurmCluster`` runs its own ``munged``, ``slurmctld`` and one ``slurmd`` per virtual node
(``n1``, ``n2``, ... all on 127.0.0.1, on free ports) from a scratch folder that holds the
config, munge key and socket, state, spool, pid and log files; nothing under /etc is used, so
it coexists with a distro Slurm. Every daemon runs in the foreground as our child, so stopping
is by pid. Slurm commands need ``SLURM_CONF``: pass ``env()`` to them, or use ``run()``.

Needs root (slurmd launches jobs as their user); missing packages are installed with apt-get.

    python tests/slurm_cluster.py up DIR   # start in DIR, print the env, wait for Ctrl-C
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

try:
    from tests.s3server import free_ports
except ImportError:          # run as a script: tests/ itself is on sys.path
    from s3server import free_ports

__all__ = ["SlurmCluster", "SlurmUnavailable", "ensure_slurm_installed", "PACKAGES"]

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "sinfo", "squeue", "scontrol", "sbatch", "srun", "scancel"]
MARKER = "VQS_SLURM_ROOT"  # in every daemon's environment (inherited by slurmstepd): finds leftovers
POLICY_RC = "/usr/sbin/policy-rc.d"


class SlurmUnavailable(RuntimeError):
    """This machine cannot run Slurm at all (not root, no apt-get, install failed): callers skip."""


def ensure_slurm_installed() -> None:
    """Install Debian's Slurm and munge packages if a binary is missing.

    A ``policy-rc.d`` that exits 101 keeps the postinst scripts from starting the distro's own
    munged/slurmd; an existing one is left as it is.
    """
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and we are not root to install it")
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get/dpkg to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    ours = not os.path.lexists(POLICY_RC)
    try:
        if ours:
            with open(POLICY_RC, "w") as f:
                f.write("#!/bin/sh\n# written by vqscale tests/slurm_cluster.py while installing\nexit 101\n")
            os.chmod(POLICY_RC, 0o755)
        r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0 and ("Unable to locate" in r.stderr or "no installation candidate" in r.stderr):
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
            r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as e:
        raise SlurmUnavailable(f"installing {' '.join(PACKAGES)} failed: {e}") from e
    finally:
        if ours and os.path.exists(POLICY_RC):
            os.remove(POLICY_RC)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-15:])
        raise SlurmUnavailable(f"`{' '.join(install)}` exited {r.returncode}:\n{tail}")
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        raise SlurmUnavailable(f"installed {' '.join(PACKAGES)} but still missing: {missing}")


def _tail(path: str, n: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 32_000))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class SlurmCluster:
    """munged + slurmctld + ``nodes`` slurmd's on this machine.

    >>> with SlurmCluster() as c:
    ...     jid = c.sbatch("--wrap", "srun hostname")
    ...     c.wait_state(jid, "COMPLETED")

    Node names do not resolve by DNS (Slurm reaches them through ``NodeAddr=127.0.0.1``); job
    code that resolves ``SLURMD_NODENAME`` must not rely on it. There is no accounting, so no
    ``sacct``.
    """

    def __init__(self, nodes: int = 2, cpus_per_node: int = 4, memory_mb: int = 4096,
                 root: str | None = None, keep: bool | None = None, startup_timeout: float = 60.0,
                 kill_wait: int = 10, extra_conf: str = "", install: bool = True):
        """``root``: the scratch folder (default: a new temp dir), kept after ``stop()`` when
        given unless ``keep=False``. ``extra_conf``: slurm.conf lines appended; a repeated
        key overrides ours (slurmctld logs "specified more than once, latest value used")."""
        self.node_names = [f"n{i + 1}" for i in range(nodes)]
        self.cpus_per_node, self.memory_mb, self.kill_wait = cpus_per_node, memory_mb, kill_wait
        self.startup_timeout, self.extra_conf, self.install = startup_timeout, extra_conf, install
        self._given_root = root
        self.keep = (root is not None) if keep is None else keep
        self.root: str | None = None
        self.conf_path: str | None = None
        self.munge_socket: str | None = None
        self.host = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}  # name -> daemon, in start order
        self.logs: dict[str, str] = {}  # name -> the daemon's own log file
        self._outs: list = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "SlurmCluster":
        if self.procs:
            return self
        if os.geteuid() != 0:
            raise SlurmUnavailable("a Slurm test cluster needs root (slurmd runs jobs as their user)")
        if self.install:
            ensure_slurm_installed()
        if self._given_root:
            self.root = os.path.abspath(self._given_root)
            os.makedirs(self.root, exist_ok=True)
        else:
            self.root = tempfile.mkdtemp(prefix="vqs-slurm-")
        os.chmod(self.root, 0o755)  # jobs of other users may write their output here
        atexit.register(self.stop)
        try:
            self._write_files()
            self._start_munged()
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", self.conf_path])
            for n in self.node_names:
                self._spawn(f"slurmd.{n}", ["slurmd", "-D", "-f", self.conf_path, "-N", n])
            self._wait_idle()
        except BaseException as e:
            logs = self.log_tails()
            self.stop(timeout=3)
            if isinstance(e, Exception) and not isinstance(e, SlurmUnavailable):
                raise RuntimeError(f"Slurm test cluster did not start: {e}\n{logs}") from e
            raise
        return self

    def _write_files(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "run", "munge"):
            os.makedirs(os.path.join(r, d), exist_ok=True)
        for n in self.node_names:
            os.makedirs(os.path.join(r, "spool", n), exist_ok=True)
        os.chmod(os.path.join(r, "munge"), 0o755)  # the socket must be reachable by every job user
        self.munge_socket = os.path.join(r, "munge", "munge.socket")
        ctld_port, *node_ports = free_ports(1 + len(self.node_names))
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={p} "
            f"CPUs={self.cpus_per_node} RealMemory={self.memory_mb} State=UNKNOWN"
            for n, p in zip(self.node_names, node_ports)
        )
        # config_overrides: virtual nodes claim more CPUs/memory than the machine has.
        # CR_CPU: several jobs and tasks share a node by CPU. ReturnToService=2: a node that
        # was down comes back by itself when its slurmd registers again. sched_interval=1: a
        # job starts ~1 s after submit or release(), not 2-3 s.
        conf = f"""\
ClusterName=vqstest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
ReturnToService=2
JobRequeue=1
KillWait={self.kill_wait}
MinJobAge=600
SlurmdParameters=config_overrides
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=120
MailProg=/bin/true
{nodes}
PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
{self.extra_conf}
"""
        self.conf_path = os.path.join(r, "slurm.conf")
        with open(self.conf_path, "w") as f:
            f.write(conf)
        os.chmod(self.conf_path, 0o644)
        self.logs["slurmctld"] = os.path.join(r, "log", "slurmctld.log")
        for n in self.node_names:
            self.logs[f"slurmd.{n}"] = os.path.join(r, "log", f"slurmd.{n}.log")

    def _start_munged(self) -> None:
        m = os.path.join(self.root, "munge")
        key = os.path.join(m, "munge.key")
        if not os.path.exists(key):
            with open(key, "wb") as f:
                f.write(os.urandom(1024))
        os.chown(key, 0, 0)
        os.chmod(key, 0o400)
        self.logs["munged"] = os.path.join(self.root, "log", "munged.out")  # -F logs to stderr
        # --force: munged refuses to run as root, or beside a world-writable /tmp, without it
        self._spawn("munged", [
            "munged", "--foreground", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
            f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
            f"--seed-file={m}/munged.seed",
        ])
        deadline = time.monotonic() + 15
        while not os.path.exists(self.munge_socket):
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError("munged did not create its socket")
            time.sleep(0.05)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(os.path.join(self.root, "log", f"{name}.out"), "wb")
        self._outs.append(out)
        env = dict(os.environ, SLURM_CONF=self.conf_path or "", **{MARKER: self.root})
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, cwd=self.root,
                                            start_new_session=True)

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with code {p.returncode}")

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last, resumed = "", 0.0
        while True:
            self._check_alive()
            r = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=10)
            states = dict(line.split(None, 1) for line in r.stdout.splitlines() if " " in line)
            last = r.stdout.strip() or r.stderr.strip()
            if all(states.get(n, "").rstrip("*~#!%$@^-") == "idle" for n in self.node_names):
                return
            bad = any(s.startswith(("down", "drain")) for s in states.values())
            if bad and time.monotonic() - resumed > 3:
                self.run("scontrol", "update", f"NodeName={','.join(self.node_names)}", "State=RESUME",
                         check=False)
                resumed = time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes not idle after {self.startup_timeout:.0f} s; sinfo: {last!r}")
            time.sleep(0.2)

    def stop(self, timeout: float = 10.0, grace: float = 3.0) -> None:
        """Cancel jobs (up to ``grace`` s for them to end), SIGKILL what is left of them, then
        SIGTERM the daemons (SIGKILL after ``timeout`` s); remove the folder unless ``keep``.

        Job processes go first: a slurmd with a live step does not exit on SIGTERM (seen: 10 s).
        """
        atexit.unregister(self.stop)
        procs, self.procs = self.procs, {}
        if procs.get("slurmctld") is not None and procs["slurmctld"].poll() is None:
            try:
                ids = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split()
                if ids:
                    self.run("scancel", *ids, check=False, timeout=10)
                    deadline = time.monotonic() + grace
                    while time.monotonic() < deadline and self.run(
                            "squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.strip():
                        time.sleep(0.2)
            except Exception:  # noqa: BLE001 - best effort; leftovers are killed below
                pass
        if self.root:
            _kill_marked(self.root, self.conf_path, spare={p.pid for p in procs.values()})
        _terminate([p for n, p in procs.items() if n.startswith("slurmd.")], timeout)
        for name in ("slurmctld", "munged"):
            _terminate([procs[name]] if name in procs else [], timeout)
        if self.root:
            _kill_marked(self.root, self.conf_path)
        for f in self._outs:
            f.close()
        self._outs = []
        if self.root and not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers
    def env(self) -> dict[str, str]:
        """What Slurm's client commands need to find this cluster."""
        return {"SLURM_CONF": self.conf_path}

    def run(self, *args: str, check: bool = True, timeout: float = 30.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a Slurm command (``sinfo``, ``sbatch``, ...) against this cluster; text output."""
        full_env = dict(os.environ, **(env or {}), **self.env())
        r = subprocess.run(list(args), env=full_env, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            msg = r.stderr.strip() or r.stdout.strip()
            raise RuntimeError(f"`{' '.join(args)}` exited {r.returncode}: {msg}")
        return r

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> int:
        """Submit a batch job; returns its id."""
        out = self.run("sbatch", "--parsable", *args, env=env).stdout.strip()
        return int(out.split(";")[0])

    def job_state(self, job_id: int | str) -> str | None:
        """``RUNNING``, ``PENDING``, ``COMPLETED``, ...; None once Slurm has forgotten the job."""
        r = self.run("squeue", "-h", "-j", str(job_id), "-o", "%T", check=False)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.split()[0]
        r = self.run("scontrol", "show", "job", str(job_id), "-o", check=False)
        for field in r.stdout.split() if r.returncode == 0 else []:
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return None

    def wait_state(self, job_id: int | str, states, timeout: float = 60.0) -> str | None:
        """Poll until the job is in one of ``states`` (a name or several; None allowed)."""
        wanted = {states} if states is None or isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state in wanted:
                return state
            if time.monotonic() > deadline:
                job = self.run("scontrol", "show", "job", str(job_id), check=False).stdout
                raise TimeoutError(f"job {job_id} is {state}, not one of {sorted(map(str, wanted))}, "
                                   f"after {timeout} s\n{job}\n{self.log_tails(20)}")
            time.sleep(0.2)

    def job_processes(self, job_id: int | str) -> list[int]:
        """Pids of this cluster's tasks of ``job_id`` (environment ``SLURM_JOB_ID`` and our
        ``SLURM_CONF``): after a requeue, the old instance is gone when this is empty."""
        want = [b"\0" + f"SLURM_JOB_ID={job_id}".encode() + b"\0",
                b"\0" + f"SLURM_CONF={self.conf_path}".encode() + b"\0"]
        found = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    environ = b"\0" + f.read() + b"\0"
            except OSError:
                continue
            if all(w in environ for w in want):
                found.append(int(d))
        return found

    def wait_gone(self, job_id: int | str, timeout: float = 120.0) -> None:
        """Wait until no task of ``job_id`` runs (and Slurm no longer marks it COMPLETING)."""
        deadline = time.monotonic() + timeout
        while True:
            flags = self.run("scontrol", "show", "job", str(job_id), "-o", check=False).stdout
            pids = self.job_processes(job_id)
            if not pids and "COMPLETING" not in flags:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id}: tasks {pids} still there after {timeout} s\n{flags}\n"
                                   f"{self.log_tails(20)}")
            time.sleep(0.2)

    def release(self, job_id: int | str) -> None:
        """Start a requeued job now: Slurm otherwise holds it PENDING (BeginTime) for ~120 s."""
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)   # racing a state change is fine: callers retry

    def log_tails(self, n: int = 30) -> str:
        parts = []
        for name, path in self.logs.items():
            parts.append(f"--- {name} ({path}) ---\n{_tail(path, n)}")
            out = os.path.join(self.root or "", "log", f"{name}.out")
            if out != path and os.path.exists(out) and os.path.getsize(out):
                parts.append(f"--- {name} stdout/stderr ---\n{_tail(out, n)}")
        return "\n".join(parts)


def _terminate(procs: list[subprocess.Popen], timeout: float) -> None:
    """SIGTERM all, then SIGKILL those still running after ``timeout`` s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def _kill_marked(root: str, conf: str | None, spare: set[int] = frozenset()) -> None:
    """SIGKILL what is left of the cluster, except ourselves and our ancestors: processes whose
    environment carries ``MARKER=root`` (daemons, slurmstepd) and their sessions (job steps), and
    job tasks (``SLURM_JOB_ID`` and our ``SLURM_CONF``), but not ``spare`` (our daemons) and
    their sessions. Jobs outlive slurmd's SIGTERM."""
    spare = set(spare)
    pid = os.getpid()
    while pid > 1:
        spare.add(pid)
        pid = _stat(pid)[0]
    spare_sids = {_stat(p)[1] for p in spare}
    marker = b"\0" + f"{MARKER}={root}".encode() + b"\0"
    conf_var = b"\0" + f"SLURM_CONF={conf}".encode() + b"\0"
    for _ in range(5):  # a dying slurmstepd may still fork a task
        victims, sids = set(), set()
        procs = [int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) not in spare]
        for p in procs:
            try:
                with open(f"/proc/{p}/environ", "rb") as f:
                    environ = b"\0" + f.read() + b"\0"
            except OSError:
                continue
            sid = _stat(p)[1]
            if marker in environ and sid not in spare_sids:
                victims.add(p)
                sids.add(sid)
            elif conf and conf_var in environ and b"\0SLURM_JOB_ID=" in environ:
                victims.add(p)
        sids -= spare_sids | {-1}
        victims |= {p for p in procs if _stat(p)[1] in sids}
        for p in victims:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        if not victims:
            return
        time.sleep(0.2)


def _stat(pid: int) -> tuple[int, int]:
    """(parent pid, session id) of a process; (-1, -1) once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            return -1, -1  # a zombie is dead already; killing it again would loop
        return int(fields[1]), int(fields[3])
    except (OSError, ValueError, IndexError):
        return -1, -1


def _main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] != "up":
        print(f"usage: {argv[0]} up DIR", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # -> finally: stop()
    t0 = time.monotonic()
    c = SlurmCluster(root=argv[2]).start()
    try:
        print(f"# Slurm up in {time.monotonic() - t0:.1f} s; logs in {c.root}/log; Ctrl-C stops it")
        print("".join(f"export {k}={v}\n" for k, v in c.env().items()) + c.run("sinfo", "-N", "-l").stdout,
              flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
