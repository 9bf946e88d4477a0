"""ZeRO scaling on real processes: model-state memory per rank and collective bytes per step.

    python benchmarks/bench_scaling.py [--ranks 1,2,4] [--stages 1,2,3,3r] [--model vim-base-tiny]
        [--model-args '{"transformer": {"width": 256, "mlp_dim": 1024}}'] [--ds-config JSON] [--small]

Owns the measurement of how DeepSpeed ZeRO divides the model states over N data-parallel ranks
when vqscale builds the engine (``pretrain.runtime.build_engine``, fp32, the prior objective
``pretrain.objectives.PriorObjective`` on random codes and labels). For each (stage, N) the parent
starts ``python -m torch.distributed.run --nproc-per-node N`` on this file (``DS_ACCELERATOR=cpu``,
gloo, ``OMP_NUM_THREADS=1``); each rank trains ``--warmup`` steps, then one measured step, and
writes what it holds and what it sent:

* memory: parameters (ZeRO-3: each parameter's partition ``ds_tensor`` plus any whole parameter
  left resident; ZeRO-1/2: the whole parameters), the optimizer's fp32 master partition
  (``single_partition_of_fp32_groups`` / ``fp32_partitioned_groups_flat``) and AdamW state
  (``exp_avg``, ``exp_avg_sq``, ``step``), the gradients held after backward, DeepSpeed's gradient
  bucket buffers (apart: ``torch.empty`` of ``reduce_bucket_size`` elements, virtual until touched
  on CPU), the padding of the partitions, and peak RSS (and its growth after imports);
* communication: the torch.distributed collectives are wrapped, and during the measured step
  (forward, backward, optimizer step) each call adds its payload per op (all_reduce, broadcast,
  reduce: the tensor; all_gather: the gathered output; reduce_scatter: the input) and the bytes
  each rank sends under a ring model (all_reduce 2(N-1)/N of the payload, the others (N-1)/N).
  A collective over a 1-rank group moves nothing and counts 0.

Stages: ``1``, ``2``, ``3`` as vqscale configures them; ``3r`` is ZeRO-3 with no prefetch and no
reuse window, so every parameter is freed after each use and gathered again in backward: what a
model far larger than DeepSpeed's windows (1e9 elements reuse distance, 5e7 prefetch) sees. The
global batch is ``--micro-batch`` x N (one micro-step per step): every rank does the same work at
every N. Prints a table and writes JSON (``benchmarks/results/bench_scaling.json``) with the
environment. Nothing is timed against a target; tests/test_bench_scaling.py checks the physics.

Expected physics (Psi = fp32 model bytes):

* ZeRO-3: parameter, gradient and optimizer bytes per rank all fall as ~1/N;
* ZeRO-1/2: optimizer state (fp32 master + AdamW moments = 3 Psi) falls as 1/N, parameters stay
  whole, so model states fall from 5 Psi to Psi + 4 Psi/N (0.6 at N=2), not 1/N;
* per step ZeRO-1/2 move 2 Psi of payload (gradient reduction + all-gather of the updated
  parameters) and ZeRO-3r 3 Psi (parameter all-gathers in forward and in backward + gradient
  reduce-scatter). Plain ``3`` on a small model gathers only once: the prefetcher fetches the
  backward uses ahead and the reuse window keeps them, so it moves 2 Psi like ZeRO-2;
* DeepSpeed pads partitions (ZeRO-3: each parameter to a multiple of N; ZeRO-1/2: each flat group
  to a multiple of 2N), so a small model deviates from exact 1/N; ``pad`` counts those elements.

DeepSpeed 0.19.8 quirks this measures: in fp32 it still keeps a separate fp32 master copy (a clone
of the fp32 parameters), so model states are 20 bytes/param, not 16; ZeRO-1/2 all-reduce the whole
gradient bucket (``use_multi_rank_bucket_allreduce``, on by default) and keep their slice, sending
2 Psi (N-1)/N where a reduce to the owner sends Psi (N-1)/N (``--ds-config '{"zero_optimization":
{"use_multi_rank_bucket_allreduce": false}}'``); with accumulation 1, ZeRO-1 behaves as ZeRO-2.
ZeRO-3 runs with ``param_persistence_threshold=0`` (``--persistence-threshold``): vqscale's
default (100k elements) keeps every parameter of the tiny presets whole on every rank. Every rank
builds the whole model before DeepSpeed partitions it, so peak RSS includes one whole fp32 model.
"""

from __future__ import annotations

import argparse
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
    """``"1"``/``"2"``/``"3"`` -> (stage, False); ``"3r"`` -> (3, True): ZeRO-3 releasing after each use."""
    if spec not in ("1", "2", "3", "3r"):
        raise ValueError(f"unknown stage {spec!r}; use 1, 2, 3 or 3r")
    return int(spec[0]), spec == "3r"


# ---- child: counting collectives -------------------------------------------------------------------
def _nbytes(t) -> int:
    return t.numel() * t.element_size() if hasattr(t, "element_size") else 0


def _sum(ts) -> int:
    return sum(_sum(t) if isinstance(t, (list, tuple)) else _nbytes(t) for t in (ts or []))


def _allreduce(n: int) -> float:
    return 2 * (n - 1) / n


def _ring(n: int) -> float:
    return (n - 1) / n


# op -> (payload bytes from its bound arguments, ring-model fraction of the payload each rank sends)
COLLECTIVES = {
    "all_reduce": (lambda a: _nbytes(a["tensor"]), _allreduce),
    "all_reduce_coalesced": (lambda a: _sum(a["tensors"]), _allreduce),
    "reduce": (lambda a: _nbytes(a["tensor"]), _ring),
    "broadcast": (lambda a: _nbytes(a["tensor"]), _ring),
    "all_gather": (lambda a: _sum(a["tensor_list"]), _ring),
    "all_gather_into_tensor": (lambda a: _nbytes(a["output_tensor"]), _ring),
    "_all_gather_base": (lambda a: _nbytes(a["output_tensor"]), _ring),
    "all_gather_coalesced": (lambda a: _sum(a["output_tensor_lists"]), _ring),
    "reduce_scatter": (lambda a: _sum(a["input_list"]), _ring),
    "reduce_scatter_tensor": (lambda a: _nbytes(a["input"]), _ring),
    "_reduce_scatter_base": (lambda a: _nbytes(a["input"]), _ring),
    "all_to_all": (lambda a: _sum(a["input_tensor_list"]), _ring),
    "all_to_all_single": (lambda a: _nbytes(a["input"]), _ring),
    "gather": (lambda a: _nbytes(a["tensor"]), _ring),
    "scatter": (lambda a: _nbytes(a["tensor"]), _ring),
}


class CommCounter:
    """Wraps the torch.distributed collectives under both names (``torch.distributed.X`` and
    ``distributed_c10d.X``, which torch's own helpers call) and, while ``active``, sums bytes per
    op. Installed before DeepSpeed starts its comm backend, which keeps references to
    ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` from then on. Only the outermost
    wrapped call counts (``_all_gather_base`` calls ``all_gather_into_tensor`` inside)."""

    def __init__(self):
        self.active, self.depth, self.ops = False, 0, {}

    def install(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name, (payload, fraction) in COLLECTIVES.items():
            orig = getattr(c10d, name, None)
            if orig is not None:
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
            moved = payload(a) if n > 1 else 0          # a 1-rank group moves nothing
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
    """Every tensor inside nested dicts/lists/tuples. Never iterates a tensor itself: unbinding
    ZeRO-3's 5e8-element bucket into Python objects takes tens of GB."""
    import torch

    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (dict, list, tuple)):
        for v in (x.values() if isinstance(x, dict) else x):
            yield from _tensors(v)


def _unique_bytes(ts) -> int:
    """Bytes of the distinct tensor views (the same view reached twice counts once)."""
    return sum(n * e for _, n, e in {(t.data_ptr(), t.numel(), t.element_size()) for t in ts if t.numel()})


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def param_memory(engine, world: int) -> dict:
    params = list(engine.module.parameters())
    numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    if engine.zero_optimization_stage() == 3:
        part = sum(p.ds_tensor.numel() for p in params)
        resident = sum(p.data.numel() for p in params)      # a released parameter holds 0 elements
        held = sum(_nbytes(p.ds_tensor) + _nbytes(p.data) for p in params)
        padding = part * world - numel
    else:
        part, resident, padding, held = numel, numel, 0, sum(_nbytes(p.data) for p in params)
    return {"numel": numel, "partition_numel": part, "resident_numel": resident, "bytes": held,
            "padding_numel_all_ranks": padding}


def optimizer_memory(engine, world: int) -> dict:
    opt = engine.optimizer
    masters = getattr(opt, "single_partition_of_fp32_groups", None) or opt.fp32_partitioned_groups_flat
    state = list(_tensors(list(opt.optimizer.state.values())))
    trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters() if p.requires_grad)
    master_numel = sum(t.numel() for t in masters)
    return {"master_bytes": _unique_bytes(masters), "state_bytes": _unique_bytes(state),
            "bytes": _unique_bytes(masters) + _unique_bytes(state), "master_numel": master_numel,
            "padding_numel_all_ranks": master_numel * world - trainable}


def grad_memory(engine) -> dict:
    """Gradients held after backward, before the step: the optimizer's reduced partition and any
    ``.grad`` still on the module, without the bucket buffers (reported apart)."""
    import torch

    opt = engine.optimizer
    buckets = list(_tensors([b.buffer for b in getattr(opt, "ipg_buckets", {}).values()]))
    in_bucket = {b.untyped_storage().data_ptr() for b in buckets}
    held = list(_tensors(getattr(opt, "averaged_gradients", {})))
    held += [p.grad for p in engine.module.parameters() if p.grad is not None]
    flat = getattr(opt, "grad_partitions_flat_buffer", None)      # ZeRO-3: every grad partition
    if isinstance(flat, torch.Tensor):                             # (averaged_gradients are views)
        held = [flat] + [t for t in held if t.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()]
    held = [t for t in held if t.untyped_storage().data_ptr() not in in_bucket]
    return {"bytes": _unique_bytes(held), "bucket_bytes": sum(_nbytes(b) for b in buckets)}


def child(args) -> None:
    counter = CommCounter()
    counter.install()
    import resource

    import deepspeed  # noqa: F401  (imported before the RSS baseline)
    import torch
    import torch.distributed as dist

    from model_zoo.registry import create_model
    from pretrain.objectives import PriorObjective
    from pretrain.optim import OptimConfig
    from pretrain.runtime import DeepSpeedSettings, build_engine

    rss_start = _rss_bytes()
    torch.manual_seed(0)
    model = create_model(args.model, **json.loads(args.model_args))
    for attr in ("codebook_size", "num_tokens", "num_classes"):
        if not hasattr(model, attr):
            raise SystemExit(f"{args.model}: not a class-conditional prior (no {attr}); pick a VIM preset")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    stage, release = parse_stage(args.stage)
    passthrough = json.loads(args.ds_config)
    if release:
        passthrough.setdefault("zero_optimization", {})["stage3_max_reuse_distance"] = 0
    settings = DeepSpeedSettings(zero_stage=stage, bf16=False, param_persistence_threshold=args.persistence_threshold,
                                 prefetch_bucket_size=0 if release else DeepSpeedSettings.prefetch_bucket_size,
                                 passthrough=passthrough)
    engine = build_engine(model, OptimConfig(total_steps=0), settings, micro_batch_size=args.micro_batch,
                          global_batch_size=args.micro_batch * world)
    rank = dist.get_rank()
    objective, models = PriorObjective(), {"model": engine}
    gen = torch.Generator().manual_seed(1000 + rank)

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
        return {"loss": float(loss.detach()), "step_seconds": time.perf_counter() - t0, "grads": grads}

    for _ in range(args.warmup):      # the optimizer state exists and ZeRO-3 has traced the modules
        step(False)
    result = {"rank": rank, "world": world, "stage": stage, "release": release, **step(True),
              "params": param_memory(engine, world), "optimizer": optimizer_memory(engine, world),
              "comm": counter.ops, "comm_bytes": sum(r["bytes"] for r in counter.ops.values()),
              "comm_ring_bytes_sent": sum(r["ring_bytes_sent"] for r in counter.ops.values()),
              "rss_start_bytes": rss_start, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "optimizer_class": type(engine.optimizer).__name__}
    with open(os.path.join(args.child_out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


# ---- parent ---------------------------------------------------------------------------------------
def run_config(args, spec: str, n: int) -> dict:
    """One torchrun job of ``n`` ranks at stage ``spec``: its per-rank results and a summary (the
    worst rank of each quantity)."""
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--rdzv-backend=c10d",
               "--rdzv-endpoint=127.0.0.1:0", os.path.abspath(__file__), "--child-out", tmp, "--stage", spec,
               "--model", args.model, "--model-args", args.model_args, "--micro-batch", str(args.micro_batch),
               "--warmup", str(args.warmup), "--persistence-threshold", str(args.persistence_threshold),
               "--ds-config", args.ds_config]
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        # its own session, so that a time-out kills torchrun's workers too, not torchrun alone
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"stage {spec}, {n} ranks: no result after {args.timeout} s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"stage {spec}, {n} ranks failed (rc {proc.returncode}):\n{err[-4000:]}")
        ranks = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(tmp, "rank*.json")))]
    if len(ranks) != n:
        raise RuntimeError(f"stage {spec}, {n} ranks: {len(ranks)} results")
    worst = {k: max(get(r) for r in ranks) for k, get in {
        "param_bytes": lambda r: r["params"]["bytes"], "grad_bytes": lambda r: r["grads"]["bytes"],
        "optimizer_bytes": lambda r: r["optimizer"]["bytes"], "bucket_bytes": lambda r: r["grads"]["bucket_bytes"],
        "comm_bytes": lambda r: r["comm_bytes"], "comm_ring_bytes_sent": lambda r: r["comm_ring_bytes_sent"],
        "peak_rss_bytes": lambda r: r["peak_rss_bytes"],
        "rss_growth_bytes": lambda r: r["peak_rss_bytes"] - r["rss_start_bytes"]}.items()}
    r0 = ranks[0]
    summary = {"spec": spec, "stage": r0["stage"], "release": r0["release"], "ranks": n,
               "wall_seconds": round(time.perf_counter() - t0, 1), "numel": r0["params"]["numel"], **worst,
               "model_state_bytes": worst["param_bytes"] + worst["grad_bytes"] + worst["optimizer_bytes"],
               "param_padding_numel": r0["params"]["padding_numel_all_ranks"],
               "optimizer_padding_numel": r0["optimizer"]["padding_numel_all_ranks"], "comm_ops": r0["comm"]}
    return {"summary": summary, "per_rank": ranks}


def add_ratios(rows: list[dict]) -> None:
    """Each row's bytes over the same stage's N=1 row (absent without one), and the ideal 1/N."""
    base = {r["spec"]: r for r in rows if r["ranks"] == 1}
    for r in rows:
        r["ideal_ratio"] = 1 / r["ranks"]
        b = base.get(r["spec"])
        if b:
            r["ratio_to_n1"] = {k: r[f"{k}_bytes"] / b[f"{k}_bytes"] if b[f"{k}_bytes"] else None
                                for k in ("param", "grad", "optimizer", "model_state")}


def print_table(rows: list[dict]) -> None:
    def mib(b: float, w: int = 9) -> str:
        return f"{b / 2**20:{w}.3f}"

    head = (f"{'stage':>5} {'N':>2} {'param MiB':>9} {'grad MiB':>9} {'optim MiB':>9} {'total MiB':>9} "
            f"{'ratio':>6} {'1/N':>5} {'comm MiB/step':>13} {'ring sent':>9} {'pad p/o':>9} {'RSS MiB':>8} {'+RSS':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = f"{r['ratio_to_n1']['model_state']:6.3f}" if "ratio_to_n1" in r else f"{'-':>6}"
        pad = f"{r['param_padding_numel']}/{r['optimizer_padding_numel']}"
        print(f"{r['spec']:>5} {r['ranks']:>2} {mib(r['param_bytes'])} {mib(r['grad_bytes'])} "
              f"{mib(r['optimizer_bytes'])} {mib(r['model_state_bytes'])} {ratio} {r['ideal_ratio']:5.3f} "
              f"{mib(r['comm_bytes'], 13)} {mib(r['comm_ring_bytes_sent'])} {pad:>9} "
              f"{r['peak_rss_bytes'] / 2**20:8.0f} {r['rss_growth_bytes'] / 2**20:6.0f}")
    print("\nper rank, worst rank; total = param + grad + optim; ratio = total / total at N=1; comm = payload "
          "of the collectives of one step, ring sent = bytes a rank sends (ring model); pad = padding elements "
          "(params / optimizer partition) over all ranks; +RSS = peak RSS minus RSS after imports")
    print("\ncollectives of the measured step (rank 0: calls x op = MiB):")
    for r in rows:
        ops = ", ".join(f"{v['calls']}x {op} = {v['bytes'] / 2**20:.3f}" for op, v in sorted(r["comm_ops"].items()))
        print(f"  stage {r['spec']} N={r['ranks']}: {ops or 'none'}")


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
    p.add_argument("--stages", default="1,2,3,3r", help="ZeRO stages, comma separated (3r: ZeRO-3 releasing "
                   "every parameter after each use)")
    p.add_argument("--model", default="vim-base-tiny", help="a class-conditional prior of model_zoo.registry")
    p.add_argument("--model-args", default="{}", help="JSON overrides of the preset's config")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps before the measured one")
    p.add_argument("--persistence-threshold", type=int, default=0, help="ZeRO-3 param_persistence_threshold")
    p.add_argument("--ds-config", default="{}", help="JSON deep-merged into the DeepSpeed config (passthrough)")
    p.add_argument("--small", action="store_true", help="fastest form, for CI: ranks 1,2 and stages 2,3,3r")
    p.add_argument("--timeout", type=float, default=600, help="seconds per torchrun job")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON report path")
    p.add_argument("--stage", help=argparse.SUPPRESS)         # child only
    p.add_argument("--child-out", help=argparse.SUPPRESS)     # child only: folder of the per-rank JSON
    args = p.parse_args(argv)
    if args.child_out:
        child(args)
        return 0
    if args.small:
        args.ranks, args.stages = "1,2", "2,3,3r"
    ranks = [int(x) for x in args.ranks.split(",")]
    stages = args.stages.split(",")
    for spec in stages:
        parse_stage(spec)
    results = []
    for spec in stages:
        for n in ranks:
            results.append(run_config(args, spec, n))
            print(f"stage {spec} N={n}: {results[-1]['summary']['wall_seconds']} s", file=sys.stderr, flush=True)
    rows = [r["summary"] for r in results]
    add_ratios(rows)
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
