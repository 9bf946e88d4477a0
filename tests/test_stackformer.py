"""Stackformer (model_zoo/stackformer.py): the two-stack prior over MQ-VAE (code, position) pairs.
Tiny preset end to end on CPU, the full-size preset on the meta device."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import model_zoo.mqvae  # noqa: F401  (registers mq-vae-f8-tiny)
import model_zoo.stackformer as sf
from model_zoo.interfaces import Prior
from model_zoo.registry import create_model, list_models, model_entry
from model_zoo.sampling import SamplingConfig

TINY = "stackformer-base-tiny"
FULL_PARAMS = 307_794_944          # measured on meta; the table in the module docstring
TINY_PARAMS = 281_664


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _tiny(seed: int = 0, **overrides) -> sf.Stackformer:
    torch.manual_seed(seed)
    return create_model(TINY, **overrides).eval()


def _data(model: sf.Stackformer, b: int, seed: int = 0):
    """Random codes, random sorted distinct positions, labels."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, model.codebook_size, (b, model.num_tokens), generator=g)
    hw = model.grid_size[0] * model.grid_size[1]
    positions = torch.stack([torch.randperm(hw, generator=g)[:model.num_tokens].sort().values
                             for _ in range(b)])
    labels = torch.randint(0, 10, (b,), generator=g)
    return codes, positions, labels


def _check_valid(model: sf.Stackformer, codes: torch.Tensor, positions: torch.Tensor, n: int):
    k, hw = model.num_tokens, model.grid_size[0] * model.grid_size[1]
    assert codes.shape == positions.shape == (n, k)
    assert codes.dtype == positions.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < model.codebook_size
    assert int(positions.min()) >= 0 and int(positions.max()) < hw
    assert bool((positions[:, 1:] > positions[:, :-1]).all()), "positions not strictly increasing"
    for row in positions:
        assert row.unique().numel() == k


def test_registered_presets_and_config():
    assert {"stackformer-base", TINY} <= set(list_models(kind="prior"))
    assert TINY in list_models(kind="prior", tiny=True)
    for n in ("stackformer-base", TINY):
        assert "Masked Vector Quantization" in model_entry(n).paper
    with pytest.raises(ValueError):
        sf.StackformerConfig(grid_size=(4, 4), num_tokens=17)


def test_full_preset_on_meta():
    with torch.device("meta"):
        model = create_model("stackformer-base")
    assert isinstance(model, Prior)
    cfg = model.config
    assert (cfg.codebook_size, cfg.grid_size, cfg.num_tokens, cfg.num_classes) == (1024, (32, 32), 256, 1000)
    for t in (cfg.code_transformer, cfg.position_transformer):
        assert (t.width, t.depth, t.heads, t.mlp_dim) == (1024, 12, 16, 4096)
    assert _count(model) == FULL_PARAMS
    assert _count(model.code_transformer) == _count(model.position_transformer) == 151_156_736
    assert _count(create_model(TINY)) == TINY_PARAMS


def test_position_mask():
    m = sf.position_mask(torch.tensor([-1, 3, 5]), 1, num_tokens=3, num_positions=8)
    # step 1 of 3 on 8 cells: at most 8 - 3 + 1 = 6, so one cell (7) stays for the last token.
    assert m.tolist() == [[True, True, True, True, True, True, True, False],
                          [False, False, False, False, True, True, True, False],
                          [False, False, False, False, False, False, True, False]]


def test_forward_shapes_and_loss_is_sum_of_both_ces():
    model = _tiny()
    codes, positions, labels = _data(model, 3)
    code_logits, position_logits = model(codes, labels, positions)
    assert code_logits.shape == (3, 16, 64) and position_logits.shape == (3, 16, 64)
    # The targets are always allowed; the forbidden cells are exactly the mask's complement.
    assert torch.isfinite(position_logits.gather(2, positions[..., None])).all()
    prev = F.pad(positions[:, :-1], (1, 0), value=-1)
    allowed = sf.position_mask(prev, torch.arange(16), 16, 64)
    assert torch.equal(torch.isfinite(position_logits), allowed)
    loss, terms = model.loss(codes, labels, positions)
    code_ce = F.cross_entropy(code_logits.flatten(0, 1), codes.flatten())
    pos_ce = F.cross_entropy(position_logits.flatten(0, 1), positions.flatten())
    torch.testing.assert_close(terms["code_ce"], code_ce)
    torch.testing.assert_close(terms["position_ce"], pos_ce)
    torch.testing.assert_close(loss, code_ce + pos_ce)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters()), "unused parameters"
    with pytest.raises(ValueError):
        model(codes, labels)                    # positions are required


def test_factorization_is_causal():
    """code i sees pairs < i; position i sees pairs < i and code i -- nothing later."""
    model = _tiny()
    codes, positions, labels = _data(model, 1)
    cl, pl = model(codes, labels, positions)
    j = 7
    codes2 = codes.clone()
    codes2[:, j] = (codes2[:, j] + 1) % 64
    cl2, pl2 = model(codes2, labels, positions)
    torch.testing.assert_close(cl2[:, :j + 1], cl[:, :j + 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(pl2[:, :j], pl[:, :j], rtol=0, atol=1e-6)
    assert not torch.allclose(cl2[:, j + 1], cl[:, j + 1]) and not torch.allclose(pl2[:, j], pl[:, j])
    j = next(i for i in range(1, 15) if positions[0, i] + 1 < positions[0, i + 1])
    positions2 = positions.clone()
    positions2[:, j] += 1
    cl3, pl3 = model(codes, labels, positions2)
    torch.testing.assert_close(cl3[:, :j + 1], cl[:, :j + 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(pl3[:, :j + 1], pl[:, :j + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(cl3[:, j + 1], cl[:, j + 1])


def test_class_dropout_maps_to_null_condition():
    model = _tiny(class_dropout=1.0, code_transformer={"dropout": 0.0},
                  position_transformer={"dropout": 0.0})
    codes, positions, labels = _data(model, 2)
    ref = model(codes, model.null_condition(2), positions)
    model.train()
    out = model(codes, labels, positions)
    assert all(torch.allclose(a, b) for a, b in zip(out, ref))


SAMPLINGS = [
    SamplingConfig(),
    SamplingConfig(temperature=3.0),
    SamplingConfig(temperature=0.7, top_k=5),
    SamplingConfig(top_p=0.8),
    SamplingConfig(temperature=1.5, top_k=20, top_p=0.9),
    SamplingConfig(temperature=0.0),
    SamplingConfig(guidance_scale=3.0, temperature=2.0),
]


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_sampled_positions_are_sorted_unique_in_grid(sampling):
    model = _tiny(seed=1)
    n = 48
    labels = torch.arange(n) % 10
    codes, positions = model.generate(labels, n, sampling, torch.arange(n) * 7919 + 3)
    _check_valid(model, codes, positions, n)


@pytest.mark.parametrize("num_tokens", [1, 62, 64])
def test_positions_fit_even_when_the_model_wants_the_wrong_cells(num_tokens):
    """Peaky position logits that favour the last cells (and, for k = h*w, no freedom at all):
    the mask still yields exactly k sorted positions."""
    model = _tiny(seed=2, num_tokens=num_tokens)
    with torch.no_grad():
        model.position_head.weight.mul_(200.0)
        model.position_head.weight[-3:] += 5.0
    n = 8
    for s in (SamplingConfig(), SamplingConfig(temperature=0.0), SamplingConfig(top_k=2)):
        codes, positions = model.generate(torch.zeros(n, dtype=torch.long), n, s, torch.arange(n))
        _check_valid(model, codes, positions, n)
    if num_tokens == 64:
        assert torch.equal(positions, torch.arange(64).expand(n, 64))


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_cached_and_uncached_sampling_identical(scale):
    model = _tiny(seed=3).double()
    labels, seeds = torch.tensor([1, 4, -1]), torch.tensor([11, 12, 13])
    cached = model.generate(labels, 3, SamplingConfig(guidance_scale=scale, use_cache=True), seeds)
    uncached = model.generate(labels, 3, SamplingConfig(guidance_scale=scale, use_cache=False), seeds)
    assert torch.equal(cached[0], uncached[0]) and torch.equal(cached[1], uncached[1])


def test_samples_depend_only_on_their_own_seed():
    model = _tiny(seed=4)
    labels, seeds = torch.tensor([0, 3, 5, 7]), torch.tensor([100, 200, 300, 400])
    codes, positions = model.generate(labels, 4, SamplingConfig(guidance_scale=2.0), seeds)
    c1, p1 = model.generate(labels[2:3], 1, SamplingConfig(guidance_scale=2.0), seeds[2:3])
    assert torch.equal(c1[0], codes[2]) and torch.equal(p1[0], positions[2])
    c2, _ = model.generate(labels, 4, SamplingConfig(guidance_scale=2.0), seeds + 1)
    assert not torch.equal(c2, codes)


def _greedy_replay(model, labels, codes, positions, scale):
    """Teacher-forced logits on a generated sequence, guided and masked like generate."""
    cl, pl = model(codes, labels, positions)
    ucl, upl = model(codes, model.null_condition(len(labels)), positions)
    allowed = torch.isfinite(pl)           # the mask depends on the positions only
    pl, upl = pl.masked_fill(~allowed, 0.0), upl.masked_fill(~allowed, 0.0)
    pos_logits = (upl + scale * (pl - upl)).masked_fill(~allowed, float("-inf"))
    return (ucl + scale * (cl - ucl)).argmax(-1), pos_logits.argmax(-1)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_greedy_generate_matches_teacher_forcing(scale):
    """Greedy sampling picks the argmax of the (guided, masked) teacher-forced logits of its own
    output at every step, for both heads: generate and forward agree, and CFG guides both."""
    model = _tiny(seed=5).double()
    labels = torch.tensor([2, 8])
    codes, positions = model.generate(labels, 2, SamplingConfig(temperature=0.0, guidance_scale=scale),
                                      torch.tensor([0, 1]))
    code_pred, pos_pred = _greedy_replay(model, labels, codes, positions, scale)
    assert torch.equal(code_pred, codes) and torch.equal(pos_pred, positions)


def test_guidance_scale_one_is_conditional_and_zero_is_unconditional():
    model = _tiny(seed=6).double()
    labels, seeds = torch.tensor([3, 9]), torch.tensor([5, 6])
    cond = model.generate(labels, 2, SamplingConfig(guidance_scale=1.0), seeds)
    uncond = model.generate(model.null_condition(2), 2, SamplingConfig(), seeds)
    zero = model.generate(labels, 2, SamplingConfig(guidance_scale=0.0), seeds)
    assert torch.equal(zero[0], uncond[0]) and torch.equal(zero[1], uncond[1])
    # scale 1 through the batched CFG path (a scale a hair from 1) samples the conditional model.
    near = model.generate(labels, 2, SamplingConfig(guidance_scale=1.0 + 1e-12), seeds)
    assert torch.equal(near[0], cond[0]) and torch.equal(near[1], cond[1])


def test_features():
    model = _tiny()
    codes, positions, labels = _data(model, 3)
    f0 = model.features(codes, model.null_condition(3), 0, positions)
    f1 = model.features(codes, model.null_condition(3), 1, positions)
    assert f0.shape == f1.shape == (3, 64) and not torch.allclose(f0, f1)
    with pytest.raises(ValueError):
        model.features(codes, labels, 2, positions)


def test_overfit_and_greedy_reproduces_codes_and_positions():
    torch.manual_seed(0)
    model = create_model(TINY, class_dropout=0.0, code_transformer={"dropout": 0.0},
                         position_transformer={"dropout": 0.0})
    codes, positions, _ = _data(model, 4, seed=7)
    labels = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(300):                 # ~75 steps, 1-3 s on an idle 2-core CPU
        loss, terms = model.loss(codes, labels, positions)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.03:
            break
    assert loss.item() < 0.03, (step, loss.item(), terms)
    assert terms["code_ce"] < 0.03 and terms["position_ce"] < 0.03
    model.eval()
    gen_codes, gen_pos = model.generate(labels, 4, SamplingConfig(temperature=0.0), torch.arange(4))
    assert torch.equal(gen_codes, codes) and torch.equal(gen_pos, positions)


def test_samples_decode_with_tiny_mqvae():
    torch.manual_seed(0)
    tok = create_model("mq-vae-f8-tiny").eval()
    model = _tiny(seed=8)
    assert (model.grid_size, model.num_tokens, model.codebook_size) == \
        (tok.grid_size, tok.num_tokens, tok.codebook_size)
    codes, positions = model.generate(torch.tensor([1, 2]), 2, SamplingConfig(top_k=10), torch.tensor([1, 2]))
    with torch.no_grad():
        images = tok.decode(codes, positions)
    assert images.shape == (2, 3, tok.image_size, tok.image_size) and torch.isfinite(images).all()
