"""``vqscale tokenize`` (pretrain/tokenize_job.py): image shards -> code shards.

Real images (the demo dataset: digits and photos at 64/128 px, 11 shards of 40), tiny tokenizers
saved as real zoo packages, the job run in process, through the CLI in a subprocess and under a
real 2-process torchrun (gloo). Codes are checked against the tokenizer's own ``encode`` of
independently preprocessed images; a crash (an exception, or a real SIGKILL of the CLI) and a
re-run must give exactly the clean run's shards without rewriting finished ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from data_pipeline import storage
from data_pipeline.codes import code_loader
from data_pipeline.demo import build_demo
from data_pipeline.images import (decode_image, image_bytes, read_caption, read_label, read_metadata,
                                  resize_crop)
from data_pipeline.shards import iter_shard, make_manifest
from model_zoo import create_model
from model_zoo.package import CHECKSUMS, load_package, save_package
from pretrain.cli import main as cli_main
from pretrain.tokenize_job import CRASH_ENV, GUARD, TokenizeError, run_tokenize
from tests.datasets import make_dataset, sample_files, write_raw_tar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = "vit-vqgan-ss-tiny"   # 32 px, 8x8 tokens, 64 codes


def _package(path, name: str = TOKENIZER, seed: int = 0) -> str:
    torch.manual_seed(seed)
    return save_package(create_model(name), str(path))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The demo dataset, a tokenizer package and one clean in-process run over it."""
    root = tmp_path_factory.mktemp("tok")
    data = str(root / "data")
    build_demo(data, quick=True, shard_samples=40, progress=False)
    pkg = _package(root / "pkg")
    clean = str(root / "clean")
    summary = run_tokenize(pkg, data, clean, batch_size=16, progress=False)
    return {"root": root, "data": data, "pkg": pkg, "clean": clean, "summary": summary}


def _shards(root: str) -> dict[str, bytes]:
    return {n: open(os.path.join(root, n), "rb").read() for n in sorted(os.listdir(root)) if n.endswith(".tar")}


def _samples(url: str) -> dict[str, dict[str, bytes]]:
    out = {}
    for _i, key, files in iter_shard(url):
        assert key not in out, f"duplicate key {key} in {url}"
        out[key] = files
    return out


def _preprocess(data: bytes, resolution: int) -> torch.Tensor:
    img = resize_crop(decode_image(data, resolution), resolution, "center", None)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1.0


def _cli(*args: str, env_extra: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "pretrain.cli", "tokenize", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _summary(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- codes

def test_every_sample_once_with_the_tokenizers_codes(world):
    data, clean, summary = world["data"], world["clean"], world["summary"]
    tok = load_package(world["pkg"])
    image_manifest = storage.read_json(os.path.join(data, "manifest.json"))
    names = [e["name"] for e in image_manifest["shards"]]
    assert len(names) == 11 and sorted(_shards(clean)) == sorted(names)   # one code shard per image shard
    assert summary["shards_done"] == 11 and summary["shards_skipped"] == 0 and summary["samples"] == 420
    assert summary["defects"]["total"] == 0 and summary["images_per_s"] > 0

    all_keys = []
    for name in names:
        images = _samples(os.path.join(data, name))
        codes = _samples(os.path.join(clean, name))
        assert list(codes) == list(images)          # same samples, same (tar) order
        all_keys += list(codes)
        x = torch.stack([_preprocess(image_bytes(f), 32) for f in images.values()])
        with torch.no_grad():
            want = tok.encode(x).codes            # one batch of 40: the job used batches of 16
        for i, (key, files) in enumerate(codes.items()):
            got = np.load(io.BytesIO(files["codes.npy"]))
            assert got.dtype == np.int32 and got.shape == (64,)
            assert np.array_equal(got, want[i].numpy()), (name, key)
            assert "pos.npy" not in files and "txtemb.npy" not in files
            assert int(files["cls"]) == read_label(images[key], read_metadata(images[key])) >= 0
            assert files["txt"].decode() == read_caption(images[key]) != ""
    assert len(all_keys) == len(set(all_keys)) == 420

    m = storage.read_json(os.path.join(clean, "manifest.json"))
    sha = hashlib.sha256(open(os.path.join(world["pkg"], CHECKSUMS), "rb").read()).hexdigest()
    assert m["tokenizer"] == {"name": TOKENIZER, "sha256": sha} == summary["tokenizer"]
    assert m["grid_size"] == [8, 8] and m["codebook_size"] == 64 and m["num_tokens"] == 64
    assert m["samples"] == 420 and [e["name"] for e in m["shards"]] == sorted(names)
    for e in m["shards"]:
        raw = open(os.path.join(clean, e["name"]), "rb").read()
        assert e["sha256"] == hashlib.sha256(raw).hexdigest() and e["bytes"] == len(raw)
    guard = storage.read_json(os.path.join(clean, GUARD))
    assert guard["tokenizer"]["sha256"] == sha and guard["resolution"] == 32

    # stage 2 reads them: every sample once, codes as written
    loader = code_loader(clean, batch_size=32, max_epochs=1)
    seen = {}
    for b in loader:
        assert b["codes"].shape[1] == 64 and b["positions"] is None
        for k, c in zip(b["key"], b["codes"]):
            seen[k] = c
    assert sorted(seen) == sorted(all_keys)


def test_mqvae_positions_and_text_embeddings(world, tmp_path):
    """MQ-VAE writes its kept positions; --text-encoder caches per-token caption embeddings."""
    from model_zoo.text_encoders import to_cached

    pkg = _package(tmp_path / "mq", "mq-vae-f8-tiny")
    out = str(tmp_path / "codes")
    s = run_tokenize(pkg, world["data"], out, batch_size=16, limit_shards=2,
                     text_encoder="openclip-vit-b-32-text-tiny", progress=False)
    assert s["shards_done"] == 2 and s["positions"] and s["num_tokens"] == 16 and s["grid_size"] == [8, 8]
    tok, enc = load_package(pkg), create_model("openclip-vit-b-32-text-tiny")
    name = sorted(_shards(out))[0]
    images, codes = _samples(os.path.join(world["data"], name)), _samples(os.path.join(out, name))
    x = torch.stack([_preprocess(image_bytes(f), 64) for f in images.values()])
    with torch.no_grad():
        want = tok.encode(x)
    for i, (key, files) in enumerate(codes.items()):
        assert np.array_equal(np.load(io.BytesIO(files["codes.npy"])), want.codes[i].numpy())
        pos = np.load(io.BytesIO(files["pos.npy"]))
        assert pos.dtype == np.int32 and np.array_equal(pos, want.positions[i].numpy())
        emb = np.load(io.BytesIO(files["txtemb.npy"]))
        h, m = enc.encode_text([files["txt"].decode()])
        assert emb.dtype == np.float16 and np.array_equal(emb, to_cached(h, m))
    m = storage.read_json(os.path.join(out, "manifest.json"))
    assert m["num_tokens"] == 16 and len(m["shards"]) == 2 and m["samples"] == 80
    b = next(iter(code_loader(out, batch_size=8, max_epochs=1)))
    assert b["positions"].shape == (8, 16) and b["text_embedding"].shape[0] == 8 and b["text_mask"].any()
    with pytest.raises(TokenizeError, match="another text encoder"):   # no mixing with and without
        run_tokenize(pkg, world["data"], out, progress=False)


# ----------------------------------------------------------------------------- distributed

def test_cli_and_two_rank_torchrun_give_the_same_bytes(world, tmp_path):
    data, pkg, clean = world["data"], world["pkg"], world["clean"]
    one = str(tmp_path / "one")
    s1 = _summary(_cli("--tokenizer", pkg, "--data", data, "--out", one, "--batch-size", "7"))
    assert s1["shards_done"] == 11 and s1["samples"] == 420 and s1["world_size"] == 1
    assert _shards(one) == _shards(clean)   # another batch size, another process: the same bytes

    two = str(tmp_path / "two")
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "-m", "pretrain.cli",
                           "tokenize", "--tokenizer", pkg, "--data", data, "--out", two, "--batch-size", "16"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    s2 = _summary(proc)
    assert s2["world_size"] == 2 and s2["shards_done"] == 11 and s2["samples"] == 420
    names = [e["name"] for e in storage.read_json(os.path.join(data, "manifest.json"))["shards"]]
    writers = {}
    for rank, world_size, name in re.findall(r"rank (\d)/(\d) wrote (\S+):", proc.stderr):
        assert name not in writers, f"{name} written twice"
        writers[name] = int(rank)
    assert writers == {n: j % 2 for j, n in enumerate(names)}   # disjoint: shard j on rank j % 2
    assert _shards(two) == _shards(clean)
    m2, mc = (storage.read_json(os.path.join(r, "manifest.json")) for r in (two, clean))
    assert m2["shards"] == mc["shards"] and m2["tokenizer"] == mc["tokenizer"]


# ---------------------------------------------------------------------------------- resume

def _stamps(root: str) -> dict[str, tuple[int, int]]:
    return {n: (os.stat(os.path.join(root, n)).st_ino, os.stat(os.path.join(root, n)).st_mtime_ns)
            for n in os.listdir(root) if n.endswith(".tar")}


def test_crash_and_resume_writes_each_shard_once(world, tmp_path, monkeypatch):
    data, pkg, clean = world["data"], world["pkg"], world["clean"]
    out = str(tmp_path / "out")
    monkeypatch.setenv(CRASH_ENV, "3")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_tokenize(pkg, data, out, batch_size=16, progress=False)
    monkeypatch.delenv(CRASH_ENV)
    first = _stamps(out)
    assert len(first) == 3 and not os.path.exists(os.path.join(out, "manifest.json"))
    assert [n for n in os.listdir(out) if n.startswith(".")] == []   # the 4th shard was aborted, not left
    s = run_tokenize(pkg, data, out, batch_size=16, progress=False)
    assert s["shards_skipped"] == 3 and s["shards_done"] == 8 and s["samples"] == 420 - 3 * 40
    after = _stamps(out)
    assert {n: after[n] for n in first} == first      # finished shards were not rewritten
    assert _shards(out) == _shards(clean)
    m, mc = (storage.read_json(os.path.join(r, "manifest.json")) for r in (out, clean))
    assert m["shards"] == mc["shards"] and m["samples"] == 420
    # a third run has nothing to do, and leaves every shard alone
    s3 = run_tokenize(pkg, data, out, progress=False)
    assert s3["shards_done"] == 0 and s3["shards_skipped"] == 11 and _stamps(out) == after


def test_sigkill_and_resume_through_the_cli(world, tmp_path):
    data, pkg, clean = world["data"], world["pkg"], world["clean"]
    out = str(tmp_path / "out")
    proc = _cli("--tokenizer", pkg, "--data", data, "--out", out, "--batch-size", "16",
                env_extra={CRASH_ENV: "2:kill"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    first = _stamps(out)
    leftovers = [n for n in os.listdir(out) if n.startswith(".") and n.endswith(".tmp")]
    assert len(first) == 2 and len(leftovers) == 1   # the killed writer's temporary, never a .tar
    s = _summary(_cli("--tokenizer", pkg, "--data", data, "--out", out, "--batch-size", "16"))
    assert s["shards_skipped"] == 2 and s["shards_done"] == 9 and s["stale_temporaries_removed"] == 1
    assert {n: _stamps(out)[n] for n in first} == first
    assert _shards(out) == _shards(clean) and not [n for n in os.listdir(out) if n.startswith(".")]


# --------------------------------------------------------------------------------- defects

def test_bad_input_is_skipped_and_counted(world, tmp_path):
    data = str(tmp_path / "data")
    make_dataset(data, [4, 4])
    good = sample_files(100)
    write_raw_tar(os.path.join(data, "part002-000000.tar"), [
        ("ok1.png", good["png"]), ("ok1.cls", b"3"), ("bad.png", b"not an image at all"),
        ("bad.txt", b"x"), ("noimg.txt", b"caption only"), ("ok2.png", good["png"])])
    whole = open(os.path.join(data, "part000-000000.tar"), "rb").read()
    storage.write_bytes(os.path.join(data, "part003-000000.tar"), whole[: len(whole) // 2 + 100])  # cut in a member
    with tarfile.open(os.path.join(data, "part000-000000.tar")) as t:   # cut where sample 2's header starts
        boundary = [m.offset for m in t.getmembers() if m.name.startswith("part0000002.")][0]
    storage.write_bytes(os.path.join(data, "part004-000000.tar"), whole[:boundary])
    storage.write_bytes(os.path.join(data, "part005-000000.tar"), b"this is not a tar file" * 40)
    manifest = storage.read_json(os.path.join(data, "manifest.json"))
    manifest["shards"] += [{"name": f"part00{j}-000000.tar", "samples": 4} for j in (2, 3, 4, 5, 6)]
    storage.write_json(os.path.join(data, "manifest.json"), make_manifest(manifest["shards"]))
    # part006 is listed but missing: maybe not uploaded yet, so it is retried, not written empty

    out = str(tmp_path / "codes")
    s = run_tokenize(world["pkg"], data, out, batch_size=3, progress=False)
    assert s["defects"]["by_reason"] == {"corrupt_image": 1, "missing_image": 1, "truncated_shard": 2,
                                         "unreadable_shard": 2}, s["defects"]
    assert s["shards_done"] == 6 and s["shards_failed"] == ["part006-000000.tar"] and s["manifest"] is None
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert not os.path.exists(os.path.join(out, "part006-000000.tar"))
    assert list(_samples(os.path.join(out, "part002-000000.tar"))) == ["ok1", "ok2"]
    keys0 = list(_samples(os.path.join(data, "part000-000000.tar")))
    partial = _samples(os.path.join(out, "part003-000000.tar"))
    assert 0 < len(partial) < 4 and list(partial) == keys0[:len(partial)]
    assert list(_samples(os.path.join(out, "part004-000000.tar"))) == keys0[:2]
    assert _samples(os.path.join(out, "part005-000000.tar")) == {}   # not a tar: an empty code shard
    assert s["lost_samples"] == (4 - len(partial)) + 2 + 4   # a failed shard is pending, not lost

    shutil.copy(os.path.join(data, "part001-000000.tar"), os.path.join(data, "part006-000000.tar"))
    s2 = run_tokenize(world["pkg"], data, out, batch_size=3, progress=False)   # the re-run finishes it
    assert s2["shards_done"] == 1 and s2["shards_skipped"] == 6 and s2["shards_failed"] == []
    m = storage.read_json(os.path.join(out, "manifest.json"))
    assert len(m["shards"]) == 7 and m["samples"] == 8 + 2 + len(partial) + 2 + 0 + 4


# -------------------------------------------------------------------------------- refusals

def test_another_tokenizer_or_foreign_out_is_refused(world, tmp_path, capsys):
    data, clean = world["data"], world["clean"]
    out = str(tmp_path / "out")
    shutil.copytree(clean, out)
    other = _package(tmp_path / "other", seed=1)   # same preset, other weights: another sha256
    before = _shards(out)
    with pytest.raises(TokenizeError, match="another tokenizer"):
        run_tokenize(other, data, out, progress=False)
    assert cli_main(["tokenize", "--tokenizer", other, "--data", data, "--out", out]) == 2
    assert "Refusing to mix codes" in capsys.readouterr().err
    os.remove(os.path.join(out, GUARD))                 # the manifest still names the old tokenizer
    with pytest.raises(TokenizeError, match="holds codes of tokenizer"):
        run_tokenize(other, data, out, progress=False)
    os.remove(os.path.join(out, "manifest.json"))       # shards of unknown origin
    with pytest.raises(TokenizeError, match="no tokenizer.json"):
        run_tokenize(other, data, out, progress=False)
    assert _shards(out) == before                       # nothing was touched
    with pytest.raises(TokenizeError, match="not a code-shard manifest"):   # --out = the image dataset
        run_tokenize(world["pkg"], data, data, progress=False)
    with pytest.raises(TokenizeError, match="cannot encode 64 px images"):   # a ViT has fixed positions
        run_tokenize(world["pkg"], data, str(tmp_path / "o2"), resolution=64, progress=False)
    # not a tokenizer package
    os.makedirs(tmp_path / "run" / "checkpoints")
    with pytest.raises(TokenizeError, match="run directory"):
        run_tokenize(str(tmp_path / "run"), data, str(tmp_path / "o3"), progress=False)
    with pytest.raises(TokenizeError, match="one dataset at a time"):
        run_tokenize(world["pkg"], f"{data}::0.5,{data}::0.5", str(tmp_path / "o4"), progress=False)


# ------------------------------------------------------------------------------------- S3

@pytest.mark.s3
def test_everything_on_s3(world, s3_bucket, tmp_path):
    """Package, images and codes on a real S3 server (SeaweedFS): same bytes as the local run,
    resume from the bucket's listing, the guard read back from the bucket."""
    storage.upload_dir(world["data"], f"{s3_bucket}/data")
    pkg = f"{s3_bucket}/zoo/tok"
    storage.upload_dir(world["pkg"], pkg)   # the same package bytes, so the same identity
    out = f"{s3_bucket}/codes"
    s = run_tokenize(pkg, f"{s3_bucket}/data", out, batch_size=16, limit_shards=3, progress=False)
    assert s["shards_done"] == 3 and s["tokenizer"] == world["summary"]["tokenizer"]
    clean = _shards(world["clean"])
    for name in storage.listdir(out):
        if name.endswith(".tar"):
            assert storage.read_bytes(f"{out}/{name}") == clean[name]
    s2 = run_tokenize(pkg, f"{s3_bucket}/data", out, batch_size=16, limit_shards=4, progress=False)
    assert s2["shards_skipped"] == 3 and s2["shards_done"] == 1
    m = storage.read_json(f"{out}/manifest.json")
    assert [e["name"] for e in m["shards"]] == sorted(clean)[:4] and m["samples"] == 160
    assert len(list(code_loader(out, batch_size=40, max_epochs=1))) == 4
    with pytest.raises(TokenizeError, match="another tokenizer"):
        run_tokenize(_package(tmp_path / "other", seed=1), f"{s3_bucket}/data", out, progress=False)
