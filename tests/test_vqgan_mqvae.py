"""VQGAN / Regularized VQ (model_zoo.vqgan) and MQ-VAE (model_zoo.mqvae): tiny presets run on CPU,
full-size presets are only built on the meta device."""

from __future__ import annotations

import math

import pytest
import torch

import model_zoo.mqvae  # noqa: F401  (registers the presets)
import model_zoo.vqgan  # noqa: F401
from model_zoo.mqvae import MQVAE, keep_mask_from_positions
from model_zoo.registry import create_model, list_models, model_entry
from model_zoo.vqgan import VQGAN

VQGAN_TINY = ["vqgan-f8-tiny", "vqgan-f16-tiny", "regvq-f16-tiny"]
ALL_TINY = VQGAN_TINY + ["mq-vae-f8-tiny"]

# Measured on the meta device; the module docstrings quote the same numbers.
FULL = {
    #  name           grid      tokens  codebook  parameters
    "vqgan-f16": ((16, 16), 256, 16384, 76_073_859),
    "vqgan-f8": ((32, 32), 1024, 8192, 66_890_627),
    "regvq-f16": ((16, 16), 256, 1024, 72_141_699),
    "mq-vae-f8": ((32, 32), 256, 1024, 35_494_534),
}


def _images(model, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = model.config.resolution
    return torch.rand(batch, 3, r, r, generator=g) * 2 - 1


def _build(name: str, **overrides):
    torch.manual_seed(0)
    return create_model(name, **overrides)


def test_presets_registered():
    names = set(list_models(kind="tokenizer"))
    for name in list(FULL) + ALL_TINY:
        assert name in names
        assert model_entry(name).paper


@pytest.mark.parametrize("name", ALL_TINY)
def test_encode_decode_shapes(name):
    model = _build(name).eval()
    x = _images(model)
    with torch.no_grad():
        tokens = model.encode(x)
        recon = model.decode(tokens.codes, tokens.positions)
    assert tokens.codes.shape == (2, model.num_tokens) and tokens.codes.dtype == torch.long
    assert 0 <= int(tokens.codes.min()) and int(tokens.codes.max()) < model.codebook_size
    if isinstance(model, MQVAE):
        assert tokens.positions.shape == tokens.codes.shape
        assert tokens.positions.dtype == torch.long
    else:
        assert tokens.positions is None
        assert model.num_tokens == model.grid_size[0] * model.grid_size[1]
    assert recon.shape == x.shape


@pytest.mark.parametrize("name", ALL_TINY)
def test_forward_backward(name):
    model = _build(name).train()
    x = _images(model)
    out = model(x)
    assert out.recon.shape == x.shape
    assert out.quant.loss.ndim == 0 and torch.isfinite(out.quant.loss)
    assert out.tokens.codes.shape == (2, model.num_tokens)
    assert model.last_layer() is model.decoder.conv_out.weight

    # The reconstruction loss alone reaches the encoder only through the straight-through z_q.
    rec_loss = (out.recon - x).square().mean()
    (g_enc,) = torch.autograd.grad(rec_loss, [model.encoder.conv_in.weight], retain_graph=True)
    assert g_enc.abs().sum() > 0

    (rec_loss + out.quant.loss).backward()
    assert model.last_layer().grad.abs().sum() > 0
    if isinstance(model, MQVAE):
        # Top-k has no gradient; the score multiplying the kept features is the scorer's signal.
        for pname, p in model.masker.score_net.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, pname
        assert model.demasker.mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL_TINY)
def test_decode_of_encode_equals_forward_in_eval(name):
    model = _build(name).eval()
    x = _images(model, seed=1)
    with torch.no_grad():
        out = model(x)
        tokens = model.encode(x)
        recon = model.decode(tokens.codes, tokens.positions)
    assert torch.equal(tokens.codes, out.tokens.codes)
    if tokens.positions is not None:
        assert torch.equal(tokens.positions, out.tokens.positions)
    torch.testing.assert_close(recon, out.recon, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("keep_ratio", [0.25, 0.3, 0.5])
def test_mqvae_keeps_exactly_k_sorted_positions(keep_ratio):
    model = _build("mq-vae-f8-tiny", keep_ratio=keep_ratio).eval()
    h, w = model.grid_size
    k = round(keep_ratio * h * w)
    assert model.num_tokens == k
    x = _images(model, batch=3)
    with torch.no_grad():
        out = model(x)
    pos = out.tokens.positions
    assert pos.shape == (3, k)
    assert (pos[:, 1:] > pos[:, :-1]).all()                       # sorted, hence distinct
    assert 0 <= int(pos.min()) and int(pos.max()) < h * w
    keep = out.extra["keep_mask"]
    assert keep.shape == (3, h * w) and keep.dtype == torch.bool
    assert (keep.sum(1) == k).all()
    assert torch.equal(keep, keep_mask_from_positions(pos, h * w))
    scores = out.extra["mask_scores"]
    assert scores.shape == (3, h * w) and ((scores > 0) & (scores < 1)).all()
    # The kept positions are the top-k scores.
    kept_min = scores.masked_fill(~keep, 2.0).min(1).values
    dropped_max = scores.masked_fill(keep, -1.0).max(1).values
    assert (kept_min >= dropped_max).all()


def _mq_double():
    model = _build("mq-vae-f8-tiny").double().eval()
    x = _images(model, batch=2, seed=3).double()
    with torch.no_grad():
        tokens = model.encode(x)
    return model, tokens


def test_demask_attention_scales_masked_keys_by_mask_value():
    model, t = _mq_double()
    dem, attn = model.demasker, model.demasker.blocks[0].attn
    n = model.grid_size[0] * model.grid_size[1]
    keep = keep_mask_from_positions(t.positions, n)
    with torch.no_grad():
        weights, mask = model.demask_attention(t.codes, t.positions)
        assert weights.shape == (2, n, n)
        m = torch.where(keep, torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.02, dtype=torch.float64))
        assert torch.equal(mask, m)

        # Independent reference: w_ij = m_j exp(q_i.k_j / sqrt(d)) / sum_l m_l exp(q_i.k_l / sqrt(d)).
        h0 = dem.stem(model.quantizer.lookup(t.codes).double(), t.positions, model.grid_size)
        h1 = dem.blocks[0].resblock(h0)
        hn = attn.norm(h1)
        q = attn.q(hn).flatten(2).transpose(1, 2)
        k = attn.k(hn).flatten(2).transpose(1, 2)
        v = attn.v(hn).flatten(2).transpose(1, 2)
        s = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        e = m[:, None, :] * torch.exp(s - s.amax(-1, keepdim=True))
        ref = e / e.sum(-1, keepdim=True)
        torch.testing.assert_close(weights, ref, rtol=1e-9, atol=1e-12)

        # Relative to the kept keys, each masked key has exactly 0.02 x its plain-softmax weight.
        plain = s.softmax(-1)
        kb = keep[:, None, :].expand_as(plain)
        rel_w = weights / (weights * kb).sum(-1, keepdim=True)
        rel_p = plain / (plain * kb).sum(-1, keepdim=True)
        torch.testing.assert_close(rel_w[~kb], 0.02 * rel_p[~kb], rtol=1e-9, atol=0)
        torch.testing.assert_close(rel_w[kb], rel_p[kb], rtol=1e-9, atol=0)

        # The block's forward (SDPA with the log-mask bias) applies exactly these weights.
        B, C, H, W = h1.shape
        expected = h1 + attn.proj_out((weights @ v).transpose(1, 2).reshape(B, C, H, W))
        torch.testing.assert_close(dem.blocks[0](h0, mask), expected, rtol=1e-9, atol=1e-10)


def test_demask_mask_is_square_rooted_after_each_layer():
    model, t = _mq_double()
    dem = model.demasker
    assert len(dem.blocks) >= 3
    seen = {}
    hooks = [blk.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[1]))
             for i, blk in enumerate(dem.blocks)]
    try:
        with torch.no_grad():
            model.decode(t.codes, t.positions)
    finally:
        for hk in hooks:
            hk.remove()
    keep = keep_mask_from_positions(t.positions, seen[0].shape[1])
    for layer, value in [(0, 0.02), (1, 0.02 ** 0.5), (2, 0.02 ** 0.25)]:
        mask = seen[layer]
        assert torch.all(mask[keep] == 1.0)
        torch.testing.assert_close(mask[~keep], torch.full_like(mask[~keep], value), rtol=1e-12, atol=0)
    assert abs(0.02 ** 0.5 - 0.1414) < 1e-4 and abs(0.02 ** 0.25 - 0.376) < 1e-3
    with torch.no_grad():
        _, mask2 = model.demask_attention(t.codes, t.positions, layer=2)
    torch.testing.assert_close(mask2, seen[2])


def test_mqvae_decode_needs_positions():
    model = _build("mq-vae-f8-tiny").eval()
    codes = torch.zeros(1, model.num_tokens, dtype=torch.long)
    with pytest.raises(ValueError):
        model.decode(codes)


@pytest.mark.parametrize("name", list(FULL))
def test_full_size_presets_on_meta(name):
    grid, tokens, codebook, params = FULL[name]
    with torch.device("meta"):
        model = create_model(name)
    assert all(p.is_meta for p in model.parameters())
    assert model.grid_size == grid and model.num_tokens == tokens
    assert model.codebook_size == codebook
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.config.resolution == 256 and model.config.ch == 128 and model.config.num_res_blocks == 2
    q = model.config.quantizer
    assert not q.factorized and not q.l2_normalize and q.dim == 256
    if isinstance(model, VQGAN):
        f = 16 if name.endswith("f16") else 8
        assert model.config.downsample == f and model.config.z_channels == 256
    else:
        assert q.ema and model.config.keep_ratio == 0.25 and model.config.mask_value == 0.02


@pytest.mark.parametrize("name", ["regvq-f16", "regvq-f16-tiny"])
def test_regvq_quantizer_options(name):
    with torch.device("meta"):
        model = create_model(name)
    q = model.config.quantizer
    assert q.prior_kl is True and q.stochastic_mask_ratio == 0.4
    qcfg = model.quantizer.config
    assert qcfg.prior_kl is True and qcfg.stochastic_mask_ratio == 0.4
    for plain in ("vqgan-f16", "vqgan-f8"):
        with torch.device("meta"):
            other = create_model(plain)
        assert not other.config.quantizer.prior_kl and other.config.quantizer.stochastic_mask_ratio == 0.0


def test_overrides_reach_the_quantizer():
    model = _build("vqgan-f16-tiny", quantizer={"codebook_size": 32})
    assert model.codebook_size == 32
    assert model.config.quantizer.dim == 32      # other quantizer fields keep the preset's values
