"""Reproducibility in one place: seeds from (seed, rank), the git revision, the host."""

from __future__ import annotations

import os
import platform
import random
import subprocess

import numpy as np
import torch


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch from (seed, rank); returns the derived seed."""
    derived = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
    return derived


def git_revision(path: str | None = None) -> str:
    """``<sha>`` (``+dirty`` when the tree has changes), or ``unknown`` outside a checkout."""
    cwd = path or os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_metadata() -> dict[str, str]:
    return {"git_revision": git_revision(), "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__}
