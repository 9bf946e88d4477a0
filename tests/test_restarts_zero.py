"""Dead-code restarts hold under every ZeRO stage (issue 18, part 1).

A restart writes new rows into the quantizer's codebook ``embed``, an ``nn.Parameter``. A sharded
optimizer keeps its own fp32 master copy of it (and Adam moments): before the fix, the in-place
write was overwritten by that copy at the next optimizer step, so no code was ever restarted under
ZeRO although ``dead_codes`` fell (its counter is reset on restart). Now the quantizer queues its
restarts (``pop_row_writes``) and ``pretrain.runtime.apply_row_writes`` writes them into the
master copy, the working copy and the EMA, and zeroes their Adam moments.

One 2-process torchrun job (gloo, ``DS_ACCELERATOR=cpu``) per run, at ZeRO-1, 2 and 3 with
gradient accumulation 2: codes 0-3 are made dead before the second micro-batch of step 2 (their
usage counters zeroed on both ranks), the one after which the optimizer steps; the rows the quantizer restarts them to must be in the consolidated weights after
that optimizer step, stay within a few Adam updates of it after the next one, be identical on both
ranks, start with zero moments, and be what the EMA holds. Only those two micro-batches (the data
init and the restart) write anything: the all-False writes of the other restart checks are dropped.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:      # when run as a script by torch.distributed.run
    sys.path.insert(0, _ROOT)

from tests.launch import torchrun  # noqa: E402

DEAD = [0, 1, 2, 3]
LR = 1e-3
MICRO, GLOBAL = 4, 16            # 2 ranks x 2 micro-batches


class _Model(torch.nn.Module):
    """A linear encoder, a (non-factorized, l2-normalized) quantizer and a linear decoder."""

    def __init__(self):
        from model_zoo.quantizers import QuantizerConfig, VectorQuantizer

        super().__init__()
        self.enc = torch.nn.Linear(6, 8)
        self.quantizer = VectorQuantizer(8, QuantizerConfig(codebook_size=16, dim=8, factorized=False))
        self.dec = torch.nn.Linear(8, 6)

    def forward(self, x):
        q = self.quantizer(self.enc(x))
        return torch.nn.functional.mse_loss(self.dec(q.z_q), x) + q.loss, q


def _run(stage: int) -> dict:
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_optimizer_state

    from pretrain import ema as pema
    from pretrain import optim as po
    from pretrain import runtime as rt

    torch.manual_seed(0)
    model = _Model()
    eng = rt.build_engine(model, po.OptimConfig(lr=LR, warmup_steps=0, total_steps=100, grad_clip=0.0,
                                                weight_decay=0.0),
                          rt.DeepSpeedSettings(zero_stage=stage, param_persistence_threshold=0), MICRO, GLOBAL,
                          name=f"restart-z{stage}")
    ema = pema.EMA(eng, decay=0.9)
    q, rank = eng.module.quantizer, dist.get_rank()
    rec: dict = {"ga": eng.gradient_accumulation_steps(), "writes": []}
    real_apply = rt.apply_row_writes

    def counted(engine, writes):       # which micro-batches reach the collective write
        rec["writes"].append((step, m, len(writes)))
        return real_apply(engine, writes)

    rt.apply_row_writes = counted
    last = eng.gradient_accumulation_steps() - 1
    for step in range(4):
        for m in range(last + 1):
            if step == 2 and m == last:            # restarted in the micro-batch that steps the optimizer
                q.cluster_size[DEAD] = 0.0         # dead now, on both ranks (a buffer: not synced by DeepSpeed)
                rec["before"] = rt.consolidated_state_dict(eng)["quantizer.embed"]
            g = torch.Generator().manual_seed(100 * step + 10 * rank + m)
            loss, out = eng(torch.randn(MICRO * 8, 6, generator=g))
            if step == 2 and m == last:
                rec["queued"] = (q._row_write.mask.clone(), q._row_write.values.detach().clone())
                rec["stats"] = {k: float(v) for k, v in out.stats.items()}
            eng.backward(loss)
            eng.step()
        ema.update()
        if step == 2:
            rec["after"] = rt.consolidated_state_dict(eng)["quantizer.embed"]
            rec["moments"] = {k: rt._full_optimizer_state(eng, q.embed, k, safe_get_full_optimizer_state).clone()
                              for k in rt._MOMENTS}
            rec["ema"] = ema.full_state_dict()["quantizer.embed"]
    rec["next"] = rt.consolidated_state_dict(eng)["quantizer.embed"]
    rt.apply_row_writes = real_apply
    return rec


def _phase_job(out: str) -> None:
    from pretrain import distributed as pd

    env = pd.init_distributed(timeout_s=120)
    res = {stage: _run(stage) for stage in (1, 2, 3)}
    torch.save(res, os.path.join(out, f"rank{env.rank}.pt"))


PHASES = {"job": _phase_job}


@pytest.mark.multiprocess
def test_restarted_rows_survive_the_optimizer_at_every_zero_stage(tmp_path):
    proc = torchrun(__file__, "job", str(tmp_path))
    assert proc.returncode == 0, f"job failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for stage in (1, 2, 3):
        for r, res in enumerate(rank[stage] for rank in ranks):
            what = f"ZeRO-{stage} rank {r}"
            assert res["ga"] == 2, what
            # the quantizer checks for dead codes at every step, but only the data init (the first
            # micro-batch) and the restart write anything: all-False writes never reach the
            # three full-codebook all-reduces
            assert res["writes"] == [(0, 0, 1), (2, 1, 1)], (what, res["writes"])
            mask, values = res["queued"]
            assert mask.tolist() == [i in DEAD for i in range(16)], what
            assert res["stats"]["restarted"] == len(DEAD) and res["stats"]["dead_codes"] == 0, (what, res["stats"])
            new, old = values[DEAD], res["before"][DEAD]
            # the restart is in the weights after its optimizer step, exactly
            assert torch.equal(res["after"][DEAD], new), what
            assert not torch.allclose(new, old, atol=0.05), what          # a real change, not a no-op
            # ... and still there after the next steps: Adam moves an element by about lr per step
            assert (res["next"][DEAD] - new).abs().max() <= 3 * LR, what
            assert (res["next"][DEAD] - old).abs().max() > 0.05, what
            # fresh optimizer state for the restarted rows only
            for k, m in res["moments"].items():
                assert torch.count_nonzero(m[DEAD]) == 0, (what, k)
                assert torch.count_nonzero(m[4:]) > 0, (what, k)
            # the EMA restarted with them
            assert torch.equal(res["ema"][DEAD], new), what
        for key in ("after", "next", "ema"):
            assert torch.equal(ranks[0][stage][key], ranks[1][stage][key]), (stage, key)


if __name__ == "__main__":
    PHASES[sys.argv[1]](*sys.argv[2:])
