"""The distributed environment of a training job: who am I, where is the master, when to stop.

Owns: reading the launcher's variables (torchrun: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR``/``MASTER_PORT``; Slurm ``srun``: ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``
with the master on the first host of ``SLURM_JOB_NODELIST`` and a port derived from
``SLURM_JOB_ID``; else one process), starting the process group with collective time-outs
(nccl on CUDA, gloo otherwise), per-rank log files so that a hang names its rank, the stop flag
that SIGTERM/SIGUSR1 raise and that all ranks agree on at the same step, and per-rank seeds.

Slurm variables count only inside an ``srun`` step: the batch script itself also sees
``SLURM_PROCID=0`` and the ``SLURM_NTASKS`` of the whole allocation, and treating it as rank 0 of
that many would wait forever for ranks that were never started.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Mapping, NoReturn

import torch

from .repro import seed_everything

log = logging.getLogger("vqscale.dist")

__all__ = ["DistEnv", "detect_env", "expand_nodelist", "slurm_master_port", "init_distributed",
           "destroy_distributed", "exit_process", "setup_rank_logging", "StopFlag", "process_stop_flag",
           "seed_for", "barrier", "resolve_master_addr", "free_port", "rank_world"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"          # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---- Slurm ---------------------------------------------------------------------------------------
def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced brackets in Slurm node list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced brackets in Slurm node list {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_range(body: str) -> list[str]:
    out = []
    for item in body.split(","):
        item = item.strip()
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {item!r} in Slurm node list")
            width = len(lo)          # node[001-010]: zero padding follows the lower bound
            out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
        elif item.isdigit():
            out.append(item)
        else:
            raise ValueError(f"bad item {item!r} in Slurm node list")
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list: ``node[01-03,07],gpu1`` -> ``node01 node02 node03
    node07 gpu1``; several bracket groups in one name (``r[1-2]n[1-2]``) expand as a product."""
    hosts: list[str] = []
    for name in _split_top(nodelist):
        m = re.search(r"\[([^\[\]]*)\]", name)
        if m is None:
            hosts.append(name)
            continue
        head, tail = name[:m.start()], name[m.end():]
        for mid in _expand_range(m.group(1)):
            hosts.extend(expand_nodelist(head + mid + tail) if "[" in tail else [head + mid + tail])
    return hosts


def slurm_master_port(job_id: str | int) -> int:
    """A port in 15000-34999 derived from the job id: every task of the job computes the same one,
    and two jobs sharing a node rarely collide (the same rule as Lightning's, a wider range)."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return 15000 + int(digits) % 20000


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables. torchrun wins over Slurm (``srun torchrun ...`` sets both);
    Slurm variables count only inside an ``srun`` step (``SLURM_STEP_ID`` or
    ``SLURM_STEP_NUM_TASKS`` set); anything else is a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(rank=int(env["RANK"]), world_size=world, local_rank=int(env.get("LOCAL_RANK", 0)),
                       local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(env.get("MASTER_PORT", 29500)), source="torchrun")
    in_step = any(k in env for k in ("SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NUM_TASKS"))
    if "SLURM_PROCID" in env and in_step:
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        hosts = expand_nodelist(nodelist) if nodelist else []
        addr = env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else slurm_master_port(env.get("SLURM_JOB_ID", "0"))
        tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
        local_world = _first_tasks_per_node(tasks_per_node) if tasks_per_node else world
        return DistEnv(rank=int(env["SLURM_PROCID"]), world_size=world, local_rank=int(env.get("SLURM_LOCALID", 0)),
                       local_world_size=local_world, master_addr=addr, master_port=port, source="slurm")
    return DistEnv()


def _first_tasks_per_node(text: str) -> int:
    """``SLURM_TASKS_PER_NODE`` looks like ``4(x2),3``; the first count is enough for us."""
    m = re.match(r"\s*(\d+)", text)
    return int(m.group(1)) if m else 1


def resolve_master_addr(host: str) -> str:
    """The address to rendezvous on for the first host of a Slurm node list.

    Real clusters' node names resolve; a cluster whose node names are only Slurm's (several
    virtual nodes on one machine, or a site without DNS entries) still knows each node's address
    as ``NodeAddr``, which ``scontrol`` reports. One call per rank, and only when DNS fails.
    """
    try:
        socket.getaddrinfo(host, None)
        return host
    except (socket.gaierror, UnicodeError):
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", host, "-o"], capture_output=True, text=True, timeout=60)
        m = re.search(r"\bNodeAddr=(\S+)", out.stdout)
        if m:
            log.info("master host %s does not resolve; using its Slurm NodeAddr %s", host, m.group(1))
            return m.group(1)
    except (OSError, subprocess.TimeoutExpired):
        pass
    raise RuntimeError(f"the master host {host!r} (first host of the Slurm node list) does not resolve and "
                       f"scontrol does not know its NodeAddr; export MASTER_ADDR in the job")


# ---- process group -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuda() -> bool:
    # DS_ACCELERATOR=cpu means "train on CPU" even where a GPU is visible.
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


_STARTED: DistEnv | None = None


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Start the process group (idempotent) and return the environment.

    ``backend``: None picks nccl on CUDA, else gloo. ``timeout_s`` bounds every collective, so a
    dead rank turns into an error naming the operation instead of a silent hang. The launcher's
    values are exported as ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` because DeepSpeed
    reads them from the environment; a single process gets a free port on 127.0.0.1.
    """
    import torch.distributed as dist

    global _STARTED
    if _STARTED is not None and dist.is_initialized():
        return _STARTED                 # (the variables exported below would now read as torchrun's)
    env = detect_env()
    if env.source == "single":
        env = DistEnv(master_port=int(os.environ.get("MASTER_PORT") or free_port()))
    elif env.source == "slurm":
        env = dataclasses.replace(env, master_addr=resolve_master_addr(env.master_addr))
    os.environ.update({"RANK": str(env.rank), "WORLD_SIZE": str(env.world_size),
                       "LOCAL_RANK": str(env.local_rank), "LOCAL_WORLD_SIZE": str(env.local_world_size),
                       "MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port)})
    _STARTED = env
    if dist.is_initialized():
        return env
    backend = backend or ("nccl" if _cuda() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    # env:// (not tcp://): under torchrun the workers must join the agent's store
    # (TORCHELASTIC_USE_AGENT_STORE), whose port MASTER_PORT already is.
    dist.init_process_group(backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    # Tear the group down while the interpreter is whole (torchtitan destroys it at the end of
    # main too); see exit_process for what this alone does not prevent. Destroyed twice is a no-op.
    atexit.unregister(_destroy_at_exit)      # one handler however often the group is restarted
    atexit.register(_destroy_at_exit)
    log.info("process group up: rank %d/%d (local %d) via %s, backend %s, timeout %.0fs",
             env.rank, env.world_size, env.local_rank, env.source, backend, timeout_s)
    return env


def destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _destroy_at_exit() -> None:
    with contextlib.suppress(Exception):     # exiting anyway: an error here must not mask the exit status
        destroy_distributed()


def exit_process(code: int) -> NoReturn:
    """End a process that started a process group, without interpreter finalization.

    A rank that finished its work and wrote everything out can still die at exit with
    "terminate called without an active exception" (SIGABRT) while CPython finalizes: the
    C++ objects of c10d/gloo are then torn down with no Python frame left, even when the
    group was destroyed in an atexit handler (pytorch#190489 has the same message). torchrun
    reports such a rank as failed, and srun a finished step FAILED. Seen here in 4 of
    ~35 two-rank resume runs during one busy half hour, never in ~100 runs at other times,
    which is why this does not wait for a fix upstream. Everything a normal exit does that
    can lose data still runs first: non-daemon threads are joined, the atexit handlers run
    (logging's flush, this module's group teardown, TensorBoard writers), stdio is flushed;
    only the finalization itself is skipped. A process that never started a group exits
    normally. Tasks of ``vqscale submit`` do not come here: submitit writes their result after
    :class:`cluster.job.VerbJob` returns, so they still end through finalization.
    """
    if _STARTED is None:
        sys.exit(code)
    main = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()                  # (CPython's own exit path, without the teardown after it)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group, or (0, 1) without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ---- logging -------------------------------------------------------------------------------------
_HANDLER_TAG = "_vqscale_rank_handler"


def setup_rank_logging(run_dir_local: str, rank: int, level: int = logging.INFO) -> str:
    """Log every rank to ``RUN_DIR/logs/rank{r}.log`` and only rank 0 to the console.

    Each line carries the rank, so when a collective hangs the last line of each file shows
    which rank stopped where. DeepSpeed's own logger (which does not propagate) is sent to the
    same file; its console output is kept on rank 0 and reduced to errors elsewhere. Calling it
    again replaces the handlers it added. Returns the log file path.
    """
    folder = os.path.join(run_dir_local, "logs")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"rank{rank}.log")
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(process)d %(name)s %(levelname)s: %(message)s")
    file_h = logging.FileHandler(path, mode="a")
    file_h.setFormatter(fmt)
    handlers: list[logging.Handler] = [file_h]
    if rank == 0:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(fmt)
        handlers.append(console)
    root = logging.getLogger()
    for h in list(root.handlers):
        # ours from an earlier call, and a console handler of logging.basicConfig (the CLI's):
        # the rank-tagged console handler below replaces it, so lines are not printed twice.
        console = type(h) is logging.StreamHandler and getattr(h, "stream", None) in (sys.stderr, sys.stdout)
        if getattr(h, _HANDLER_TAG, False) or console:
            root.removeHandler(h)
            if not console:
                h.close()
    for h in handlers:
        setattr(h, _HANDLER_TAG, True)
        root.addHandler(h)
    root.setLevel(level)
    ds_logger = logging.getLogger("DeepSpeed")
    for h in list(ds_logger.handlers):
        if getattr(h, _HANDLER_TAG, False):
            ds_logger.removeHandler(h)
        elif isinstance(h, logging.StreamHandler) and rank != 0:
            h.setLevel(logging.ERROR)
    ds_file = logging.FileHandler(path, mode="a")
    ds_file.setFormatter(fmt)
    setattr(ds_file, _HANDLER_TAG, True)
    ds_logger.addHandler(ds_file)
    return path


# ---- stop flag -----------------------------------------------------------------------------------
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopFlag:
    """Set by SIGTERM (cancel or pre-emption), SIGUSR1 and SIGUSR2 (submitit's time-limit and
    pre-emption signal) and agreed on by all ranks: :meth:`should_stop` is a collective (one
    1-element all_reduce MAX) that every rank calls at the same step, so a signal delivered to one
    rank stops all ranks after the same step.

    The handlers only set a flag (a sharded save is a collective and cannot run inside a signal
    handler); the training loop decides when to checkpoint and exit. Installs nest: the cluster
    job installs the process flag (:func:`process_stop_flag`) before anything else, so a signal
    that arrives while the model is still being built is not lost, and the trainer's own
    install/uninstall inside it changes nothing. The outermost install clears an old flag and
    the outermost uninstall restores the previous handlers.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.local = False
        self.reason: str | None = None
        self.seen: set[str] = set()        # every signal received, by name
        self.agreed = False                # should_stop() has returned True
        self._previous: dict[int, object] = {}
        self._depth = 0

    def install(self) -> "StopFlag":
        if self._depth == 0:
            self.local, self.reason, self.agreed = False, None, False
            self.seen = set()
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        self._depth += 1
        return self

    def uninstall(self) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth:
            return
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    @property
    def installed(self) -> bool:
        return self._depth > 0

    def _handle(self, signum, _frame) -> None:
        self.local = True
        name = signal.Signals(signum).name
        self.reason = self.reason or name
        self.seen.add(name)
        # Only flags here; the log line is written by should_stop.

    def request(self, reason: str = "requested") -> None:
        self.local, self.reason = True, reason

    def should_stop(self) -> bool:
        """True on every rank as soon as any rank has been signalled (collective)."""
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            stop = self.local
        else:
            # [requested, one slot per signal]: MAX over ranks is the union of what any rank saw,
            # so rank 0 can tell a pre-emption (USR2, requeue) from a cancel (TERM, no requeue)
            # even when the signal reached another rank only.
            names = [signal.Signals(s).name for s in self.signals]
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([float(self.local)] + [float(n in self.seen) for n in names], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            values = flag.tolist()
            stop = values[0] > 0
            self.seen |= {n for n, v in zip(names, values[1:]) if v > 0}
        if stop:
            if not self.agreed:
                log.warning("stop agreed (%s)", self.reason or "signal on another rank")
            self.agreed = True
        return stop


_PROCESS_FLAG: StopFlag | None = None


def process_stop_flag() -> StopFlag:
    """The one stop flag of this process, shared by the cluster job and the trainer."""
    global _PROCESS_FLAG
    if _PROCESS_FLAG is None:
        _PROCESS_FLAG = StopFlag()
    return _PROCESS_FLAG


def seed_for(seed: int, rank: int) -> int:
    """Seed python/numpy/torch (and CUDA) from ``(seed, rank)`` via :mod:`pretrain.repro`."""
    return seed_everything(seed, rank)
