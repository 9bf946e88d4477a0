"""Activation memory and recomputation of each activation-checkpointing mode, counted exactly.

    python benchmarks/bench_memory.py [--configs vim-base,vim-large,t2i-prior-1b,vit-vqgan-bb]
                                      [--micro-batch 8] [--dtype bfloat16] [--small] [--out FILE]

For each config, the model is built on the meta device and cast to ``--dtype``. One training
forward and backward then runs at ``--micro-batch``, in three modes: no checkpointing, "full"
(whole blocks recomputed in backward) and "selective" (matmul and attention outputs kept, the ops
between them recomputed: ``pretrain.activation_checkpointing.apply_activation_checkpointing``).
Nothing is computed, so full-size models are measured on any machine. Two figures per mode:

* saved bytes: every tensor autograd keeps for the backward, summed by a ``saved_tensors_hooks``
  pack hook. This is the activation memory a GPU holds at the end of the forward, beyond weights,
  gradients and optimizer state. Tensors saved twice are counted twice; the allocator's
  fragmentation and the transient buffers of single kernels are not counted.
* FLOPs: forward + backward + recomputation, counted by ``FlopCounterMode``. The ratio to the
  plain run is the price of the mode in compute.

The tokenizer's figures cover the tokenizer alone, not its losses. Prints a table and writes JSON
(``benchmarks/results/bench_memory.json``). ``--small``: the -tiny twins in float32, the form CI runs.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.report import write_json  # noqa: E402
from pretrain.config import apply_overrides  # noqa: E402
from pretrain.activation_checkpointing import apply_activation_checkpointing  # noqa: E402
from pretrain.recipes import get_recipe  # noqa: E402

CONFIGS = {"vim-base": [], "vim-large": [],
           "t2i-prior-1b": ['model.text_encoder_overrides={"pretrained": false}'], "vit-vqgan-bb": []}
MODES = ("none", "full", "selective")


def measure(recipe: str, overrides: list[str], mode: str, batch: int, dtype: torch.dtype) -> dict:
    from pretrain.models import model_from_config

    cfg = apply_overrides(get_recipe(recipe), overrides)
    with torch.device("meta"):
        model = model_from_config(cfg).to(dtype)
    model.train()
    wrapped = apply_activation_checkpointing(model, mode) if mode != "none" else 0
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    if cfg.stage == "prior":
        codes = torch.zeros(batch, model.num_tokens, dtype=torch.long, device="meta")
        cond = model.null_condition(batch)

        def forward() -> torch.Tensor:
            return model(codes, cond).float().sum()
    else:
        x = torch.zeros(batch, 3, model.image_size, model.image_size, device="meta", dtype=dtype)

        def forward() -> torch.Tensor:
            return model(x).recon.float().sum()

    torch.manual_seed(0)       # the same host draws (a text prior's caption dropout) in every mode
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward()
        loss.backward()
    return {"mode": mode, "blocks_wrapped": wrapped, "saved_bytes": saved[0], "flops": counter.get_total_flops()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--small", action="store_true", help="the -tiny twins, float32 (CI)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_memory.json"))
    args = p.parse_args(argv)
    dtype = torch.float32 if args.small else getattr(torch, args.dtype)
    rows = []
    for name in [c for c in args.configs.split(",") if c]:
        recipe = name + ("-tiny" if args.small else "")
        base = None
        for mode in MODES:
            r = measure(recipe, CONFIGS[name], mode, args.micro_batch, dtype)
            base = base or r
            r.update(config=name, recipe=recipe, micro_batch=args.micro_batch, dtype=str(dtype).replace("torch.", ""),
                     saved_ratio=r["saved_bytes"] / base["saved_bytes"], flops_ratio=r["flops"] / base["flops"])
            rows.append(r)
    print(f"{'config':<14} {'mode':<10} {'blocks':>6} {'saved GiB':>10} {'x none':>7} {'TFLOP':>9} {'x none':>7}")
    for r in rows:
        print(f"{r['config']:<14} {r['mode']:<10} {r['blocks_wrapped']:>6} {r['saved_bytes'] / 2**30:>10.2f} "
              f"{r['saved_ratio']:>7.2f} {r['flops'] / 1e12:>9.2f} {r['flops_ratio']:>7.2f}")
    return write_json(args.out, {"small": args.small, "micro_batch": args.micro_batch, "rows": rows})


if __name__ == "__main__":
    main()
