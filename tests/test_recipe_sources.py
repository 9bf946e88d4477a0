"""Issue 19: recipes faithful to their sources, and the options they need: the exponential LR
schedule (VIM), separate code/position sampling settings (Stackformer), rejection sampling (VIM),
the paper's class-dropout-free and unconditional VIM recipes, the probe tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

import model_zoo.mqvae  # noqa: F401  (registers the presets)
import model_zoo.stackformer as sf
import model_zoo.vim  # noqa: F401
import model_zoo.vqgan  # noqa: F401
from model_zoo.registry import create_model
from model_zoo.sampling import SamplingConfig, keep_best, num_candidates
from pretrain.config import apply_overrides
from pretrain.optim import OptimConfig, WarmupCosine, WarmupExponential, lr_schedule
from pretrain.recipes import get_recipe, list_recipes

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the exponential schedule -----------------------------------------------------------------------

def test_exponential_schedule_against_hand_computed_values():
    f = WarmupExponential(warmup=4, decay_start=10, total=20, min_ratio=0.01)
    # warmup (step + 1) / 4, then 1 until step 10, then 0.01 ** ((step - 10) / 10), then 0.01
    expected = {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 9: 1.0, 10: 1.0, 11: 0.01 ** 0.1, 15: 0.1, 19: 0.01 ** 0.9,
                20: 0.01, 100: 0.01}
    for step, want in expected.items():
        assert f(step) == pytest.approx(want, rel=1e-12), step
    assert WarmupExponential(0, 0, 0, 0.5)(7) == 1.0                     # total 0: constant
    assert WarmupExponential(5, 2, 10, 0.5)(5) == 1.0                    # the decay starts after the warmup
    with pytest.raises(ValueError, match="min_lr_ratio"):
        WarmupExponential(0, 0, 10, 0.0)


def test_lr_schedule_picks_the_configured_schedule_and_cosine_stays_the_default():
    assert OptimConfig().schedule == "cosine" and isinstance(lr_schedule(OptimConfig()), WarmupCosine)
    cfg = apply_overrides(OptimConfig(), ["schedule=exponential", "decay_start=10", "warmup_steps=4",
                                          "total_steps=20", "min_lr_ratio=0.01", "lr=2.0"])
    f = lr_schedule(cfg)
    assert isinstance(f, WarmupExponential) and f(15) == pytest.approx(0.1)
    # through torch's LambdaLR, as the engines step it
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    lrs = []
    for _ in range(21):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[12] == pytest.approx(2.0 * 0.01 ** 0.2)
    assert lrs[20] == pytest.approx(0.02)


def test_vim_recipe_schedule_is_the_papers():
    """Warmup 5k to 4.5e-4, constant to 80k, exponential decay reaching 1e-5 (at 450k)."""
    cfg = get_recipe("vim-base")
    o, f = cfg.optim, lr_schedule(cfg.optim)
    assert (o.betas, o.lr, o.schedule, o.warmup_steps, o.decay_start, o.total_steps) == (
        (0.9, 0.96), 4.5e-4, "exponential", 5000, 80_000, 450_000)
    assert o.lr * f(2499) == pytest.approx(4.5e-4 / 2)
    assert o.lr * f(60_000) == pytest.approx(4.5e-4)
    # half way through the decay: the geometric mean of 4.5e-4 and 1e-5
    assert o.lr * f(265_000) == pytest.approx(math.sqrt(4.5e-4 * 1e-5), rel=1e-9)
    assert o.lr * f(450_000) == pytest.approx(1e-5, rel=1e-9)
    # the tiny twin decays from the same fraction of its run
    tiny = get_recipe("vim-base-tiny").optim
    assert tiny.schedule == "exponential" and tiny.decay_start == round(200 * 80 / 450)


# ---- the recipes ----------------------------------------------------------------------------------

def test_recipes_carry_their_sources_numbers():
    vit = get_recipe("vit-vqgan-bb")
    o = vit.optim
    assert (vit.global_batch_size, o.betas, o.weight_decay, o.lr, o.warmup_steps, o.total_steps) == (
        256, (0.9, 0.99), 1e-4, 1e-4, 50_000, 500_000)
    assert o.lr * o.min_lr_ratio == pytest.approx(5e-5) and o.schedule == "cosine"
    assert vit.tokenizer_loss.adversarial == 0.1 and vit.discriminator.adaptive_weight is False
    probe = get_recipe("vit-vqgan-bb-probe")
    assert probe.model == "vit-vqgan-bb" and probe.tokenizer_loss.perceptual == 0.0
    assert probe.optim == vit.optim and probe.discriminator == vit.discriminator
    assert get_recipe("vit-vqgan-bb-probe-tiny").model == "vit-vqgan-bb-tiny"

    for name in ("vim-base", "vim-large", "stackformer-base"):
        assert get_recipe(name).model_args == {"class_dropout": 0.0}, name     # not in the papers
        assert get_recipe(name + "-tiny").prior_loss.visual_guidance_scale == 1.0
    assert get_recipe("vim-small").model_args == {}       # vqscale's: the demo samples with guidance
    for name in ("vim-base-uncond", "vim-large-uncond"):
        cfg = get_recipe(name)
        assert cfg.model == name.replace("-uncond", "") and cfg.prior_loss.condition == "unconditional"
        assert cfg.optim == get_recipe("vim-base").optim
        assert get_recipe(name + "-tiny").prior_loss.condition == "unconditional"

    mq = get_recipe("mq-vae-f8")
    d, o = mq.discriminator, mq.optim
    assert (d.start_step, d.adaptive_weight, d.adaptive_weight_max) == (0, True, 1.0)
    assert mq.tokenizer_loss.adversarial == 0.75
    assert (mq.global_batch_size, o.betas, o.warmup_steps, o.min_lr_ratio, o.schedule) == (
        240, (0.5, 0.9), 534, 0.0, "cosine")
    assert o.lr == pytest.approx(4.5e-6 * 240) and d.optim == o

    sfm = get_recipe("stackformer-base")
    o, p = sfm.optim, sfm.prior_loss
    assert (o.lr, o.betas, o.weight_decay, o.warmup_steps, o.min_lr_ratio, o.grad_clip) == (
        5e-4, (0.9, 0.95), 0.01, 0, 0.0, 0.0)
    assert (p.visual_top_k, p.visual_top_p, p.visual_position_top_k, p.visual_position_top_p) == (100, 0.95, 10, 0.95)
    assert {"vim-base-uncond-tiny", "vim-large-uncond-tiny", "vit-vqgan-bb-probe-tiny"} <= set(list_recipes())


def test_recipes_docstring_no_longer_credits_class_dropout_to_vim():
    import pretrain.recipes as r

    doc = r.__doc__
    assert "class dropout 0.1 for classifier-free guidance" not in doc
    assert "no class" in doc and "dropout" in doc


# ---- Stackformer: code and position settings ------------------------------------------------------

def test_sampling_config_for_positions():
    s = SamplingConfig(temperature=0.7, top_k=100, top_p=0.95, position_top_k=10, position_top_p=0.9)
    p = s.for_positions()
    assert (p.top_k, p.top_p, p.temperature) == (10, 0.9, 0.7)
    assert SamplingConfig(top_k=5, top_p=0.8).for_positions() == SamplingConfig(top_k=5, top_p=0.8)
    for bad in ({"position_top_k": -1}, {"position_top_p": 0.0}, {"position_top_p": 1.5}):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_stackformer_settings_reach_the_sampler(monkeypatch):
    torch.manual_seed(0)
    model = create_model("stackformer-base-tiny").eval()
    labels, seeds = torch.tensor([1, 2]), torch.tensor([3, 4])
    seen = []
    real = sf.sample_tokens

    def spy(logits, cfg, s, step):
        seen.append((step, cfg.top_k, cfg.top_p))
        return real(logits, cfg, s, step)

    monkeypatch.setattr(sf, "sample_tokens", spy)
    model.generate(labels, 2, SamplingConfig(top_k=100, top_p=0.95, position_top_k=10, position_top_p=0.9), seeds)
    assert len(seen) == 2 * model.num_tokens
    assert all((k, p) == ((100, 0.95) if step % 2 == 0 else (10, 0.9)) for step, k, p in seen)
    monkeypatch.setattr(sf, "sample_tokens", real)
    # top-k 1 is greedy: with the positions' own k = 1 the whole sample is the greedy one; with
    # the positions unfiltered (0) they are drawn, and differ
    greedy = model.generate(labels, 2, SamplingConfig(temperature=0.0), seeds)
    both = model.generate(labels, 2, SamplingConfig(top_k=1, position_top_k=1), seeds)
    assert all(torch.equal(a, b) for a, b in zip(greedy, both))
    drawn = model.generate(labels, 2, SamplingConfig(top_k=1, position_top_k=0, temperature=3.0), seeds)
    assert not torch.equal(drawn[1], greedy[1])


def test_stackformer_recipe_visuals_reach_generate(monkeypatch):
    from pretrain.objectives import PriorObjective

    cfg = get_recipe("stackformer-base-tiny")
    torch.manual_seed(0)
    prior = create_model(cfg.model, **cfg.model_args)
    assert prior.config.class_dropout == 0.0
    got = {}
    real = type(prior).generate

    def spy(self, condition, n, sampling, seeds):
        got["sampling"] = sampling
        return real(self, condition, n, sampling, seeds)

    monkeypatch.setattr(type(prior), "generate", spy)
    obj = PriorObjective(cfg.prior_loss, image_tokenizer=create_model("mq-vae-f8-tiny"))
    codes, positions = torch.zeros(2, 16, dtype=torch.long), torch.arange(16).repeat(2, 1)
    out = obj.visuals({"model": prior}, {"codes": codes, "positions": positions, "label": torch.tensor([0, 1])})
    s = got["sampling"]
    assert (s.top_k, s.top_p, s.position_top_k, s.position_top_p) == (100, 0.95, 10, 0.95)
    assert out["samples"].shape[0] == 2


# ---- rejection sampling -----------------------------------------------------------------------------

def test_rejection_arithmetic_keeps_the_best_scored_fraction():
    assert num_candidates(4, 0.5) == 8 and num_candidates(10, 0.3) == 34 and num_candidates(5, 1.0) == 5
    assert num_candidates(3, 0.1) == 30                     # not 31 from float rounding
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError):
            num_candidates(4, bad)
    scores = torch.tensor([0.3, 0.9, -1.0, 0.9, 0.5, 0.1, 2.0, 0.0])
    kept = keep_best(scores, 4)
    assert kept.tolist() == [1, 3, 4, 6]                    # the 4 best, in candidate order
    assert keep_best(torch.tensor([1.0, 1.0, 1.0]), 2).tolist() == [0, 1]      # ties: earlier first
    with pytest.raises(ValueError):
        keep_best(torch.tensor([0.0, float("nan")]), 1)


def test_rejection_sample_keeps_the_requested_fraction_of_the_best_images():
    from pretrain.sample import SampleError, rejection_sample, run_sample, sample_images

    torch.manual_seed(0)
    tok = create_model("vqgan-f8-tiny").eval()
    prior = create_model("vim-small-tiny", codebook_size=tok.codebook_size, grid_size=tok.grid_size).eval()
    sampling = SamplingConfig(temperature=1.0)
    asked = []

    def brightness(images, labels):        # a "classifier": higher for brighter images
        asked.append(labels.clone())
        return images.float().mean((1, 2, 3))

    kept, _, info = rejection_sample(prior, tok, 4, sampling, brightness, 0.25, seed=3, batch_size=5,
                                     class_label=2, progress=False)
    assert info["candidates"] == 16 and info["acceptance_rate"] == 0.25 and len(info["kept"]) == 4
    every, _ = sample_images(prior, tok, 16, sampling, seed=3, batch_size=5, class_label=2, progress=False)
    scores = every.float().mean((1, 2, 3))
    best = sorted(torch.argsort(scores, descending=True)[:4].tolist())
    assert info["kept"] == best and torch.allclose(kept, every[best], atol=1e-5)
    assert torch.cat(asked).eq(2).all() and len(torch.cat(asked)) == 16
    with pytest.raises(SampleError, match="classifier"):
        run_sample("no-such-prior", "unused.png", 4, class_label=1, acceptance_rate=0.5)


def test_digits_judge_scores_the_requested_digit():
    from evals.digits import load_digits_judge, real_digits

    images, labels = real_digits("heldout")
    images, labels = images[:40], labels[:40]
    judge = load_digits_judge()
    right = judge.score(images, labels)
    wrong = judge.score(images, (labels + 1) % 10)
    assert right.shape == (40,) and (right > wrong).float().mean() > 0.9
    logp = judge.logits(images).float().log_softmax(1)
    assert torch.allclose(judge.score(images, torch.full((40,), -1)), logp.max(1).values, atol=1e-6)
