"""``vqscale data inspect URL``: read a whole dataset and summarize it as JSON.

Every shard is streamed and every image decoded (JPEG in draft mode, which still runs the whole
entropy decoder, so corrupt data is found), with the same readers, decoders and defect reasons
as the training stream. Shards are read a few at a time by threads; memory stays flat however
large the dataset, since only per-label counts and the first defect examples are kept.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import storage
from .config import FilterConfig
from .defects import DefectLog, SampleDefect, SampleFiltered
from .images import (MetadataFilter, decode_image, image_bytes, read_caption, read_label,
                     read_metadata, size_filter_reason)
from .shards import ShardError, iter_shard
from .sources import Shard, open_sources


def _inspect_shard(shard: Shard, filters: FilterConfig, retries: int) -> dict[str, Any]:
    defects = DefectLog(log_first=0)
    labels: Counter[int] = Counter()
    samples = captions = 0
    prefilter = MetadataFilter(filters) if filters.active else None
    total = 0
    try:
        it = iter_shard(shard.url, retries=retries, sha256=shard.sha256)   # a changed shard: checksum_mismatch
        while True:
            try:
                _i, key, files = next(it)
            except StopIteration as stop:
                total = stop.value or 0
                break
            try:
                if prefilter is not None and (reason := prefilter(files)):
                    raise SampleFiltered(reason)
                data = image_bytes(files)
                meta = read_metadata(files)
                label = read_label(files, meta)
                img = decode_image(data, resolution=64)
                if filters.active and not ("width" in meta and "height" in meta):
                    from PIL import Image
                    import io

                    reason = size_filter_reason(filters, *Image.open(io.BytesIO(data)).size)
                    if reason:
                        raise SampleFiltered(reason)
                del img
            except SampleDefect as d:
                defects.defect(d.reason, shard.name, key, d.detail)
                continue
            except SampleFiltered as f:
                defects.filter(f.reason)
                continue
            samples += 1
            labels[label] += 1
            captions += bool(read_caption(files))
    except ShardError as e:
        defects.defect(e.reason, shard.name, detail=e.detail)
        total = e.read
    if shard.samples is not None and total < shard.samples:
        if not defects.by_reason:
            defects.defect("truncated_shard", shard.name, detail=f"{total} of {shard.samples} samples")
        defects.lost_samples += shard.samples - total
    nbytes = shard.bytes
    if nbytes is None:
        try:
            nbytes = storage.size(shard.url)
        except OSError:
            nbytes = 0
    return {"samples": samples, "captions": captions, "labels": labels, "bytes": nbytes,
            "defects": defects.to_state()}


def inspect_dataset(url: str, filters: FilterConfig | None = None, threads: int = 4,
                    retries: int = 2, progress: bool = True) -> dict[str, Any]:
    """The summary DESIGN.md and ``vqscale data inspect`` promise, as a dict."""
    from tqdm import tqdm

    filters = filters or FilterConfig()
    sources = open_sources(url)
    shards = [sh for src in sources for sh in src.shards]
    labels: Counter[int] = Counter()
    defects = DefectLog(log_first=0)
    samples = captions = nbytes = 0
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool, \
            tqdm(total=len(shards), desc=f"inspect {url}", unit="shard", disable=not progress) as bar:
        # map() keeps at most `threads` shards in flight beyond the results consumed.
        for part in pool.map(lambda sh: _inspect_shard(sh, filters, retries), shards):
            samples += part["samples"]
            captions += part["captions"]
            nbytes += part["bytes"]
            labels.update(part["labels"])
            defects.add_state(part["defects"])
            bar.update(1)
    summary = defects.summary()
    return {
        "url": url,
        "shards": len(shards),
        "manifest": all(src.manifest is not None for src in sources),
        "samples": samples,
        "bytes": nbytes,
        "defects": summary,
        "lost_samples": defects.lost_samples,
        "filtered": {"total": sum(defects.filtered.values()), "by_rule": dict(sorted(defects.filtered.items()))},
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "caption_fraction": round(captions / samples, 6) if samples else 0.0,
    }
