"""The Trainer's components that decide their own cadence (torchtitan's ``should_validate``): the
guard rails over the engines' skipped steps, the profiler window, the sample-key audit file, and
:func:`due`, the "every N steps" rule of logging, validation, visuals and checkpoints. So the
Trainer's ``fit`` reads as a list of calls.

Guard rails: an engine whose gradient is not finite skips its optimizer step on every rank
(:mod:`pretrain.runtime`); :class:`Guard` counts the skips per engine (``skipped_steps``,
``consecutive_skips``, ``nonfinite_losses``; the discriminator's with the prefix ``disc_``, the
names checkpoints and metrics have always used), tells the Trainer whether the EMA may update (not
after a skipped step), and reports divergence after ``max_consecutive_skips`` skips in a row of
either engine. Non-finite losses are counted on the device and read once per log or save, so a
step never waits for the device.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from .step import StepReport

log = logging.getLogger("vqscale.trainer")

__all__ = ["due", "Guard", "Profiler", "KeysFile"]


def due(step: int, every: int, last: int | None = None) -> bool:
    """Whether ``step`` (finished steps) is on the cadence ``every`` (0 or less: never); ``last``,
    the run's final step, is always due."""
    return (every > 0 and step % every == 0) or (last is not None and step == last)


def _prefix(engine: str) -> str:
    return "disc_" if engine == "discriminator" else ""


class Guard:
    """Skip and non-finite counters of the engines (module docstring)."""

    def __init__(self, engines: tuple[str, ...], max_consecutive_skips: int):
        self.engines, self.limit = engines, max_consecutive_skips
        self.counters = {f"{_prefix(e)}{c}": 0 for e in engines
                         for c in ("skipped_steps", "consecutive_skips", "nonfinite_losses")}
        self._pending: dict[str, torch.Tensor] = {}      # counter -> device count not yet added

    def restore(self, counters: dict[str, int]) -> None:
        self.counters.update(counters)

    def observe(self, step: int, report: StepReport) -> bool:
        """Count what ``report`` says of each engine that learned at ``step``; True when the
        trained model's optimizer stepped (its EMA may update)."""
        for engine in self.engines:
            r, p = report.engines[engine], _prefix(engine)
            if not r.learned:
                continue        # the discriminator before its start step
            if r.nonfinite is not None:
                name = f"{p}nonfinite_losses"
                self._pending[name] = self._pending.get(name, 0) + r.nonfinite.int()
            if r.skipped:
                self.counters[f"{p}skipped_steps"] += 1
                self.counters[f"{p}consecutive_skips"] += 1
                whose = "non-finite discriminator gradient, its" if p else "non-finite gradient,"
                log.warning("step %d: %s optimizer step skipped (%d in a row, %d in all)", step, whose,
                            self.counters[f"{p}consecutive_skips"], self.counters[f"{p}skipped_steps"])
            else:
                self.counters[f"{p}consecutive_skips"] = 0
        return not report.engines[self.engines[0]].skipped

    def settle(self) -> None:
        """Add the device counts to the counters: one read per counter."""
        for name, count in self._pending.items():
            self.counters[name] += int(count)
        self._pending.clear()

    def diverged(self) -> tuple[int, str] | None:
        """``(streak, " of the discriminator" or "")`` once an engine skipped ``max_consecutive_skips``
        optimizer steps in a row, else None."""
        streak, which = self.counters["consecutive_skips"], ""
        if self.counters.get("disc_consecutive_skips", 0) > streak:
            streak, which = self.counters["disc_consecutive_skips"], " of the discriminator"
        return (streak, which) if streak >= self.limit else None

    def metrics(self) -> dict[str, float]:
        return {f"guard/{_prefix(e)}{c}": float(self.counters[f"{_prefix(e)}{c}"])
                for e in self.engines for c in ("skipped_steps", "nonfinite_losses")}


class Profiler:
    """A torch.profiler trace of ``steps`` steps from ``start`` on (``log.profile_*``) into
    ``folder`` (TensorBoard's trace format, one file per rank)."""

    def __init__(self, start: int, steps: int, folder: str, rank: int, cuda: bool):
        self.start, self.steps, self.folder, self.rank, self.cuda = start, steps, folder, rank, cuda
        self._prof = None

    def before_step(self, step: int) -> None:
        if self.steps > 0 and step == self.start and self._prof is None:
            from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            log.info("profiling steps %d-%d into %s", step + 1, step + self.steps, self.folder)
            self._prof = profile(activities=acts, record_shapes=True, with_stack=False,
                                 on_trace_ready=tensorboard_trace_handler(self.folder, worker_name=f"rank{self.rank}"))
            self._prof.start()

    def after_step(self, step: int) -> None:
        if self._prof is not None:
            self._prof.step()
            if step >= self.start + self.steps:
                self.stop()

    def stop(self) -> None:
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.stop()


class KeysFile:
    """``log.record_keys``: the ``(key, epoch)`` of every sample of every step, one JSON line per
    step, in ``folder/keys/rank{r}.jsonl`` (audits of what a run saw, across resumes)."""

    def __init__(self, folder: str, rank: int, enabled: bool):
        self._file = None
        if enabled:
            os.makedirs(os.path.join(folder, "keys"), exist_ok=True)
            self._file = open(os.path.join(folder, "keys", f"rank{rank}.jsonl"), "a")

    def write(self, step: int, keys: list[Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"step": step, "keys": keys}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
