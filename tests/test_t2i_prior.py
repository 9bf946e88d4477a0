"""The text-conditional prior (model_zoo/t2i_prior.py): both conditioning modes on CPU with the tiny
(random) open_clip text tower; the full-size preset on the meta device."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import model_zoo.t2i_prior as tp
from model_zoo.interfaces import Prior
from model_zoo.registry import create_model, list_models, model_entry
from model_zoo.sampling import SamplingConfig, sample_tokens
from model_zoo.text_encoders import count_params, from_cached, to_cached_batch

MODES = ["prefix", "cross_attention"]
TINY = "t2i-prior-1b-tiny"
CAPTIONS = ["a red square", "two small dogs playing in the snow", "a cat", "an empty beach at sunset"]

# Measured on the meta device (the module docstring's table).
FULL_PREFIX = 957_523_968
FULL_CROSS = 1_155_043_584
TEXT_B32 = 63_428_096


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread
    # pool's spinning makes every small op ~30x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(mode: str, seed: int = 0, **overrides) -> tp.T2IPrior:
    """The tiny preset, in eval mode. ``init_std`` 0.2 (not 0.02) for sampling tests, so that a random
    model's samples depend visibly on the caption."""
    torch.manual_seed(seed)
    return create_model(TINY, conditioning=mode, **overrides).eval()


def _codes(b: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (b, 16), generator=torch.Generator().manual_seed(seed))


def test_registered_presets():
    names = list_models(kind="prior")
    assert {"t2i-prior-1b", TINY} <= set(names)
    assert model_entry(TINY).kind == "prior" and TINY in list_models(kind="prior", tiny=True)


def test_full_size_on_meta():
    with torch.device("meta"):
        prefix = create_model("t2i-prior-1b")
        cross = create_model("t2i-prior-1b", conditioning="cross_attention")
    assert tp.count_prior_params(prefix) == FULL_PREFIX
    assert tp.count_prior_params(cross) == FULL_CROSS
    assert count_params(prefix.text_encoder) == TEXT_B32
    assert prefix.num_tokens == 1024 and prefix.codebook_size == 8192 and prefix.grid_size == (32, 32)
    assert cross.transformer_cfg.cross_attention and cross.transformer_cfg.context_dim == 512
    trainable = sum(p.numel() for p in prefix.parameters() if p.requires_grad)
    assert trainable == FULL_PREFIX


def test_config_validation():
    with pytest.raises(ValueError):
        create_model(TINY, conditioning="sideways")
    with pytest.raises(ValueError):
        create_model(TINY, transformer={"cross_attention": True})   # prefix mode has no cross-attention
    with pytest.raises(ValueError):
        create_model(TINY, conditioning="cross_attention", transformer={"context_dim": 32})


@pytest.mark.parametrize("mode", MODES)
def test_forward_is_causal_and_conditions_agree(mode):
    model = _tiny(mode)
    assert isinstance(model, Prior)
    codes = _codes(2)
    tokens = model.text_encoder.tokenize(CAPTIONS[:2])
    with torch.no_grad():
        logits = model(codes, {"tokens": tokens})
        assert logits.shape == (2, 16, 64)
        # The list-of-captions convenience is the tokens path.
        assert torch.equal(model(codes, CAPTIONS[:2]), logits)
        # logits[:, i] sees codes[:, :i] only.
        changed = codes.clone()
        changed[:, 9:] = (changed[:, 9:] + 1) % 64
        other = model(changed, {"tokens": tokens})
        torch.testing.assert_close(other[:, :10], logits[:, :10], rtol=0, atol=1e-5)
        assert not torch.allclose(other[:, 10:], logits[:, 10:])
        # The caption matters.
        assert not torch.allclose(model(codes, CAPTIONS[2:]), logits)


@pytest.mark.parametrize("mode", MODES)
def test_cached_embeddings_match_tokens(mode):
    model = _tiny(mode)
    codes = _codes(3)
    with torch.no_grad():
        hidden, mask = model.text_encoder.encode_text(CAPTIONS[:3])
        ref = model(codes, {"tokens": model.text_encoder.tokenize(CAPTIONS[:3])})
        # float32 states: the same numbers.
        torch.testing.assert_close(model(codes, {"embedding": hidden, "mask": mask}), ref, rtol=0, atol=1e-5)
        # float16 cache (KEY.txtemb.npy), real tokens only, re-padded by from_cached.
        emb, m = from_cached(to_cached_batch(hidden, mask))
        assert emb.shape[1] < hidden.shape[1]
        torch.testing.assert_close(model(codes, {"embedding": emb.half(), "mask": m}), ref, rtol=0, atol=2e-2)


@pytest.mark.parametrize("mode", MODES)
def test_text_padding_does_not_change_logits(mode):
    model = _tiny(mode)
    codes = _codes(2)
    tokens = model.text_encoder.tokenize(CAPTIONS[:2])                 # [2, 77], zero padded
    with torch.no_grad():
        ref = model(codes, {"tokens": tokens})
        short = tokens[:, :12]                                         # both captions fit in 12
        torch.testing.assert_close(model(codes, {"tokens": short}), ref, rtol=0, atol=1e-5)
        hidden, mask = model.text_encoder.encode(tokens)
        # Garbage at the padded positions, more padding, and padding on the left: all ignored.
        noisy = torch.where(mask[..., None], hidden, torch.randn_like(hidden) * 10)
        longer = torch.cat([noisy, torch.randn(2, 5, hidden.shape[2])], 1)
        longer_mask = F.pad(mask, (0, 5), value=False)
        torch.testing.assert_close(model(codes, {"embedding": longer, "mask": longer_mask}), ref,
                                   rtol=0, atol=1e-5)
        left = torch.cat([torch.randn(2, 3, hidden.shape[2]), hidden[:, :12]], 1)
        left_mask = torch.cat([torch.zeros(2, 3, dtype=torch.bool), mask[:, :12]], 1)
        torch.testing.assert_close(model(codes, {"embedding": left, "mask": left_mask}), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_cached_and_uncached_generation_agree(mode):
    model = _tiny(mode, init_std=0.2)
    seeds = torch.tensor([11, 12, 13, 14])
    cond = {"tokens": model.text_encoder.tokenize(CAPTIONS)}           # four caption lengths
    for s in (SamplingConfig(guidance_scale=1.0), SamplingConfig(guidance_scale=3.0, top_k=20),
              SamplingConfig(temperature=0.7, top_p=0.9, guidance_scale=0.5)):
        cached = model.generate(cond, 4, s, seeds)
        uncached = model.generate(cond, 4, SamplingConfig(**{**s.__dict__, "use_cache": False}), seeds)
        assert cached.shape == (4, 16) and cached.dtype == torch.long
        assert torch.equal(cached, uncached)


@pytest.mark.parametrize("mode", MODES)
def test_samples_depend_only_on_their_seed_and_caption(mode):
    model = _tiny(mode, init_std=0.2)
    s = SamplingConfig(guidance_scale=2.0)
    seeds = torch.tensor([5, 6, 7])
    batch = model.generate(CAPTIONS[:3], 3, s, seeds)
    for i in range(3):
        assert torch.equal(model.generate([CAPTIONS[i]], 1, s, seeds[i:i + 1]), batch[i:i + 1])
    # One caption is shared by all samples; different seeds give different samples.
    shared = model.generate([CAPTIONS[0]], 3, s, seeds)
    assert torch.equal(shared[0], batch[0]) and not torch.equal(shared[1], shared[2])


@pytest.mark.parametrize("mode", MODES)
def test_guidance_scale_one_is_conditional_and_zero_is_unconditional(mode):
    model = _tiny(mode, init_std=0.2)
    seeds = torch.tensor([3, 4])
    cond = {"tokens": model.text_encoder.tokenize(CAPTIONS[1:3])}
    # Scale 1: the conditional model, checked against sampling from teacher-forced logits.
    s1 = SamplingConfig(guidance_scale=1.0)
    out = model.generate(cond, 2, s1, seeds)
    with torch.no_grad():
        manual = torch.zeros(2, 16, dtype=torch.long)
        for t in range(16):
            logits = model(manual, cond)[:, t]
            manual[:, t] = sample_tokens(logits, s1, seeds, t)
    assert torch.equal(out, manual)
    # Scale 0: the unconditional model, i.e. the empty caption.
    uncond = model.generate(cond, 2, SamplingConfig(guidance_scale=0.0), seeds)
    assert torch.equal(uncond, model.generate(model.null_condition(2), 2, s1, seeds))
    assert torch.equal(uncond, model.generate([""], 2, s1, seeds))
    assert torch.equal(uncond, model.generate(None, 2, s1, seeds))
    assert not torch.equal(uncond, out)


@pytest.mark.parametrize("mode", MODES)
def test_text_encoder_is_frozen(mode):
    model = _tiny(mode, transformer={"dropout": 0.0}).train()
    assert not model.text_encoder.training                             # .train() leaves it in eval
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("text_encoder.") for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == tp.count_prior_params(model)
    before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss, terms = model.loss(_codes(4), {"tokens": model.text_encoder.tokenize(CAPTIONS)})
    assert loss.dim() == 0 and "code_ce" in terms
    loss.backward()
    assert all(p.grad is None for p in model.text_encoder.parameters())
    assert model.text_proj is None or model.text_proj.weight.grad is not None
    opt.step()
    for k, v in model.text_encoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_state_dict_holds_the_prior_only():
    model = _tiny("prefix")
    sd = model.state_dict()
    assert sd and not any(k.startswith("text_encoder.") for k in sd)
    assert sum(v.numel() for v in sd.values()) == tp.count_prior_params(model)
    other = _tiny("prefix", seed=1)
    assert not torch.equal(other.head.weight, model.head.weight)
    other.load_state_dict(sd)                                          # strict, without the encoder
    codes = _codes(2)
    with torch.no_grad():
        assert torch.equal(other(codes, CAPTIONS[:2]), model(codes, CAPTIONS[:2]))
    # A state dict that does include the encoder (e.g. a whole-module consolidation) loads too.
    other.load_state_dict({**sd, **{"text_encoder." + k: v for k, v in model.text_encoder.state_dict().items()}})


@pytest.mark.parametrize("mode", MODES)
def test_caption_dropout_uses_the_empty_caption(mode):
    model = _tiny(mode, transformer={"dropout": 0.0}, caption_dropout=0.999)
    codes = _codes(3)
    with torch.no_grad():
        uncond = model(codes, model.null_condition(3))
        cond = model(codes, CAPTIONS[:3])
        torch.manual_seed(0)
        dropped = model.train()(codes, CAPTIONS[:3])                  # every caption dropped
    torch.testing.assert_close(dropped, uncond, rtol=0, atol=1e-5)
    assert not torch.allclose(cond, uncond)


@pytest.mark.parametrize("mode", MODES)
def test_features(mode):
    model = _tiny(mode)
    codes = _codes(2)
    with torch.no_grad():
        f0 = model.features(codes, CAPTIONS[:2], layer=0)
        f1 = model.features(codes, CAPTIONS[:2], layer=-1)
    assert f0.shape == f1.shape == (2, 64) and not torch.allclose(f0, f1)
    with pytest.raises(ValueError):
        model.features(codes, CAPTIONS[:2], layer=2)


@pytest.mark.parametrize("mode", MODES)
def test_overfits_captions_and_greedy_sampling_reproduces_them(mode):
    model = _tiny(mode, transformer={"dropout": 0.0}, caption_dropout=0.0).train()
    codes = _codes(4, seed=7)
    tokens = {"tokens": model.text_encoder.tokenize(CAPTIONS)}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    t0 = time.time()
    for _ in range(150):
        loss, _ = model.loss(codes, tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.05 and time.time() - t0 < 20
    model.eval()
    greedy = SamplingConfig(temperature=0.0)
    assert torch.equal(model.generate(tokens, 4, greedy, torch.arange(4)), codes)
    for i, caption in enumerate(CAPTIONS):
        out = model.generate([caption], 2, SamplingConfig(temperature=0.0, use_cache=False), torch.arange(2))
        assert torch.equal(out, codes[i].expand(2, -1))
