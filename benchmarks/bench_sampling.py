"""VIM sampling throughput with and without the KV cache.

    python benchmarks/bench_sampling.py [--preset vim-small] [--depth 2] [--batch 1] [--tokens 1024]
                                        [--cfg 1.0] [--device cuda|cpu] [--repeats 3]

Generates ``--tokens`` codes per sample (1024 = the 32x32 grid of a 256 px ViT-VQGAN image) with
``VIM.generate``, once with the KV cache (prefill the class token, then one token per step) and
once recomputing the whole prefix at every step (``use_cache=False``, the O(N^2) reference).
Both runs use the same per-sample seeds, so they must produce the same codes; the benchmark
checks that too. The default is vim-small's width (768, 12 heads, MLP 3072, codebook 8192)
at depth 2 so that the uncached run finishes in a few minutes on 2 CPU cores; on a GPU pass
``--depth 12`` for the full vim-small. Rates are samples x tokens per second of wall time
(after one warm-up run of the cached path, which also warms the kernels the uncached path uses).

Then, with the cache only, images/s at each batch of ``--sweep-batches`` (default 1, 16, 64),
and, with ``--tokenize PRESET``, the ``vqscale tokenize`` job's images/s: a package of that
tokenizer preset (random weights) over JPEG photo crops at its resolution, through the real job
(loader, encode, code shards, manifest).

Prints tables and the speed-up (target: cache >= 10x at 1024 tokens) and writes JSON to
``benchmarks/results/bench_sampling.json``. ``--small``: depth 1, 256 tokens, batches 1 and 4, the
tiny tokenizer: the reduced form CI runs.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model_zoo.vim  # noqa: E402,F401  (registers the vim presets)
from benchmarks.report import write_json  # noqa: E402
from model_zoo.registry import create_model  # noqa: E402
from model_zoo.sampling import SamplingConfig, sample_seeds  # noqa: E402


def _grid(tokens: int) -> tuple[int, int]:
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else (1, tokens)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(model, batch: int, cfg: SamplingConfig, device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    labels = torch.arange(batch, device=device) % model.num_classes
    seeds = sample_seeds(0, torch.arange(batch))
    best, codes = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        codes = model.generate(labels, batch, cfg, seeds)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, codes


def sweep(model, batches: list[int], cfg: SamplingConfig, device: torch.device, repeats: int) -> list[dict]:
    rows = []
    for b in batches:
        t, _ = run(model, b, cfg, device, repeats)
        rows.append({"batch": b, "seconds": t, "images_per_s": b / t, "tokens_per_s": b * model.num_tokens / t})
        print(f"batch {b:>4}: {t:8.2f} s  {b / t:8.2f} images/s  {b * model.num_tokens / t:10.1f} tokens/s")
    return rows


def tokenize_rate(preset: str, images: int, device: torch.device) -> dict:
    """The tokenize job's own images/s on synthetic photos (random-weight package of ``preset``)."""
    import shutil
    import tempfile

    from benchmarks.bench_loader import build_dataset
    from model_zoo.package import save_package
    from pretrain.tokenize_job import run_tokenize

    work = tempfile.mkdtemp(prefix="vqs-bench-tok-")
    try:
        torch.manual_seed(0)
        tok = create_model(preset)
        pkg = save_package(tok, os.path.join(work, "tok"))
        build_dataset(os.path.join(work, "data"), images, per_shard=128)
        s = run_tokenize(pkg, os.path.join(work, "data"), os.path.join(work, "codes"), batch_size=32,
                         device=device.type, progress=False)
        return {"preset": preset, "resolution": int(tok.image_size), "images": s["samples"],
                "images_per_s": s["images_per_s"], "device": str(device)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="vim-small")
    ap.add_argument("--depth", type=int, default=2, help="override the preset's depth (0 = keep it)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=1024, help="codes per sample (a square number -> square grid)")
    ap.add_argument("--cfg", type=float, default=1.0, help="guidance scale (!= 1 doubles the rows)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of the cached path (best is kept)")
    ap.add_argument("--sweep-batches", default="1,16,64", help="batches timed with the cache (images/s)")
    ap.add_argument("--tokenize", default="", help="also time the tokenize job with this tokenizer preset "
                                                   "(e.g. vit-vqgan-bb; random weights)")
    ap.add_argument("--tokenize-images", type=int, default=512)
    ap.add_argument("--small", action="store_true", help="a fast reduced form (CI)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "bench_sampling.json"))
    args = ap.parse_args(argv)
    if args.small:
        args.depth, args.tokens, args.sweep_batches, args.repeats = 1, 256, "1,4", 1
        args.tokenize, args.tokenize_images = args.tokenize or "vit-vqgan-ss-tiny", 64

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"grid_size": _grid(args.tokens)}
    if args.depth:
        overrides["transformer"] = {"depth": args.depth}
    torch.manual_seed(0)
    with torch.device(device):
        model = create_model(args.preset, **overrides)
    model = model.to(getattr(torch, args.dtype)).eval()
    tcfg = model.config.transformer
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset} depth {tcfg.depth} width {tcfg.width} heads {tcfg.heads} mlp {tcfg.mlp_dim} "
          f"codebook {model.codebook_size}: {params / 1e6:.1f}M params; {model.num_tokens} tokens, "
          f"batch {args.batch}, cfg {args.cfg}, {device} {args.dtype}, {torch.get_num_threads()} threads")

    base = dict(temperature=1.0, top_k=100, guidance_scale=args.cfg)
    run(model, args.batch, SamplingConfig(**base), device, 1)                      # warm-up
    t_cache, codes_cache = run(model, args.batch, SamplingConfig(**base), device, args.repeats)
    t_full, codes_full = run(model, args.batch, SamplingConfig(**base, use_cache=False), device, 1)

    n = args.batch * model.num_tokens
    rows = [("kv cache", t_cache, n / t_cache), ("no cache", t_full, n / t_full)]
    ratio = t_full / t_cache
    same = bool(torch.equal(codes_cache, codes_full))
    print(f"\n{'mode':<10} {'tokens':>7} {'seconds':>9} {'tokens/s':>10}")
    for name, t, r in rows:
        print(f"{name:<10} {n:>7} {t:>9.2f} {r:>10.1f}")
    print(f"\nspeed-up with the KV cache: {ratio:.1f}x (target >= 10x); identical samples: {same}")
    print("\nwith the KV cache:")
    batches = sweep(model, [int(b) for b in args.sweep_batches.split(",") if b], SamplingConfig(**base), device,
                    args.repeats)
    tok = None
    if args.tokenize:
        tok = tokenize_rate(args.tokenize, args.tokenize_images, device)
        print(f"\ntokenize job, {tok['preset']} at {tok['resolution']} px: {tok['images_per_s']:.1f} images/s "
              f"({tok['images']} images)")

    write_json(args.out, {
        "preset": args.preset, "depth": tcfg.depth, "width": tcfg.width, "heads": tcfg.heads,
        "mlp_dim": tcfg.mlp_dim, "codebook_size": model.codebook_size, "params": params,
        "tokens": model.num_tokens, "batch": args.batch, "guidance_scale": args.cfg,
        "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "cache": {"seconds": t_cache, "tokens_per_s": n / t_cache, "repeats": args.repeats},
        "no_cache": {"seconds": t_full, "tokens_per_s": n / t_full},
        "speedup": ratio, "identical_samples": same, "target_speedup": 10.0, "meets_target": ratio >= 10.0,
        "batches": batches, "tokenize": tok, "small": args.small,
    })


if __name__ == "__main__":
    main()
