"""The step contract between the Trainer and its objectives (pretrain/step.py), on plain-torch
engines that keep DeepSpeed's engine interface (backward, step at the accumulation boundary,
``skipped_steps``): a step against a hand-written AdamW loop (the reference), the GAN's engines
(the discriminator idle before its start step), the guard's flags and the report's counts. The
same contract on real DeepSpeed engines runs in tests/test_trainer.py and tests/test_gan.py."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from data_pipeline.codes import collate_codes
from model_zoo.registry import create_model
from pretrain.components import Guard
from pretrain.objectives import PriorObjective
from pretrain.step import MicroBatches, Objective, StepReport


class TorchEngine(nn.Module):
    """DeepSpeed's engine interface over plain torch: the loss divided by the accumulation steps,
    the optimizer stepped at the boundary, a step with a non-finite gradient skipped and counted."""

    def __init__(self, module: nn.Module, gas: int, lr: float = 1e-2):
        super().__init__()
        self.module, self.gas, self.micro, self.skipped_steps = module, gas, 0, 0
        self.opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.gas).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.gas:
            return
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if all(torch.isfinite(g).all() for g in grads):
            self.opt.step()
        else:
            self.skipped_steps += 1
        self.opt.zero_grad(set_to_none=True)


def _vim():
    torch.manual_seed(0)
    return create_model("vim-small-tiny", class_dropout=0.0, transformer={"dropout": 0.0})


def _batches(prior, n: int, b: int = 3):
    g = torch.Generator().manual_seed(1)
    return [collate_codes([{"codes": torch.randint(0, prior.codebook_size, (prior.num_tokens,), generator=g),
                            "positions": None, "label": i % 3, "caption": "", "key": f"k{j}-{i}"}
                           for i in range(b)]) for j in range(n)]


def test_a_prior_step_equals_a_handwritten_adamw_loop():
    prior = _vim()
    ref = copy.deepcopy(prior)
    batches = _batches(prior, 4)
    engine = TorchEngine(prior, gas=2)
    obj = PriorObjective()
    reports = [obj.train_step({"model": engine}, batches[i:i + 2], step) for step, i in enumerate((0, 2))]

    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for i in (0, 2):
        for batch in batches[i:i + 2]:
            loss, _ = ref.loss(batch["codes"], batch["label"])
            (loss / 2).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for (name, p), q in zip(prior.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, msg=name)

    r = reports[0]
    assert isinstance(r, StepReport) and r.samples == 6 and r.tokens == 6 * prior.num_tokens
    assert set(r.engines) == {"model"} and r.engines["model"].learned and not r.engines["model"].skipped
    assert not bool(r.engines["model"].nonfinite)
    # the metrics are the means over the micro-batches
    with torch.no_grad():
        first = [PriorObjective()({"model": _vim()}, b, 0)[1]["loss"] for b in batches[:2]]
    assert float(r.metrics["loss"]) == pytest.approx(float(sum(first) / 2), rel=1e-5)


def test_poison_is_flagged_skipped_and_counted_by_the_guard():
    prior = _vim()
    before = {k: v.clone() for k, v in prior.state_dict().items()}
    engine = TorchEngine(prior, gas=2)
    guard = Guard(("model",), max_consecutive_skips=2)
    obj = PriorObjective()
    for step in range(2):
        report = obj.train_step({"model": engine}, _batches(prior, 2), step, poison=True)
        assert report.engines["model"].skipped and bool(report.engines["model"].nonfinite)
        assert report.metrics["loss"].isfinite()          # the metrics are of the loss before the poison
        assert guard.observe(step + 1, report) is False       # no EMA update after a skipped step
    assert all(torch.equal(before[k], v) for k, v in prior.state_dict().items())
    guard.settle()
    assert guard.counters == {"skipped_steps": 2, "consecutive_skips": 2, "nonfinite_losses": 2}
    assert guard.diverged() == (2, "")


def test_micro_batches_time_count_and_record_keys():
    prior = _vim()
    batches = _batches(prior, 3)
    for b in batches:
        b["epoch"] = torch.zeros(len(b["key"]), dtype=torch.long)
    micro = MicroBatches(iter(batches), 2, keys=True)
    report = PriorObjective().train_step({"model": TorchEngine(prior, gas=2)}, micro, 0)
    assert report.keys == [(f"k{j}-{i}", 0) for j in range(2) for i in range(3)]
    assert report.samples == 6 and report.data_wait_s >= 0
    with pytest.raises(KeyError, match="needs the engines"):
        PriorObjective().train_step({"generator": TorchEngine(prior, gas=1)}, batches[:1], 0)


def test_the_gan_discriminator_idles_before_its_start_step():
    from pretrain.gan import GANTokenizerObjective, build_discriminator
    from pretrain.recipes import get_recipe

    cfg = get_recipe("vqgan-f8-tiny")
    dcfg = dataclasses.replace(cfg.discriminator, start_step=1, r1_weight=0.0)
    torch.manual_seed(0)
    gen, disc = create_model(cfg.model), build_discriminator(dcfg)
    obj = GANTokenizerObjective(dataclasses.replace(cfg.tokenizer_loss, perceptual=0.0), dcfg)
    assert isinstance(obj, Objective) and obj.models == ("generator", "discriminator")
    engines = {"generator": TorchEngine(gen, gas=2, lr=1e-3), "discriminator": TorchEngine(disc, gas=2, lr=1e-3)}
    x = [{"image": torch.rand(2, 3, gen.image_size, gen.image_size) * 2 - 1} for _ in range(2)]
    d0 = {k: v.clone() for k, v in disc.state_dict().items()}
    idle = obj.train_step(engines, x, 0)
    assert idle.engines["generator"].learned and not idle.engines["discriminator"].learned
    assert idle.engines["discriminator"].nonfinite is None and not any(k.startswith("gan/") for k in idle.metrics)
    assert all(torch.equal(d0[k], v) for k, v in disc.state_dict().items())
    guard = Guard(obj.models, max_consecutive_skips=3)
    guard.observe(1, idle)
    active = obj.train_step(engines, x, 1)
    assert active.engines["discriminator"].learned and {"gan/d_loss", "gan/g_loss"} <= set(active.metrics)
    assert not all(torch.equal(d0[k], v) for k, v in disc.state_dict().items())
    guard.observe(2, active)
    guard.settle()
    assert guard.counters["disc_nonfinite_losses"] == 0 and guard.metrics()["guard/disc_skipped_steps"] == 0.0
