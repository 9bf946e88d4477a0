"""Frozen text encoders (model_zoo/text_encoders.py): the bundled CLIP BPE offline, every tiny
preset's encodings and masks, frozenness, real weight loading through the cache folder and from
other checkpoint layouts, the float16 embedding cache, and full-size presets on the meta device.

The T5 twin has no tokenizer that ships offline: ``t5_tokenizer_dir`` writes a TEST-ONLY
word-level tokenizer (``tokenizers`` library, T5's special ids: <pad> 0, </s> 1, <unk> 2) whose
vocabulary fits the tiny model's 128 ids."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from model_zoo import create_model, list_models
from model_zoo import text_encoders as te
from model_zoo.text_encoders import (CLIP_EOT, CLIP_SOT, TextEncoder, TextEncoderConfig,
                                     TextEncoderWeightsNotFound, from_cached, to_cached, to_cached_batch)

CAPTIONS = ["a photo of a cat", "", "A red dog on the blue sofa, in the photo."]
TINY = list_models(kind="text_encoder", tiny=True)
FULL = list_models(kind="text_encoder", tiny=False)
# Measured with count_params on the meta device (also in the module docstring's table).
FULL_PARAMS = {
    "openclip-vit-b-32-text": (63_428_096, 512, 512, 77),
    "openclip-vit-l-14-text": (123_650_304, 768, 768, 77),
    "hf-clip-text": (123_650_304, 768, 768, 77),
    "t5-base-encoder": (109_628_544, 768, 768, 128),
}


@pytest.fixture(scope="module")
def t5_tokenizer_dir(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    d = str(tmp_path_factory.mktemp("t5tok"))
    words = "a photo of cat dog red blue the on in sofa , .".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>",
                   "unk_token": "<unk>", "model_max_length": 512}, f)
    return d


def _tiny(name: str, t5_dir: str, **kw) -> TextEncoder:
    if name.startswith("t5"):
        kw.setdefault("tokenizer_path", t5_dir)
    return create_model(name, **kw)


@pytest.fixture(autouse=True)
def _empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VQSCALE_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------------- tokenizing


def test_bundled_clip_bpe_offline():
    enc = create_model("openclip-vit-b-32-text-tiny")
    t = enc.tokenize(CAPTIONS)
    assert t.dtype == torch.long and t.shape == (3, 77)
    assert t[0, :7].tolist() == [CLIP_SOT, 320, 1125, 539, 320, 2368, CLIP_EOT]   # "a photo of a cat"
    assert t[0, 7:].eq(0).all()
    assert t[1, :2].tolist() == [CLIP_SOT, CLIP_EOT] and t[1, 2:].eq(0).all()     # unconditional caption
    assert torch.equal(enc.null_tokens(2), t[1:2].expand(2, -1))
    assert torch.equal(enc.tokenize(["A PHOTO   of a cat"]), t[:1])                # lowercased, whitespace-cleaned
    long = enc.tokenize([" ".join(["cat"] * 200)])
    assert long[0, 0] == CLIP_SOT and long[0, -1] == CLIP_EOT and enc.mask(long).all()
    # hf_clip falls back to the same BPE (CLIP's vocabulary) when no tokenizer folder is found
    assert torch.equal(create_model("hf-clip-text-tiny").tokenize(CAPTIONS), t)
    with pytest.raises(TypeError):
        enc.tokenize("one string")


def test_t5_needs_a_tokenizer_folder(t5_tokenizer_dir, tmp_path):
    enc = create_model("t5-base-encoder-tiny")
    with pytest.raises(FileNotFoundError, match=r"tokenizers[/\\]t5-base-encoder-tiny"):
        enc.tokenize(["a cat"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_model("t5-base-encoder-tiny", tokenizer_path=str(tmp_path / "nope")).tokenize(["a"])
    t = _tiny("t5-base-encoder-tiny", t5_tokenizer_dir).tokenize(CAPTIONS)
    assert t.shape == (3, 32)
    assert t[0, :6].tolist() == [3, 4, 5, 3, 6, 1] and t[0, 6:].eq(0).all()
    assert t[1, 0] == 1 and t[1, 1:].eq(0).all()                  # "" -> </s>
    # the cache folder $VQSCALE_CACHE/tokenizers/<name> is found without tokenizer_path
    import shutil
    shutil.copytree(t5_tokenizer_dir, os.path.join(te.cache_dir(), "tokenizers", "t5-base-encoder-tiny"))
    assert torch.equal(create_model("t5-base-encoder-tiny").tokenize(CAPTIONS), t)
    # a tokenizer folder on any storage URL is copied into the cache once
    from data_pipeline import storage
    url = "memory://vqscale-test-text/t5tok"
    storage.upload_dir(t5_tokenizer_dir, url)
    assert torch.equal(create_model("t5-base-encoder-tiny", tokenizer_path=url).tokenize(CAPTIONS), t)
    assert any(n.startswith("remote-") for n in os.listdir(os.path.join(te.cache_dir(), "tokenizers")))


# ----------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("name", TINY)
def test_tiny_encode_shapes_masks_and_padding(name, t5_tokenizer_dir):
    enc = _tiny(name, t5_tokenizer_dir)
    assert isinstance(enc, TextEncoder)
    tokens = enc.tokenize(CAPTIONS)
    out = enc(tokens)
    B, L = tokens.shape
    assert out.hidden.shape == (B, L, enc.width) and out.pooled.shape == (B, enc.pooled_dim)
    assert out.mask.dtype == torch.bool and out.mask.shape == (B, L)
    assert torch.isfinite(out.hidden).all() and torch.isfinite(out.pooled).all()
    lengths = out.mask.sum(1).tolist()
    eos = [int((row == enc.eos_id).nonzero()[0]) + 1 for row in tokens]
    assert lengths == eos                                    # up to and including the first EOS
    assert lengths[1] == (1 if name.startswith("t5") else 2)  # the empty caption
    assert bool(out.mask[:, 0].all()) and bool((out.mask.long().diff(dim=1) <= 0).all())   # prefixes
    hidden, mask = enc.encode_text(CAPTIONS)
    assert torch.equal(hidden, out.hidden) and torch.equal(mask, out.mask)
    # a caption's real-token states do not depend on the rest of the batch or on padding
    for i, c in enumerate(CAPTIONS):
        h1, m1 = enc.encode_text([c])
        n = lengths[i]
        torch.testing.assert_close(h1[0, :n], hidden[i, :n], atol=1e-5, rtol=1e-4)
        assert torch.equal(m1[0], mask[i])
    short = tokens[:, : max(lengths)]                        # trimmed padding
    torch.testing.assert_close(enc.encode(short)[0][0, : lengths[0]], hidden[0, : lengths[0]], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["openclip-vit-b-32-text-tiny", "hf-clip-text-tiny", "t5-base-encoder-tiny"])
def test_frozen(name, t5_tokenizer_dir):
    enc = _tiny(name, t5_tokenizer_dir)
    assert not any(p.requires_grad for p in enc.parameters())
    parent = nn.ModuleDict({"text": enc, "head": nn.Linear(enc.width, 3)})
    parent.train()                                           # a prior's .train() must not enable dropout
    assert parent["head"].training and not any(m.training for m in enc.modules())
    enc.train(True)
    assert not enc.training
    with torch.enable_grad():
        hidden, _ = enc.encode_text(["a photo of a cat"])
    assert not hidden.requires_grad and hidden.grad_fn is None
    parent["head"](hidden).sum().backward()                  # usable as input to trainable layers
    assert all(p.grad is None for p in enc.parameters())


def test_random_init_is_seeded():
    torch.manual_seed(123)
    a = create_model("openclip-vit-b-32-text-tiny")
    torch.manual_seed(456)
    b = create_model("openclip-vit-b-32-text-tiny")
    c = create_model("openclip-vit-b-32-text-tiny", init_seed=1)
    t = a.tokenize(CAPTIONS)
    assert torch.equal(a.encode(t)[0], b.encode(t)[0])
    assert not torch.allclose(a.encode(t)[0], c.encode(t)[0])


# ------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("name", TINY)
def test_weights_round_trip_through_cache(name, t5_tokenizer_dir):
    src = _tiny(name, t5_tokenizer_dir, init_seed=7)
    path = te.weight_candidates(name)[0]
    assert path == os.path.join(te.cache_dir(), "weights", f"{name}.safetensors")
    src.save_weights(path)
    dst = _tiny(name, t5_tokenizer_dir, pretrained=True)      # init_seed 0: different random weights first
    assert dst.source == path
    t = src.tokenize(CAPTIONS)
    ref, got = src(t), dst(t)
    assert torch.equal(ref.hidden, got.hidden) and torch.equal(ref.pooled, got.pooled)
    assert not torch.equal(_tiny(name, t5_tokenizer_dir).encode(t)[0], ref.hidden)
    assert dst.cache_key("a cat") != _tiny(name, t5_tokenizer_dir).cache_key("a cat")   # weights in the key


def test_t5_tied_embeddings_and_conditional_generation_layout(t5_tokenizer_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import T5ForConditionalGeneration
    enc = _tiny("t5-base-encoder-tiny", t5_tokenizer_dir)
    keys = set(load_file(enc.save_weights(str(tmp_path / "t5.safetensors"))))
    assert "shared.weight" in keys and "encoder.embed_tokens.weight" not in keys   # tied: stored once
    # a full T5ForConditionalGeneration checkpoint (torch file): decoder dropped, encoder matches
    torch.manual_seed(3)
    full = T5ForConditionalGeneration(enc.model.config).eval()
    torch.save(full.state_dict(), tmp_path / "t5full.pt")
    enc.load_weights(str(tmp_path / "t5full.pt"))
    t = enc.tokenize(CAPTIONS)
    hidden, mask = enc.encode(t)
    with torch.no_grad():
        ref = full.encoder(input_ids=t, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(hidden, ref)


def test_open_clip_full_checkpoint_layout_and_remote_url(tmp_path):
    src = create_model("openclip-vit-b-32-text-tiny", init_seed=5)
    sd = {f"module.{k}": v for k, v in src.weights_state_dict().items()}
    sd.update({"module.visual.proj": torch.zeros(4, 4), "module.logit_scale": torch.tensor(2.0)})
    buf = io.BytesIO()
    torch.save({"state_dict": sd}, buf)
    from data_pipeline import storage
    url = "memory://vqscale-test-text/ckpt.pt"
    storage.write_bytes(url, buf.getvalue())
    dst = create_model("openclip-vit-b-32-text-tiny", weights=url)
    t = src.tokenize(CAPTIONS)
    assert dst.source == url and torch.equal(src.encode(t)[0], dst.encode(t)[0])


def test_hf_clip_from_config_folder_and_checkpoint(tmp_path):
    from transformers import CLIPConfig, CLIPModel
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)   # openai's legacy ids
    cfg = CLIPConfig(text_config=text, vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                          num_attention_heads=2, image_size=32, patch_size=16),
                     projection_dim=16)
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    enc = TextEncoder(TextEncoderConfig(backend="hf_clip", model=str(folder), name="x"))
    assert (enc.width, enc.pooled_dim, enc.eos_id) == (32, 16, CLIP_EOT)
    torch.manual_seed(0)
    full = CLIPModel(cfg).eval()                 # vision tower + logit scale are dropped on load
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    enc.load_weights(str(tmp_path / "clip.safetensors"))
    t = enc.tokenize(CAPTIONS)
    with torch.no_grad():
        ref = full.get_text_features(input_ids=t, attention_mask=enc.mask(t).long())
    ref = getattr(ref, "pooler_output", ref)
    torch.testing.assert_close(enc(t).pooled, ref)


def test_missing_weights_errors(tmp_path):
    with pytest.raises(TextEncoderWeightsNotFound) as e:
        create_model("openclip-vit-b-32-text-tiny", pretrained=True)
    for p in te.weight_candidates("openclip-vit-b-32-text-tiny"):
        assert p in str(e.value)
    assert "pretrained=False" in str(e.value)
    with pytest.raises(TextEncoderWeightsNotFound, match="nope.safetensors"):
        create_model("hf-clip-text-tiny", weights=str(tmp_path / "nope.safetensors"))
    with pytest.raises(TextEncoderWeightsNotFound, match="openclip-vit-l-14-text"):
        create_model("openclip-vit-l-14-text")                # full size: weights required
    wrong = create_model("openclip-vit-b-32-text-tiny").save_weights(str(tmp_path / "b32.safetensors"))
    with pytest.raises(ValueError, match="text_projection"):  # pooled 32 vs 48
        create_model("openclip-vit-l-14-text-tiny", weights=wrong)
    with pytest.raises(ValueError, match="lack"):
        create_model("hf-clip-text-tiny", weights=wrong)


# ------------------------------------------------------------------------- cached embeddings


@pytest.mark.parametrize("name", ["openclip-vit-b-32-text-tiny", "t5-base-encoder-tiny"])
def test_cached_embeddings_round_trip(name, t5_tokenizer_dir):
    enc = _tiny(name, t5_tokenizer_dir)
    hidden, mask = enc.encode_text(CAPTIONS)
    arrays = to_cached_batch(hidden, mask)
    for a, m in zip(arrays, mask):
        assert a.dtype == np.float16 and a.shape == (int(m.sum()), enc.width)
    stored = []
    for a in arrays:                               # as KEY.txtemb.npy in a code shard
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        stored.append(np.load(io.BytesIO(buf.getvalue())))
    h2, m2 = from_cached(stored, length=enc.max_length)
    assert h2.shape == hidden.shape and h2.dtype == torch.float32 and torch.equal(m2, mask)
    torch.testing.assert_close(h2[mask], hidden[mask], atol=2e-3, rtol=1e-3)   # float16 rounding
    assert h2[~mask].eq(0).all()
    h3, m3 = from_cached(stored)                   # pad to the longest only
    assert h3.shape[1] == int(mask.sum(1).max()) and torch.equal(m3, mask[:, : h3.shape[1]])
    np.testing.assert_array_equal(to_cached(hidden[1:2], mask[1:2]), arrays[1])   # the empty caption
    with pytest.raises(ValueError):
        from_cached(stored, length=1)
    with pytest.raises(ValueError):
        from_cached([arrays[0], np.zeros((2, enc.width + 1), np.float16)])
    with pytest.raises(ValueError):
        to_cached(hidden, mask)                     # a batch of 3


def test_cache_key():
    enc = create_model("openclip-vit-b-32-text-tiny")
    assert te.cache_key("a cat") == te.cache_key("a cat") and len(te.cache_key("a cat")) == 32
    assert te.cache_key("a cat") != te.cache_key("a cat ") != te.cache_key("a cat", "other")
    assert enc.cache_key("") != create_model("hf-clip-text-tiny").cache_key("")


# --------------------------------------------------------------------------------- full size


def test_presets_have_tiny_twins():
    assert set(FULL) == set(FULL_PARAMS)
    for name in FULL:
        assert f"{name}-tiny" in TINY


@pytest.mark.parametrize("name", sorted(FULL_PARAMS))
def test_full_size_on_meta(name):
    with torch.device("meta"):
        enc = create_model(name)                   # pretrained, but a meta build skips loading
    params, width, pooled, length = FULL_PARAMS[name]
    assert (te.count_params(enc), enc.width, enc.pooled_dim, enc.max_length) == (params, width, pooled, length)
    assert enc.source.startswith("random")
    if enc.config.backend != "open_clip":
        return   # transformers' mask builders read tensor values: no forward pass on meta
    tokens = torch.zeros(2, length, dtype=torch.long, device="meta")
    out = enc(tokens)
    assert out.hidden.shape == (2, length, width) and out.pooled.shape == (2, pooled)
