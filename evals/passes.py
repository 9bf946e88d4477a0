"""One pass over an image dataset the way every evaluation reads it: a single dataset (no
mixture), centre crop, and a fixed order: ``shuffle_buffer=1`` and ``interleave=1`` make each
reader go through its shards one at a time in tar order, so the pass (and any ``max_images``
subset at the same worker count) is the same on every run."""

from __future__ import annotations

from typing import Any

from data_pipeline.config import DataConfig
from data_pipeline.images import image_loader
from data_pipeline.sources import Source, open_sources


def single_source(url: str) -> Source:
    sources = open_sources(url)
    if len(sources) != 1:
        raise ValueError(f"evaluate one dataset at a time, got a mixture of {len(sources)}: {url}")
    return sources[0]


def fixed_pass(url: str, resolution: int, batch_size: int, num_workers: int | None = None, device=None,
               **loader_kwargs: Any):
    """``(loader, source, workers)`` for one fixed-order pass; ``loader_kwargs`` go to
    :func:`data_pipeline.images.image_loader` (e.g. ``to_float=False``)."""
    source = single_source(url)
    # More readers than shards is an error in the loader; two overlap decoding with the model,
    # which is all an evaluation needs.
    workers = min(DataConfig().num_workers if num_workers is None else num_workers, len(source.shards))
    cfg = DataConfig(url=url, resolution=int(resolution), crop="center", shuffle_buffer=1, interleave=1,
                     num_workers=workers)
    loader = image_loader(cfg, batch_size, seed=0, rank=0, world_size=1, max_epochs=1, device=device,
                          num_workers=workers, crop="center", **loader_kwargs)
    return loader, source, workers
