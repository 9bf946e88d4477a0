"""ZeRO scaling on real processes: model-state memory per rank and collective bytes per step.

    python benchmarks/bench_scaling.py [--ranks 1,2,4] [--stages 1,2,3] [--model vim-base-tiny]
                                       [--model-args '{"transformer": {"width": 256}}'] [--small]

Owns the measurement of how DeepSpeed ZeRO (stages 1, 2, 3) divides the model states over N
data-parallel ranks, as vqscale builds its engines (``pretrain.engine.build_engine``, fp32, the
prior objective ``pretrain.objectives.PriorObjective`` on synthetic codes and labels). For each
(stage, N) the parent starts ``python -m torch.distributed.run --nproc-per-node N`` on this file
(``DS_ACCELERATOR=cpu``, gloo, ``OMP_NUM_THREADS=1``); each rank trains ``--warmup`` steps, then one
measured step, and reports:

* memory held by the rank: parameters (ZeRO-3: the partition ``param.ds_tensor`` of each parameter
  plus any whole parameter left resident; ZeRO-1/2: the whole parameters), the optimizer's fp32
  master partition (``single_partition_of_fp32_groups`` / ``fp32_partitioned_groups_flat``) and its
  AdamW state tensors (``exp_avg``, ``exp_avg_sq``, ``step``), the gradient partition held after
  backward, DeepSpeed's gradient bucket buffers (ZeRO-1/2, reported apart: ``torch.empty`` of
  ``reduce_bucket_size`` elements, virtual until touched on CPU), padding, and peak RSS;
* communication: every torch.distributed collective called during the measured step (forward,
  backward, optimizer step) is wrapped to sum its payload bytes per op (all_reduce: the tensor;
  all_gather: the gathered output; reduce_scatter: the input; broadcast/reduce: the tensor) and
  an estimate of the bytes each rank sends under a ring model (all_reduce 2(N-1)/N, the others
  (N-1)/N of the payload). A collective over a 1-rank group moves nothing and counts 0 bytes.

The global batch is ``--micro-batch`` x N (no gradient accumulation: one micro-step per step), so
every rank does the same work at every N. Prints a table and writes JSON (default
``benchmarks/results/bench_scaling.json``) with the environment. No timing is asserted.

Expected physics (checked by tests/test_bench_scaling.py on the ``--small`` run):

* ZeRO-3: parameter and optimizer-state bytes per rank fall as ~1/N;
* ZeRO-1/2: optimizer state (fp32 master + AdamW moments) falls as 1/N, parameters stay whole, so
  the total falls towards the parameter bytes; ZeRO-2 also keeps only a gradient partition;
* ZeRO-3 moves more bytes per step than ZeRO-2: it all-gathers the parameters in forward and again
  in backward and reduce-scatters the gradients (~3x the model), where ZeRO-1/2 reduce the
  gradients and all-gather the updated parameters (~2x the model).
* DeepSpeed pads partitions (ZeRO-3: each parameter to a multiple of N; ZeRO-1/2: each flat group
  to an alignment multiple of N), so a small model deviates from exact 1/N; the padding is reported.

Notes: in fp32 DeepSpeed still keeps a separate fp32 master copy of the partition (a clone of the
fp32 parameters), so ZeRO model states are 16 bytes/param (+4 for gradients), not 12. ZeRO-3 runs
with ``param_persistence_threshold=0`` by default (``--persistence-threshold``): the project default
(100k elements) keeps every parameter of the tiny presets whole on every rank. Every rank builds the
whole model before DeepSpeed partitions it, so peak RSS includes one whole fp32 model.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import glob
import inspect
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "bench_scaling.json")


def parse_stage(spec: str) -> tuple[int, bool]:
    """``"1"``, ``"2"``, ``"3"``: that ZeRO stage as vqscale configures it; ``"3r"``: ZeRO-3 that
    releases every parameter after each use (``stage3_prefetch_bucket_size=0``,
    ``stage3_max_reuse_distance=0``), the regime of a model much larger than those windows."""
    if spec not in ("1", "2", "3", "3r"):
        raise ValueError(f"unknown stage {spec!r}; use 1, 2, 3 or 3r")
    return int(spec[0]), spec == "3r"


# ---- child: counting collectives -------------------------------------------------------------------
def _nbytes(t) -> int:
    return t.numel() * t.element_size() if hasattr(t, "element_size") else 0


def _sum(ts) -> int:
    return sum(_sum(t) if isinstance(t, (list, tuple)) else _nbytes(t) for t in (ts or []))


# op -> (payload bytes from its bound arguments, ring-model fraction of the payload each rank sends)
_ALLREDUCE = lambda n: 2 * (n - 1) / n  # noqa: E731
_RING = lambda n: (n - 1) / n          # noqa: E731
COLLECTIVES = {
    "all_reduce": (lambda a: _nbytes(a["tensor"]), _ALLREDUCE),
    "all_reduce_coalesced": (lambda a: _sum(a["tensors"]), _ALLREDUCE),
    "reduce": (lambda a: _nbytes(a["tensor"]), _RING),
    "broadcast": (lambda a: _nbytes(a["tensor"]), _RING),
    "all_gather": (lambda a: _sum(a["tensor_list"]), _RING),
    "all_gather_into_tensor": (lambda a: _nbytes(a["output_tensor"]), _RING),
    "_all_gather_base": (lambda a: _nbytes(a["output_tensor"]), _RING),
    "all_gather_coalesced": (lambda a: _sum(a["output_tensor_lists"]), _RING),
    "reduce_scatter": (lambda a: _sum(a["input_list"]), _RING),
    "reduce_scatter_tensor": (lambda a: _nbytes(a["input"]), _RING),
    "_reduce_scatter_base": (lambda a: _nbytes(a["input"]), _RING),
    "all_to_all": (lambda a: _sum(a["input_tensor_list"]), _RING),
    "all_to_all_single": (lambda a: _nbytes(a["input"]), _RING),
    "gather": (lambda a: _nbytes(a["tensor"]), _RING),
    "scatter": (lambda a: _nbytes(a["tensor"]), _RING),
}


class CommCounter:
    """Wraps the torch.distributed collectives (both the package and ``distributed_c10d`` names:
    torch's own helpers call the latter) and, while ``active``, sums bytes per op. Installed before
    DeepSpeed starts its comm backend, which captures ``all_gather_into_tensor`` and
    ``reduce_scatter_tensor`` once. Only the outermost wrapped call counts (``_all_gather_base``
    calls ``all_gather_into_tensor`` inside)."""

    def __init__(self):
        self.active, self.depth, self.ops = False, 0, {}

    def install(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name, (payload, fraction) in COLLECTIVES.items():
            orig = getattr(c10d, name, None)
            if orig is None:
                continue
            wrapped = self._wrap(name, orig, payload, fraction)
            setattr(c10d, name, wrapped)
            if getattr(dist, name, None) is orig:
                setattr(dist, name, wrapped)

    def _wrap(self, name, orig, payload, fraction):
        import torch.distributed as dist

        sig = inspect.signature(orig)

        @functools.wraps(orig)
        def call(*args, **kwargs):
            if not self.active or self.depth:
                return orig(*args, **kwargs)
            a = sig.bind(*args, **kwargs).arguments
            n = dist.get_world_size(a.get("group"))
            moved = payload(a) if n > 1 else 0     # a 1-rank group moves nothing
            rec = self.ops.setdefault(name, {"calls": 0, "bytes": 0, "ring_bytes_sent": 0})
            rec["calls"] += 1
            rec["bytes"] += moved
            rec["ring_bytes_sent"] += int(moved * fraction(n)) if n > 1 else 0
            self.depth += 1
            try:
                return orig(*args, **kwargs)
            finally:
                self.depth -= 1

        return call


# ---- child: memory held by the rank ---------------------------------------------------------------
def _tensors(x):
    """Every tensor inside nested dicts/lists/tuples."""
    import torch

    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def _unique_bytes(ts) -> int:
    """Bytes of distinct tensor views (the same view reached twice counts once)."""
    seen = {(t.data_ptr(), t.numel(), t.element_size()) for t in ts if t.numel()}
    return sum(n * e for _, n, e in seen)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def param_memory(engine, world: int) -> dict:
    params = list(engine.module.parameters())
    numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    if engine.zero_optimization_stage() == 3:
        part = sum(p.ds_tensor.numel() for p in params)
        resident = sum(p.data.numel() for p in params)      # released params hold 0 elements here
        held = sum(_nbytes(p.ds_tensor) + _nbytes(p.data) for p in params)
        padding = part * world - numel                     # each param padded to a multiple of N
    else:
        part, resident, padding = numel, numel, 0
        held = sum(_nbytes(p.data) for p in params)
    return {"numel": numel, "partition_numel": part, "resident_numel": resident, "bytes": held,
            "padding_numel_all_ranks": padding}


def optimizer_memory(engine, world: int, trainable: int) -> dict:
    opt = engine.optimizer
    masters = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_partitioned_groups_flat")
    master_numel = sum(t.numel() for t in masters)
    state = list(_tensors(list(opt.optimizer.state.values())))
    return {"master_bytes": _unique_bytes(masters), "state_bytes": _unique_bytes(state),
            "bytes": _unique_bytes(masters) + _unique_bytes(state), "master_numel": master_numel,
            "padding_numel_all_ranks": master_numel * world - trainable}


def grad_memory(engine) -> dict:
    """Gradients held after backward, before the step: the optimizer's reduced partition and any
    ``.grad`` still on the module, without ZeRO-1/2's bucket buffers (reported apart)."""
    import torch

    opt = engine.optimizer
    # ZeRO-1/2 buckets hold a list of buffers, ZeRO-3's one tensor (never iterate a tensor here:
    # unbinding 5e8 elements into Python objects takes tens of GB)
    buckets = list(_tensors([bucket.buffer for bucket in getattr(opt, "ipg_buckets", {}).values()]))
    bucket_storages = {b.untyped_storage().data_ptr() for b in buckets}
    held = list(_tensors(getattr(opt, "averaged_gradients", {})))
    flat = getattr(opt, "grad_partitions_flat_buffer", None)       # ZeRO-3: all grad partitions
    held += [flat] if isinstance(flat, torch.Tensor) else []
    held += [p.grad for p in engine.module.parameters() if p.grad is not None]
    held = [t for t in held if t.untyped_storage().data_ptr() not in bucket_storages]
    if isinstance(flat, torch.Tensor):   # its views (ZeRO-3 averaged_gradients) are inside it
        lo, hi = flat.data_ptr(), flat.data_ptr() + _nbytes(flat)
        held = [t for t in held if t is flat or not lo <= t.data_ptr() < hi]
    return {"bytes": _unique_bytes(held), "bucket_bytes": sum(_nbytes(b) for b in buckets)}


def child(args) -> None:
    counter = CommCounter()
    counter.install()
    import resource

    import torch
    import torch.distributed as dist

    from model_zoo.registry import create_model
    from pretrain.engine import DeepSpeedSettings, OptimConfig, build_engine
    from pretrain.objectives import PriorObjective

    rss_start = _rss_bytes()
    torch.manual_seed(0)
    model = create_model(args.model, **json.loads(args.model_args))
    for attr in ("codebook_size", "num_tokens", "num_classes"):
        if not hasattr(model, attr):
            raise SystemExit(f"{args.model}: not a class-conditional prior (no {attr}); pick a VIM preset")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    stage, release = parse_stage(args.stage)
    settings = DeepSpeedSettings(zero_stage=stage, bf16=False, param_persistence_threshold=args.persistence_threshold)
    if release:   # no prefetch, no reuse window: every submodule's params are freed after each use
        settings = dataclasses.replace(settings, prefetch_bucket_size=0,
                                       passthrough={"zero_optimization": {"stage3_max_reuse_distance": 0}})
    engine = build_engine(model, OptimConfig(total_steps=0), settings, micro_batch_size=args.micro_batch,
                          global_batch_size=args.micro_batch * world)
    rank = dist.get_rank()
    objective = PriorObjective()
    models = {"model": engine}
    gen = torch.Generator().manual_seed(1000 + rank)
    trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters() if p.requires_grad)

    def step(measure: bool) -> dict:
        batch = {"codes": torch.randint(model.codebook_size, (args.micro_batch, model.num_tokens), generator=gen),
                 "label": torch.randint(model.num_classes, (args.micro_batch,), generator=gen)}
        counter.ops, counter.active = {}, measure
        t0 = time.perf_counter()
        loss, _ = objective(models, batch, 0)
        engine.backward(loss)
        grads = grad_memory(engine)
        engine.step()
        counter.active = False
        return {"loss": float(loss.detach()), "seconds": time.perf_counter() - t0, "grads": grads}

    for _ in range(args.warmup):
        step(False)
    measured = step(True)
    result = {
        "rank": rank, "world": world, "stage": args.stage, "loss": measured["loss"], "step_seconds": measured["seconds"],
        "params": param_memory(engine, world), "optimizer": optimizer_memory(engine, world, trainable),
        "grads": measured["grads"], "comm": counter.ops,
        "comm_bytes": sum(r["bytes"] for r in counter.ops.values()),
        "comm_ring_bytes_sent": sum(r["ring_bytes_sent"] for r in counter.ops.values()),
        "rss_start_bytes": rss_start, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "optimizer_class": type(engine.optimizer).__name__,
    }
    with open(os.path.join(args.child_out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


# ---- parent ---------------------------------------------------------------------------------------
def run_config(args, stage: int, n: int) -> dict:
    """One torchrun job of ``n`` ranks at ``stage``; the per-rank results and their worst rank."""
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--rdzv-backend=c10d",
               "--rdzv-endpoint=127.0.0.1:0", os.path.abspath(__file__), "--child-out", tmp, "--stage", str(stage),
               "--model", args.model, "--model-args", args.model_args, "--micro-batch", str(args.micro_batch),
               "--warmup", str(args.warmup), "--persistence-threshold", str(args.persistence_threshold)]
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        # own session: on a time-out the whole job (torchrun and its workers) is killed, not torchrun alone
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"stage {stage}, {n} ranks: no result after {args.timeout} s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"stage {stage}, {n} ranks failed (rc {proc.returncode}):\n{err[-4000:]}")
        ranks = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(tmp, "rank*.json")))]
    if len(ranks) != n:
        raise RuntimeError(f"stage {stage}, {n} ranks: {len(ranks)} results")

    def worst(get):
        return max(get(r) for r in ranks)

    summary = {
        "stage": stage, "ranks": n, "wall_seconds": round(time.perf_counter() - t0, 1),
        "param_bytes": worst(lambda r: r["params"]["bytes"]),
        "optimizer_bytes": worst(lambda r: r["optimizer"]["bytes"]),
        "grad_bytes": worst(lambda r: r["grads"]["bytes"]),
        "bucket_bytes": worst(lambda r: r["grads"]["bucket_bytes"]),
        "comm_bytes": worst(lambda r: r["comm_bytes"]),
        "comm_ring_bytes_sent": worst(lambda r: r["comm_ring_bytes_sent"]),
        "peak_rss_bytes": worst(lambda r: r["peak_rss_bytes"]),
        "param_padding_numel": ranks[0]["params"]["padding_numel_all_ranks"],
        "optimizer_padding_numel": ranks[0]["optimizer"]["padding_numel_all_ranks"],
        "numel": ranks[0]["params"]["numel"],
        "comm_ops": {op: v for op, v in ranks[0]["comm"].items()},
    }
    summary["model_state_bytes"] = summary["param_bytes"] + summary["grad_bytes"] + summary["optimizer_bytes"]
    return {"summary": summary, "per_rank": ranks}


def _mb(b: float) -> str:
    return f"{b / 2**20:9.3f}"


def print_table(rows: list[dict]) -> None:
    base = {r["stage"]: r for r in rows if r["ranks"] == 1}
    head = (f"{'stage':>5} {'N':>2} {'param MiB':>9} {'grad MiB':>9} {'optim MiB':>9} {'total MiB':>9} "
            f"{'ratio':>6} {'1/N':>5} {'comm MiB/step':>13} {'ring sent':>9} {'pad(p/o)':>11} {'peakRSS':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        b = base.get(r["stage"])
        ratio = f"{r['model_state_bytes'] / b['model_state_bytes']:6.3f}" if b else f"{'-':>6}"
        pad = f"{r['param_padding_numel']}/{r['optimizer_padding_numel']}"
        print(f"{r['stage']:>5} {r['ranks']:>2} {_mb(r['param_bytes'])} {_mb(r['grad_bytes'])} "
              f"{_mb(r['optimizer_bytes'])} {_mb(r['model_state_bytes'])} {ratio} {1 / r['ranks']:5.3f} "
              f"{r['comm_bytes'] / 2**20:13.3f} {_mb(r['comm_ring_bytes_sent'])} {pad:>11} "
              f"{r['peak_rss_bytes'] / 2**20:7.0f}M")
    print("\ncollectives of the measured step (rank 0: calls x op = MiB):")
    for r in rows:
        ops = ", ".join(f"{v['calls']}x {op} = {v['bytes'] / 2**20:.3f}" for op, v in sorted(r["comm_ops"].items()))
        print(f"  stage {r['stage']} N={r['ranks']}: {ops or 'none'}")


def environment() -> dict:
    import deepspeed
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": platform.python_version(),
            "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "backend": "gloo", "accelerator": "cpu", "dtype": "fp32"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="1,2,4", help="world sizes, comma separated")
    p.add_argument("--stages", default="1,2,3", help="ZeRO stages, comma separated")
    p.add_argument("--model", default="vim-base-tiny", help="a class-conditional prior of model_zoo.registry")
    p.add_argument("--model-args", default="{}", help="JSON overrides of the preset's config")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (optimizer state, ZeRO-3 trace)")
    p.add_argument("--persistence-threshold", type=int, default=0, help="ZeRO-3 param_persistence_threshold")
    p.add_argument("--small", action="store_true", help="fastest form, for CI: ranks 1,2 and stages 2,3")
    p.add_argument("--timeout", type=float, default=600, help="seconds per torchrun job")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--stage", type=int, help=argparse.SUPPRESS)       # child only
    p.add_argument("--child-out", help=argparse.SUPPRESS)             # child only: per-rank JSON folder
    args = p.parse_args(argv)
    if args.child_out:
        child(args)
        return 0
    if args.small:
        args.ranks, args.stages = "1,2", "2,3"
    ranks = [int(x) for x in args.ranks.split(",")]
    stages = [int(x) for x in args.stages.split(",")]
    results = []
    for stage in stages:
        for n in ranks:
            results.append(run_config(args, stage, n))
            s = results[-1]["summary"]
            print(f"stage {stage} N={n}: done in {s['wall_seconds']} s", file=sys.stderr, flush=True)
    rows = [r["summary"] for r in results]
    print_table(rows)
    report = {"benchmark": "bench_scaling", "environment": environment(),
              "config": {k: v for k, v in vars(args).items() if k not in ("stage", "child_out")},
              "results": rows, "per_rank": [r["per_rank"] for r in results]}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
