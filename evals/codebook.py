"""Codebook usage of a tokenizer over a whole dataset, and the one streaming loop of the
tokenizer evaluations (this module's :func:`evaluate_codebook` and evals/reconstruction.py).

Statistics (:class:`CodebookStats`), over every token of every image, not one batch:

- ``usage``: the fraction of the ``K`` codes used at least once; ``dead_codes``: ``K`` minus the
  used ones, with the ids of the first ``max_listed`` of them.
- ``perplexity``: ``exp(H)`` with ``H = -sum_k p_k log p_k`` (nats) the entropy of the empirical
  code distribution: ``K`` for uniform use, 1 when one code takes every token. It is the
  "effective number of codes" that Yu et al. ("Vector-quantized Image Modeling with Improved
  VQGAN", 2021) and Zhang et al. ("Regularized Vector Quantization for Tokenized Image
  Synthesis", CVPR 2023) report to show codebook collapse, here over the dataset rather than
  the training batch (``model_zoo.quantizers`` logs the per-batch one during training).
- ``top_share``: the share of all tokens taken by the ``k`` most frequent codes.
- For masked tokenizers (MQ-VAE, Huang et al., CVPR 2023), which code only the kept positions:
  how often each grid position is kept (``positions`` block).

The streaming loop (:class:`TokenStream`): the tokenizer comes from a zoo package, a run directory
or a step folder (:func:`pretrain.resolve.as_package`), identified by the sha256 of its
``checksums.sha256`` as the tokenize job identifies it; the validation dataset is read once, in a
fixed order (seeded shard order, tar order inside a shard: no shuffle buffer, one shard at a time
per reader), decoded and centre-cropped at the tokenizer's resolution, and encoded in eval mode.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Iterator

import numpy as np
import torch

from data_pipeline import storage
from model_zoo.package import CHECKSUMS, load_package, read_config
from pretrain.resolve import as_package

from .passes import fixed_pass
from .plots import new_figure, save_figure
from .report import sibling_url, write_result

__all__ = ["CodebookStats", "plot_histogram", "load_tokenizer", "TokenStream", 
           "evaluate_codebook", "default_device"]

TOP_K = (1, 10, 100)


class CodebookStats:
    """Code counts accumulated over a dataset: :meth:`update` per batch, :meth:`summary` at the end.

    ``num_positions`` (the token grid's ``h * w``) enables the kept-position counts of masked
    tokenizers; without it ``positions`` given to :meth:`update` are ignored.
    """

    def __init__(self, codebook_size: int, num_positions: int | None = None):
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be positive, got {codebook_size}")
        self.codebook_size = int(codebook_size)
        self.num_positions = num_positions
        # int64 on the CPU: a 50k-image run at 1024 tokens is 5e7 tokens, far from any overflow,
        # and one device->host copy of K counts per batch is cheaper than copying the codes.
        self.counts = torch.zeros(self.codebook_size, dtype=torch.int64)
        self.position_counts = torch.zeros(num_positions or 0, dtype=torch.int64)
        self.images = 0

    def update(self, codes: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Count ``codes`` (long ``[B, N]``; any shape works, the first dim is the images)."""
        codes = torch.as_tensor(codes)
        if codes.numel():
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{lo}, {hi}]")
            self.counts += torch.bincount(codes.reshape(-1).long(), minlength=self.codebook_size).cpu()
        self.images += int(codes.shape[0]) if codes.ndim else 1
        if positions is not None and self.num_positions:
            positions = torch.as_tensor(positions).reshape(-1).long()
            if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= self.num_positions):
                raise ValueError(f"positions must lie in [0, {self.num_positions})")
            self.position_counts += torch.bincount(positions, minlength=self.num_positions).cpu()

    def summary(self, max_listed: int = 256) -> dict[str, Any]:
        counts = self.counts.numpy().astype(np.int64)
        tokens = int(counts.sum())
        used = int((counts > 0).sum())
        dead = np.flatnonzero(counts == 0)
        out: dict[str, Any] = {
            "codebook_size": self.codebook_size, "images": self.images, "tokens": tokens,
            "tokens_per_image": tokens / self.images if self.images else 0.0,
            "used_codes": used, "usage": used / self.codebook_size,
            "dead_codes": int(dead.size), "dead_code_ids": dead[:max_listed].tolist(),
            "dead_code_ids_truncated": bool(dead.size > max_listed),
        }
        if tokens:
            p = counts[counts > 0] / tokens
            entropy = float(-(p * np.log(p)).sum())
            desc = np.sort(counts)[::-1]
            out.update(entropy=entropy, perplexity=float(np.exp(entropy)),
                       top_share={str(k): float(desc[:k].sum() / tokens) for k in TOP_K
                                  if k <= self.codebook_size})
        else:   # no tokens: nothing to measure (not 0, which would read as total collapse)
            out.update(entropy=None, perplexity=None, top_share={})
        if self.num_positions and int(self.position_counts.sum()):
            pc = self.position_counts.numpy()
            out["positions"] = {"grid_positions": int(self.num_positions),
                                "ever_kept": int((pc > 0).sum()),
                                "kept_fraction_mean": float(pc.sum() / (self.images * self.num_positions)),
                                "kept_fraction_min": float(pc.min() / self.images),
                                "kept_fraction_max": float(pc.max() / self.images)}
        return out


def plot_histogram(counts, out_png_url: str, title: str = "codebook usage") -> bytes:
    """Code frequencies sorted from most to least used, log-scale y, written as a PNG to
    ``out_png_url`` (any storage URL); returns the PNG bytes. Dead codes cannot sit on a log
    axis, so they are named in the title instead."""
    c = np.asarray(counts.cpu() if hasattr(counts, "cpu") else counts, dtype=np.float64).reshape(-1)
    total = c.sum()
    desc = np.sort(c)[::-1]
    live = desc[desc > 0]
    fig, ax = new_figure(7, 4)
    if live.size:
        # One step per code, the last one closed at rank n + 1 so it has a width too.
        ranks = np.arange(1, live.size + 2)
        freq = np.append(live, live[-1]) / total
        ax.fill_between(ranks, freq, step="post", alpha=0.4)
        ax.step(ranks, freq, where="post")
        ax.axhline(1.0 / c.size, color="grey", linestyle="--", linewidth=1, label="uniform")
        ax.legend(loc="upper right")
        ax.set_yscale("log")
    ax.set_xlim(1, c.size + 1)
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("share of tokens")
    ax.set_title(f"{title}: {live.size}/{c.size} codes used, {c.size - live.size} dead")
    ax.grid(True, alpha=0.3)
    return save_figure(fig, out_png_url)


# ----------------------------------------------------------------------- shared streaming

def default_device(device=None) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def load_tokenizer(ckpt: str, device) -> tuple[torch.nn.Module, dict[str, str]]:
    """``(tokenizer in eval mode, {name, sha256, package})`` for a zoo package, run directory or
    step folder. The sha256 is that of ``checksums.sha256`` (which lists every file's sha256), the
    identity the tokenize job writes into code manifests, so results and code shards can be matched."""
    package = as_package(ckpt, kind="tokenizer")
    before = storage.read_bytes(storage.join(package, CHECKSUMS))
    model = load_package(package, device=device)
    if storage.read_bytes(storage.join(package, CHECKSUMS)) != before:
        raise RuntimeError(f"{package} was re-published while it was being loaded; run again")
    return model, {"name": read_config(package)["name"], "sha256": hashlib.sha256(before).hexdigest(),
                   "package": package}


class TokenStream:
    """One pass over ``data_url``: yields ``(images, tokens)`` with images float ``[-1, 1]``
    ``[B, 3, R, R]`` on ``device`` and ``tokens`` their ``encode`` (no grad). After the pass,
    ``images`` (count), ``defects`` (the loader's summary) and ``protocol()`` describe it.

    ``max_images`` keeps the first images of the fixed order above. That order, and so the subset,
    depends on the number of loader workers (their streams are interleaved), which the protocol
    records; without ``max_images`` the set of images is the whole dataset whatever the layout.
    """

    def __init__(self, tokenizer, data_url: str, resolution: int | None = None, batch_size: int = 32,
                 max_images: int | None = None, device=None, num_workers: int | None = None,
                 progress: bool = True, desc: str = "eval"):
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        self.tokenizer = tokenizer
        self.data_url = data_url
        self.resolution = int(resolution or tokenizer.image_size)
        self.batch_size = int(batch_size)
        self.max_images = max_images
        self.device = default_device(device)
        self.progress, self.desc = progress, desc
        self.loader, self.source, self.num_workers = fixed_pass(data_url, self.resolution, self.batch_size,
                                                                num_workers, self.device)
        self.images = 0
        self.defects: dict[str, Any] = {}
        self.seconds = 0.0

    def protocol(self) -> dict[str, Any]:
        return {"data": self.data_url, "num_images": self.images, "max_images": self.max_images,
                "resolution": self.resolution, "crop": "center",
                "loader": {"seed": 0, "workers": self.num_workers, "order": "seeded shard order, tar order"},
                "dataset_fingerprint": self.source.fingerprint}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        from tqdm import tqdm

        loader = self.loader
        total = self.source.total_samples
        if self.max_images is not None:
            total = self.max_images if total is None else min(total, self.max_images)
        dtype = next(self.tokenizer.parameters()).dtype
        start = time.perf_counter()
        it = iter(loader)
        try:
            with tqdm(total=total, desc=self.desc, unit="img", disable=not self.progress) as bar:
                for batch in it:
                    images = batch["image"]
                    if self.max_images is not None:
                        images = images[: self.max_images - self.images]
                    with torch.no_grad():
                        tokens = self.tokenizer.encode(images.to(dtype))
                    self.images += images.shape[0]
                    bar.update(images.shape[0])
                    yield images, tokens
                    if self.max_images is not None and self.images >= self.max_images:
                        break
        finally:
            it.close()   # shuts the loader's workers down now, also when max_images stops early
            self.defects = loader.defects.summary()
            self.seconds = time.perf_counter() - start


def evaluate_codebook(ckpt: str, data_url: str, out_url: str | None = None, resolution: int | None = None,
                      batch_size: int = 32, max_images: int | None = None, device=None,
                      num_workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Encode every image of ``data_url`` once (no decoding) and return the codebook statistics;
    with ``out_url``, also write them as JSON and the sorted histogram next to it
    (``<stem>_histogram.png``)."""
    device = default_device(device)
    tokenizer, identity = load_tokenizer(ckpt, device)
    gh, gw = (int(v) for v in tokenizer.grid_size)
    stats = CodebookStats(tokenizer.codebook_size, num_positions=gh * gw)
    stream = TokenStream(tokenizer, data_url, resolution, batch_size, max_images, device, num_workers,
                         progress, desc="codebook")
    for _images, tokens in stream:
        stats.update(tokens.codes, tokens.positions)
    result: dict[str, Any] = {
        "protocol": {"task": "codebook", "ckpt": ckpt, "tokenizer": identity, **stream.protocol()},
        "codebook": stats.summary(),
        "defects": stream.defects,
        "seconds": stream.seconds,
        "images_per_s": stream.images / stream.seconds if stream.seconds else None,
    }
    if out_url is not None:
        png = sibling_url(out_url, "_histogram.png")
        plot_histogram(stats.counts, png, title=identity["name"])
        write_result(result, out_url, {"histogram": png}, identity["package"])
    return result
