"""The codebooks that reach full use (model_zoo/quantizers.py, model_zoo/scalar_quantizers.py): FSQ,
LFQ with the MAGVIT-2 entropy loss, SimVQ and the rotation trick, on hand-checkable cases and against
direct computations; the tokenizers and zoo packages that use them. The 2-process runs are in
tests/test_quantizers.py."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from model_zoo import create_model
from model_zoo.package import load_package, save_package
from model_zoo.quantizers import QuantizerConfig, VectorQuantizer, build_quantizer
from model_zoo.scalar_quantizers import FSQuantizer, LFQuantizer


def fsq(levels, in_dim=None, **kw) -> FSQuantizer:
    d = len(levels)
    cfg = QuantizerConfig(kind="fsq", fsq_levels=levels, codebook_size=math.prod(levels), dim=d,
                          factorized=in_dim is not None, **kw)
    return build_quantizer(in_dim or d, cfg)


def lfq(bits, in_dim=None, **kw) -> LFQuantizer:
    cfg = QuantizerConfig(kind="lfq", codebook_size=2 ** bits, dim=bits, factorized=in_dim is not None, **kw)
    return build_quantizer(in_dim or bits, cfg)


def inverse_bound(q: FSQuantizer, v: torch.Tensor) -> torch.Tensor:
    """Inputs that the FSQ bound maps exactly onto the normalized grid values ``v``."""
    levels = torch.tensor(q.levels, dtype=torch.float64)
    half = torch.floor(levels / 2)
    h = (levels - 1) * (1 + 1e-3) / 2
    offset = (levels % 2 == 0).double() * 0.5
    return (torch.atanh((v.double() * half + offset) / h) - torch.atanh(offset / h)).float()


# ---- FSQ -----------------------------------------------------------------------------------------
def test_fsq_codes_values_and_gradient_by_hand():
    q = fsq((5, 4))
    assert isinstance(q, FSQuantizer) and q.codebook_size == 20 and q.basis == (1, 5)
    z = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, -10.0], [0.5, 0.5]], requires_grad=True)
    out = q(z)
    # level 5: tanh(z) * 2.002 rounds to -2..2, digit = n + 2; level 4: tanh(z + atanh(.5/1.5015)) *
    # 1.5015 - .5 rounds to -2..1, digit = n + 2; code = d0 + 5 d1. z = .5: 0.925 -> 1 and 0.535 -> 1.
    assert out.codes.tolist() == [2 + 5 * 2, 4 + 5 * 3, 0, 3 + 5 * 3]
    expect = torch.tensor([[0.0, 0.0], [1.0, 0.5], [-1.0, -1.0], [0.5, 0.5]])
    assert torch.equal(out.z_q, expect) and torch.equal(q.lookup(out.codes), expect)
    assert out.loss.item() == 0.0 and set(out.losses) == {"commitment", "codebook"}
    assert out.distances[:3].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-5)
    # straight-through rounding: d z_q / d z = d bound / d z / (L // 2)
    out.z_q.sum().backward()
    s = torch.tensor([0.0, math.atanh(0.5 / 1.5015)])
    h, half = torch.tensor([2.002, 1.5015]), torch.tensor([2.0, 2.0])
    assert torch.allclose(z.grad, h * (1 - torch.tanh(z.detach() + s) ** 2) / half, atol=1e-6)


def test_fsq_every_code_round_trips():
    q = fsq((8, 5, 5, 5))
    codes = torch.arange(1000)
    v = q.lookup(codes)
    assert v.min() == -1 and v.max() == 1 and len({tuple(r) for r in v.tolist()}) == 1000
    out = q(inverse_bound(q, v))
    assert torch.equal(out.codes, codes) and torch.equal(out.z_q, v)
    q.eval()
    with torch.no_grad():
        assert q(inverse_bound(q, v)).stats["usage"].item() == 1.0


def test_fsq_under_bf16_autocast_reaches_every_code():
    """(8, 8, 8, 5, 5, 5) = 64,000 codes behind a bf16 projection: bounding, rounding and the index in
    fp32/int64 keep every code (lucidrains/vector-quantize-pytorch#114: in bf16 half were lost)."""
    levels = (8, 8, 8, 5, 5, 5)
    q = fsq(levels, in_dim=6).train()
    with torch.no_grad():
        for lin in (q.proj_in, q.proj_out):
            lin.weight.copy_(torch.eye(6))
            lin.bias.zero_()
    codes = torch.arange(64000)
    z = inverse_bound(q, q._vectors(codes))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    assert q.proj_in(z).dtype == torch.float32 and out.z_q.dtype == torch.float32
    assert torch.equal(out.codes, codes)
    assert out.stats["usage"].item() == 1.0 and out.stats["perplexity"].item() == pytest.approx(64000, rel=1e-4)
    # what the fp32 index avoids: the same mixed-radix sum in bf16 merges neighbouring codes
    digits = torch.stack([(codes // b) % n for b, n in zip(q.basis, levels)], -1)
    assert (digits.bfloat16() * torch.tensor(q.basis).bfloat16()).sum(-1).unique().numel() < 32000


def test_configs_are_validated():
    with pytest.raises(ValueError, match=r"prod\(fsq_levels\) = 64"):
        build_quantizer(3, QuantizerConfig(kind="fsq", fsq_levels=(4, 4, 4), codebook_size=8192, dim=3,
                                           factorized=False))
    with pytest.raises(ValueError, match="fsq_levels"):
        build_quantizer(3, QuantizerConfig(kind="fsq", codebook_size=64))
    with pytest.raises(ValueError, match=r"2 \*\* bits"):
        build_quantizer(6, QuantizerConfig(kind="lfq", codebook_size=100, dim=6))
    with pytest.raises(ValueError, match="prior_kl"):
        build_quantizer(6, QuantizerConfig(kind="lfq", codebook_size=64, prior_kl=True))
    with pytest.raises(ValueError, match="lookup dim"):
        build_quantizer(8, QuantizerConfig(kind="lfq", codebook_size=64, factorized=False))
    with pytest.raises(ValueError, match="ema=False"):
        VectorQuantizer(8, QuantizerConfig(codebook_size=16, dim=8, simvq=True, ema=True))
    with pytest.raises(ValueError, match="rotation_trick"):
        VectorQuantizer(8, QuantizerConfig(codebook_size=16, dim=8, rotation_trick=True, kind="gumbel"))
    assert QuantizerConfig(fsq_levels=[4, 4, 4]) == QuantizerConfig(fsq_levels=(4, 4, 4))   # JSON lists


# ---- LFQ -----------------------------------------------------------------------------------------
def test_lfq_codes_are_sign_bits_and_round_trip():
    q = lfq(3)
    z = torch.tensor([[0.5, -1.0, 2.0], [-0.1, -0.2, -0.3], [1.0, 1.0, 1.0], [0.0, 3.0, -3.0]],
                     requires_grad=True)
    out = q(z)
    assert out.codes.tolist() == [0b101, 0b000, 0b111, 0b010]       # first dimension most significant
    signs = torch.tensor([[1.0, -1, 1], [-1, -1, -1], [1, 1, 1], [-1, 1, -1]])
    assert torch.equal(out.z_q, signs) and torch.equal(q.lookup(out.codes), signs)
    assert out.distances.tolist() == pytest.approx([0.25 + 0 + 1, 0.81 + 0.64 + 0.49, 0, 1 + 4 + 4])
    out.z_q.square().sum().backward()
    assert torch.equal(z.grad, 2 * signs)                            # straight-through
    q10 = lfq(10)
    codes = torch.arange(1024)
    assert torch.equal(q10(q10.lookup(codes) * 0.3).codes, codes)


def _direct_entropies(z: torch.Tensor, t: float, groups=None):
    """Per-sample and batch entropy of softmax(-||z - c||^2 / t) over every c in {-1, 1}^bits,
    written out over the full code table; with ``groups`` the batch term sums the marginal
    entropies of those contiguous bit groups."""
    bits = z.shape[1]
    table = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=bits)), dtype=z.dtype)   # row = code
    p = torch.softmax(-torch.cdist(z, table).square() / t, -1)
    per_sample = -(p * p.log()).sum(-1).mean()
    avg = p.mean(0)
    if groups is None:
        return per_sample, -(avg * avg.log()).sum()
    batch, rest = 0.0, avg.reshape([2] * bits)
    for i, nb in enumerate(groups):
        start = sum(groups[:i])
        dims = [d for d in range(bits) if not start <= d < start + nb]
        m = rest.sum(dims).flatten() if dims else rest.flatten()
        batch = batch + -(m * m.log()).sum()
    return per_sample, batch


@pytest.mark.parametrize("bits,group_bits,groups", [(4, 9, (4,)), (6, 3, (3, 3)), (7, 3, (3, 2, 2))])
def test_lfq_entropy_terms_match_a_direct_computation(bits, group_bits, groups):
    torch.manual_seed(0)
    t, gamma, w, beta = 0.5, 0.7, 0.3, 0.25
    q = lfq(bits, lfq_temperature=t, lfq_diversity_gamma=gamma, lfq_entropy_weight=w, beta=beta,
            lfq_entropy_group_bits=group_bits).train()
    assert q.groups == groups
    z = (0.4 * torch.randn(40, bits)).requires_grad_(True)
    out = q(z)
    zd = z.detach().double().requires_grad_(True)
    per_sample, batch = _direct_entropies(zd, t, None if len(groups) == 1 else groups)
    assert out.losses["per_sample_entropy"].item() == pytest.approx(per_sample.item(), rel=1e-5)
    assert out.losses["batch_entropy"].item() == pytest.approx(batch.item(), rel=1e-5)
    commitment = (zd - torch.where(zd > 0, 1.0, -1.0)).square().mean()
    direct = beta * commitment + w * (per_sample - gamma * batch)
    assert out.loss.item() == pytest.approx(direct.item(), rel=1e-5, abs=1e-6)   # fp32 vs fp64
    out.loss.backward()
    direct.backward()
    assert torch.allclose(z.grad.double(), zd.grad, rtol=1e-4, atol=1e-7)
    if len(groups) > 1:   # the sum of group marginals bounds the joint batch entropy from above
        assert batch.item() >= _direct_entropies(zd.detach(), t)[1].item() - 1e-9


def test_lfq_entropy_extremes_and_large_vocabulary_groups():
    q = lfq(4, lfq_temperature=0.01)
    codes = torch.arange(16)
    out = q(3 * q.lookup(codes))          # every code once, far from the bit boundaries
    assert out.losses["per_sample_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert out.losses["batch_entropy"].item() == pytest.approx(4 * math.log(2), rel=1e-6)
    out = q(3 * q.lookup(torch.zeros(16, dtype=torch.long)))   # collapsed onto one code
    assert out.losses["batch_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    with torch.device("meta"):
        big = lfq(18, in_dim=256)             # MAGVIT-2's 2^18: batch entropy over 9 + 9 bits
    assert big.groups == (9, 9) and big.codebook_size == 262144 and big.proj_in.out_features == 18


# ---- SimVQ ---------------------------------------------------------------------------------------
def simvq(k=16, d=8, **kw) -> VectorQuantizer:
    return VectorQuantizer(d, QuantizerConfig(codebook_size=k, dim=d, factorized=False, l2_normalize=False,
                                              simvq=True, **kw))


def test_simvq_codebook_moves_as_a_whole_and_the_buffer_stays():
    torch.manual_seed(0)
    q = simvq().train()
    assert "embed" not in dict(q.named_parameters()) and "embed" in dict(q.named_buffers())
    assert {n for n, _ in q.named_parameters()} == {"embed_proj"}
    assert not q.config.restart_dead and not q.config.data_init          # no rows of its own to restart
    frozen = q.embed.clone()
    z = torch.randn(3, 8, requires_grad=True)
    out = q(z)
    e = q.codebook()[out.codes]
    assert out.losses["codebook"].item() == pytest.approx(F.mse_loss(z.detach(), e).item(), rel=1e-6)
    assert out.loss.item() == pytest.approx((out.losses["codebook"] + 0.25 * out.losses["commitment"]).item())
    out.loss.backward()
    # d/dW mean((sg(z) - C_sel W^T)^2) = -2 / (P d) (z - C_sel W^T)^T C_sel, plus nothing from the commitment
    c_sel = q.embed[out.codes]
    expect = -2 / 24 * (z.detach() - c_sel @ q.embed_proj.detach().t()).t() @ c_sel
    assert torch.allclose(q.embed_proj.grad, expect, atol=1e-6)
    before = q.codebook().detach()
    with torch.no_grad():
        q.embed_proj -= 0.5 * q.embed_proj.grad
    moved = (q.codebook() - before).abs().sum(1)
    assert out.codes.unique().numel() <= 3 and bool((moved > 0).all())   # all 16 rows, not just the 3 used
    assert torch.equal(q.embed, frozen)
    for _ in range(3):                   # training forwards never restart or rewrite it
        s = q(torch.randn(3, 8)).stats
        assert s["restarted"].item() == 0
    assert torch.equal(q.embed, frozen) and q.pop_row_writes() == []

    plain = VectorQuantizer(8, QuantizerConfig(codebook_size=16, dim=8, factorized=False, l2_normalize=False,
                                               restart_dead=False, data_init=False))
    o = plain(z.detach())
    o.loss.backward()
    assert (plain.embed.grad.abs().sum(1) > 0).sum().item() == o.codes.unique().numel()   # plain VQ: used rows only


def test_simvq_frozen_codebook_is_the_same_on_every_rank_and_stays_fp32():
    torch.manual_seed(1)
    a = simvq()
    torch.manual_seed(2)
    b = simvq()
    assert torch.equal(a.embed, b.embed) and not torch.equal(a.embed_proj, b.embed_proj)
    assert a.embed.std().item() == pytest.approx(8 ** -0.5, rel=0.2)
    a = a.bfloat16()
    assert a.embed.dtype == torch.float32 and a.embed_proj.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert a.codebook().dtype == torch.float32 and a.lookup(torch.arange(4)).dtype == torch.float32
    with torch.device("meta"):
        m = VectorQuantizer(32, QuantizerConfig(codebook_size=8192, dim=32, simvq=True))
    m.to_empty(device="cpu")
    m.reset_parameters()
    assert torch.allclose(m.codebook().norm(dim=-1), torch.ones(8192), atol=1e-5)


# ---- rotation trick ------------------------------------------------------------------------------
def test_rotation_trick_forward_is_the_code_and_the_gradient_is_rotated():
    torch.manual_seed(0)
    cfg = QuantizerConfig(codebook_size=3, dim=3, factorized=False, l2_normalize=False, restart_dead=False,
                          data_init=False)
    codebook = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0], [-1.0, -1.0, 0.5]])
    z0 = torch.tensor([[1.0, 1.0, 0.0], [0.1, 0.5, 0.9], [-0.3, -0.2, 0.0], [0.5, 0.0, 0.0]])
    g = torch.randn(4, 3)
    grads = {}
    for rot in (False, True):
        q = VectorQuantizer(3, dataclasses.replace(cfg, rotation_trick=rot))
        with torch.no_grad():
            q.embed.copy_(codebook)
        z = z0.clone().requires_grad_(True)
        out = q(z)
        e = codebook[out.codes]
        assert torch.equal(out.z_q, e)                          # forward value: the code, exactly
        (out.z_q * g).sum().backward()
        grads[rot] = z.grad
        assert out.losses["codebook"].item() == pytest.approx(F.mse_loss(z0, e).item())
    assert torch.equal(grads[False], g)                        # straight-through copies the gradient
    for i in range(4):
        u, h = F.normalize(z0[i], dim=0), F.normalize(e[i], dim=0)
        w = F.normalize(u + h, dim=0)
        R = torch.eye(3) - 2 * torch.outer(w, w) + 2 * torch.outer(h, u)
        assert torch.allclose(R @ u, h, atol=1e-6) and torch.allclose(R.t() @ R, torch.eye(3), atol=1e-6)
        lam = e[i].norm() / z0[i].norm()
        assert torch.allclose(grads[True][i], lam * R.t() @ g[i], atol=1e-5)
        # the gradient's angle to z is the one it had to the code, its norm scaled by ||q|| / ||z||
        assert torch.dot(grads[True][i], u).item() == pytest.approx(lam.item() * torch.dot(g[i], h).item(), abs=1e-5)
        assert grads[True][i].norm().item() == pytest.approx(lam.item() * g[i].norm().item(), rel=1e-5)
    assert torch.allclose(grads[True][3], 4 * g[3])               # z along its code: R = I, scale 2 / 0.5
    assert not torch.allclose(grads[True][:3], g[:3], atol=1e-2)


def test_rotation_trick_opposite_vectors_and_l2_codes():
    from model_zoo.quantizers import rotate_to

    q = torch.tensor([[1.0, 2.0, 0.0]])
    z = (-0.5 * q).requires_grad_(True)                          # u = -h: w = 0, still a rotation
    out = rotate_to(z, q)
    assert torch.equal(out, q)
    out.sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.norm().item() == pytest.approx(2 * math.sqrt(3), rel=1e-5)
    qz = VectorQuantizer(16, QuantizerConfig(codebook_size=32, dim=4, rotation_trick=True)).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    o = qz(x)
    (o.z_q.square().sum() + o.loss).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---- tokenizers, packages ------------------------------------------------------------------------
@pytest.mark.parametrize("name,kind", [("vqgan-f8-fsq-tiny", FSQuantizer), ("vqgan-f8-lfq-tiny", LFQuantizer),
                                       ("vqgan-f8-simvq-tiny", VectorQuantizer)])
def test_presets_round_trip_through_a_package(name, kind, tmp_path):
    torch.manual_seed(0)
    tok = create_model(name)
    assert isinstance(tok.quantizer, kind) and tok.codebook_size == 64
    tok.train()
    x = torch.rand(4, 3, tok.image_size, tok.image_size) * 2 - 1
    out = tok(x)
    assert out.quant.stats["usage"].item() > 0 and set(out.quant.stats) >= {"usage", "perplexity", "dead_codes"}
    save_package(tok, str(tmp_path / "pkg"))
    back = load_package(str(tmp_path / "pkg"))
    assert back.config == tok.config and back.registry_name == name
    tok.eval()
    for k, v in tok.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    with torch.no_grad():
        codes = tok.encode(x).codes
        assert torch.equal(back.encode(x).codes, codes)
        assert torch.equal(back.decode(codes), tok.decode(codes))


def test_every_tokenizer_takes_the_new_kinds_through_its_quantizer_config():
    torch.manual_seed(0)
    models = [create_model("vit-vqgan-ss-tiny", quantizer={"kind": "lfq", "codebook_size": 64}),
              create_model("vit-vqgan-ss-tiny", quantizer={"simvq": True, "rotation_trick": True}),
              create_model("mq-vae-f8-tiny", quantizer={"kind": "fsq", "fsq_levels": [4, 4, 4], "codebook_size": 64,
                                                         "ema": False, "factorized": True}),
              create_model("vqgan-f8-tiny", quantizer={"kind": "fsq", "fsq_levels": [8, 5, 5, 5],
                                                        "codebook_size": 1000, "dim": 4})]
    for m in models:
        x = torch.rand(2, 3, m.image_size, m.image_size) * 2 - 1
        out = m.train()(x)
        ((out.recon - x).square().mean() + out.quant.loss).backward()
        m.eval()
        with torch.no_grad():
            t = m.encode(x)
            assert int(t.codes.max()) < m.codebook_size and m.decode(t.codes, t.positions).shape == x.shape


def test_recipe_overrides_reach_the_quantizer():
    from pretrain.config import ConfigError, apply_overrides
    from pretrain.recipes import get_recipe
    from pretrain.models import model_from_config

    cfg = apply_overrides(get_recipe("vqgan-f8-tiny"), [
        "model_args.quantizer.kind=fsq", "model_args.quantizer.fsq_levels=[8,5,5,5]",
        "model_args.quantizer.codebook_size=1000", "model_args.quantizer.dim=4"])
    with torch.device("meta"):
        model = model_from_config(cfg)
    assert isinstance(model.quantizer, FSQuantizer) and model.codebook_size == 1000
    assert model.config.quantizer.fsq_levels == (8, 5, 5, 5) and model.config.quantizer.beta == 0.25   # preset's rest kept
    with pytest.raises(ConfigError, match="'model_args.quantizer.kind' is a value"):
        apply_overrides(cfg, ["model_args.quantizer.kind.x=1"])
