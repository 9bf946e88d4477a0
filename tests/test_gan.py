"""Adversarial tokenizer training under DeepSpeed ZeRO (pretrain/gan.py), on CPU with gloo.

One 2-process torchrun job (``_job``):

* engines: a tokenizer and its discriminator as two DeepSpeed engines, the generator at ZeRO-1, 2
  and 3 (discriminator at the same stage; ViT-VQGAN + StyleGAN2 also with the discriminator at
  ZeRO-0 and ZeRO-2 under a ZeRO-3 generator), 3 optimizer steps with gradient accumulation 2, the
  discriminator from step 1, LeCam on, R1 on where the discriminator is not ZeRO-3. Each run is
  compared with plain PyTorch on the same per-rank data (AdamW + the same schedule, gradients
  averaged over the ranks by hand): per-micro-batch losses and both models' weights after 3 steps
  must be bit-identical. Then, on the trained engines, one generator step must leave the
  discriminator's whole state dict bit-identical (and change the generator), and one
  discriminator step the generator's (and change the discriminator).
* Trainer: vqgan-f8-tiny + patchgan-tiny at ZeRO-1, 2 and 3 (the discriminator at the same
  stage) for 4 steps with checkpoints at 2 and 4, then a fresh Trainer resumes the step-2
  checkpoint: its losses at steps 3 and 4 and the final weights of both engines (and the
  generator's EMA) must be bit-identical. At ZeRO-2 also: a run that stops before the
  discriminator starts (the discriminator idle) and is then extended must equal the GAN run from the
  start, bit for bit.

In-process: the recipes' discriminators, the refusals at start-up, the adaptive weight against
taming's formula, and the generator/discriminator gradient isolation on plain modules.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time

import numpy as np
import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:      # when run as a script by torch.distributed.run
    sys.path.insert(0, _ROOT)

from tests.launch import torchrun  # noqa: E402

MICRO, GLOBAL, STEPS = 2, 8, 3       # 2 ranks x 2 micro-batches: gradient accumulation 2
# (tokenizer, generator stage, discriminator stage)
ENGINE_CASES = [("vqgan-f8-tiny", 1, 1), ("vqgan-f8-tiny", 2, 2), ("vqgan-f8-tiny", 3, 3),
                ("vit-vqgan-ss-tiny", 3, 2), ("vit-vqgan-ss-tiny", 2, 0)]
TRAINER_STAGES = (1, 2, 3)


# ---- the torchrun job ------------------------------------------------------------------------------

def _disc_cfg(name: str, dstage: int):
    from pretrain.recipes import get_recipe
    from pretrain.runtime import DeepSpeedSettings

    d = get_recipe(name).discriminator
    return dataclasses.replace(d, start_step=1, lecam_weight=0.1, r1_weight=10.0 if dstage < 3 else 0.0, r1_every=2,
                               deepspeed=DeepSpeedSettings(zero_stage=dstage, param_persistence_threshold=0),
                               optim=dataclasses.replace(d.optim, warmup_steps=1, total_steps=10, grad_clip=0.0))


def _engine_case(name: str, gstage: int, dstage: int) -> dict:
    """DeepSpeed engines against plain torch, then the isolation of the two steps."""
    import copy

    import torch.distributed as dist

    from model_zoo.registry import create_model
    from pretrain.gan import GANTokenizerObjective, build_discriminator
    from pretrain.optim import WarmupCosine, weight_decay_groups
    from pretrain.recipes import get_recipe
    from pretrain.runtime import DeepSpeedSettings, build_engine, consolidated_state_dict

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = get_recipe(name)
    dcfg = _disc_cfg(name, dstage)
    gopt = dataclasses.replace(cfg.optim, warmup_steps=1, total_steps=10, grad_clip=0.0)
    lcfg = dataclasses.replace(cfg.tokenizer_loss, perceptual=0.0, contrastive=0.0)
    torch.manual_seed(0)
    # No codebook restarts here (data_init restarts every code at the first step): DeepSpeed's engine
    # writes restarted rows into its master copy and zeroes their Adam moments after the step
    # (pretrain/runtime.py apply_row_writes), which this plain-torch reference does not model;
    # restarts under ZeRO have their own test (tests/test_restarts_zero.py).
    gen, disc = create_model(cfg.model, quantizer={"data_init": False}), build_discriminator(dcfg)
    gen_ds, disc_ds = copy.deepcopy(gen), copy.deepcopy(disc)
    gas = GLOBAL // (MICRO * world)
    size = gen.image_size

    def images(step: int, m: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * step + 10 * rank + m)
        return torch.rand(MICRO, 3, size, size, generator=g) * 2 - 1

    def run(models, objective, backward_step, boundary) -> list[float]:
        losses = []
        for step in range(STEPS):
            for m in range(gas):
                torch.manual_seed(100 * step + 10 * rank + m)
                loss, _ = objective(models, {"image": images(step, m)}, step)
                backward_step("generator", loss)
                if objective.active(step):
                    d_loss, _ = objective.discriminator_step(models, objective.batch_cache, step)
                    backward_step("discriminator", d_loss)
                losses.append(float(loss.detach()))
            boundary(step)
        return losses

    # plain torch: AdamW + LambdaLR, gradients averaged over the ranks at the boundary
    plain = {"generator": gen, "discriminator": disc}
    opts = {}
    for key, model, o in (("generator", gen, gopt), ("discriminator", disc, dcfg.optim)):
        opt = torch.optim.AdamW(weight_decay_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                                weight_decay=o.weight_decay)
        opts[key] = (opt, torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(o.warmup_steps, o.total_steps,
                                                                                o.min_lr_ratio)))
    # DeepSpeed's order of sums: ZeRO-2/3 average each micro-batch's gradients over the ranks as
    # the backward produces them and accumulate the averages; stage 0 and ZeRO-1 accumulate
    # locally and average at the boundary. (Another order differs in the last bit, and a GAN's
    # AdamW turns that into differences of order lr.)
    per_micro = {"generator": gstage >= 2, "discriminator": dstage >= 2}
    acc: dict[str, dict] = {}

    def averaged(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t / world

    def plain_backward(key, loss):
        params = [p for p in plain[key].parameters() if p.requires_grad]
        (loss / gas).backward()
        if per_micro[key]:
            got = acc.setdefault(key, {})
            for i, p in enumerate(params):
                g = averaged(p.grad if p.grad is not None else torch.zeros_like(p))
                got[i] = got[i] + g if i in got else g
                p.grad = None
        else:
            acc.setdefault(key, {})

    def plain_boundary(step):
        for key in sorted(acc):
            opt, sched = opts[key]
            for i, p in enumerate(p for p in plain[key].parameters() if p.requires_grad):
                p.grad = acc[key][i] if per_micro[key] else averaged(
                    p.grad if p.grad is not None else torch.zeros_like(p))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        acc.clear()

    ref_obj = GANTokenizerObjective(lcfg, dcfg)
    ref = run(plain, ref_obj, plain_backward, plain_boundary)

    engines = {"generator": build_engine(gen_ds, gopt, DeepSpeedSettings(zero_stage=gstage,
                                                                         param_persistence_threshold=0),
                                         MICRO, GLOBAL, name="generator")}
    obj = GANTokenizerObjective(lcfg, dcfg)
    obj.bind_discriminator(disc_ds)
    engines["discriminator"] = build_engine(disc_ds, dcfg.optim, dcfg.deepspeed, MICRO, GLOBAL, name="discriminator")

    def ds_backward(key, loss):
        engines[key].backward(loss)
        engines[key].step()

    got = run(engines, obj, ds_backward, lambda step: None)
    g_ds, d_ds = consolidated_state_dict(engines["generator"]), consolidated_state_dict(engines["discriminator"])
    g_ref, d_ref = gen.state_dict(), disc.state_dict()
    out = {"losses_equal": got == ref, "losses": got[-2:], "ref": ref[-2:], "finite": bool(np.isfinite(got).all()),
           "gen_equal": all(torch.equal(g_ds[k], g_ref[k]) for k in g_ref),
           "disc_param_equal": all(torch.equal(d_ds[k], d_ref[k]) for k, _ in disc.named_parameters()),
           "disc_buffers_equal": all(torch.equal(d_ds[k], d_ref[k]) for k in d_ref),
           "gen_maxdiff": max(float((g_ds[k].float() - g_ref[k].float()).abs().max()) for k in g_ref)}

    # isolation on the trained engines: one generator step, then one discriminator step
    caches = []
    d0, g0 = consolidated_state_dict(engines["discriminator"]), consolidated_state_dict(engines["generator"])
    for m in range(gas):
        loss, metrics = obj(engines, {"image": images(STEPS, m)}, STEPS)
        assert "gan/g_loss" in metrics and "gan/adaptive_weight" in metrics
        engines["generator"].backward(loss)
        engines["generator"].step()
        caches.append(obj.batch_cache)
    d1, g1 = consolidated_state_dict(engines["discriminator"]), consolidated_state_dict(engines["generator"])
    for m in range(gas):
        d_loss, _ = obj.discriminator_step(engines, caches[m], STEPS)
        engines["discriminator"].backward(d_loss)
        engines["discriminator"].step()
    d2, g2 = consolidated_state_dict(engines["discriminator"]), consolidated_state_dict(engines["generator"])
    out["g_step_leaves_disc"] = d1.keys() == d0.keys() and all(torch.equal(d0[k], d1[k]) for k in d0)
    out["g_step_moves_gen"] = any(not torch.equal(g0[k], g1[k]) for k, _ in gen.named_parameters())
    out["d_step_leaves_gen"] = g2.keys() == g1.keys() and all(torch.equal(g1[k], g2[k]) for k in g1)
    out["d_step_moves_disc"] = any(not torch.equal(d1[k], d2[k]) for k, _ in disc.named_parameters())
    out["stages"] = [engines["generator"].zero_optimization_stage(), engines["discriminator"].zero_optimization_stage()]
    return out


def _trainer_cfg(images: str, run_dir: str, stage: int, steps: int):
    from pretrain.config import apply_overrides
    from pretrain.recipes import get_recipe

    return apply_overrides(get_recipe("vqgan-f8-tiny"), [
        f"run_dir={run_dir}", f"data.url={images}", f"steps={steps}", f"global_batch_size={GLOBAL}",
        f"micro_batch_size={MICRO}", "data.num_workers=0", f"deepspeed.zero_stage={stage}",
        f"discriminator.deepspeed.zero_stage={stage}", "deepspeed.param_persistence_threshold=0",
        "discriminator.deepspeed.param_persistence_threshold=0", "discriminator.start_step=1",
        "discriminator.lecam_weight=0.1", f"discriminator.r1_weight={10.0 if stage < 3 else 0.0}",
        "discriminator.r1_every=2", "ema.decay=0.9", "checkpoint.every=2", "checkpoint.keep_last=10",
        "log.every=1", "log.progress=false", f"validation.visuals_every={4 if stage == 2 else 0}"])


def _trainer_runs(images: str, out: str) -> dict:
    import torch.distributed as dist

    from pretrain.trainer import Trainer

    res = {}
    for stage in TRAINER_STAGES:
        a, b = os.path.join(out, f"z{stage}"), os.path.join(out, f"z{stage}-resumed")
        ra = Trainer(_trainer_cfg(images, a, stage, 4)).fit()
        if dist.get_rank() == 0:            # "killed" after step 2: the run directory as it was then
            shutil.copytree(a, b)
            shutil.rmtree(os.path.join(b, "checkpoints", "step_00000004"))
            with open(os.path.join(b, "checkpoints", "latest"), "w") as f:
                f.write("step_00000002\n")
            os.remove(os.path.join(b, "metrics.jsonl"))
        dist.barrier()
        rb = Trainer(_trainer_cfg(images, b, stage, 4)).fit()
        res[stage] = {"a": [ra.state, ra.step], "b": [rb.state, rb.step, rb.resumed_from]}
    # extend a run that stopped before the discriminator started (its engine idle)
    c = os.path.join(out, "z2-extended")
    r1 = Trainer(_trainer_cfg(images, c, 2, 1)).fit()
    r2 = Trainer(_trainer_cfg(images, c, 2, 4)).fit()
    res["extended"] = [r1.step, r2.step, r2.resumed_from]
    return res


def _job(images: str, out: str) -> None:
    import torch.distributed as dist

    from pretrain.distributed import init_distributed

    init_distributed(timeout_s=300)
    t0 = time.time()
    res = {"engines": {f"{n}:{g}:{d}": _engine_case(n, g, d) for n, g, d in ENGINE_CASES}}
    res["engines_s"] = time.time() - t0
    res["trainer"] = _trainer_runs(images, out)
    res["total_s"] = time.time() - t0
    if dist.get_rank() == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(res, f)


# ---- the test around it ------------------------------------------------------------------------------

def _losses(run_dir: str) -> dict[int, float]:
    out = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        d = json.loads(line)
        if "loss" in d:
            out[d["step"]] = d
    return out


def _weights(step_dir: str, engine: str) -> dict[str, torch.Tensor]:
    from pretrain.checkpoint import load_consolidated

    return load_consolidated(step_dir, engine)


def _assert_same_weights(a: str, b: str, engines) -> None:
    for engine in engines:
        wa, wb = _weights(a, engine), _weights(b, engine)
        assert wa.keys() == wb.keys(), engine
        diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not diff, (a, b, engine, diff[:5])


@pytest.mark.multiprocess
def test_gan_training_under_zero_1_2_3(tmp_path):
    from data_pipeline.demo import build_demo
    from pretrain.resolve import as_package, ema_state_dict

    images = str(tmp_path / "images")
    build_demo(images, quick=True, progress=False, shard_samples=50)
    out = str(tmp_path / "out")
    os.makedirs(out)
    proc = torchrun(__file__, "job", images, out, timeout=600)
    assert proc.returncode == 0, f"job failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    res = json.load(open(os.path.join(out, "result.json")))

    # engines against plain torch, and the isolation of the two steps
    for case, r in res["engines"].items():
        _, g, d = case.split(":")
        assert r["stages"] == [int(g), int(d)], case
        assert r["finite"], case
        assert r["losses_equal"], (case, r["losses"], r["ref"])
        assert r["gen_equal"] and r["disc_param_equal"] and r["disc_buffers_equal"], (case, r["gen_maxdiff"])
        assert r["g_step_leaves_disc"] and r["g_step_moves_gen"], case
        assert r["d_step_leaves_gen"] and r["d_step_moves_disc"], case

    # the Trainer: both engines in every checkpoint, resume bit-identical
    for stage in TRAINER_STAGES:
        t = res["trainer"][str(stage)]
        assert t["a"] == ["finished", 4] and t["b"] == ["finished", 4, 2], (stage, t)
        a, b = os.path.join(out, f"z{stage}"), os.path.join(out, f"z{stage}-resumed")
        la, lb = _losses(a), _losses(b)
        assert sorted(la) == [1, 2, 3, 4] and sorted(lb) == [3, 4], (stage, sorted(la), sorted(lb))
        assert all(np.isfinite(la[s]["loss"]) and np.isfinite(la[s].get("gan/d_loss", 0.0)) for s in la)
        assert "gan/d_loss" not in la[1] and "gan/g_loss" not in la[1], stage     # before start_step
        for s in (2, 3, 4):
            for k in ("gan/d_loss", "gan/g_loss", "gan/adaptive_weight", "gan/logits_real", "gan/logits_fake",
                      "gan/lecam", "gan/lr"):
                assert k in la[s], (stage, s, k)
        assert ("gan/r1" in la[2]) == (stage < 3) and "gan/r1" not in la[3], stage    # every 2nd disc step
        for s in (3, 4):       # every loss, GAN, codebook and guard metric: bit-identical
            keys = [k for k in la[s] if k.startswith(("loss", "gan/", "codebook/", "psnr", "lr", "grad_norm",
                                                       "guard/", "samples_seen"))]
            assert len(keys) > 15 and lb[s].keys() >= set(keys), (stage, s)
            diff = [(k, la[s][k], lb[s][k]) for k in keys if la[s][k] != lb[s][k]]
            assert not diff, (stage, s, diff)
        sa, sb = os.path.join(a, "checkpoints", "step_00000004"), os.path.join(b, "checkpoints", "step_00000004")
        meta = json.load(open(os.path.join(sa, "meta.json")))
        assert meta["engines"] == {"generator": {"zero_stage": stage, "bf16": False},
                                   "discriminator": {"zero_stage": stage, "bf16": False}}
        assert meta["emas"] == ["generator"] and meta["trainer"]["disc_skipped_steps"] == 0
        _assert_same_weights(sa, sb, ("generator", "discriminator"))
        ea, eb = (ema_state_dict(os.path.join(s, "ema", "generator")) for s in (sa, sb))
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
        da = _weights(sa, "discriminator")
        assert float(da["lecam_ema"][2]) == 1.0        # the LeCam EMAs are in the checkpoint
    assert os.path.exists(os.path.join(out, "z2", "samples", "reconstruction_step_00000004.png"))

    # a run stopped before the discriminator starts has both engines (the layout never depends on
    # the step count); extended, it equals the GAN run
    assert res["trainer"]["extended"] == [1, 4, 1]
    c = os.path.join(out, "z2-extended")
    meta1 = json.load(open(os.path.join(c, "checkpoints", "step_00000001", "meta.json")))
    assert sorted(meta1["engines"]) == ["discriminator", "generator"]
    lc, la = _losses(c), _losses(os.path.join(out, "z2"))
    assert all(lc[s]["loss"] == la[s]["loss"] for s in (1, 2, 3, 4)), [(lc[s]["loss"], la[s]["loss"]) for s in lc]
    _assert_same_weights(os.path.join(c, "checkpoints", "step_00000004"),
                         os.path.join(out, "z2", "checkpoints", "step_00000004"), ("generator", "discriminator"))

    # the resolver exports the generator (its EMA), never the discriminator
    from model_zoo.package import load_package

    model = load_package(as_package(os.path.join(out, "z1"), kind="tokenizer"))
    ema = ema_state_dict(os.path.join(out, "z1", "checkpoints", "step_00000004", "ema", "generator"))
    assert model.registry_name == "vqgan-f8-tiny"
    assert all(torch.equal(model.state_dict()[k].float(), v) for k, v in ema.items())
    assert res["total_s"] < 120, res["total_s"]


if __name__ == "__main__":          # the torchrun job
    if sys.argv[1] == "job":
        _job(*sys.argv[2:4])


# ---- in-process ------------------------------------------------------------------------------------

def test_recipes_set_the_papers_discriminators():
    from model_zoo.registry import create_model, list_models
    from pretrain.recipes import get_recipe

    for name in list_models(kind="tokenizer"):
        for tiny in ("", "-tiny") if not name.endswith("-tiny") else ():
            cfg = get_recipe(name + tiny)
            d = cfg.discriminator
            vit = name.startswith("vit-vqgan")
            assert d.model == ("stylegan2-disc" if vit else "patchgan") + tiny, (name, d.model)
            assert d.loss == ("non_saturating" if vit else "hinge") and d.deepspeed.zero_stage == 2
            assert d.optim.betas == cfg.optim.betas and d.optim.lr == cfg.optim.lr
            if tiny:
                assert d.start_step == cfg.steps // 5 and 0 < d.start_step < cfg.steps
                disc = create_model(d.model, **d.model_args)
                size = create_model(cfg.model).image_size
                assert disc(torch.zeros(2, 3, size, size)).shape[0] == 2
            else:
                assert d.start_step == (0 if vit or name.startswith("mq-vae") else 250_001)
            # ViT-VQGAN: a fixed adversarial weight; MQ-VAE: 0.75 x adaptive weight, clamped to 1.0
            assert d.adaptive_weight == (not vit)
            assert d.adaptive_weight_max == (1.0 if name.startswith("mq-vae") else None)
    assert get_recipe("vit-vqgan-ss").discriminator.r1_weight == 10.0
    assert get_recipe("vim-base").discriminator.model == ""            # priors: no GAN


def test_unsupported_combinations_are_refused_at_start():
    from model_zoo.discriminators import PatchGANConfig, PatchGANDiscriminator
    from pretrain.gan import check_supported
    from pretrain.recipes import get_recipe
    from pretrain.runtime import DeepSpeedSettings

    d = get_recipe("vqgan-f8-tiny").discriminator
    for g in (0, 1, 2, 3):
        for s in (0, 1, 2, 3):
            check_supported(g, dataclasses.replace(d, r1_weight=1.0 if s < 3 else 0.0,
                                                   deepspeed=DeepSpeedSettings(zero_stage=s)))
    with pytest.raises(ValueError, match="generator at ZeRO-4"):
        check_supported(4, d)
    with pytest.raises(ValueError, match="R1"):
        check_supported(2, dataclasses.replace(d, r1_weight=1.0, deepspeed=DeepSpeedSettings(zero_stage=3)))
    with pytest.raises(ValueError, match="ActNorm"):
        check_supported(2, d, PatchGANDiscriminator(PatchGANConfig(ndf=8, n_layers=2, norm="act")))


@pytest.mark.parametrize("name,compiled", [("vqgan-f8-tiny", False), ("vit-vqgan-ss-tiny", False),
                                           ("vit-vqgan-ss-tiny", True)])
def test_adaptive_weight_is_tamings_and_gradients_stay_apart(name, compiled):
    """Also under ``compile=true`` (the module compiled in place, as DeepSpeed's engine.compile
    does), where a last layer inside the compiled graph made the weight silently fall back to 1."""
    from model_zoo import losses as L
    from model_zoo.registry import create_model
    from pretrain.gan import GANTokenizerObjective, build_discriminator
    from pretrain.recipes import get_recipe

    cfg = get_recipe(name)
    dcfg = dataclasses.replace(cfg.discriminator, start_step=0, lecam_weight=0.1, r1_weight=1.0, r1_every=1,
                               adaptive_weight=True)    # (the ViT-VQGAN recipes use a fixed weight)
    lcfg = dataclasses.replace(cfg.tokenizer_loss, perceptual=0.0)
    torch.manual_seed(0)
    gen, disc = create_model(cfg.model), build_discriminator(dcfg)
    if compiled:
        gen.compile()
    x = torch.rand(4, 3, gen.image_size, gen.image_size) * 2 - 1
    obj = GANTokenizerObjective(lcfg, dcfg)
    models = {"generator": gen, "discriminator": disc}
    taming = {}
    ours = obj._adaptive_weight

    def both(tok, out, nll, g):     # taming's formula on the same graph: autograd.grad w.r.t. the weight
        taming["w"] = L.adaptive_weight(nll, g, tok.last_layer())
        taming["g"] = g.detach()
        return ours(tok, out, nll, g)

    obj._adaptive_weight = both
    loss, m = obj(models, {"image": x}, 0)
    assert 0 < float(taming["w"]) < 1e4
    assert float(m["gan/adaptive_weight"]) == pytest.approx(float(taming["w"]), rel=1e-5)
    assert float(m["gan/g_loss"]) == float(taming["g"])
    # the generator's loss reaches no discriminator parameter, and changes none of its buffers
    buffers = {k: v.clone() for k, v in disc.state_dict().items()}
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())
    assert all(torch.equal(buffers[k], v) for k, v in disc.state_dict().items())
    assert gen.last_layer().grad is not None
    gen.zero_grad(set_to_none=True)
    d_loss, dm = obj.discriminator_step(models, obj.batch_cache, 0)
    d_loss.backward()
    assert all(p.grad is None for p in gen.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())
    assert {"gan/d_loss", "gan/logits_real", "gan/logits_fake", "gan/lecam", "gan/r1"} <= set(dm)
    assert all(torch.isfinite(v) for v in dm.values())
    # before start_step: no adversarial term, no discriminator metrics
    late = GANTokenizerObjective(lcfg, dataclasses.replace(dcfg, start_step=5))
    _, m0 = late(models, {"image": x}, 4)
    assert not any(k.startswith("gan/") for k in m0) and not late.active(4) and late.active(5)


@pytest.mark.usefixtures("one_thread")
def test_adversarial_weight_fixed_and_clamped():
    """ViT-VQGAN's fixed weight (adaptive_weight=False: exactly tokenizer_loss.adversarial) and
    MQ-VAE's bound (adaptive_weight_max caps adversarial x adaptive weight, as the official
    disc_weight_max), each on the generator's loss of the same batch."""
    import copy

    from model_zoo.registry import create_model
    from pretrain.gan import GANTokenizerObjective, build_discriminator
    from pretrain.recipes import get_recipe

    cfg = get_recipe("mq-vae-f8-tiny")
    base = dataclasses.replace(cfg.discriminator, start_step=0)
    lcfg = dataclasses.replace(cfg.tokenizer_loss, perceptual=0.0)
    assert (base.adaptive_weight, base.adaptive_weight_max, lcfg.adversarial) == (True, 1.0, 0.75)
    torch.manual_seed(0)
    gen0, disc = create_model(cfg.model, quantizer={"data_init": False}), build_discriminator(base)
    x = torch.rand(4, 3, gen0.image_size, gen0.image_size) * 2 - 1

    def run(dcfg):
        gen = copy.deepcopy(gen0)
        torch.manual_seed(1)
        loss, m = GANTokenizerObjective(lcfg, dcfg)({"generator": gen, "discriminator": disc}, {"image": x}, 0)
        return float(loss.detach()), {k: float(v) for k, v in m.items()}

    free_loss, free = run(dataclasses.replace(base, adaptive_weight_max=None))
    w, g = free["gan/adaptive_weight"], free["gan/g_loss"]
    assert w > 0 and free["gan/adversarial_weight"] == pytest.approx(0.75 * w, rel=1e-6)
    cap = 0.5 * 0.75 * w                                 # a bound the product is above
    capped_loss, capped = run(dataclasses.replace(base, adaptive_weight_max=cap))
    assert capped["gan/adaptive_weight"] == pytest.approx(w, rel=1e-6)
    assert capped["gan/adversarial_weight"] == pytest.approx(cap, rel=1e-6)
    assert capped_loss - free_loss == pytest.approx((cap - 0.75 * w) * g, rel=1e-4, abs=1e-6)
    _, loose = run(dataclasses.replace(base, adaptive_weight_max=10 * 0.75 * w))   # a bound it is under
    assert loose["gan/adversarial_weight"] == pytest.approx(0.75 * w, rel=1e-6)
    fixed_loss, fixed = run(dataclasses.replace(base, adaptive_weight=False, adaptive_weight_max=None))
    assert fixed["gan/adaptive_weight"] == 1.0 and fixed["gan/adversarial_weight"] == pytest.approx(0.75)
    assert fixed_loss - free_loss == pytest.approx((0.75 - 0.75 * w) * g, rel=1e-4, abs=1e-6)
