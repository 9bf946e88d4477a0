"""Quantizers: the papers' maths on tiny hand-checkable cases, and a real 2-process gloo run in
which ranks see different data and must keep bit-identical codebooks (DESIGN.md, model_zoo)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:      # when run as a script by torch.distributed.run
    sys.path.insert(0, _ROOT)

from model_zoo.quantizers import QuantizerConfig, VectorQuantizer, build_quantizer, prior_kl  # noqa: E402

E3 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
Z4 = torch.tensor([[0.1, 0.2], [0.9, -0.1], [0.2, 1.5], [1.2, 0.4]])   # nearest codes 0, 1, 2, 1


def plain(k=3, dim=2, **kw) -> VectorQuantizer:
    """No projection, no normalization: the lookup space is the input space."""
    kw = {"restart_dead": False, "data_init": False, **kw}
    return VectorQuantizer(dim, QuantizerConfig(codebook_size=k, dim=dim, factorized=False,
                                                l2_normalize=False, **kw))


def set_codebook(q: VectorQuantizer, e: torch.Tensor) -> None:
    with torch.no_grad():
        q.embed.copy_(e)
        if q.config.ema:
            q.embed_avg.copy_(e * q.cluster_size[:, None])


def nearest(q: VectorQuantizer, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        ze = q.proj_in(z.reshape(-1, q.in_dim)).float()
        if q.config.l2_normalize:
            ze = F.normalize(ze, dim=-1)
        return torch.cdist(ze, q.codebook()).argmin(-1).reshape(z.shape[:-1])


# ---- Regularized VQ prior KL --------------------------------------------------------------------
def test_prior_kl_zero_at_uniform_log_n_at_collapse():
    for n in (2, 8, 1024, 8192):
        assert prior_kl(torch.full((n,), 1.0 / n)).item() == 0.0
        assert prior_kl(F.one_hot(torch.tensor(n - 1), n).float()).item() == pytest.approx(math.log(n), rel=1e-6)
    for n in (3, 41, 1000):     # 1/n not representable: zero to rounding
        assert abs(prior_kl(torch.full((n,), 1.0 / n)).item()) < 1e-6
    assert prior_kl(torch.tensor([0.5, 0.5, 0.0, 0.0])).item() == pytest.approx(math.log(2), rel=1e-6)
    p = torch.tensor([0.7, 0.2, 0.1, 0.0], requires_grad=True)
    prior_kl(p).backward()
    assert torch.isfinite(p.grad).all()


# ---- straight-through, losses, EMA ---------------------------------------------------------------
def test_straight_through_gradient_reaches_z():
    q = plain()
    set_codebook(q, E3)
    z = Z4.clone().requires_grad_(True)
    w = torch.randn(4, 2)
    (q(z).z_q * w).sum().backward()
    assert torch.equal(z.grad, w)            # identity gradient through the quantizer
    assert q.codebook_size == 3

    q = VectorQuantizer(16, QuantizerConfig(codebook_size=32, dim=4))   # factorized, l2
    z = torch.randn(2, 5, 16, requires_grad=True)
    q(z).z_q.square().sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert q.proj_in.weight.grad.abs().sum() > 0 and q.proj_out.weight.grad.abs().sum() > 0


def test_commitment_and_codebook_losses_by_hand():
    q = plain(beta=0.25)
    set_codebook(q, E3)
    z = Z4.clone().requires_grad_(True)
    out = q(z)
    assert out.codes.tolist() == [0, 1, 2, 1]
    # squared errors per position: .05 .02 .29 .20 -> mean over 8 elements = 0.07
    assert torch.allclose(out.distances, torch.tensor([0.05, 0.02, 0.29, 0.20]), atol=1e-6)
    assert out.losses["commitment"].item() == pytest.approx(0.07, abs=1e-6)
    assert out.losses["codebook"].item() == pytest.approx(0.07, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.07 * 1.25, abs=1e-6)
    assert not out.distances.requires_grad
    # codebook loss moves only the codes, commitment only the encoder output
    out.losses["codebook"].backward(retain_graph=True)
    assert z.grad is None
    e_sel = E3[out.codes]
    expect = torch.zeros(3, 2).index_add_(0, out.codes, 2 * (e_sel - Z4) / 8)
    assert torch.allclose(q.embed.grad, expect, atol=1e-6)
    q.embed.grad = None
    out.losses["commitment"].backward()
    assert q.embed.grad is None or q.embed.grad.abs().sum() == 0
    assert torch.allclose(z.grad, 2 * (Z4 - e_sel) / 8, atol=1e-6)


def test_ema_update_by_hand():
    decay, eps = 0.5, 0.1
    q = plain(ema=True, decay=decay, eps=eps).train()
    set_codebook(q, E3)
    assert "embed" not in dict(q.named_parameters())
    c0 = q.cluster_size.clone()
    out = q(Z4)
    assert out.losses["codebook"].item() == 0.0
    assert out.loss.item() == pytest.approx(0.25 * out.losses["commitment"].item())
    counts = [1.0, 2.0, 1.0]
    sums = [Z4[0], Z4[1] + Z4[3], Z4[2]]
    cs = [decay * c0[i].item() + (1 - decay) * counts[i] for i in range(3)]
    avg = [decay * E3[i] * c0[i].item() + (1 - decay) * sums[i] for i in range(3)]
    total = sum(cs)
    smoothed = [(c + eps) / (total + 3 * eps) * total for c in cs]
    expect = torch.stack([avg[i] / smoothed[i] for i in range(3)])
    assert torch.allclose(q.cluster_size, torch.tensor(cs), atol=1e-6)
    assert torch.allclose(q.embed_avg, torch.stack(avg), atol=1e-6)
    assert torch.allclose(q.embed, expect, atol=1e-6)
    assert q.steps.item() == 1


# ---- dead codes and statistics ------------------------------------------------------------------
@pytest.mark.parametrize("ema", [True, False])
def test_dead_code_restart_revives_codes(ema):
    torch.manual_seed(0)
    q = plain(k=8, ema=ema, decay=0.5, dead_threshold=1.0, restart_dead=True, restart_every=3).train()
    far = torch.stack([torch.tensor([100.0 + i, 100.0]) for i in range(8)])
    far[0] = 0.0
    set_codebook(q, far)                               # every input maps to code 0
    centers = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 3.0]])

    def batch():
        return centers[torch.randint(3, (60,))] + 0.1 * torch.randn(60, 2)

    s1 = q(batch()).stats                   # unused counts 2 -> 1: not yet dead
    assert s1["dead_codes"].item() == 0 and s1["usage"].item() == pytest.approx(1 / 8)
    s2 = q(batch()).stats                   # 1 -> 0.5: dead, but restarts only every 3rd step
    assert s2["dead_codes"].item() == 7 and s2["restarted"].item() == 0
    z3 = batch()
    s3 = q(z3).stats
    assert s3["restarted"].item() == 7 and s3["dead_codes"].item() == 0
    # the revived codes are encoder outputs of the current batch
    revived = q.embed.detach()[1:]
    assert (revived[:, None] - z3[None]).square().sum(-1).min(dim=1).values.max().item() == 0.0
    assert torch.all(q.cluster_size[1:] == 2.0)
    if ema:
        assert torch.allclose(q.embed_avg[1:], revived * 2.0)
    q.eval()
    with torch.no_grad():
        s4 = q(batch()).stats
    assert s4["usage"].item() > 1 / 8 and s4["dead_codes"].item() == 0


@pytest.mark.parametrize("restart_dead", [True, False])
def test_data_init_restarts_every_code_at_the_first_training_step(restart_dead):
    """Random codes on the sphere against the concentrated outputs of a fresh encoder: one code wins
    everything. ``data_init`` puts every code on an encoder output of the first training batch (and
    queues the rows for a sharded optimizer), once."""
    torch.manual_seed(0)
    q = VectorQuantizer(8, QuantizerConfig(codebook_size=16, dim=8, factorized=False, restart_dead=restart_dead,
                                           data_init=True)).train()
    z = F.normalize(torch.randn(1, 8) + 0.05 * torch.randn(200, 8), dim=-1)   # one tight cluster
    with torch.no_grad():
        before = nearest(q, z).unique().numel()
        s1 = q(z).stats
    assert before <= 2 and s1["restarted"].item() == 16
    rows = q.embed.detach()
    assert (rows[:, None] - z[None]).square().sum(-1).min(dim=1).values.max().item() < 1e-10   # each an output
    (w,) = q.pop_row_writes()
    assert w.param is q.embed and bool(w.mask.all()) and torch.equal(w.values, rows)
    with torch.no_grad():
        assert nearest(q, z).unique().numel() >= 12                              # now they share the cluster
        s2 = q(z).stats
    assert s2["restarted"].item() == 0 and torch.equal(q.embed.detach(), rows)


def test_usage_and_perplexity_of_a_known_assignment():
    q = plain(k=4)
    set_codebook(q, torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    z = torch.tensor([[0.1, 0.0], [0.0, 0.2], [9.0, 0.5], [0.3, 9.9]])     # histogram 2, 1, 1, 0
    for mode in (q.eval, q.train):
        mode()
        s = q(z).stats
        assert s["usage"].item() == pytest.approx(0.75)
        assert s["perplexity"].item() == pytest.approx(2 ** 1.5, rel=1e-5)   # exp(1.5 ln 2)
        assert all(not v.requires_grad and v.dim() == 0 for v in s.values())


# ---- Regularized VQ stochastic mask, Gumbel -------------------------------------------------------
def test_stochastic_mask_samples_exactly_the_ratio():
    torch.manual_seed(0)
    cfg = dict(codebook_size=512, dim=8, factorized=False, restart_dead=False, data_init=False, prior_temperature=1e4)
    z = torch.randn(5, 100, 8)
    q0 = VectorQuantizer(8, QuantizerConfig(stochastic_mask_ratio=0.0, **cfg)).train()
    assert torch.equal(q0(z).codes, nearest(q0, z))

    q = VectorQuantizer(8, QuantizerConfig(stochastic_mask_ratio=0.4, **cfg)).train()
    zg = z.clone().requires_grad_(True)
    out = q(zg)
    differ = (out.codes != nearest(q, z)).sum().item()
    # 200 = round(0.4 * 500) positions sampled from a ~uniform p(k|z) over 512 codes: almost all
    # differ from the argmax, and never more than the masked ones
    assert 195 <= differ <= 200
    # forward value is the hard code; backward through the softmax / Gumbel-softmax relaxation
    assert torch.allclose(out.z_q.reshape(-1, 8), q.codebook()[out.codes.reshape(-1)], atol=1e-6)
    out.z_q.square().sum().backward()
    assert zg.grad.abs().sum() > 0
    assert (q.embed.grad.abs().sum(1) > 0).sum() > 400   # every code gets relaxation gradient
    q.eval()
    with torch.no_grad():
        assert torch.equal(q(z).codes, nearest(q, z))


def test_gumbel_temperature_schedule_and_quantization():
    cfg = QuantizerConfig(codebook_size=64, dim=8, factorized=False, kind="gumbel", tau_start=1.0,
                          tau_end=1 / 16, tau_anneal_steps=100, kl_weight_gumbel=0.5, restart_dead=False,
                          data_init=False)
    q = VectorQuantizer(8, cfg)
    taus = []
    for step in (0, 25, 50, 100, 10_000):
        q.set_step(step)
        taus.append(q.tau)
    assert taus[0] == 1.0 and taus[2] == pytest.approx(0.25) and taus[3] == taus[4] == pytest.approx(1 / 16)
    assert taus == sorted(taus, reverse=True)

    q.set_step(0)
    z = torch.randn(3, 20, 8, requires_grad=True)
    out = q.train()(z)
    assert torch.allclose(out.z_q.reshape(-1, 8), q.codebook()[out.codes.reshape(-1)], atol=1e-6)
    assert out.losses["commitment"].item() == 0.0
    assert out.loss.item() == pytest.approx(0.5 * out.losses["gumbel_kl"].item())
    assert 0 <= out.losses["gumbel_kl"].item() <= math.log(64)
    (out.z_q.square().sum() + out.loss).backward()
    assert z.grad.abs().sum() > 0 and q.embed.grad.abs().sum() > 0
    q.eval()
    with torch.no_grad():
        assert torch.equal(q(z).codes, nearest(q, z))


# ---- factorized l2 lookup, state, meta, bf16 -----------------------------------------------------
def test_factorized_l2_lookup_matches_eval_output():
    torch.manual_seed(0)
    q = VectorQuantizer(16, QuantizerConfig(codebook_size=32, dim=4)).eval()
    z = torch.randn(2, 3, 5, 16)
    with torch.no_grad():
        out = q(z)
        assert out.codes.shape == (2, 3, 5) and out.codes.dtype == torch.long
        assert out.z_q.shape == z.shape
        assert torch.equal(out.z_q, q.lookup(out.codes))
        e = q.codebook()
        assert torch.allclose(e.norm(dim=-1), torch.ones(32), atol=1e-6)
        assert torch.allclose(q.lookup(out.codes), q.proj_out(e[out.codes]))
        ze = F.normalize(q.proj_in(z), dim=-1)
        cos = ze @ e.t()
        assert torch.equal(out.codes, cos.argmax(-1))           # cosine-similarity lookup
        assert torch.allclose(out.distances, 2 - 2 * cos.max(-1).values, atol=1e-5)
        assert out.distances.max() <= 4.0


@pytest.mark.parametrize("ema", [True, False])
def test_state_dict_round_trip(ema):
    cfg = QuantizerConfig(codebook_size=32, dim=4, ema=ema, decay=0.5)
    torch.manual_seed(0)
    q = VectorQuantizer(16, cfg).train()
    for _ in range(3):
        q(torch.randn(40, 16))
    sd = q.state_dict()
    assert {"embed", "cluster_size", "steps"} <= set(sd) and (("embed_avg" in sd) == ema)
    torch.manual_seed(1)
    q2 = VectorQuantizer(16, cfg)
    q2.load_state_dict(sd)
    for k, v in q2.state_dict().items():
        assert torch.equal(v, sd[k]), k
    z = torch.randn(7, 16)
    with torch.no_grad():
        a, b = q.eval()(z), q2.eval()(z)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.z_q, b.z_q)


def test_meta_construction_and_bf16():
    with torch.device("meta"):
        q = VectorQuantizer(768, QuantizerConfig(ema=True))
    assert q.embed.is_meta
    q.to_empty(device="cpu")
    q.reset_parameters()
    assert torch.allclose(q.codebook().norm(dim=-1), torch.ones(8192), atol=1e-5)

    q = VectorQuantizer(16, QuantizerConfig(codebook_size=32, dim=4, ema=True)).bfloat16().train()
    assert q.proj_in.weight.dtype == torch.bfloat16
    assert all(getattr(q, n).dtype == torch.float32 for n in ("embed", "embed_avg", "cluster_size"))
    out = q(torch.randn(10, 16, dtype=torch.bfloat16))
    assert out.z_q.dtype == torch.bfloat16 and out.distances.dtype == torch.float32
    assert q.embed_avg.dtype == torch.float32

    q = VectorQuantizer(16, QuantizerConfig(codebook_size=32, dim=4, prior_kl=True,
                                            stochastic_mask_ratio=0.4)).train()
    z = torch.randn(10, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
        total = out.loss + out.losses["prior_kl"] + out.z_q.float().square().mean()
    assert out.distances.dtype == torch.float32 and out.loss.dtype == torch.float32
    total.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# ---- a real 2-process run on gloo ---------------------------------------------------------------
def _dist_configs():
    base = dict(codebook_size=32, dim=4, decay=0.8, dead_threshold=1.0, prior_kl=True)
    return {"ema": QuantizerConfig(ema=True, restart_every=2, **base),
            # no stochastic mask: its samples depend on the process layout, the gradient compared
            # with the single process below would not be the same sum (tests/test_regvq.py tests it)
            "param": QuantizerConfig(ema=False, **base),
            **_full_use_configs()}


def _full_use_configs():
    """The codebooks that reach full use (tests/test_codebooks.py): SimVQ with the rotation trick,
    FSQ (4 x 2 x 4 = 32 codes), LFQ (5 bits, batch entropy over bit groups of 3 + 2)."""
    base = dict(codebook_size=32, dim=4, decay=0.8, dead_threshold=1.0)
    return {"simvq": QuantizerConfig(simvq=True, rotation_trick=True, **base),
            "fsq": QuantizerConfig(kind="fsq", fsq_levels=(4, 2, 4), **base),
            "lfq": QuantizerConfig(kind="lfq", lfq_temperature=0.5, lfq_entropy_group_bits=3, **base)}


def _grad_target(q, cfg: QuantizerConfig):
    """The parameter whose gradient of the rank's loss the 2-process test compares (None: the loss has
    no gradient, FSQ)."""
    if cfg.kind == "fsq":
        return None
    if cfg.simvq:
        return q.embed_proj
    return q.proj_in.weight if cfg.ema or cfg.kind == "lfq" else q.embed


def _dist_loss(out, cfg: QuantizerConfig):
    """The term whose value and gradient must be the global batch's: the prior KL where computed,
    else the quantizer's loss (LFQ: its batch entropy goes through the autograd all-reduce)."""
    return out.losses["prior_kl"] if cfg.prior_kl else out.loss


def _dist_worker(out_dir: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for name, cfg in _dist_configs().items():
        # identical init, as DDP/DeepSpeed's broadcast gives. SimVQ: each rank seeded differently, as
        # the trainer does, and only the parameters broadcast, as DeepSpeed does: its frozen codebook
        # buffer must come out identical on its own.
        torch.manual_seed(rank if cfg.simvq else 0)
        q = build_quantizer(8, cfg).train()
        if cfg.simvq:
            for p in q.parameters():
                dist.broadcast(p.data, 0)
        torch.manual_seed(100 + rank)      # different data and restart candidates per rank
        centers = torch.randn(3, 8) * 3
        log = []
        for step in range(8):
            z = centers[torch.randint(3, (40,))] + 0.1 * torch.randn(40, 8)
            entry = {"z": z}
            out = q(z)
            entry.update(codes=out.codes, stats=out.stats, losses={k: v.detach() for k, v in out.losses.items()},
                         loss=_dist_loss(out, cfg).detach())
            target = _grad_target(q, cfg)
            if step == 0 and target is not None:   # LFQ, prior KL: through the autograd all-reduce
                entry["grad"] = torch.autograd.grad(_dist_loss(out, cfg), target)[0]
            log.append(entry)
        torch.save({"state": q.state_dict(), "log": log}, os.path.join(out_dir, f"{name}_rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_ranks_keep_identical_codebooks(tmp_path):
    env = {**os.environ, "PYTHONPATH": _ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
                           os.path.abspath(__file__), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=240, cwd=_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name, cfg in _dist_configs().items():
        r0, r1 = (torch.load(tmp_path / f"{name}_rank{r}.pt") for r in range(2))
        # bit-identical codebooks and statistics on both ranks
        assert r0["state"].keys() == r1["state"].keys()
        for k in r0["state"]:
            assert torch.equal(r0["state"][k], r1["state"][k]), (name, k)
        if name in ("ema", "param"):        # the others have no codebook rows to restart
            assert sum(e["stats"]["restarted"].item() for e in r0["log"]) > 0, name
        assert not torch.equal(r0["log"][0]["z"], r1["log"][0]["z"])      # different data
        for a, b in zip(r0["log"], r1["log"]):
            for k in a["stats"]:
                assert torch.equal(a["stats"][k], b["stats"][k]), (name, k)
            # usage/perplexity are those of the global batch
            counts = torch.bincount(torch.cat([a["codes"], b["codes"]]), minlength=cfg.codebook_size).float()
            p = counts / counts.sum()
            ppl = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
            assert a["stats"]["usage"].item() == pytest.approx((counts > 0).float().mean().item())
            assert a["stats"]["perplexity"].item() == pytest.approx(ppl.item(), rel=1e-5)
            if cfg.prior_kl:     # prior KL of the codes used at both ranks' positions
                glob = prior_kl(p)
                assert a["losses"]["prior_kl"].item() == pytest.approx(glob.item(), rel=1e-4, abs=1e-6)
                assert torch.equal(a["losses"]["prior_kl"], b["losses"]["prior_kl"])
            if cfg.kind == "lfq":
                assert torch.equal(a["losses"]["batch_entropy"], b["losses"]["batch_entropy"])
        # the single process on the concatenated batch: LFQ's batch entropy is the global one, and
        # the mean of the ranks' gradients (data-parallel averaging) is its gradient
        torch.manual_seed(0)
        q = build_quantizer(8, cfg).train()
        out = q(torch.cat([r0["log"][0]["z"], r1["log"][0]["z"]]))
        if cfg.kind == "lfq":
            assert r0["log"][0]["losses"]["batch_entropy"].item() == pytest.approx(
                out.losses["batch_entropy"].item(), rel=1e-5)
            assert (r0["log"][0]["loss"] + r1["log"][0]["loss"]).item() / 2 == pytest.approx(out.loss.item(), rel=1e-5)
        target = _grad_target(q, cfg)
        if target is not None:
            g = torch.autograd.grad(_dist_loss(out, cfg), target)[0]
            mean = (r0["log"][0]["grad"] + r1["log"][0]["grad"]) / 2
            assert torch.allclose(mean, g, rtol=1e-4, atol=1e-7), name


if __name__ == "__main__":
    _dist_worker(sys.argv[1])
