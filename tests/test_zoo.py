"""The publishing half of the model zoo: ``vqscale zoo export|publish|list|pull`` and
``model_zoo.from_pretrained``.

- export from 2-process ZeRO-2 and ZeRO-3 runs holds exactly the training model's weights
  (gathered inside the job with DeepSpeed's ``GatheredParameters``), also cast to bf16;
- export -> publish to a real S3 (SeaweedFS) -> pull -> from_pretrained reproduces encode/decode
  and samples; a tampered file is refused; two concurrent publishers both land in zoo.json;
- schema version 1 packages load through the upgrade function, newer ones are refused;
- a text prior trained by ``vqscale train`` exports with its encoder named and loads from a zoo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:      # when run as a script by torch.distributed.run
    sys.path.insert(0, _ROOT)

from tests.launch import job_env, torchrun  # noqa: E402

PRIOR = "vim-small-tiny"


def _train_phase(codes: str, tok: str, out: str) -> None:
    """Inside torchrun: train the tiny prior 3 steps at ZeRO-2 and at ZeRO-3 (no EMA), then gather
    the full weights from the live engine and save them from rank 0."""
    import deepspeed
    import torch.distributed as dist

    from pretrain.config import apply_overrides
    from pretrain.recipes import get_recipe
    from pretrain.trainer import Trainer

    for stage in (2, 3):
        cfg = apply_overrides(get_recipe(PRIOR), [
            f"run_dir={out}/z{stage}", f"data.url={codes}", "steps=3", "global_batch_size=8", "micro_batch_size=2",
            "data.num_workers=0", f"deepspeed.zero_stage={stage}", "deepspeed.param_persistence_threshold=0",
            "checkpoint.every=3", "validation.visuals_every=0", "validation.every=0", "ema.decay=0",
            f"tokenizer={tok}", "log.every=1", "log.progress=false"])
        trainer = Trainer(cfg)
        trainer.fit()
        module = trainer.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            full = {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}
        if dist.get_rank() == 0:
            torch.save(full, os.path.join(out, f"gathered_z{stage}.pt"))
        dist.barrier()


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    from model_zoo.package import save_package
    from model_zoo.registry import create_model
    from tests.test_trainer import make_codes

    root = tmp_path_factory.mktemp("zoo-runs")
    codes = make_codes(str(root / "codes"), shards=2, per_shard=16)
    tok = str(root / "tok")
    torch.manual_seed(0)
    save_package(create_model("vqgan-f8-tiny"), tok)
    out = str(root / "out")
    os.makedirs(out)
    res = torchrun(__file__, "train", codes, tok, out, timeout=600)
    assert res.returncode == 0, res.stderr[-5000:]
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [2, 3])
def test_export_of_a_sharded_run_holds_the_training_weights(zero_runs, stage, tmp_path, capsys):
    from model_zoo.package import load_package, read_config
    from pretrain.cli import main

    run = os.path.join(zero_runs, f"z{stage}")
    gathered = torch.load(os.path.join(zero_runs, f"gathered_z{stage}.pt"), weights_only=True)
    out = str(tmp_path / "pkg")
    assert main(["zoo", "export", run, "--out", out]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])   # DeepSpeed may print first
    assert (printed["step"], printed["weights"], printed["dtype"]) == (3, "live", "float32")
    sd = load_package(out).state_dict()
    assert sorted(sd) == sorted(gathered)
    for k, v in gathered.items():
        assert torch.equal(sd[k], v.float()), k
    meta = read_config(out)
    assert meta["schema_version"] == 2 and meta["tokenizer_model"]["name"] == "vqgan-f8-tiny"
    training = meta["card"]["training"]
    assert (training["steps"], training["zero_stage"], training["sequences_seen"]) == (3, stage, 24)
    assert training["tokens_seen"] == 24 * 16 and "train/loss" in meta["card"]["metrics"]
    card = open(os.path.join(out, "README.md")).read()
    assert card.startswith("---\nlibrary_name: vqscale\n") and "## Training" in card and "## Intended use" in card
    # bf16 export: the same weights rounded; an explicit step; EMA asked for but never kept
    assert main(["zoo", "export", run, "--step", "3", "--dtype", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    capsys.readouterr()
    sd16 = load_package(str(tmp_path / "bf16")).state_dict()
    for k, v in gathered.items():
        assert sd16[k].dtype == torch.bfloat16 and torch.equal(sd16[k], v.to(torch.bfloat16)), k
    assert main(["zoo", "export", run, "--ema", "--out", str(tmp_path / "ema")]) == 2
    assert "no EMA weights" in capsys.readouterr().err
    assert main(["zoo", "export", run, "--step", "7", "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint of step 7" in capsys.readouterr().err


# ---- publish, list, pull, from_pretrained -------------------------------------------------------------
def _pair(tmp_path):
    from model_zoo.package import save_package
    from model_zoo.registry import create_model

    torch.manual_seed(0)
    tok = create_model("vqgan-f8-tiny").eval()
    prior = create_model(PRIOR, codebook_size=tok.codebook_size, grid_size=tok.grid_size).eval()
    tok_pkg = save_package(tok, str(tmp_path / "tok"))
    prior_pkg = save_package(prior, str(tmp_path / "prior"), tokenizer=tok_pkg)
    return tok, prior, tok_pkg, prior_pkg


@pytest.mark.s3
def test_round_trip_through_an_s3_zoo(s3_bucket, tmp_path, monkeypatch, capsys):
    from model_zoo import from_pretrained
    from model_zoo.sampling import SamplingConfig, sample_seeds
    from pretrain.cli import main

    tok, prior, tok_pkg, prior_pkg = _pair(tmp_path)
    zoo = f"{s3_bucket}/zoo"
    monkeypatch.setenv("VQSCALE_CACHE", str(tmp_path / "cache"))
    assert main(["zoo", "publish", tok_pkg, "--zoo", zoo]) == 0
    monkeypatch.setenv("VQSCALE_ZOO", zoo)
    assert main(["zoo", "publish", prior_pkg, "--name", "demo-prior"]) == 0
    capsys.readouterr()
    assert main(["zoo", "list", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in entries] == ["demo-prior", "vqgan-f8-tiny"]
    assert entries[0]["tokenizer"]["name"] == "vqgan-f8-tiny" and entries[0]["kind"] == "prior"
    assert main(["zoo", "pull", "demo-prior"]) == 0
    local = capsys.readouterr().out.strip()
    assert local.startswith(str(tmp_path / "cache" / "zoo" / "demo-prior"))
    assert main(["zoo", "pull", "demo-prior"]) == 0 and capsys.readouterr().out.strip() == local   # cached

    images = torch.rand(2, 3, tok.image_size, tok.image_size) * 2 - 1
    got_tok = from_pretrained("vqgan-f8-tiny")
    with torch.no_grad():
        a, b = tok.encode(images), got_tok.encode(images)
        assert torch.equal(a.codes, b.codes)
        assert torch.equal(tok.decode(a.codes), got_tok.decode(b.codes))
    got = from_pretrained("demo-prior")
    assert got.tokenizer.registry_name == "vqgan-f8-tiny" and not any(k.startswith("tokenizer.") for k in got.state_dict())
    cfg = SamplingConfig(temperature=1.0, top_k=8)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        want = prior.generate(labels, 2, cfg, sample_seeds(0, torch.arange(2)))
        codes = got.generate(labels, 2, cfg, sample_seeds(0, torch.arange(2)))
        assert torch.equal(want, codes)
        assert torch.equal(tok.decode(want), got.tokenizer.decode(codes))
    assert from_pretrained(f"{zoo}/packages/demo-prior").tokenizer.registry_name == "vqgan-f8-tiny"   # by URL
    with pytest.raises(ValueError, match="did you mean vqgan-f8-tiny"):
        from_pretrained("vqgan-f8-tin")


def test_a_tampered_package_is_refused(tmp_path, monkeypatch):
    from model_zoo import from_pretrained, zoo
    from model_zoo.package import PackageError

    _, _, tok_pkg, _ = _pair(tmp_path)
    root = str(tmp_path / "zoo")
    zoo.publish(tok_pkg, root)
    weights = os.path.join(root, "packages", "vqgan-f8-tiny", "model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[-1] ^= 1
    open(weights, "wb").write(bytes(data))
    with pytest.raises(PackageError, match="checksum mismatch for model.safetensors"):
        zoo.pull("vqgan-f8-tiny", root, cache=str(tmp_path / "cache"))
    assert not os.path.exists(tmp_path / "cache" / "zoo" / "vqgan-f8-tiny" / zoo.read_entry("vqgan-f8-tiny", root)[
        "checksums_sha256"][:12])                    # nothing half-verified left in the cache
    with pytest.raises(PackageError, match="checksum mismatch"):
        from_pretrained(os.path.join(root, "packages", "vqgan-f8-tiny"))
    with pytest.raises(PackageError, match="checksum mismatch"):
        zoo.publish(os.path.join(root, "packages", "vqgan-f8-tiny"), str(tmp_path / "zoo2"))
    os.remove(os.path.join(tok_pkg, "README.md"))
    with pytest.raises(PackageError, match="missing file README.md"):
        from_pretrained(tok_pkg)


def test_schema_versions_upgrade_or_refuse(tmp_path):
    from model_zoo.package import SCHEMA_VERSION, PackageError, load_package, read_config, write_checksums

    _, _, tok_pkg, prior_pkg = _pair(tmp_path)
    path = os.path.join(prior_pkg, "config.json")
    meta = json.load(open(path))
    assert meta["schema_version"] == SCHEMA_VERSION == 2 and meta["tokenizer_model"]["checksums_sha256"]
    v1 = {k: v for k, v in meta.items() if k not in ("tokenizer_model", "text_encoder")}
    v1["schema_version"] = 1
    json.dump(v1, open(path, "w"))
    write_checksums(prior_pkg)
    up = read_config(prior_pkg)
    assert up["schema_version"] == 2 and up["tokenizer_model"] == {"name": None, "checksums_sha256": None}
    assert load_package(prior_pkg).registry_name == PRIOR
    json.dump({**meta, "schema_version": 3}, open(path, "w"))
    write_checksums(prior_pkg)
    with pytest.raises(PackageError, match="schema_version 3, newer than the 2"):
        load_package(prior_pkg)


def test_text_prior_names_the_encoder_it_expects(tmp_path):
    from model_zoo.package import read_config, save_package
    from model_zoo.registry import create_model

    prior = create_model("t2i-prior-1b-tiny")
    pkg = save_package(prior, str(tmp_path / "t2i"), tokenizer=create_model("vqgan-f8-tiny"))
    enc = read_config(pkg)["text_encoder"]
    assert enc["name"] == prior.config.text_encoder and "not in the package" in enc["weights"]
    assert f"text encoder: {enc['name']}" in open(os.path.join(pkg, "README.md")).read()


def test_a_trained_text_prior_exports_and_loads_with_its_encoder_named(tmp_path):
    """A text prior trained by `vqscale train` (live caption encoding) -> `zoo export` -> a zoo ->
    from_pretrained: the trained weights, the tokenizer alongside, the encoder it expects named in
    config.json and the card, and prompts sample."""
    from model_zoo import from_pretrained, zoo
    from model_zoo.package import read_config, save_package
    from model_zoo.registry import create_model
    from model_zoo.sampling import SamplingConfig
    from pretrain.checkpoint import load_consolidated
    from tests.test_trainer import make_codes

    codes = make_codes(str(tmp_path / "codes"), shards=2, per_shard=16)      # with captions
    tok = str(tmp_path / "tok")
    save_package(create_model("vqgan-f8-tiny"), tok)
    run = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "--recipe", "t2i-prior-1b-tiny", "--run-dir", run]
    for s in (f"data.url={codes}", "steps=2", "checkpoint.every=2", "global_batch_size=8", "data.num_workers=0",
              "validation.visuals_every=0", "validation.every=0", "log.progress=false", f"tokenizer={tok}"):
        cmd += ["--set", s]
    res = subprocess.run(cmd, env=job_env(), cwd=_ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    pkg = str(tmp_path / "pkg")
    res = subprocess.run([sys.executable, "-m", "pretrain.cli", "zoo", "export", run, "--no-ema", "--out", pkg],
                         env=job_env(), cwd=_ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    meta = read_config(pkg)
    with torch.device("meta"):
        preset = create_model("t2i-prior-1b-tiny")
    enc = meta["text_encoder"]
    assert (enc["name"], enc["overrides"]) == (preset.config.text_encoder, dict(preset.config.text_encoder_overrides))
    assert meta["tokenizer_model"]["name"] == "vqgan-f8-tiny" and meta["card"]["training"]["steps"] == 2
    assert f"text encoder: {enc['name']}" in open(os.path.join(pkg, "README.md")).read()
    zoo.publish(pkg, str(tmp_path / "zoo"), name="t2i")
    prior = from_pretrained("t2i", zoo=str(tmp_path / "zoo"))
    assert not prior.training and prior.tokenizer.registry_name == "vqgan-f8-tiny"
    trained = load_consolidated(os.path.join(run, "checkpoints", "step_00000002"))
    sd = prior.state_dict()
    assert sorted(sd) == sorted(k for k in trained if not k.startswith("text_encoder."))
    for k, v in sd.items():
        assert torch.equal(v, trained[k]), k
    s = SamplingConfig(guidance_scale=2.0, temperature=1.0, top_k=0, top_p=1.0)
    codes_out = prior.generate(["pattern 3", "pattern 7"], 2, s, torch.tensor([0, 1]))
    assert codes_out.shape == (2, prior.num_tokens) and int(codes_out.max()) < prior.codebook_size
    assert prior.tokenizer.decode(codes_out).shape[0] == 2

@pytest.mark.s3
@pytest.mark.multiprocess
def test_concurrent_publishers_both_land_in_the_index(s3_bucket, tmp_path):
    """Two processes publish at the same moment (a barrier file releases them) into one S3 zoo."""
    from model_zoo import zoo

    _, _, tok_pkg, prior_pkg = _pair(tmp_path)
    root = f"{s3_bucket}/zoo-concurrent"
    go = tmp_path / "go"
    env = {**job_env(), "VQSCALE_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, __file__, "publish", str(go), pkg, root, name], env=env, cwd=_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pkg, name in ((tok_pkg, "first"), (prior_pkg, "second"))]
    go.write_text("go")
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    from data_pipeline import storage

    index = storage.read_json(f"{root}/zoo.json")
    assert sorted(e["name"] for e in index["entries"]) == ["first", "second"]
    assert [e["name"] for e in zoo.list_entries(root)] == ["first", "second"]


def _publish_phase(go: str, package: str, root: str, name: str) -> None:
    import time

    from model_zoo import zoo

    while not os.path.exists(go):
        time.sleep(0.005)
    zoo.publish(package, root, name=name)


if __name__ == "__main__":
    if sys.argv[1] == "train":
        from pretrain.distributed import init_distributed

        init_distributed(timeout_s=300)
        _train_phase(*sys.argv[2:5])
    elif sys.argv[1] == "publish":
        _publish_phase(*sys.argv[2:6])
