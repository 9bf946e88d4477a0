"""ViT-VQGAN (model_zoo/vit_vqgan.py): tiny presets end to end on CPU, full-size presets on meta."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import model_zoo.vit_vqgan as vv  # noqa: F401  (the package __init__ does not import model files)
from model_zoo import losses
from model_zoo.interfaces import Tokenizer, TokenizerOutput, Tokens
from model_zoo.registry import create_model, list_models, model_entry

TINY = ["vit-vqgan-ss-tiny", "vit-vqgan-bb-tiny", "vit-vqgan-sl-tiny"]

# Measured on the meta device (the table in the module docstring). Quantizer counts belong to
# model_zoo/quantizers.py and are checked only for consistency here.
FULL = {
    #               encoder      decoder
    "vit-vqgan-ss": (27_942_912, 28_303_744),
    "vit-vqgan-bb": (90_713_088, 91_450_752),
    "vit-vqgan-sl": (27_942_912, 645_253_504),
}


def _images(b: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def _tiny(name: str, seed: int = 0, **overrides) -> vv.ViTVQGAN:
    torch.manual_seed(seed)
    return create_model(name, **overrides)


def test_registered_presets():
    names = list_models(kind="tokenizer")
    for n in list(FULL) + TINY:
        assert n in names
        assert model_entry(n).kind == "tokenizer"
        assert "2110.04627" in model_entry(n).paper
    assert set(TINY) <= set(list_models(kind="tokenizer", tiny=True))


@pytest.mark.parametrize("name", TINY)
def test_tiny_encode_decode_shapes(name):
    model = _tiny(name).eval()
    assert isinstance(model, Tokenizer)
    assert model.grid_size == (8, 8) and model.num_tokens == 64 and model.codebook_size == 64
    x = _images()
    with torch.no_grad():
        tokens = model.encode(x)
        assert isinstance(tokens, Tokens) and tokens.positions is None
        assert tokens.codes.shape == (2, 64) and tokens.codes.dtype == torch.long
        assert 0 <= int(tokens.codes.min()) and int(tokens.codes.max()) < 64
        images = model.decode(tokens.codes)
        assert images.shape == x.shape and torch.isfinite(images).all()
        # A [B, h, w] grid of codes decodes the same as the flat raster order.
        assert torch.equal(model.decode(tokens.codes.view(2, 8, 8)), images)
        with pytest.raises(ValueError):
            model.decode(tokens.codes, positions=torch.arange(64).expand(2, 64))
        with pytest.raises(ValueError):
            model.decode(tokens.codes[:, :10])
        with pytest.raises(ValueError):
            model.encode(_images(size=16))


@pytest.mark.parametrize("name", TINY)
def test_forward_backward_straight_through(name):
    model = _tiny(name).train()
    x = _images()
    out = model(x)
    assert isinstance(out, TokenizerOutput)
    assert out.recon.shape == x.shape and out.tokens.codes.shape == (2, 64)
    assert out.quant.z_q.shape == (2, 64, model.config.enc_width)
    # Only the reconstruction term: it reaches the encoder through the straight-through z_q.
    F.mse_loss(out.recon, x).backward()
    enc_grad = model.encoder.patch_embed.weight.grad
    assert enc_grad is not None and enc_grad.abs().sum() > 0 and torch.isfinite(enc_grad).all()
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.last_layer().grad is not None and model.last_layer().grad.abs().sum() > 0
    # The quantizer's own term trains as well, and all terms backpropagate together.
    model.zero_grad()
    out = model(x)
    (F.mse_loss(out.recon, x) + out.quant.loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", TINY)
def test_decode_of_encode_equals_forward_recon(name):
    model = _tiny(name).eval()
    x = _images()
    with torch.no_grad():
        out = model(x)
        codes = model.encode(x).codes
        assert torch.equal(codes, out.tokens.codes)
        torch.testing.assert_close(model.decode(codes), out.recon, atol=1e-5, rtol=1e-5)


def test_logit_laplace_head_and_last_layer():
    model = _tiny("vit-vqgan-ss-tiny").eval()
    assert model.config.logit_laplace
    with torch.no_grad():
        out = model(_images())
    params = out.extra["logit_laplace_params"]
    assert params.shape == (2, 6, 32, 32)
    mu, log_b = losses.split_logit_laplace(params)
    eps = model.config.logit_laplace_eps
    torch.testing.assert_close(out.recon, 2 * (torch.sigmoid(mu) - eps) / (1 - 2 * eps) - 1)
    # Same squeeze as the NLL's and the losses module's display mapping (which also clamps).
    torch.testing.assert_close(out.recon.clamp(-1, 1), losses.logit_laplace_mean(mu, eps))
    assert out.recon.abs().max() <= 1 / (1 - 2 * eps)
    x = _images()
    assert torch.isfinite(losses.logit_laplace_nll(x, mu, log_b, eps=eps))
    assert model.last_layer() is model.decoder.to_pixels.weight
    assert model.last_layer().shape == (4 * 4 * 6, 64)

    plain = _tiny("vit-vqgan-ss-tiny", logit_laplace=False).eval()
    with torch.no_grad():
        out = plain(_images())
    assert out.recon.shape == (2, 3, 32, 32) and out.extra == {}
    assert plain.last_layer().shape == (4 * 4 * 3, 64)


def test_encoder_features_for_probes():
    model = _tiny("vit-vqgan-sl-tiny").eval()
    x = _images()
    with torch.no_grad():
        final = model.encoder_features(x)
        first = model.encoder_features(x, layer=0)
        last = model.encoder_features(x, layer=-1)
        z = model.quantizer(final)
    assert final.shape == first.shape == last.shape == (2, 64, 64)
    assert not torch.allclose(first, last)
    assert torch.equal(z.codes, model.encode(x).codes)   # layer=None is what gets quantized
    with pytest.raises(IndexError):
        model.encoder_features(x, layer=5)


@pytest.mark.parametrize("name", list(FULL))
def test_full_size_param_counts_on_meta(name):
    with torch.device("meta"):
        model = create_model(name)
    assert all(p.is_meta for p in model.parameters())
    assert model.grid_size == (32, 32) and model.num_tokens == 1024 and model.codebook_size == 8192
    assert model.config.image_size == 256 and model.config.patch_size == 8
    assert model.config.quantizer.dim == 32 and model.config.quantizer.l2_normalize
    counts = model.param_counts()
    assert (counts["encoder"], counts["decoder"]) == FULL[name]
    assert counts["quantizer"] >= 8192 * 32
    assert counts["total"] == counts["encoder"] + counts["decoder"] + counts["quantizer"]
    assert vv.count_params(model) == counts["total"]


def test_sdpa_is_used(monkeypatch):
    model = _tiny("vit-vqgan-sl-tiny").eval()
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(_images())
    cfg = model.config
    assert len(calls) == cfg.enc_depth + cfg.dec_depth
    assert calls[0] == (2, cfg.enc_heads, 64, cfg.enc_width // cfg.enc_heads)
    assert calls[-1] == (2, cfg.dec_heads, 64, cfg.dec_width // cfg.dec_heads)


def test_bf16_autocast_cpu():
    model = _tiny("vit-vqgan-ss-tiny").train()
    x = _images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = F.mse_loss(out.recon.float(), x) + out.quant.loss.float()
    loss.backward()
    assert out.recon.shape == x.shape and torch.isfinite(out.recon.float()).all()
    assert torch.isfinite(model.encoder.patch_embed.weight.grad).all()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        images = model.decode(model.encode(x).codes)
    assert images.shape == x.shape and torch.isfinite(images.float()).all()


def test_state_dict_round_trip():
    a = _tiny("vit-vqgan-bb-tiny", seed=1).eval()
    b = _tiny("vit-vqgan-bb-tiny", seed=2).eval()
    x = _images()
    with torch.no_grad():
        assert not torch.allclose(a(x).recon, b(x).recon)
    sd = a.state_dict()
    assert set(sd) == set(b.state_dict())
    b.load_state_dict(sd, strict=True)
    with torch.no_grad():
        ra, rb = a(x), b(x)
    assert torch.equal(ra.tokens.codes, rb.tokens.codes)
    torch.testing.assert_close(ra.recon, rb.recon, atol=0, rtol=0)


def test_overrides_and_config():
    model = _tiny("vit-vqgan-ss-tiny", dropout=0.1, quantizer={"codebook_size": 32})
    assert model.config.dropout == 0.1 and model.codebook_size == 32
    assert model.config.quantizer.dim == 8          # the rest of the preset's quantizer is kept
    with pytest.raises(TypeError):
        create_model("vit-vqgan-ss-tiny", no_such_field=1)
    with pytest.raises(ValueError):
        create_model("vit-vqgan-ss-tiny", patch_size=5)
    with pytest.raises(ValueError):
        create_model("vit-vqgan-ss-tiny", enc_heads=3)
    with pytest.raises(Exception):
        model.config.image_size = 64                # frozen


def test_sincos_position_embeddings():
    model = _tiny("vit-vqgan-ss-tiny", pos_embed="sincos").eval()
    learned = _tiny("vit-vqgan-ss-tiny")
    grid = 8 * 8
    assert vv.count_params(learned) - vv.count_params(model) == grid * (64 + 64)
    pe = vv.sincos_2d((8, 8), 64)
    assert pe.shape == (64, 64) and torch.allclose(pe[0, 16:32], torch.ones(16))  # cos(0) at (0, 0)
    with torch.no_grad():
        out = model(_images())
    assert out.recon.shape == (2, 3, 32, 32)


def test_full_size_shapes_on_meta():
    # Encoder and decoder separately: shapes at 256 px with no memory or compute.
    with torch.device("meta"):
        model = create_model("vit-vqgan-sl")
        feats = model.encoder_features(torch.empty(2, 3, 256, 256))
        assert feats.shape == (2, 1024, 512)
        assert model.encoder_features(torch.empty(2, 3, 256, 256), layer=3).shape == (2, 1024, 512)
        out = model.decoder(torch.empty(2, 1024, 512))
    assert out.shape == (2, 6, 256, 256)
    assert model.last_layer().shape == (8 * 8 * 6, 1280)


def test_meta_build_then_materialize():
    with torch.device("meta"):
        model = create_model("vit-vqgan-sl-tiny")
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    model.eval()
    with torch.no_grad():
        out = model(_images())
    assert torch.isfinite(out.recon).all()
    pos = model.encoder.pos_embed.weight
    assert 0 < pos.std() < 0.05                      # ViT init, not uninitialized storage
    torch.testing.assert_close(model.encoder.norm.weight, torch.ones(64))
