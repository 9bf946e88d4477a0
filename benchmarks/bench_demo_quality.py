"""Quality of the full demo, measured by its offline metrics (evals/offline.py).

    python benchmarks/bench_demo_quality.py [--work runs/demo-quality] [--quick] [--set KEY=VALUE ...]
                                            [--out benchmarks/results/demo_quality.json]

Runs ``vqscale demo`` in ``--work`` (resuming what is already there, so a second call only
re-reads the results) and reports the numbers it ends with: the digits judge's class accuracy on
100 class-conditional samples of digits (target: at least 60% for the full demo; chance is 10%)
and its Fréchet distance, the held-out PSNR/SSIM and codebook usage of the tokenizer, and the
linear probe on the VIM blocks next to the raw-pixel probe; with the stage timings. Prints a
table, writes JSON, and exits 1 when the class-accuracy target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_CLASS_ACCURACY = 0.60


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/demo-quality", help="where the demo runs (its runs/demo inside)")
    p.add_argument("--quick", action="store_true", help="the CI-sized demo (the target is for the full one)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="demo overrides, as `vqscale demo --set`")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "demo_quality.json"))
    args = p.parse_args(argv)

    os.makedirs(args.work, exist_ok=True)
    cmd = [sys.executable, "-m", "pretrain.cli", "demo", *(["--quick"] if args.quick else []),
           *(x for o in args.overrides for x in ("--set", o))]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=args.work, env=env).returncode
    if rc != 0:
        print(f"vqscale demo exited {rc}", file=sys.stderr)
        return rc
    wall = time.time() - t0
    summary = json.load(open(os.path.join(args.work, "runs", "demo", "demo_summary.json")))
    ev = summary["evals"]
    result = {
        "quick": args.quick, "overrides": args.overrides, "wall_s_this_call": round(wall, 1),
        "seconds": summary["seconds"], "trained_now": {k: summary[k]["trained_now"] for k in ("tokenizer", "prior")},
        "steps": {k: summary[k]["step"] for k in ("tokenizer", "prior")},
        "metrics": {k: v for k, v in ev.items() if k != "files"},
        "target": {"digits_class_accuracy": TARGET_CLASS_ACCURACY, "applies": not args.quick,
                   "met": ev["digits_class_accuracy"] is not None and ev["digits_class_accuracy"] >= TARGET_CLASS_ACCURACY},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    rows = [("digits class accuracy", ev["digits_class_accuracy"], f">= {TARGET_CLASS_ACCURACY} (chance 0.10)"),
            ("digits-judge FID", ev["digits_fid"], "lower is better"),
            ("held-out PSNR (dB)", ev["holdout_psnr"], ""), ("held-out SSIM", ev["holdout_ssim"], ""),
            ("codebook usage", ev["codebook_usage"], ""), ("codebook perplexity", ev["codebook_perplexity"], ""),
            (f"probe top-1, best block ({ev['probe_best_layer']})", ev["probe_best_top1"], ""),
            ("probe top-1, raw pixels", ev["probe_pixel_baseline"], "")]
    print(f"\n{'metric':<34} {'value':>10}  note")
    for name, value, note in rows:
        print(f"{name:<34} {value:>10.4f}  {note}" if value is not None else f"{name:<34} {'-':>10}  {note}")
    print(f"stage seconds: {summary['seconds']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    if not args.quick and not result["target"]["met"]:
        print(f"class accuracy {ev['digits_class_accuracy']} is below the target {TARGET_CLASS_ACCURACY}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
