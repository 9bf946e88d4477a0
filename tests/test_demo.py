"""`vqscale demo --quick` end to end, as CI runs it: data -> tiny ViT-VQGAN -> tokenize -> tiny VIM ->
class-conditional grid, with TensorBoard logs; a second run resumes (skips) the finished stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from pretrain.demo import DemoConfig

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_ENV = {**os.environ, "PYTHONPATH": _ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "DS_ACCELERATOR": "cpu"}
_CMD = [sys.executable, "-m", "pretrain.cli", "demo", "--quick"]
# The quick demo takes 1-2 minutes on 2 idle cores; a machine shared with another job can make it
# several times slower. Limits far above that still end a real hang (pytest's own timeout counts the
# module fixture in the first test that uses it).
DEMO_TIMEOUT_S = 1800
pytestmark = pytest.mark.timeout(DEMO_TIMEOUT_S + 1200)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The quick demo, run once for this module: (its working directory, the first run's output)."""
    cwd = tmp_path_factory.mktemp("demo")
    first = subprocess.run(_CMD, cwd=cwd, env=_ENV, capture_output=True, text=True,
                           timeout=DEMO_TIMEOUT_S)
    assert first.returncode == 0, first.stderr[-5000:]
    return cwd, first


@pytest.mark.multiprocess
def test_demo_quick_end_to_end_and_resume(demo):
    tmp_path, first = demo
    run = tmp_path / "runs" / "demo"
    summary = json.loads((run / "demo_summary.json").read_text())
    assert "[demo] sample grid:" in first.stdout and "tensorboard --logdir runs/demo" in first.stdout
    # a trained tokenizer and prior, as run directories with checkpoints, metrics and TensorBoard
    for stage in ("tokenizer", "prior"):
        info = summary[stage]
        steps = getattr(DemoConfig(), f"quick_{stage}_steps")
        assert info["trained_now"] and info["step"] == steps
        rd = run / stage
        assert json.loads((rd / "status.json").read_text())["state"] == "finished"
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(rd / "tb"))
        assert (rd / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
        assert os.listdir(rd / "samples")
    # it learned something: the tokenizer reconstructs, the prior beats a uniform guess (6 bits/code)
    tok_m, prior_m = summary["tokenizer"]["metrics"], summary["prior"]["metrics"]
    assert tok_m["psnr"] > 15, tok_m
    assert prior_m["bits_per_code"] < 5.5, prior_m
    # the tokenizer package the tokenize job used, and the codes it wrote
    codes = json.loads((run / "codes" / "train" / "manifest.json").read_text())
    assert codes["tokenizer"]["name"] == "vit-vqgan-ss-tiny" and codes["grid_size"] == [8, 8]
    tok_step = DemoConfig().quick_tokenizer_steps
    assert (run / "tokenizer" / "checkpoints" / f"step_{tok_step:08d}" / "package" / "checksums.sha256").exists()
    # the grid: one row of 8 samples per class (20 classes) at 32 px
    grid = Image.open(run / "samples" / "demo_grid.png")
    assert grid.size == (8 * 34 + 2, 20 * 34 + 2)
    # the offline metrics it ends with: the digits judge recognises the requested digit well above
    # chance (10%), the probe and pixel baseline ran, JSON and plots are written
    # Floors well below the range measured over seeds (README) but far from what a collapsed
    # tokenizer gave (accuracy 0.14, 4 of 64 codes, 15.5 dB on another machine): they catch
    # collapse, not a machine's rounding.
    ev = summary["evals"]
    assert ev["digits_class_accuracy"] > 0.3 and ev["digits_fid"] > 0, ev
    assert ev["holdout_psnr"] > 17 and ev["probe_pixel_baseline"] > 0.5, ev
    # The tokenizer does not collapse (issue 19): held-out usage was 73% (47 of 64) with the
    # preset's 100-step usage horizon and 64 of 64 with the demo's 10-step one (README: the range
    # over seeds); the floor sits below every measured seed and above the old value. Nor does
    # training warn of collapse (a collapse that persists over two log points, CollapseWatch).
    assert 0.8 < ev["codebook_usage"] <= 1, ev
    assert "codebook collapse" not in first.stdout + first.stderr
    for stage, name in (("prior", "generation.json"), ("prior", "generation_grid.png"), ("prior", "linear_probe.json"),
                        ("prior", "linear_probe.png"), ("tokenizer", "reconstruction.json"), ("prior", "tb"),
                        ("tokenizer", "tb")):
        assert (run / stage / "evals" / name).exists(), (stage, name)
    assert "[demo] offline metrics" in first.stdout
    # its last line: held-out usage as codes of the codebook, then the other offline figures
    last = first.stdout.strip().splitlines()[-1]
    assert last.startswith(f"[demo] held-out codebook usage {ev['codebook_used']} of {ev['codebook_size']} codes"), last
    assert "PSNR" in last and "digits class accuracy" in last, last
    # a second run resumes rather than redoes
    second = subprocess.run(_CMD, cwd=tmp_path, env=_ENV, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    assert second.returncode == 0, second.stderr[-5000:]
    assert second.stdout.count("not trained again") == 2
    again = json.loads((run / "demo_summary.json").read_text())
    assert not again["tokenizer"]["trained_now"] and not again["prior"]["trained_now"]
    assert again["seconds"]["tokenizer"] < 10 and again["seconds"]["prior"] < 10
    assert again["evals"] == ev                                       # nothing retrained: results reused


def _scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.multiprocess
def test_every_eval_runs_on_the_demo_checkpoints(demo, tmp_path, capsys, monkeypatch):
    """`vqscale eval ...` on the demo run's checkpoints (run directories and a step folder): JSON,
    plots and TensorBoard scalars at the checkpoints' steps. FID with an Inception network of random
    weights loaded from a file (the path real weights take; no download here); LPIPS and rFID,
    whose weights are not in the (empty) cache, are skipped with notes."""
    from evals.inception import random_state_dict
    from pretrain.cli import main

    run = demo[0] / "runs" / "demo"
    monkeypatch.setenv("VQSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ev = tmp_path / "ev"
    steps = DemoConfig().quick_tokenizer_steps, DemoConfig().quick_prior_steps

    def vq_eval(metric: str, *args: str) -> dict:
        rc = main(["eval", metric, *args, "--device", "cpu", "--out", str(ev / f"{metric}.json")]
                  if metric != "ref-stats" else ["eval", metric, *args, "--device", "cpu"])
        out = capsys.readouterr()
        assert rc == 0, out.err[-3000:]
        return json.load(open(ev / f"{metric}.json")) if metric != "ref-stats" else {}

    rec = vq_eval("reconstruction", "--ckpt", str(run / "tokenizer"), "--data", str(run / "data-holdout"))
    assert rec["step"] == steps[0] and rec["psnr"] > 15 and rec["lpips"] is None and rec["rfid"] is None
    assert os.path.exists(rec["files"]["grid"]) and os.path.exists(rec["files"]["codebook_histogram"])
    early = sorted(d for d in os.listdir(run / "tokenizer" / "checkpoints") if d.startswith("step_"))[0]   # not the latest
    cb = vq_eval("codebook", "--ckpt", str(run / "tokenizer" / "checkpoints" / early), "--data", str(run / "data"))
    assert cb["step"] == int(early.split("_")[1]) < steps[0] and os.path.exists(cb["files"]["histogram"])
    assert cb["codebook"]["images"] == json.loads((run / "demo_summary.json").read_text())["data"]["samples"]

    weights = tmp_path / "inception-random.pth"
    torch.save(random_state_dict(0), weights)
    vq_eval("ref-stats", "--data", str(run / "data-holdout"), "--out", str(ev / "ref.npz"),
            "--inception-weights", str(weights), "--max-images", "24", "--resolution", "32")
    gen = vq_eval("generation", "--ckpt", str(run / "prior"), "--num-samples", "20", "--batch-size", "10",
                  "--class-labels", "0-9", "--guidance", "2", "--digits-judge", "--ref-stats", str(ev / "ref.npz"),
                  "--inception-weights", str(weights))
    p = gen["protocol"]
    assert gen["step"] == steps[1] and p["condition"]["class_labels"] == list(range(10))
    assert p["num_samples"] == 20 and p["sampling"]["guidance"] == 2.0 and p["resize"]
    assert gen["fid"] > 0 and gen["is_mean"] >= 1 and 0 <= gen["class_accuracy"] <= 1 and gen["digits_fid"] > 0
    assert os.path.exists(gen["files"]["grid"])
    probe = vq_eval("linear-probe", "--ckpt", str(run / "prior"), "--data", str(run / "codes" / "train"),
                    "--test-data", str(run / "codes" / "holdout"), "--images-train", str(run / "data"),
                    "--images-test", str(run / "data-holdout"), "--max-samples", "400")
    assert probe["step"] == steps[1] and probe["kind"] == "prior" and probe["pixel_baseline"]["top1"] > 0.3
    assert len(probe["layers"]) >= 2 and os.path.exists(probe["files"]["plot"])
    # one TensorBoard folder next to the JSON files, each metric at its checkpoint's step
    tb = _scalars(ev / "tb")
    assert tb["eval/reconstruction/psnr"] == [(steps[0], pytest.approx(rec["psnr"], rel=1e-6))]
    assert tb["eval/codebook/codebook/usage"][0][0] == cb["step"]
    assert tb["eval/generation/fid"][0][0] == steps[1] and "eval/generation/class_accuracy" in tb
    assert tb["eval/linear-probe/layers/0"][0][0] == steps[1]


@pytest.mark.multiprocess
def test_an_eval_sweep_over_the_demo_checkpoints_runs_as_a_slurm_array(demo, slurm_cluster, tmp_path):
    """`vqscale submit --sweep` on a real Slurm: one `eval codebook` array task per tokenizer
    checkpoint of the demo, their results side by side in one TensorBoard curve."""
    from tests.launch import job_env

    run = demo[0] / "runs" / "demo"
    steps = sorted(d.split("_")[1] for d in os.listdir(run / "tokenizer" / "checkpoints") if d.startswith("step_"))
    assert len(steps) >= 2
    ev = tmp_path / "ev"
    cmd = [sys.executable, "-m", "pretrain.cli", "submit", "--cluster", "slurm", "--sweep", f"step={','.join(steps)}",
           "--job-dir", str(tmp_path / "job"), "--wait", "--",
           "eval", "codebook", "--ckpt", str(run / "tokenizer" / "checkpoints" / "step_{step}"),
           "--data", str(run / "data-holdout"), "--out", str(ev / "codebook_{step}.json"), "--device", "cpu"]
    out = subprocess.run(cmd, env={**job_env(), **slurm_cluster.env()}, cwd=_ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    ids = [json.loads(x)["job_id"] for x in out.stdout.splitlines() if x.startswith("{")]
    assert len(ids) == len(steps) and len({i.split("_")[0] for i in ids}) == 1          # one array job
    for s in steps:
        r = json.load(open(ev / f"codebook_{s}.json"))
        assert r["step"] == int(s) and r["protocol"]["ckpt"].endswith(f"step_{s}") and 0 < r["codebook"]["usage"] <= 1
    curve = _scalars(ev / "tb")["eval/codebook/codebook/usage"]
    assert sorted(step for step, _ in curve) == [int(s) for s in steps]


@pytest.mark.multiprocess
def test_the_demo_models_go_through_a_zoo(demo, tmp_path, capsys, monkeypatch):
    """`vqscale zoo export` of the demo's tokenizer and prior, `zoo publish` into a zoo, and
    `from_pretrained` by name: the same codes, images and samples as the run's own checkpoints."""
    from model_zoo import from_pretrained
    from model_zoo.package import load_package, load_prior_with_tokenizer
    from model_zoo.sampling import SamplingConfig, sample_seeds
    from pretrain.cli import main
    from pretrain.resolve import as_package

    from model_zoo import create_model
    from model_zoo.package import save_package

    run = demo[0] / "runs" / "demo"
    # run from a directory holding another runs/demo/tokenizer (a user's `make demo` in the checkout):
    # the prior's recorded relative setting must not pick it up (issue 17: decoded by the wrong tokenizer)
    torch.manual_seed(1)
    save_package(create_model("vit-vqgan-ss-tiny").eval(), str(tmp_path / "cwd" / "runs" / "demo" / "tokenizer"))
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("VQSCALE_ZOO", str(tmp_path / "zoo"))
    monkeypatch.setenv("VQSCALE_CACHE", str(tmp_path / "cache"))
    for stage in ("tokenizer", "prior"):
        assert main(["zoo", "export", str(run / stage), "--out", str(tmp_path / "export" / stage)]) == 0
        assert main(["zoo", "publish", str(tmp_path / "export" / stage), "--name", f"demo-{stage}"]) == 0
    capsys.readouterr()
    assert main(["zoo", "list"]) == 0
    listing = capsys.readouterr().out
    assert "demo-prior" in listing and "demo-tokenizer" in listing
    card = (tmp_path / "export" / "prior" / "README.md").read_text()
    assert "generation/class_accuracy" in card and "linear-probe/best_top1" in card     # the demo's evals
    tok = from_pretrained("demo-tokenizer")
    prior = from_pretrained("demo-prior")
    ref_tok = load_package(as_package(str(run / "tokenizer")))
    ref_prior, _ = load_prior_with_tokenizer(as_package(str(run / "prior")))
    images = torch.rand(4, 3, tok.image_size, tok.image_size) * 2 - 1
    labels = torch.tensor([0, 3, 7, 12])
    cfg = SamplingConfig(temperature=1.0, guidance_scale=2.0)
    with torch.no_grad():
        assert torch.equal(tok.encode(images).codes, ref_tok.encode(images).codes)
        codes = prior.generate(labels, 4, cfg, sample_seeds(0, torch.arange(4)))
        assert torch.equal(codes, ref_prior.generate(labels, 4, cfg, sample_seeds(0, torch.arange(4))))
        assert torch.equal(prior.tokenizer.decode(codes), ref_tok.decode(codes))
