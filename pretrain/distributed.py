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

import datetime
import logging
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Mapping

import torch

log = logging.getLogger("vqscale.dist")

__all__ = ["DistEnv", "detect_env", "expand_nodelist", "slurm_master_port", "init_distributed",
           "destroy_distributed", "setup_rank_logging", "StopFlag", "seed_for", "barrier"]


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


# ---- process group -------------------------------------------------------------------------------
def _free_port() -> int:
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
        env = DistEnv(master_port=int(os.environ.get("MASTER_PORT") or _free_port()))
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
    log.info("process group up: rank %d/%d (local %d) via %s, backend %s, timeout %.0fs",
             env.rank, env.world_size, env.local_rank, env.source, backend, timeout_s)
    return env


def destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


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
class StopFlag:
    """Set by SIGTERM/SIGUSR1 (Slurm's pre-emption and time-limit warnings) and agreed on by all
    ranks: :meth:`should_stop` is a collective (one 1-element all_reduce MAX) that every rank calls
    at the same step, so a signal delivered to one rank stops all ranks after the same step.

    The handlers only set a flag; the training loop decides when to checkpoint and exit. They
    replace the previous handlers until :meth:`uninstall`.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.signals = signals
        self.local = False
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopFlag":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        self.local = True
        self.reason = signal.Signals(signum).name
        # Only an async-signal-safe flag here; the log line is written by should_stop.

    def request(self, reason: str = "requested") -> None:
        self.local, self.reason = True, reason

    def should_stop(self) -> bool:
        """True on every rank as soon as any rank has been signalled (collective)."""
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.local
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1.0 if self.local else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item() > 0)
        if stop:
            log.warning("stop agreed (%s)", self.reason or "signal on another rank")
        return stop


def seed_for(seed: int, rank: int) -> int:
    """Seed python/numpy/torch (and CUDA) from ``(seed, rank)`` via :mod:`pretrain.repro`."""
    from .repro import seed_everything

    return seed_everything(seed, rank)
