"""MQ-VAE + Stackformer against a full-grid VQ + VIM, at small scale on the demo data (issue 19).

The claim (Huang et al., CVPR 2023, "Not All Image Regions Matter: Masked Vector Quantization for
Autoregressive Image Generation"): modelling only the important regions -- MQ-VAE keeps ``k`` of
the ``h*w`` grid positions and Stackformer predicts each kept code and then where it goes --
gives a prior that generates better images *and* samples faster than a raster-order transformer
over every grid position. Checked here in direction only, on CPU, with tiny models.

Per seed (``--seeds``, default 0,1), with the same data, steps, batch, lr and seed on each side:

1. two tokenizers trained from scratch through the real Trainer, exactly as
   benchmarks/bench_claims.py trains its variants (no GAN, no perceptual term, 64 px):
   ``vqgan-f8-tiny`` (full 8x8 grid: 64 codes per image) and ``mq-vae-f8-tiny`` at
   ``--keep-ratio`` (0.25: 16 of the 64 positions kept; 0.5: 32), 64-entry codebooks both;
2. both demo splits tokenized with each (``pretrain.tokenize_job.run_tokenize``, as the demo does);
3. two class-conditional priors trained on those code shards from scratch: ``vim-small-tiny``
   (width 64, 2 heads, MLP 256; at ``--vim-depth`` 4 blocks by default, so that it runs as many
   blocks per token as ``stackformer-base-tiny``'s 2 code + 2 position blocks) over the VQGAN's
   codes, and ``stackformer-base-tiny`` over MQ-VAE's (code, position) pairs. Both with class
   dropout 0 (conditioned on the label only, no guidance), each with its recipe's optimizer
   family (VIM: Adam(0.9, 0.96), wd 0.045, clip 1.0; Stackformer: AdamW(0.9, 0.95), wd 0.01,
   no clip) at the same lr, warmup (10%) and cosine schedule;
4. measured on the held-out split with the exported (EMA) priors:

   * ``bits_per_image``: the mean over held-out images of ``-log2 p(tokens | label)`` summed over
     the image's tokens, teacher-forced, dropout off. VIM: the 64 code NLLs. Stackformer: its
     loss as it defines it, code NLL + position NLL for each of the ``k`` pairs, i.e.
     ``-log2 p(c_1, p_1, ..., c_k, p_k | y)`` -- the positions are part of what the prior must
     generate, so they are counted (``code_bits_per_image`` and ``position_bits_per_image`` give
     the split; ``log2 C(64, k)`` bits is what uniform positions would cost);
   * ``bits_per_token``: bits_per_image / tokens per image (a Stackformer token is one pair);
   * ``sample_s_per_image``: wall time of ``prior.generate`` (the models' own KV-cached loop,
     temperature 1, no top-k/top-p, no guidance) for a batch of ``--sample-batch`` labels, after
     one warm-up call, median of ``--repeats`` calls, divided by the batch; the two priors are
     timed alternately in the same loop on ``--sample-threads`` torch threads, so load from
     other processes hits both alike. Decoding to pixels is not included;
   * context: the tokenizer's held-out PSNR and codebook usage (bench_claims' measurement) and
     the parameter counts of both priors and tokenizers.

What this does not measure: the paper's quality claim is FID of generated images; no FID here
(no Inception weights offline, and tiny models on 64 px demo images). Bits per image of two
different tokenizations are not the same quantity -- fewer kept positions is less information
to model (see the PSNR column).

    OMP_NUM_THREADS=1 python benchmarks/bench_prior_claims.py --tokenizer-steps 150 --prior-steps 300 \\
        --seeds 0,1 --work /tmp/priorclaims --out /tmp/priorclaims/prior_claims.json

(``OMP_NUM_THREADS=1`` on a shared machine: with other jobs on the 2 cores, torch's default 2
threads per process made the tokenizer steps about 5x slower than one thread did.)

``--small`` (CI): the quick demo data and 3 steps each unless given; the figures are meaningless.
Prints a table (range over seeds) and writes JSON (``rows``: one per seed and prior; ``summary``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from types import SimpleNamespace

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.bench_claims import _evaluate as evaluate_tokenizer  # noqa: E402
from benchmarks.bench_claims import _train as train_tokenizer  # noqa: E402
from benchmarks.report import seed_ranges, write_json  # noqa: E402

# side -> (tokenizer recipe, its model_args, prior recipe)
SIDES = {"vim": ("vqgan-f8-tiny", {}, "vim-small-tiny"),
         "stackformer": ("mq-vae-f8-tiny", {}, "stackformer-base-tiny")}
METRICS = ("tokens_per_image", "bits_per_image", "bits_per_token", "sample_s_per_image", "prior_params",
           "tokenizer_psnr")


def _train_prior(side: str, recipe: str, tok_dir: str, codes: str, codes_val: str, args, seed: int,
                 num_classes: int):
    from pretrain.config import apply_overrides
    from pretrain.recipes import get_recipe
    from pretrain.trainer import Trainer

    steps = args.prior_steps
    margs = {"num_classes": num_classes, "class_dropout": 0.0}
    if side == "vim":
        margs["transformer"] = {"depth": args.vim_depth}
    overrides = [f"run_dir={args.work}/prior-{side}-s{seed}", f"data.url={codes}", f"validation.url={codes_val}",
                 f"tokenizer={tok_dir}", f"steps={steps}", f"global_batch_size={args.prior_batch}",
                 f"optim.lr={args.prior_lr}", f"optim.total_steps={steps}", f"optim.warmup_steps={max(1, steps // 10)}",
                 "optim.schedule=cosine", "optim.min_lr_ratio=0.0", "validation.every=0", "validation.visuals_every=0",
                 f"checkpoint.every={steps}", "log.every=50", "log.progress=false", f"seed={seed}"]
    overrides += [f"model_args.{k}={json.dumps(v)}" for k, v in margs.items()]
    cfg = apply_overrides(get_recipe(recipe), overrides)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)    # from scratch: never resume an old run
    t0 = time.time()
    res = Trainer(cfg, progress=False).fit()
    return cfg.run_dir, time.time() - t0, res


def _heldout_bits(prior, codes_val: str, batch: int = 64) -> dict:
    """Sum over each held-out image's tokens of the prior's NLL in bits (teacher forcing, eval mode)."""
    import torch
    import torch.nn.functional as F

    from data_pipeline.codes import code_loader

    loader = code_loader(codes_val, batch, rank=0, world_size=1, num_workers=0, shuffle_buffer=1, interleave=1,
                         max_epochs=1)
    n, code_nats, pos_nats, tokens = 0, 0.0, 0.0, 0
    with torch.no_grad():
        for b in loader:
            codes = b["codes"].long()
            positions = None if b["positions"] is None else b["positions"].long()
            out = prior(codes, b["label"], positions)
            code_logits, pos_logits = out if isinstance(out, tuple) else (out, None)
            code_nats += F.cross_entropy(code_logits.flatten(0, 1).float(), codes.flatten(), reduction="sum").item()
            if pos_logits is not None:
                pos_nats += F.cross_entropy(pos_logits.flatten(0, 1).float(), positions.flatten(),
                                            reduction="sum").item()
            n += len(codes)
            tokens = codes.shape[1]
    ln2 = math.log(2)
    bits = (code_nats + pos_nats) / ln2 / n
    return {"heldout_images": n, "tokens_per_image": tokens, "bits_per_image": bits, "bits_per_token": bits / tokens,
            "code_bits_per_image": code_nats / ln2 / n, "position_bits_per_image": pos_nats / ln2 / n}


def _sample_times(priors: dict, batch: int, repeats: int, threads: int) -> dict[str, dict]:
    """Median seconds per image of ``generate`` for each prior, timed alternately after a warm-up."""
    import torch

    from model_zoo.sampling import SamplingConfig, sample_seeds

    sampling = SamplingConfig()           # temperature 1, unfiltered, no guidance, KV cache on
    seeds = sample_seeds(0, torch.arange(batch))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times: dict[str, list[float]] = {k: [] for k in priors}
        for r in range(repeats + 1):          # round 0 is the warm-up
            for side, prior in priors.items():
                labels = torch.arange(batch) % prior.num_classes
                t0 = time.perf_counter()
                out = prior.generate(labels, batch, sampling, seeds)
                dt = time.perf_counter() - t0
                codes = out[0] if isinstance(out, tuple) else out
                assert codes.shape == (batch, prior.num_tokens)
                if r:
                    times[side].append(dt)
    finally:
        torch.set_num_threads(before)
    return {side: {"sample_s_per_image": statistics.median(t) / batch, "sample_s_batch": t}
            for side, t in times.items()}


def _tokenize(tok_dir: str, data: str, val: str, out: str) -> tuple[str, str]:
    from pretrain.tokenize_job import run_tokenize

    shutil.rmtree(out, ignore_errors=True)      # the job skips finished shards: never reuse another tokenizer's
    codes, codes_val = os.path.join(out, "train"), os.path.join(out, "holdout")
    for src, dst in ((data, codes), (val, codes_val)):
        run_tokenize(tok_dir, src, dst, batch_size=64, progress=False)
    return codes, codes_val


def run_seed(args, seed: int, data: str, val: str) -> list[dict]:
    from data_pipeline.demo import CLASS_NAMES
    from model_zoo.package import load_package, load_prior_with_tokenizer
    from model_zoo.vit_vqgan import count_params
    from pretrain.resolve import as_package

    tok_args = SimpleNamespace(steps=args.tokenizer_steps, batch=args.tokenizer_batch, lr=args.tokenizer_lr,
                               work=args.work)
    rows, priors = [], {}
    for side, (tok_recipe, tok_margs, prior_recipe) in SIDES.items():
        margs = {**tok_margs, **({"keep_ratio": args.keep_ratio} if side == "stackformer" else {})}
        tok_name = f"tok-{side}"
        tok_dir, tok_s, tok_res = train_tokenizer(tok_name, tok_recipe, margs, {}, tok_args, data, val, False, seed)
        tok_eval = evaluate_tokenizer(tok_dir, val)
        codes, codes_val = _tokenize(tok_dir, data, val, os.path.join(args.work, f"codes-{side}-s{seed}"))
        prior_dir, prior_s, prior_res = _train_prior(side, prior_recipe, tok_dir, codes, codes_val, args, seed,
                                                     len(CLASS_NAMES))
        prior, tok = load_prior_with_tokenizer(as_package(prior_dir, kind="prior"))
        priors[side] = prior.eval()
        row = {"side": side, "seed": seed, "tokenizer": tok_recipe, "prior": prior_recipe,
               "keep_ratio": args.keep_ratio if side == "stackformer" else 1.0,
               "tokenizer_params": count_params(load_package(as_package(tok_dir, kind="tokenizer"))),
               "prior_params": count_params(prior), "prior_depth": _depth(prior),
               "tokenizer_train_s": round(tok_s, 1), "prior_train_s": round(prior_s, 1),
               "tokenizer_final_loss": tok_res.metrics.get("loss"), "prior_final_loss": prior_res.metrics.get("loss"),
               "tokenizer_psnr": tok_eval["psnr"], "tokenizer_usage": tok_eval["usage"],
               "tokenizer_tokens_per_image": tok_eval["tokens_per_image"],
               **_heldout_bits(prior, codes_val)}
        if side == "stackformer":
            k, n = row["tokens_per_image"], prior.num_positions
            row["uniform_position_bits"] = math.log2(math.comb(n, k))
        rows.append(row)
    times = _sample_times(priors, args.sample_batch, args.repeats, args.sample_threads)
    for row in rows:
        row.update(times[row["side"]], sample_batch=args.sample_batch)
        print(json.dumps(row), flush=True)
    return rows


def _depth(prior) -> str:
    cfg = prior.config
    if hasattr(cfg, "code_transformer"):
        return f"{cfg.code_transformer.depth}+{cfg.position_transformer.depth}x{cfg.code_transformer.width}"
    return f"{cfg.transformer.depth}x{cfg.transformer.width}"


def summarize(rows: list[dict]) -> dict:
    """Per side: [min, max] over seeds of each figure; and, per seed, whether the claim's direction held."""
    named = ("side", "tokenizer", "prior", "prior_depth")
    sides = seed_ranges(rows, lambda r: r["side"], lambda r: {k: r[k] for k in named},
                        (*METRICS, "code_bits_per_image", "position_bits_per_image"))
    by_seed: dict[int, dict] = {}
    for r in rows:
        by_seed.setdefault(r["seed"], {})[r["side"]] = r
    fewer_bits = [v["stackformer"]["bits_per_image"] < v["vim"]["bits_per_image"] for v in by_seed.values()]
    faster = [v["stackformer"]["sample_s_per_image"] < v["vim"]["sample_s_per_image"] for v in by_seed.values()]
    speedup = [v["vim"]["sample_s_per_image"] / v["stackformer"]["sample_s_per_image"] for v in by_seed.values()]
    return {"sides": sides,
            "claim": {"stackformer_fewer_bits_per_image": fewer_bits, "stackformer_faster_sampling": faster,
                      "sampling_speedup": (min(speedup), max(speedup)),
                      "direction_holds": all(fewer_bits) and all(faster)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer-steps", type=int, default=None, help="default 150 (--small: 3)")
    ap.add_argument("--prior-steps", type=int, default=None, help="default 300 (--small: 3)")
    ap.add_argument("--tokenizer-batch", type=int, default=16)
    ap.add_argument("--tokenizer-lr", type=float, default=1e-3)
    ap.add_argument("--prior-batch", type=int, default=32)
    ap.add_argument("--prior-lr", type=float, default=3e-3)
    ap.add_argument("--keep-ratio", type=float, default=0.25, help="MQ-VAE's kept fraction (0.25: 16 of 64 tokens)")
    ap.add_argument("--vim-depth", type=int, default=4, help="VIM blocks (Stackformer tiny: 2 code + 2 position)")
    ap.add_argument("--sample-batch", type=int, default=None, help="default 16 (--small: 4)")
    ap.add_argument("--repeats", type=int, default=None, help="timed generate calls per prior; default 5 (--small: 1)")
    ap.add_argument("--sample-threads", type=int, default=1)
    ap.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    ap.add_argument("--work", default="runs/prior_claims", help="run directories, code shards and demo data go here")
    ap.add_argument("--out", default="benchmarks/results/prior_claims.json")
    ap.add_argument("--small", action="store_true", help="CI's form: quick demo data, 3 steps (figures meaningless)")
    args = ap.parse_args(argv)
    for name, full, small in (("tokenizer_steps", 150, 3), ("prior_steps", 300, 3), ("sample_batch", 16, 4),
                              ("repeats", 5, 1)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.small else full)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from data_pipeline import storage
    from data_pipeline.demo import build_demo

    data, val = os.path.join(args.work, "data"), os.path.join(args.work, "data-holdout")
    if not storage.exists(os.path.join(val, "manifest.json")):
        build_demo(data, quick=args.small, holdout=val, progress=False)
    rows = []
    for seed in (int(x) for x in args.seeds.split(",")):
        rows += run_seed(args, seed, data, val)
    summary = summarize(rows)
    print(f"\n{'prior (tokenizer)':<38}{'depth':>8}{'seeds':>6}{'tokens':>7}{'params':>16}{'bits/image':>16}"
          f"{'bits/token':>16}{'ms/image':>16}{'tok PSNR':>16}")
    for s in summary["sides"]:
        print(f"{s['prior'] + ' (' + s['tokenizer'] + ')':<38}{s['prior_depth']:>8}{s['seeds']:>6}"
              f"{s['tokens_per_image'][0]:>7}{s['prior_params'][0]:>16,}"
              + "".join(f"{lo:>9.4g}-{hi:<6.4g}" for lo, hi in
                        (s["bits_per_image"], s["bits_per_token"],
                         tuple(1e3 * t for t in s["sample_s_per_image"]), s["tokenizer_psnr"])))
    sf = next(s for s in summary["sides"] if s["side"] == "stackformer")
    print(f"Stackformer bits/image = codes {sf['code_bits_per_image'][0]:.4g}-{sf['code_bits_per_image'][1]:.4g}"
          f" + positions {sf['position_bits_per_image'][0]:.4g}-{sf['position_bits_per_image'][1]:.4g}")
    print(f"claim direction (fewer bits and faster, every seed): {summary['claim']}")
    write_json(args.out, {"args": vars(args), "rows": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
