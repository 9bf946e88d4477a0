"""Image grids: the one layout of images vqscale writes (sample grids, reconstruction and eval
PNGs, TensorBoard images): row-major tiles on white, ``PAD`` pixels between and around them."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from data_pipeline import storage

__all__ = ["DEFAULT_NCOL", "PAD", "grid_shape", "image_grid", "save_grid"]

DEFAULT_NCOL = 8
PAD = 2   # white pixels between (and around) the images of a grid


def grid_shape(num: int, height: int, width: int, ncol: int = DEFAULT_NCOL, pad: int = PAD) -> tuple[int, int]:
    """``(H, W)`` in pixels of the grid of ``num`` images of ``height x width``."""
    ncol = max(1, min(ncol, num))
    nrow = math.ceil(num / ncol)
    return nrow * (height + pad) + pad, ncol * (width + pad) + pad


def image_grid(images: torch.Tensor, ncol: int = DEFAULT_NCOL, pad: int = PAD) -> np.ndarray:
    """float [-1, 1] ``[B, 3, H, W]`` -> uint8 ``[H', W', 3]``: row-major tiles on white."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    b, h, w, _ = arr.shape
    ncol = max(1, min(ncol, b))
    grid = np.full((*grid_shape(b, h, w, ncol, pad), 3), 255, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = arr[i]
    return grid


def save_grid(images: torch.Tensor, url: str, ncol: int = DEFAULT_NCOL) -> None:
    """float [-1, 1] ``[B, 3, H, W]`` -> a PNG grid, written atomically through the storage seam."""
    buf = io.BytesIO()
    Image.fromarray(image_grid(images, ncol)).save(buf, format="PNG")
    storage.write_bytes(url, buf.getvalue())
