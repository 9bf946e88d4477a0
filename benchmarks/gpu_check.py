"""The GPU path in one prepared command (issue 22): versions, then correctness, speed, A/B and
sampling, each step in its own process under its own time budget.

    # on the GPU machine (DeepSpeed and the other missing packages travel as wheels: gpu_wheels.sh)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && python3 benchmarks/gpu_check.py --out $OUT
    # anywhere: the same steps with tiny shapes on CPU (gloo), what CI runs (tests/test_gpu_check.py)
    python benchmarks/gpu_check.py --dry-run
        [--out DIR] [--budget-s 540] [--only env,correctness,speed,ab,sampling] [--families vim,...]
        [--micro-batch vim-base=32] [--parallel 3] [--bf16 (dry run)] [--work DIR --keep-work]

Steps, in this order (``--only`` picks kinds; ``correctness`` is one step per family):

1. ``env``: Python, torch, CUDA, cuDNN, NCCL, DeepSpeed (and whether it is a tested release), the
   GPU's name, memory and compute capability, and the version of every package the run imports.
2. ``correctness-FAMILY`` for vit-vqgan (StyleGAN2 discriminator, LPIPS with random weights),
   vqgan-f16 (PatchGAN), mq-vae, vim, t2i-prior and stackformer. Each family's ``-tiny`` twin and
   a base-width preset (the base recipe; the transformers cut to 2 blocks so that the CPU
   reference stays cheap, the convolutional nets whole) trains 4 steps (micro batch 2; 4 for the
   prior twins) with the real ``Trainer`` in bf16 (``deepspeed.bf16=true``) under ZeRO-2 and
   ZeRO-3 (``deepspeed.zero_stage``; a GAN's discriminator keeps its recipe's stage, since R1 needs
   a double backward) with a checkpoint after step 2, and is checked for:
   * finite losses at every step, no skipped optimizer step;
   * the loss of step 1 against the same run in fp32 on CPU (same seed, data, loader and config;
     computed by a process started at the beginning of the step): ``|bf16 - fp32| <= rtol * |fp32|
     + atol`` with rtol 2% for priors and 5% for tokenizers, atol 1e-3 (:data:`TOLERANCE`);
   * resume: a copy of the run stopped after its step-2 checkpoint resumes and logs every loss
     of steps 3 and 4 bit-identically to the uninterrupted run (step 3 checks what a forward reads
     of the checkpoint: weights, RNG, data position; step 4 also the optimizer moments and LR) (on CUDA the step runs with
     ``torch.use_deterministic_algorithms(True, warn_only=True)`` and deterministic cuDNN);
   * a sample decoded from the exported package (``pretrain.resolve.as_package``): priors sample 2
     images with guidance 2 through ``pretrain.sample.sample_images`` and decode them with a
     random-weight tokenizer of the matching grid and codebook; tokenizers encode and decode images.
   Dropout (and class/caption dropout) is off in these runs: CPU and CUDA draw different random
   numbers, and the reference comparison needs the same forward.
3. ``speed``: ``benchmarks/bench_train.py``'s measurement (``_run_config``: the real Trainer,
   objective, EMA and streaming loader over synthetic shards) for VIM-Base under ZeRO-3 and ZeRO-2
   with selective activation checkpointing, and ViT-VQGAN-Base with all its losses (LPIPS,
   StyleGAN2 from step 0) with selective checkpointing. The micro batch fills the GPU: a probe at
   micro batch 8 gives the memory that stays between steps and the peak, and the batch is the one
   whose linear extrapolation reaches :data:`FILL_FRACTION` of the GPU's memory (3/4 of it again
   on an out-of-memory error); ``--micro-batch CONFIG=N`` fixes it. Step time, images/s,
   tokens/s, MFU against the datasheet peak and against the bf16 matmul measured in this run
   (``pretrain.flops.matmul_peak``), data wait from the real loader, peak memory.
4. ``ab``: in one process, each config's base run and its variants at the speed step's micro
   batch (:data:`AB`, in this order): VIM-Base (ZeRO-2) with ``deepspeed.reduce_bucket_size=5e7``
   and with ``zero_optimization.use_multi_rank_bucket_allreduce=false`` (the two bucket settings
   RESULTS.md names as candidates), ViT-VQGAN-Base and VQGAN-f16 (micro batch 8) with
   ``data.channels_last=false``, and last VIM-Base with ``compile=true`` (its build may take
   minutes). Ratio of images/s, variant over base.
5. ``sampling``: ``benchmarks/bench_sampling.py`` for VIM-Base (24 blocks, 1,024 tokens) in bf16
   with guidance 2: KV-cached tokens/s at batch 1 and 64, and the speed-up over recomputing.

Budgets: each step gets a share of ``--budget-s`` (:data:`SHARES`; 540 s by default) plus what
earlier steps left unused, never eating into the 10 s each later step is guaranteed; the six
correctness families share one budget and run ``--parallel`` at a time (3 on a GPU: each is
mostly process start, engine builds and checkpoints, and its CPU reference needs cores). A step
runs in a child process (its own session, so its loader workers and its CPU reference die with
it) that is killed at its budget; it writes its partial result after every sub-run, so a killed
step still reports what it finished (status ``timeout``).

Output under ``--out`` (default ``$OUT`` if set, else ``benchmarks/results/gpu_check/``), seven files
(the device tool brings back at most eight): ``env.json``, ``correctness.json`` (one entry per
family step), ``speed.json``, ``ab.json``, ``sampling.json``, ``summary.json`` (per step: status,
seconds, budget and a one-line summary) and ``gpu_check.log`` (every child's output). Status per
step: ``ok``, ``fail`` (a check failed), ``incomplete`` (a check could not run within the budget),
``timeout``, ``error`` (an exception; its traceback is in the log and in the step's JSON).

``--dry-run`` runs every step with tiny shapes on CPU with gloo (``DS_ACCELERATOR=cpu``) in fp32,
one family at a time: the -tiny twins only in correctness, the -tiny twins of the speed configs at
micro batch 4 (the probe runs; there is no CUDA memory to extrapolate), the A/B variants on the
twins but ``compile=true`` (inductor's cold CPU build alone takes ~45 s of 2 cores; compile is
tested by tests/test_compile.py) and ``bench_sampling`` on vim-base-tiny. Its reference comparison
is fp32 against fp32. ``--dry-run --bf16`` trains in bf16 on CPU as on the GPU (DeepSpeed's CPU
accelerator has bf16), against the same fp32 reference: dtype faults show before a GPU session.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# ---- what runs ---------------------------------------------------------------------------------

# family -> stage, the recipe of each size and the base size's changes; a prior's tokenizer for
# the decoded sample: a registry preset (random weights) with the prior's grid and codebook.
FAMILIES: dict[str, dict[str, Any]] = {
    "vit-vqgan": {"stage": "tokenizer", "tiny": "vit-vqgan-ss-tiny", "base": "vit-vqgan-bb",
                  "base_sets": ["model.enc_depth=2", "model.dec_depth=2"]},
    "vqgan-f16": {"stage": "tokenizer", "tiny": "vqgan-f16-tiny", "base": "vqgan-f16", "base_sets": []},
    "mq-vae": {"stage": "tokenizer", "tiny": "mq-vae-f8-tiny", "base": "mq-vae-f8", "base_sets": []},
    "vim": {"stage": "prior", "tiny": "vim-base-tiny", "base": "vim-base",
            "base_sets": ["model.transformer.depth=2"],
            "no_dropout": ["model.transformer.dropout=0", "model.class_dropout=0"],
            "tokenizer": {"tiny": ("vit-vqgan-ss-tiny", {"image_size": 16}),
                          "base": ("vit-vqgan-bb", {"enc_depth": 1, "dec_depth": 1})},
            "condition": {"class_label": 1}},
    "t2i-prior": {"stage": "prior", "tiny": "t2i-prior-1b-tiny", "base": "t2i-prior-1b",
                  "base_sets": ["model.transformer.depth=2", 'model.text_encoder_overrides={"pretrained": false}'],
                  "no_dropout": ["model.transformer.dropout=0", "model.caption_dropout=0"],
                  "tokenizer": {"tiny": ("vit-vqgan-ss-tiny", {"image_size": 16}),
                                "base": ("vit-vqgan-bb", {"enc_depth": 1, "dec_depth": 1})},
                  "condition": {"prompt": "a photo of a red bird"}},
    "stackformer": {"stage": "prior", "tiny": "stackformer-base-tiny", "base": "stackformer-base",
                    "base_sets": ["model.code_transformer.depth=2", "model.position_transformer.depth=2"],
                    "no_dropout": ["model.code_transformer.dropout=0", "model.code_transformer.attn_dropout=0",
                                   "model.position_transformer.dropout=0",
                                   "model.position_transformer.attn_dropout=0", "model.class_dropout=0"],
                    "tokenizer": {"tiny": ("mq-vae-f8-tiny", {}), "base": ("mq-vae-f8", {})},
                    "condition": {"class_label": 1}},
}
STEPS_BEFORE_RESUME, STEPS = 2, 4
# step-1 loss, bf16 on the GPU against fp32 on CPU: |a - b| <= rtol * |b| + atol
TOLERANCE = {"prior": {"rtol": 0.02, "atol": 1e-3}, "tokenizer": {"rtol": 0.05, "atol": 1e-3}}
# speed: (row name, bench_train config, ZeRO stage or None for the recipe's, activation checkpointing)
SPEED = [("vim-base-zero3", "vim-base", 3, "selective"), ("vim-base-zero2", "vim-base", 2, "selective"),
         ("vit-vqgan-bb", "vit-vqgan-bb", None, "selective")]
FILL_FRACTION = 0.85          # of the GPU's memory that the extrapolated peak may reach
PROBE_MICRO = 8
# A/B: config -> (ZeRO stage or None for the recipe's, activation checkpointing); then the runs in
# the order they are made (a config's base run before its variants; compile, whose build may take
# a minute or more, last), each (config, variant name, overrides)
AB_CONFIGS = {"vim-base": (2, "selective"), "vit-vqgan-bb": (None, "selective"), "vqgan-f16": (None, "none")}
AB = [("vim-base", "base", []),
      ("vim-base", "reduce_bucket_size=5e7", ["deepspeed.reduce_bucket_size=50000000"]),
      ("vim-base", "multi_rank_bucket_allreduce=false",
       ["deepspeed.passthrough.zero_optimization.use_multi_rank_bucket_allreduce=false"]),
      ("vit-vqgan-bb", "base", []),
      ("vit-vqgan-bb", "channels_last=false", ["data.channels_last=false"]),
      ("vqgan-f16", "base", []),
      ("vqgan-f16", "channels_last=false", ["data.channels_last=false"]),
      ("vim-base", "compile=true", ["compile=true"])]
# budget shares (of --budget-s); correctness's share is split over its families
SHARES = {"env": 0.06, "correctness": 0.41, "speed": 0.22, "ab": 0.21, "sampling": 0.10}
KINDS = tuple(SHARES)
MIN_STEP_S = 10.0
OUT_FILES = {"env": "env.json", "correctness": "correctness.json", "speed": "speed.json", "ab": "ab.json",
             "sampling": "sampling.json"}
_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
              "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def kind_of(step: str) -> str:
    return step.split("-", 1)[0]


def step_names(kinds, families=tuple(FAMILIES)) -> list[str]:
    names = []
    for k in KINDS:
        if k in kinds:
            names += [f"correctness-{f}" for f in FAMILIES if f in families] if k == "correctness" else [k]
    return names


def step_share(step: str) -> float:
    k = kind_of(step)
    return SHARES[k] / (len(FAMILIES) if k == "correctness" else 1)


# ---- small helpers -----------------------------------------------------------------------------

def write_json_atomic(path: str, obj: Any) -> None:
    from data_pipeline import storage       # (imported when first written: the orchestrator starts on the stdlib)

    storage.write_text(path, json.dumps(obj, indent=2, default=_json_default, allow_nan=True))


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def within(a: float, ref: float, rtol: float, atol: float) -> bool:
    return finite(a) and finite(ref) and abs(a - ref) <= rtol * abs(ref) + atol


def fill_micro(probe_micro: int, resting_gb: float, peak_gb: float, capacity_gb: float,
               fraction: float = FILL_FRACTION, cap: int = 512) -> int:
    """The micro batch whose peak memory, extrapolated linearly from a probe (``resting`` stays
    between steps: weights, master copy, optimizer state; the rest of ``peak`` grows with the
    batch), reaches ``fraction`` of ``capacity``; at least the probe's, at most ``cap``."""
    per_sample = max(1e-6, (peak_gb - resting_gb) / probe_micro)
    room = fraction * capacity_gb - resting_gb
    return int(max(probe_micro, min(cap, math.floor(room / per_sample))))


def child_env(cpu: bool, threads: int | None = None) -> dict[str, str]:
    """The environment of a step's process: the repository importable, no launcher variables
    (each process starts its own single-rank group on a free port), CPU runs hidden from CUDA."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


class Partial:
    """A step's result, written to its JSON after every change (a killed step still reports)."""

    def __init__(self, path: str, **fields):
        self.path, self.data = path, {"status": "running", **fields}
        self.save()

    def __getitem__(self, k):
        return self.data[k]

    def set(self, **fields) -> None:
        self.data.update(fields)
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)


def losses_by_step(run_dir: str, skip_lines: int = 0) -> dict[int, dict[str, float]]:
    """Step -> every logged value whose name holds "loss", plus the guard counters, from
    ``metrics.jsonl`` (the lines after ``skip_lines``; a later line of a step wins)."""
    out: dict[int, dict[str, float]] = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path) as f:
        lines = [x for x in f.read().splitlines() if x.strip()]
    for line in lines[skip_lines:]:
        d = json.loads(line)
        keep = {k: v for k, v in d.items() if "loss" in k or k.startswith("guard/")}
        if "loss" in keep:
            out[int(d["step"])] = keep
    return out


def metric_lines(run_dir: str) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for x in f if x.strip())


# ---- data --------------------------------------------------------------------------------------

def _build_once(root: str, build: Callable[[str], Any]) -> str:
    if not os.path.isdir(root):
        tmp = f"{root}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        try:
            os.replace(tmp, root)
        except OSError:            # a step running beside this one built it first
            if not os.path.isdir(root):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def image_data(work: str, n: int = 48) -> str:
    from benchmarks.bench_loader import build_dataset

    return _build_once(os.path.join(work, "data", "images"), lambda d: build_dataset(d, n, per_shard=12))


def code_data(work: str, name: str, grid, codebook: int, classes: int, kept: int | None, n: int = 48) -> str:
    from benchmarks.bench_train import write_codes

    return _build_once(os.path.join(work, "data", f"codes-{name}"),
                       lambda d: write_codes(d, n, tuple(grid), codebook, classes, per=12, kept=kept))


def tokenizer_package(work: str, family: str, size: str) -> str:
    """A random-weight tokenizer package with the prior's grid and codebook (its decoded sample)."""
    import torch

    from model_zoo.package import save_package
    from model_zoo.registry import create_model

    preset, kw = FAMILIES[family]["tokenizer"][size]

    def build(d: str) -> None:
        torch.manual_seed(0)
        save_package(create_model(preset, **kw), d)

    return _build_once(os.path.join(work, "data", f"tok-{family}-{size}"), build)


# ---- correctness: the run configs -----------------------------------------------------------------

def _meta_model(recipe: str, sets: list[str]):
    import torch

    from pretrain.config import apply_overrides
    from pretrain.models import model_from_config
    from pretrain.recipes import get_recipe

    cfg = apply_overrides(get_recipe(recipe), sets)
    with torch.device("meta"):
        return model_from_config(cfg)


def correctness_config(family: str, size: str, zero_stage: int, run_dir: str, work: str, *, cpu_fp32: bool,
                       workers: int, steps: int = STEPS, checkpoint_every: int = STEPS_BEFORE_RESUME):
    """The run config of one correctness run (and, with ``cpu_fp32``, of its reference)."""
    from pretrain.config import apply_overrides
    from pretrain.recipes import get_recipe

    spec = FAMILIES[family]
    recipe = spec[size]
    micro = 2 if size == "base" or spec["stage"] == "tokenizer" else 4
    model_sets = list(spec["base_sets"]) if size == "base" else []
    model_sets += spec.get("no_dropout", [])
    bf16 = "false" if cpu_fp32 else "true"
    sets = [f"run_dir={run_dir}", f"steps={steps}", f"global_batch_size={micro}", f"micro_batch_size={micro}",
            f"data.num_workers={workers}", "validation.every=0", "validation.visuals_every=0", "log.every=1",
            "log.progress=false", f"checkpoint.every={checkpoint_every}", "checkpoint.keep_last=5",
            f"deepspeed.zero_stage={zero_stage}", f"deepspeed.bf16={bf16}"]
    if spec["stage"] == "tokenizer":
        # the GAN from step 1; LPIPS with random weights at the base recipe's weight in the base
        # sizes and the ViT twin (the CNN twins keep their recipe's: no LPIPS, which at 64 px would
        # cost most of a CPU dry run)
        sets += ["tokenizer_loss.perceptual_pretrained=false", "discriminator.start_step=0",
                 f"discriminator.deepspeed.bf16={bf16}"]
        if size == "base" or family == "vit-vqgan":
            sets += [f"tokenizer_loss.perceptual={get_recipe(spec['base']).tokenizer_loss.perceptual}"]
        model = _meta_model(recipe, model_sets)
        sets += [f"data.url={image_data(work)}", f"data.resolution={int(model.image_size)}"]
    else:
        model = _meta_model(recipe, model_sets)
        kept = int(model.num_tokens) if family == "stackformer" else None
        classes = min(10, int(getattr(model, "num_classes", 10) or 10))
        data = code_data(work, f"{family}-{size}", model.grid_size, int(model.codebook_size), classes, kept)
        sets += [f"data.url={data}", f"tokenizer={tokenizer_package(work, family, size)}"]
    return recipe, apply_overrides(get_recipe(recipe), sets + model_sets)


def _fit(cfg) -> Any:
    from pretrain.trainer import Trainer

    return Trainer(cfg, progress=False).fit()


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _stopped_copy(run_dir: str, dest: str, at: int) -> None:
    """``run_dir`` as a run stopped right after its checkpoint of step ``at``."""
    from pretrain.checkpoint import step_name

    keep = step_name(at)
    shutil.copytree(run_dir, dest, ignore=lambda d, names: [
        n for n in names if os.path.basename(d) == "checkpoints" and n.startswith("step_") and n != keep])
    with open(os.path.join(dest, "checkpoints", "latest"), "w") as f:
        f.write(keep + "\n")


def decode_sample(family: str, run_dir: str, device: str, png: str) -> dict[str, Any]:
    """Export the run's latest step as a zoo package and decode a sample from it."""
    import torch

    from model_zoo.grids import save_grid
    from pretrain.resolve import as_package

    spec = FAMILIES[family]
    t0 = time.perf_counter()
    if spec["stage"] == "prior":
        from model_zoo.package import load_prior_with_tokenizer
        from model_zoo.sampling import SamplingConfig
        from pretrain.sample import sample_images

        url = as_package(run_dir, kind="prior")
        prior, tok = load_prior_with_tokenizer(url, device=device)
        sampling = SamplingConfig(top_k=100, top_p=0.95, guidance_scale=2.0)
        images, gen_s = sample_images(prior, tok, 2, sampling, seed=0, batch_size=2, progress=False,
                                      **spec["condition"])
        extra = {"generate_s": gen_s, "tokens": int(prior.num_tokens), "guidance": 2.0}
    else:
        from model_zoo.package import load_package

        url = as_package(run_dir, kind="tokenizer")
        tok = load_package(url, device=device).eval()
        g = torch.Generator().manual_seed(0)
        x = torch.rand(2, 3, tok.image_size, tok.image_size, generator=g).mul(2).sub(1).to(device)
        with torch.no_grad():
            tokens = tok.encode(x)
            images = tok.decode(tokens.codes, tokens.positions).float().cpu()
        extra = {"codes_shape": list(tokens.codes.shape)}
    save_grid(images.clamp(-1, 1), png)
    return {"ok": bool(torch.isfinite(images).all()), "shape": list(images.shape), "png": png,
            "min": float(images.min()), "max": float(images.max()), "seconds": time.perf_counter() - t0,
            "package": url, **extra}


def compare_resume(want: dict[int, dict[str, float]], got: dict[int, dict[str, float]],
                   resumed_from: int | None) -> dict[str, Any]:
    """Every loss of every step after the resume against the uninterrupted run's. The first step
    after it tests what the checkpoint restores for a forward (weights, RNG, data position); the
    second one also the optimizer's moments and the LR schedule (its loss follows their update)."""
    per_step = {}
    for step in range(STEPS_BEFORE_RESUME + 1, STEPS + 1):
        w, g = want.get(step, {}), got.get(step, {})
        keys = sorted(k for k in w if "loss" in k)
        diffs = [abs(g[k] - w[k]) for k in keys if finite(g.get(k)) and finite(w[k])]
        per_step[str(step)] = {"bit_identical": bool(keys) and all(g.get(k) == w[k] for k in keys),
                               "max_abs_diff": max(diffs, default=None), "loss": g.get("loss"),
                               "uninterrupted": w.get("loss"), "compared": keys}
    return {"resumed_from": resumed_from, "steps_logged": sorted(got), "per_step": per_step,
            "bit_identical": resumed_from == STEPS_BEFORE_RESUME and all(v["bit_identical"]
                                                                         for v in per_step.values())}


def _set_deterministic() -> None:
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")      # before the first cuBLAS call
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def run_reference(args) -> None:
    """The fp32 CPU reference of one family: step 1 of each size (its own process, CPU only)."""
    family, sizes = args.family, args.sizes.split(",")
    _set_threads(args.threads)
    for size in sizes:
        run = os.path.join(args.work, "runs", f"{family}-{size}-ref")
        shutil.rmtree(run, ignore_errors=True)
        _, cfg = correctness_config(family, size, 2, run, args.work, cpu_fp32=True, workers=args.workers,
                                    steps=1, checkpoint_every=0)
        t0 = time.perf_counter()
        _fit(cfg)
        write_json_atomic(os.path.join(args.work, "ref", f"{family}-{size}.json"),
                          {"family": family, "size": size, "losses": losses_by_step(run).get(1, {}),
                           "seconds": time.perf_counter() - t0, "precision": "fp32", "device": "cpu"})
        shutil.rmtree(run, ignore_errors=True)
        _free_memory()


def _set_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def step_correctness(args, family: str, part: Partial, deadline: float) -> None:
    import torch

    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
    device = "cuda" if cuda else "cpu"
    fp32 = not cuda and not args.bf16
    sizes = ["tiny"] if args.dry_run else ["base", "tiny"]      # on a GPU the base width first: it tells more
    stages = [3, 2]
    spec = FAMILIES[family]
    tol = TOLERANCE[spec["stage"]]
    part.set(family=family, stage=spec["stage"], sizes=sizes, zero_stages=stages,
             precision="fp32 (dry run on CPU)" if fp32 else "bf16" + ("" if cuda else " (dry run on CPU)"),
             tolerance=tol, runs=[], samples={},
             reference={"status": "running"})
    # data and packages first (the reference reads them), then the reference in its own process
    for size in sizes:
        correctness_config(family, size, 2, "unused", args.work, cpu_fp32=True, workers=args.workers)
    # half the cores for the references of the families running at once, the rest for the loaders
    ref_threads = max(1, (os.cpu_count() or 2) // (2 * max(1, args.parallel))) if cuda else 1
    ref_log = open(os.path.join(args.work, f"ref-{family}.log"), "w")
    ref = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--reference", "--family", family, "--sizes", ",".join(sizes),
         "--work", args.work, "--workers", str(args.workers), "--threads", str(ref_threads)]
        + (["--dry-run"] if args.dry_run else []),
        env=child_env(cpu=True, threads=ref_threads), cwd=ROOT, stdout=ref_log, stderr=subprocess.STDOUT)
    _set_deterministic()
    runs = []
    try:
        for size in sizes:
            for stage in stages:
                if time.time() > deadline:
                    runs.append({"size": size, "zero_stage": stage, "status": "skipped (budget)"})
                    part.set(runs=runs)
                    continue
                row: dict[str, Any] = {"size": size, "zero_stage": stage}
                runs.append(row)
                t0 = time.perf_counter()
                run = os.path.join(args.work, "runs", f"{family}-{size}-z{stage}")
                shutil.rmtree(run, ignore_errors=True)
                recipe, cfg = correctness_config(family, size, stage, run, args.work, cpu_fp32=fp32,
                                                 workers=args.workers)
                row.update(recipe=recipe, micro_batch=cfg.micro_batch_size)
                try:
                    result = _fit(cfg)
                    ref_losses = losses_by_step(run)
                    row.update(state=result.state, steps=sorted(ref_losses), losses={
                        s: v.get("loss") for s, v in ref_losses.items()},
                        step1=ref_losses.get(1, {}), fit_s=time.perf_counter() - t0)
                    row["finite"] = (sorted(ref_losses) == list(range(1, STEPS + 1)) and all(
                        finite(x) for v in ref_losses.values() for k, x in v.items() if "loss" in k)
                        and all(v.get("guard/skipped_steps", 0) == 0 and v.get("guard/nonfinite_losses", 0) == 0
                                for v in ref_losses.values()))
                    part.set(runs=runs)
                    # resume: the run as stopped after its step-2 checkpoint, continued to the end
                    _free_memory()
                    resumed = run + "-resumed"
                    shutil.rmtree(resumed, ignore_errors=True)
                    _stopped_copy(run, resumed, STEPS_BEFORE_RESUME)
                    before = metric_lines(resumed)
                    t1 = time.perf_counter()
                    rcfg = dataclasses.replace(cfg, run_dir=resumed,
                                               checkpoint=dataclasses.replace(cfg.checkpoint, every=0))
                    res2 = _fit(rcfg)
                    row["resume"] = compare_resume(ref_losses, losses_by_step(resumed, skip_lines=before),
                                                   res2.resumed_from)
                    row["resume"]["seconds"] = time.perf_counter() - t1
                    part.set(runs=runs)
                    if size not in part.data["samples"]:       # once per size, from its first run
                        _free_memory()
                        png = os.path.join(args.work, "samples", f"{family}-{size}.png")
                        try:
                            part.data["samples"][size] = decode_sample(family, run, device, png)
                        except Exception as e:  # noqa: BLE001 - reported, the other checks go on
                            part.data["samples"][size] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                                          "traceback": traceback.format_exc()[-3000:]}
                except Exception as e:  # noqa: BLE001 - one run's failure is a result; the next runs
                    row.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
                    print(traceback.format_exc(), flush=True)
                row["seconds"] = time.perf_counter() - t0
                part.set(runs=runs)
                _free_memory()
                if not args.keep_work:     # checkpoints of the base widths: GBs each, 16 runs
                    for d in (run, run + "-resumed"):
                        shutil.rmtree(d, ignore_errors=True)
        # the reference: wait for it within the budget
        left = max(1.0, deadline - time.time())
        try:
            ref.wait(timeout=left)
        except subprocess.TimeoutExpired:
            pass
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.wait()
        ref_log.close()
    refs = {s: read_json(os.path.join(args.work, "ref", f"{family}-{s}.json")) for s in sizes}
    part.data["reference"] = {"status": "ok" if all(refs.values()) else f"missing (exit {ref.returncode})",
                              "log_tail": _tail(os.path.join(args.work, f"ref-{family}.log"), 40)
                              if not all(refs.values()) else None,
                              **{s: r for s, r in refs.items() if r}}
    for row in runs:
        r = refs.get(row["size"])
        if r and "step1" in row:
            a, b = row["step1"].get("loss"), r["losses"].get("loss")
            row["vs_reference"] = {"loss": a, "reference": b, "abs_diff": abs(a - b) if finite(a) and finite(b) else None,
                                   "rel_diff": abs(a - b) / abs(b) if finite(a) and finite(b) and b else None,
                                   "within_tolerance": within(a, b, **tol),
                                   "per_key": {k: {"loss": row["step1"].get(k), "reference": v}
                                               for k, v in r["losses"].items() if "loss" in k}}
    part.set(runs=runs, status=_correctness_status(runs, part.data["samples"], sizes))


def _correctness_status(runs: list[dict], samples: dict, sizes: list[str]) -> str:
    if any("error" in r for r in runs):
        return "fail"
    bad = [r for r in runs if "finite" in r and (not r["finite"] or not r.get("resume", {}).get("bit_identical")
                                                  or ("vs_reference" in r and not r["vs_reference"]["within_tolerance"]))]
    if bad or any(s and not s.get("ok") for s in samples.values()):
        return "fail"
    complete = all("finite" in r and "resume" in r and "vs_reference" in r for r in runs) and all(
        s in samples for s in sizes)
    return "ok" if complete else "incomplete"


def _tail(path: str, n: int) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


# ---- speed and A/B: bench_train's measurement ---------------------------------------------------------

def _bench_args(args, micro: int, act_ckpt: str, sets: list[str], steps: int, warmup: int):
    return argparse.Namespace(small=args.dry_run, micro_batch=micro, warmup=warmup, steps=steps,
                              workers=args.workers, compile=False, act_ckpt=act_ckpt, set=list(sets))


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


class Bench:
    """bench_train's measurement in this process: the matmul ceiling and datasheet peak once."""

    def __init__(self, args):
        import torch

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        from pretrain.distributed import init_distributed
        from pretrain.flops import matmul_peak, peak_flops

        init_distributed(timeout_s=600)
        self.cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
        self.device = torch.device("cuda" if self.cuda else "cpu")
        dtype = torch.bfloat16 if self.cuda else torch.float32
        self.matmul = matmul_peak(self.device, dtype, sizes=None if self.cuda else (256, 512), seconds=0.5 if
                                  self.cuda else 0.1)
        self.peak = peak_flops(self.device, args.peak_tflops or None)
        self.capacity_gb = (torch.cuda.get_device_properties(0).total_memory / 2**30) if self.cuda else None
        self.args = args
        self.n = 0

    def run(self, config: str, micro: int, act_ckpt: str, sets: list[str], steps: int, warmup: int,
            work: str, variant: list[str] | None = None) -> dict:
        from benchmarks.bench_train import _run_config

        self.n += 1
        _free_memory()            # what an out-of-memory error of the last run left (its traceback is gone now)
        bargs = _bench_args(self.args, micro, act_ckpt, sets, steps, warmup)
        t0 = time.perf_counter()
        try:
            row = _run_config(config, bargs, work, self.device, self.matmul, self.peak, list(variant or []),
                              f"g{self.n}")
        finally:
            _free_memory()
        row["seconds"] = time.perf_counter() - t0      # the whole call: data, build, warm-up, timed steps
        return row

    def run_fitting(self, config: str, micro: int, act_ckpt: str, sets: list[str], steps: int, warmup: int,
                    work: str, variant: list[str] | None = None, tries: int = 3) -> tuple[dict | None, list]:
        """``run``, at 3/4 of the micro batch again after an out-of-memory error."""
        ooms = []
        for _ in range(tries):
            try:
                return self.run(config, micro, act_ckpt, sets, steps, warmup, work, variant), ooms
            except Exception as e:  # noqa: BLE001
                if not (self.cuda and _is_oom(e)) or micro <= 1:
                    raise
                ooms.append(micro)
                print(f"[gpu_check] {config} micro batch {micro}: out of memory; trying {max(1, micro * 3 // 4)}",
                      flush=True)
                micro = max(1, micro * 3 // 4)
        return None, ooms


def _bf16_sets(args) -> list[str]:
    """A ``--bf16`` dry run trains in bf16 on CPU too (on a GPU the recipes' "auto" is bf16)."""
    return ["deepspeed.bf16=true", "discriminator.deepspeed.bf16=true"] if args.dry_run and args.bf16 else []


def _speed_row(r: dict) -> dict:
    keys = ("config", "micro_batch", "step_time_s", "images_per_s", "tokens_per_s", "achieved_tflops", "mfu_vs_peak",
            "mfu_vs_matmul", "data_wait_fraction", "peak_memory_gb", "resting_memory_gb", "bf16", "act_ckpt",
            "overrides", "discriminator_steps", "channels_last", "flops_per_sample", "parameters", "seconds")
    return {k: r.get(k) for k in keys}


def _micro_flags(args) -> dict[str, int]:
    out = {}
    for item in args.micro_batch:
        k, _, v = item.partition("=")
        out[k.strip()] = int(v)
    return out


def step_speed(args, part: Partial, deadline: float) -> None:
    bench = Bench(args)
    fixed = _micro_flags(args)
    steps, warmup = (3, 1) if args.dry_run else (args.speed_steps, 3)
    part.set(device=_device_name(), matmul=bench.matmul, peak_flops=bench.peak, capacity_gb=bench.capacity_gb,
             fill_fraction=FILL_FRACTION, steps=steps, warmup=warmup, rows=[], probes=[], errors=[])
    found: dict[str, int] = {}
    for name, config, stage, act in SPEED:
        if time.time() > deadline:
            part.data["errors"].append(f"{name}: skipped (budget)")
            part.save()
            continue
        sets = ([f"deepspeed.zero_stage={stage}"] if stage is not None else []) + _bf16_sets(args)
        work = os.path.join(args.work, "speed", name)
        try:
            micro = fixed.get(name) or fixed.get(config) or found.get(config)
            how = "flag" if (fixed.get(name) or fixed.get(config)) else ("as " + [n for n, c, *_ in SPEED if c ==
                                                                                  config][0]) if micro else None
            if micro is None:
                probe, ooms = bench.run_fitting(config, 4 if args.dry_run else PROBE_MICRO, act, sets, 2, 1,
                                                work + "-probe")
                p = _speed_row(probe)
                part.data["probes"].append({"name": name, **p, "ooms": ooms})
                part.save()
                if bench.cuda and p["resting_memory_gb"] is not None:
                    micro = fill_micro(p["micro_batch"], p["resting_memory_gb"], p["peak_memory_gb"],
                                       bench.capacity_gb)
                    how = (f"fills {FILL_FRACTION:.0%} of {bench.capacity_gb:.0f} GiB by the probe at "
                           f"{p['micro_batch']} (resting {p['resting_memory_gb']:.1f} GiB, peak "
                           f"{p['peak_memory_gb']:.1f} GiB)")
                else:
                    micro, how = p["micro_batch"], "the probe's (no CUDA memory to extrapolate)"
            row, ooms = bench.run_fitting(config, micro, act, sets, steps, warmup, work)
            found[config] = row["micro_batch"]
            part.data["rows"].append({"name": name, "zero_stage": stage, "micro_batch_source": how,
                                      "ooms": ooms, **_speed_row(row)})
        except Exception as e:  # noqa: BLE001 - the next config still runs
            part.data["errors"].append(f"{name}: {type(e).__name__}: {e}")
            print(traceback.format_exc(), flush=True)
        part.save()
    done = {r["name"] for r in part.data["rows"]}
    status = "ok" if done == {n for n, *_ in SPEED} else ("fail" if any(": " in e and "skipped" not in e
                                                                        for e in part.data["errors"]) else
                                                           "incomplete")
    part.set(status=status)


def step_ab(args, part: Partial, deadline: float) -> None:
    bench = Bench(args)
    fixed = _micro_flags(args)
    speed = read_json(os.path.join(args.work, "steps", "speed.json")) or {}
    speed_micro = {r["config"]: r["micro_batch"] for r in speed.get("rows", [])}
    steps, warmup = (2, 1) if args.dry_run else (args.speed_steps, 3)
    part.set(device=_device_name(), steps=steps, warmup=warmup, rows=[], ratios={}, errors=[], dry_run_skipped=[])
    base: dict[str, dict] = {}
    for config, vname, variant in AB:
        stage, act = AB_CONFIGS[config]
        micro = fixed.get(config) or speed_micro.get(config) or (4 if args.dry_run else PROBE_MICRO)
        sets = ([f"deepspeed.zero_stage={stage}"] if stage is not None else []) + _bf16_sets(args)
        work = os.path.join(args.work, "ab", config)        # the base run's data is reused by its variants
        if time.time() > deadline:
            part.data["errors"].append(f"{config} {vname}: skipped (budget)")
            part.save()
            continue
        if vname != "base" and config not in base:
            part.data["errors"].append(f"{config} {vname}: skipped (no base run)")
            continue
        if args.dry_run and "compile=true" in variant:
            # inductor's cold CPU build of even the tiny twin takes ~45 s of a 2-core dry run;
            # compile itself is tested on CPU by tests/test_compile.py and tests/test_benchmarks.py
            part.data["dry_run_skipped"].append(f"{config} {vname}")
            continue
        try:
            row = bench.run(config, micro, act, sets, steps, warmup, work, variant)
            part.data["rows"].append({"variant": vname, "zero_stage": stage, **_speed_row(row)})
            if vname == "base":
                base[config] = row
            else:
                part.data["ratios"][f"{config} {vname}"] = row["images_per_s"] / base[config]["images_per_s"]
        except Exception as e:  # noqa: BLE001
            part.data["errors"].append(f"{config} {vname}: {type(e).__name__}: {e}")
            print(traceback.format_exc(), flush=True)
        part.save()
    want = sum(v != "base" for _, v, _ in AB) - len(part.data["dry_run_skipped"])
    errors = [e for e in part.data["errors"] if "skipped" not in e]
    part.set(status="fail" if errors else ("ok" if len(part.data["ratios"]) == want else "incomplete"))


def step_sampling(args, part: Partial, deadline: float) -> None:
    import torch

    from benchmarks.bench_sampling import main as bench_sampling

    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
    out = os.path.join(args.work, "bench_sampling.json")
    if args.dry_run:
        argv = ["--preset", "vim-base-tiny", "--depth", "0", "--tokens", "16", "--batch", "1", "--cfg", "2.0",
                "--sweep-batches", "1,4", "--repeats", "1", "--device", "cpu",
                "--dtype", "bfloat16" if args.bf16 else "float32"]
    else:
        argv = ["--preset", "vim-base", "--depth", "0", "--tokens", "1024", "--batch", "1", "--cfg", "2.0",
                "--sweep-batches", "1,64", "--repeats", "2", "--device", "cuda" if cuda else "cpu",
                "--dtype", "bfloat16" if cuda else "float32"]
    part.set(argv=argv)
    bench_sampling(argv + ["--out", out])
    r = read_json(out) or {}
    by_batch = {b["batch"]: b for b in r.get("batches", [])}
    part.set(result=r, kv_tokens_per_s={str(b): v["tokens_per_s"] for b, v in by_batch.items()},
             speedup=r.get("speedup"), identical_samples=r.get("identical_samples"),
             status="ok" if r.get("identical_samples") and by_batch and all(
                 finite(v["tokens_per_s"]) for v in by_batch.values()) else "fail")


def _device_name() -> str:
    import torch

    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


# ---- env ---------------------------------------------------------------------------------------

# (import name, distribution) of what a run imports, checked on the GPU machine
PACKAGES = [("torch", "torch"), ("deepspeed", "deepspeed"), ("numpy", "numpy"), ("PIL", "pillow"),
            ("braceexpand", "braceexpand"), ("fsspec", "fsspec"), ("safetensors", "safetensors"),
            ("open_clip", "open_clip_torch"), ("ftfy", "ftfy"), ("torchvision", "torchvision"),
            ("tensorboard", "tensorboard"), ("tqdm", "tqdm"), ("pydantic", "pydantic"), ("hjson", "hjson"),
            ("sklearn", "scikit-learn"), ("skimage", "scikit-image"), ("scipy", "scipy")]


def step_env(args, part: Partial, deadline: float) -> None:
    import importlib
    import importlib.metadata

    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable,
                            "torch": torch.__version__, "cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available(), "dry_run": args.dry_run,
                            "ds_accelerator": os.environ.get("DS_ACCELERATOR", "")}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=p.total_memory / 2**30,
                    capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                    cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported())
        try:
            v = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as e:  # noqa: BLE001
            info["nccl"] = f"unknown ({e})"
    packages, missing = {}, []
    for mod, dist in PACKAGES:
        try:
            m = importlib.import_module(mod)
            try:
                v = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                v = getattr(m, "__version__", "?")
            packages[dist] = {"version": v, "from": os.path.dirname(getattr(m, "__file__", "") or "")}
        except Exception as e:  # noqa: BLE001
            packages[dist] = {"error": f"{type(e).__name__}: {e}"}
            missing.append(dist)
    info["packages"] = packages
    from pretrain.runtime import TESTED_DEEPSPEED, check_deepspeed_version

    try:
        info["deepspeed"] = check_deepspeed_version()
        info["deepspeed_tested"] = True
    except Exception as e:  # noqa: BLE001
        info["deepspeed"], info["deepspeed_tested"] = packages.get("deepspeed", {}).get("version"), False
        info["deepspeed_error"] = str(e)
    info["tested_deepspeed"] = TESTED_DEEPSPEED
    if "deepspeed" not in missing:
        from deepspeed.accelerator import get_accelerator

        info["deepspeed_accelerator"] = get_accelerator().device_name()
    part.set(**info, missing=missing, status="ok" if not missing and info["deepspeed_tested"] else "fail")


CHILD_STEPS = {"env": step_env, "speed": step_speed, "ab": step_ab, "sampling": step_sampling}


def run_child(args) -> int:
    """``--step NAME``: one step in this process; its result goes to WORK/steps/KIND.json
    (correctness: WORK/steps/correctness-FAMILY.json)."""
    deadline = time.time() + max(1.0, args.step_budget_s - 5.0)
    part = Partial(os.path.join(args.work, "steps", f"{args.step}.json"), step=args.step, started=time.time())
    _set_threads(args.threads)
    if os.environ.get("VQSCALE_GPU_CHECK_HANG") == args.step:     # testing aid: a step that never ends
        part.set(hung=True)
        while True:
            time.sleep(60)
    try:
        if args.step.startswith("correctness-"):
            step_correctness(args, args.step.split("-", 1)[1], part, deadline)
        else:
            CHILD_STEPS[args.step](args, part, deadline)
    except Exception as e:  # noqa: BLE001 - the step's own outcome
        part.set(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-6000:])
        print(traceback.format_exc(), flush=True)
    part.set(seconds=time.time() - part["started"])
    sys.stdout.flush()
    sys.stderr.flush()
    # no interpreter teardown: a process group's C++ objects can abort there (pretrain/distributed.py)
    os._exit(0)


# ---- the orchestrator --------------------------------------------------------------------------

class Child:
    """One step's process (its own session: its loader workers and CPU reference die with it),
    its output in its own log file until it ends."""

    def __init__(self, step: str, budget: float, args):
        self.step, self.budget, self.args = step, budget, args
        self.path = os.path.join(args.work, "steps", f"{step}.json")
        if os.path.exists(self.path):
            os.remove(self.path)
        self.log_path = os.path.join(args.work, "logs", f"{step}.log")
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--step", step, "--work", args.work,
               "--step-budget-s", f"{budget:.0f}", "--workers", str(args.workers), "--threads", str(args.threads),
               "--speed-steps", str(args.speed_steps), "--peak-tflops", str(args.peak_tflops),
               "--parallel", str(args.parallel)] + (["--keep-work"] if args.keep_work else [])
        cmd += [f"--micro-batch={m}" for m in args.micro_batch] + (["--dry-run"] if args.dry_run else [])
        cmd += ["--bf16"] if args.bf16 else []
        self.t0 = time.time()
        self.deadline = self.t0 + budget
        self.killed = False
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, env=child_env(cpu=args.dry_run), cwd=ROOT, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def poll(self) -> bool:
        """True once the process ended (killed at its deadline)."""
        if self.proc.poll() is not None:
            return True
        if time.time() >= self.deadline:
            self.killed = True
            _kill_group(self.proc)
            return True
        return False

    def result(self, log) -> dict:
        # the loader workers and the reference share the child's session: none outlives it
        with_suppressed(lambda: os.killpg(self.proc.pid, signal.SIGKILL))
        seconds = time.time() - self.t0
        r = read_json(self.path) or {}
        if self.killed:
            r["status"] = "timeout"
        elif not r or r.get("status") in (None, "running"):
            r["status"] = "error"
            r.setdefault("error", f"the step's process exited with {self.proc.returncode} before writing its result")
        r.update(step=self.step, seconds=seconds, budget_s=self.budget, exit_code=self.proc.returncode)
        log.write(f"\n===== {self.step} (budget {self.budget:.0f} s): {r['status']} in {seconds:.1f} s =====\n")
        log.write(_tail(self.log_path, 10**6))
        log.flush()
        return r


def run_steps(steps: list[str], budget: float, parallel: int, args, log, report: Callable[[str, dict], None]) -> None:
    """Run ``steps``, up to ``parallel`` at once, all within ``budget`` seconds from now (a step
    started later gets what is left); ``report(step, result)`` as each ends."""
    deadline = time.time() + budget
    queue, running = list(steps), []
    while queue or running:
        while queue and len(running) < parallel:
            left = deadline - time.time()
            if left < 1:
                break
            step = queue.pop(0)
            print(f"[gpu_check] {step}: budget {left:.0f} s ...", flush=True)
            running.append(Child(step, left, args))
        if not running:
            break
        time.sleep(0.2)
        for c in [c for c in running if c.poll()]:
            running.remove(c)
            report(c.step, c.result(log))
    for step in queue:
        report(step, {"step": step, "status": "skipped", "seconds": 0.0, "budget_s": 0.0,
                      "error": "no time left in --budget-s"})


def _kill_group(p: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def with_suppressed(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except (ProcessLookupError, PermissionError):
        pass


def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def one_line(step: str, r: dict) -> str:
    """The summary column of ``step``'s result."""
    st = r.get("status")
    if r.get("error") and st in ("error",):
        return r["error"][:150]
    k = kind_of(step)
    if k == "env":
        mem = r.get("gpu_memory_gib")
        return (f"torch {r.get('torch')}, CUDA {r.get('cuda')}, deepspeed {r.get('deepspeed')}, "
                f"{r.get('gpu', 'no GPU')}{f' ({mem:.0f} GiB)' if mem else ''}"
                + (f"; missing {', '.join(r['missing'])}" if r.get("missing") else ""))
    if k == "correctness":
        runs = r.get("runs", [])
        fin = sum(bool(x.get("finite")) for x in runs)
        res = sum(bool(x.get("resume", {}).get("bit_identical")) for x in runs)
        vs = [x["vs_reference"] for x in runs if "vs_reference" in x]
        inside = sum(bool(v["within_tolerance"]) for v in vs)
        worst = max((v["rel_diff"] for v in vs if v.get("rel_diff") is not None), default=None)
        samples = r.get("samples", {})
        errs = [x["error"][:60] for x in runs if "error" in x]
        return (f"{fin}/{len(runs)} finite, {inside}/{len(vs)} within tol of fp32 (max rel diff "
                f"{_fmt(worst, '.1e')}), resume {res}/{len(runs)} bit-identical, samples "
                f"{sum(bool(s.get('ok')) for s in samples.values())}/{len(r.get('sizes', []))}"
                + (f"; {errs[0]}" if errs else ""))
    if k == "speed":
        parts = [f"{x['name']} mb{x['micro_batch']}: {_fmt(x['mfu_vs_peak'], '.1%')} MFU peak / "
                 f"{_fmt(x['mfu_vs_matmul'], '.1%')} matmul, {_fmt(x['images_per_s'], '.1f')} img/s, wait "
                 f"{_fmt(x['data_wait_fraction'], '.1%')}" for x in r.get("rows", [])]
        return "; ".join(parts + r.get("errors", [])[:2])[:400]
    if k == "ab":
        return ", ".join(f"{n} {v:.3f}x" for n, v in r.get("ratios", {}).items())[:400] or "; ".join(
            r.get("errors", [])[:2])
    if k == "sampling":
        kv = r.get("kv_tokens_per_s", {})
        return (", ".join(f"batch {b}: {_fmt(v, '.0f')} tok/s" for b, v in kv.items())
                + f"; cache speed-up {_fmt(r.get('speedup'), '.1f')}x")
    return ""


def units(steps: list[str]) -> list[list[str]]:
    """The steps grouped as they run: the correctness families together (``--parallel`` at once),
    every other step alone."""
    out: list[list[str]] = []
    for s in steps:
        if kind_of(s) == "correctness" and out and kind_of(out[-1][0]) == "correctness":
            out[-1].append(s)
        else:
            out.append([s])
    return out


def orchestrate(args) -> int:
    t_start = time.time()
    out = args.out
    os.makedirs(out, exist_ok=True)
    own_work = not args.work
    args.work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="vqs-gpu-check-"))
    os.makedirs(os.path.join(args.work, "steps"), exist_ok=True)
    kinds = [k for k in (args.only.split(",") if args.only else KINDS) if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise SystemExit(f"gpu_check: unknown step kind(s) {unknown}; choose from {', '.join(KINDS)}")
    families = [f for f in (args.families.split(",") if args.families else FAMILIES) if f]
    if set(families) - set(FAMILIES):
        raise SystemExit(f"gpu_check: unknown famil(ies) {sorted(set(families) - set(FAMILIES))}; "
                         f"choose from {', '.join(FAMILIES)}")
    steps = step_names(kinds, families)
    groups = units(steps)
    shares = [sum(step_share(s) for s in g) for g in groups]
    budget = args.budget_s
    dry = f"DRY RUN (CPU, gloo, tiny shapes{', bf16' if args.bf16 else ''}) " if args.dry_run else ""
    print(f"[gpu_check] {dry}{len(steps)} steps within "
          f"{budget:.0f} s; results in {out}, work in {args.work}", flush=True)
    results: dict[str, dict] = {}
    summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "command": " ".join(sys.argv),
               "dry_run": args.dry_run, "bf16_dry_run": args.dry_run and args.bf16, "budget_s": budget,
               "parallel": args.parallel, "steps": []}
    log_path = os.path.join(out, "gpu_check.log")

    def report(step: str, r: dict) -> None:
        results[step] = r
        line = one_line(step, r)
        print(f"[gpu_check] {step}: {r['status']} in {r['seconds']:.1f} s: {line}", flush=True)
        if r["status"] not in ("ok", "skipped"):
            tail = _tail(os.path.join(args.work, "logs", f"{step}.log"), 25)
            if tail:
                print("  | " + tail.rstrip().replace("\n", "\n  | "), flush=True)
        summary["steps"].append({"step": step, "status": r["status"], "seconds": round(r["seconds"], 1),
                                 "budget_s": round(r.get("budget_s", 0.0), 1), "summary": line})
        _write_outputs(out, results, summary, t_start)
        if step == "env":
            _print_env(r)

    with open(log_path, "w") as log:
        for i, group in enumerate(groups):
            elapsed = time.time() - t_start
            share = budget * shares[i] / sum(shares)
            carry = max(0.0, budget * sum(shares[:i]) / sum(shares) - elapsed)   # what earlier steps left unused
            room = budget - elapsed - MIN_STEP_S * (len(groups) - i - 1)
            b = max(min(share + carry, room), min(MIN_STEP_S, budget - elapsed))
            parallel = args.parallel if kind_of(group[0]) == "correctness" else 1
            run_steps(group, b, parallel, args, log, report)
    _write_outputs(out, results, summary, t_start)
    print_table(summary)
    if own_work and not args.keep_work:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0 if all(s["status"] == "ok" for s in summary["steps"]) else 1


def _print_env(r: dict) -> None:
    print(f"[gpu_check] python {r.get('python')}, torch {r.get('torch')} (CUDA {r.get('cuda')}, cuDNN "
          f"{r.get('cudnn', '-')}, NCCL {r.get('nccl', '-')}), deepspeed {r.get('deepspeed')}"
          f"{'' if r.get('deepspeed_tested') else ' (NOT a tested release)'}", flush=True)
    if r.get("gpu"):
        print(f"[gpu_check] GPU {r['gpu']}: {r['gpu_memory_gib']:.1f} GiB, compute {r['capability']}, "
              f"{r['multiprocessors']} SMs", flush=True)
    else:
        print("[gpu_check] no CUDA device", flush=True)


def _write_outputs(out: str, results: dict[str, dict], summary: dict, t_start: float) -> None:
    summary["total_s"] = round(time.time() - t_start, 1)
    by_kind: dict[str, Any] = {}
    for step, r in results.items():
        k = kind_of(step)
        if k == "correctness":
            by_kind.setdefault(k, {"tolerance": TOLERANCE, "families": {}})["families"][step.split("-", 1)[1]] = r
        else:
            by_kind[k] = r
    for k, r in by_kind.items():
        write_json_atomic(os.path.join(out, OUT_FILES[k]), r)
    write_json_atomic(os.path.join(out, "summary.json"), summary)


def print_table(summary: dict) -> None:
    rows = summary["steps"]
    w = max([len(r["step"]) for r in rows] + [4])
    print(f"\n{'step':<{w}}  {'status':<10}  {'time s':>7}  {'budget':>6}  summary")
    for r in rows:
        print(f"{r['step']:<{w}}  {r['status']:<10}  {r['seconds']:>7.1f}  {r['budget_s']:>6.0f}  {r['summary']}")
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"\n{ok} of {len(rows)} steps ok in {summary['total_s']:.0f} s"
          f"{' (dry run: CPU, tiny shapes)' if summary['dry_run'] else ''}", flush=True)


def default_out() -> str:
    return os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results", "gpu_check")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="", help="results folder (default $OUT, else benchmarks/results/gpu_check/)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU with gloo: what CI runs")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="seconds for all steps (default 540; 900 for --dry-run, whose budgets only guard hangs)")
    p.add_argument("--only", default="", help=f"comma-separated step kinds of: {', '.join(KINDS)}")
    p.add_argument("--families", default="", help=f"correctness families (default all): {', '.join(FAMILIES)}")
    p.add_argument("--bf16", action="store_true",
                   help="with --dry-run: train in bf16 on CPU as on the GPU (DeepSpeed's CPU accelerator), "
                        "against the same fp32 reference; finds dtype faults before a GPU session")
    p.add_argument("--micro-batch", action="append", default=[], metavar="CONFIG=N",
                   help="fix a speed config's micro batch (vim-base, vit-vqgan-bb, vqgan-f16) instead of filling memory")
    p.add_argument("--speed-steps", type=int, default=10, help="timed steps per speed/A-B run (after 3 warm-up)")
    p.add_argument("--workers", type=int, default=0, help="loader workers (default 4 on GPU, 1 in the dry run)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads of each step (0: torch's default)")
    p.add_argument("--parallel", type=int, default=0,
                   help="correctness families run at once (default 3 on a GPU, 1 in the dry run)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="MFU denominator (default: the datasheet's)")
    p.add_argument("--work", default="", help="scratch folder (default: a temp folder, deleted at the end)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder (runs, samples, step logs)")
    # internal: a step in a child process, and the CPU reference of a correctness step
    p.add_argument("--step", default="", help=argparse.SUPPRESS)
    p.add_argument("--step-budget-s", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--family", default="", help=argparse.SUPPRESS)
    p.add_argument("--sizes", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workers = args.workers or (1 if args.dry_run else 4)
    args.parallel = args.parallel or (1 if args.dry_run else 3)
    if args.bf16 and not args.dry_run:
        p.error("--bf16 is for --dry-run (a GPU run is bf16 already)")
    if args.reference:
        try:
            run_reference(args)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            sys.stdout.flush()
            os._exit(1)
        sys.stdout.flush()
        os._exit(0)
    if args.step:
        return run_child(args)
    args.out = os.path.abspath(args.out or default_out())
    args.budget_s = args.budget_s or (900.0 if args.dry_run else 540.0)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
