"""The contract between the Trainer and its objectives: one optimizer step.

The Trainer owns the run (data, engines, checkpoints, cadence); an objective owns what a step
computes and which engine each loss updates (torchtitan keeps the loss out of its loop the same
way). Every objective subclasses :class:`Objective` and implements

    models: tuple[str, ...]                            # its engines, the trained model's first
    updates(engines, batch, step) -> iterator of (engine name, loss, metrics)
    validation(engines, batch, step) -> {name: float}  # held-out metrics, no_grad, eval mode
    visuals(engines, batch) -> {name: [B, 3, H, W] in [-1, 1]}

and inherits the step itself, :meth:`Objective.train_step`::

    train_step(engines, micro_batches, step) -> StepReport

For each micro-batch, ``updates`` yields one loss per engine in the order the engines learn;
``train_step`` runs ``engine.backward(loss); engine.step()`` for it before asking for the next,
so a later loss can use what the earlier update did (the GAN's discriminator sees the
reconstructions of the generator's micro-batch). DeepSpeed accumulates gradients and steps the
optimizer at the accumulation boundary. An engine needs ``backward``, ``step`` and
``skipped_steps`` (a count of optimizer steps skipped for a non-finite gradient): DeepSpeed's
engine, as :mod:`pretrain.runtime` builds it. Objectives stay plain torch and never import
DeepSpeed.

:class:`StepReport` is everything the Trainer reads back: the metrics (means over the
micro-batches, detached device scalars: nothing here waits for the device), per engine whether
it learned this step, whether its optimizer step was skipped and a device flag of non-finite
losses, and the samples, tokens, data wait and (optionally) sample keys of the step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

__all__ = ["Objective", "StepReport", "EngineReport", "MicroBatches"]


@dataclass
class EngineReport:
    """What one engine did in a step."""

    learned: bool = False               # it got a loss (and so took or skipped an optimizer step)
    skipped: bool = False               # its optimizer step was skipped: a non-finite gradient
    nonfinite: Tensor | None = None     # device flag: a loss of this step was not finite


@dataclass
class StepReport:
    """What a step did (module docstring). ``samples`` and ``tokens`` count this rank's."""

    metrics: dict[str, Tensor]
    engines: dict[str, EngineReport]
    samples: int = 0
    tokens: int = 0
    data_wait_s: float = 0.0
    keys: list[tuple[str, int]] = field(default_factory=list)


def _batch_size(batch: dict) -> int:
    for name in ("key", "image", "codes", "caption"):
        if name in batch:
            return len(batch[name])
    raise KeyError(f"a batch needs one of key, image, codes or caption; it has {sorted(batch)}")


class MicroBatches:
    """The ``count`` micro-batches of one step, drawn from ``source`` as the objective asks for
    them; it times each draw (the data wait) and counts samples, tokens and, with ``keys``, the
    ``(key, epoch)`` of every sample."""

    def __init__(self, source: Iterator[dict], count: int, keys: bool = False):
        self.source, self.count, self.record_keys = source, count, keys
        self.wait_s, self.samples, self.tokens = 0.0, 0, 0
        self.keys: list[tuple[str, int]] = []

    @classmethod
    def of(cls, batches: Iterable[dict] | MicroBatches) -> MicroBatches:
        if isinstance(batches, MicroBatches):
            return batches
        batches = list(batches)
        return cls(iter(batches), len(batches))

    def __iter__(self) -> Iterator[dict]:
        for _ in range(self.count):
            t = time.perf_counter()
            batch = next(self.source)
            self.wait_s += time.perf_counter() - t
            self.samples += _batch_size(batch)
            if "codes" in batch:
                self.tokens += int(batch["codes"].numel())
            if self.record_keys:
                self.keys += list(zip(batch["key"], batch["epoch"].tolist()))
            yield batch


def _or_nonfinite(flag: Tensor | None, loss: Tensor) -> Tensor:
    bad = ~torch.isfinite(loss.detach()).all()
    return bad if flag is None else flag | bad


class Objective:
    """Base of every objective (module docstring)."""

    models: tuple[str, ...] = ("model",)

    def updates(self, engines: Mapping[str, nn.Module], batch: dict,
                step: int) -> Iterator[tuple[str, Tensor, dict[str, Tensor]]]:
        raise NotImplementedError

    def validation(self, engines: Mapping[str, nn.Module], batch: dict, step: int) -> dict[str, float]:
        raise NotImplementedError

    def visuals(self, engines: Mapping[str, nn.Module], batch: dict) -> dict[str, Tensor]:
        return {}

    def train_step(self, engines: Mapping[str, nn.Module], micro_batches: Iterable[dict] | MicroBatches,
                   step: int, *, poison: bool = False) -> StepReport:
        """One optimizer step of every engine that gets a loss, over ``micro_batches``; ``step``
        is the 0-based number of the step being computed. ``poison`` multiplies the trained
        model's losses by NaN (``guard.inject_nan_steps``: the guard rails' test)."""
        missing = [n for n in self.models if n not in engines]
        if missing:
            raise KeyError(f"{type(self).__name__} needs the engines {list(self.models)}; missing {missing}")
        micro = MicroBatches.of(micro_batches)
        reports = {name: EngineReport() for name in self.models}
        before = {name: engines[name].skipped_steps for name in self.models}
        sums: dict[str, Tensor] = {}
        n = 0
        for batch in micro:
            for name, loss, metrics in self.updates(engines, batch, step):
                if poison and name == self.models[0]:
                    loss = loss * float("nan")
                engines[name].backward(loss)
                engines[name].step()
                report = reports[name]
                report.learned = True
                report.nonfinite = _or_nonfinite(report.nonfinite, loss)
                for k, v in metrics.items():
                    v = v.detach().float()
                    sums[k] = sums[k] + v if k in sums else v
            n += 1
        for name, report in reports.items():
            report.skipped = report.learned and engines[name].skipped_steps > before[name]
        return StepReport(metrics={k: v / max(1, n) for k, v in sums.items()}, engines=reports,
                          samples=micro.samples, tokens=micro.tokens, data_wait_s=micro.wait_s, keys=micro.keys)
