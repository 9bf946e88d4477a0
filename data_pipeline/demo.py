"""``vqscale data build-demo``: a real-image dataset from images shipped inside installed packages.

No download: scikit-learn's 1,797 handwritten digits (8x8, labelled 0-9) upscaled, and crops of
the photos bundled with scikit-learn (``china.jpg``, ``flower.jpg``) and scikit-image
(astronaut, cat, coffee, rocket, ...). Each photo is a class (labels 10 and up), every sample has
a caption that describes it ("a handwritten digit seven", "a photo of a cat") and metadata in
``KEY.json``; samples are shuffled across shards so that every shard mixes classes.
"""

from __future__ import annotations

import io
import json
from importlib import resources
from typing import Any, Iterator

import numpy as np
from PIL import Image

from .shards import ShardWriter

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# (package, file, caption, class name). Order fixes the labels: 10 + position.
PHOTOS = [
    ("sklearn.datasets.images", "china.jpg", "a photo of a chinese temple", "temple"),
    ("sklearn.datasets.images", "flower.jpg", "a photo of a flower", "flower"),
    ("skimage.data", "astronaut.png", "a photo of an astronaut", "astronaut"),
    ("skimage.data", "chelsea.png", "a photo of a cat", "cat"),
    ("skimage.data", "coffee.png", "a photo of a cup of coffee", "coffee"),
    ("skimage.data", "rocket.jpg", "a photo of a rocket on its launch pad", "rocket"),
    ("skimage.data", "motorcycle_left.png", "a photo of a motorcycle", "motorcycle"),
    ("skimage.data", "hubble_deep_field.jpg", "a photo of galaxies in deep space", "galaxies"),
    ("skimage.data", "coins.png", "a black and white photo of old coins", "coins"),
    ("skimage.data", "camera.png", "a black and white photo of a cameraman", "cameraman"),
]
CLASS_NAMES = [f"digit {w}" for w in DIGIT_WORDS] + [p[3] for p in PHOTOS]


def load_photo(package: str, name: str) -> Image.Image:
    with resources.files(package).joinpath(name).open("rb") as f:
        return Image.open(io.BytesIO(f.read())).convert("RGB")


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=92)
    else:
        img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def demo_samples(digits: int | None = None, crops_per_photo: int = 60, digit_size: int = 64,
                 crop_size: int = 128, seed: int = 0) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, files)`` for the demo dataset in a seeded shuffled order."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    d = load_digits()
    n_digits = len(d.images) if digits is None else min(digits, len(d.images))
    items: list[tuple[str, int]] = [("digit", i) for i in range(n_digits)]
    items += [("photo", p * 100_000 + c) for p in range(len(PHOTOS)) for c in range(crops_per_photo)]
    order = rng.permutation(len(items))
    photos: dict[int, Image.Image] = {}
    for n, j in enumerate(order):
        kind, idx = items[j]
        if kind == "digit":
            arr = (d.images[idx] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            # Dark ink on light paper, as a scan would look.
            img = Image.fromarray(255 - arr, mode="L").resize((digit_size, digit_size), Image.BICUBIC)
            img = img.convert("RGB")
            label = int(d.target[idx])
            caption = f"a handwritten digit {DIGIT_WORDS[label]}"
            files = {"png": _encode(img, "png")}
            meta: dict[str, Any] = {"source": "sklearn.digits", "index": int(idx)}
        else:
            p, c = divmod(idx, 100_000)
            if p not in photos:
                photos[p] = load_photo(PHOTOS[p][0], PHOTOS[p][1])
            photo = photos[p]
            crng = np.random.default_rng([seed, p, c])
            w, h = photo.size
            side = int(crng.integers(min(w, h) // 3, min(w, h) + 1))
            x, y = int(crng.integers(w - side + 1)), int(crng.integers(h - side + 1))
            img = photo.crop((x, y, x + side, y + side)).resize((crop_size, crop_size), Image.BICUBIC)
            if crng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            label = 10 + p
            caption = PHOTOS[p][2]
            files = {"jpg": _encode(img, "jpg")}
            meta = {"source": f"{PHOTOS[p][0]}/{PHOTOS[p][1]}", "crop": [x, y, side]}
        meta.update({"width": img.size[0], "height": img.size[1], "label": label, "caption": caption})
        files["txt"] = caption.encode()
        files["cls"] = str(label).encode()
        files["json"] = json.dumps(meta).encode()
        yield f"{n:08d}", files


def build_demo(out: str, quick: bool = False, shard_samples: int = 100, seed: int = 0,
               progress: bool = True, holdout: str | None = None, holdout_every: int = 10) -> dict[str, Any]:
    """Write the demo dataset under ``out`` (local folder or s3://); returns the manifest.

    ``holdout``: a second dataset root that gets every ``holdout_every``-th sample instead (a
    held-out split for validation, with its own manifest), written in shards of the same size."""
    from tqdm import tqdm

    digits, crops = (300, 12) if quick else (None, 60)
    total = (digits or 1797) + crops * len(PHOTOS)
    extra = {"name": "vqscale-demo", "classes": CLASS_NAMES}
    writers = [ShardWriter(out, prefix="demo", max_samples=shard_samples, extra=extra)]
    if holdout:
        writers.append(ShardWriter(holdout, prefix="demo", max_samples=shard_samples,
                                   extra={**extra, "split": "holdout"}))
    try:
        for n, (key, files) in enumerate(tqdm(demo_samples(digits, crops, seed=seed), total=total,
                                              desc=f"build-demo -> {out}", unit="img", disable=not progress)):
            held = holdout is not None and n % holdout_every == holdout_every - 1
            writers[1 if held else 0].write(key, files)
    except BaseException as e:
        for w in writers:
            w.abort(e)
        raise
    manifests = [w.close() for w in writers]
    return manifests[0]
