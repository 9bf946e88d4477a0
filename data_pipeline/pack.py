"""``vqscale data shard --src PATH --out URL``: pack images into webdataset shards.

Two inputs:

* an image folder: class sub-folders become labels (sorted names, 0..K-1; images directly in the
  root get -1), a sidecar ``NAME.txt`` becomes the caption;
* an existing img2dataset output (a folder or prefix of ``.tar`` shards, local or s3://): its
  samples are re-packed into shards of the target size, files kept as they are.

Optionally images are pre-resized (shorter side down to ``--resize``) so training does not decode
pixels it will throw away. Output streams shard by shard through the storage seam: nothing holds
more than one sample in memory, and writing to s3:// is a multipart upload per shard.
"""

from __future__ import annotations

import io
import json
import os
import re
from typing import Any, Iterator

from PIL import Image

from . import storage
from .defects import DefectLog, SampleDefect
from .images import decode_image, image_bytes, read_metadata
from .shards import DEFAULT_SHARD_BYTES, IMAGE_EXTS, ShardError, ShardWriter, iter_shard
from .sources import DataError, open_source

FOLDER_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def parse_size(text: str | int) -> int:
    """``"256MB"`` / ``"1.5GiB"`` / ``"100000"`` -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m:
        raise ValueError(f"bad size {text!r}: expected e.g. 256MB, 1GiB or a byte count")
    unit = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[m.group(2).lower()]
    return int(float(m.group(1)) * (1024 if m.group(3) or unit else 1000) ** unit)


def _resized(data: bytes, ext: str, resize: int) -> tuple[bytes, str, tuple[int, int]]:
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    if not resize or min(w, h) <= resize:
        return data, ext, (w, h)
    img = decode_image(data, resize)
    s = resize / min(img.size)
    img = img.resize((max(1, round(img.size[0] * s)), max(1, round(img.size[1] * s))), Image.BICUBIC)
    buf = io.BytesIO()
    if ext == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=95)
        ext = "jpg"
    return buf.getvalue(), ext, img.size


def _folder_samples(src: str, defects: DefectLog) -> Iterator[tuple[dict[str, bytes], dict[str, Any]]]:
    root = storage.local_path(src)
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    label_of = {c: i for i, c in enumerate(classes)}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        top = rel.split(os.sep)[0] if rel != "." else None
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in FOLDER_EXTS:
                continue
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                data = f.read()
            ext = ext.lower().lstrip(".")
            if ext not in IMAGE_EXTS:
                # Formats outside the shard layout are re-encoded losslessly.
                try:
                    img = decode_image(data)
                except SampleDefect as d:
                    defects.defect(d.reason, os.path.relpath(path, root), detail=d.detail)
                    continue
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                data, ext = buf.getvalue(), "png"
            files = {ext: data}
            cap = os.path.join(dirpath, stem + ".txt")
            if os.path.exists(cap):
                with open(cap, "rb") as f:
                    files["txt"] = f.read().strip()
            meta = {"source_path": os.path.relpath(path, root).replace(os.sep, "/")}
            if top is not None:
                meta["label"] = label_of[top]
                meta["class"] = top
                files["cls"] = str(label_of[top]).encode()
            yield files, meta


def _tar_samples(src: str, defects: DefectLog, retries: int) -> Iterator[tuple[dict[str, bytes], dict[str, Any]]]:
    source = open_source(src)
    for shard in source.shards:
        try:
            for _i, key, files in iter_shard(shard.url, retries=retries):
                try:
                    meta = read_metadata(files)
                except SampleDefect:
                    meta = {}
                files = dict(files)
                files.pop("json", None)
                meta.setdefault("source_key", f"{shard.name}/{key}")
                yield files, meta
        except ShardError as e:
            defects.defect(e.reason, shard.name, detail=e.detail)


def pack(src: str, out: str, shard_size: str | int = DEFAULT_SHARD_BYTES, shard_samples: int | None = None,
         resize: int = 0, prefix: str = "data", retries: int = 4, progress: bool = True) -> dict[str, Any]:
    """Pack ``src`` into shards under ``out``; returns the manifest (plus a ``defects`` summary)."""
    from tqdm import tqdm

    defects = DefectLog()
    is_tar_input = storage.is_remote(src) or "{" in src or src.endswith(".tar") or any(
        n.endswith(".tar") for n in storage.listdir(src))
    if not is_tar_input and not storage.isdir(src):
        raise DataError(f"--src {src!r} is neither an image folder nor a folder of .tar shards")
    extra: dict[str, Any] = {"source": src}
    if not is_tar_input:
        root = storage.local_path(src)
        extra["classes"] = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        samples = _folder_samples(src, defects)
    else:
        samples = _tar_samples(src, defects, retries)
    writer = ShardWriter(out, prefix=prefix, max_bytes=parse_size(shard_size), max_samples=shard_samples,
                         extra=extra)
    n = 0
    try:
        for files, meta in tqdm(samples, desc=f"shard -> {out}", unit="img", disable=not progress):
            try:
                data = image_bytes(files)
                ext = next(e for e in IMAGE_EXTS if e in files)
                data2, ext2, (w, h) = _resized(data, ext, resize)
            except (SampleDefect, OSError, ValueError) as e:
                reason = e.reason if isinstance(e, SampleDefect) else "corrupt_image"
                defects.defect(reason, meta.get("source_path") or meta.get("source_key", "?"), detail=str(e))
                continue
            files = {k: v for k, v in files.items() if k not in IMAGE_EXTS}
            files[ext2] = data2
            meta.update(width=w, height=h)
            files["json"] = json.dumps(meta).encode()
            writer.write(f"{n:09d}", files)
            n += 1
    except BaseException as e:
        writer.abort(e)
        raise
    writer.extra["defects"] = defects.summary()
    return writer.close()
