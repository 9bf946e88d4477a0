"""How tests start real multi-process jobs: a test file runs itself as the torchrun script (phase
name and arguments after it), on CPU with the gloo backend (``DS_ACCELERATOR=cpu``)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_env() -> dict:
    """The environment of a child job: this checkout importable, DeepSpeed on CPU, one thread."""
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node=N script args...`` on a free port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
           "--rdzv-endpoint=127.0.0.1:0", os.path.abspath(script), *args]
    return subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
