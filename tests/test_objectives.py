"""Tests of pretrain.objectives on the tiny presets (CPU, random LPIPS weights)."""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch

from data_pipeline.codes import collate_codes
from model_zoo import losses as L
from model_zoo.registry import create_model
from model_zoo.text_encoders import to_cached_batch
from pretrain.objectives import (COLLAPSE_METRIC, CaptionTokenizer, CollapseWatch, PriorLossConfig, PriorObjective,
                                 TokenizerLossConfig, TokenizerObjective, build_objective, distance_grid)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZERS = ["vit-vqgan-ss-tiny", "vqgan-f16-tiny", "regvq-f16-tiny", "mq-vae-f8-tiny"]
CAPTIONS = ["a red cat on a sofa", "", "two dogs running on grass", "a lighthouse at night"]


@pytest.fixture(scope="module")
def lpips():
    torch.manual_seed(0)
    return L.LPIPS(pretrained=False)


@pytest.fixture(scope="module")
def vgg19():
    torch.manual_seed(0)
    return L.VGG19Features(pretrained=False)


def _images(tok, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, tok.image_size, tok.image_size, generator=g) * 2 - 1


def _weights(cfg):
    return {k: getattr(cfg, k) for k in ("l1", "l2", "logit_laplace", "perceptual", "quantizer", "prior_kl",
                                         "contrastive")}


def _trainable_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _code_batch(prior, b=3, seed=0, captions=CAPTIONS, embeddings=None, collate=collate_codes):
    """A batch as the code-shard loader gives it (collate_codes over decoded samples)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(b):
        s = {"codes": torch.randint(0, prior.codebook_size, (prior.num_tokens,), generator=g),
             "positions": None, "label": i % 3 - 1, "caption": captions[i], "key": f"k{i}"}
        if hasattr(prior, "num_positions"):   # Stackformer: sorted kept positions
            s["positions"] = torch.randperm(prior.num_positions, generator=g)[: prior.num_tokens].sort().values
        if embeddings is not None:
            s["text_embedding"] = torch.from_numpy(embeddings[i].astype("float32"))
        samples.append(s)
    return collate(samples)


# ------------------------------------------------------------------------------------ tokenizers

@pytest.mark.parametrize("name", TOKENIZERS)
def test_tokenizer_objective_loss_gradients_metrics(name, lpips, vgg19):
    torch.manual_seed(0)
    model = create_model(name)
    obj = TokenizerObjective(TokenizerLossConfig.for_tokenizer(name), perceptual=lpips, contrastive_features=vgg19)
    assert obj.models == ("model",)
    loss, m = obj({"model": model}, {"image": _images(model)}, step=0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = _trainable_grads(model)
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient reaches {missing}"
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) > 0 for g in grads.values()) >= 0.9 * len(grads)
    for k, v in m.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad, k
    for k in ("loss", "loss/perceptual", "loss/quantizer", "loss/commitment", "codebook/usage",
              "codebook/perplexity", "codebook/dead_codes", "psnr", COLLAPSE_METRIC):
        assert k in m, k
    assert 0 < float(m["psnr"]) < 60
    terms = {k for k in m if k.startswith("loss/")}
    if name.startswith("vit-vqgan"):
        assert {"loss/l2", "loss/logit_laplace"} <= terms and "loss/l1" not in terms
    if name.startswith("regvq"):
        assert {"loss/prior_kl", "loss/contrastive"} <= terms
    if name.startswith("mq-vae"):
        # MQ-VAE returns no loss terms of its own: the VQGAN terms plus the quantizer's only.
        assert terms == {"loss/l1", "loss/perceptual", "loss/quantizer", "loss/codebook", "loss/commitment"}
        assert "mqvae/score_mean" in m


@torch.no_grad()   # values only
def test_total_is_the_documented_weighted_sum_regvq(lpips, vgg19):
    """Every term recomputed by hand; the quantizer's loss (commitment weighted by its beta) is
    counted exactly once; prior KL and contrastive carry their weights."""
    torch.manual_seed(0)
    model = create_model("regvq-f16-tiny")
    cfg = dataclasses.replace(TokenizerLossConfig.for_tokenizer("regvq-f16"), l2=0.5, perceptual=0.7, prior_kl=0.3, contrastive=0.2)
    obj = TokenizerObjective(cfg, perceptual=lpips, contrastive_features=vgg19)
    x = _images(model)
    out = model(x)
    torch.manual_seed(123)
    total, nll, terms = obj.losses(out, x, model.grid_size)
    q = out.quant
    beta = model.config.quantizer.beta
    assert float(q.loss) == pytest.approx(float(q.losses["codebook"] + beta * q.losses["commitment"]), rel=1e-6)
    torch.manual_seed(123)   # the contrastive loss samples its patches from the global RNG
    hand = {
        "l1": (out.recon - x).abs().mean(),
        "l2": (out.recon - x).pow(2).mean(),
        "perceptual": lpips(out.recon, x).mean(),
        "quantizer": q.loss,
        "prior_kl": q.losses["prior_kl"],
        "contrastive": L.ProbabilisticContrastiveLoss(256, 0.07)(
            vgg19(out.recon), vgg19(x), q.sample_distances.view(2, *model.grid_size)),
    }
    assert set(terms) == set(hand)
    for k in hand:
        assert float(terms[k]) == pytest.approx(float(hand[k]), rel=1e-4, abs=1e-6), k
    w = _weights(cfg)
    assert float(total) == pytest.approx(sum(w[k] * float(hand[k]) for k in hand), rel=1e-5)
    assert float(nll) == pytest.approx(sum(w[k] * float(hand[k]) for k in ("l1", "l2", "perceptual")), rel=1e-5)
    # Not double-counted: adding the commitment again would change the total by beta * commitment.
    rest = float(total) - sum(w[k] * float(hand[k]) for k in hand if k != "quantizer")
    assert rest == pytest.approx(float(q.loss), rel=1e-4)
    assert abs(rest - float(q.loss + beta * q.losses["commitment"])) > 1e-4


def test_call_total_matches_logged_terms(lpips):
    torch.manual_seed(0)
    model = create_model("vit-vqgan-ss-tiny")
    cfg = TokenizerLossConfig(l1=0.3)
    loss, m = TokenizerObjective(cfg, perceptual=lpips)({"model": model}, {"image": _images(model)}, 0)
    loss = loss.detach()
    w = _weights(cfg)
    expect = sum(w[k[5:]] * float(v) for k, v in m.items() if k[5:] in w)
    assert float(loss) == pytest.approx(expect, rel=1e-5)
    assert float(m["loss/quantizer"]) == pytest.approx(float(m["loss/codebook"] + 0.25 * m["loss/commitment"]), rel=1e-5)


@torch.no_grad()   # values only
def test_logit_laplace_term_is_the_nll_of_the_tokenizer_params():
    torch.manual_seed(0)
    model = create_model("vit-vqgan-ss-tiny")
    obj = TokenizerObjective(TokenizerLossConfig(perceptual=0.0))
    x = _images(model)
    out = model(x)
    _, _, terms = obj.losses(out, x, model.grid_size, model.config.logit_laplace_eps)
    p = out.extra["logit_laplace_params"]
    assert p.shape[1] == 6
    ref = L.logit_laplace_nll(x, p[:, :3], p[:, 3:], eps=model.config.logit_laplace_eps)
    assert float(terms["logit_laplace"]) == pytest.approx(float(ref), rel=1e-6)
    # Through __call__ the tokenizer's own eps is used.
    # (data_init off: the first training forward would restart the codebook, and the second forward
    # below would then quantize to other codes than the objective's)
    eps_model = create_model("vit-vqgan-ss-tiny", logit_laplace_eps=0.05, quantizer={"data_init": False})
    torch.manual_seed(1)
    _, m = obj({"model": eps_model}, {"image": x}, 0)
    torch.manual_seed(1)
    p = eps_model(x).extra["logit_laplace_params"]
    assert float(m["loss/logit_laplace"]) == pytest.approx(float(L.logit_laplace_nll(x, p[:, :3], p[:, 3:], eps=0.05)), rel=1e-5)
    # A tokenizer without the parameters: the term is skipped, once-warned.
    plain = create_model("vit-vqgan-ss-tiny", logit_laplace=False)
    with pytest.warns(UserWarning, match="logit-Laplace"):
        _, m = obj({"model": plain}, {"image": x}, 0)
    assert "loss/logit_laplace" not in m and "loss/l2" in m


def test_zero_weights_remove_terms():
    torch.manual_seed(0)
    model = create_model("regvq-f16-tiny")
    cfg = TokenizerLossConfig(l1=0.0, l2=0.0, logit_laplace=0.0, perceptual=0.0, prior_kl=0.0, contrastive=0.0)
    obj = TokenizerObjective(cfg)
    assert obj.lpips is None                   # nothing needs it: not even built
    loss, m = obj({"model": model}, {"image": _images(model)}, 0)
    assert {k for k in m if k.startswith("loss/")} == {"loss/quantizer", "loss/codebook", "loss/commitment"}
    assert float(m["loss"]) == pytest.approx(float(m["loss/quantizer"]), rel=1e-6)
    assert "codebook/prior_kl" in m            # still computed by the quantizer: logged, not trained
    loss.backward()
    assert model.decoder.conv_out.weight.grad is None   # the decoder gets nothing from the quantizer


def test_adversarial_hook():
    torch.manual_seed(0)
    model = create_model("vqgan-f16-tiny")
    x = _images(model)
    cfg = TokenizerLossConfig(perceptual=0.0, logit_laplace=0.0)
    with pytest.raises(NotImplementedError):
        TokenizerObjective(cfg)({"model": model, "discriminator": torch.nn.Identity()}, {"image": x}, 0)

    class WithGenerator(TokenizerObjective):    # what the GAN objective will do
        def adversarial_term(self, models, out, images, nll, step):
            assert nll.requires_grad
            g = -out.recon.mean()
            w = L.adaptive_weight(nll, g, models["model"].last_layer())
            return self.cfg.adversarial * w * g, {"loss/g": g.detach(), "adaptive_weight": w}

    torch.manual_seed(0)
    base, m0 = TokenizerObjective(cfg)({"model": model}, {"image": x}, 0)
    torch.manual_seed(0)
    loss, m = WithGenerator(cfg)({"model": model}, {"image": x}, 0)
    added = cfg.adversarial * float(m["adaptive_weight"]) * float(m["loss/g"])
    assert float(loss.detach()) == pytest.approx(float(base.detach()) + added, rel=1e-5)
    assert float(m["loss"]) == pytest.approx(float(loss.detach()))


def test_collapse_is_reported_when_it_persists_not_on_one_log_point():
    w = CollapseWatch(every=50)
    # step 1 measures the initial codebook (data_init replaces it right after): not a warning
    assert [w.update(s, f) for s, f in ((1, True), (5, False), (10, False))] == [False, False, False]
    # a collapse that stays: reported at its second log point, then once per 50 steps
    got = [s for s in range(15, 200, 5) if w.update(s, True)]
    assert got == [20, 70, 120, 170], got
    # it recovers, then collapses again: reported again once it persists
    assert not w.update(200, False) and not w.update(205, True) and w.update(210, True) is False   # within 50 of 170
    assert w.update(225, True)


def test_collapse_warning_and_distance_grid():
    torch.manual_seed(0)
    model = create_model("mq-vae-f8-tiny")
    x = _images(model)
    for thr, flag in ((1.01, 1.0), (0.0, 0.0)):
        cfg = dataclasses.replace(TokenizerLossConfig.for_tokenizer("mq-vae-f8"), perceptual=0.0, collapse_warning_usage=thr)
        _, m = TokenizerObjective(cfg)({"model": model}, {"image": x}, 0)
        assert float(m[COLLAPSE_METRIC]) == flag
    out = model.eval()(x)
    assert out.quant.sample_distances is None and not distance_grid(out, model.grid_size).any()  # samples nothing
    out.quant.sample_distances = torch.rand_like(out.quant.distances) + 0.1   # as a sampling quantizer's
    grid = distance_grid(out, model.grid_size)
    flat = grid.flatten(1)
    assert grid.shape == (2, *model.grid_size)
    assert torch.equal(flat.gather(1, out.tokens.positions), out.quant.sample_distances.float())
    keep = out.extra["keep_mask"]
    assert (flat[~keep] == 0).all()


def test_validation_is_eval_and_leaves_the_codebook_alone(lpips):
    torch.manual_seed(0)
    model = create_model("mq-vae-f8-tiny").train()   # EMA codebook: training forwards update it
    obj = TokenizerObjective(TokenizerLossConfig.for_tokenizer("mq-vae-f8"), lpips)
    before = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    v = obj.validation({"model": model}, {"image": _images(model)}, 5)
    assert model.training and all(isinstance(x, float) and math.isfinite(x) for x in v.values())
    after = model.quantizer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ["vit-vqgan-ss-tiny", "mq-vae-f8-tiny"])
def test_tokenizer_visuals(name):
    model = create_model(name).train()
    obj = TokenizerObjective(TokenizerLossConfig(perceptual=0.0, num_visuals=3))
    v = obj.visuals({"model": model}, {"image": _images(model, b=4)})
    img = v["reconstruction"]
    panels = 3 if name.startswith("mq-vae") else 2   # input | recon (| kept positions)
    assert img.shape == (3, 3, model.image_size, panels * model.image_size)
    assert img.min() >= -1 and img.max() <= 1 and model.training


def test_optimizer_steps_lower_tokenizer_loss(lpips):
    torch.manual_seed(0)
    model = create_model("vit-vqgan-ss-tiny")
    obj = TokenizerObjective(TokenizerLossConfig(), perceptual=lpips)
    batch = {"image": _images(model, b=4, seed=3)}
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = obj.validation({"model": model}, batch, 0)
    for step in range(6):
        loss, _ = obj({"model": model}, batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = obj.validation({"model": model}, batch, 6)
    # (the logit-Laplace NLL can be negative: compare the total and the L2 term separately)
    assert last["loss"] < 0.9 * first["loss"] and last["loss/l2"] < first["loss/l2"], (first, last)


# ---------------------------------------------------------------------------------------- priors

@pytest.mark.parametrize("name", ["vim-small-tiny", "t2i-prior-1b-tiny", "stackformer-base-tiny"])
def test_prior_objective_loss_gradients_metrics(name):
    torch.manual_seed(0)
    prior = create_model(name)
    obj = build_objective("prior")
    batch = _code_batch(prior)
    loss, m = obj({"model": prior}, batch, 0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = _trainable_grads(prior)
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    if name.startswith("t2i"):                     # the frozen text encoder is not trained
        assert all(p.grad is None for p in prior.text_encoder.parameters())
    assert {"loss", "loss/code_ce", "accuracy/code", "bits_per_token"} <= set(m)
    assert float(m["bits_per_token"]) == pytest.approx(float(loss.detach()) / math.log(2), rel=1e-6)
    assert 0 <= float(m["accuracy/code"]) <= 1
    if name.startswith("stackformer"):
        assert float(m["loss"]) == pytest.approx(float(m["loss/code_ce"] + m["loss/position_ce"]), rel=1e-6)
        assert 0 <= float(m["accuracy/position"]) <= 1
    else:
        assert float(m["loss"]) == pytest.approx(float(m["loss/code_ce"]), rel=1e-6)
    # The objective's loss IS the prior's own ``loss`` (same condition-dropout and dropout draws).
    cond = obj.condition(prior, batch)
    for mode in ("train", "eval"):
        getattr(prior, mode)()
        torch.manual_seed(5)
        loss, m = obj({"model": prior}, batch, 0)
        torch.manual_seed(5)
        ref, terms = prior.loss(batch["codes"], cond, batch["positions"])
        assert float(loss.detach()) == float(ref.detach()), mode
        for k, v in terms.items():
            key = {"code_accuracy": "accuracy/code", "position_accuracy": "accuracy/position"}.get(k, f"loss/{k}")
            assert float(m[key]) == pytest.approx(float(v), rel=1e-6), (mode, k)


def test_condition_dropout_placement_is_pinned():
    """Every prior drops its condition in ``forward`` (training mode), so the objective, which
    calls ``forward`` through the engine, and the prior's own ``loss`` drop it alike; this pins
    the fact for VIM and Stackformer."""
    codes = torch.randint(0, 64, (4, 16))
    no_dropout = {"dropout": 0.0, "width": 64, "depth": 2, "heads": 2, "mlp_dim": 256}
    vim = create_model("vim-small-tiny", class_dropout=0.999, transformer=no_dropout).train()
    labels = torch.tensor([1, 2, 3, 4])
    torch.manual_seed(0)
    dropped = vim(codes, labels)
    assert torch.equal(dropped, vim.eval()(codes, torch.full((4,), -1)))         # forward drops
    assert not torch.equal(vim(codes, labels), dropped)                            # eval: labels kept
    torch.manual_seed(0)
    _, m = PriorObjective()({"model": vim.train()}, {"codes": codes, "label": labels}, 0)
    with torch.no_grad():
        null = torch.nn.functional.cross_entropy(vim(codes, torch.full((4,), -1)).flatten(0, 1), codes.flatten())
    assert float(m["loss/code_ce"]) == pytest.approx(float(null), rel=1e-6)    # ...in the objective too
    sf = create_model("stackformer-base-tiny", class_dropout=0.999, code_transformer=no_dropout,
                      position_transformer=no_dropout).train()
    pos = torch.stack([torch.randperm(64)[:16].sort().values for _ in range(4)])
    dropped = sf(codes, labels, pos)[0]
    assert torch.equal(dropped, sf.eval()(codes, torch.full((4,), -1), pos)[0])  # forward drops


def test_stackformer_position_accuracy_uses_the_mask():
    torch.manual_seed(0)
    prior = create_model("stackformer-base-tiny").eval()
    batch = _code_batch(prior)
    m = PriorObjective().validation({"model": prior}, batch, 0)
    with torch.no_grad():
        _, pos_logits = prior(batch["codes"], batch["label"], batch["positions"])
    acc = (pos_logits.argmax(-1) == batch["positions"]).float().mean()
    assert m["accuracy/position"] == pytest.approx(float(acc))


def test_t2i_cached_embeddings_tokens_and_captions_agree():
    torch.manual_seed(0)
    prior = create_model("t2i-prior-1b-tiny", caption_dropout=0.0)   # train mode, dropout on
    hidden, mask = prior.text_encoder.encode_text(CAPTIONS[:3])
    cached = _code_batch(prior, embeddings=to_cached_batch(hidden, mask))
    assert cached["text_embedding"].dim() == 3 and "text_mask" in cached
    raw = {k: v for k, v in cached.items() if k not in ("text_embedding", "text_mask")}
    # Tokenized in a worker: a pickled CaptionTokenizer wrapping the loader's collate.
    collate = pickle.loads(pickle.dumps(CaptionTokenizer.for_prior(prior).wrap(collate_codes)))
    tokenized = _code_batch(prior, collate=collate)
    assert torch.equal(tokenized["text_tokens"], prior.text_encoder.tokenize(CAPTIONS[:3]))
    obj, losses = PriorObjective(), []
    for batch in (raw, tokenized, cached):
        torch.manual_seed(7)                      # the same dropout draws for each
        losses.append(float(obj({"model": prior}, batch, 0)[0].detach()))
    assert losses[0] == losses[1]
    assert losses[2] == pytest.approx(losses[0], abs=2e-3)   # float16 cache vs live states


def test_unconditional_prior_objective():
    torch.manual_seed(0)
    prior = create_model("vim-small-tiny", class_dropout=0.0).eval()
    batch = _code_batch(prior)
    obj = PriorObjective(PriorLossConfig(condition="unconditional"))
    with torch.no_grad():
        loss, _ = obj({"model": prior}, batch, 0)
        ref, _ = prior.loss(batch["codes"], torch.full((3,), -1))
    assert float(loss) == pytest.approx(float(ref))


def test_optimizer_steps_lower_prior_loss():
    torch.manual_seed(0)
    prior = create_model("stackformer-base-tiny")
    obj = PriorObjective()
    batch = _code_batch(prior, seed=4)
    opt = torch.optim.Adam([p for p in prior.parameters() if p.requires_grad], lr=3e-3)
    first = obj.validation({"model": prior}, batch, 0)
    for step in range(15):
        loss, _ = obj({"model": prior}, batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = obj.validation({"model": prior}, batch, 15)
    assert last["loss"] < 0.8 * first["loss"], (first, last)
    assert last["loss/code_ce"] < first["loss/code_ce"] and last["loss/position_ce"] < first["loss/position_ce"]


@pytest.mark.parametrize("name,tok", [("vim-small-tiny", "vqgan-f16-tiny"), ("t2i-prior-1b-tiny", "vqgan-f16-tiny"),
                                      ("stackformer-base-tiny", "mq-vae-f8-tiny")])
def test_prior_visuals(name, tok):
    torch.manual_seed(0)
    prior, tokenizer = create_model(name).train(), create_model(tok)
    obj = build_objective("prior", PriorLossConfig(num_visuals=2), image_tokenizer=tokenizer)
    v = obj.visuals({"model": prior}, _code_batch(prior))
    s = v["samples"]
    assert s.shape == (2, 3, tokenizer.image_size, tokenizer.image_size)
    assert s.min() >= -1 and s.max() <= 1 and prior.training
    again = obj.visuals({"model": prior}, _code_batch(prior))["samples"]
    assert torch.equal(s, again)                  # fixed seeds: the same samples every time
    assert PriorObjective().visuals({"model": prior}, _code_batch(prior)) == {}


# --------------------------------------------------------------------------------------- factory

def test_build_objective_and_presets(lpips):
    assert isinstance(build_objective("tokenizer", perceptual=lpips), TokenizerObjective)
    assert isinstance(build_objective("prior"), PriorObjective)
    with pytest.raises(ValueError):
        build_objective("gan")
    with pytest.raises(TypeError):
        build_objective("prior", TokenizerLossConfig())
    with pytest.raises(TypeError):
        build_objective("tokenizer", PriorLossConfig())
    vit = TokenizerLossConfig.for_tokenizer("vit-vqgan-sl")
    assert (vit.l2, vit.perceptual, vit.logit_laplace, vit.adversarial, vit.quantizer) == (1.0, 0.1, 0.1, 0.1, 1.0)
    taming = TokenizerLossConfig.for_tokenizer("vqgan-f16")
    assert (taming.l1, taming.l2, taming.perceptual, taming.adversarial) == (1.0, 0.0, 1.0, 0.8)
    assert TokenizerLossConfig.for_tokenizer("regvq-f16-tiny").prior_kl > 0
    assert TokenizerLossConfig.for_tokenizer("mq-vae-f8").adversarial == 0.75
    with pytest.raises(ValueError):
        TokenizerLossConfig.for_tokenizer("vim-base")
    with pytest.raises(dataclasses.FrozenInstanceError):
        vit.l2 = 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TokenizerLossConfig()   # plain construction warns about nothing


# ------------------------------------------------------------------------------- DeepSpeed ZeRO-3

_NO_DROPOUT = {"dropout": 0.0, "width": 64, "depth": 2, "heads": 2, "mlp_dim": 256}


def _zero3_prior():
    torch.manual_seed(0)
    return create_model("stackformer-base-tiny", class_dropout=0.0, code_transformer=_NO_DROPOUT,
                        position_transformer=_NO_DROPOUT)


class _StackformerTinyShape:   # what _code_batch reads from a prior, without building one
    codebook_size, num_tokens, num_positions = 64, 16, 64


def _zero3_batch(rank: int, i: int) -> dict:
    return _code_batch(_StackformerTinyShape, b=2, seed=100 * rank + i)


def _zero3_worker(out: str) -> None:
    """Run by torchrun (2 ranks, gloo): the objective on a ZeRO-3 engine, 2 steps x 2 micro-batches."""
    import importlib

    import deepspeed
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # The CPU accelerator JIT-builds a shared-memory kernel only inference collectives use.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    prior = _zero3_prior()
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    engine = deepspeed.initialize(model=prior, model_parameters=list(prior.parameters()), config=cfg,
                                  optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))[0]
    obj = PriorObjective(PriorLossConfig(num_visuals=2), image_tokenizer=create_model("mq-vae-f8-tiny"))
    for i in range(4):
        loss, _ = obj({"model": engine}, _zero3_batch(rank, i), i)
        engine.backward(loss)
        engine.step()
    samples = obj.visuals({"model": engine}, _zero3_batch(rank, 0))["samples"]   # every rank: gathers
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        params = {k: v.detach().clone() for k, v in engine.module.named_parameters()}
    if rank == 0:
        torch.save({"params": params, "samples": samples}, os.path.join(out, "zero3.pt"))
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_prior_objective_on_a_zero3_engine_matches_plain_torch(tmp_path):
    """Through engine.forward the ZeRO-3 update is the plain-torch one (calling the bare module's
    ``loss`` instead leaves it ~2e-2 off with DeepSpeed 0.19.8), and visuals sample a sharded prior."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": _ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
           "--rdzv-endpoint=127.0.0.1:0", os.path.abspath(__file__), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(tmp_path / "zero3.pt")
    # Plain torch: SGD on the mean over 2 ranks x 2 micro-batches.
    prior, obj = _zero3_prior(), PriorObjective(PriorLossConfig(num_visuals=2), image_tokenizer=create_model("mq-vae-f8-tiny"))
    opt = torch.optim.SGD(prior.parameters(), lr=0.1)
    for step in range(2):
        opt.zero_grad()
        for rank in range(2):
            for i in (2 * step, 2 * step + 1):
                (obj({"model": prior}, _zero3_batch(rank, i), i)[0] / 4).backward()
        opt.step()
    for k, v in prior.named_parameters():
        assert torch.allclose(got["params"][k], v.detach(), atol=1e-6), k
    ref = obj.visuals({"model": prior}, _zero3_batch(0, 0))["samples"]
    assert got["samples"].shape == ref.shape == (2, 3, 64, 64)
    assert torch.allclose(got["samples"], ref, atol=1e-4)


if __name__ == "__main__":   # torchrun entry of the ZeRO-3 test
    _zero3_worker(sys.argv[1])
