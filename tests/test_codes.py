"""Code shards (DESIGN.md "Code shards"): writing, the manifest, resume helpers for the tokenize
job, the decoder's defects, and the resumable code loader, on real files (and real S3)."""

from __future__ import annotations

import collections
import io
import json
import os

import numpy as np
import pytest
import torch

from data_pipeline import storage
from data_pipeline.codes import (CodeDecoder, CodeShardWriter, code_loader, code_shard_entry,
                                 collate_codes, finished_code_shards, read_code_manifest,
                                 write_code_manifest)
from data_pipeline.defects import CORRUPT_CODES, MISSING_CODES, SampleDefect
from data_pipeline.shards import ShardWriter, iter_shard
from data_pipeline.sources import DataError

GRID, CODEBOOK, K, D = (4, 4), 64, 6, 8
SIZES = [7, 5, 9, 3, 6]  # five shards, 30 samples


def sample(n: int, masked: bool) -> dict:
    rng = np.random.default_rng(n)
    if masked:
        pos = np.sort(rng.choice(GRID[0] * GRID[1], size=K, replace=False)).astype(np.int32)
        codes = rng.integers(0, CODEBOOK, size=K).astype(np.int32)
    else:
        pos, codes = None, rng.integers(0, CODEBOOK, size=GRID[0] * GRID[1]).astype(np.int32)
    return {"codes": codes, "positions": pos, "label": None if n % 5 == 0 else n % 3,
            "caption": "" if n % 4 == 0 else f"caption {n} é",
            "text_embedding": rng.standard_normal(D).astype(np.float32)}


def write_codes(root: str, masked: bool, sizes=SIZES) -> dict[str, dict]:
    """Code shards ``demo-00000J.tar`` plus manifest; returns key -> the sample written."""
    expected, entries, n = {}, [], 0
    for j, size in reversed(list(enumerate(sizes))):  # out of order, as ranks finish
        with CodeShardWriter(root, f"demo-{j:06d}.tar", codebook_size=CODEBOOK, grid_size=GRID) as w:
            for i in range(size):
                key, s = f"k{j}x{i:03d}", sample(n, masked)
                w.write(key, **s)
                expected[key] = s
                n += 1
        entries.append(w.entry)
    write_code_manifest(root, entries, "mq-vae-f8-tiny", "ab" * 32, GRID, CODEBOOK,
                        num_tokens=K if masked else None)
    return expected


def take(loader, n_batches=None) -> list[tuple[int, str, dict]]:
    """(epoch, key, per-sample values) of the first ``n_batches`` batches (all when None)."""
    out = []
    for b, batch in enumerate(loader):
        assert batch["codes"].dtype == torch.long and batch["label"].dtype == torch.long
        for i, key in enumerate(batch["key"]):
            out.append((int(batch["epoch"][i]), key, {
                "codes": batch["codes"][i].numpy(),
                "positions": None if batch["positions"] is None else batch["positions"][i].numpy(),
                "label": int(batch["label"][i]), "caption": batch["caption"][i],
                "text_embedding": batch["text_embedding"][i].numpy() if "text_embedding" in batch else None}))
        if n_batches is not None and b + 1 == n_batches:
            break
    return out


def check_sample(got: dict, want: dict) -> None:
    np.testing.assert_array_equal(got["codes"], want["codes"])
    if want["positions"] is None:
        assert got["positions"] is None
    else:
        np.testing.assert_array_equal(got["positions"], want["positions"])
    assert got["label"] == (-1 if want["label"] is None else want["label"])
    assert got["caption"] == want["caption"]
    stored = want["text_embedding"].astype(np.float16).astype(np.float32)  # cached as float16
    np.testing.assert_array_equal(got["text_embedding"], stored)


@pytest.fixture(scope="module", params=[False, True], ids=["full", "masked"])
def codes_root(request, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("masked" if request.param else "full"))
    return root, write_codes(root, request.param), request.param


def test_one_pass_with_two_workers_returns_every_sample_once(codes_root):
    root, expected, masked = codes_root
    got = take(code_loader(root, 4, num_workers=2, shuffle_buffer=8, max_epochs=1))
    assert collections.Counter(k for _, k, _ in got) == collections.Counter(list(expected))
    assert {e for e, _, _ in got} == {0}
    for _, key, values in got:
        check_sample(values, expected[key])
        assert (values["positions"] is not None) == masked


def test_resume_on_other_worker_count_is_exact(codes_root):
    root, expected, _ = codes_root
    loader = code_loader(root, 4, num_workers=2, shuffle_buffer=8, max_epochs=1)
    seen1 = take(loader, 3)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
    assert state["samples"] == len(seen1) == 12
    loader2 = code_loader(root, 5, num_workers=1, shuffle_buffer=8, max_epochs=1)
    loader2.load_state_dict(state)
    seen2 = take(loader2)
    keys = [k for _, k, _ in seen1 + seen2]
    assert len(keys) == len(set(keys)), "a sample was repeated"
    assert sorted(keys) == sorted(expected), "a sample was dropped"
    assert {e for e, _, _ in seen1 + seen2} == {0}
    for _, key, values in seen2:
        check_sample(values, expected[key])


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


def test_missing_and_corrupt_codes_are_skipped_and_counted(tmp_path):
    root = str(tmp_path)
    expected = write_codes(root, masked=False, sizes=[4, 4])
    good = _npy(np.zeros(16, np.int32))
    bad = {"missing": {"txt": b"no codes", "cls": b"1"},
           "garbage": {"codes.npy": b"not an npy file at all"},
           "floats": {"codes.npy": _npy(np.zeros(16, np.float32))},
           "short": {"codes.npy": _npy(np.zeros(15, np.int32))},
           "big": {"codes.npy": _npy(np.full(16, CODEBOOK, np.int32))},
           "badpos": {"codes.npy": good, "pos.npy": _npy(np.arange(3, dtype=np.int32))}}
    w = ShardWriter(root, name="demo-000002.tar", write_manifest=False)  # raw: bypasses validation
    w.write("ok", {"codes.npy": good, "cls": b"3"})
    for key, files in bad.items():
        w.write(key, files)
    manifest = read_code_manifest(root)
    write_code_manifest(root, manifest["shards"] + w.close()["shards"], "t", "ab" * 32, GRID, CODEBOOK)
    loader = code_loader(root, 3, num_workers=2, max_epochs=1)
    got = take(loader)
    assert sorted(k for _, k, _ in got) == sorted([*expected, "ok"])
    assert dict(loader.defects.by_reason) == {MISSING_CODES: 1, CORRUPT_CODES: len(bad) - 1}
    assert {ex["key"] for ex in loader.defects.examples} == set(bad)


def test_decoder_checks_every_bound():
    dec = CodeDecoder(codebook_size=8, num_tokens=4, grid_size=(2, 3))
    files = {"codes.npy": _npy(np.array([1, 2, 3, 7], np.int32)),
             "pos.npy": _npy(np.array([0, 2, 3, 5], np.int32)),
             "txtemb.npy": _npy(np.ones(3, np.float16)), "cls": b"4", "txt": b" hi "}
    out = dec(files, "a", None)
    assert out["codes"].dtype == torch.long and out["positions"].tolist() == [0, 2, 3, 5]
    assert (out["label"], out["caption"], out["key"]) == (4, "hi", "a")
    assert out["text_embedding"].dtype == torch.float32
    for change in ({"codes.npy": _npy(np.array([[1, 2], [3, 4]], np.int32))},     # 2-D
                   {"codes.npy": _npy(np.array([1, 2, 3, -1], np.int32))},        # negative
                   {"pos.npy": _npy(np.array([0, 3, 2, 5], np.int32))},           # unsorted
                   {"pos.npy": _npy(np.array([0, 2, 3, 6], np.int32))},           # outside the grid
                   {"txtemb.npy": _npy(np.ones(3, np.int32))},                    # not float
                   {"codes.npy": b""}):
        with pytest.raises(SampleDefect) as e:
            dec({**files, **change}, "a", None)
        assert e.value.reason == CORRUPT_CODES
    with pytest.raises(SampleDefect, match="without positions"):
        CodeDecoder(grid_size=(2, 3))({"codes.npy": _npy(np.arange(4))}, "a", None)
    assert CodeDecoder()({"codes.npy": _npy(np.arange(4, dtype=np.uint16))}, "a", None)["label"] == -1


def test_collate_refuses_mixed_lengths():
    dec = CodeDecoder()
    a = dec({"codes.npy": _npy(np.arange(4))}, "a", None)
    b = dec({"codes.npy": _npy(np.arange(5))}, "b", None)
    with pytest.raises(ValueError, match="different lengths"):
        collate_codes([a, b])
    batch = collate_codes([a, a])
    assert batch["codes"].shape == (2, 4) and batch["positions"] is None and "text_embedding" not in batch


def test_finished_shards_and_manifest_rebuild(tmp_path):
    root = str(tmp_path)
    write_codes(root, masked=True)
    manifest = read_code_manifest(root)
    names = [s["name"] for s in manifest["shards"]]
    assert names == sorted(names) and manifest["samples"] == sum(SIZES)
    assert manifest["tokenizer"] == {"name": "mq-vae-f8-tiny", "sha256": "ab" * 32}
    assert (manifest["grid_size"], manifest["codebook_size"], manifest["num_tokens"]) == ([4, 4], CODEBOOK, K)
    # A crash in the middle of a shard: the atomic write leaves nothing under its name.
    with pytest.raises(RuntimeError):
        with CodeShardWriter(root, "demo-000007.tar") as w:
            w.write("a", codes=np.arange(4))
            raise RuntimeError("killed")
    with CodeShardWriter(root, "demo-000008.tar") as w:  # an image shard whose samples all failed
        pass
    assert w.entry["samples"] == 0
    open(os.path.join(root, ".demo-000009.tar.x1y2.tmp"), "wb").close()  # another writer's temp
    assert finished_code_shards(root) == set(names) | {"demo-000008.tar"}
    rebuilt = [code_shard_entry(root, n) for n in sorted(finished_code_shards(root))]
    assert rebuilt == manifest["shards"] + [w.entry]
    assert sum(1 for _ in iter_shard(os.path.join(root, "demo-000008.tar"))) == 0


def test_manifest_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="no code manifest"):
        read_code_manifest(str(tmp_path))
    storage.write_json(str(tmp_path / "manifest.json"), {"shards": [], "samples": 0})
    with pytest.raises(DataError, match=r"missing \['tokenizer', 'grid_size', 'codebook_size'\]"):
        read_code_manifest(str(tmp_path))
    storage.write_json(str(tmp_path / "manifest.json"), {
        "shards": [], "tokenizer": {"name": "x", "sha256": "y"}, "grid_size": [4], "codebook_size": 8})
    with pytest.raises(DataError, match="grid_size"):
        read_code_manifest(str(tmp_path))
    with pytest.raises(ValueError, match="duplicate"):
        write_code_manifest(str(tmp_path), [{"name": "a.tar"}, {"name": "a.tar"}], "t", "s", GRID, 8)


def test_loader_refuses_mismatches(tmp_path):
    root = str(tmp_path / "codes")
    write_codes(root, masked=False, sizes=[2])
    with pytest.raises(DataError, match="codebook_size=128"):
        code_loader(root, 2, codebook_size=128)
    images = str(tmp_path / "images")
    with ShardWriter(images, prefix="img") as w:
        w.write("a", {"png": b"x"})
    with pytest.raises(DataError, match="not a code-shard manifest"):
        code_loader(images, 2)
    other = str(tmp_path / "other")
    with CodeShardWriter(other, "o-000000.tar") as w:
        w.write("a", codes=np.arange(16))
    write_code_manifest(other, [w.entry], "t", "cd" * 32, GRID, CODEBOOK)
    with pytest.raises(DataError, match="different tokenizers"):
        code_loader(f"{root}::0.5,{other}::0.5", 2)


@pytest.mark.parametrize("kwargs,match", [
    ({"codes": np.zeros(16, np.float32)}, "1-D integer"),
    ({"codes": np.zeros((4, 4), np.int32)}, "1-D integer"),
    ({"codes": np.full(16, CODEBOOK)}, "outside the codebook"),
    ({"codes": np.arange(16) - 1}, r"\[0, 2\*\*31\)"),
    ({"codes": np.arange(6)}, "must give positions"),
    ({"codes": np.arange(3), "positions": np.array([0, 1])}, "differ in length"),
    ({"codes": np.arange(3), "positions": np.array([0, 2, 1])}, "sorted and unique"),
    ({"codes": np.arange(3), "positions": np.array([0, 2, 2])}, "sorted and unique"),
    ({"codes": np.arange(3), "positions": np.array([0, 2, 16])}, "outside the grid"),
    ({"codes": np.arange(16), "text_embedding": np.ones((2, 4, 3))}, "per token"),
    ({"codes": np.arange(16), "text_embedding": np.full(4, 1e6)}, "not finite"),
    ({"codes": np.arange(16), "caption": b"bytes"}, "must be a str"),
])
def test_writer_validates_samples(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        with CodeShardWriter(str(tmp_path), "s-000000.tar", codebook_size=CODEBOOK, grid_size=GRID) as w:
            w.write("a", **kwargs)
    assert finished_code_shards(str(tmp_path)) == set()


def test_writer_keeps_a_shard_consistent(tmp_path):
    with pytest.raises(ValueError, match="must be a plain NAME.tar"):
        CodeShardWriter(str(tmp_path), "sub/x.tar")
    with CodeShardWriter(str(tmp_path), "s-000000.tar") as w:
        w.write("a", codes=torch.arange(5), positions=torch.arange(5), label=np.int64(2))
        for key, kw in (("b", {"codes": np.arange(4), "positions": np.arange(4)}),   # another k
                        ("c", {"codes": np.arange(5)}),                              # no positions
                        ("a", {"codes": np.arange(5), "positions": np.arange(5)}),   # duplicate key
                        ("d.e", {"codes": np.arange(5), "positions": np.arange(5)})):
            with pytest.raises(ValueError):
                w.write(key, **kw)
    assert w.entry["samples"] == 1


@pytest.mark.s3
def test_code_shards_on_s3_round_trip(s3_bucket, tmp_path):
    local, remote = str(tmp_path), f"{s3_bucket}/codes/run1"
    expected = write_codes(local, masked=True)
    write_codes(remote, masked=True)  # the same samples (seeded) on S3
    with pytest.raises(RuntimeError):  # an interrupted upload is aborted, never committed
        with CodeShardWriter(remote, "demo-000009.tar") as w:
            w.write("a", codes=np.arange(16))
            raise RuntimeError("killed")
    assert finished_code_shards(remote) == finished_code_shards(local)
    # Tars are written with fixed metadata: the same samples give byte-identical shards anywhere.
    assert read_code_manifest(remote)["shards"] == read_code_manifest(local)["shards"]
    assert code_shard_entry(remote, "demo-000002.tar") == code_shard_entry(local, "demo-000002.tar")
    got = take(code_loader(remote, 4, num_workers=2, shuffle_buffer=8, max_epochs=1))
    assert sorted(k for _, k, _ in got) == sorted(expected)
    for _, key, values in got:
        check_sample(values, expected[key])


def test_per_token_text_embeddings_pad_with_a_mask(tmp_path):
    from data_pipeline.codes import CodeShardWriter, collate_codes, code_loader, write_code_manifest

    root = str(tmp_path)
    lengths = [3, 7, 5, 2]
    with CodeShardWriter(root, "a-000000.tar") as w:
        for i, n in enumerate(lengths):
            w.write(f"k{i}", np.arange(16) % 8, caption=f"c{i}",
                    text_embedding=np.full((n, 4), i + 1, np.float32))
    write_code_manifest(root, [w.entry], "tok", "0" * 64, (4, 4), 8)
    [batch] = list(code_loader(root, 4, max_epochs=1, shuffle_buffer=1))
    order = [int(k[1:]) for k in batch["key"]]
    assert batch["text_embedding"].shape == (4, 7, 4)
    assert batch["text_mask"].sum(1).tolist() == [lengths[i] for i in order]
    for row, i in enumerate(order):
        assert bool((batch["text_embedding"][row, : lengths[i]] == i + 1).all())
        assert bool((batch["text_embedding"][row, lengths[i]:] == 0).all())
    with pytest.raises(ValueError, match="mixes pooled"):
        collate_codes([{"codes": torch.zeros(2, dtype=torch.long), "positions": None, "label": -1, "caption": "",
                        "key": "a", "text_embedding": torch.zeros(4)},
                       {"codes": torch.zeros(2, dtype=torch.long), "positions": None, "label": -1, "caption": "",
                        "key": "b", "text_embedding": torch.zeros(2, 4)}])
