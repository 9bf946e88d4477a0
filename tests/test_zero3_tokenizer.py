"""Tokenizers train under ZeRO-3 exactly as under ZeRO-2.

Tokenizers return dataclasses (``TokenizerOutput`` holding a ``QuantizerOutput``), which
DeepSpeed's output walks do not enter; :func:`pretrain.runtime._hooks_see_dataclasses` (applied by
``build_engine``; see the module docstring of ``pretrain/runtime.py``) extends them. Without it a
ZeRO-3 tokenizer engine fails in its first backward (the quantizer's codebook is still
partitioned when its gradient is accumulated), and at every stage the engine's backward prologue
never runs for a dataclass output.

One 2-process torchrun job (gloo, ``DS_ACCELERATOR=cpu``): each tokenizer of :data:`MODELS` trains
3 optimizer steps with gradient accumulation 2 (micro batch 2, global batch 8) at ZeRO-3 and at
ZeRO-2 (exact against plain torch, see ``pretrain/objectives.py``), from the same seed and the
same per-rank data, with its paper loss preset minus the perceptual terms (no LPIPS download).
The per-micro-batch losses and the consolidated weights after 3 steps must agree to 1e-5 (they
are bitwise equal in DeepSpeed 0.19.8), and the backward prologue must have run on every backward.

Gradient clipping is off here: with it on the clip coefficient comes from the global grad norm,
which ZeRO-2 and ZeRO-3 sum over differently partitioned buffers, so it differs in the last bit;
that 1-ulp difference in the weights changes the float noise of gradients that are mathematically
zero (conv biases before a per-channel GroupNorm, attention key biases), and AdamW divides that
noise by its own RMS into updates of order ``lr`` (measured: weights 2e-4 apart after 3 steps at
lr 1e-3 while the losses agree to 1e-7). ZeRO-3's clipping itself is covered by
``tests/test_nonfinite.py``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:      # when run as a script by torch.distributed.run
    sys.path.insert(0, _ROOT)

from pretrain import distributed as pd  # noqa: E402
from tests.launch import torchrun  # noqa: E402
from pretrain import optim as po  # noqa: E402
from pretrain import runtime as rt  # noqa: E402

MODELS = ("vit-vqgan-ss-tiny", "vqgan-f8-tiny", "mq-vae-f8-tiny")
MICRO, GLOBAL, STEPS = 2, 8, 3          # 2 ranks x 2 micro-batches (gradient accumulation 2)
ATOL = 1e-5


def _run(name: str, stage: int) -> dict:
    import torch.distributed as dist

    from model_zoo import create_model
    from pretrain.objectives import TokenizerLossConfig, TokenizerObjective

    torch.manual_seed(0)
    model = create_model(name)
    size = model.image_size
    eng = rt.build_engine(model, po.OptimConfig(lr=1e-3, warmup_steps=0, total_steps=10, grad_clip=0.0),
                          rt.DeepSpeedSettings(zero_stage=stage, param_persistence_threshold=0),
                          MICRO, GLOBAL, name=f"{name}-z{stage}")
    cfg = dataclasses.replace(TokenizerLossConfig.for_tokenizer(name), perceptual=0.0, contrastive=0.0)
    objective = TokenizerObjective(cfg)
    rank, ga = dist.get_rank(), eng.gradient_accumulation_steps()
    rec = {"ga": ga, "start": rt.consolidated_state_dict(eng), "losses": [], "prologue": [],
           "optimizer": type(eng.optimizer).__name__, "params": [n for n, _ in eng.module.named_parameters()]}
    for step in range(STEPS):
        for m in range(ga):
            g = torch.Generator().manual_seed(1000 * step + 10 * rank + m)
            images = torch.rand(MICRO, 3, size, size, generator=g) * 2 - 1
            loss, _ = objective({"model": eng}, {"image": images}, step)
            eng.backward(loss)
            # enter_backward() ran: the engine's backward prologue fired from the output hooks
            rec["prologue"].append(bool(eng.optimizer._backward_hook_state.backward_seen_this_step))
            eng.step()
            rec["losses"].append(float(loss))
    rec["weights"] = rt.consolidated_state_dict(eng)
    return rec


def _phase_job(out: str) -> None:
    env = pd.init_distributed(timeout_s=120)
    t0 = time.time()
    res = {name: {stage: _run(name, stage) for stage in (3, 2)} for name in MODELS}
    res["seconds"] = time.time() - t0
    torch.save(res, os.path.join(out, f"rank{env.rank}.pt"))


PHASES = {"job": _phase_job}



@pytest.mark.multiprocess
def test_tokenizers_train_the_same_under_zero3_and_zero2(tmp_path):
    out = str(tmp_path)
    proc = torchrun(__file__, "job", out)
    assert proc.returncode == 0, f"job failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "cannot be detected" not in proc.stdout + proc.stderr     # DeepSpeed's unknown-output warning
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    for name in MODELS:
        for r, res in enumerate(ranks):
            z3, z2 = res[name][3], res[name][2]
            what = f"{name} rank {r}"
            assert z3["optimizer"] == "DeepSpeedZeroOptimizer_Stage3", what
            assert z2["optimizer"] == "DeepSpeedZeroOptimizer", what
            assert z3["ga"] == z2["ga"] == 2, what
            assert all(z3["prologue"]) and all(z2["prologue"]), (what, z3["prologue"], z2["prologue"])
            assert len(z3["losses"]) == len(z2["losses"]) == STEPS * 2, what
            for i, (a, b) in enumerate(zip(z3["losses"], z2["losses"])):
                assert abs(a - b) <= ATOL, (what, "micro-batch", i, a, b)
            w3, w2 = z3["weights"], z2["weights"]
            assert w3.keys() == w2.keys() == z3["start"].keys(), what
            for k in w3:
                torch.testing.assert_close(w3[k].float(), w2[k].float(), rtol=0, atol=ATOL,
                                           msg=lambda m, k=k: f"{what} {k}: {m}")
            # it trained: every trainable weight moved (same start at both stages)
            for k in w3:
                assert torch.equal(z3["start"][k], z2["start"][k]), (what, k)
            moved = [k for k in w3 if not torch.equal(w3[k], z3["start"][k])]
            assert len(moved) > 0.9 * len(w3), (what, len(moved), len(w3))
        # the ranks agree on the parameters (ZeRO-3's are gathered); buffers may not: DeepSpeed
        # syncs no buffers, so MQ-VAE's BatchNorm running stats follow each rank's own data
        for stage in (3, 2):
            a, b = ranks[0][name][stage]["weights"], ranks[1][name][stage]["weights"]
            params = ranks[0][name][stage]["params"]
            assert params and all(torch.equal(a[k], b[k]) for k in params), (name, stage)
    assert ranks[0]["seconds"] < 120, ranks[0]["seconds"]


# ---- in-process: the walks themselves (no process group) ------------------------------------------
@dataclasses.dataclass
class _Inner:
    z: torch.Tensor
    stats: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Outer:
    recon: torch.Tensor
    inner: _Inner
    items: list
    note: str = "kept"
    derived: int = dataclasses.field(init=False, default=0)

    def __post_init__(self):
        object.__setattr__(self, "derived", self.derived + 1)      # counts __init__ runs


def _sample() -> _Outer:
    t = torch.ones(2, requires_grad=True)
    return _Outer(recon=t * 2, inner=_Inner(z=t * 3, stats={"usage": torch.tensor(0.5)}),
                  items=[t * 4, (t * 5, _Inner(z=t * 6))])


def test_apply_to_tensors_only_enters_dataclasses():
    rt._hooks_see_dataclasses()
    rt._hooks_see_dataclasses()                                     # idempotent
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero import utils as zero_utils

    fn = zero_utils.apply_to_tensors_only
    assert parameter_offload.apply_to_tensors_only is fn and fn._vqscale_dataclasses
    seen = []

    def tag(t):
        seen.append(t)
        return t.detach().clone().add_(100)

    before = _sample()
    after = fn(tag, before)
    assert len(seen) == 6                                           # every tensor, nested ones too
    assert type(after) is _Outer and after is not before and after.note == "kept" and after.derived == 1
    assert torch.equal(after.recon, torch.full((2,), 102.0)) and torch.equal(before.recon, torch.full((2,), 2.0))
    assert torch.equal(after.inner.z, torch.full((2,), 103.0))
    assert torch.equal(after.inner.stats["usage"], torch.tensor(100.5))
    assert torch.equal(after.items[1][1].z, torch.full((2,), 106.0))
    # non-dataclass values go to DeepSpeed's own code unchanged in behaviour
    plain = fn(tag, (torch.zeros(1), {"a": torch.zeros(1)}, "s", None))
    assert torch.equal(plain[0], torch.full((1,), 100.0)) and torch.equal(plain[1]["a"], torch.full((1,), 100.0))
    assert plain[2:] == ("s", None)
    assert fn(tag, _Outer) is _Outer                                # a dataclass type is not walked


def test_engine_output_hooks_reach_dataclass_tensors():
    rt._hooks_see_dataclasses()
    from deepspeed.runtime.utils import register_output_backward_hooks

    calls = []
    out = _sample()
    manager = register_output_backward_hooks(out, preprocess_once_fn=lambda: calls.append("once"),
                                             preprocess_per_tensor_fn=lambda g: calls.append("t") or g)
    assert len(manager.hook_handles) == 5                           # the 5 tensors with grad_fn
    (out.inner.z.sum() + out.items[1][1].z.sum()).backward()
    assert calls.count("once") == 1 and calls.count("t") == 2


if __name__ == "__main__":
    PHASES[sys.argv[1]](*sys.argv[2:])
