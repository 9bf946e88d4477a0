"""The engine and checkpoint layer on real DeepSpeed: ZeRO-2 and ZeRO-3 engines on CPU across two
gloo processes started by torchrun (``DS_ACCELERATOR=cpu``), checkpoints in the run-directory
layout, bit-identical resume on the same world size, resume on one process through DeepSpeed's
universal format, a crash in the middle of a save, keep-last-K, the EMA under ZeRO-3, the stop
flag agreed across ranks, and the pure pieces (Slurm node lists, gradient accumulation, weight
decay groups, the LR schedule) in-process.

The multi-process scenario is one run directory with two engines saved together (a GAN-style
checkpoint): ``generator`` under ZeRO-3 and ``discriminator`` under ZeRO-2, in three jobs:
``train`` (2 processes), ``resume`` (2 processes, fresh) and ``shrink`` (1 process)."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:      # when run as a script by torch.distributed.run
    sys.path.insert(0, _ROOT)

from pretrain import checkpoint as ck  # noqa: E402
from pretrain import distributed as pd  # noqa: E402
from pretrain import ema as pema  # noqa: E402
from pretrain import optim as po  # noqa: E402
from pretrain import runtime as rt  # noqa: E402

MICRO, GLOBAL = 2, 8
STAGES = {"generator": 3, "discriminator": 2}


# ---- the tiny model of the multi-process jobs -----------------------------------------------------
class Tiny(nn.Module):
    """Embedding + MLP with dropout (so resuming must restore the torch RNG), a frozen layer (not
    in any optimizer) and a buffer updated in forward (restored from the module state)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.fc1 = nn.Linear(16, 33)          # 33 x 16 + 33: sizes that do not split evenly
        self.norm = nn.LayerNorm(33)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(33, 5)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, tok, x):
        if self.training:
            self.calls += 1
        h = torch.cat([self.emb(tok), self.frozen(x)], -1)
        return self.fc2(self.drop(torch.relu(self.norm(self.fc1(h)))))


def _micro_batch(step: int, index: int):
    """Micro batch ``index`` (of the global batch's GLOBAL // MICRO) of ``step``: fixed by the seed,
    whatever the world size (rank r's micro m is index r * accumulation + m)."""
    g = torch.Generator().manual_seed(10_000 * step + index)
    return (torch.randint(0, 16, (MICRO,), generator=g), torch.randn(MICRO, 8, generator=g),
            torch.randint(0, 5, (MICRO,), generator=g))


def _build(seed: int):
    torch.manual_seed(seed)
    engines, emas = {}, {}
    for name, stage in STAGES.items():
        eng = rt.build_engine(Tiny(), po.OptimConfig(lr=3e-2, warmup_steps=2, total_steps=12, grad_clip=1.0),
                              rt.DeepSpeedSettings(zero_stage=stage, param_persistence_threshold=0),
                              MICRO, GLOBAL, name=name)
        engines[name] = eng
        emas[name] = pema.EMA(eng, decay=0.8)
    return engines, emas


def _train_step(engines, emas, step: int) -> dict[str, float]:
    """One optimizer step of every engine; returns the global mean loss of each."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for name, eng in engines.items():
        ga = eng.gradient_accumulation_steps()
        total = 0.0
        for m in range(ga):
            tok, x, y = _micro_batch(step, rank * ga + m)
            loss = F.cross_entropy(eng(tok, x), y)
            eng.backward(loss)
            eng.step()
            total += loss.item()
        t = torch.tensor([total], dtype=torch.float64)
        dist.all_reduce(t)
        out[name] = t.item() / (ga * world)
        emas[name].update()
    return out


def _snapshot(engines, emas) -> dict:
    return {name: {"weights": rt.consolidated_state_dict(eng), "ema": emas[name].full_state_dict(),
                   "lr": eng.get_lr()[0], "global_steps": eng.global_steps} for name, eng in engines.items()}


def _draws():
    return [random.random(), float(np.random.rand()), torch.rand(1).item()]


def _phase_train(run: str, out: str) -> None:
    env = pd.init_distributed(timeout_s=120)
    engines, emas = _build(seed=0)
    rec: dict = {"losses": {}, "world": env.world_size}
    trainable = {n: [k for k, p in e.module.named_parameters() if p.requires_grad] for n, e in engines.items()}
    ref_ema = {n: {k: v.float().clone() for k, v in rt.consolidated_state_dict(e).items() if k in trainable[n]}
               for n, e in engines.items()}
    for step in range(1, 7):
        rec["losses"][step] = _train_step(engines, emas, step)
        for n, e in engines.items():           # reference EMA on whole tensors
            live = rt.consolidated_state_dict(e)
            for k, v in ref_ema[n].items():
                v.mul_(0.8).add_(live[k].float(), alpha=0.2)
        if step <= 3:
            ck.save_checkpoint(run, step, engines, emas=emas, keep_last=2, samples_seen=step * GLOBAL,
                               loader_state={"next_step": step + 1}, config={"test": True},
                               metrics={"loss": rec["losses"][step]["generator"]})
        if step == 3:
            rec["folders_after_3"] = ck.list_steps(run)
            rec["snap3"] = _snapshot(engines, emas)
            rec["draws3"] = _draws()
    rec["snap6"] = _snapshot(engines, emas)
    rec["ema_ref6"] = ref_ema
    rec["swapped"] = {}
    for n, e in engines.items():               # evaluating with the EMA, then back to the live weights
        with emas[n].swapped_in():
            inside = rt.consolidated_state_dict(e)
        rec["swapped"][n] = (inside, rt.consolidated_state_dict(e))
    rec["local_module"] = {n: {k: v.detach().clone() for k, v in e.module.state_dict().items()}
                           for n, e in engines.items()}
    # a crash inside the save of step 6: after every rank's engine shards, before `latest`
    ck.FAULT_POINT = "before_latest"
    try:
        ck.save_checkpoint(run, 6, engines, emas=emas, keep_last=2)
        rec["crashed"] = False
    except ck.InjectedFault:
        rec["crashed"] = True
    finally:
        ck.FAULT_POINT = None
    rec["latest_after_crash"] = ck.latest_step_url(run)
    rec["folders_after_crash"] = ck.list_steps(run)
    # activation checkpointing (full and selective) under ZeRO-3 changes nothing but memory (vim-small-tiny)
    rec["activation_checkpointing"] = _activation_checkpointing_check()
    torch.save(rec, os.path.join(out, f"train_rank{env.rank}.pt"))


def _activation_checkpointing_check() -> dict:
    from model_zoo import create_model

    import torch.distributed as dist

    res = {}
    for ac in (False, True, "selective"):
        torch.manual_seed(0)
        model = create_model("vim-small-tiny")
        eng = rt.build_engine(model, po.OptimConfig(lr=1e-3), rt.DeepSpeedSettings(
            zero_stage=3, activation_checkpointing=ac, param_persistence_threshold=0), 2, 4, name="vim")
        losses = []
        for step in range(2):
            g = torch.Generator().manual_seed(step * 10 + dist.get_rank())
            codes, labels = torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 10, (2,), generator=g)
            loss, _ = eng.module.loss(codes, labels)
            eng.backward(loss)
            eng.step()
            losses.append(loss.item())
        wrapped = sum(getattr(b, "_vqscale_checkpointed", False) for b in model.modules())
        res[ac] = {"losses": losses, "weights": rt.consolidated_state_dict(eng), "wrapped": wrapped}
    return res


def _phase_resume(run: str, out: str) -> None:
    env = pd.init_distributed(timeout_s=120)
    engines, emas = _build(seed=1)            # other initial weights: all must come from the checkpoint
    res = ck.load_checkpoint(run, engines, emas=emas)
    rec: dict = {"resumed": {k: getattr(res, k) for k in ("step", "samples_seen", "loader_state", "universal",
                                                         "rng_restored")},
                 "meta": res.meta, "losses": {}}
    rec["snap3"] = _snapshot(engines, emas)
    rec["draws3"] = _draws()
    for step in range(4, 7):
        rec["losses"][step] = _train_step(engines, emas, step)
    rec["snap6"] = _snapshot(engines, emas)
    # save over the step folder the crashed save left behind; keep_last=2 drops step 2
    ck.save_checkpoint(run, 6, engines, emas=emas, keep_last=2, samples_seen=6 * GLOBAL,
                       loader_state={"next_step": 7})
    rec["folders_after_save6"] = ck.list_steps(run)
    rec["latest_after_save6"] = ck.latest_step_url(run)
    for eng in engines.values():              # no dropout: 1 process must be able to follow
        eng.module.drop.p = 0.0
    rec["cont"] = {step: _train_step(engines, emas, step) for step in (7, 8)}
    # the same checkpoint through the universal format on the same world size: bit-identical too
    # (this is what caught DeepSpeed 0.19.8's ZeRO-3 universal-load faults; see checkpoint.py)
    uni, uni_emas = _build(seed=3)
    rec["universal_resumed"] = ck.load_checkpoint(run, uni, emas=uni_emas, universal=True).universal
    for eng in uni.values():
        eng.module.drop.p = 0.0
    rec["cont_universal"] = {step: _train_step(uni, uni_emas, step) for step in (7, 8)}
    torch.save(rec, os.path.join(out, f"resume_rank{env.rank}.pt"))
    _stop_flag_loop(out, env.rank)


def _stop_flag_loop(out: str, rank: int) -> None:
    """Steps of 50 ms; the test sends SIGUSR1 to rank 1 only. Every rank must stop after the
    same step."""
    flag = pd.StopFlag().install()
    with open(os.path.join(out, f"pid_rank{rank}.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(out, f"pid_rank{rank}.tmp"), os.path.join(out, f"pid_rank{rank}"))
    step = 0
    while step < 600:
        step += 1
        time.sleep(0.05)
        if flag.should_stop():
            break
    flag.uninstall()
    with open(os.path.join(out, f"stop_rank{rank}.json"), "w") as f:
        json.dump({"step": step, "local": flag.local, "reason": flag.reason}, f)


def _phase_shrink(run: str, out: str) -> None:
    env = pd.init_distributed(timeout_s=120)
    assert env.world_size == 1 and env.source == "single"
    engines, emas = _build(seed=2)
    res = ck.load_checkpoint(run, engines, emas=emas)
    rec = {"resumed": {k: getattr(res, k) for k in ("step", "universal", "rng_restored")},
           "accumulation": {n: e.gradient_accumulation_steps() for n, e in engines.items()},
           "snap6": _snapshot(engines, emas),
           "offline": {n: ck.load_consolidated(res.step_url, n) for n in engines},
           "cache": sorted(os.listdir(os.path.join(res.step_url, "universal")))}
    for eng in engines.values():
        eng.module.drop.p = 0.0
    rec["cont"] = {step: _train_step(engines, emas, step) for step in (7, 8)}
    # a warm start: weights only, fresh optimizer; a step moves away from the loaded weights, not
    # back to the engine's own initial ones (the fp32 master copies were refreshed)
    warm, warm_emas = _build(seed=4)
    init = {n: rt.consolidated_state_dict(e) for n, e in warm.items()}
    wres = ck.load_checkpoint(run, warm, emas=warm_emas, weights_only=True)
    loaded = {n: rt.consolidated_state_dict(e) for n, e in warm.items()}
    for eng in warm.values():
        eng.module.drop.p = 0.0
    _train_step(warm, warm_emas, 7)
    dist_to = {}
    for n, e in warm.items():
        after = rt.consolidated_state_dict(e)
        keys = [k for k, p in e.module.named_parameters() if p.requires_grad]
        dist_to[n] = [sum((after[k] - ref[k]).norm() ** 2 for k in keys) ** 0.5 for ref in (loaded[n], init[n])]
    rec["warm"] = {"flags": (wres.weights_only, wres.universal, wres.rng_restored), "loaded": loaded,
                   "global_steps": [e.global_steps for e in warm.values()], "dist": dist_to}
    torch.save(rec, os.path.join(out, "shrink_rank0.pt"))


def _phase_remote(run: str, out: str) -> None:
    """One process, an s3:// run directory: save twice (keep 1), resume in fresh engines, continue."""
    pd.init_distributed(timeout_s=120)
    engines, emas = _build(seed=0)
    for step in (1, 2):
        _train_step(engines, emas, step)
        ck.save_checkpoint(run, step, engines, emas=emas, keep_last=1, loader_state={"next_step": step + 1})
    cont = {step: _train_step(engines, emas, step) for step in (3, 4)}
    fresh, fresh_emas = _build(seed=5)
    res = ck.load_checkpoint(run, fresh, emas=fresh_emas)
    again = {step: _train_step(fresh, fresh_emas, step) for step in (3, 4)}
    from data_pipeline import storage

    ckpts = storage.join(run, "checkpoints")
    # (SeaweedFS keeps emptied folders as prefixes, so "deleted" is checked by content, not listing)
    steps = [s for s in ck.list_steps(run) if storage.exists(storage.join(ckpts, ck.step_name(s), "meta.json"))]
    torch.save({"cont": cont, "again": again, "steps": steps, "step": res.step,
                "loader_state": res.loader_state, "rng_restored": res.rng_restored}, os.path.join(out, "remote.pt"))


PHASES = {"train": _phase_train, "resume": _phase_resume, "shrink": _phase_shrink, "remote": _phase_remote}


# ---- launching ------------------------------------------------------------------------------------
def _env() -> dict:
    return {**os.environ, "PYTHONPATH": _ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _cmd(nproc: int, phase: str, run: str, out: str) -> list[str]:
    script = [os.path.abspath(__file__), phase, run, out]
    if nproc == 1:
        return [sys.executable] + script
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
            "--rdzv-endpoint=127.0.0.1:0"] + script


def _run(nproc: int, phase: str, run: str, out: str) -> None:
    proc = subprocess.run(_cmd(nproc, phase, run, out), env=_env(), capture_output=True, text=True,
                          timeout=300, cwd=_ROOT)
    assert proc.returncode == 0, f"{phase} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _assert_equal_dicts(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k}"


@pytest.mark.multiprocess
def test_zero2_zero3_save_resume_shrink_crash_stop(tmp_path):
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    os.makedirs(out)

    # -- job 1: train 6 steps on 2 processes, checkpoints at 1, 2, 3 (keep 2), a crashed save at 6
    _run(2, "train", run, out)
    t0, t1 = (torch.load(os.path.join(out, f"train_rank{r}.pt"), weights_only=False) for r in range(2))
    assert t0["losses"] == t1["losses"]                                    # global means agree
    for name, stage in STAGES.items():
        # ranks consistent: ZeRO-2 keeps whole weights on every rank; ZeRO-3 gathers the same tensors
        _assert_equal_dicts(t0["local_module"][name], t1["local_module"][name], f"{name} rank0 vs rank1") \
            if stage < 3 else _assert_equal_dicts(t0["snap6"][name]["weights"], t1["snap6"][name]["weights"], name)
        # the sharded EMA equals an EMA of the whole tensors, bit for bit (ZeRO-3 included)
        for k, v in t0["ema_ref6"][name].items():
            assert torch.equal(t0["snap6"][name]["ema"][k], v), (name, k)
            assert torch.equal(t1["snap6"][name]["ema"][k], v), (name, k)
        inside, after = t0["swapped"][name]
        _assert_equal_dicts(inside, t0["snap6"][name]["ema"], f"{name} swapped in")
        _assert_equal_dicts(after, t0["snap6"][name]["weights"], f"{name} swapped back")
    assert t0["folders_after_3"] == [2, 3]                                 # keep_last=2
    assert t0["crashed"] and t1["crashed"]
    assert t0["latest_after_crash"].endswith("step_00000003")              # the crash left 3 as latest
    assert t0["folders_after_crash"] == [2, 3, 6]                          # (6 is incomplete)
    step3 = os.path.join(run, "checkpoints", "step_00000003")
    assert set(os.listdir(step3)) >= {"discriminator", "ema", "generator", "loader_state.json", "meta.json", "rng"}
    assert sorted(os.listdir(os.path.join(step3, "ema"))) == ["discriminator", "generator"]
    assert sorted(os.listdir(os.path.join(step3, "rng"))) == ["rank0.pt", "rank1.pt"]
    step6 = os.path.join(run, "checkpoints", "step_00000006")
    assert len(os.listdir(os.path.join(step6, "generator"))) == 4                  # the shards were written
    meta = json.load(open(os.path.join(step3, "meta.json")))
    assert meta["step"] == 3 and meta["samples_seen"] == 24 and meta["world_size"] == 2
    assert meta["engines"] == {"generator": {"zero_stage": 3, "bf16": False},
                               "discriminator": {"zero_stage": 2, "bf16": False}}
    assert meta["config"] == {"test": True} and "git_revision" in meta
    rng = torch.load(os.path.join(step3, "rng", "rank1.pt"), weights_only=True)      # plain tensors only
    assert set(rng) == {"python", "numpy", "torch", "cuda"}
    ac = t0["activation_checkpointing"]
    assert ac[True]["wrapped"] == ac["selective"]["wrapped"] == 2 and ac[False]["wrapped"] == 0
    for mode in (True, "selective"):
        assert ac[mode]["losses"] == ac[False]["losses"], mode
    _assert_equal_dicts(ac[True]["weights"], ac[False]["weights"], "activation checkpointing")
    # selective recomputation feeds the backward a mix of saved and recomputed tensors: the same
    # values summed in another order. The losses agree exactly; AdamW's m / sqrt(v) turns rounding
    # in a near-zero gradient into up to a whole lr-sized step, so the weights agree within the
    # two steps' updates (lr 1e-3), not bit for bit
    for k, v in ac[False]["weights"].items():
        assert (ac["selective"]["weights"][k] - v).abs().max() <= 2e-3, k

    # -- job 2: a fresh 2-process job resumes from `latest` (step 3): bit-identical continuation
    log_path = os.path.join(out, "resume.log")       # a file, not a pipe nobody reads while we wait
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(_cmd(2, "resume", run, out), env=_env(), stdout=log_file,
                                stderr=subprocess.STDOUT, cwd=_ROOT, start_new_session=True)
        pid_file = os.path.join(out, "pid_rank1")
        deadline = time.time() + 240
        while not os.path.exists(pid_file) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        if os.path.exists(pid_file):
            time.sleep(0.5)
            os.kill(int(open(pid_file).read()), signal.SIGUSR1)                 # rank 1 only
        try:
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:                 # torchrun and its workers: one session we started
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0 and os.path.exists(pid_file), open(log_path).read()[-6000:]
    r0, r1 = (torch.load(os.path.join(out, f"resume_rank{r}.pt"), weights_only=False) for r in range(2))
    assert r0["resumed"] == {"step": 3, "samples_seen": 24, "loader_state": {"next_step": 4}, "universal": False,
                             "rng_restored": True}
    for name in STAGES:
        _assert_equal_dicts(r0["snap3"][name]["weights"], t0["snap3"][name]["weights"], f"{name} weights at 3")
        _assert_equal_dicts(r0["snap3"][name]["ema"], t0["snap3"][name]["ema"], f"{name} EMA at 3")
        assert r0["snap3"][name]["lr"] == t0["snap3"][name]["lr"]
        assert r0["snap3"][name]["global_steps"] == 3
    assert r0["draws3"] == t0["draws3"] and r1["draws3"] == t1["draws3"]  # python, numpy, torch RNG per rank
    for step in (4, 5, 6):
        assert r0["losses"][step] == t0["losses"][step], step               # bit-identical (fp32, CPU)
    for name in STAGES:
        _assert_equal_dicts(r0["snap6"][name]["weights"], t0["snap6"][name]["weights"], f"{name} weights at 6")
        _assert_equal_dicts(r0["snap6"][name]["ema"], t0["snap6"][name]["ema"], f"{name} EMA at 6")
    assert r0["universal_resumed"] and r0["cont_universal"] == r0["cont"]
    assert r0["folders_after_save6"] == [3, 6] and r0["latest_after_save6"].endswith("step_00000006")
    stops = [json.load(open(os.path.join(out, f"stop_rank{r}.json"))) for r in range(2)]
    assert stops[0]["step"] == stops[1]["step"] < 600                       # the same step on both ranks
    assert stops[1]["local"] and stops[1]["reason"] == "SIGUSR1" and not stops[0]["local"]

    # -- job 3: one process resumes the 2-process checkpoint (universal format), same weights, continues
    _run(1, "shrink", run, out)
    s = torch.load(os.path.join(out, "shrink_rank0.pt"), weights_only=False)
    assert s["resumed"] == {"step": 6, "universal": True, "rng_restored": False}
    assert s["accumulation"] == {"generator": 4, "discriminator": 4}          # 8 = 2 x 1 x 4
    assert s["cache"] == ["discriminator", "generator", "latest_universal"]      # the converted cache
    for name in STAGES:
        snap, ref = s["snap6"][name], r0["snap6"][name]
        _assert_equal_dicts(snap["weights"], ref["weights"], f"{name} weights after 2->1")   # incl. frozen, buffer
        _assert_equal_dicts(snap["ema"], ref["ema"], f"{name} EMA after 2->1")
        assert snap["lr"] == ref["lr"] and snap["global_steps"] == 6
        for k, v in s["offline"][name].items():                               # zero_to_fp32, no processes
            assert torch.equal(v, ref["weights"][k].float()), (name, k)
    w = s["warm"]
    assert w["flags"] == (True, False, False) and w["global_steps"] == [1, 1]   # fresh counters (+1 step)
    for name in STAGES:
        _assert_equal_dicts(w["loaded"][name], r0["snap6"][name]["weights"], f"{name} weights-only load")
        to_loaded, to_init = w["dist"][name]
        assert 0 < to_loaded < 0.2 * to_init, (name, to_loaded, to_init)
    for step in (7, 8):   # the same global batch on 1 process: equal up to summation order
        for name in STAGES:
            assert s["cont"][step][name] == pytest.approx(r0["cont"][step][name], rel=1e-6, abs=1e-7), (step, name)


@pytest.mark.s3
@pytest.mark.multiprocess
def test_remote_run_directory_on_s3(s3_bucket, tmp_path):
    run, out = storage_join(s3_bucket, "runs", "remote"), str(tmp_path)
    _run(1, "remote", run, out)
    rec = torch.load(os.path.join(out, "remote.pt"), weights_only=False)
    assert rec["steps"] == [2] and rec["step"] == 2 and rec["loader_state"] == {"next_step": 3}
    assert rec["rng_restored"]
    assert rec["again"] == rec["cont"]                                        # bit-identical after resume
    from data_pipeline import storage

    assert storage.read_text(storage_join(run, "checkpoints", "latest")).strip() == "step_00000002"
    assert storage.exists(storage_join(run, "checkpoints", "step_00000002", "generator",
                                       "zero_pp_rank_0_mp_rank_00_optim_states.pt"))


def storage_join(*parts: str) -> str:
    from data_pipeline import storage

    return storage.join(*parts)


# ---- in-process: the pure pieces ------------------------------------------------------------------
def test_expand_nodelist():
    assert pd.expand_nodelist("node[01-03,07]") == ["node01", "node02", "node03", "node07"]
    assert pd.expand_nodelist("a1,b[8-10],c") == ["a1", "b8", "b9", "b10", "c"]
    assert pd.expand_nodelist("gpu-[001-002]-ib") == ["gpu-001-ib", "gpu-002-ib"]
    assert pd.expand_nodelist("r[1-2]n[1-2]") == ["r1n1", "r1n2", "r2n1", "r2n2"]
    assert pd.expand_nodelist("solo") == ["solo"]
    for bad in ("node[1-", "node[3-1]", "node[a-b]"):
        with pytest.raises(ValueError):
            pd.expand_nodelist(bad)


def test_detect_env():
    tr = pd.detect_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                        "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400", "SLURM_PROCID": "0"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.local_world_size, tr.source) == (3, 8, 1, 4, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456", "SLURM_TASKS_PER_NODE": "4(x2)"}
    s = pd.detect_env(slurm)
    assert (s.rank, s.world_size, s.local_rank, s.local_world_size, s.master_addr, s.source) == \
        (5, 8, 1, 4, "gpu07", "slurm")
    assert s.master_port == pd.slurm_master_port("123456") == 15000 + 123456 % 20000
    assert pd.detect_env({**slurm, "MASTER_PORT": "40000"}).master_port == 40000
    batch = {k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}     # the batch script, outside srun
    assert pd.detect_env(batch).source == "single"
    assert pd.detect_env({}) == pd.DistEnv()


def test_stop_flag_single_process():
    flag = pd.StopFlag().install()
    try:
        assert not flag.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.should_stop() and flag.reason == "SIGTERM"
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_exit_process_after_a_process_group(tmp_path):
    """How a rank leaves (`vqscale` and the phases above): the group is destroyed while the
    interpreter is whole, non-daemon threads finish, atexit handlers run and buffered output is
    written, the exit status is kept; only the interpreter's finalization is skipped."""
    done = tmp_path / "thread_done"
    code = (
        "import atexit, sys, threading, time, torch, torch.distributed as dist\n"
        # registered first, so it runs last (atexit is LIFO)
        "atexit.register(lambda: print('initialized at exit:', dist.is_initialized(), flush=True))\n"
        "from pretrain import distributed as pd\n"
        "pd.init_distributed(backend='gloo', timeout_s=30)\n"
        "pd.destroy_distributed()\n"
        "pd.init_distributed(backend='gloo', timeout_s=30)\n"
        "t = torch.ones(2); dist.all_reduce(t)\n"
        f"threading.Thread(target=lambda: (time.sleep(0.5), open({str(done)!r}, 'w').write('x'))).start()\n"
        "print('initialized:', dist.is_initialized())\n"     # no flush: exit_process must write it
        "sys.stderr.write('unflushed')\n"
        "pd.exit_process(3)\n"
        "print('not reached')\n")
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_ID", "SLURM_PROCID")
    env = {k: v for k, v in _env().items() if k not in launcher}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=_ROOT)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["initialized: True", "initialized at exit: False"], proc.stdout
    assert proc.stderr.endswith("unflushed") and done.read_text() == "x"
    # without a process group it is a plain sys.exit
    plain = subprocess.run([sys.executable, "-c", "from pretrain import distributed as pd; pd.exit_process(4)"],
                           env=env, capture_output=True, text=True, timeout=120, cwd=_ROOT)
    assert plain.returncode == 4, plain.stderr


def test_rank_logging(tmp_path):
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        path = pd.setup_rank_logging(str(tmp_path), rank=1)
        logging.getLogger("vqscale.test").info("hello from rank 1")
        console = [h for h in root.handlers if getattr(h, "_vqscale_rank_handler", False)
                   and type(h) is logging.StreamHandler]
        assert console == []                                               # no console on rank 1
        for h in root.handlers:
            h.flush()
        assert path == str(tmp_path / "logs" / "rank1.log")
        assert "rank1" in open(path).read() and "hello from rank 1" in open(path).read()
    finally:
        for h in list(root.handlers):
            if getattr(h, "_vqscale_rank_handler", False):
                root.removeHandler(h)
                h.close()
        ds = logging.getLogger("DeepSpeed")
        for h in list(ds.handlers):
            if getattr(h, "_vqscale_rank_handler", False):
                ds.removeHandler(h)
                h.close()
        root.setLevel(before[1])


def test_gradient_accumulation_from_world_size():
    assert po.gradient_accumulation_steps(32, 4, 1) == 8
    assert po.gradient_accumulation_steps(32, 4, 2) == 4
    assert po.gradient_accumulation_steps(32, 4, 8) == 1
    with pytest.raises(ValueError, match="not a multiple"):
        po.gradient_accumulation_steps(32, 4, 3)
    optim, ds = po.OptimConfig(), rt.DeepSpeedSettings(zero_stage=3)
    for world, ga in ((1, 8), (2, 4), (4, 2)):
        cfg = rt.build_ds_config(optim, ds, 4, 32, world)
        assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) \
            == (32, 4, ga)
    assert cfg["bf16"] == {"enabled": False}                                 # "auto" on CPU
    assert cfg["zero_optimization"]["stage"] == 3 and "optimizer" not in cfg  # torch AdamW by default


def test_passthrough_merges_last():
    ds = rt.DeepSpeedSettings(zero_stage=2, passthrough={
        "zero_optimization": '{"reduce_scatter": false, "stage": 1}',    # a string, as --set gives it
        "steps_per_print": "10", "bf16": {"enabled": True}, "comms_logger": {"enabled": True}})
    cfg = rt.build_ds_config(po.OptimConfig(), ds, 2, 8, 2)
    assert cfg["zero_optimization"]["reduce_scatter"] is False and cfg["zero_optimization"]["stage"] == 1
    assert cfg["zero_optimization"]["contiguous_gradients"] is True          # deep merge keeps the rest
    assert cfg["steps_per_print"] == 10 and cfg["bf16"] == {"enabled": True}
    assert cfg["comms_logger"] == {"enabled": True}
    off = rt.build_ds_config(po.OptimConfig(), rt.DeepSpeedSettings(zero_stage=2, offload_optimizer=True), 2, 8, 1)
    assert off["optimizer"]["type"] == "AdamW" and off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    with pytest.raises(ValueError):
        rt.build_ds_config(po.OptimConfig(), rt.DeepSpeedSettings(zero_stage=2, offload_params=True), 2, 8, 1)


def test_config_sections_take_overrides():
    from pretrain.config import apply_overrides

    ds = apply_overrides(rt.DeepSpeedSettings(), ["zero_stage=3", "bf16=true", "passthrough.steps_per_print=5"])
    assert ds.zero_stage == 3 and ds.bf16 is True and ds.passthrough == {"steps_per_print": 5}   # JSON-read free-form value
    assert apply_overrides(rt.DeepSpeedSettings(), ["bf16=auto"]).bf16 == "auto"
    opt = apply_overrides(po.OptimConfig(), ["betas=0.9,0.99", "lr=2e-4"])
    assert opt.betas == (0.9, 0.99) and opt.lr == 2e-4


def test_weight_decay_groups_and_frozen_parameters():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(10, 4)
            self.pos_embed = nn.Parameter(torch.zeros(3, 4))
            self.lin = nn.Linear(4, 4)
            self.conv = nn.Conv2d(4, 4, 3)
            self.norm = nn.LayerNorm(4)
            self.text = nn.Linear(4, 4).requires_grad_(False)
            self.head = nn.Linear(4, 2)

        def no_weight_decay(self):
            return ["head.weight"]

    m = M()
    groups = po.weight_decay_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    decay = sorted(names[id(p)] for p in groups[0]["params"])
    no_decay = sorted(names[id(p)] for p in groups[1]["params"])
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert decay == ["conv.weight", "lin.weight"]
    assert no_decay == ["conv.bias", "head.bias", "head.weight", "lin.bias", "norm.bias", "norm.weight",
                        "pos_embed", "tok.weight"]                            # frozen text.* in neither


def test_tied_embedding_is_one_tensor_without_decay():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 10, bias=False)      # first owner: a Linear
            self.tok = nn.Embedding(10, 4)
            self.head.weight = self.tok.weight

    m = Tied()
    groups = po.weight_decay_groups(m, 0.1)
    assert [len(g["params"]) for g in groups] == [1] and groups[0]["weight_decay"] == 0.0
    assert groups[0]["params"][0] is m.tok.weight


def test_warmup_cosine_schedule():
    f = po.WarmupCosine(warmup=4, total=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert po.WarmupCosine(0, 0, 0.1)(50) == 1.0


def test_checkpoint_names_and_resolution(tmp_path):
    run = str(tmp_path / "run")
    assert ck.resolve_step_url(run) is None                                  # a fresh run
    for s in (5, 10, 20):
        os.makedirs(os.path.join(run, "checkpoints", ck.step_name(s)))
    os.makedirs(os.path.join(run, "checkpoints", "step_00000010", "universal"))
    with open(os.path.join(run, "checkpoints", "latest"), "w") as f:
        f.write("step_00000010\n")
    assert ck.list_steps(run) == [5, 10, 20]
    step10 = os.path.join(run, "checkpoints", "step_00000010")
    assert ck.resolve_step_url(run) == step10
    assert ck.resolve_step_url(os.path.join(run, "checkpoints")) == step10
    assert ck.resolve_step_url(os.path.join(run, "checkpoints", "step_00000005")).endswith("step_00000005")
    # keep 1 up to step 10: 5 goes, and 20 (newer than latest: an abandoned timeline) goes too
    assert ck.prune_checkpoints(run, 1, current_step=10) == [5, 20]
    assert ck.list_steps(run) == [10]


if __name__ == "__main__":
    PHASES[sys.argv[1]](*sys.argv[2:])
    pd.exit_process(0)          # the exit `vqscale` takes (an abort in finalization failed this test)
