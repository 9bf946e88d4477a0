"""benchmarks/gpu_check.py, the one prepared command of a GPU session (issue 22), run in its CPU dry
run: every step with tiny shapes on CPU with gloo, through the same step runner, budgets, JSON
files, reference comparison, resume check and sampling as on the GPU. It runs in CI and never
skips, so the GPU command cannot rot between the sessions that have a GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from benchmarks import gpu_check

_ROOT = gpu_check.ROOT

FAMILIES = ("vit-vqgan", "vqgan-f16", "mq-vae", "vim", "t2i-prior", "stackformer")
STEPS = ["env", *(f"correctness-{f}" for f in FAMILIES), "speed", "ab", "sampling"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in gpu_check._DIST_VARS and k != "OUT"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(_ROOT, "benchmarks", "gpu_check.py"), *args], env=_env(),
                          cwd=_ROOT, capture_output=True, text=True, timeout=timeout)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    t0 = time.time()
    r = _run(["--dry-run", "--out", str(out / "out"), "--work", str(out / "work")], timeout=900)
    wall = time.time() - t0
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    return {"out": str(out / "out"), "stdout": r.stdout, "wall": wall}


def _load(dry_run, name: str) -> dict:
    with open(os.path.join(dry_run["out"], name)) as f:
        return json.load(f)


def test_every_step_is_present_ok_and_in_the_summary_table(dry_run):
    assert sorted(os.listdir(dry_run["out"])) == sorted(
        ["env.json", "correctness.json", "speed.json", "ab.json", "sampling.json", "summary.json", "gpu_check.log"])
    summary = _load(dry_run, "summary.json")
    assert summary["dry_run"] is True
    assert [s["step"] for s in summary["steps"]] == STEPS
    assert {s["step"]: s["status"] for s in summary["steps"]} == {s: "ok" for s in STEPS}, summary
    assert all(0 < s["seconds"] <= s["budget_s"] for s in summary["steps"])
    assert f"{len(STEPS)} of {len(STEPS)} steps ok" in dry_run["stdout"]
    for step in STEPS:      # the table: one line per step, its status and summary
        assert any(line.startswith(step + " ") and " ok " in line for line in dry_run["stdout"].splitlines()), step
    log = open(os.path.join(dry_run["out"], "gpu_check.log")).read()
    assert all(f"===== {s} (budget" in log for s in STEPS)


def test_env_names_every_package_the_gpu_run_imports(dry_run):
    env = _load(dry_run, "env.json")
    assert env["status"] == "ok" and env["missing"] == [] and env["deepspeed_tested"] is True
    assert {"deepspeed", "pydantic", "hjson", "braceexpand", "open_clip_torch", "ftfy"} <= set(env["packages"])
    assert env["deepspeed_accelerator"] == "cpu"


def test_correctness_trains_each_family_under_zero2_and_zero3_against_its_reference(dry_run):
    corr = _load(dry_run, "correctness.json")
    assert sorted(corr["families"]) == sorted(FAMILIES)
    assert corr["tolerance"] == gpu_check.TOLERANCE
    for family, r in corr["families"].items():
        assert r["status"] == "ok", (family, r)
        assert r["reference"]["status"] == "ok" and r["reference"]["tiny"]["precision"] == "fp32"
        runs = r["runs"]
        assert sorted(x["zero_stage"] for x in runs) == [2, 3] and all(x["size"] == "tiny" for x in runs)
        for x in runs:
            assert x["finite"] is True and "error" not in x, (family, x)
            assert x["steps"] == [1, 2, 3, 4] and all(_finite(v) for v in x["losses"].values())
            # the tolerance check ran: fp32 against fp32 on CPU, so it is (all but) exact
            v = x["vs_reference"]
            assert v["within_tolerance"] is True and _finite(v["reference"]) and v["abs_diff"] <= 1e-6, (family, v)
            # resume from the step-2 checkpoint: steps 3 and 4 bit-identical, every loss term
            res = x["resume"]
            assert res["resumed_from"] == 2 and res["steps_logged"] == [3, 4] and res["bit_identical"] is True
            assert sorted(res["per_step"]) == ["3", "4"]
            assert all(p["bit_identical"] and p["max_abs_diff"] == 0.0 and "loss" in p["compared"]
                       for p in res["per_step"].values()), (family, res)
        sample = r["samples"]["tiny"]
        assert sample["ok"] is True and os.path.basename(sample["png"]) == f"{family}-tiny.png"
        assert sample["shape"][0] == 2 and sample["shape"][1] == 3
    # the GAN families' reference and runs compare the discriminator's loss too
    assert "gan/d_loss" in corr["families"]["vit-vqgan"]["runs"][0]["vs_reference"]["per_key"]


def test_speed_ab_and_sampling_report_their_figures(dry_run):
    speed = _load(dry_run, "speed.json")
    assert [r["name"] for r in speed["rows"]] == [n for n, *_ in gpu_check.SPEED] and not speed["errors"]
    for r in speed["rows"]:
        assert _finite(r["images_per_s"]) and r["images_per_s"] > 0 and _finite(r["mfu_vs_matmul"])
        assert 0 <= r["data_wait_fraction"] < 1 and r["micro_batch"] >= 1
    assert [r["act_ckpt"] for r in speed["rows"]] == ["selective"] * 3
    assert speed["rows"][2]["discriminator_steps"] > 0              # ViT-VQGAN with all its losses
    assert speed["rows"][0]["tokens_per_s"] > 0                      # a prior counts tokens
    ab = _load(dry_run, "ab.json")
    want = {f"{c} {v}" for c, v, _ in gpu_check.AB if v != "base"} - set(ab["dry_run_skipped"])
    assert ab["dry_run_skipped"] == ["vim-base compile=true"]
    assert set(ab["ratios"]) == want and all(_finite(x) and x > 0 for x in ab["ratios"].values())
    assert any(r["variant"] == "base" and r["config"] == "vim-base" for r in ab["rows"])
    sampling = _load(dry_run, "sampling.json")
    assert sampling["identical_samples"] is True and sampling["result"]["guidance_scale"] == 2.0
    assert set(sampling["kv_tokens_per_s"]) == {"1", "4"} and all(v > 0 for v in sampling["kv_tokens_per_s"].values())


def test_bf16_trains_a_batchnorm_discriminator_against_its_fp32_reference(tmp_path):
    """The GAN family with a PatchGAN (BatchNorm) in bf16: DeepSpeed casts the parameters but not
    the buffers, and batch norm failed ("expected scalar type BFloat16 but found Float") until the
    runtime cast the norm statistics too; the dry run's --bf16 found it on CPU."""
    r = _run(["--dry-run", "--bf16", "--only", "correctness", "--families", "vqgan-f16", "--out",
              str(tmp_path / "out"), "--work", str(tmp_path / "work")], timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    family = json.load(open(tmp_path / "out" / "correctness.json"))["families"]["vqgan-f16"]
    assert family["status"] == "ok" and family["precision"].startswith("bf16"), family
    for x in family["runs"]:
        assert x["finite"] is True and "error" not in x and x["vs_reference"]["within_tolerance"] is True, x
        assert x["resume"]["bit_identical"] is True and "gan/d_loss" in x["vs_reference"]["per_key"]


def test_a_hung_step_is_killed_at_its_budget_and_the_next_step_still_runs(tmp_path):
    """A step that never ends loses its budget, not the run: its partial result is kept with status
    timeout (and its process group, loader workers included, is killed), the next step runs."""
    env_before = dict(os.environ)
    os.environ["VQSCALE_GPU_CHECK_HANG"] = "env"
    try:
        t0 = time.time()
        r = _run(["--dry-run", "--only", "env,sampling", "--budget-s", "40", "--out", str(tmp_path / "out")],
                 timeout=300)
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]     # not every step was ok
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    status = {s["step"]: s for s in summary["steps"]}
    assert status["env"]["status"] == "timeout" and status["sampling"]["status"] == "ok", summary
    assert status["env"]["seconds"] < status["env"]["budget_s"] + 15
    env = json.load(open(tmp_path / "out" / "env.json"))
    assert env["status"] == "timeout" and env["hung"] is True       # the partial result survived
    assert time.time() - t0 < 120


def test_the_micro_batch_that_fills_memory():
    # probe at 8: 20 GiB stay between steps, the peak is 36 GiB -> 2 GiB per sample
    assert gpu_check.fill_micro(8, 20.0, 36.0, 80.0, fraction=0.85) == 24        # (68 - 20) / 2
    assert gpu_check.fill_micro(8, 20.0, 36.0, 30.0) == 8                        # never below the probe
    assert gpu_check.fill_micro(8, 1.0, 1.0 + 1e-3, 80.0, cap=256) == 256        # capped


def test_budget_shares_group_the_correctness_families():
    steps = gpu_check.step_names(gpu_check.KINDS)
    assert steps == STEPS
    groups = gpu_check.units(steps)
    assert [g[0] for g in groups] == ["env", "correctness-vit-vqgan", "speed", "ab", "sampling"]
    assert groups[1] == [f"correctness-{f}" for f in FAMILIES]
    assert abs(sum(gpu_check.step_share(s) for s in steps) - 1.0) < 1e-9
