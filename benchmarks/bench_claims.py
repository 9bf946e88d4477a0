"""The seeds' claims, checked at small scale on the demo data (issues 7 and 18).

Every variant trains with the same budget (steps, batch, lr) through the real Trainer, once per seed
(``--seeds``, default 0,1), then is measured on the held-out split with the trained tokenizer (EMA
weights, via the resolver):

* codebook usage (distinct codes used over the whole held-out split / codebook size), the
  perplexity of the code histogram;
* reconstruction MSE, PSNR and SSIM (evals.reconstruction.ssim on [0, 1] images), and tokens per image.

Variants (``--variants``, default all): on the CNN VQGAN f8 backbone at 64 px (8x8 tokens, 64 codes)

* ``vq-plain``: taming's VQ (unfactorized, un-normalized codes, codebook loss), no dead-code
  restart and no data-dependent codebook init;
* ``vq-restart``: the same with dead-code restarts and ``data_init`` (what vqscale does by default;
  restarts reach DeepSpeed's master copy, pretrain/runtime.py ``apply_row_writes``);
* ``vq-factorized-l2``: ViT-VQGAN's factorized 8-d l2-normalized codes (no restart);
* ``vq-data-init``: plain VQ with ``data_init`` and no restarts (Reg-VQ's pair);
* ``regvq``: Regularized VQ (prior KL at weight 0.03, 40% stochastic mask, ``p(k | z)`` at
  temperature 0.1 in codebook-spread units: the regvq-f16 preset's settings) with ``data_init``
  and no restarts; ``regvq-taming-init`` the same from taming's +-1/K codebook init. The
  probabilistic contrastive term needs pretrained VGG-19 weights, not available offline: left out;
* ``gumbel``: Gumbel-softmax quantization alone (relaxed one-hot, annealed temperature), the
  comparison the Reg-VQ paper draws;
* ``simvq``, ``fsq``, ``lfq``: the codebooks that reach full use (presets vqgan-f8-simvq-tiny,
  vqgan-f8-fsq-tiny with levels (4, 4, 4), vqgan-f8-lfq-tiny with 6 bits; 64 codes each);

on the tiny ViT-VQGAN (``vit-vqgan-ss-tiny`` at its 32 px, patch 4: 8x8 tokens) with 1024 codes
(issue 19: the paper's usage claim is about large codebooks)

* ``vit-l2-8d``: ViT-VQGAN's factorized 8-d l2-normalized codes, ``vit-no-l2``: the same 8-d codes
  without l2 normalization, ``vit-full-width``: unfactorized 64-d raw codes; none restarts dead
  codes or initialises from data (the paper does neither); ``vit-l2-8d-restart``: the 8-d l2 codes
  with vqscale's dead-code restarts, ``data_init`` and the demo's usage decay 0.9;
  ``vit-no-l2-restart`` and ``vit-full-width-restart`` the other two geometries with the same;
* ``vit-simvq``, ``vit-fsq`` (levels (4, 4, 4, 4, 4)), ``vit-lfq`` (10 bits): the modern codebooks
  on the same ViT, 1024 codes each;

and MQ-VAE f8 at 64 px with keep ratio 1.0, 0.5, 0.25 (``mqvae-1.0`` ...). ``--adversarial`` adds
each variant again with the adversarial term on (needs the GAN trainer: ``discriminator.model``).

    python benchmarks/bench_claims.py --steps 150 --seeds 0,1 --out benchmarks/results/claims.json

Prints a table (the range over seeds) and writes JSON; benchmarks/RESULTS.md records what was measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.report import seed_ranges, write_json  # noqa: E402
from model_zoo.vqgan import REGVQ_F16  # noqa: E402
from pretrain.objectives import LOSS_PRESETS  # noqa: E402

NO_RESTART = {"restart_dead": False, "data_init": False}
# Regularized VQ as the regvq-f16 preset and the regvq loss preset set it (model_zoo/vqgan.py)
REGVQ_Q = {k: getattr(REGVQ_F16.quantizer, k) for k in ("prior_kl", "stochastic_mask_ratio", "prior_temperature")}
REGVQ_SETS = {"tokenizer_loss.prior_kl": LOSS_PRESETS["regvq"]["prior_kl"]}
# ViT-VQGAN's claim (sec. 3.2: factorized low-d l2-normalized codes, 96% vs 4% usage at 8192 codes)
# on the tiny ViT (32 px, patch 4: 8x8 tokens) with 1024 codes: its 8-d l2 codes, the same 8-d codes
# without l2, and full-width (64-d) raw codes; each without restarts (the paper has none) and with
# vqscale's restarts, data_init and the demo's 10-step usage horizon (pretrain/demo.py,
# tokenizer_usage_decay), which take the fresh encoder's collapse out of the comparison (RESULTS.md)
VIT, VIT_Q = "vit-vqgan-ss-tiny", {"codebook_size": 1024}
VIT_RESTART = {"restart_dead": True, "data_init": True, "decay": 0.9}
VIT_GEOMETRIES = {"l2-8d": {"factorized": True, "l2_normalize": True, "dim": 8},
                  "no-l2": {"factorized": True, "l2_normalize": False, "dim": 8},
                  "full-width": {"factorized": False, "l2_normalize": False, "dim": 64}}
VARIANTS = {
    "vq-plain": ("vqgan-f8-tiny", {"quantizer": {**NO_RESTART}}, {}),
    "vq-restart": ("vqgan-f8-tiny", {"quantizer": {"restart_dead": True, "data_init": True}}, {}),
    "vq-factorized-l2": ("vqgan-f8-tiny", {"quantizer": {**NO_RESTART, "factorized": True, "l2_normalize": True,
                                                         "dim": 8}}, {}),
    # plain VQ with vqscale's data-dependent init but no restarts: what Reg-VQ is compared with
    "vq-data-init": ("vqgan-f8-tiny", {"quantizer": {"restart_dead": False, "data_init": True}}, {}),
    # Reg-VQ on the f8 backbone without restarts (what keeps codes in use is the prior KL), with the
    # data init; and from taming's +-1/K init (no data init): the paper's setting
    "regvq": ("vqgan-f8-tiny", {"quantizer": {"restart_dead": False, "data_init": True, **REGVQ_Q}}, REGVQ_SETS),
    "regvq-taming-init": ("vqgan-f8-tiny", {"quantizer": {**NO_RESTART, **REGVQ_Q}}, REGVQ_SETS),
    # Gumbel-only quantization (DALL-E's relaxed one-hot, annealed temperature): Reg-VQ's comparison
    "gumbel": ("vqgan-f8-tiny", {"quantizer": {**NO_RESTART, "kind": "gumbel"}}, {}),
    "simvq": ("vqgan-f8-simvq-tiny", {}, {}),
    "fsq": ("vqgan-f8-fsq-tiny", {}, {}),
    "lfq": ("vqgan-f8-lfq-tiny", {}, {}),
    **{f"vit-{g}": (VIT, {"quantizer": {**VIT_Q, **NO_RESTART, **q}}, {}) for g, q in VIT_GEOMETRIES.items()},
    **{f"vit-{g}-restart": (VIT, {"quantizer": {**VIT_Q, **VIT_RESTART, **q}}, {}) for g, q in VIT_GEOMETRIES.items()},
    # the codebooks the field now uses, on the same ViT at 1024 codes
    "vit-simvq": (VIT, {"quantizer": {**VIT_Q, "simvq": True, "factorized": True, "l2_normalize": False,
                                      "dim": 32}}, {}),
    "vit-fsq": (VIT, {"quantizer": {**VIT_Q, "kind": "fsq", "fsq_levels": [4, 4, 4, 4, 4], "dim": 5}}, {}),
    "vit-lfq": (VIT, {"quantizer": {**VIT_Q, "kind": "lfq", "dim": 10}}, {}),
    "mqvae-1.0": ("mq-vae-f8-tiny", {"keep_ratio": 1.0}, {}),
    "mqvae-0.5": ("mq-vae-f8-tiny", {"keep_ratio": 0.5}, {}),
    "mqvae-0.25": ("mq-vae-f8-tiny", {"keep_ratio": 0.25}, {}),
}


def _train(name: str, model: str, model_args: dict, sets: dict, args, data: str, val: str, adversarial: bool,
           seed: int):
    from pretrain.config import apply_overrides
    from pretrain.recipes import get_recipe
    from pretrain.trainer import Trainer

    cfg = get_recipe(model)
    overrides = [f"run_dir={args.work}/{name}{'-adv' if adversarial else ''}-s{seed}", f"data.url={data}",
                 f"validation.url={val}", f"steps={args.steps}", f"global_batch_size={args.batch}",
                 f"optim.lr={args.lr}", f"optim.total_steps={args.steps}", f"optim.warmup_steps={args.steps // 10}",
                 f"data.resolution={32 if model.startswith('vit') else 64}", "validation.every=0",
                 "validation.visuals_every=0",
                 f"checkpoint.every={args.steps}", "log.every=50", "log.progress=false", f"seed={seed}",
                 "tokenizer_loss.perceptual=0.0", "tokenizer_loss.contrastive=0.0"]
    margs = {**model_args, **({"resolution": 64} if model.startswith(("vqgan", "regvq")) else {})}
    if margs.get("quantizer", {}).get("kind") == "gumbel":   # anneal the temperature within the budget
        margs["quantizer"] = {**margs["quantizer"], "tau_anneal_steps": args.steps}
    overrides += [f"model_args.{k}={json.dumps(v)}" for k, v in margs.items()]
    overrides += [f"{k}={v}" for k, v in sets.items()]
    if adversarial:
        overrides += ["discriminator.model=patchgan-tiny", f"discriminator.start_step={args.steps // 5}"]
    elif "discriminator" in cfg.__dataclass_fields__:
        overrides += ["discriminator.model="]
    cfg = apply_overrides(cfg, overrides)
    # From scratch: the Trainer would resume a finished run of the same name (from an earlier
    # invocation with other settings) and report its old model.
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    t0 = time.time()
    res = Trainer(cfg, progress=False).fit()
    return cfg.run_dir, time.time() - t0, res


def _evaluate(run_dir: str, val: str, batch: int = 64) -> dict:
    import torch

    from data_pipeline.config import DataConfig
    from data_pipeline.images import image_loader
    from model_zoo.package import load_package
    from pretrain.resolve import as_package

    tok = load_package(as_package(run_dir, kind="tokenizer")).eval()
    loader = image_loader(DataConfig(url=val, resolution=tok.image_size, crop="center", num_workers=0),
                          batch, max_epochs=1, world_size=1, rank=0)
    from evals.reconstruction import ssim

    hist = torch.zeros(tok.codebook_size, dtype=torch.float64)
    se, ss, n, tokens = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for b in loader:
            x = b["image"]
            t = tok.encode(x)
            hist += torch.bincount(t.codes.flatten(), minlength=tok.codebook_size).double()
            recon = tok.decode(t.codes, t.positions).clamp(-1, 1)
            se += ((recon - x) ** 2).mean(dim=(1, 2, 3)).sum().item()
            ss += ssim((recon + 1) / 2, (x + 1) / 2, data_range=1.0).sum().item()
            n += len(x)
            tokens = t.codes.shape[1]
    p = hist / hist.sum()
    mse = se / n
    return {"images": n, "tokens_per_image": tokens, "codebook_size": tok.codebook_size,
            "codes_used": int((hist > 0).sum()), "usage": float((hist > 0).float().mean()),
            "perplexity": float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())),
            "mse": mse, "psnr": 10 * math.log10(4.0 / mse),   # images span [-1, 1]: peak-to-peak 2
            "ssim": ss / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", default="0,1", help="comma-separated training seeds (each variant runs once per seed)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--adversarial", action="store_true", help="also train each variant with the GAN term")
    ap.add_argument("--work", default="runs/claims", help="run directories and the demo data go here")
    ap.add_argument("--out", default="benchmarks/results/claims.json")
    ap.add_argument("--small", action="store_true",
                    help="CI's form: the quick demo data (figures meaningless; checks the script runs)")
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from data_pipeline import storage
    from data_pipeline.demo import build_demo

    data, val = os.path.join(args.work, "data"), os.path.join(args.work, "data-holdout")
    if not storage.exists(os.path.join(val, "manifest.json")):
        build_demo(data, quick=args.small, holdout=val, progress=False)
    rows = []
    seeds = [int(x) for x in args.seeds.split(",")]
    for name in args.variants.split(","):
        model, model_args, sets = VARIANTS[name]
        for adv in ([False, True] if args.adversarial else [False]):
            for seed in seeds:
                run_dir, secs, res = _train(name, model, model_args, sets, args, data, val, adv, seed)
                row = {"variant": name, "adversarial": adv, "seed": seed, "model": model, "train_s": round(secs, 1),
                       "final_train_loss": res.metrics.get("loss"), **_evaluate(run_dir, val)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = _summary(rows)
    print(f"\n{'variant':<18}{'adv':>4}{'seeds':>6}{'tokens':>7}{'usage':>15}{'perplexity':>15}{'PSNR dB':>15}"
          f"{'SSIM':>15}")
    for r in summary:
        print(f"{r['variant']:<18}{'yes' if r['adversarial'] else 'no':>4}{r['seeds']:>6}{r['tokens_per_image']:>7}"
              + "".join(f"{r[k][0]:>9.3g}-{r[k][1]:<5.3g}" for k in ("usage", "perplexity", "psnr", "ssim")))
    write_json(args.out, {"args": vars(args), "rows": rows, "summary": summary})
    return 0


def _summary(rows: list[dict]) -> list[dict]:
    """One row per (variant, adversarial): the [min, max] over seeds of usage, perplexity, PSNR and SSIM."""
    return seed_ranges(rows, lambda r: (r["variant"], r["adversarial"]),
                       lambda r: {k: r[k] for k in ("variant", "adversarial", "tokens_per_image")},
                       ("usage", "perplexity", "psnr", "ssim"))

if __name__ == "__main__":
    sys.exit(main())
