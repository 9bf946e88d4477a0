"""A non-finite gradient skips the optimizer step at every ZeRO stage, on every rank alike.

One 2-process torchrun job (gloo, ``DS_ACCELERATOR=cpu``) loops over engines built by
:func:`pretrain.runtime.build_engine`: ZeRO stages 0-3 in fp32 with and without clipping, stages
0-3 in bf16 (DeepSpeed's CPU accelerator runs bf16), and the two ``passthrough`` settings under
which ZeRO-1/2 would not check by itself (``compute_grad_norm=false``; bf16 with
``check_grad_overflow=false``). Each engine trains 2 good steps, a step where rank 1's loss on
its first micro-batch is NaN, and 2 more good steps; a reference engine (same seed) trains only
the 4 good steps. The bad step must leave weights, AdamW state and LR alone and count one
skipped step on both ranks; the final weights must equal the reference's (so the accumulated
NaN gradients were dropped); and in fp32 all stages must agree (so stage 0's own clipping
matches ZeRO's). The stage-0 guard is also checked in-process on a stand-in engine."""

from __future__ import annotations

import math
import os
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:      # when run as a script by torch.distributed.run
    sys.path.insert(0, _ROOT)

from pretrain import distributed as pd  # noqa: E402
from tests.launch import torchrun  # noqa: E402
from pretrain import optim as po  # noqa: E402
from pretrain import runtime as rt  # noqa: E402

MICRO, GLOBAL = 4, 16            # 2 ranks x 2 micro-batches (gradient accumulation 2)
STEPS, BAD = (1, 2, 3, 4, 5), 3
CLIP = 0.1                       # below the grad norms here (~0.5), so clipping really acts
# name: (zero stage, grad_clip, bf16, passthrough)
CASES = {f"z{s}-{'clip' if c else 'noclip'}": (s, c, False, {}) for s in (0, 1, 2, 3) for c in (CLIP, 0.0)}
CASES.update({f"z{s}-bf16": (s, CLIP, True, {}) for s in (0, 1, 2, 3)})
CASES["z2-no-norm"] = (2, 0.0, False, {"zero_optimization": {"compute_grad_norm": False}})
CASES["z1-bf16-no-check"] = (1, CLIP, True, {"bf16": {"check_grad_overflow": False}})


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 3))    # 146 weights: no even split


def _micro_batch(step: int, index: int):
    g = torch.Generator().manual_seed(1000 * step + index)
    return torch.randn(MICRO, 7, generator=g), torch.randint(0, 3, (MICRO,), generator=g)


def _adam_state(eng) -> list[torch.Tensor]:
    """This rank's AdamW state (its partition under ZeRO), in a fixed order."""
    out = []
    for st in eng.basic_optimizer.state.values():       # keyed by the (flat) fp32 partitions under ZeRO
        out += [torch.as_tensor(st[k]).detach().clone().float() for k in ("step", "exp_avg", "exp_avg_sq")]
    return out


def _run_case(stage: int, clip: float, bf16: bool, passthrough: dict, steps, bad: int | None) -> dict:
    import torch.distributed as dist

    torch.manual_seed(0)
    eng = rt.build_engine(_mlp(), po.OptimConfig(lr=1e-2, warmup_steps=2, total_steps=10, grad_clip=clip),
                          rt.DeepSpeedSettings(zero_stage=stage, bf16=bf16, param_persistence_threshold=0,
                                               passthrough=passthrough), MICRO, GLOBAL, name=f"z{stage}")
    rank, ga = dist.get_rank(), eng.gradient_accumulation_steps()
    dtype = torch.bfloat16 if bf16 else torch.float32
    rec = {"ga": ga, "weights": [rt.consolidated_state_dict(eng)], "lr": [eng.get_lr()[0]],
           "skipped": [eng.skipped_steps], "applied": [None], "norm": [None], "adam": [_adam_state(eng)],
           "optimizer": type(eng.optimizer).__name__}
    for step in steps:
        for m in range(ga):
            x, y = _micro_batch(step, rank * ga + m)
            loss = F.cross_entropy(eng(x.to(dtype)).float(), y)
            if step == bad and rank == 1 and m == 0:
                loss = loss * float("nan")
            eng.backward(loss)
            eng.step()
        norm = eng.get_global_grad_norm()
        rec["weights"].append(rt.consolidated_state_dict(eng))
        rec["lr"].append(eng.get_lr()[0])
        rec["skipped"].append(eng.skipped_steps)
        rec["applied"].append(eng.was_step_applied())
        rec["norm"].append(None if norm is None else float(norm))
        rec["adam"].append(_adam_state(eng))
    return rec


def _phase_job(out: str) -> None:
    env = pd.init_distributed(timeout_s=120)
    t0 = time.time()
    res = {}
    for name, (stage, clip, bf16, passthrough) in CASES.items():
        res[name] = {"run": _run_case(stage, clip, bf16, passthrough, STEPS, BAD),
                     "ref": _run_case(stage, clip, bf16, passthrough, [s for s in STEPS if s != BAD], None)}
    res["seconds"] = time.time() - t0
    torch.save(res, os.path.join(out, f"rank{env.rank}.pt"))


PHASES = {"job": _phase_job}


# ---- launching ------------------------------------------------------------------------------------

def _finite(sd: dict) -> bool:
    return all(torch.isfinite(v.float()).all() for v in sd.values())


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _close(a: dict, b: dict, what: str, atol: float) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=atol, msg=lambda m: f"{what} {k}: {m}")


@pytest.mark.multiprocess
def test_nonfinite_step_is_skipped_on_every_stage(tmp_path):
    out = str(tmp_path)
    proc = torchrun(__file__, "job", out)
    assert proc.returncode == 0, f"job failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    i_bad = STEPS.index(BAD) + 1                   # index in the records (0: before training)
    for name, (stage, clip, bf16, _) in CASES.items():
        for r, res in enumerate(ranks):
            run, ref = res[name]["run"], res[name]["ref"]
            what = f"{name} rank {r} ({run['optimizer']})"
            assert run["ga"] == 2, what
            w, lr = run["weights"], run["lr"]
            # good steps before and after: applied, finite, the weights move, finite norm
            for i in (1, 2, 4, 5):
                assert run["applied"][i] and run["skipped"][i] == run["skipped"][i - 1], (what, i)
                assert _finite(w[i]) and not _equal(w[i], w[i - 1]), (what, i)
                if not name.endswith("no-norm"):                  # compute_grad_norm=false: None
                    assert math.isfinite(run["norm"][i]) and run["norm"][i] > CLIP, (what, i, run["norm"][i])
            # the bad step: skipped on this rank, nothing moved
            assert run["skipped"][i_bad] == run["skipped"][i_bad - 1] + 1 and not run["applied"][i_bad], what
            assert _equal(w[i_bad], w[i_bad - 1]) and lr[i_bad] == lr[i_bad - 1], what
            if not name.endswith("no-norm"):
                assert run["norm"][i_bad] == math.inf, (what, run["norm"][i_bad])
            before, after = run["adam"][i_bad - 1], run["adam"][i_bad]
            assert len(before) == len(after) > 0 and all(torch.equal(a, b) for a, b in zip(before, after)), what
            assert run["skipped"][-1] == 1
            # as if the bad step's data had never been seen: same LR schedule, same final weights
            assert lr[:i_bad] + lr[i_bad + 1:] == ref["lr"], what
            _close(w[-1], ref["weights"][-1], what + " vs reference", atol=1e-7)
        # the ranks agree (the ZeRO-3 weights are gathered; the others are whole on every rank)
        for a, b in zip(ranks[0][name]["run"]["weights"], ranks[1][name]["run"]["weights"]):
            assert _equal(a, b), name
    # fp32: every stage trains to the same weights (stage 0 clips itself; ZeRO-1/2/3 clip in DeepSpeed)
    for tag in ("clip", "noclip"):
        base = ranks[0][f"z0-{tag}"]["run"]
        for s in (1, 2, 3):
            other = ranks[0][f"z{s}-{tag}"]["run"]
            _close(other["weights"][-1], base["weights"][-1], f"z{s}-{tag} vs z0-{tag}", atol=1e-6)
            for i in (1, 2, 4, 5):
                assert other["norm"][i] == pytest.approx(base["norm"][i], rel=1e-5), (s, tag, i)
    # clipping acts: the clipped and unclipped runs part ways
    clipped, unclipped = ranks[0]["z0-clip"]["run"]["weights"][-1], ranks[0]["z0-noclip"]["run"]["weights"][-1]
    assert not _equal(clipped, unclipped)
    assert ranks[0]["seconds"] < 120, ranks[0]["seconds"]


# ---- in-process: the stage-0 guard on a stand-in engine (no process group) ------------------------
def test_stage0_guard_skips_clips_and_reports_the_norm():
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    engine = SimpleNamespace(optimizer=opt, basic_optimizer=opt, gradient_clipping=lambda: CLIP,
                             clip_fp32_gradients=lambda: pytest.fail("the engine's own clipping must be off"))
    rt._skip_nonfinite_steps(engine)
    assert hasattr(opt.step, "_wrapped_by_lr_sched")        # LambdaLR's marker survives the wrap
    start = {k: v.clone() for k, v in model.state_dict().items()}

    x, y = _micro_batch(1, 0)
    F.cross_entropy(model(x), y).mul(float("inf")).backward()        # inf loss: inf/NaN gradients
    opt.step()
    assert opt.overflow and opt._global_grad_norm == math.inf and not opt.state
    assert _equal(model.state_dict(), start)
    engine.clip_fp32_gradients()                                        # replaced by a no-op
    model.zero_grad(set_to_none=True)

    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    assert norm > CLIP
    ref_model = _mlp()
    ref_model.load_state_dict(start)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    for p, g in zip(ref_model.parameters(), grads):
        p.grad = g * (CLIP / (norm + 1e-6))                             # DeepSpeed's clipping rule
    ref_opt.step()
    opt.step()
    sched.step()
    assert not opt.overflow and opt._global_grad_norm == pytest.approx(norm, rel=1e-6)
    _close(model.state_dict(), ref_model.state_dict(), "guarded step vs clipped AdamW", atol=1e-7)


def test_unknown_optimizer_wrapper_is_refused():
    class Wrapper:
        pass

    with pytest.raises(TypeError, match="non-finite"):
        rt._skip_nonfinite_steps(SimpleNamespace(optimizer=Wrapper(), basic_optimizer=None))


if __name__ == "__main__":
    PHASES[sys.argv[1]](*sys.argv[2:])
