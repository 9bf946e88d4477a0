"""Job status: ``vqscale status RUN_DIR`` and following a submitted job until it ends.

``status.json`` is written by two hands (``pretrain.metrics.update_status`` merges them): the
submitting process and each job's rank 0 (job id, cluster, requeues, submitit folder) and the
trainer (state, step, last checkpoint). The live queue state comes from ``squeue``; Slurm clusters
without accounting have no ``sacct``, so a job that has left the queue is judged by the result
files submitit's tasks leave behind (none at all means the job died without reaching Python's
exit path: out of memory, killed, node failure), never by waiting on submitit's own watcher,
which waits forever when sacct is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Sequence

from data_pipeline import storage

__all__ = ["read_status", "queue_state", "wait_jobs", "main_status"]

TERMINAL = ("finished", "failed", "diverged", "requeue-limit", "stopped")


def read_status(run_dir: str) -> dict[str, Any]:
    url = storage.join(run_dir, "status.json")
    if not storage.exists(url):
        raise FileNotFoundError(f"no status.json in {run_dir} (not a run directory or job folder, "
                                f"or the job has not started)")
    return storage.read_json(url)


def queue_state(job_id: str) -> str | None:
    """Slurm's state of a job (``PENDING``, ``RUNNING``, ...) or None once it has left the queue."""
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [x.strip() for x in out.stdout.splitlines() if x.strip()]
    return lines[0] if out.returncode == 0 and lines else None


def _outcomes(job) -> list[tuple[str, Any]]:
    """(outcome, result or traceback) of every task of a submitit job, from its result files."""
    from submitit.core.utils import pickle_load

    out = []
    for sub in (job._sub_jobs or [job]):
        path = sub.paths.result_pickle
        out.append(pickle_load(path) if path.exists() else ("missing", None))
    return out


def _tail(path, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _report_failure(job, outcomes) -> None:
    for k, (outcome, result) in enumerate(outcomes):
        if outcome == "success":
            continue
        sub = (job._sub_jobs or [job])[k]
        print(f"task {k} of job {job.job_id}: {outcome}", file=sys.stderr)
        if outcome == "error" and result:
            print(str(result).rstrip()[-3000:], file=sys.stderr)
        else:
            print(_tail(sub.paths.stderr), file=sys.stderr)


def wait_jobs(jobs: Sequence, status_dirs: Sequence[str], cluster: str, timeout_s: float | None = None,
              poll_s: float = 2.0, out=sys.stderr) -> int:
    """Follow jobs until each has ended; print progress lines; 0 when every task succeeded."""
    deadline = None if timeout_s is None else time.time() + timeout_s
    pending = dict(enumerate(jobs))
    last: dict[int, tuple] = {}
    failed = 0
    while pending:
        for i, job in list(pending.items()):
            if cluster == "slurm":
                state = queue_state(job.job_id)
                ended = state is None
            else:
                ended, state = job.done(), "RUNNING"
            try:
                st = read_status(status_dirs[i])
            except (FileNotFoundError, OSError, ValueError):
                st = {}
            shown = (state, st.get("state"), st.get("step"), st.get("requeues"))
            if shown != last.get(i) and not ended:
                print(f"job {job.job_id}: {state or '-'}, {st.get('state', '-')} at step {st.get('step', '-')}"
                      f"/{st.get('steps', '-')}, requeues {st.get('requeues', 0)}", file=out)
                last[i] = shown
            if not ended:
                continue
            del pending[i]
            outcomes = _outcomes(job)
            ok = all(o == "success" for o, _ in outcomes)
            print(f"job {job.job_id}: {'finished' if ok else 'FAILED'} ({st.get('state', 'no status')}, "
                  f"step {st.get('step', '-')}); logs in {job.paths.folder}", file=out)
            if not ok:
                failed += 1
                _report_failure(job, outcomes)
        if pending:
            if deadline is not None and time.time() > deadline:
                print(f"gave up waiting after {timeout_s:.0f} s; jobs still queued: "
                      f"{', '.join(str(j.job_id) for j in pending.values())}", file=out)
                return 124
            time.sleep(poll_s)
    return 1 if failed else 0


def main_status(args) -> int:
    try:
        st = read_status(args.run_dir)
    except FileNotFoundError as e:
        print(f"vqscale: error: {e}", file=sys.stderr)
        return 2
    if st.get("cluster") == "slurm" and st.get("job_id"):
        st["queue_state"] = queue_state(st["job_id"]) or "not in the queue"
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    order = ["state", "step", "steps", "last_checkpoint", "job_id", "cluster", "queue_state", "requeues",
             "nodes", "tasks", "world_size", "skipped_steps", "submitit_folder", "job_dir", "command", "time"]
    keys = [k for k in order if k in st] + sorted(k for k in st if k not in order)
    width = max(len(k) for k in keys)
    for k in keys:
        v = st[k]
        if k == "time":
            v = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v)) + f" ({time.time() - v:.0f} s ago)"
        elif k == "command":
            v = " ".join(v)
        print(f"{k:<{width}}  {v}")
    logs = os.path.join(args.run_dir, "logs")
    if not storage.is_remote(args.run_dir) and os.path.isdir(logs):
        print(f"{'logs':<{width}}  {logs} (one file per rank)")
    return 0
