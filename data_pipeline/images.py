"""Image samples: metadata filters, late decoding, crop and resize, collation.

Decoding happens in the dataloader workers only when a sample leaves the shuffle buffer. JPEGs
use PIL's draft mode, which lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is
that much smaller; the shorter side is then resized (bicubic, antialiased) to the target
resolution and a square is cropped, at random or in the centre.

Workers emit ``uint8`` batches ``[B,3,H,W]`` stored channels-last (a quarter of the bytes of
float through the worker pipes);
:func:`to_model_range` turns them into the float ``[-1, 1]`` images of DESIGN.md in the main
process, on the GPU when one is given, and keeps them channels-last (``data.channels_last``): a
convolution given an NHWC input computes in NHWC and returns NHWC, so the conv parts (CNN
VQGAN, the discriminators, LPIPS' VGG) run channels-last without converting their weights, which
DeepSpeed's flat parameter buffers would undo anyway.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import get_worker_info

from . import storage
from .config import DataConfig, FilterConfig
from .defects import (CORRUPT_IMAGE, CORRUPT_METADATA, EMPTY_IMAGE, MISSING_IMAGE, SampleDefect,
                      SampleFiltered)
from .shards import IMAGE_EXTS
from .sources import open_sources
from .stream import StreamingLoader, StreamSpec

Image.MAX_IMAGE_PIXELS = 20_000 * 20_000  # real photos can be large; bombs beyond this are defects


def image_bytes(files: dict[str, bytes]) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in files:
            data = files[ext]
            if not data:
                raise SampleDefect(EMPTY_IMAGE, f"{ext} is 0 bytes")
            return data
    raise SampleDefect(MISSING_IMAGE, f"files: {sorted(files)}")


def read_metadata(files: dict[str, bytes]) -> dict[str, Any]:
    raw = files.get("json")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise SampleDefect(CORRUPT_METADATA, f"json: {e}") from None
    if not isinstance(meta, dict):
        raise SampleDefect(CORRUPT_METADATA, "json is not an object")
    return meta


def read_label(files: dict[str, bytes], meta: dict[str, Any]) -> int:
    raw = files.get("cls")
    try:
        if raw is not None and raw.strip():
            return int(raw.decode().strip())
        if "label" in meta and meta["label"] is not None:
            return int(meta["label"])
    except (ValueError, UnicodeDecodeError, TypeError) as e:
        raise SampleDefect(CORRUPT_METADATA, f"label: {e}") from None
    return -1


def read_caption(files: dict[str, bytes]) -> str:
    raw = files.get("txt")
    return raw.decode("utf-8", errors="replace").strip() if raw else ""


def size_filter_reason(cfg: FilterConfig, width: float, height: float) -> str | None:
    if width < cfg.min_width:
        return "min_width"
    if height < cfg.min_height:
        return "min_height"
    aspect = width / max(height, 1)
    if cfg.min_aspect and aspect < cfg.min_aspect:
        return "min_aspect"
    if cfg.max_aspect and aspect > cfg.max_aspect:
        return "max_aspect"
    return None


@dataclass(frozen=True)
class MetadataFilter:
    """Prefilter on ``KEY.json`` before a sample enters the shuffle buffer (cheap: no decode).

    Returns the name of the rule that rejects the sample, or None. Unparseable metadata is left
    for the decoder, which counts it as a defect.
    """

    cfg: FilterConfig

    def __call__(self, files: dict[str, bytes]) -> str | None:
        try:
            meta = read_metadata(files)
        except SampleDefect:
            return None
        w, h = meta.get("width"), meta.get("height")
        if isinstance(w, (int, float)) and isinstance(h, (int, float)):
            reason = size_filter_reason(self.cfg, w, h)
            if reason:
                return reason
        for bounds, name, bad in ((self.cfg.field_min, "min", lambda v, b: v < b),
                                  (self.cfg.field_max, "max", lambda v, b: v > b)):
            for key, bound in bounds.items():
                v = meta.get(key)
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    if self.cfg.require_fields:
                        return f"missing_{key}"
                    continue
                if bad(v, bound):
                    return f"{name}_{key}"
        return None


def decode_image(data: bytes, resolution: int | None = None, draft: bool = True) -> Image.Image:
    """Decode to RGB; with ``resolution``, JPEG is drafted to the smallest scale whose shorter
    side still covers it. Any failure is a ``corrupt_image`` defect."""
    try:
        img = Image.open(io.BytesIO(data))
        if draft and resolution and img.format == "JPEG":
            w, h = img.size
            s = resolution / min(w, h)
            img.draft("RGB", (max(1, int(np.ceil(w * s))), max(1, int(np.ceil(h * s)))))
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")  # convert() copies even RGB
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            EOFError) as e:
        raise SampleDefect(CORRUPT_IMAGE, repr(e)[:200]) from None


def resize_crop(img: Image.Image, resolution: int, crop: str, rng: np.random.Generator | None) -> Image.Image:
    """Resize the shorter side to ``resolution`` and crop a square (random or centre)."""
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
    if crop == "random" and rng is not None:
        x = int(rng.integers(nw - resolution + 1))
        y = int(rng.integers(nh - resolution + 1))
    else:
        x, y = (nw - resolution) // 2, (nh - resolution) // 2
    if (nw, nh) != (resolution, resolution):
        img = img.crop((x, y, x + resolution, y + resolution))
    return img


@dataclass(frozen=True)
class ImageDecoder:
    """raw sample files -> ``{image: uint8 [H,W,3], label, caption, key}`` or a defect."""

    resolution: int
    crop: str = "random"
    filters: FilterConfig = FilterConfig()

    def __call__(self, files: dict[str, bytes], key: str, rng: np.random.Generator | None) -> dict[str, Any]:
        data = image_bytes(files)
        meta = read_metadata(files)
        label = read_label(files, meta)
        img = decode_image(data, self.resolution)
        if self.filters.active and not ("width" in meta and "height" in meta):
            # Without metadata sizes the size rules apply to the decoded (drafted) image, whose
            # scale is a power of two: use the header size it came from.
            w, h = Image.open(io.BytesIO(data)).size
            reason = size_filter_reason(self.filters, w, h)
            if reason:
                raise SampleFiltered(reason)
        img = resize_crop(img, self.resolution, self.crop, rng)
        # HWC as PIL lays it out; collate stacks HWC (a plain copy) and permutes the batch, which
        # is 10x cheaper than stacking CHW views and leaves the batch channels-last in memory.
        return {"image": torch.from_numpy(np.array(img, dtype=np.uint8)), "label": label,
                "caption": read_caption(files), "key": key}


def stack_shared(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``, written straight into shared memory inside a dataloader worker, so the
    batch is not copied again on its way to the main process (what torch's default collate does)."""
    if get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    storage = first.untyped_storage()._new_shared(len(tensors) * first.numel() * first.element_size())
    out = first.new(storage).resize_(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


def collate_images(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": stack_shared([s["image"] for s in samples]).permute(0, 3, 1, 2),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
    }


def to_model_range(batch: dict[str, Any], device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32, channels_last: bool = True) -> dict[str, Any]:
    """uint8 ``[B,3,H,W]`` -> float in ``[-1, 1]`` (on ``device``, copied without blocking),
    channels-last in memory, or NCHW-contiguous with ``channels_last=False``."""
    img = batch["image"]
    if device is not None:
        img = img.to(device, non_blocking=True)
        batch["label"] = batch["label"].to(device, non_blocking=True)
    # The workers' batches are already NHWC in memory, so this is a copy only for other callers.
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    batch["image"] = img.to(dtype, memory_format=fmt).div_(127.5).sub_(1.0)
    return batch


class ToModelRange:
    """Picklable postprocess for :class:`~data_pipeline.stream.StreamingLoader`."""

    def __init__(self, device=None, dtype=torch.float32, channels_last: bool = True):
        self.device, self.dtype, self.channels_last = device, dtype, channels_last

    def __call__(self, batch):
        return to_model_range(batch, self.device, self.dtype, self.channels_last)


def image_loader(cfg: DataConfig, batch_size: int, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, max_epochs: int | None = None,
                 drop_last: bool = False, device=None, num_workers: int | None = None,
                 crop: str | None = None, to_float: bool = True):
    """The streaming image loader for ``cfg.url`` (see :mod:`data_pipeline.stream`).

    Batches hold float images in ``[-1, 1]`` on ``device``; ``to_float=False`` keeps the uint8
    batches the workers made (for a caller that converts on its own device).
    """
    if cfg.s3_endpoint_url:
        storage.configure("s3", endpoint_url=cfg.s3_endpoint_url)
    spec = StreamSpec(
        sources=open_sources(cfg.url),
        decode=ImageDecoder(cfg.resolution, crop or cfg.crop, cfg.filters),
        collate=collate_images,
        batch_size=batch_size,
        seed=seed,
        prefilter=MetadataFilter(cfg.filters) if cfg.filters.active else None,
        shuffle_buffer=cfg.shuffle_buffer,
        interleave=cfg.interleave,
        retries=cfg.retries,
        retry_backoff=cfg.retry_backoff,
        retry_for_s=cfg.retry_for_s,
        verify_checksums=cfg.verify_checksums,
        max_epochs=max_epochs,
        drop_last=drop_last,
    )
    return StreamingLoader(spec, rank=rank, world_size=world_size,
                           num_workers=cfg.num_workers if num_workers is None else num_workers,
                           pin_memory=cfg.pin_memory, prefetch_factor=cfg.prefetch_factor,
                           postprocess=ToModelRange(device, channels_last=cfg.channels_last) if to_float else None)
