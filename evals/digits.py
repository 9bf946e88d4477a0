"""An offline judge of class-conditional samples on the demo data: a small digits CNN.

Class-conditional generators are scored by whether a pretrained classifier recognises the
requested class in their samples (the idea behind the Inception Score, Salimans et al., 2016,
and the classification accuracy score of Ravuri & Vinyals, 2019), and by a Fréchet distance in a
classifier's feature space (FID, Heusel et al., 2017), as VIM reports (Yu et al., "Vector-quantized
Image Modeling with Improved VQGAN", 2022). Inception weights only exist online; the demo dataset
(``data_pipeline.demo``) is mostly scikit-learn's handwritten digits, so this module owns a judge
that needs no download: a four-layer CNN trained in seconds on the real digits, rendered exactly
as ``build-demo`` renders them (``demo_samples``: 8x8 digits upscaled bicubic to 64x64, dark ink
on light paper, grey RGB, labels 0-9; labels 10+ are photo crops and are not judged).

The trained weights ship with the evals (``evals/assets/digits_judge.safetensors``);
:func:`train_digits_judge` (or ``python -m evals.digits``) recreates them deterministically.
Digits whose scikit-learn index is a multiple of 5 are held out of training and used to report
the judge's own accuracy. FID math itself lives in ``evals/stats.py``; :func:`judge_features`
only supplies the features.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import io
import json
import os
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load as st_load, save as st_save

from data_pipeline import storage
from data_pipeline.demo import demo_samples

__all__ = ["DigitsCNN", "DigitsJudge", "SHIPPED_PATH", "real_digits", "train_digits_judge",
           "load_digits_judge", "judge_samples", "judge_features"]

SHIPPED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "digits_judge.safetensors")
NUM_DIGITS = 10
HELDOUT_EVERY = 5      # sklearn digits with index % 5 == 0 are the held-out split
EPOCHS = 12
MAX_SHIFT = 6          # pixels at 64 px: three quarters of one original 8x8 pixel
FORMAT_VERSION = 1


def _demo_digit_size() -> int:
    # Read the renderer's own default so the judge follows it if the demo changes.
    return int(inspect.signature(demo_samples).parameters["digit_size"].default)


INPUT_SIZE = _demo_digit_size()


@functools.lru_cache(maxsize=1)
def _rendered_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All 1,797 digits through the demo's own renderer and PNG round trip: uint8 [N,H,W,3],
    labels, sklearn indices (sorted by index)."""
    from PIL import Image

    imgs, labels, index = [], [], []
    for _, files in demo_samples(digits=None, crops_per_photo=0):
        meta = json.loads(files["json"])
        imgs.append(np.asarray(Image.open(io.BytesIO(files["png"])).convert("RGB")))
        labels.append(int(meta["label"]))
        index.append(int(meta["index"]))
    order = np.argsort(index)
    return np.stack(imgs)[order], np.asarray(labels)[order], np.asarray(index)[order]


def real_digits(split: str = "heldout") -> tuple[torch.Tensor, torch.Tensor]:
    """Real demo digits as ``(images [N,3,64,64] in [-1,1], labels [N])``.

    ``split``: ``"train"`` (what the judge learns from), ``"heldout"`` (sklearn index % 5 == 0,
    never trained on) or ``"all"``."""
    imgs, labels, index = _rendered_digits()
    keep = {"train": index % HELDOUT_EVERY != 0, "heldout": index % HELDOUT_EVERY == 0,
            "all": np.ones(len(index), dtype=bool)}[split]
    x = torch.from_numpy(imgs[keep]).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return x, torch.from_numpy(labels[keep]).long()


class DigitsCNN(nn.Module):
    """Grey 64x64 in, 10 logits out; ``features`` is the 128-d penultimate layer (post-ReLU)."""

    def __init__(self, width: int = 16, feature_dim: int = 128, num_classes: int = NUM_DIGITS):
        super().__init__()

        def block(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.body = nn.Sequential(
            # The digits are 8x8 upscaled by 8, so a strided first layer loses nothing.
            *block(1, w, 5, stride=2), nn.MaxPool2d(2),         # 16x16
            *block(w, 2 * w, 3), nn.MaxPool2d(2),               # 8x8
            *block(2 * w, 4 * w, 3),
            *block(4 * w, 4 * w, 3), nn.AdaptiveAvgPool2d(2),   # 2x2 keeps coarse layout
            nn.Flatten(),
        )
        self.fc = nn.Linear(16 * w, feature_dim)
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))


def _prepare(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B,3,H,W] in [-1,1] -> grey [B,1,size,size]; the demo digits are grey, so colour casts of
    generated samples should not decide the class."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, 3, H, W]; got {tuple(images.shape)}")
    x = images.float().clamp(-1.0, 1.0).mean(1, keepdim=True)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to MAX_SHIFT px (blank paper fills in) and a mild contrast/brightness
    jitter, because decoded samples are rarely centred or toned exactly like the scans."""
    b, _, h, w = x.shape
    padded = F.pad(x, (MAX_SHIFT,) * 4, value=1.0)
    dx = torch.randint(0, 2 * MAX_SHIFT + 1, (b,), generator=g)
    dy = torch.randint(0, 2 * MAX_SHIFT + 1, (b,), generator=g)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    scale = 1.0 + 0.2 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5)
    shift = 0.2 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5)
    return (out * scale + shift).clamp(-1.0, 1.0)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    preds = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return float((preds == y.to(preds.device)).double().mean())


def train_digits_judge(out_path: str | None = SHIPPED_PATH, seed: int = 0, epochs: int = EPOCHS,
                       limit: int | None = None, batch_size: int = 64, lr: float = 3e-3,
                       device: str | torch.device = "cpu", verbose: bool = False) -> dict[str, Any]:
    """Train the judge on the training split of the real demo digits and write it to
    ``out_path`` (any storage URL; None: don't write). Same seed, same weights.

    ``limit`` trains on the first ``limit`` training digits only (a cheap run for tests).
    Returns the metadata written with the weights (held-out accuracy, timings, ...)."""
    t0 = time.perf_counter()
    dev = torch.device(device)
    x_tr, y_tr = real_digits("train")
    x_ho, y_ho = real_digits("heldout")
    if limit is not None:
        x_tr, y_tr = x_tr[:limit], y_tr[:limit]
    x_tr, x_ho = _prepare(x_tr, INPUT_SIZE), _prepare(x_ho, INPUT_SIZE).to(dev)
    g = torch.Generator().manual_seed(seed)
    # fork_rng: weight init and dropout draw from a seeded global RNG without disturbing the caller's.
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        model = DigitsCNN().to(dev)
        steps_per_epoch = max(1, -(-len(x_tr) // batch_size))
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                    pct_start=0.2)
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(len(x_tr), generator=g)
            for i in range(0, len(x_tr), batch_size):
                idx = perm[i:i + batch_size]
                if len(idx) < 2:   # BatchNorm needs two samples
                    continue
                xb = _augment(x_tr[idx], g).to(dev)
                loss = F.cross_entropy(model(xb), y_tr[idx].to(dev), label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if verbose:
                print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.4f} "
                      f"held-out {_accuracy(model, x_ho, y_ho):.4f}", flush=True)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "input_size": INPUT_SIZE, "feature_dim": model.fc.out_features,
        "width": model.body[0].out_channels, "seed": seed, "epochs": epochs, "train_samples": len(x_tr),
        "heldout_samples": len(x_ho), "heldout_accuracy": _accuracy(model, x_ho, y_ho),
        "train_accuracy": _accuracy(model, x_tr.to(dev), y_tr),
        "train_seconds": round(time.perf_counter() - t0, 2),
        "torch": torch.__version__,
    }
    if out_path is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        storage.write_bytes(out_path, st_save(state, metadata={k: json.dumps(v) for k, v in meta.items()}))
        _LOADED.pop(out_path, None)   # a judge loaded earlier from this path is now stale
    meta["path"] = out_path
    meta["model"] = model.cpu().eval()
    return meta


class DigitsJudge:
    """A trained :class:`DigitsCNN` in eval mode plus the metadata it was saved with."""

    def __init__(self, model: DigitsCNN, meta: dict[str, Any], path: str | None = None):
        self.model, self.meta, self.path = model.eval(), meta, path
        self.input_size = int(meta.get("input_size", INPUT_SIZE))
        self.feature_dim = model.fc.out_features

    @torch.no_grad()
    def _run(self, images: torch.Tensor, fn: str, batch_size: int) -> torch.Tensor:
        dev = images.device
        if next(self.model.parameters()).device != dev:
            self.model.to(dev)
        outs = [getattr(self.model, fn)(_prepare(images[i:i + batch_size], self.input_size))
                for i in range(0, len(images), batch_size)]
        return torch.cat(outs) if outs else torch.empty(0, self.feature_dim if fn == "features" else NUM_DIGITS)

    def logits(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        return self._run(images, "forward", batch_size)

    def features(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        return self._run(images, "features", batch_size)

    def score(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Rejection-sampling scores ``[B]`` (``pretrain.sample.rejection_sample``'s classifier):
        the log-probability of the requested digit; for a label outside 0-9 (-1: unconditional,
        photo classes) the log-probability of the judge's top digit."""
        logp = self.logits(images, batch_size).float().log_softmax(1).cpu()
        y = torch.as_tensor(labels).long().reshape(-1).cpu()
        if len(y) != len(logp):
            raise ValueError(f"{len(logp)} images but {len(y)} labels")
        digit = (y >= 0) & (y < NUM_DIGITS)
        asked = logp.gather(1, y.clamp(0, NUM_DIGITS - 1)[:, None])[:, 0]
        return torch.where(digit, asked, logp.max(1).values)


_LOADED: dict[str, DigitsJudge] = {}


def _cache_path() -> str:
    root = os.environ.get("VQSCALE_CACHE") or os.path.expanduser("~/.cache/vqscale")
    return storage.join(root, "evals", "digits_judge.safetensors")


def load_digits_judge(path: str | None = None) -> DigitsJudge:
    """The judge from ``path`` (any storage URL), or by default the shipped file; if that is
    missing, ``$VQSCALE_CACHE/evals/digits_judge.safetensors``, trained there on first use."""
    if path is None:
        path = SHIPPED_PATH if os.path.exists(SHIPPED_PATH) else _cache_path()
        if not storage.exists(path):
            train_digits_judge(path)
    if path in _LOADED:
        return _LOADED[path]
    data = storage.read_bytes(path)
    state = st_load(data)
    # safetensors reads metadata only from a file handle; for bytes (any URL) parse the header:
    # 8 bytes little-endian length, then JSON.
    n = int.from_bytes(data[:8], "little")
    meta = {k: json.loads(v) for k, v in json.loads(data[8:8 + n]).get("__metadata__", {}).items()}
    model = DigitsCNN(width=int(meta.get("width", 16)), feature_dim=int(meta.get("feature_dim", 128)))
    model.load_state_dict(state)
    judge = _LOADED[path] = DigitsJudge(model, meta, path)
    return judge


def _labels(requested: Any, n: int) -> np.ndarray:
    arr = requested.detach().cpu().numpy() if isinstance(requested, torch.Tensor) else np.asarray(requested)
    arr = arr.astype(np.int64).reshape(-1)
    if len(arr) != n:
        raise ValueError(f"{n} images but {len(arr)} requested labels")
    return arr


def judge_samples(images: torch.Tensor, requested_labels: Sequence[int] | torch.Tensor | np.ndarray,
                  judge: DigitsJudge | None = None, batch_size: int = 256) -> dict[str, Any]:
    """Classify class-conditional samples and compare with the labels they were asked for.

    ``images`` [B,3,H,W] in [-1,1] (any resolution; resized bilinear with antialiasing). Only
    digit labels 0-9 are judged; others (photo classes, -1) are counted in ``skipped``.
    Returns ``class_accuracy`` (fraction of judged samples classified as requested; NaN if none),
    ``per_class`` ({digit: {n, accuracy}}), ``predictions`` (int64 [B], every image),
    ``confidence`` (mean probability of the requested digit), ``confusion`` (10x10, rows =
    requested), ``judged``, ``skipped``."""
    judge = judge or load_digits_judge()
    req = _labels(requested_labels, len(images))
    logits = judge.logits(images, batch_size).float().cpu()
    pred = logits.argmax(1).numpy().astype(np.int64)
    probs = logits.softmax(1).numpy()
    ok = (req >= 0) & (req < NUM_DIGITS)
    confusion = np.zeros((NUM_DIGITS, NUM_DIGITS), dtype=np.int64)
    np.add.at(confusion, (req[ok], pred[ok]), 1)
    per_class = {int(c): {"n": int((req == c).sum()), "accuracy": float((pred[req == c] == c).mean())}
                 for c in np.unique(req[ok])}
    judged = int(ok.sum())
    return {
        "class_accuracy": float((pred[ok] == req[ok]).mean()) if judged else float("nan"),
        "confidence": float(probs[ok, req[ok]].mean()) if judged else float("nan"),
        "per_class": per_class,
        "predictions": pred,
        "confusion": confusion.tolist(),
        "judged": judged,
        "skipped": int(len(req) - judged),
    }


def judge_features(images: torch.Tensor, judge: DigitsJudge | None = None,
                   batch_size: int = 256) -> np.ndarray:
    """Penultimate judge features ``[B, F]`` (float64) for a digits FID (see ``evals/stats.py``)."""
    judge = judge or load_digits_judge()
    return judge.features(images, batch_size).double().cpu().numpy()


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m evals.digits",
                                description="Retrain the shipped digits judge (deterministic).")
    p.add_argument("--out", default=SHIPPED_PATH, help="where to write the weights (any storage URL)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    meta = train_digits_judge(a.out, seed=a.seed, epochs=a.epochs, verbose=not a.quiet)
    meta.pop("model")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
