"""Reconstruction quality of a tokenizer: encode, decode, compare with the input, over a whole
validation set.

Metrics, each per image and then averaged over the images (the tokenizer tables of VQGAN, ViT-VQGAN,
Regularized VQ and MQ-VAE report these):

- PSNR on the ``[0, 1]`` range, ``10 log10(1 / MSE)`` with the MSE over all pixels and channels of
  one image. An exact reconstruction (MSE 0) scores :data:`PSNR_MAX_DB` (100 dB) instead of
  infinity, so the mean stays finite. Tokenizers score 20-35 dB; only (near-)exact
  reconstructions reach the cap (one value off by one level of 255 in a 256x256 image: 101 dB).
- SSIM (Wang, Bovik, Sheikh & Simoncelli, "Image Quality Assessment: From Error Visibility to
  Structural Similarity", IEEE TIP 2004): the 11x11 Gaussian window with sigma 1.5, ``K1 = 0.01``,
  ``K2 = 0.03``, population (not sample) covariances, the mean of the SSIM map over the positions
  where the window fits (no padding), per channel, averaged over the channels. This is
  ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=...)``; the paper's MATLAB code
  additionally downsamples large images first, which neither skimage nor this does.
- LPIPS (Zhang, Isola, Efros, Shechtman & Wang, "The Unreasonable Effectiveness of Deep Features
  as a Perceptual Metric", CVPR 2018), VGG16 "lin", from ``model_zoo.losses.LPIPS`` with pretrained
  weights from a path or the cache. Without weights LPIPS is skipped with a note, not faked.
- rFID (FID of Heusel, Ramsauer, Unterthiner, Nessler & Hochreiter, "GANs Trained by a Two
  Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS 2017, between the
  reconstructions and their own originals): the Fréchet distance (``evals.stats``) between
  Gaussians fitted to ``features(images)["pool"]`` of both sets. ``features`` is any callable on
  float ``[-1, 1]`` images (``evals.inception.load_inception()`` for comparable numbers); without
  it rFID is skipped with a note.
- The codebook statistics of evals/codebook.py over the same tokens.

Reconstructions are clamped to ``[-1, 1]`` and rounded to 8-bit levels before scoring: the scores
are those of the images a user would save, and originals and reconstructions are then on the same
grid (the originals come from 8-bit files).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from model_zoo.grids import save_grid
from model_zoo.losses import LPIPS, LPIPSWeightsNotFound

from .codebook import CodebookStats, TokenStream, default_device, load_tokenizer, plot_histogram
from .report import sibling_url, write_result
from .stats import frechet_distance

__all__ = ["PSNR_MAX_DB", "psnr", "ssim", "FeatureMoments", "evaluate_reconstruction"]

PSNR_MAX_DB = 100.0
GRID_IMAGES = 16   # originals and their reconstructions shown in the PNG grid
GRID_COLS = 8


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, max_db: float = PSNR_MAX_DB) -> torch.Tensor:
    """Per-image PSNR in dB (float64 ``[B]``) of ``[B, ...]`` images; capped at ``max_db``."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    floor = data_range ** 2 * 10.0 ** (-max_db / 10.0)   # the MSE that gives exactly max_db
    return 10.0 * torch.log10(data_range ** 2 / mse.clamp_min(floor))


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-x * x / (2.0 * sigma * sigma))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM (float64 ``[B]``) of ``[B, C, H, W]`` images (Wang et al. 2004; see the module doc)."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two [B, C, H, W] tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    b, c, h, w = x.shape
    if min(h, w) < win_size:
        raise ValueError(f"images of {h}x{w} are smaller than the {win_size}x{win_size} SSIM window")
    # float64: the (co)variances are differences of near-equal local means of squares.
    x, y = x.double(), y.double()
    g = _gaussian_window(win_size, sigma).to(x.device)
    # The five local means at once, one separable Gaussian blur, "valid": only full windows count.
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    n = stack.shape[1]
    blurred = F.conv2d(stack, g.view(1, 1, 1, -1).expand(n, 1, 1, win_size), groups=n)
    blurred = F.conv2d(blurred, g.view(1, 1, -1, 1).expand(n, 1, win_size, 1), groups=n)
    mx, my, mxx, myy, mxy = blurred.split(c, dim=1)
    vx, vy, cxy = mxx - mx * mx, myy - my * my, mxy - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(2, 3)).mean(dim=1)


class FeatureMoments:
    """Mean and covariance of feature batches, accumulated without keeping the features
    (``[50000, 2048]`` would be 400 MB per set). Sums are float64 and shifted by the first batch's
    mean, so ``E[xx^T] - mu mu^T`` does not cancel away the covariance; the covariance uses
    ``N - 1`` like ``evals.stats.feature_stats`` (np.cov)."""

    def __init__(self):
        self.n = 0
        self.shift = self.sum = self.outer = None

    def update(self, feats: torch.Tensor) -> None:
        f = feats.detach().double().flatten(1)
        if self.shift is None:
            self.shift = f.mean(0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        d = f - self.shift
        self.sum += d.sum(0)
        self.outer += d.T @ d
        self.n += f.shape[0]

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}")
        m = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(m, m)) / (self.n - 1)
        return (self.shift + m).cpu().numpy(), cov.cpu().numpy()


def _extractor_name(features) -> str | None:
    if features is None:
        return None
    return str(getattr(features, "name", None) or type(features).__name__)


def _extractor_identity(features) -> dict[str, Any] | None:
    """What pins the extractor down beyond its name (InceptionFeatures: weights sha256, resize)."""
    ident = getattr(features, "identity", None)
    return dict(ident()) if callable(ident) else None


def _load_lpips(lpips, device, notes: list[str]):
    """The LPIPS module to use, or None (with the reason in ``notes``)."""
    if lpips is False:
        notes.append("LPIPS skipped: disabled by the caller (lpips=False)")
        return None
    if lpips is None:
        try:
            lpips = LPIPS()   # pretrained, from the cache: lpips_weight_candidates()
        except LPIPSWeightsNotFound as e:
            notes.append(f"LPIPS skipped: pretrained weights not found ({str(e).splitlines()[0]})")
            return None
    if getattr(lpips, "source", None) == "random":
        notes.append("LPIPS computed with RANDOM weights: not comparable with published numbers")
    return lpips.to(device).eval()


def _lpips_source(net) -> str | None:
    """Where the LPIPS weights came from (a path, or "random"), for the protocol block."""
    return None if net is None else str(getattr(net, "source", None) or type(net).__name__)


def _to_8bit(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def _finite_mean(values: list[torch.Tensor]) -> float | None:
    if not values:
        return None
    v = float(torch.cat(values).double().mean())
    return v if math.isfinite(v) else None


@torch.no_grad()
def evaluate_reconstruction(ckpt: str, data_url: str, out_url: str | None = None,
                            features: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None,
                            lpips=None, resolution: int | None = None, batch_size: int = 32,
                            max_images: int | None = None, device=None, progress: bool = True,
                            num_workers: int | None = None) -> dict[str, Any]:
    """Reconstruction metrics of the tokenizer at ``ckpt`` (zoo package, run dir or step folder)
    over one pass of ``data_url``; see the module doc for the metrics.

    ``features``: a callable on float ``[-1, 1]`` images returning ``{"pool": [B, D], ...}``
    (None: rFID skipped). ``lpips``: an LPIPS module (``forward(x, y) -> [B]``), None to load the
    pretrained one from the cache (skipped with a note when absent), or False to skip.
    ``resolution``: default the tokenizer's ``image_size``. With ``out_url`` the result is written
    there as JSON, with ``<stem>_grid.png`` (rows of originals, each followed by a row of their
    reconstructions) and ``<stem>_codebook.png`` (the codebook histogram) next to it.
    """
    device = default_device(device)
    tokenizer, identity = load_tokenizer(ckpt, device)
    notes: list[str] = []
    lpips_net = _load_lpips(lpips, device, notes)
    if features is None:
        notes.append("rFID skipped: no feature extractor given (features=None)")
    gh, gw = (int(v) for v in tokenizer.grid_size)
    stats = CodebookStats(tokenizer.codebook_size, num_positions=gh * gw)
    real_m, fake_m = FeatureMoments(), FeatureMoments()
    per_image: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": [], "lpips": [], "mse": []}
    shown: list[tuple[torch.Tensor, torch.Tensor]] = []
    n_shown = 0

    stream = TokenStream(tokenizer, data_url, resolution, batch_size, max_images, device, num_workers,
                         progress, desc="reconstruction")
    for images, tokens in stream:
        stats.update(tokens.codes, tokens.positions)
        recon = _to_8bit(tokenizer.decode(tokens.codes, tokens.positions))
        real = images.float()
        if recon.shape != real.shape:
            raise ValueError(f"the tokenizer decodes {tuple(real.shape)} images to {tuple(recon.shape)}")
        x01, y01 = (real + 1) / 2, (recon + 1) / 2
        per_image["mse"].append((x01.double() - y01.double()).pow(2).flatten(1).mean(1).cpu())
        per_image["psnr"].append(psnr(x01, y01).cpu())
        per_image["ssim"].append(ssim(x01, y01).cpu())
        if lpips_net is not None:
            per_image["lpips"].append(lpips_net(real, recon).float().reshape(-1).cpu())
        if features is not None:
            real_m.update(features(real)["pool"])
            fake_m.update(features(recon)["pool"])
        if n_shown < GRID_IMAGES:
            k = min(GRID_IMAGES - n_shown, real.shape[0])
            shown.append((real[:k].cpu(), recon[:k].cpu()))
            n_shown += k

    rfid = None
    if features is not None:
        if stream.images < 2:
            notes.append(f"rFID skipped: {stream.images} image(s), a covariance needs at least 2")
        else:
            rfid = frechet_distance(*real_m.stats(), *fake_m.stats())
            dim = real_m.outer.shape[0]
            if stream.images <= dim:
                notes.append(f"rFID from {stream.images} images of {dim}-d features: the covariances are "
                             f"rank-deficient and the value is biased upwards; use many more images")

    result: dict[str, Any] = {
        "protocol": {"task": "reconstruction", "ckpt": ckpt, "tokenizer": identity, **stream.protocol(),
                     "feature_extractor": _extractor_name(features),
                     "feature_extractor_identity": _extractor_identity(features),
                     "lpips": _lpips_source(lpips_net),
                     "range": "psnr/ssim on [0, 1]; reconstructions clamped and rounded to 8 bits",
                     "psnr_max_db": PSNR_MAX_DB},
        "psnr": _finite_mean(per_image["psnr"]),
        "ssim": _finite_mean(per_image["ssim"]),
        "lpips": _finite_mean(per_image["lpips"]),
        "rfid": rfid,
        "mse": _finite_mean(per_image["mse"]),
        "codebook": stats.summary(),
        "defects": stream.defects,
        "notes": notes,
        "seconds": stream.seconds,
        "images_per_s": stream.images / stream.seconds if stream.seconds else None,
    }
    if out_url is not None:
        files = {"codebook_histogram": sibling_url(out_url, "_codebook.png")}
        plot_histogram(stats.counts, files["codebook_histogram"], title=identity["name"])
        if shown:
            real_s = torch.cat([r for r, _ in shown])
            recon_s = torch.cat([f for _, f in shown])
            cols = min(GRID_COLS, real_s.shape[0])
            keep = real_s.shape[0] // cols * cols   # whole rows only, so each pair stays aligned
            # Interleave rows: each row of originals directly above its reconstructions.
            rows = []
            for i in range(0, keep, cols):
                rows += [real_s[i:i + cols], recon_s[i:i + cols]]
            files["grid"] = sibling_url(out_url, "_grid.png")
            save_grid(torch.cat(rows), files["grid"], ncol=cols)
        write_result(result, out_url, files, identity["package"])
    return result
