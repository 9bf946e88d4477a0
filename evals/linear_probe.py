"""Linear probes of frozen features: the representation-quality evaluation of VIM.

Yu et al., "Vector-quantized Image Modeling with Improved VQGAN" (2022), evaluate VIM by
average-pooling the token features of an intermediate transformer block and training a linear
classifier on them, following iGPT (Chen et al., "Generative Pretraining from Pixels", 2020),
and report top-1 as a function of depth. This module owns that protocol once features exist:
standardize with the training split's statistics, fit a full-batch multinomial logistic
regression (L-BFGS), choose its L2 weight decay on a validation slice carved from the training
split, refit on the whole training split, and report held-out top-1; plus a sweep over layers
(:func:`probe_layers`) and the accuracy-vs-depth plot (:func:`plot_probe`).

Extracting the features (``prior.features(codes, condition, layer)``) is the caller's job.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F


from .plots import new_figure, save_figure

__all__ = ["DEFAULT_WEIGHT_DECAYS", "fit_linear_probe", "probe_layers", "plot_probe"]

# Coefficients of 0.5 * wd * ||W||^2 added to the mean cross-entropy on standardized features.
DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _as_tensor(x: Any, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(device=device if device is not None else t.device, dtype=dtype)


def _standardize(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean = train_x.mean(0, keepdim=True)
    # Constant features (std 0) would blow up; they carry no signal, so divide by 1 instead.
    std = train_x.std(0, unbiased=False, keepdim=True)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return [(t - mean) / std for t in (train_x, *others)]


def _fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
         max_iter: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Full-batch L-BFGS on mean cross-entropy + 0.5 * wd * ||W||^2 (bias not decayed).

    The problem is convex, so a zero initialization makes the result depend on the data only
    (no seed needed here; the seed only chooses the validation slice)."""
    w = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    iters = int(opt.state[w].get("n_iter", 0))
    return w.detach(), b.detach(), iters


@torch.no_grad()
def _top1(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    if len(y) == 0:
        return float("nan")
    return float(((x @ w + b).argmax(1) == y).double().mean())


def _val_split(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stratified slice: the same fraction of every class, so rare classes are validated too."""
    g = torch.Generator().manual_seed(seed)
    y_cpu = y.cpu()
    val: list[torch.Tensor] = []
    for c in torch.unique(y_cpu):
        idx = torch.nonzero(y_cpu == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(fraction * len(idx)))
        if k >= len(idx):   # keep at least one training example of every class
            k = len(idx) - 1
        val.append(idx[:k])
    val_idx = torch.cat(val).sort().values
    mask = torch.ones(len(y_cpu), dtype=torch.bool)
    mask[val_idx] = False
    return torch.nonzero(mask).flatten().to(y.device), val_idx.to(y.device)


def fit_linear_probe(train_x: Any, train_y: Any, test_x: Any, test_y: Any,
                     num_classes: int | None = None, seed: int = 0,
                     weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
                     val_fraction: float = 0.1, max_iter: int = 300,
                     device: str | torch.device | None = None,
                     dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Train a linear classifier on ``train_x`` [N, D] and report top-1 on ``test_x`` [M, D].

    Inputs are numpy arrays or tensors (labels: integers ``0..C-1``). The weight decay is the
    one with the best top-1 on a stratified ``val_fraction`` slice of the training split (ties go
    to the larger decay); the final probe is refit on the whole training split with it. The same
    inputs and ``seed`` give the same result.

    Returns ``top1`` (held-out), ``train_top1``, ``weight_decay``, ``val_top1`` (per decay),
    ``num_classes``, ``num_train``, ``num_test``, ``dim``, ``iterations``, ``seed``.
    """
    dev = torch.device(device) if device is not None else None
    xtr, xte = _as_tensor(train_x, dtype, dev), _as_tensor(test_x, dtype, dev)
    ytr = _as_tensor(train_y, torch.long, xtr.device)
    yte = _as_tensor(test_y, torch.long, xtr.device)
    xte = xte.to(xtr.device)
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"features must be [N, D] with one D; got {tuple(xtr.shape)} and {tuple(xte.shape)}")
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError("features and labels differ in length")
    if len(xtr) < 2:
        raise ValueError("need at least 2 training examples")
    if not torch.isfinite(xtr).all() or not torch.isfinite(xte).all():
        raise ValueError("features contain NaN or Inf")
    top = int(max(ytr.max().item(), yte.max().item() if len(yte) else 0)) + 1
    num_classes = top if num_classes is None else int(num_classes)
    if int(min(ytr.min().item(), yte.min().item() if len(yte) else 0)) < 0 or top > num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    if not weight_decays:
        raise ValueError("weight_decays is empty")

    val_top1: dict[float, float] = {}
    tr_idx, val_idx = _val_split(ytr, val_fraction, seed)
    if len(weight_decays) > 1 and len(val_idx) > 0:
        # Statistics of the sub-split only, so the validation slice is truly unseen.
        sub_x, val_x = _standardize(xtr[tr_idx], xtr[val_idx])
        for wd in weight_decays:
            w, b, _ = _fit(sub_x, ytr[tr_idx], num_classes, float(wd), max_iter)
            val_top1[float(wd)] = _top1(val_x, ytr[val_idx], w, b)
        best = max(val_top1.items(), key=lambda kv: (kv[1], kv[0]))[0]
    else:
        best = float(weight_decays[0])

    xtr_s, xte_s = _standardize(xtr, xte)
    w, b, iters = _fit(xtr_s, ytr, num_classes, best, max_iter)
    return {
        "top1": _top1(xte_s, yte, w, b),
        "train_top1": _top1(xtr_s, ytr, w, b),
        "weight_decay": best,
        "val_top1": val_top1,
        "num_classes": num_classes,
        "num_train": int(len(xtr)),
        "num_test": int(len(xte)),
        "dim": int(xtr.shape[1]),
        "iterations": iters,
        "seed": int(seed),
    }


def probe_layers(features_by_layer: Mapping[Any, tuple[Any, Any]], train_y: Any, test_y: Any,
                 **kwargs: Any) -> dict[Any, float]:
    """One probe per layer: ``{layer: (train_x, test_x)}`` to ``{layer: top1}``.

    Keyword arguments go to :func:`fit_linear_probe` (same seed for every layer, so layers are
    compared on the same validation slice)."""
    return {layer: fit_linear_probe(tr, train_y, te, test_y, **kwargs)["top1"]
            for layer, (tr, te) in features_by_layer.items()}


def _depth(key: Any, position: int) -> float:
    try:
        return float(key)
    except (TypeError, ValueError):
        return float(position)


def plot_probe(results: Mapping[Any, Any], out_png_url: str, title: str = "linear probe",
               baselines: Mapping[str, float] | None = None) -> bytes:
    """Plot top-1 (%) against depth and write the PNG to ``out_png_url`` (any storage URL).

    ``results`` maps layer to top1 (a float in [0, 1], or a :func:`fit_linear_probe` dict).
    Numeric layer keys are placed at their depth; other keys in their given order. ``baselines``
    (name -> top1 in [0, 1], e.g. the raw-pixel probe) are drawn as dashed lines. Returns the
    PNG bytes."""
    points = []
    for pos, (key, val) in enumerate(results.items()):
        top1 = float(val["top1"] if isinstance(val, Mapping) else val)
        points.append((_depth(key, pos), str(key), 100.0 * top1))
    points.sort(key=lambda p: p[0])

    fig, ax = new_figure(6, 4)
    if points:
        xs, labels, ys = zip(*points)
        ax.plot(xs, ys, marker="o")
        ax.set_xticks(xs)
        ax.set_xticklabels(labels)
        finite = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        if finite:
            bx, by = max(finite, key=lambda p: p[1])
            ax.annotate(f"{by:.1f}%", (bx, by), textcoords="offset points", xytext=(0, 6), ha="center")
    drawn = {k: v for k, v in (baselines or {}).items() if v is not None and math.isfinite(v)}
    for (name, top1), style in zip(drawn.items(), ("--", ":", "-.")):
        ax.axhline(100.0 * top1, linestyle=style, color="gray", label=f"{name} {100.0 * top1:.1f}%")
    if drawn:
        ax.legend(loc="best")
    ax.set_xlabel("layer")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return save_figure(fig, out_png_url)
