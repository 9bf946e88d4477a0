"""Typed settings of the data pipeline (frozen dataclasses; the run config nests them).

Every field can be overridden on the command line, e.g. ``--set data.resolution=128`` or
``--set data.filters.field_max.pwatermark=0.8``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class FilterConfig:
    """Sample filters on the metadata in ``KEY.json``, as LAION users apply them.

    Width/height/aspect use the ``width``/``height`` fields of the metadata when present
    (img2dataset writes them), else the decoded image's size. ``field_min``/``field_max`` bound
    any numeric metadata field (``similarity``, ``pwatermark``, ``punsafe``, ...); a sample that
    lacks a bounded field is kept unless ``require_fields`` is set.
    """

    min_width: int = 0
    min_height: int = 0
    min_aspect: float = 0.0     # width / height; 0 disables
    max_aspect: float = 0.0     # 0 disables
    field_min: dict[str, float] = field(default_factory=dict)
    field_max: dict[str, float] = field(default_factory=dict)
    require_fields: bool = False

    @property
    def active(self) -> bool:
        return bool(self.min_width or self.min_height or self.min_aspect or self.max_aspect
                    or self.field_min or self.field_max)


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they become batches."""

    url: str = ""                      # dataset URL, or a mixture "URL::0.7,URL::0.3"
    resolution: int = 256              # square output side, pixels
    crop: Literal["random", "center"] = "random"
    num_workers: int = 2               # dataloader worker processes per rank
    shuffle_buffer: int = 1000         # samples (raw bytes) per worker and dataset
    interleave: int = 4                # shards read at once per worker
    prefetch_factor: int = 2
    pin_memory: bool = True            # used only when CUDA is available
    # Batches reach the model NHWC in memory (channels_last), the layout cuDNN's and oneDNN's conv
    # kernels run fastest; convolutions then keep it. False hands the model NCHW-contiguous images.
    channels_last: bool = True
    retries: int = 4                   # per read, with exponential backoff (at least this many tries) ...
    retry_backoff: float = 0.5         # seconds before the first retry (doubling, at most 10 s apart)
    # ... and for at least this long: a source that is down (an object store restarting) is waited
    # for this many seconds before the shard being read counts as lost.
    retry_for_s: float = 600.0
    # Lost samples (promised by a manifest, not delivered: broken shards, reads given up) over the
    # samples read so far, but over no less than one epoch: above this the run stops (status
    # "failed", one line). 1 never stops.
    max_lost_fraction: float = 0.01
    verify_checksums: bool = True      # a shard read to its end is checked against the manifest's sha256
    s3_endpoint_url: str = ""          # overrides AWS_ENDPOINT_URL when set
    filters: FilterConfig = field(default_factory=FilterConfig)
