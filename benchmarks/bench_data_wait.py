"""Data wait at a GPU's step time: the training loaders feeding a main process that is busy for
as long as an H100 step at the target MFU would take.

    python benchmarks/bench_data_wait.py                 # every config, 2 loader workers, 200 steps
        [--configs vim-base,vim-large,t2i-prior-1b,vit-vqgan-bb] [--workers 2] [--steps 200]
        [--peak-tflops 989] [--small] [--out FILE]

Why this and not bench_train's wait column: on a CPU the training step and the loader workers
share the same cores, so the wait measured there says how a CPU trains, not whether the loader
keeps a GPU fed. A GPU run's main process mostly waits for its device while the workers decode.
Here the step is a sleep of the H100 step time (the training FLOPs per sample counted by
``pretrain/flops.py`` at the micro batch bench_train uses, over the target MFU of the 989 TFLOP/s
bf16 peak: 50% for the priors, 35% for ViT-VQGAN), which leaves the cores to the workers as a
waiting GPU process does. The loaders are the trainer's own (``Trainer._make_loader``'s
``image_loader``/``code_loader`` with the recipe's shuffle buffer and interleave) over synthetic
shards: random 1,024-token code shards with captions for the priors, 320-640 px JPEG photo crops
for the tokenizer (cropped and resized to 256 px in the workers).

Per config it reports the step time simulated, the fraction of the wall time spent in ``next()``
(the target is under 5%), the samples/s needed and delivered, and the main process's receive cost
per batch (the part of the wait that no number of workers removes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_loader import build_dataset  # noqa: E402
from benchmarks.bench_train import CONFIGS, DEFAULT_CONFIGS, _meta_shape, write_codes  # noqa: E402
from benchmarks.report import write_json  # noqa: E402
from pretrain.flops import PEAK_FLOPS, step_flops_per_sample  # noqa: E402

TARGET_MFU = {"prior": 0.50, "tokenizer": 0.35}          # issue 11's targets on one H100
H100 = PEAK_FLOPS["H100"]


def _loader(cfg, data: str, micro: int, workers: int, grid, codebook: int):
    from data_pipeline.codes import code_loader
    from data_pipeline.images import image_loader

    d = cfg.data
    if cfg.stage == "prior":
        return code_loader(data, micro, seed=0, num_workers=workers, shuffle_buffer=d.shuffle_buffer,
                           interleave=d.interleave, codebook_size=codebook, num_tokens=grid[0] * grid[1])
    # uint8 batches, as a GPU run receives them before its on-device float conversion
    from dataclasses import replace

    return image_loader(replace(d, url=data, num_workers=workers, pin_memory=False), micro, seed=0,
                        to_float=False)


def run_config(name: str, args, work: str) -> dict:
    recipe, micro, extra = CONFIGS[name]
    cfg, model = _meta_shape(recipe, extra)
    flops = step_flops_per_sample(cfg)["total"]
    step_s = flops * micro / (TARGET_MFU[cfg.stage] * args.peak_tflops * 1e12)
    warmup = 10
    n = (args.steps + warmup + 8) * micro
    data = os.path.join(work, name)
    per = max(micro, n // max(4, 2 * args.workers))
    grid = tuple(getattr(model, "grid_size", (0, 0)))
    codebook = int(getattr(model, "codebook_size", 0))
    if cfg.stage == "prior":
        write_codes(data, n, grid, codebook, int(getattr(model, "num_classes", 0) or 1000), per)
    else:
        build_dataset(data, n, per_shard=per)
    loader = _loader(cfg, data, micro, args.workers, grid, codebook)
    it = iter(loader)
    for _ in range(warmup):                    # worker start-up and the shuffle buffers' fill
        next(it)
        time.sleep(step_s)
    wait, samples, recv = 0.0, 0, []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        t = time.perf_counter()
        batch = next(it)
        dt = time.perf_counter() - t
        wait += dt
        recv.append(dt)
        samples += len(batch["key"])
        time.sleep(step_s)                     # the device computes; the host waits for it
    wall = time.perf_counter() - t0
    del it, loader
    recv.sort()
    return {"config": name, "recipe": recipe, "stage": cfg.stage, "micro_batch": micro, "workers": args.workers,
            "flops_per_sample": flops, "target_mfu": TARGET_MFU[cfg.stage], "step_time_s": step_s,
            "needed_samples_per_s": micro / step_s, "delivered_samples_per_s": samples / wall,
            "data_wait_fraction": wait / wall, "median_next_ms": 1e3 * recv[len(recv) // 2],
            "p90_next_ms": 1e3 * recv[int(0.9 * (len(recv) - 1))]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated, of: " + ", ".join(CONFIGS))
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (one core each)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--peak-tflops", type=float, default=H100 / 1e12, help="the device's bf16 peak (H100: 989)")
    p.add_argument("--small", action="store_true", help="a short run (CI): 20 steps")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_data_wait.json"))
    args = p.parse_args(argv)
    if args.small:
        args.steps = 20
    names = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="vqs-bench-wait-")
    rows = []
    try:
        for name in names:
            print(f"[bench_data_wait] {name} ...", flush=True)
            rows.append(run_config(name, args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.workers} loader workers; step = counted FLOPs x micro batch / (target MFU x "
          f"{args.peak_tflops:.0f} TFLOP/s)")
    head = ("config", "micro", "step ms", "need/s", "got/s", "wait", "next p50 ms", "next p90 ms")
    print("  ".join(f"{h:>12}" for h in head))
    for r in rows:
        print("  ".join(f"{c:>12}" for c in (
            r["config"][:12], r["micro_batch"], f"{1e3 * r['step_time_s']:.1f}", f"{r['needed_samples_per_s']:.0f}",
            f"{r['delivered_samples_per_s']:.0f}", f"{r['data_wait_fraction']:.1%}", f"{r['median_next_ms']:.2f}",
            f"{r['p90_next_ms']:.2f}")))
    return write_json(args.out, {"workers": args.workers, "steps": args.steps, "peak_tflops": args.peak_tflops,
                                 "rows": rows})


if __name__ == "__main__":
    main()
