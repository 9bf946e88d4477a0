"""One logger interface for a run's metrics: TensorBoard scalars and image grids (rank 0 only),
a console line at log intervals, and a JSON-lines file a script can read.

TensorBoard writes local files only, so for a remote run directory (``s3://...``) the event files
go to a local staging folder (:class:`data_pipeline.storage.StagedDir`) that is uploaded on
:meth:`MetricLogger.flush` and :meth:`close`. Other ranks get a logger that does nothing, so the
training loop calls it unconditionally.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
import time
from typing import Any, Mapping

import numpy as np
import torch

from data_pipeline import storage
from model_zoo.grids import DEFAULT_NCOL, image_grid


def _scalar(v: Any) -> float | None:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            return None
        v = v.detach().float().item()
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    return None


class MetricLogger:
    """Rank 0 writes ``RUN_DIR/tb/`` (TensorBoard) and ``RUN_DIR/metrics.jsonl``; others no-op."""

    def __init__(self, run_dir: str, rank: int = 0, enabled: bool = True, flush_every_s: float = 60.0):
        self.active = enabled and rank == 0
        self.run_dir = run_dir
        self._writer = None
        self._stage = None
        self._jsonl = None
        self._last_flush = time.monotonic()
        self._flush_every = flush_every_s
        if not self.active:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._stage = storage.StagedDir(storage.join(run_dir, "tb"))
        self._writer = SummaryWriter(log_dir=self._stage.path, flush_secs=30)
        self._jsonl_url = storage.join(run_dir, "metrics.jsonl")
        if storage.is_remote(run_dir):
            fd, self._jsonl_path = tempfile.mkstemp(prefix="vqscale-metrics-", suffix=".jsonl")
            os.close(fd)
            if storage.exists(self._jsonl_url):     # a resumed run appends, as it does locally
                with open(self._jsonl_path, "wb") as f:
                    f.write(storage.read_bytes(self._jsonl_url))
        else:
            self._jsonl_path = storage.local_path(self._jsonl_url)
            os.makedirs(os.path.dirname(os.path.abspath(self._jsonl_path)), exist_ok=True)
        self._jsonl = open(self._jsonl_path, "a", encoding="utf-8")

    def scalars(self, step: int, values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
        """Log every scalar-like value (tensors, numbers, bools); returns what was logged."""
        out = {}
        for k, v in values.items():
            s = _scalar(v)
            if s is None:
                continue
            out[f"{prefix}{k}"] = s
        if not self.active:
            return out
        for k, s in out.items():
            if math.isfinite(s):
                self._writer.add_scalar(k, s, step)
        self._jsonl.write(json.dumps({"step": step, **out}) + "\n")
        self._maybe_flush()
        return out

    def images(self, step: int, name: str, images: torch.Tensor, ncol: int = DEFAULT_NCOL) -> np.ndarray | None:
        """Log a grid of ``[B,3,H,W]`` images in [-1, 1]; returns the grid array (rank 0)."""
        if not self.active:
            return None
        grid = image_grid(images, ncol)
        self._writer.add_image(name, grid, step, dataformats="HWC")
        self._maybe_flush()
        return grid

    def text(self, step: int, name: str, text: str) -> None:
        if self.active:
            self._writer.add_text(name, text, step)

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush > self._flush_every:
            self.flush()

    def flush(self) -> None:
        if not self.active:
            return
        self._writer.flush()
        self._jsonl.flush()
        if storage.is_remote(self.run_dir):
            storage.write_bytes(self._jsonl_url, open(self._jsonl_path, "rb").read())
        self._stage.sync()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if not self.active:
            return
        self.flush()
        self._writer.close()
        self._jsonl.close()
        self._stage.close(sync=True)
        if storage.is_remote(self.run_dir):
            os.remove(self._jsonl_path)
        self.active = False

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def update_status(run_dir: str, drop: tuple[str, ...] = (), **fields: Any) -> dict:
    """Merge ``fields`` into ``RUN_DIR/status.json`` (less the keys in ``drop``) and return the
    whole status.

    Two writers share the file: the cluster layer (job id, requeues, the submitit folder) and the
    trainer's rank 0 (state, step, last checkpoint); merging keeps each one's fields. A file that
    cannot be read (a half-copied one on a shared filesystem) starts afresh rather than failing.

    The write is atomic (a new file renamed over the old). On a full local disk, where a new file
    cannot be made, the file is overwritten in place instead: its own blocks hold the few hundred
    bytes, so a run that failed because the disk filled up still says so.
    """
    url = storage.join(run_dir, "status.json")
    try:
        current = storage.read_json(url) if storage.exists(url) else {}
    except (OSError, ValueError):
        current = {}
    if not isinstance(current, dict):
        current = {}
    current.update(fields)
    for key in drop:
        current.pop(key, None)
    current["time"] = time.time()
    try:
        storage.write_json(url, current)
    except OSError as e:
        if e.errno != errno.ENOSPC or storage.is_remote(url) or not storage.exists(url):
            raise
        data = (json.dumps(current, indent=2) + "\n").encode()
        with open(storage.local_path(url), "r+b") as f:      # no new blocks for a file this small
            f.write(data)
            f.truncate()
    return current
