"""No host-device synchronization in the training hot loop.

On a GPU, ``.item()``, ``bool(t)``, ``int(t)``, ``float(t)`` or ``.tolist()`` of a device tensor
makes the host wait for the device: the launch queue drains and the GPU idles until the host
catches up. vqscale reads values back only at log intervals and checkpoints. This is checked here
without a GPU: a real training run (a prior, a text prior and a GAN tokenizer, -tiny twins, one
process) has those methods of ``torch.Tensor`` wrapped, and every call made from vqscale's own
code (``pretrain/``, ``model_zoo/``) inside the training step (``Objective.train_step``) is recorded by its call site.
The only sites allowed are ones that read host tensors by design, listed below with the reason.
DeepSpeed's own reads (its overflow and gradient-norm checks) are outside vqscale and not counted.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.launch import job_env  # noqa: E402

# call sites that read host tensors on purpose (labels straight from the loader, a host draw)
HOST_SIDE = {
    "model_zoo/interfaces.py:class_labels",        # the range check of loader labels, before the copy
    "model_zoo/t2i_prior.py:_drop_captions",       # the caption-dropout draw is made on the host
}
# deliberate device reads, one per step, each cheaper than what it saves
DELIBERATE = {
    # the longest caption's length cuts the text context of a prefix-conditioned prior to the
    # real tokens (one read early in the forward; keeping all 77 positions instead would add up
    # to 57 padding tokens, about 5% of a 1,024-token step's FLOPs)
    "model_zoo/t2i_prior.py:_compact",
    # whether a dead-code restart wrote any row, read after engine.step: an all-False write would
    # cost three all-reduces of the full codebook (pretrain/runtime.py _row_writes_after_step)
    "pretrain/runtime.py:step",
}
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
OURS = (os.path.join(_ROOT, "pretrain") + os.sep, os.path.join(_ROOT, "model_zoo") + os.sep)


def _record_phase(recipe: str, data: str, tok: str, out: str) -> None:
    import torch

    from pretrain.config import apply_overrides
    from pretrain.recipes import get_recipe
    from pretrain.step import Objective
    from pretrain.trainer import Trainer

    sites: collections.Counter = collections.Counter()
    active = [False]

    def wrap(name: str) -> None:
        orig = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            if active[0]:
                caller = sys._getframe(1).f_code
                if caller.co_filename.startswith(OURS):
                    sites[f"{os.path.relpath(caller.co_filename, _ROOT)}:{caller.co_name}"] += 1
            return orig(self, *a, **k)

        setattr(torch.Tensor, name, read)

    for name in READS:
        wrap(name)
    real_step = Objective.train_step

    def step(self, *args, **kwargs):
        active[0] = True
        try:
            return real_step(self, *args, **kwargs)
        finally:
            active[0] = False

    Objective.train_step = step
    sets = [f"run_dir={out}/run", f"data.url={data}", "steps=4", "global_batch_size=8", "micro_batch_size=4",
            "data.num_workers=0", "validation.every=0", "validation.visuals_every=0", "log.progress=false",
            "checkpoint.every=100", "log.every=100"]
    cfg = get_recipe(recipe)
    if cfg.stage == "prior":
        sets.append(f"tokenizer={tok}")
    else:
        sets += ["discriminator.start_step=0", "discriminator.r1_every=2"]
    Trainer(apply_overrides(cfg, sets), progress=False).fit()
    with open(os.path.join(out, "sites.json"), "w") as f:
        json.dump(dict(sites), f)


@pytest.mark.parametrize("recipe", ["vim-small-tiny", "t2i-prior-1b-tiny", "vit-vqgan-ss-tiny"])
def test_the_training_step_reads_nothing_back_from_the_device(recipe, tmp_path):
    from model_zoo.package import save_package
    from model_zoo.registry import create_model
    from tests.test_trainer import make_codes

    if recipe.startswith("vit"):
        from data_pipeline.demo import build_demo

        data = str(tmp_path / "images")
        build_demo(data, quick=True, progress=False)
    else:
        data = make_codes(str(tmp_path / "codes"), shards=2, per_shard=16)
    tok = str(tmp_path / "tok")
    save_package(create_model("vqgan-f8-tiny"), tok)
    res = subprocess.run([sys.executable, __file__, recipe, data, tok, str(tmp_path)], env=job_env(), cwd=_ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-5000:]
    sites = json.load(open(tmp_path / "sites.json"))
    assert set(sites) <= HOST_SIDE | DELIBERATE, f"host syncs in the training step: {sites}"


if __name__ == "__main__":
    from pretrain.distributed import init_distributed

    init_distributed(timeout_s=300)
    _record_phase(*sys.argv[1:5])
