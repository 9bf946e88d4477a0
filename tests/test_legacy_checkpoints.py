"""Checkpoints written before a layout change still resume: a GAN recipe that stopped before its
discriminator started trained ONE engine, "model", until 2026-12-07; today a GAN recipe always has
its "generator" and "discriminator" engines. The fixture (tests/data/gan_recipe_stopped_before_its_discriminator,
its README says how it was written) was written by the code of that day; it must load into the
generator (weights and EMA), the discriminator must start as a fresh run's, and the run must go on
with both engines in every later checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from tests.test_trainer import _ROOT, _env, _train_cmd

FIXTURE = os.path.join(_ROOT, "tests", "data", "gan_recipe_stopped_before_its_discriminator")
SMALL = ["model_args.ch_mult=[1,1]", "model_args.z_channels=8", "model_args.attn_resolutions=[]",
         "model_args.quantizer.dim=8", "model_args.quantizer.codebook_size=16"]


def _sets(images: str, steps: int) -> list[str]:
    return [f"data.url={images}", f"steps={steps}", "global_batch_size=4", "data.num_workers=0",
            "validation.visuals_every=0", "log.progress=false", "log.every=1", "checkpoint.every=1",
            "discriminator.start_step=2", *SMALL]


# The Trainer's own setup and resume, then what it loaded, against the fixture's files.
_LOADED = """
import json, sys, torch
from pretrain.checkpoint import load_consolidated
from pretrain.config import apply_overrides
from pretrain.gan import build_discriminator
from pretrain.recipes import get_recipe
from pretrain.resolve import ema_state_dict
from pretrain.runtime import consolidated_state_dict
from pretrain.trainer import Trainer

run, step, sets = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
t = Trainer(apply_overrides(get_recipe("vqgan-f8-tiny"), [f"run_dir={run}", *sets]), progress=False)
t._setup()
resumed = t._resume()
same = lambda a, b: sorted(k for k in a if not torch.equal(a[k].float(), b[k].float()))
gen, saved = consolidated_state_dict(t.engines["generator"]), load_consolidated(step, "model")
ema, saved_ema = t.emas["generator"].full_state_dict(), ema_state_dict(step + "/ema/model")
torch.manual_seed(t.cfg.seed + 1)
fresh = build_discriminator(t.cfg.discriminator).state_dict()
disc = consolidated_state_dict(t.engines["discriminator"])
print(json.dumps({"resumed": resumed, "engines": sorted(t.engines), "weights_differ": same(saved, gen),
                  "keys": sorted(saved) == sorted(gen), "ema_differ": same(saved_ema, ema),
                  "disc_differs_from_fresh": same(fresh, disc)}))
"""


def test_a_single_engine_checkpoint_of_a_gan_recipe_resumes_into_the_generator(tmp_path):
    from data_pipeline.demo import build_demo

    images = str(tmp_path / "images")
    build_demo(images, quick=True, progress=False)
    run = str(tmp_path / "run")
    shutil.copytree(FIXTURE, run)
    step = os.path.join(run, "checkpoints", "step_00000002")
    assert list(json.load(open(os.path.join(step, "meta.json")))["engines"]) == ["model"]

    out = subprocess.run([sys.executable, "-c", _LOADED, run, step, json.dumps(_sets(images, 4))], env=_env(),
                         cwd=_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["resumed"] == 2 and got["engines"] == ["discriminator", "generator"]
    assert got["keys"] and got["weights_differ"] == [] and got["ema_differ"] == []
    assert got["disc_differs_from_fresh"] == []
    assert "holds a single-engine tokenizer: loading it into the generator" in out.stderr

    # ... and trains on: the discriminator from step 3 (start_step 2), both engines saved
    res = subprocess.run(_train_cmd("vqgan-f8-tiny", run, [a for s in _sets(images, 4) for a in ("--set", s)]),
                         env=_env(), cwd=_ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["state"] == "finished" and result["resumed_from"] == 2 and result["step"] == 4
    for n in (3, 4):
        meta = json.load(open(os.path.join(run, "checkpoints", f"step_{n:08d}", "meta.json")))
        assert sorted(meta["engines"]) == ["discriminator", "generator"] and meta["emas"] == ["generator"]
    lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    assert any("gan/d_loss" in d and d["step"] == 3 for d in lines), "the discriminator did not start"
