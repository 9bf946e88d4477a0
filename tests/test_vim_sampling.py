"""VIM, the shared causal transformer and token sampling (model_zoo/vim.py, transformer.py,
sampling.py): KV-cache exactness, batch/process-independent sampling (a real 2-process gloo run),
classifier-free guidance, top-k/top-p semantics, overfitting on CPU, features and presets."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:      # when run as a script by torch.distributed.run
    sys.path.insert(0, _ROOT)

import model_zoo.vim as vim_mod  # noqa: E402  (the package __init__ may not import model files)
from model_zoo.interfaces import Prior  # noqa: E402
from model_zoo.registry import create_model, list_models, model_entry  # noqa: E402
from model_zoo.sampling import (SamplingConfig, cfg_logits, filter_logits, sample_seeds,  # noqa: E402
                                sample_tokens, splitmix64, uniform_noise)
from model_zoo.transformer import Transformer, TransformerConfig  # noqa: E402

TINY = ["vim-small-tiny", "vim-base-tiny", "vim-large-tiny"]
# Measured on the meta device (module docstring of model_zoo/vim.py).
FULL = {"vim-small": 99_194_112, "vim-base": 708_235_776, "vim-large": 1_850_603_520}
FULL_TIED = {"vim-small": 92_902_656, "vim-base": 695_652_864, "vim-large": 1_833_826_304}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models and [B, 64] logits: a second OpenMP thread only adds synchronisation, and on a
    # loaded 2-core machine it makes these tests several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _vim(name: str = "vim-small-tiny", seed: int = 0, **overrides) -> vim_mod.VIM:
    torch.manual_seed(seed)
    return create_model(name, **overrides).eval()


# ---- sampling primitives ------------------------------------------------------------------------

def _splitmix_ref(x: int) -> int:
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_splitmix64_matches_reference():
    xs = [0, 1, 2, 12345, -1, -5, 2 ** 62 + 7, -(2 ** 63), 2 ** 63 - 1]
    got = splitmix64(torch.tensor(xs, dtype=torch.int64))
    m = (1 << 64) - 1
    assert [int(g) & m for g in got] == [_splitmix_ref(x & m) for x in xs]


def test_noise_is_counter_based_and_uniform():
    seeds = sample_seeds(7, torch.arange(2000))
    assert seeds.unique().numel() == 2000
    assert torch.equal(seeds[5:9], sample_seeds(7, torch.arange(5, 9)))      # index, not batch position
    assert not torch.equal(seeds[:4], sample_seeds(8, torch.arange(4)))
    u = uniform_noise(seeds, 3, 64)
    assert u.dtype == torch.float64 and bool((u > 0).all() and (u < 1).all())
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert torch.equal(u[10:12], uniform_noise(seeds[10:12], 3, 64))        # row = f(seed) only
    assert not torch.equal(u, uniform_noise(seeds, 4, 64))                  # a new step, new noise
    # Columns and rows are uncorrelated (a weak hash would correlate v and v + 1).
    c = torch.corrcoef(torch.stack([u[:, 0], u[:, 1], uniform_noise(seeds, 4, 64)[:, 0]]))
    assert (c - torch.eye(3)).abs().max() < 0.1


def test_gumbel_max_samples_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    n = 40000
    seeds = sample_seeds(0, torch.arange(n))
    for temp in (1.0, 0.5):
        toks = sample_tokens(logits.expand(n, -1), SamplingConfig(temperature=temp), seeds, step=0)
        freq = torch.bincount(toks, minlength=5).double() / n
        p = (logits.double() / temp).softmax(-1)
        assert (freq - p).abs().max() < 4 * (p * (1 - p) / n).sqrt().max()


def _ref_allowed(row: torch.Tensor, k: int, p: float) -> set[int]:
    """Brute force in float64: top-k, then the smallest prefix by probability with mass >= p."""
    order = sorted(range(row.numel()), key=lambda i: -row[i].item())
    if 0 < k < row.numel():
        order = order[:k]
    probs = torch.tensor([row[i].item() for i in order], dtype=torch.float64).softmax(0)
    keep, mass = [], 0.0
    for i, q in zip(order, probs.tolist()):
        keep.append(i)
        mass += q
        if mass >= p:
            break
    return set(keep)


def test_filter_logits_semantics():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 50, generator=g) * 3
    for k, p in [(0, 1.0), (5, 1.0), (1, 1.0), (0, 0.9), (0, 0.5), (10, 0.8), (0, 1e-6), (50, 0.99)]:
        out = filter_logits(logits, k, p)
        kept = torch.isfinite(out)
        assert torch.equal(out[kept], logits[kept])                   # unchanged inside the set
        assert bool((kept.sum(-1) >= 1).all())                        # never empty
        if k:
            assert bool((kept.sum(-1) <= k).all())
        for r in range(0, 200, 7):
            assert set(kept[r].nonzero().flatten().tolist()) == _ref_allowed(logits[r], k, p), (k, p, r)
    # A hand case, probs [0.5, 0.3, 0.2]: mass 0.5 after one token, 0.8 after two.
    hand = torch.tensor([0.5, 0.3, 0.2]).log()
    assert [int(torch.isfinite(filter_logits(hand, 0, p)).sum()) for p in (0.4, 0.6, 0.79, 0.81)] == [1, 2, 2, 3]
    assert int(torch.isfinite(filter_logits(hand, 2, 1.0)).sum()) == 2


def test_top_k_top_p_never_emit_outside_allowed_set():
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        v = int(torch.randint(2, 100, (1,), generator=g))
        logits = torch.randn(64, v, generator=g) * float(torch.rand(1, generator=g) * 6 + 0.1)
        k = int(torch.randint(0, v + 1, (1,), generator=g))
        p = float(torch.rand(1, generator=g)) * 0.99 + 0.01
        temp = float(torch.rand(1, generator=g)) * 2 + 0.05
        cfg = SamplingConfig(temperature=temp, top_k=k, top_p=p)
        allowed = torch.isfinite(filter_logits(logits / temp, k, p))
        for step in range(20):
            toks = sample_tokens(logits, cfg, sample_seeds(trial, torch.arange(64)), step)
            assert bool(allowed.gather(1, toks[:, None]).all()), (trial, step, k, p)


def test_temperature_zero_is_argmax_and_cfg_logits():
    logits = torch.randn(8, 30)
    toks = sample_tokens(logits, SamplingConfig(temperature=0.0, top_k=3), torch.arange(8), 0)
    assert torch.equal(toks, logits.argmax(-1))
    c, u = torch.randn(4, 10), torch.randn(4, 10)
    assert cfg_logits(c, u, 1.0) is c and cfg_logits(c, u, 0.0) is u
    torch.testing.assert_close(cfg_logits(c, u, 3.0), u + 3.0 * (c - u))
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)


# ---- the transformer ----------------------------------------------------------------------------

def test_transformer_cache_matches_full_forward_any_chunking():
    torch.manual_seed(0)
    for cross in (False, True):
        cfg = TransformerConfig(width=32, depth=3, heads=4, mlp_dim=64, cross_attention=cross, context_dim=24)
        t = Transformer(cfg).eval()
        x = torch.randn(2, 11, 32)
        ctx, mask = torch.randn(2, 5, 24), torch.tensor([[True] * 5, [True, True, False, False, False]])
        kw = dict(context=ctx, context_mask=mask) if cross else {}
        full = t(x, **kw)
        for chunks in ([11], [1] * 11, [4, 1, 3, 3], [2, 9]):
            cache, outs, s = t.new_cache(2, 11), [], 0
            for n in chunks:
                outs.append(t(x[:, s:s + n], cache=cache, **kw))
                s += n
            assert cache.length == 11
            torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError):
            t(x, cache=t.new_cache(2, 4), **kw)                     # overflow


def test_cross_attention_masked_and_empty_context():
    torch.manual_seed(0)
    cfg = TransformerConfig(width=32, depth=2, heads=4, mlp_dim=64, cross_attention=True)
    t = Transformer(cfg).eval()
    x, ctx = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    mask = torch.tensor([[True, True, True, False, False]] * 2)
    # Masked context positions have no effect.
    ctx2 = ctx.clone()
    ctx2[:, 3:] = 100.0
    torch.testing.assert_close(t(x, context=ctx, context_mask=mask), t(x, context=ctx2, context_mask=mask))
    # A row with an empty context is finite and equals a model whose cross-attention adds nothing.
    none = torch.zeros(2, 5, dtype=torch.bool)
    out = t(x, context=ctx, context_mask=none)
    assert torch.isfinite(out).all()
    for blk in t.blocks:
        blk.xattn.proj.bias.data.zero_()
    out = t(x, context=ctx, context_mask=none)
    h = x
    for blk in t.blocks:
        h = h + blk.attn(blk.norm1(h))
        h = h + blk.mlp(blk.norm2(h))
    torch.testing.assert_close(out, t.norm(h))


def test_sdpa_used(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    m = _vim()
    m.train()
    m.loss(torch.randint(0, 64, (2, 16)), torch.tensor([1, -1]))[0].backward()
    assert len(calls) == m.config.transformer.depth and all(c.get("is_causal") for c in calls)
    calls.clear()
    m.generate(torch.tensor([1]), 1, SamplingConfig(), torch.tensor([0]))
    assert len(calls) == m.config.transformer.depth * m.num_tokens


# ---- VIM: KV cache, reproducibility, CFG ------------------------------------------------------

@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_cached_and_uncached_decoding_agree(scale):
    m = _vim("vim-base-tiny")
    labels = torch.tensor([1, 2, -1])
    seeds = sample_seeds(0, torch.arange(3))
    logs = {}
    out = {}
    for use_cache in (True, False):
        logs[use_cache] = []
        cfg = SamplingConfig(temperature=1.0, top_k=20, guidance_scale=scale, use_cache=use_cache)
        out[use_cache] = m.generate(labels, 3, cfg, seeds, on_step=lambda i, lg: logs[use_cache].append(lg.clone()))
    assert len(logs[True]) == len(logs[False]) == m.num_tokens
    for a, b in zip(logs[True], logs[False]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[True], out[False])
    # The step logits are the teacher-forced logits of the sampled sequence (guided for scale != 1).
    with torch.no_grad():
        tf = cfg_logits(m(out[True], labels), m(out[True], m.null_condition(3)), scale)
    torch.testing.assert_close(torch.stack(logs[True], 1), tf, atol=1e-5, rtol=1e-5)


def test_samples_do_not_depend_on_batch():
    m = _vim("vim-base-tiny")
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, guidance_scale=2.0)
    seeds = sample_seeds(3, torch.arange(4))
    both = m.generate(torch.tensor([4, 7]), 2, cfg, seeds[:2])
    alone = [m.generate(torch.tensor([y]), 1, cfg, seeds[i:i + 1]) for i, y in enumerate([4, 7])]
    assert torch.equal(both, torch.cat(alone))
    # Other company in the batch, in another order.
    mixed = m.generate(torch.tensor([1, 7, -1, 4]), 4, cfg, torch.stack([seeds[2], seeds[1], seeds[3], seeds[0]]))
    assert torch.equal(mixed[1], both[1]) and torch.equal(mixed[3], both[0])
    assert not torch.equal(both[0], both[1])


def test_cfg_scale_one_is_conditional_and_zero_is_unconditional():
    m = _vim()
    with torch.no_grad():   # at init (std 0.02) the label barely moves the logits: make it matter
        m.class_embed.weight.mul_(50)
        m.head.weight.mul_(20)
    labels, seeds = torch.tensor([2, 5, 9]), sample_seeds(11, torch.arange(3))
    plain = m.generate(labels, 3, SamplingConfig(), seeds)
    assert torch.equal(m.generate(labels, 3, SamplingConfig(guidance_scale=1.0), seeds), plain)
    uncond = m.generate(m.null_condition(3), 3, SamplingConfig(), seeds)
    assert torch.equal(m.generate(labels, 3, SamplingConfig(guidance_scale=0.0), seeds), uncond)
    assert torch.equal(m.generate(torch.full((3,), m.num_classes), 3, SamplingConfig(), seeds), uncond)
    assert not torch.equal(plain, uncond)
    assert not torch.equal(m.generate(labels, 3, SamplingConfig(guidance_scale=4.0), seeds), plain)


def test_overfit_then_sampling_reproduces_sequences():
    m = _vim("vim-small-tiny", class_dropout=0.0, transformer={"dropout": 0.0}).train()
    g = torch.Generator().manual_seed(1)
    codes, labels = torch.randint(0, 64, (4, 16), generator=g), torch.tensor([0, 3, 5, 7])
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(200):
        loss, terms = m.loss(codes, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02 and terms["code_accuracy"].item() == 1.0
    m.eval()
    seeds = sample_seeds(0, torch.arange(4))
    for cfg in (SamplingConfig(temperature=0.0), SamplingConfig(temperature=0.3),
                SamplingConfig(temperature=0.3, use_cache=False), SamplingConfig(top_k=3, top_p=0.9)):
        assert torch.equal(m.generate(labels, 4, cfg, seeds), codes), cfg


def test_loss_class_dropout_and_teacher_forcing():
    m = _vim(class_dropout=1.0, transformer={"dropout": 0.0})
    codes, labels = torch.randint(0, 64, (3, 16)), torch.tensor([1, 2, 3])
    m.train()
    dropped = m.loss(codes, labels)[0]
    m.eval()
    torch.testing.assert_close(dropped, m.loss(codes, m.null_condition(3))[0])   # every label nulled
    assert not torch.allclose(dropped, m.loss(codes, labels)[0])                 # eval: no dropout
    # Causality: logits[:, i] do not depend on codes[:, i:].
    with torch.no_grad():
        a = m(codes, labels)
        c2 = codes.clone()
        c2[:, 9:] = (c2[:, 9:] + 1) % 64
        b = m(c2, labels)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    with pytest.raises(ValueError):
        m(codes, labels, positions=torch.zeros_like(codes))
    with pytest.raises(ValueError):
        m(codes, torch.tensor([1, 2, 11]))


def test_features_stop_at_layer_and_match_manual():
    m = _vim("vim-large-tiny")
    codes, labels = torch.randint(0, 64, (2, 16)), torch.tensor([3, -1])
    counts = [0] * len(m.transformer.blocks)
    for i, blk in enumerate(m.transformer.blocks):
        blk.register_forward_hook(lambda mod, inp, out, i=i: counts.__setitem__(i, counts[i] + 1))
    norm_calls = []
    m.transformer.norm.register_forward_hook(lambda *a: norm_calls.append(1))
    with torch.no_grad():
        f = m.features(codes, labels, layer=1)
        assert counts == [1, 1, 0] and not norm_calls
        # manual: class token + code_1..code_15, positions, blocks 0..1, mean over the code slots
        y = torch.tensor([3, m.num_classes])
        x = torch.cat([m.class_embed(y)[:, None], m.tok_embed(codes[:, :-1])], 1) + m.pos_embed
        for blk in m.transformer.blocks[:2]:
            x = blk(x)
        torch.testing.assert_close(f, x[:, 1:].mean(1))
        assert f.shape == (2, m.config.transformer.width)
        torch.testing.assert_close(m.features(codes, labels, layer=-1), m.features(codes, labels, layer=2))
    with pytest.raises(IndexError):
        m.features(codes, labels, layer=3)


# ---- presets ------------------------------------------------------------------------------------

def test_presets_registered_and_full_size_counts_on_meta():
    names = list_models(kind="prior")
    for n in list(FULL) + TINY:
        assert n in names and "2110.04627" in model_entry(n).paper
    for n, want in FULL.items():
        with torch.device("meta"):
            m = create_model(n)
            tied = create_model(n, tie_embeddings=True)
        assert isinstance(m, Prior) and m.num_tokens == 1024 and m.codebook_size == 8192
        assert m.grid_size == (32, 32) and m.num_classes == 1000
        assert sum(p.numel() for p in m.parameters()) == want, n
        assert sum(p.numel() for p in tied.parameters()) == FULL_TIED[n], n
        assert tied.head.weight is tied.tok_embed.weight
    cfg = create_model("vim-base-tiny", transformer={"depth": 1}, grid_size=[2, 3]).config
    assert cfg.transformer.depth == 1 and cfg.transformer.width == 96 and cfg.grid_size == (2, 3)


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_train_step_and_generate(name):
    m = _vim(name).train()
    loss, terms = m.loss(torch.randint(0, 64, (2, 16)), torch.tensor([0, -1]))
    loss.backward()
    assert torch.isfinite(loss) and set(terms) >= {"code_ce", "code_accuracy"}
    assert all(p.grad is not None for p in m.parameters())
    out = m.eval().generate(5, 3, SamplingConfig(top_k=10), sample_seeds(0, torch.arange(3)))
    assert out.shape == (3, 16) and out.dtype == torch.long and 0 <= out.min() and out.max() < 64


# ---- a real 2-process gloo run ----------------------------------------------------------------

_DIST_SAMPLES, _DIST_SEED = 6, 1234
_DIST_CFG = SamplingConfig(temperature=1.0, top_k=32, top_p=0.95, guidance_scale=1.5)


def _dist_model() -> vim_mod.VIM:
    return _vim("vim-base-tiny", seed=0)   # identical weights on every rank, as a checkpoint gives


def _dist_worker(out_dir: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per = _DIST_SAMPLES // world
    idx = torch.arange(rank * per, (rank + 1) * per)            # this rank's half of the indices
    m = _dist_model()
    codes = m.generate(idx % m.num_classes, per, _DIST_CFG, sample_seeds(_DIST_SEED, idx))
    gathered = [torch.zeros_like(codes) for _ in range(world)]
    dist.all_gather(gathered, codes)
    if rank == 0:
        torch.save(torch.cat(gathered), os.path.join(out_dir, "codes.pt"))
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": _ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
                           os.path.abspath(__file__), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=240, cwd=_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = torch.load(tmp_path / "codes.pt")
    m = _dist_model()
    idx = torch.arange(_DIST_SAMPLES)
    one = m.generate(idx % m.num_classes, _DIST_SAMPLES, _DIST_CFG, sample_seeds(_DIST_SEED, idx))
    assert two.shape == (_DIST_SAMPLES, 16) and torch.equal(two, one)


if __name__ == "__main__":
    _dist_worker(sys.argv[1])
