"""Shard writing and reading: the format other tools produce and read, manifests, packing."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipeline import storage
from data_pipeline.pack import pack, parse_size
from data_pipeline.shards import ShardError, ShardWriter, iter_shard, tar_members
from tests.datasets import image_bytes, sample_files


def _tar_bytes(members, fmt=tarfile.GNU_FORMAT, extra_dir=False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if extra_dir:
            info = tarfile.TarInfo("folder")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(fmt):
    long = "x" * 90 + "/" + "sub" * 30 + "/key"  # > 100 chars: ustar prefix, GNU longname or pax path
    members = [(f"{long}.jpg", b"a" * 700), (f"{long}.txt", b"cap"), ("__meta__.json", b"{}"),
               ("k2.png", b""), ("k2.json", b"{}")]
    if fmt == tarfile.PAX_FORMAT:
        members.append(("ünïcode.txt", "é".encode()))
    if fmt == tarfile.USTAR_FORMAT:
        members[0] = (f"{'p' * 120}/key.jpg", b"a" * 700)
        members[1] = (f"{'p' * 120}/key.txt", b"cap")
    raw = _tar_bytes(members, fmt=fmt, extra_dir=True)
    ours = list(tar_members(io.BytesIO(raw)))
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        ref = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]
    assert ours == ref
    gz = list(tar_members(io.BytesIO(gzip.compress(raw))))
    assert gz == ref


def test_writer_rotates_and_manifest_checksums_match(tmp_path):
    root = str(tmp_path / "ds")
    w = ShardWriter(root, prefix="x", max_bytes=60_000, max_samples=7)
    for i in range(40):
        w.write(f"{i:05d}", sample_files(i))
    m = w.close()
    assert m["samples"] == 40 and len(m["shards"]) >= 6
    assert all(s["samples"] <= 7 for s in m["shards"])
    for s in m["shards"]:
        data = open(os.path.join(root, s["name"]), "rb").read()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
    assert json.load(open(os.path.join(root, "manifest.json")))["shards"] == m["shards"]
    # Deterministic bytes: the same samples give the same shards.
    w2 = ShardWriter(str(tmp_path / "ds2"), prefix="x", max_bytes=60_000, max_samples=7)
    for i in range(40):
        w2.write(f"{i:05d}", sample_files(i))
    assert [s["sha256"] for s in w2.close()["shards"]] == [s["sha256"] for s in m["shards"]]


def test_writer_rejects_bad_keys(tmp_path):
    w = ShardWriter(str(tmp_path), prefix="x")
    with pytest.raises(ValueError, match="must not contain a dot"):
        w.write("a.b", {"txt": b""})
    w.write("a", {"txt": b""})
    with pytest.raises(ValueError, match="duplicate"):
        w.write("a", {"txt": b""})
    w.close()


def test_webdataset_reads_our_shards(tmp_path):
    import webdataset as wds

    root = str(tmp_path)
    w = ShardWriter(root, prefix="wds", max_samples=5)
    for i in range(12):
        w.write(f"s{i:03d}", sample_files(i))
    m = w.close()
    urls = [os.path.join(root, s["name"]) for s in m["shards"]]
    theirs = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}
    ours = {key: files for u in urls for _i, key, files in iter_shard(u)}
    assert sorted(theirs) == sorted(ours)
    for key, files in ours.items():
        assert {k: theirs[key][k] for k in files} == files


def test_iter_shard_resumes_by_index_and_reports_totals(tmp_path):
    root = str(tmp_path)
    w = ShardWriter(root, prefix="r")
    for i in range(10):
        w.write(f"k{i}", sample_files(i))
    url = os.path.join(root, w.close()["shards"][0]["name"])
    it = iter_shard(url, want=lambda i: i >= 6 or i in (1, 3))
    got = []
    while True:
        try:
            got.append(next(it)[0])
        except StopIteration as stop:
            total = stop.value
            break
    assert got == [1, 3, 6, 7, 8, 9] and total == 10
    with pytest.raises(ShardError) as info:
        list(iter_shard(os.path.join(root, "absent.tar"), retries=0))
    assert info.value.reason == "unreadable_shard"


def test_parse_size():
    assert parse_size("256MB") == 256 * 1024**2
    assert parse_size("1.5GiB") == int(1.5 * 1024**3)
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError):
        parse_size("lots")


def _image_folder(root):
    for cls, n in (("cats", 4), ("dogs", 3)):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(n):
            arr = np.random.default_rng(i).integers(0, 255, (300 + 10 * i, 200, 3), dtype=np.uint8)
            Image.fromarray(arr).save(os.path.join(root, cls, f"{cls}{i}.jpg"), quality=90)
            if i == 0:
                with open(os.path.join(root, cls, f"{cls}{i}.txt"), "w") as f:
                    f.write(f"a photo of {cls}\n")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(os.path.join(root, "cats", "tiny.bmp"))
    with open(os.path.join(root, "dogs", "broken.png"), "wb") as f:
        f.write(b"not an image")


def test_pack_image_folder_and_reshard(tmp_path):
    from data_pipeline.inspection import inspect_dataset

    src = str(tmp_path / "images")
    _image_folder(src)
    out = str(tmp_path / "packed")
    m = pack(src, out, shard_samples=3, resize=128, progress=False)
    assert m["classes"] == ["cats", "dogs"]
    assert m["samples"] == 8 and m["defects"]["by_reason"] == {"corrupt_image": 1}
    summary = inspect_dataset(out, progress=False)
    assert summary["samples"] == 8 and summary["labels"] == {"0": 5, "1": 3}
    assert summary["caption_fraction"] == pytest.approx(2 / 8)
    samples = [files for s in m["shards"] for _i, _k, files in iter_shard(os.path.join(out, s["name"]))]
    sizes = [Image.open(io.BytesIO(f.get("jpg") or f["png"])).size for f in samples]
    assert all(min(s) == 128 or max(s) <= 128 for s in sizes)
    assert all(json.loads(f["json"])["width"] == Image.open(io.BytesIO(f.get("jpg") or f["png"])).size[0]
               for f in samples)
    # Re-pack those shards into fewer, larger ones: same samples, same bytes.
    out2 = str(tmp_path / "repacked")
    m2 = pack(out, out2, shard_size="10MB", progress=False)
    assert len(m2["shards"]) == 1 and m2["samples"] == 8
    again = [files for s in m2["shards"] for _i, _k, files in iter_shard(os.path.join(out2, s["name"]))]
    assert sorted(f.get("jpg", f.get("png")) for f in again) == sorted(f.get("jpg", f.get("png")) for f in samples)


def test_image_bytes_helper_is_a_real_png():
    assert Image.open(io.BytesIO(image_bytes(3))).size == (12, 12)
    assert storage.basename("s3://b/x/y.tar") == "y.tar"
