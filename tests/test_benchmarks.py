"""The benchmark suite runs in its reduced form (``--small``) on a CPU: the training-step
benchmark over every config (the -tiny twins, through the real Trainer and loader, with selective
activation checkpointing), the sampling benchmark (KV cache against the uncached reference, a
batch sweep, the tokenize job), the loaders paced at an H100's step time (data wait) and the
activation-memory count of each checkpointing mode.
What is checked is what must hold whatever the machine's speed, never a timing: every figure is
there and finite, the cached and uncached samples are identical, the FLOPs come from the meta
count, MFU against the matmul ceiling lies in (0, 1.5)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

from tests.launch import ROOT, job_env


def _bench(script: str, out: str, *args: str) -> dict:
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--small", *args, "--out", out],
                         env=job_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    # SeaweedFS's glog lines (I/W/E + date) would fill the message and hide the script's own error
    own = "\n".join(ln for ln in res.stderr.splitlines() if not re.match(r"[IWE]\d{4} ", ln))
    assert res.returncode == 0, (res.stdout[-3000:], own[-5000:])
    return json.load(open(out))


def test_training_step_benchmark_runs_every_config(tmp_path):
    from pretrain.config import apply_overrides
    from pretrain.flops import step_flops_per_sample
    from pretrain.recipes import get_recipe

    r = _bench("bench_train.py", str(tmp_path / "train.json"), "--steps", "3", "--warmup", "1", "--workers", "1",
               "--act-ckpt", "selective")
    assert r["device_type"] == "cpu" and r["matmul"]["flops"] > 0 and r["peak_flops"] is None
    assert [row["config"] for row in r["rows"]] == ["vim-base", "vim-large", "t2i-prior-1b", "vit-vqgan-bb"]
    for row in r["rows"]:
        assert row["recipe"].endswith("-tiny") and row["micro_batch"] == 4 and row["act_ckpt"] == "selective"
        for k in ("step_time_s", "images_per_s", "achieved_tflops", "peak_memory_gb"):
            assert math.isfinite(row[k]) and row[k] > 0, (row["config"], k)
        assert 0 <= row["data_wait_fraction"] < 1 and 0 < row["mfu_vs_matmul"] < 1.5
        assert row["mfu_vs_peak"] is None                     # no datasheet peak for a CPU
        assert (row["tokens_per_s"] is None) == (row["stage"] == "tokenizer")
        cfg = get_recipe(row["recipe"])
        if cfg.stage == "tokenizer":
            cfg = apply_overrides(cfg, ["tokenizer_loss.perceptual_pretrained=false"])
            assert row["flops_per_sample"]["discriminator"] > 0
            assert row["discriminator_steps"] == 3        # the counted GAN FLOPs were spent
        if cfg.stage == "prior" and row["recipe"].startswith("vim"):
            assert row["flops_per_sample"]["total"] == step_flops_per_sample(cfg)["total"]


def test_training_step_benchmark_ab_compares_an_override(tmp_path):
    """``--ab``: the conv VQGAN twin with and without channels-last batches, alternating."""
    r = _bench("bench_train.py", str(tmp_path / "ab.json"), "--configs", "vqgan-f16", "--steps", "2", "--warmup", "1",
               "--workers", "1", "--ab", "data.channels_last=false", "--rounds", "2")
    assert [(row["variant"], row["channels_last"]) for row in r["rows"]] == [
        ("base", True), ("data.channels_last=false", False)] * 2
    assert all(row["discriminator_steps"] == 2 and row["flops_per_sample"]["discriminator"] > 0 for row in r["rows"])
    best = {v: max(row["images_per_s"] for row in r["rows"] if row["variant"] == v) for v in
            ("base", "data.channels_last=false")}
    assert r["ab"]["speedup"]["vqgan-f16"] == best["data.channels_last=false"] / best["base"]


def test_data_wait_benchmark_paces_each_loader_at_its_h100_step(tmp_path):
    from pretrain.config import apply_overrides
    from pretrain.flops import step_flops_per_sample
    from pretrain.recipes import get_recipe

    r = _bench("bench_data_wait.py", str(tmp_path / "wait.json"), "--configs", "vim-large,vit-vqgan-bb")
    assert r["steps"] == 20 and r["peak_tflops"] == 989
    for row, mfu in zip(r["rows"], (0.50, 0.35)):
        cfg = apply_overrides(get_recipe(row["recipe"]), ["tokenizer_loss.perceptual_pretrained=false"]
                              if row["stage"] == "tokenizer" else [])
        step = step_flops_per_sample(cfg)["total"] * row["micro_batch"] / (mfu * 989e12)
        assert math.isclose(row["step_time_s"], step, rel_tol=1e-9), row["config"]
        assert 0 <= row["data_wait_fraction"] < 1 and row["delivered_samples_per_s"] > 0
        assert 0 < row["median_next_ms"] <= row["p90_next_ms"]


def test_sampling_benchmark_cache_sweep_and_tokenize_job(tmp_path):
    r = _bench("bench_sampling.py", str(tmp_path / "sampling.json"), "--device", "cpu")
    assert r["identical_samples"] and r["tokens"] == 256 and r["depth"] == 1
    assert r["cache"]["tokens_per_s"] > 0 and r["no_cache"]["tokens_per_s"] > 0
    assert [b["batch"] for b in r["batches"]] == [1, 4] and all(b["images_per_s"] > 0 for b in r["batches"])
    assert r["tokenize"]["images"] == 64 and r["tokenize"]["images_per_s"] > 0


def test_memory_benchmark_orders_the_checkpointing_modes(tmp_path):
    r = _bench("bench_memory.py", str(tmp_path / "memory.json"))
    by = {(row["config"], row["mode"]): row for row in r["rows"]}
    for name in ("vim-base", "vim-large", "t2i-prior-1b", "vit-vqgan-bb"):
        none, full, sel = (by[name, m] for m in ("none", "full", "selective"))
        assert none["blocks_wrapped"] == 0 and full["blocks_wrapped"] == sel["blocks_wrapped"] > 0
        # full keeps only block inputs; selective keeps matmul/attention outputs; none keeps all
        assert full["saved_bytes"] < sel["saved_bytes"] < none["saved_bytes"], name
        # selective recomputes no matmul; full recomputes each block's forward once more
        assert sel["flops"] == none["flops"] and 1.1 < full["flops"] / none["flops"] < 1.4, name


def test_loader_benchmark_small_form_delivers_every_image(tmp_path):
    """``bench_loader.py --small``: the bare loop, the loader (uint8 and float) and the loader over a
    real SeaweedFS S3 endpoint each deliver every image of the pass; no rate is checked."""
    r = _bench("bench_loader.py", str(tmp_path / "loader.json"))
    assert r["config"]["small"] and r["config"]["images"] == 120 and r["torch"] and r["command"]
    for mode in ("bare", "local", "local_float_cpu", "s3"):
        row = r[mode]
        assert row["images_per_s"] > 0 and math.isfinite(row["images_per_s"]), mode
        if mode != "bare":      # the loader's count starts after its first batch (start-up timed apart)
            assert row["images"] == 120 - 16 and row["defects"] == 0, (mode, row)
    assert r["loader_vs_bare"] > 0 and r["s3_vs_local"] > 0


def test_claims_benchmark_trains_and_measures_each_kind_of_quantizer(tmp_path):
    """``bench_claims.py --small``: a few steps of a restarted VQ, Reg-VQ and FSQ through the real
    Trainer, measured on the held-out split (the figures of benchmarks/RESULTS.md come from this
    script at --steps 150); a fresh run each time even when a run of that name exists."""
    args = ("--steps", "3", "--seeds", "0", "--variants", "vq-restart,regvq,fsq", "--work", str(tmp_path / "w"))
    out = str(tmp_path / "claims.json")
    r = _bench("bench_claims.py", out, *args)
    assert [(row["variant"], row["seed"]) for row in r["rows"]] == [("vq-restart", 0), ("regvq", 0), ("fsq", 0)]
    for row in r["rows"]:
        assert row["images"] > 0 and row["tokens_per_image"] == 64 and row["codebook_size"] == 64, row
        assert 1 <= row["codes_used"] <= 64 and 1.0 <= row["perplexity"] <= 64.0, row
        assert math.isfinite(row["psnr"]) and -1.0 <= row["ssim"] <= 1.0, row
    assert {s["variant"] for s in r["summary"]} == {"vq-restart", "regvq", "fsq"}
    again = _bench("bench_claims.py", out, *args)          # the same runs again: trained anew, not resumed
    assert all(row["final_train_loss"] is not None for row in again["rows"]), again["rows"]


def test_prior_claims_benchmark_compares_stackformer_with_vim(tmp_path):
    """``bench_prior_claims.py --small``: a VQGAN + VIM and an MQ-VAE (keep 0.25) + Stackformer, each
    stage a few steps through the real Trainer and the tokenize job, then held-out bits per image and
    KV-cached sampling time per image of both priors (figures meaningless at this budget)."""
    r = _bench("bench_prior_claims.py", str(tmp_path / "prior_claims.json"), "--seeds", "0", "--work",
               str(tmp_path / "w"))
    rows = {row["side"]: row for row in r["rows"]}
    assert [(row["side"], row["seed"]) for row in r["rows"]] == [("vim", 0), ("stackformer", 0)]
    vim, sf = rows["vim"], rows["stackformer"]
    assert vim["tokens_per_image"] == vim["tokenizer_tokens_per_image"] == 64 and vim["position_bits_per_image"] == 0
    assert sf["tokens_per_image"] == sf["tokenizer_tokens_per_image"] == 16 and sf["keep_ratio"] == 0.25
    for row in (vim, sf):
        assert row["heldout_images"] > 0 and row["prior_params"] > 0 and row["prior_final_loss"] is not None, row
        for k in ("bits_per_image", "bits_per_token", "code_bits_per_image", "sample_s_per_image", "tokenizer_psnr"):
            assert math.isfinite(row[k]) and row[k] > 0, (row["side"], k, row[k])
        assert math.isclose(row["bits_per_image"], row["code_bits_per_image"] + row["position_bits_per_image"])
        assert math.isclose(row["bits_per_token"] * row["tokens_per_image"], row["bits_per_image"])
        # an untrained prior is near uniform: about log2(64) = 6 bits per code, far below 20
        assert 1 < row["code_bits_per_image"] / row["tokens_per_image"] < 20, row
    # Stackformer's positions: between 0 and 20 bits each, masked to the positions that can come next
    assert 0 < sf["position_bits_per_image"] < 20 * 16 and sf["uniform_position_bits"] > 0
    assert {s["side"] for s in r["summary"]["sides"]} == {"vim", "stackformer"}
    claim = r["summary"]["claim"]
    assert len(claim["stackformer_fewer_bits_per_image"]) == 1 and isinstance(claim["direction_holds"], bool)
