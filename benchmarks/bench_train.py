"""Training-step throughput and model FLOPs utilization of the priors and the tokenizers.

    python benchmarks/bench_train.py                       # GPU: the full shapes, bf16
    python benchmarks/bench_train.py --small               # CPU: the -tiny twins (what CI runs)
        [--configs vim-base,vim-large,t2i-prior-1b,vit-vqgan-bb] [--steps 20] [--warmup 5]
        [--micro-batch N] [--peak-tflops 989] [--compile] [--act-ckpt none|full|selective]
        [--workers 4] [--set data.channels_last=false ...] [--ab KEY=VALUE --rounds 3] [--out FILE]

Each config is the project's recipe (VIM-Base and VIM-Large at 32x32 = 1,024 tokens, the 1B
text-conditional prior, ViT-VQGAN-Base at 256 px with its perceptual and adversarial losses and the
StyleGAN2 discriminator on from the first step; ``vqgan-f16``, taming's convolutional VQGAN
with PatchGAN, on request) trained by the real ``Trainer``: DeepSpeed engine, objective, EMA and
the streaming loader over synthetic shards written first (random codes with captions; JPEG photo
crops from the packages' sample images). LPIPS, the text encoder and the tokenizer weights are
random: the FLOPs are the same.

Per config it prints and writes (JSON): step time, images/s, tokens/s, peak memory, the fraction
of the step spent waiting for data, the training FLOPs per sample counted from the shapes
(``pretrain/flops.py``), and MFU against two denominators. One is the datasheet peak (989 TFLOP/s
dense bf16 for an H100 SXM, torchtitan's figure; ``--peak-tflops`` overrides it). The other is the
best square-matmul rate measured on the same device in the same run.

Timing: ``--warmup`` steps first (compilation, allocator, loader start), then ``--steps`` steps
between two device synchronizations. The step loop is the objective's ``train_step`` plus the EMA
update, as in ``Trainer.fit``, without logging and checkpoints.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_loader import build_dataset  # noqa: E402
from benchmarks.report import write_json  # noqa: E402
from data_pipeline.codes import CodeShardWriter, write_code_manifest  # noqa: E402
from pretrain.config import apply_overrides  # noqa: E402
from pretrain.flops import matmul_peak, peak_flops, step_flops_per_sample  # noqa: E402
from pretrain.recipes import get_recipe  # noqa: E402

# config -> (recipe, micro batch on a GPU, overrides); the -tiny twin is used with --small. The
# micro batches fit an 80 GB GPU without activation checkpointing by benchmarks/bench_memory.py's
# count (bf16 activations: VIM-Base 4.9 GB per sample, VIM-Large 13 GB, the 1B text prior 5.5 GB,
# ViT-VQGAN-Base 3 GB without its losses); raise them with --act-ckpt selective|full.
CONFIGS = {
    "vim-base": ("vim-base", 8, []),
    "vim-large": ("vim-large", 2, []),
    "t2i-prior-1b": ("t2i-prior-1b", 8, ['model.text_encoder_overrides={"pretrained": false}']),
    "vit-vqgan-bb": ("vit-vqgan-bb", 8, ["tokenizer_loss.perceptual_pretrained=false"]),
    # taming's convolutional VQGAN with PatchGAN: where the conv layout (data.channels_last) tells
    "vqgan-f16": ("vqgan-f16", 8, ["tokenizer_loss.perceptual_pretrained=false"]),
}
DEFAULT_CONFIGS = ("vim-base", "vim-large", "t2i-prior-1b", "vit-vqgan-bb")


def write_codes(root: str, n: int, grid: tuple[int, int], codebook: int, classes: int, per: int,
                seed: int = 0, kept: int | None = None) -> str:
    """Random code shards of ``per`` samples with labels and captions (what a tokenize job writes);
    ``kept``: a masked tokenizer's codes (MQ-VAE, Stackformer's input), that many sorted positions each."""
    rng = np.random.default_rng(seed)
    entries = []
    ntok = kept or grid[0] * grid[1]
    for s in range(0, n, per):
        w = CodeShardWriter(root, f"codes-{s // per:06d}.tar", codebook_size=codebook, grid_size=grid)
        for i in range(s, min(n, s + per)):
            codes = rng.integers(0, codebook, ntok).astype(np.int32)
            pos = None if kept is None else np.sort(rng.choice(grid[0] * grid[1], kept, replace=False)).astype(np.int32)
            w.write(f"{i:08d}", codes, positions=pos, label=int(rng.integers(classes)),
                    caption=f"a photo of thing {i % 97}")
        entries.append(w.close())
    write_code_manifest(root, entries, "synthetic", "0" * 64, grid, codebook, ntok)
    return root


def _meta_shape(recipe: str, overrides: list[str]):
    from pretrain.models import model_from_config

    cfg = apply_overrides(get_recipe(recipe), overrides)
    with torch.device("meta"):
        return cfg, model_from_config(cfg)


def _run_config(name: str, args, work: str, device: torch.device, matmul: dict, peak: float | None,
                variant: list[str], tag: str) -> dict:
    recipe, micro, extra = CONFIGS[name]
    if args.small:
        recipe, micro = recipe + "-tiny", 4
    micro = args.micro_batch or micro
    cfg, model = _meta_shape(recipe, extra)
    total = (args.warmup + args.steps) * micro + micro * 8          # the loader never runs dry
    data = os.path.join(work, name + "-data")
    per = max(1, total // max(4, 2 * args.workers))          # enough shards for every loader worker
    if not os.path.isdir(data):                                # A/B rounds reuse the data
        if cfg.stage == "prior":
            write_codes(data, total, tuple(model.grid_size), int(model.codebook_size),
                        int(getattr(model, "num_classes", 0) or 1000), per)
        else:
            build_dataset(data, total, per_shard=per)
    sets = extra + [
        f"run_dir={os.path.join(work, name + '-run-' + tag)}", f"data.url={data}", f"steps={args.warmup + args.steps}",
        f"global_batch_size={micro}", f"micro_batch_size={micro}", f"data.num_workers={args.workers}",
        "validation.every=0", "validation.visuals_every=0", "log.progress=false",
        f"compile={str(args.compile).lower()}",
        f"deepspeed.activation_checkpointing={'false' if args.act_ckpt == 'none' else args.act_ckpt}"]
    if cfg.stage == "tokenizer":
        # all losses on from the first step (taming's recipes start the GAN term at step 250,001)
        sets += [f"data.resolution={model.image_size}", "discriminator.start_step=0"]
    cfg = apply_overrides(cfg, sets + list(args.set) + variant)
    from pretrain.trainer import Trainer

    trainer = Trainer(cfg, progress=False)
    trainer.step, trainer.samples_seen, trainer.last_checkpoint = 0, 0, None     # as fit() starts
    trainer._setup()
    batches = trainer._batches()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    from pretrain.step import MicroBatches

    def step() -> dict:
        report = trainer.objective.train_step(trainer.engines, MicroBatches(batches, trainer.gas), trainer.step)
        trainer.step += 1
        if trainer.guard.observe(trainer.step, report):
            for ema in trainer.emas.values():
                ema.update()
        disc = report.engines.get("discriminator")
        return {"wait": report.data_wait_s, "samples": report.samples, "tokens": report.tokens,
                "disc_ran": bool(disc is not None and disc.learned), "metrics": report.metrics}

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    wait, samples, tokens, disc_steps = 0.0, 0, 0, 0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        info = step()
        wait, samples, tokens = wait + info["wait"], samples + info["samples"], tokens + info["tokens"]
        disc_steps += bool(info.get("disc_ran"))
    sync()
    wall = time.perf_counter() - t0
    # what stays allocated between steps (weights, master copy, optimizer state): with the peak, the
    # memory a larger micro batch needs (benchmarks/gpu_check.py sizes the batch that fills the GPU)
    resting = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None
    flops = step_flops_per_sample(cfg, trainer.derived)
    achieved = flops["total"] * samples / wall
    row = {"config": name, "recipe": recipe, "stage": cfg.stage, "micro_batch": micro,
           "parameters": int(sum(p.numel() for p in model.parameters())),
           "bf16": bool(trainer.engine.bfloat16_enabled()), "compile": args.compile, "act_ckpt": args.act_ckpt,
           "overrides": list(args.set) + variant, "variant": " ".join(variant) or "base",
           "discriminator_steps": disc_steps, "channels_last": bool(cfg.data.channels_last),
           "step_time_s": wall / args.steps, "images_per_s": samples / wall,
           "tokens_per_s": tokens / wall if tokens else None, "data_wait_fraction": wait / wall,
           "flops_per_sample": flops, "achieved_tflops": achieved / 1e12,
           "mfu_vs_peak": achieved / peak if peak else None, "mfu_vs_matmul": achieved / matmul["flops"],
           "peak_memory_gb": (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
                              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20),
           "memory_kind": "cuda max allocated" if device.type == "cuda" else "host max RSS (whole process)",
           "resting_memory_gb": resting}
    return row


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help="comma-separated, of: " + ", ".join(CONFIGS) + " (default: all but vqgan-f16)")
    p.add_argument("--small", action="store_true", help="the -tiny twins at micro batch 4 (CPU, CI)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--micro-batch", type=int, default=0, help="override the per-config micro batch")
    p.add_argument("--workers", type=int, default=4, help="loader worker processes")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="MFU denominator; default the GPU's datasheet bf16 peak (989 on an H100)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (DeepSpeed engine.compile)")
    p.add_argument("--act-ckpt", default="none", choices=["none", "full", "selective"],
                   help="activation checkpointing of the blocks (benchmarks/bench_memory.py: what each saves)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a run-config override for every config, as `vqscale train --set` takes it "
                        "(e.g. data.channels_last=false)")
    p.add_argument("--ab", action="append", default=[], metavar="KEY=VALUE",
                   help="A/B: run every config also with this override (repeat for several in one variant), "
                        "alternating with the base run --rounds times, and print the speed ratio")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of each config (best kept)")
    p.add_argument("--work", default="", help="folder for the synthetic data and runs (default: a temp folder)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_train.json"))
    args = p.parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from pretrain.distributed import init_distributed

    init_distributed(timeout_s=600)
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().device_name())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    matmul = matmul_peak(device, dtype)
    peak = peak_flops(device, args.peak_tflops or None)
    work = args.work or tempfile.mkdtemp(prefix="vqs-bench-train-")
    rows = []
    variants = [[]] + ([list(args.ab)] if args.ab else [])
    try:
        for name in names:
            for rnd in range(args.rounds):
                # base and variant alternate, so drifts of a shared machine hit both alike
                for v, variant in enumerate(variants):
                    print(f"[bench_train] {name} {' '.join(variant) or 'base'} (round {rnd + 1}) ...", flush=True)
                    rows.append(_run_config(name, args, work, device, matmul, peak, variant, f"{rnd}-{v}"))
                    gc.collect()                 # the config's engines go before the next one is built
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"\ndevice {dev_name}; best {matmul['dtype']} matmul {matmul['flops'] / 1e12:.2f} TFLOP/s "
          f"(n={matmul['n']}); datasheet peak {_fmt(peak and peak / 1e12, '.0f')} TFLOP/s")
    head = ("config", "variant", "step s", "img/s", "tok/s", "GFLOP/img", "TFLOP/s", "MFU peak", "MFU matmul", "mem GB", "wait")
    print("  ".join(f"{h:>10}" for h in head))
    for r in rows:
        print("  ".join(f"{c:>10}" for c in (
            r["config"][:10], r["variant"][:10], _fmt(r["step_time_s"], ".3f"), _fmt(r["images_per_s"], ".1f"),
            _fmt(r["tokens_per_s"], ".0f"), _fmt(r["flops_per_sample"]["total"] / 1e9, ".1f"),
            _fmt(r["achieved_tflops"], ".3f"), _fmt(r["mfu_vs_peak"], ".1%"), _fmt(r["mfu_vs_matmul"], ".1%"),
            _fmt(r["peak_memory_gb"], ".1f"), _fmt(r["data_wait_fraction"], ".1%"))))
    ab = {}
    if args.ab:
        best = {}
        for r in rows:
            key = (r["config"], r["variant"])
            best[key] = max(best.get(key, 0.0), r["images_per_s"])
        label = " ".join(args.ab)
        ab = {name: best[name, label] / best[name, "base"] for name in names}
        print(f"\nA/B, best of {args.rounds} round(s), images/s with {label} over without:")
        for name, ratio in ab.items():
            print(f"  {name:>14}  {ratio:.3f}x")
    return write_json(args.out, {"device": dev_name, "device_type": device.type, "small": args.small,
                                 "steps": args.steps, "warmup": args.warmup, "matmul": matmul, "peak_flops": peak,
                                 "rounds": args.rounds, "ab": {"overrides": list(args.ab), "speedup": ab},
                                 "rows": rows})


if __name__ == "__main__":
    main()
