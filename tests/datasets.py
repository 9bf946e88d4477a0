"""Small real datasets for the tests: tiny PNG/JPEG images in real webdataset shards, with shard
sizes and defects chosen by the test."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from PIL import Image

from data_pipeline import storage
from data_pipeline.shards import ShardWriter, make_manifest


def image_bytes(i: int, size: int = 12, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def sample_files(i: int, label: int | None = None, meta: dict | None = None, fmt: str = "png") -> dict[str, bytes]:
    label = i % 7 if label is None else label
    files = {fmt: image_bytes(i, fmt="JPEG" if fmt == "jpg" else "PNG"), "txt": f"sample {i}".encode(),
             "cls": str(label).encode()}
    m = {"width": 12, "height": 12, "label": label}
    m.update(meta or {})
    files["json"] = json.dumps(m).encode()
    return files


def make_dataset(root: str, sizes: list[int], prefix: str = "part", start: int = 0) -> list[str]:
    """Shards with ``sizes[j]`` samples each; keys are globally unique and returned in order."""
    keys = []
    n = start
    shards = []
    for j, size in enumerate(sizes):
        w = ShardWriter(root, prefix=f"{prefix}{j:03d}", max_samples=10**9, write_manifest=False)
        for _ in range(size):
            key = f"{prefix}{n:07d}"
            w.write(key, sample_files(n))
            keys.append(key)
            n += 1
        w.close()
        shards += w.shards
    storage.write_json(storage.join(root, "manifest.json"), make_manifest(shards))
    return keys


def write_raw_tar(url: str, members: list[tuple[str, bytes]]) -> bytes:
    """A tar with exactly these members (for hand-made defects); returns its bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    storage.write_bytes(url, raw)
    return raw
