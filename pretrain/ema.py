"""The exponential moving average of an engine's trainable weights (:class:`EMA`), sharded like
ZeRO-3 at every stage, saved per rank and loadable at any world size.

It reads each parameter's local ZeRO-3 partition, or a slice of the whole parameter, through
:mod:`pretrain.runtime` (``local_partition``, ``full_numel``, ``full_shape``, ``gathered``,
``consolidated_state_dict``); it never touches DeepSpeed itself. Rows that the runtime wrote
outside the optimizer (dead-code restarts, ``engine.row_writes_applied``) restart in the average.

Model code is single-device code; this module never imports model_zoo.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch

from . import safe_load
from .distributed import rank_world
from .runtime import consolidated_state_dict, full_numel, full_shape, gathered, local_partition

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of an engine's trainable weights, sharded like ZeRO-3.

    Every rank keeps, for each parameter, only its contiguous slice of the flattened tensor:
    elements ``[rank * c, rank * c + c)`` with ``c = ceil(numel / world)``, which is exactly the
    partition ZeRO-3 keeps in ``param.ds_tensor``. Under ZeRO-3 the update reads that local
    partition (no communication at all); under ZeRO-0/1/2 it slices the full local parameter. So
    the EMA costs ``1/world`` of the fp32 weights per rank at every stage, and is consistent by
    construction: the slices of all ranks tile the tensor. Saved per rank with their offsets, it
    loads at any world size (each rank picks the pieces overlapping its new slice).
    """

    def __init__(self, engine, decay: float = 0.9999, warmup: bool = False):
        self.engine, self.decay, self.warmup = engine, float(decay), warmup
        self.num_updates = 0
        self.rank, self.world = rank_world()
        self.params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
        # other names of the same tensors (tied weights), so full_state_dict fills every key
        canonical = {id(p): n for n, p in self.params.items()}
        self.aliases = {n: canonical[id(p)] for n, p in engine.module.named_parameters(remove_duplicate=False)
                        if id(p) in canonical and canonical[id(p)] != n}
        self.shards = {n: self._local(p).float().clone() for n, p in self.params.items()}

    def _bounds(self, numel: int) -> tuple[int, int]:
        chunk = -(-numel // self.world)
        start = min(self.rank * chunk, numel)
        return start, min(chunk, numel - start)

    def _numel(self, p) -> int:
        return full_numel(p)

    def _local(self, p) -> torch.Tensor:
        start, n = self._bounds(self._numel(p))
        part = local_partition(p)
        if part is not None:                             # ZeRO-3: the local partition, padded
            return part.detach().view(-1)[:n]
        return p.detach().reshape(-1)[start:start + n]

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self) -> None:
        """Call after each optimizer step (``engine.is_gradient_accumulation_boundary()``). Rows
        written outside the optimizer since the last update (dead-code restarts, see
        :func:`pretrain.runtime.apply_row_writes`) restart in the average too: it takes their new
        value, rather than a blend of a dead code and its replacement that matches neither."""
        d = self.current_decay()
        for n, p in self.params.items():
            self.shards[n].mul_(d).add_(self._local(p).float(), alpha=1.0 - d)
        for n, mask in getattr(self.engine, "row_writes_applied", {}).items():
            if n in self.shards:
                p = self.params[n]
                shape = full_shape(p)
                per_row = int(torch.Size(shape[1:]).numel())
                start, count = self._bounds(self._numel(p))
                rows = mask.to(self.shards[n].device).repeat_interleave(per_row)[start:start + count]
                self.shards[n].copy_(torch.where(rows, self._local(p).float(), self.shards[n]))
        if hasattr(self.engine, "row_writes_applied"):
            self.engine.row_writes_applied.clear()
        self.num_updates += 1

    # -- save / load (per rank, world-size independent) --
    def state_dict(self) -> dict[str, Any]:
        shards = {}
        for n, p in self.params.items():
            numel = self._numel(p)
            shape = full_shape(p)
            shards[n] = {"start": self._bounds(numel)[0], "numel": numel, "shape": shape,
                         "data": self.shards[n].cpu()}
        return {"decay": self.decay, "num_updates": self.num_updates, "world_size": self.world,
                "rank": self.rank, "shards": shards}

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        torch.save(self.state_dict(), os.path.join(folder, f"rank{self.rank}.pt"))

    def load(self, folder: str) -> None:
        """Load the shards saved by any world size (reads every rank file of ``folder``)."""
        files = sorted(f for f in os.listdir(folder) if f.startswith("rank") and f.endswith(".pt"))
        states = [safe_load.load(os.path.join(folder, f), map_location="cpu") for f in files]
        if not states or len(states) != states[0]["world_size"]:
            raise FileNotFoundError(f"EMA shards in {folder} are incomplete ({len(states)} files)")
        self.num_updates = int(states[0]["num_updates"])
        for n, p in self.params.items():
            start, count = self._bounds(self._numel(p))
            out = self.shards[n]
            filled = 0
            for st in states:
                piece = st["shards"][n]
                lo, hi = max(start, piece["start"]), min(start + count, piece["start"] + piece["data"].numel())
                if hi > lo:
                    out[lo - start:hi - start].copy_(piece["data"][lo - piece["start"]:hi - piece["start"]])
                    filled += hi - lo
            if filled != count:
                raise ValueError(f"EMA shards in {folder} do not cover {n}")

    # -- whole weights --
    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The module state dict with the EMA (fp32) in place of the trainable weights, on every
        rank (a collective: one all_gather of all shards, plus the ZeRO-3 gather of the rest)."""
        import torch.distributed as dist

        full = consolidated_state_dict(self.engine)
        names = list(self.params)
        chunks = [-(-self._numel(self.params[n]) // self.world) for n in names]
        buf = torch.zeros(sum(chunks), dtype=torch.float32)
        off = 0
        for n, c in zip(names, chunks):
            buf[off:off + self.shards[n].numel()] = self.shards[n].cpu()
            off += c
        if self.world > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            parts = [torch.empty_like(buf, device=device) for _ in range(self.world)]
            dist.all_gather(parts, buf.to(device))
            parts = [t.cpu() for t in parts]
        else:
            parts = [buf]
        off = 0
        for n, c in zip(names, chunks):
            numel = self._numel(self.params[n])
            flat = torch.cat([t[off:off + c] for t in parts])[:numel]
            full[n] = flat.view(full[n].shape)          # fp32, whatever the training dtype
            off += c
        for alias, n in self.aliases.items():
            if alias in full:
                full[alias] = full[n]
        return full

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Evaluate with the EMA weights: load them into the module, restore the live ones after
        (a collective; the optimizer's master weights are untouched)."""
        ema = self.full_state_dict()
        live = consolidated_state_dict(self.engine)
        self._write(ema)
        try:
            yield
        finally:
            self._write(live)

    @torch.no_grad()
    def _write(self, full: dict[str, torch.Tensor]) -> None:
        for n, p in self.params.items():
            with gathered([p], modifier_rank=0):
                p.data.copy_(full[n].to(p.device, p.dtype))
