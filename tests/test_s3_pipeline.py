"""The pipeline against a real S3 endpoint (SeaweedFS on 127.0.0.1): the CLI's build-demo and
inspect on s3:// and on a local folder, identical streams from both, and a server that drops a
connection mid-shard or goes away entirely."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from data_pipeline import storage
from data_pipeline.config import DataConfig
from data_pipeline.images import image_loader
from tests.s3server import FlakyProxy


def _cli(*args, env=None, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "pretrain.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_build_demo_and_inspect_on_local_and_s3(tmp_path, s3_bucket, s3_server):
    local = str(tmp_path / "demo")
    remote = f"{s3_bucket}/datasets/demo"
    _cli("data", "build-demo", "--quick", "--out", local)
    _cli("data", "build-demo", "--quick", "--out", remote, env=s3_server.env())
    a = json.loads(_cli("data", "inspect", local))
    b = json.loads(_cli("data", "inspect", remote, env=s3_server.env()))
    assert a["samples"] == b["samples"] == 420 and a["shards"] == b["shards"] == 5
    for k in ("bytes", "defects", "labels", "caption_fraction", "filtered", "lost_samples"):
        assert a[k] == b[k], k
    assert a["defects"]["total"] == 0 and len(a["labels"]) == 20
    # Byte-identical shards in both places (the writer is deterministic).
    local_manifest = storage.read_json(os.path.join(local, "manifest.json"))
    remote_manifest = storage.read_json(f"{remote}/manifest.json")
    assert [s["sha256"] for s in local_manifest["shards"]] == [s["sha256"] for s in remote_manifest["shards"]]


def _demo_pair(tmp_path, bucket):
    from data_pipeline.demo import build_demo

    local = str(tmp_path / "demo")
    build_demo(local, quick=True, shard_samples=40, progress=False)
    remote = f"{bucket}/demo"
    storage.upload_dir(local, remote)
    return local, remote


def test_s3_and_local_stream_the_same_samples(tmp_path, s3_bucket):
    local, remote = _demo_pair(tmp_path, s3_bucket)
    cfg = dict(resolution=16, shuffle_buffer=64)
    batches = {}
    for name, url in (("local", local), ("s3", remote)):
        batches[name] = list(image_loader(DataConfig(url=url, **cfg), 32, seed=5, num_workers=2, max_epochs=1))
    assert [b["key"] for b in batches["local"]] == [b["key"] for b in batches["s3"]]
    for x, y in zip(batches["local"], batches["s3"]):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        assert x["caption"] == y["caption"]
    assert sum(len(b["key"]) for b in batches["s3"]) == 420


def test_a_connection_cut_mid_shard_loses_nothing(tmp_path, s3_bucket, s3_server):
    local, remote = _demo_pair(tmp_path, s3_bucket)
    keys = sorted(k for b in image_loader(DataConfig(url=local, resolution=8), 50, max_epochs=1) for k in b["key"])
    with FlakyProxy(s3_server.endpoint) as proxy:
        storage.configure("s3", endpoint_url=proxy.endpoint)
        try:
            loader = image_loader(DataConfig(url=remote, resolution=8, retry_backoff=0.05), 50, num_workers=0,
                                  max_epochs=1)
            proxy.mode = "cut_once_after=150000"  # inside the first shard's body
            got = sorted(k for b in loader for k in b["key"])
        finally:
            storage.configure("s3")
        assert proxy.cuts == 1
    assert got == keys
    assert loader.defects.total == 0


def test_a_server_that_goes_away_is_counted_not_fatal(tmp_path, s3_bucket, s3_server):
    _local, remote = _demo_pair(tmp_path, s3_bucket)
    with FlakyProxy(s3_server.endpoint) as proxy:
        storage.configure("s3", endpoint_url=proxy.endpoint,
                          config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 2})
        try:
            loader = image_loader(DataConfig(url=remote, resolution=8, retries=1, retry_backoff=0.05,
                                             retry_for_s=0), 50, num_workers=0, max_epochs=1)
            proxy.mode = "refuse"
            got = [k for b in loader for k in b["key"]]
        finally:
            storage.configure("s3")
    assert got == []
    d = loader.defects
    assert d.by_reason == {"unreadable_shard": 11} and d.lost_samples == 420
    assert proxy.refused > 0


def test_shard_command_writes_to_s3_and_inspect_reads_a_prefix_without_manifest(tmp_path, s3_bucket, s3_server):
    from tests.test_shards import _image_folder

    src = str(tmp_path / "images")
    _image_folder(src)
    out = json.loads(_cli("data", "shard", "--src", src, "--out", f"{s3_bucket}/packed", "--shard-samples", "2",
                          "--resize", "96", env=s3_server.env()))
    assert out == {"out": f"{s3_bucket}/packed", "shards": 4, "samples": 8, "bytes": out["bytes"], "defects": 1}
    # The same shards under a prefix with no manifest: inspect lists the prefix once.
    for name in storage.listdir(f"{s3_bucket}/packed"):
        if name.endswith(".tar"):
            storage.write_bytes(f"{s3_bucket}/bare/{name}", storage.read_bytes(f"{s3_bucket}/packed/{name}"))
    summary = json.loads(_cli("data", "inspect", f"{s3_bucket}/bare", env=s3_server.env()))
    assert summary["manifest"] is False and summary["shards"] == 4 and summary["samples"] == 8
    assert summary["labels"] == {"0": 5, "1": 3}
