"""Bad input never crashes a run and is never lost silently: each kind is skipped and counted,
by the training stream and by ``data inspect`` alike; filtered samples are counted apart."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from data_pipeline import storage
from data_pipeline.config import DataConfig, FilterConfig
from data_pipeline.images import image_loader
from data_pipeline.inspection import inspect_dataset
from data_pipeline.shards import ShardWriter, make_manifest
from tests.datasets import sample_files, write_raw_tar


def _good_shards(root: str, n_shards: int, per: int) -> list[dict]:
    out = []
    for j in range(n_shards):
        w = ShardWriter(root, prefix=f"good{j}", write_manifest=False)
        for i in range(per):
            w.write(f"g{j}_{i:03d}", sample_files(100 * j + i))
        w.close()
        out += w.shards
    return out


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("broken"))
    shards = _good_shards(root, 4, 10)
    good = sample_files(999)
    raw = write_raw_tar(os.path.join(root, "bad-samples.tar"), [
        ("b1.png", b"\x89PNG\r\n\x1a\nthis is not a png at all"), ("b1.cls", b"1"),
        ("b2.png", b""), ("b2.cls", b"2"),
        ("b3.txt", b"a caption without an image"), ("b3.cls", b"3"),
        ("b4.png", good["png"]), ("b4.json", b"{not json"),
        ("b5.png", good["png"]), ("b5.txt", b"fine"), ("b5.cls", b"5"),
    ])
    shards.append({"name": "bad-samples.tar", "samples": 5, "bytes": len(raw), "sha256": ""})
    # A shard cut in the middle of the data of sample 6's first member: samples 0-5 survive.
    w = ShardWriter(root, prefix="cut", write_manifest=False)
    for i in range(10):
        w.write(f"t{i:03d}", sample_files(500 + i))
    w.close()
    path = os.path.join(root, w.shards[0]["name"])
    data = open(path, "rb").read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith("t006."))
    with open(path, "wb") as f:
        f.write(data[: member.offset_data + member.size // 2])
    shards.append({**w.shards[0], "bytes": member.offset_data + member.size // 2})
    with open(os.path.join(root, "garbage.tar"), "wb") as f:
        f.write(os.urandom(30_000))
    shards.append({"name": "garbage.tar", "samples": 5, "bytes": 30_000, "sha256": ""})
    open(os.path.join(root, "empty.tar"), "wb").close()
    shards.append({"name": "empty.tar", "samples": 2, "bytes": 0, "sha256": ""})
    shards.append({"name": "missing.tar", "samples": 10, "bytes": 1, "sha256": ""})
    storage.write_json(os.path.join(root, "manifest.json"), make_manifest(shards))
    good_keys = {f"g{j}_{i:03d}" for j in range(4) for i in range(10)} | {"b5"} | {f"t{i:03d}" for i in range(6)}
    return root, good_keys


EXPECTED = {"corrupt_image": 1, "empty_image": 1, "missing_image": 1, "corrupt_metadata": 1,
            "truncated_shard": 1, "unreadable_shard": 3}
EXPECTED_LOST = 4 + 5 + 2 + 10  # the cut shard's tail, garbage, empty and missing shards


def test_stream_skips_and_counts_every_kind_of_bad_input(broken):
    root, good_keys = broken
    loader = image_loader(DataConfig(url=root, resolution=8, shuffle_buffer=8, retries=1, retry_backoff=0.01),
                          6, num_workers=2, max_epochs=1)
    keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == sorted(good_keys)
    d = loader.defects
    assert dict(d.by_reason) == EXPECTED
    assert d.lost_samples == EXPECTED_LOST
    assert all({"shard", "key", "reason"} <= set(ex) for ex in d.examples)
    assert {ex["key"] for ex in d.examples if ex["key"]} == {"b1", "b2", "b3", "b4"}
    state = loader.state_dict()
    assert state["defects"]["by_reason"] == EXPECTED and state["samples"] == len(good_keys)


def test_endless_stream_survives_bad_input_across_epochs(broken):
    root, good_keys = broken
    loader = image_loader(DataConfig(url=root, resolution=8, shuffle_buffer=8, retries=0), 8, num_workers=2)
    seen = []
    for _, batch in zip(range(20), loader):  # about three epochs
        assert len(batch["key"]) == 8
        seen += batch["key"]
    assert set(seen) == good_keys
    assert loader.defects.by_reason["unreadable_shard"] >= 6


def test_inspect_reports_the_same_defects(broken):
    root, good_keys = broken
    summary = inspect_dataset(root, retries=0, progress=False)
    assert summary["shards"] == 9
    assert summary["samples"] == len(good_keys)
    assert summary["defects"]["by_reason"] == EXPECTED
    assert summary["defects"]["total"] == sum(EXPECTED.values())
    assert summary["lost_samples"] == EXPECTED_LOST
    assert summary["filtered"]["total"] == 0
    assert {"shard", "key", "reason"} <= set(summary["defects"]["examples"][0])
    json.dumps(summary)


def test_a_dataset_with_nothing_usable_is_an_error_not_a_hang(tmp_path):
    from data_pipeline.sources import DataError

    root = str(tmp_path)
    for j in range(2):
        write_raw_tar(os.path.join(root, f"bad{j}.tar"), [(f"k{i}.png", b"broken") for i in range(5)])
    loader = image_loader(DataConfig(url=root, resolution=8, shuffle_buffer=4), 4, num_workers=0)
    with pytest.raises(DataError, match="no usable sample"):
        next(iter(loader))


def test_metadata_filters_are_counted_apart_from_defects(tmp_path):
    root = str(tmp_path)
    metas = [{"width": 300, "height": 300, "pwatermark": 0.1},
             {"width": 50, "height": 300, "pwatermark": 0.1},     # min_width
             {"width": 900, "height": 300, "pwatermark": 0.1},    # max_aspect (3.0)
             {"width": 300, "height": 300, "pwatermark": 0.9},    # max_pwatermark
             {"width": 300, "height": 300, "similarity": 0.1},    # min_similarity
             {"width": 300, "height": 300}]                       # lacks the fields: kept
    w = ShardWriter(root, prefix="f", max_samples=3)
    for i, m in enumerate(metas * 2):
        w.write(f"k{i:02d}", sample_files(i, meta=m))
    w.close()
    filters = FilterConfig(min_width=64, max_aspect=2.0, field_max={"pwatermark": 0.5},
                           field_min={"similarity": 0.3})
    loader = image_loader(DataConfig(url=root, resolution=8, filters=filters), 2, num_workers=2, max_epochs=1)
    keys = sorted(k for b in loader for k in b["key"])
    assert keys == ["k00", "k05", "k06", "k11"]
    want = {"min_width": 2, "max_aspect": 2, "max_pwatermark": 2, "min_similarity": 2}
    assert dict(loader.defects.filtered) == want and loader.defects.total == 0
    summary = inspect_dataset(root, filters=filters, progress=False)
    assert summary["samples"] == 4 and summary["filtered"] == {"total": 8, "by_rule": dict(sorted(want.items()))}
    strict = FilterConfig(field_min={"similarity": 0.3}, require_fields=True)
    assert inspect_dataset(root, filters=strict, progress=False)["samples"] == 0
