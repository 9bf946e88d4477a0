"""The Trainer end to end on real DeepSpeed (CPU, gloo): recipes, kill -9 and resume bit-identically
with the same samples, a 2-process ZeRO-2 tokenizer and ZeRO-3 prior resumed on 1 process with no
sample dropped or repeated, NaN injection skipped and counted, divergence stopping with a
checkpoint, and the one resolver (run directory / step folder -> zoo package)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:      # when run as a script by torch.distributed.run
    sys.path.insert(0, _ROOT)

from data_pipeline.codes import CodeShardWriter, write_code_manifest  # noqa: E402
from tests.launch import job_env, torchrun  # noqa: E402

GRID, CODEBOOK, CLASSES = (4, 4), 64, 10


def make_codes(root: str, shards: int = 4, per_shard: int = 40, seed: int = 0, grid=GRID,
               kept: int | None = None) -> str:
    """Code shards a tiny VIM can learn something from: each class has its own token pattern (and
    caption). ``kept``: masked-tokenizer codes (MQ-VAE style): that many sorted positions per sample."""
    rng = np.random.default_rng(seed)
    entries, n = [], 0
    ntok = kept or grid[0] * grid[1]
    patterns = rng.integers(0, CODEBOOK, size=(CLASSES, ntok))
    for s in range(shards):
        w = CodeShardWriter(root, f"codes-{s:06d}.tar", codebook_size=CODEBOOK, grid_size=grid)
        for _ in range(per_shard):
            label = int(rng.integers(CLASSES))
            codes = patterns[label].copy()
            flip = rng.random(codes.shape) < 0.2
            codes[flip] = rng.integers(0, CODEBOOK, size=int(flip.sum()))
            pos = None if kept is None else np.sort(rng.choice(grid[0] * grid[1], kept, replace=False))
            w.write(f"{n:08d}", codes.astype(np.int32), positions=pos, label=label, caption=f"pattern {label}")
            n += 1
        entries.append(w.close())
    write_code_manifest(root, entries, "synthetic", "0" * 64, grid, CODEBOOK, ntok)
    return root


_env = job_env


def _prior_sets(data: str, steps: int, every: int = 4, workers: int = 1) -> list[str]:
    return ["--set", f"data.url={data}", "--set", f"steps={steps}", "--set", f"checkpoint.every={every}",
            "--set", "checkpoint.keep_last=10", "--set", "log.every=1", "--set", "log.record_keys=true",
            "--set", "global_batch_size=8", "--set", f"data.num_workers={workers}", "--set", "data.shuffle_buffer=16",
            "--set", "validation.visuals_every=0", "--set", "optim.warmup_steps=2", "--set", f"optim.total_steps={steps}",
            "--set", "log.progress=false"]


def _train_cmd(recipe: str, run_dir: str, sets: list[str]) -> list[str]:
    return [sys.executable, "-m", "pretrain.cli", "train", "--recipe", recipe, "--run-dir", run_dir, *sets]


def _losses(run_dir: str, key: str = "loss") -> dict[int, float]:
    """The last logged value of ``key`` at each step (a resumed run logs re-run steps again)."""
    out = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        d = json.loads(line)
        if key in d:
            out[d["step"]] = d[key]
    return out


def _keys(run_dir: str, ranks: int = 1) -> dict[int, list]:
    """Step -> the (key, epoch) pairs read at that step, over ranks; the last timeline wins."""
    out: dict[int, list] = {}
    for r in range(ranks):
        path = os.path.join(run_dir, "keys", f"rank{r}.jsonl")
        per_rank: dict[int, list] = {}
        for line in open(path):
            d = json.loads(line)
            per_rank[d["step"]] = [tuple(k) for k in d["keys"]]
        for s, k in per_rank.items():
            out.setdefault(s, []).extend(k)
    return out


# ---- recipes ---------------------------------------------------------------------------------------

def test_every_trainable_preset_has_a_recipe_and_a_tiny_twin():
    from model_zoo.registry import list_models
    from pretrain.recipes import get_recipe, list_recipes

    names = set(list_recipes())
    for kind in ("tokenizer", "prior"):
        for model in list_models(kind=kind):
            assert model in names, model
            cfg = get_recipe(model)
            assert cfg.model == model and cfg.stage == kind
    for name in names:
        if not name.endswith("-tiny"):
            tiny = get_recipe(name + "-tiny")
            assert tiny.model == get_recipe(name).model + "-tiny" and tiny.steps <= 500
    vit = get_recipe("vit-vqgan-ss")
    assert (vit.global_batch_size, vit.optim.betas, vit.optim.lr) == (256, (0.9, 0.99), 1e-4)
    vim = get_recipe("vim-large")
    assert (vim.global_batch_size, vim.optim.betas, vim.deepspeed.zero_stage) == (1024, (0.9, 0.96), 3)


def _every_tiny_recipe_phase(out: str) -> None:
    """Two steps of every -tiny recipe on 2 processes (the registry drives the list): tokenizers with
    their adversarial loss on from the first step, the generator at ZeRO-1, 2 and 3; priors at ZeRO-2."""
    import torch.distributed as dist

    from data_pipeline.demo import build_demo
    from pretrain.config import apply_overrides
    from pretrain.recipes import get_recipe, list_recipes
    from pretrain.trainer import Trainer

    images, plain, masked = (os.path.join(out, n) for n in ("images", "codes", "masked"))
    if dist.get_rank() == 0:
        build_demo(images, quick=True, progress=False, shard_samples=100)
        make_codes(plain)
        make_codes(masked, grid=(8, 8), kept=16)
    dist.barrier()
    results = {}
    for name in [r for r in list_recipes() if r.endswith("-tiny")]:
        cfg = get_recipe(name)
        tokenizer = cfg.stage == "tokenizer"
        data = images if tokenizer else masked if name.startswith("stackformer") else plain
        for stage in ((1, 2, 3) if tokenizer else (2,)):
            sets = [f"run_dir={out}/{name}-z{stage}", f"data.url={data}", "steps=2", "global_batch_size=4",
                    "data.num_workers=0", "validation.visuals_every=0", "log.every=1", "log.progress=false",
                    "checkpoint.every=2", f"deepspeed.zero_stage={stage}", "deepspeed.param_persistence_threshold=0"]
            if tokenizer:
                sets += ["discriminator.start_step=0"]
            res = Trainer(apply_overrides(cfg, sets)).fit()
            meta = json.load(open(os.path.join(out, f"{name}-z{stage}", "checkpoints", "step_00000002", "meta.json")))
            results[f"{name}-z{stage}"] = {"state": res.state, "step": res.step, "loss": res.metrics.get("loss"),
                                           "d_loss": res.metrics.get("gan/d_loss"), "engines": meta["engines"]}
    if dist.get_rank() == 0:
        json.dump(results, open(os.path.join(out, "tiny.json"), "w"))


@pytest.mark.multiprocess
def test_every_tiny_recipe_trains(tmp_path):
    """The CI twin of every recipe trains on 2 processes; tokenizers with the GAN on, at ZeRO-1/2/3."""
    from pretrain.recipes import get_recipe, list_recipes

    out = str(tmp_path)
    proc = torchrun(__file__, "tiny", out, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    res = json.load(open(os.path.join(out, "tiny.json")))
    tiny = [r for r in list_recipes() if r.endswith("-tiny")]
    expected = [f"{r}-z{s}" for r in tiny for s in ((1, 2, 3) if get_recipe(r).stage == "tokenizer" else (2,))]
    assert sorted(res) == sorted(expected)
    for name, r in res.items():
        assert r["state"] == "finished" and r["step"] == 2 and np.isfinite(r["loss"]), (name, r)
        if get_recipe(name.rsplit("-z", 1)[0]).stage == "tokenizer":
            stage = int(name.rsplit("-z", 1)[1])
            assert set(r["engines"]) == {"generator", "discriminator"}, (name, r["engines"])
            assert r["engines"]["generator"]["zero_stage"] == stage
            assert r["d_loss"] is not None and np.isfinite(r["d_loss"]), (name, r)


# ---- kill -9 and resume: bit-identical losses, the same samples --------------------------------------

def _gan_sets(data: str, steps: int) -> list[str]:
    """A tiny CNN VQGAN against PatchGAN-tiny from step 2: two engines, two optimizers, LeCam."""
    return ["--set", f"data.url={data}", "--set", f"steps={steps}", "--set", "checkpoint.every=4",
            "--set", "checkpoint.keep_last=10", "--set", "log.every=1", "--set", "log.record_keys=true",
            "--set", "global_batch_size=8", "--set", "data.num_workers=2", "--set", "data.shuffle_buffer=16",
            "--set", "validation.visuals_every=0", "--set", "log.progress=false", "--set", "discriminator.start_step=2",
            "--set", "discriminator.lecam_weight=0.001", "--set", f"optim.total_steps={steps}"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["prior", "gan-tokenizer"])
def test_sigkill_and_resume_is_bit_identical(tmp_path, kind):
    steps = 24 if kind == "prior" else 16
    if kind == "prior":
        recipe, sets = "vim-small-tiny", _prior_sets(make_codes(str(tmp_path / "codes")), steps, every=4, workers=2)
    else:
        from data_pipeline.demo import build_demo

        build_demo(str(tmp_path / "images"), quick=True, progress=False, shard_samples=50)
        recipe, sets = "vqgan-f8-tiny", _gan_sets(str(tmp_path / "images"), steps)
    ref = str(tmp_path / "ref")
    subprocess.run(_train_cmd(recipe, ref, sets), env=_env(), cwd=_ROOT, check=True,
                   capture_output=True, timeout=300)
    run = str(tmp_path / "killed")
    proc = subprocess.Popen(_train_cmd(recipe, run, sets), env=_env(), cwd=_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = os.path.join(run, "checkpoints", "latest")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(latest) and open(latest).read().strip() >= "step_00000008":
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = open(latest).read().strip()
    assert "step_00000008" <= killed_at < f"step_{steps:08d}", killed_at     # killed mid-run
    status = json.load(open(os.path.join(run, "status.json")))
    assert status["state"] == "running"
    out = subprocess.run(_train_cmd(recipe, run, sets), env=_env(), cwd=_ROOT, check=True,
                         capture_output=True, text=True, timeout=300)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["state"] == "finished" and summary["resumed_from"] >= 8
    a, b = _losses(ref), _losses(run)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]   # bit-identical
    if kind == "gan-tokenizer":         # the discriminator's side too: its loss, logits, LeCam
        for key in ("gan/d_loss", "gan/logits_real", "gan/g_loss", "gan/lecam"):
            da, db = _losses(ref, key), _losses(run, key)
            assert da and da == db, (key, da, db)
    ka, kb = _keys(ref), _keys(run)
    assert ka == kb                                                                      # the same samples
    assert json.load(open(os.path.join(run, "status.json")))["state"] == "finished"


# ---- 2 processes (ZeRO-2 tokenizer, ZeRO-3 prior), then the prior resumed on 1 process ------------

def _two_process_phase(images: str, codes: str, out: str) -> None:
    from pretrain.config import apply_overrides
    from pretrain.recipes import get_recipe
    from pretrain.trainer import Trainer

    tok = apply_overrides(get_recipe("vit-vqgan-ss-tiny"), [
        f"run_dir={out}/tok", f"data.url={images}", "steps=4", "global_batch_size=8", "micro_batch_size=2",
        "data.num_workers=0", "deepspeed.zero_stage=2", "checkpoint.every=2", "validation.visuals_every=2",
        f"validation.url={images}", "validation.every=2", "validation.batches=1", "log.every=1", "log.progress=false"])
    res_tok = Trainer(tok).fit()
    prior = apply_overrides(get_recipe("vim-small-tiny"), [
        f"run_dir={out}/prior", f"data.url={codes}", "steps=6", "global_batch_size=8", "micro_batch_size=2",
        "data.num_workers=0", "deepspeed.zero_stage=3", "deepspeed.param_persistence_threshold=0",
        "checkpoint.every=3", "validation.visuals_every=3", f"tokenizer={out}/tok", f"validation.url={codes}",
        "validation.every=3", "validation.batches=1", "log.every=1", "log.record_keys=true", "log.progress=false",
        "model_args.grid_size=[8,8]", "model_args.num_classes=20"])
    res_prior = Trainer(prior).fit()
    # and the other way round: the tokenizer at ZeRO-3, the prior at ZeRO-2 (2 steps each)
    tok3 = apply_overrides(tok, [f"run_dir={out}/tok3", "deepspeed.zero_stage=3", "steps=2",
                                 "deepspeed.param_persistence_threshold=0"])
    prior2 = apply_overrides(prior, [f"run_dir={out}/prior2", "deepspeed.zero_stage=2", "steps=2"])
    res_tok3, res_prior2 = Trainer(tok3).fit(), Trainer(prior2).fit()
    import torch.distributed as dist

    if dist.get_rank() == 0:
        json.dump({"tok": res_tok.state, "prior": res_prior.state, "tok3": res_tok3.state,
                   "prior2": res_prior2.state, "world": dist.get_world_size()},
                  open(os.path.join(out, "two.json"), "w"))


@pytest.mark.multiprocess
def test_two_processes_zero2_tokenizer_zero3_prior_then_one_process(tmp_path):
    from data_pipeline.demo import build_demo
    from pretrain.tokenize_job import run_tokenize

    images = str(tmp_path / "images")
    build_demo(images, quick=True, progress=False, shard_samples=50)
    out = str(tmp_path / "out")
    os.makedirs(out)
    # codes of an untrained tokenizer are fine for the prior's mechanics; train the tokenizer first
    # in the same torchrun job so the prior decodes its sample grid with a real run directory.
    codes = str(tmp_path / "codes")
    # The prior needs code shards before its job starts: tokenize with a freshly exported tiny
    # tokenizer package (random weights) whose grid matches (8x8, codebook 64).
    from model_zoo.package import save_package
    from model_zoo.registry import create_model

    save_package(create_model("vit-vqgan-ss-tiny"), str(tmp_path / "tok0"))
    run_tokenize(str(tmp_path / "tok0"), images, codes, progress=False, device="cpu")
    proc = torchrun(__file__, "two", images, codes, out, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    res = json.load(open(os.path.join(out, "two.json")))
    assert res == {"tok": "finished", "prior": "finished", "tok3": "finished", "prior2": "finished", "world": 2}
    for sub in ("tok3", "prior2"):
        meta = json.load(open(os.path.join(out, sub, "checkpoints", "step_00000002", "meta.json")))
        # (a GAN recipe's tokenizer is its "generator" engine, also before the discriminator starts)
        assert meta["engines"]["generator" if sub == "tok3" else "model"]["zero_stage"] == (3 if sub == "tok3" else 2)
        assert all(np.isfinite(v) for v in _losses(os.path.join(out, sub)).values())
    for sub, steps in (("tok", 4), ("prior", 6)):
        meta = json.load(open(os.path.join(out, sub, "checkpoints", f"step_{steps:08d}", "meta.json")))
        assert meta["world_size"] == 2 and meta["step"] == steps
        assert os.path.exists(os.path.join(out, sub, "status.json"))
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, sub, "tb")))
        assert os.path.exists(os.path.join(out, sub, "logs", "rank1.log"))
    assert os.path.exists(os.path.join(out, "tok", "samples", "reconstruction_step_00000004.png"))
    assert os.path.exists(os.path.join(out, "prior", "samples", "samples_step_00000006.png"))
    tok_losses = _losses(os.path.join(out, "tok"))
    assert all(np.isfinite(v) for v in tok_losses.values()) and len(tok_losses) == 4
    # the prior goes on to step 10 on ONE process: DeepSpeed's universal checkpoint, global batch kept
    prior_run = os.path.join(out, "prior")
    sets = ["--set", f"data.url={codes}", "--set", "steps=10", "--set", "global_batch_size=8",
            "--set", "micro_batch_size=4", "--set", "data.num_workers=0", "--set", "deepspeed.zero_stage=3",
            "--set", "deepspeed.param_persistence_threshold=0", "--set", "checkpoint.every=5",
            "--set", "validation.visuals_every=0", "--set", "log.every=1", "--set", "log.record_keys=true",
            "--set", "log.progress=false", "--set", "model_args.grid_size=[8,8]", "--set", "model_args.num_classes=20"]
    one = subprocess.run(_train_cmd("vim-small-tiny", prior_run, sets), env=_env(), cwd=_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-5000:]
    summary = json.loads(one.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == 6 and summary["step"] == 10
    meta = json.load(open(os.path.join(prior_run, "checkpoints", "step_00000010", "meta.json")))
    assert meta["world_size"] == 1 and meta["samples_seen"] == 10 * 8
    keys = _keys(prior_run, ranks=2)
    assert sorted(keys) == list(range(1, 11))
    seen = [k for s in sorted(keys) for k in keys[s]]
    assert len(seen) == 10 * 8 and len(set(seen)) == len(seen)      # nothing repeated, nothing dropped
    losses = _losses(prior_run)
    assert all(np.isfinite(losses[s]) for s in range(1, 11))


# ---- guard rails ------------------------------------------------------------------------------------

@pytest.mark.multiprocess
def test_nan_is_skipped_and_counted_and_a_streak_stops_with_a_checkpoint(tmp_path):
    data = make_codes(str(tmp_path / "codes"))
    run = str(tmp_path / "nan")
    sets = _prior_sets(data, 8, every=4) + ["--set", "guard.inject_nan_steps=[3]"]
    out = subprocess.run(_train_cmd("vim-small-tiny", run, sets), env=_env(), cwd=_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["state"] == "finished" and summary["skipped_steps"] == 1
    last = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))][-1]
    assert last["guard/skipped_steps"] == 1 and last["guard/nonfinite_losses"] == 1
    assert np.isfinite(last["loss"])
    assert "non-finite gradient, optimizer step skipped" in open(os.path.join(run, "logs", "rank0.log")).read()
    # three in a row with max 3: stop, checkpoint, exit code 3, status "diverged"
    run2 = str(tmp_path / "diverged")
    sets = _prior_sets(data, 20, every=10) + ["--set", "guard.inject_nan_steps=[4,5,6]",
                                              "--set", "guard.max_consecutive_skips=3"]
    out = subprocess.run(_train_cmd("vim-small-tiny", run2, sets), env=_env(), cwd=_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 3, out.stderr[-4000:]
    assert "3 non-finite steps in a row at step 6" in out.stderr
    assert open(os.path.join(run2, "checkpoints", "latest")).read().strip() == "step_00000006"
    assert json.load(open(os.path.join(run2, "status.json")))["state"] == "diverged"


# ---- the resolver -------------------------------------------------------------------------------

def test_run_directory_and_step_folder_resolve_to_packages(tmp_path):
    import torch

    from model_zoo.package import load_package, load_prior_with_tokenizer
    from pretrain.resolve import ResolveError, as_package

    from model_zoo.package import save_package
    from model_zoo.registry import create_model

    data = make_codes(str(tmp_path / "codes"), shards=2, per_shard=16)
    run = str(tmp_path / "run")
    tok = str(tmp_path / "tok")           # a tokenizer with the codes' grid and codebook (random weights)
    save_package(create_model("vqgan-f8-tiny"), tok)
    sets = _prior_sets(data, 4, every=2, workers=0) + ["--set", f"tokenizer={tok}", "--set", "log.profile_steps=2",
                                                       "--set", "log.profile_start=1", "--set", "log.peak_tflops=0.05"]
    out = subprocess.run(_train_cmd("vim-small-tiny", run, sets),
                         env=_env(), cwd=_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    mfu = [json.loads(line).get("mfu") for line in open(os.path.join(run, "metrics.jsonl"))]
    assert all(0 < m < 1 for m in mfu if m is not None) and any(m is not None for m in mfu)   # against 0.05 TFLOP/s
    traces = os.listdir(os.path.join(run, "profile"))          # the profiler trace asked for
    assert any(t.startswith("rank0") and t.endswith(".pt.trace.json") for t in traces), traces
    url = as_package(run, kind="prior")
    assert url == os.path.join(run, "checkpoints", "step_00000004", "package")
    model = load_package(url)
    assert model.registry_name == "vim-small-tiny" and tuple(model.config.grid_size) == GRID
    card = json.load(open(os.path.join(url, "config.json")))["card"]
    assert card["weights"] == "ema" and card["step"] == 4
    # the EMA shards merged without a process group are what the package holds
    from pretrain.resolve import ema_state_dict

    ema = ema_state_dict(os.path.join(run, "checkpoints", "step_00000004", "ema", "model"))
    for k, v in ema.items():
        assert torch.equal(model.state_dict()[k].float(), v), k
    step2 = os.path.join(run, "checkpoints", "step_00000002")
    assert as_package(step2) == os.path.join(step2, "package")
    with pytest.raises(ResolveError, match=r"is a prior package \(vim-small-tiny\), not a tokenizer"):
        as_package(run, kind="tokenizer")
    with pytest.raises(ResolveError, match="not a model-zoo package"):
        as_package(str(tmp_path))
    prior, tokenizer = load_prior_with_tokenizer(url)
    assert tokenizer.registry_name == "vqgan-f8-tiny"


def test_warm_start_loads_weights_and_a_warm_start_from_nothing_stops_with_one_line(tmp_path):
    """``checkpoint.init_from``: the weights of another run, or exit 2 with one line before anything
    starts (issue 20: a mistyped path and a pickle both trained from scratch, exit 0)."""
    import pickle

    from model_zoo.package import save_package
    from model_zoo.registry import create_model

    data = make_codes(str(tmp_path / "codes"), shards=2, per_shard=16)
    tok = str(tmp_path / "tok")
    save_package(create_model("vqgan-f8-tiny"), tok)
    sets = _prior_sets(data, 4, every=4, workers=0) + ["--set", f"tokenizer={tok}"]
    src, warm = str(tmp_path / "src"), str(tmp_path / "warm")
    out = subprocess.run(_train_cmd("vim-small-tiny", src, sets), env=_env(), cwd=_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    out = subprocess.run(_train_cmd("vim-small-tiny", warm, sets + ["--set", f"checkpoint.init_from={src}"]),
                         env=_env(), cwd=_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    # Same seed and batches: a warm start that loaded nothing has exactly the fresh run's first loss.
    assert _losses(warm)[1] != _losses(src)[1] and _losses(warm)[1] < _losses(src)[1], (_losses(src), _losses(warm))
    junk = tmp_path / "weights.pkl"
    junk.write_bytes(pickle.dumps({"w": [1.0]}))
    for bad in (str(tmp_path / "no-such-run"), str(junk)):
        run = tmp_path / "bad"
        out = subprocess.run(_train_cmd("vim-small-tiny", str(run), sets + ["--set", f"checkpoint.init_from={bad}"]),
                             env=_env(), cwd=_ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, (out.returncode, out.stderr[-4000:])
        lines = out.stderr.strip().splitlines()
        assert lines[-1].startswith(f"vqscale: error: checkpoint.init_from={bad!r}: no checkpoint there"), lines
        assert "Traceback" not in out.stderr and not (run / "config.json").exists()   # stopped before the run began
    # a model_args key the preset does not have: the same, naming the preset and the key
    run = tmp_path / "bad-args"
    out = subprocess.run(_train_cmd("vim-small-tiny", str(run), sets + ["--set", "model_args.foo=1"]),
                         env=_env(), cwd=_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, (out.returncode, out.stderr[-4000:])
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("vqscale: error: unknown config key 'model_args.foo'") and "'vim-small-tiny'" in last, last
    assert "Traceback" not in out.stderr and not (run / "config.json").exists()


if __name__ == "__main__":          # the torchrun job of the 2-process test
    from pretrain.distributed import init_distributed

    init_distributed(timeout_s=300)
    if sys.argv[1] == "two":
        _two_process_phase(*sys.argv[2:5])
    elif sys.argv[1] == "tiny":
        _every_tiny_recipe_phase(sys.argv[2])


# ---- object storage: data and run directory on S3 ---------------------------------------------------

@pytest.mark.s3
def test_data_and_run_directory_on_s3(s3_bucket, tmp_path):
    """A real S3 server (SeaweedFS): code shards and the run directory in the bucket; checkpoints,
    metrics, TensorBoard and status uploaded; a second job resumes from the bucket's `latest`;
    the run directory resolves to a package in the bucket."""
    from data_pipeline import storage
    from model_zoo.package import load_prior_with_tokenizer, save_package
    from model_zoo.registry import create_model
    from pretrain.resolve import as_package

    local = make_codes(str(tmp_path / "codes"), shards=2, per_shard=16)
    data = f"{s3_bucket}/codes"
    storage.upload_dir(local, data)
    tok = f"{s3_bucket}/zoo/tok"
    save_package(create_model("vqgan-f8-tiny"), tok)
    run = f"{s3_bucket}/runs/prior"
    env = {**_env(), "VQSCALE_CACHE": str(tmp_path / "cache")}
    for steps in (4, 6):
        sets = _prior_sets(data, steps, every=2, workers=1) + ["--set", f"tokenizer={tok}",
                                                                "--set", "validation.visuals_every=2"]
        out = subprocess.run(_train_cmd("vim-small-tiny", run, sets), env=env, cwd=_ROOT, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-4000:]
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        assert summary["step"] == steps and summary["resumed_from"] == (None if steps == 4 else 4)
    assert storage.read_text(f"{run}/checkpoints/latest").strip() == "step_00000006"
    assert json.loads(storage.read_text(f"{run}/status.json"))["state"] == "finished"
    steps = [json.loads(line)["step"] for line in storage.read_text(f"{run}/metrics.jsonl").splitlines()]
    assert 6 in steps and 1 in steps
    assert any(n.startswith("events.out.tfevents") for n in storage.listdir(f"{run}/tb"))
    assert storage.exists(f"{run}/samples/samples_step_00000006.png")
    url = as_package(run, kind="prior")
    assert url == f"{run}/checkpoints/step_00000006/package"
    prior, tokenizer = load_prior_with_tokenizer(url)
    assert prior.registry_name == "vim-small-tiny" and tokenizer.registry_name == "vqgan-f8-tiny"
