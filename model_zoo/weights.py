"""Reading weight files: one reader for every model_zoo loader (LPIPS, text encoders, ...).

A safetensors or torch file on any storage URL becomes a flat CPU state dict. Torch files are read
with ``weights_only=True``: a checkpoint from the internet must not run code. Local files are read
from their path (a torchvision VGG16 checkpoint is 528 MB: no extra bytes copy).
"""

from __future__ import annotations

import io

import torch
from torch import Tensor

from data_pipeline import storage


def load_state_dict_file(url: str) -> dict[str, Tensor]:
    """Read a safetensors or torch file (any storage URL) into a flat CPU state dict. Torch files
    are read with ``weights_only=True``: a checkpoint from the internet must not run code."""
    from safetensors.torch import load as st_load, load_file as st_load_file
    if not storage.is_remote(url):
        # Local: read from the path (a torchvision VGG16 checkpoint is 528 MB; no bytes copy).
        path = storage.local_path(url)
        with open(path, "rb") as f:
            head = f.read(9)
        if path.endswith(".safetensors") or head[8:9] == b"{":
            return dict(st_load_file(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    else:
        data = storage.read_bytes(url)
        if url.endswith(".safetensors") or data[8:9] == b"{":   # safetensors: u64 size, then JSON
            return dict(st_load(data))
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):   # common wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{url}: expected a state dict, got {type(obj).__name__}")
    return obj
