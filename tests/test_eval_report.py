"""evals/report.py: every eval's JSON also lands in TensorBoard, at the evaluated checkpoint's step,
so a sweep over checkpoints reads as curves."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from PIL import Image

from evals.report import checkpoint_step, scalars, sibling_url, write_result
from model_zoo.package import save_package
from model_zoo.registry import create_model


def _events(tb_dir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_scalars_flatten_one_level_and_skip_descriptions():
    r = {"task": "x", "psnr": 21.5, "rfid": None, "lpips": float("nan"), "ok": True,
         "codebook": {"usage": 0.5, "counts": [1, 2], "dead": 3}, "layers": {"0": 0.25, "1": 0.75},
         "protocol": {"num_images": 10}, "seconds": 4.0, "notes": ["a"]}
    assert scalars(r) == {"psnr": 21.5, "codebook/usage": 0.5, "codebook/dead": 3.0, "layers/0": 0.25,
                          "layers/1": 0.75}
    assert sibling_url("s3://b/run/evals/probe.json", "_grid.png") == "s3://b/run/evals/probe_grid.png"


def test_results_of_two_checkpoints_make_one_curve(tmp_path):
    tok = create_model("vqgan-f8-tiny")
    pkgs = {}
    for step in (4, 8):
        pkgs[step] = save_package(tok, str(tmp_path / f"pkg{step}"), card_extra={"step": step})
    hand_made = save_package(tok, str(tmp_path / "plain"))
    assert checkpoint_step(pkgs[8]) == 8 and checkpoint_step(hand_made) is None and checkpoint_step(None) is None
    out_dir = tmp_path / "evals"
    out_dir.mkdir()
    for step in (4, 8):
        png = str(out_dir / f"codebook_{step}_histogram.png")
        Image.fromarray(np.full((6, 10, 3), step * 20, np.uint8)).save(png)
        out = str(out_dir / f"codebook_{step}.json")
        r = write_result({"protocol": {"task": "codebook"}, "codebook": {"usage": step / 10}}, out,
                         {"histogram": png}, pkgs[step])
        assert r["step"] == step and r["files"]["json"] == out
        on_disk = json.load(open(out))
        assert on_disk["step"] == step and on_disk["files"]["tensorboard"] == str(out_dir / "tb")
    acc = _events(str(out_dir / "tb"))
    usage = acc.Scalars("eval/codebook/codebook/usage")
    assert [(e.step, round(e.value, 6)) for e in usage] == [(4, 0.4), (8, 0.8)]
    images = acc.Images("eval/codebook/histogram")
    assert sorted(e.step for e in images) == [4, 8] and (images[0].width, images[0].height) == (10, 6)
    # no TensorBoard when asked not to; a hand-made package logs at step 0 and records None
    r = write_result({"task": "t", "v": 1.0}, str(tmp_path / "quiet.json"), tensorboard=False)
    assert "tensorboard" not in r["files"] and not (tmp_path / "tb").exists()
    r = write_result({"task": "t", "v": math.pi}, str(tmp_path / "plain.json"), package=hand_made)
    assert r["step"] is None and _events(str(tmp_path / "tb")).Scalars("eval/t/v")[0].step == 0


def test_a_real_eval_logs_its_plots(tmp_path):
    """evaluate_codebook through write_result: its histogram and usage at the package's step."""
    from evals.codebook import evaluate_codebook
    from tests.datasets import make_dataset

    data = str(tmp_path / "data")
    make_dataset(data, [6])
    torch.manual_seed(0)
    pkg = save_package(create_model("vqgan-f8-tiny"), str(tmp_path / "pkg"), card_extra={"step": 12})
    r = evaluate_codebook(pkg, data, str(tmp_path / "ev" / "cb.json"), batch_size=4, device="cpu",
                          progress=False, num_workers=0)
    acc = _events(r["files"]["tensorboard"])
    assert acc.Scalars("eval/codebook/codebook/usage")[0].step == 12
    assert acc.Scalars("eval/codebook/codebook/usage")[0].value == np.float32(r["codebook"]["usage"])
    assert [e.step for e in acc.Images("eval/codebook/histogram")] == [12]
