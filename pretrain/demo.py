"""``vqscale demo``: the main job on embedded defaults, on a laptop CPU.

Until the training stages land this runs the data half end to end: build the demo dataset from
images shipped in installed packages, inspect it, stream it through the resumable loader (with a
save and a resume in the middle, checked for exactness), write the resolved config, a grid of the
first batch, and a summary.
"""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

import numpy as np

from data_pipeline import storage

from .config import apply_overrides, dumps, write_resolved
from .recipes import get_recipe
from .repro import run_metadata, seed_everything
from .sample import save_grid  # the one PNG-grid writer (also used by `vqscale sample`)


def run_demo(quick: bool = False, overrides: Sequence[str] = (), progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    from data_pipeline.demo import build_demo
    from data_pipeline.images import image_loader
    from data_pipeline.inspection import inspect_dataset

    cfg = apply_overrides(get_recipe("demo"), list(overrides))
    if quick:
        cfg = apply_overrides(cfg, [f"steps={min(cfg.steps, 12)}"])
    run_dir = cfg.run_dir
    data_url = cfg.data.url or storage.join(run_dir, "data")
    cfg = apply_overrides(cfg, [f"data.url={data_url}"])
    seed_everything(cfg.seed)
    write_resolved(cfg, storage.join(run_dir, "config.json"), extra=run_metadata())
    print(f"[demo] run directory: {run_dir}\n[demo] resolved config:\n{dumps(cfg)}", flush=True)

    t0 = time.time()
    if not storage.exists(storage.join(data_url, "manifest.json")):
        build_demo(data_url, quick=quick, progress=progress)
    summary = inspect_dataset(data_url, progress=progress)
    print(f"[demo] dataset: {summary['samples']} samples in {summary['shards']} shards, "
          f"{summary['bytes'] / 1e6:.1f} MB, {summary['defects']['total']} defects, "
          f"{len(summary['labels'])} classes, captions on {summary['caption_fraction']:.0%}", flush=True)

    # Stream half the steps, save the loader state, resume from it in a new loader with another
    # worker count, and check that no sample was seen twice.
    half = cfg.steps // 2
    seen: list[tuple[int, str]] = []  # (epoch, key): each must come exactly once
    labels: list[int] = []
    loader = image_loader(cfg.data, cfg.global_batch_size, seed=cfg.seed)
    t1 = time.time()
    bar = tqdm(total=cfg.steps, desc="[demo] streaming", unit="batch", disable=not progress)
    first = None
    for step, batch in enumerate(loader):
        if first is None:
            first = batch["image"]
        seen += zip(batch["epoch"].tolist(), batch["key"])
        labels += batch["label"].tolist()
        bar.update(1)
        if step + 1 == half:
            break
    state = loader.state_dict()
    storage.write_json(storage.join(run_dir, "loader_state.json"), state)
    resumed = image_loader(cfg.data, cfg.global_batch_size, seed=cfg.seed,
                           num_workers=max(1, cfg.data.num_workers - 1))
    resumed.load_state_dict(storage.read_json(storage.join(run_dir, "loader_state.json")))
    for step, batch in enumerate(resumed, start=half):
        seen += zip(batch["epoch"].tolist(), batch["key"])
        labels += batch["label"].tolist()
        bar.update(1)
        if step + 1 == cfg.steps:
            break
    bar.close()
    dt = time.time() - t1
    repeats = len(seen) - len(set(seen))
    grid_url = storage.join(run_dir, "samples", "first_batch.png")
    save_grid(first, grid_url)
    result = {
        "run_dir": run_dir,
        "dataset": {k: summary[k] for k in ("shards", "samples", "bytes", "caption_fraction")},
        "defects": summary["defects"]["total"],
        "steps": cfg.steps,
        "images": len(seen),
        "images_per_s": round(len(seen) / dt, 1),
        "resumed_at_step": half,
        "repeated_samples": repeats,
        "epochs_touched": sorted({e for e, _ in seen}),
        "exact_resume": repeats == 0,
        "label_histogram": {str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))},
        "first_batch_grid": grid_url,
        "wall_s": round(time.time() - t0, 1),
    }
    storage.write_json(storage.join(run_dir, "demo_summary.json"), result)
    print("[demo] summary:\n" + json.dumps(result, indent=2), flush=True)
    if not result["exact_resume"]:
        raise RuntimeError(f"resume was not exact: {repeats} repeated samples")
    return result
