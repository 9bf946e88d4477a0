"""``vqscale eval linear-probe``: how linearly separable a checkpoint's frozen features are.

Priors (Yu et al., "Vector-quantized Image Modeling with Improved VQGAN", ICLR 2022, sec. 5.2,
following iGPT: Chen et al., "Generative Pretraining from Pixels", ICML 2020): the code shards of
a training and a held-out split are fed to the prior by teacher forcing, block ``l``'s output is
averaged over the token positions (``prior.features(codes, condition, l)``), and a linear
classifier is fit on it. The condition is the prior's NULL condition (VIM / Stackformer: the null
class; the text prior: the empty caption), so the label never enters the features it is probed
for. Features of block ``l`` are computed by running blocks ``0..l`` (the Prior interface), so
probing all ``L`` blocks costs about ``L/2`` forward passes.

Which blocks: the paper probes an UNCONDITIONAL VIM (recipes ``vim-base-uncond`` /
``vim-large-uncond``) at a middle block, Base block 10 of 24 and Large 15 of 36
(``model_zoo.vim.PAPER_PROBE_BLOCKS``); for those presets the default is that block alone
(:func:`paper_probe_layer`), for every other prior every block (the accuracy-vs-depth curve).
``layers="all"`` (``--layers all``) sweeps every block of any prior; a list picks blocks. The
result names the paper's block (``paper_layer``) and the recipe the package was trained with when
its model card says (``protocol.trained_recipe``); probing a class-conditional recipe is logged as
a departure from the paper's protocol.

Tokenizers (image shards): the encoder's features, with the tokenizer's own accessors:

- ``encoder``: the pre-quantization latents ``z`` (what enters the quantizer) averaged over the
  token grid. ViT-VQGAN: ``encoder_features`` (after the final LayerNorm and tanh FFN); VQGAN and
  Regularized VQ: ``quant_conv(encoder(x))``; MQ-VAE: the encoder's full feature grid, before the
  adaptive mask drops positions.
- ``codes``: the quantized code embeddings ``quantizer.lookup(codes)`` (the codebook vectors in the
  width the decoder reads) averaged over the tokens (MQ-VAE: over the kept tokens). This is what
  a prior's input carries about the image.
- ``block_k`` (ViT-VQGAN only): the encoder's residual stream after block ``k``.

The raw-pixel baseline is always reported when image data is given: images (center crop at the
tokenizer's resolution) area-averaged down to ``pixel_size`` x ``pixel_size`` (default 16) and
flattened, probed the same way. For priors it needs image shards of the two splits
(``images_train`` / ``images_test``, e.g. the datasets the code shards were tokenized from); it is
computed at the resolution of the prior's own tokenizer, so it matches a tokenizer probe's baseline.

The probe itself is :func:`evals.linear_probe.fit_linear_probe` (standardized features,
multinomial logistic regression by L-BFGS, L2 chosen on a stratified validation slice of the
training split). Samples without a label (``-1``) are skipped and counted. Both splits are read
in a fixed order (no shuffling), so ``max_samples`` picks the same subset every time.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline import storage
from data_pipeline.codes import code_loader
from model_zoo.package import CHECKSUMS, build_model, load_package, read_config
from model_zoo.vim import PAPER_PROBE_BLOCKS
from pretrain.resolve import as_package

from .linear_probe import DEFAULT_WEIGHT_DECAYS, fit_linear_probe, plot_probe
from .passes import fixed_pass
from .report import sibling_url, write_result

log = logging.getLogger("vqscale.evals.probe")

__all__ = ["evaluate_linear_probe", "pixel_features", "tokenizer_features", "prior_depth",
           "stream_codes", "stream_images"]

PIXEL_SIZE = 16


def _device(device=None) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


# ------------------------------------------------------------------------------------ features

def pixel_features(images: torch.Tensor, size: int = PIXEL_SIZE) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ``[B, 3 * size * size]``: area averages (exact box filter when ``size``
    divides ``H`` and ``W``), so no pixel is skipped the way strided subsampling would."""
    return F.adaptive_avg_pool2d(images.float(), size).flatten(1)


def paper_probe_layer(name: str, depth: int) -> int | None:
    """The 0-based block the paper's linear probe reads for registry preset ``name`` at ``depth``
    blocks (``model_zoo.vim.PAPER_PROBE_BLOCKS``: vim-base 9, vim-large 14), else None (other
    presets, or a preset whose depth was changed)."""
    block, of = PAPER_PROBE_BLOCKS.get(name, (None, None))
    return block - 1 if block is not None and of == depth else None


def prior_depth(prior) -> int:
    """Number of blocks whose output ``prior.features`` can return."""
    for name in ("transformer", "code_transformer"):   # VIM / text prior, Stackformer
        blocks = getattr(getattr(prior, name, None), "blocks", None)
        if blocks is not None:
            return len(blocks)
    raise ValueError(f"cannot tell the depth of {type(prior).__name__}: pass layers=")


@torch.no_grad()
def tokenizer_features(tokenizer, images: torch.Tensor, blocks: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """Averaged features of a tokenizer (see the module doc): ``{"block_k": ..., "encoder": ...,
    "codes": ...}``, each ``[B, D]`` float32."""
    images = images.to(next(tokenizer.parameters()).dtype)
    out: dict[str, torch.Tensor] = {}
    if hasattr(tokenizer, "encoder_features"):                        # ViT-VQGAN
        for k in blocks:
            out[f"block_{k}"] = tokenizer.encoder_features(images, layer=k).mean(1)
        out["encoder"] = tokenizer.encoder_features(images).mean(1)
    else:
        h = tokenizer.encoder(images)                                  # [B, C, h, w]
        if hasattr(tokenizer, "quant_conv"):                           # VQGAN, Regularized VQ
            h = tokenizer.quant_conv(h)
        out["encoder"] = h.mean((2, 3))
    codes = tokenizer.encode(images).codes
    out["codes"] = tokenizer.quantizer.lookup(codes).mean(1)
    return {k: v.float() for k, v in out.items()}


# ------------------------------------------------------------------------------------- streams

def _limited(batches, max_samples: int | None, desc: str, progress: bool) -> Iterator[dict[str, Any]]:
    from tqdm import tqdm

    seen = 0
    it = iter(batches)
    try:
        with tqdm(desc=desc, unit="sample", total=max_samples, disable=not progress) as bar:
            for batch in it:
                if max_samples is not None:
                    keep = max_samples - seen
                    batch = {k: (v[:keep] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
                n = len(batch["label"])
                seen += n
                bar.update(n)
                yield batch
                if max_samples is not None and seen >= max_samples:
                    break
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()   # stops the loader's workers now, also when max_samples ends the pass early


def stream_codes(url: str, batch_size: int, max_samples: int | None = None, codebook_size: int | None = None,
                 num_tokens: int | None = None, progress: bool = False) -> Iterator[dict[str, Any]]:
    """One pass over a code-shard root in a fixed order (batches of :func:`collate_codes`)."""
    loader = code_loader(url, batch_size, seed=0, rank=0, world_size=1, num_workers=0, shuffle_buffer=1,
                         interleave=1, max_epochs=1, codebook_size=codebook_size, num_tokens=num_tokens)
    yield from _limited(loader, max_samples, f"codes {storage.basename(url.rstrip('/'))}", progress)


def stream_images(url: str, resolution: int, batch_size: int, max_samples: int | None = None, device=None,
                  num_workers: int | None = None, progress: bool = False) -> Iterator[dict[str, Any]]:
    """One pass over an image dataset in a fixed order, center-cropped to ``resolution``; batches
    hold float ``[-1, 1]`` images on ``device`` and labels."""
    loader, _, _ = fixed_pass(url, resolution, batch_size, num_workers, device)
    yield from _limited(loader, max_samples, f"images {storage.basename(url.rstrip('/'))}", progress)


class _Collector:
    """Per-key feature batches and labels of one split; unlabelled samples dropped and counted."""

    def __init__(self):
        self.feats: dict[str, list[torch.Tensor]] = {}
        self.labels: list[torch.Tensor] = []
        self.unlabelled = 0

    def add(self, labels: torch.Tensor, feats: dict[str, torch.Tensor], keep: torch.Tensor) -> None:
        self.unlabelled += int((~keep).sum())
        self.labels.append(labels[keep.to(labels.device)].cpu())
        for k, v in feats.items():
            self.feats.setdefault(k, []).append(v[keep.to(v.device)].float().cpu())

    def done(self, split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        y = torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.long)
        if len(y) == 0:
            raise ValueError(f"the {split} split has no labelled samples (KEY.cls or a 'label' in KEY.json)")
        if self.unlabelled:
            log.warning("%s split: %d samples without a label skipped", split, self.unlabelled)
        return {k: torch.cat(v) for k, v in self.feats.items()}, y, self.unlabelled


def _labelled(batch) -> tuple[torch.Tensor, torch.Tensor]:
    labels = batch["label"].long()
    return labels, labels >= 0


@torch.no_grad()
def _prior_split(prior, url: str, layers: Sequence[int], batch_size: int, max_samples, device,
                 progress: bool, split: str):
    col = _Collector()
    for batch in stream_codes(url, batch_size, max_samples, prior.codebook_size, prior.num_tokens, progress):
        labels, keep = _labelled(batch)
        codes = batch["codes"].to(device)
        pos = None if batch["positions"] is None else batch["positions"].to(device)
        # The null condition: the probe must not see the label it predicts (nor a caption naming it).
        cond = prior.null_condition(codes.shape[0])
        feats = {str(l): prior.features(codes, cond, l, positions=pos) for l in layers}
        col.add(labels, feats, keep)
    return col.done(split)


@torch.no_grad()
def _image_split(url: str, resolution: int, batch_size: int, max_samples, device, progress: bool,
                 split: str, pixel_size: int, tokenizer=None, blocks: Sequence[int] = (), num_workers=None):
    col = _Collector()
    for batch in stream_images(url, resolution, batch_size, max_samples, device, num_workers, progress):
        labels, keep = _labelled(batch)
        images = batch["image"]
        feats = {"pixels": pixel_features(images, pixel_size)}
        if tokenizer is not None:
            feats.update(tokenizer_features(tokenizer, images, blocks))
        col.add(labels, feats, keep)
    return col.done(split)


# ---------------------------------------------------------------------------------------- job

def _load(ckpt: str, device) -> tuple[Any, dict[str, Any], Any, str | None]:
    """(model, identity, the prior's tokenizer built on meta for its image size, or None, the
    recipe its model card names, or None)."""
    url = as_package(ckpt)
    meta = read_config(url)
    if meta["kind"] not in ("prior", "tokenizer"):
        raise ValueError(f"{ckpt} holds a {meta['kind']} ({meta['name']}); the linear probe takes a prior or a tokenizer")
    checksums = storage.read_bytes(storage.join(url, CHECKSUMS))
    identity = {"name": meta["name"], "kind": meta["kind"], "package": url,
                "sha256": hashlib.sha256(checksums).hexdigest()}
    tok_proto = None
    if meta["kind"] == "prior" and meta.get("tokenizer"):
        tok_url = storage.join(url, meta["tokenizer"])
        tok_meta = read_config(tok_url)
        tok_proto = build_model(tok_meta["name"], tok_meta["config"], "meta")
        identity["tokenizer"] = {"name": tok_meta["name"], "sha256": hashlib.sha256(
            storage.read_bytes(storage.join(tok_url, CHECKSUMS))).hexdigest()}
    recipe = ((meta.get("card") or {}).get("training") or {}).get("recipe")
    return load_package(url, device=device), identity, tok_proto, recipe


def _code_tokenizer(url: str) -> dict[str, Any] | None:
    try:
        return storage.read_json(storage.join(url, "manifest.json")).get("tokenizer")
    except (OSError, ValueError):
        return None


def _fit_all(train: dict[str, torch.Tensor], ytr, test: dict[str, torch.Tensor], yte, seed: int,
             device, weight_decays: Sequence[float]) -> dict[str, dict[str, Any]]:
    num_classes = int(max(ytr.max(), yte.max())) + 1
    fits = {}
    for key in train:
        r = fit_linear_probe(train[key], ytr, test[key], yte, num_classes=num_classes, seed=seed, device=device,
                             weight_decays=weight_decays)
        fits[key] = {"top1": r["top1"], "train_top1": r["train_top1"], "weight_decay": r["weight_decay"],
                     "dim": r["dim"]}
    return fits


def evaluate_linear_probe(ckpt: str, train_url: str, test_url: str, out_url: str | None = None,
                          layers: Sequence[int] | str | None = None, max_samples: int | None = None,
                          batch_size: int = 64, device=None, progress: bool = True,
                          images_train: str | None = None, images_test: str | None = None,
                          pixel_size: int = PIXEL_SIZE, seed: int = 0,
                          num_workers: int | None = None,
                          weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS) -> dict[str, Any]:
    """Linear probes of ``ckpt`` (zoo package, run directory or step folder; prior or tokenizer).

    Prior: ``train_url`` / ``test_url`` are code-shard roots (labels from ``KEY.cls``); ``layers``
    are block indices (default: the paper's probe block for vim-base / vim-large, every block for
    other priors; ``"all"``: every block); ``images_train`` / ``images_test`` (both or neither)
    add the raw-pixel baseline. Tokenizer: ``train_url`` / ``test_url`` are image datasets;
    ``layers`` picks the ViT encoder blocks probed (default and ``"all"``: all; ``[]`` for none). ``max_samples``
    caps each split. ``weight_decays``: the L2 candidates (one value: no validation fits, 6x
    faster). With ``out_url`` (``.json``), writes the result there and the accuracy plot
    next to it (``<stem>.png``).

    Returns ``layers`` (``{key: top1}`` in depth order), ``best_layer``, ``best_top1``,
    ``pixel_baseline`` (``{top1, size, dim}`` or None), ``fits`` (per key: train top-1, chosen
    weight decay, feature dim), ``num_train`` / ``num_test`` / ``num_classes``, ``chance`` (the
    majority class's share of the test split), ``unlabelled`` (skipped samples per split),
    ``protocol``, ``paper_layer`` (the paper's block for this prior, or None) and ``seconds``.
    Layer keys are strings (JSON); a prior's ``best_layer`` is the block index as an int."""
    t0 = time.perf_counter()
    device = _device(device)
    if (images_train is None) != (images_test is None):
        raise ValueError("give both images_train and images_test for the pixel baseline, or neither")
    model, identity, tok_proto, recipe = _load(ckpt, device)
    kind = identity["kind"]
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be block indices or 'all', got {layers!r}")
        layers = None if kind == "tokenizer" else "all"
    paper = None
    pixel: dict[str, Any] | None = None
    protocol: dict[str, Any] = {"task": "linear-probe", "ckpt": ckpt, "model": identity, "train": train_url,
                                "test": test_url, "max_samples": max_samples, "order": "fixed (no shuffle)",
                                "probe": {"method": "standardized features, multinomial logistic regression "
                                                    "(L-BFGS), L2 chosen on a stratified 10% validation slice "
                                                    "of the training split, refit on all of it",
                                          "weight_decays": [float(w) for w in weight_decays], "seed": seed}}
    if kind == "prior":
        depth = prior_depth(model)
        paper = paper_probe_layer(identity["name"], depth)
        if layers is None and paper is not None:
            layers, chosen = [paper], f"the paper's probe block ({paper + 1} of {depth})"
        elif layers is None or layers == "all":
            layers, chosen = list(range(depth)), "every block"
        else:
            layers, chosen = [int(l) for l in layers], "given"
        layers = [range(depth)[l] for l in layers]            # negative -> from the end; IndexError if out
        if not layers:
            raise ValueError("no layers to probe")
        tr, ytr, utr = _prior_split(model, train_url, layers, batch_size, max_samples, device, progress, "train")
        te, yte, ute = _prior_split(model, test_url, layers, batch_size, max_samples, device, progress, "test")
        resolution = getattr(tok_proto, "image_size", None)
        if images_train is not None:
            if resolution is None:
                raise ValueError(f"{ckpt}: the prior's package holds no tokenizer, so the pixel baseline's "
                                 f"resolution is unknown")
            ptr, pytr, _ = _image_split(images_train, resolution, batch_size, max_samples, device, progress,
                                     "train (images)", pixel_size, num_workers=num_workers)
            pte, pyte, _ = _image_split(images_test, resolution, batch_size, max_samples, device, progress,
                                     "test (images)", pixel_size, num_workers=num_workers)
            pfit = _fit_all(ptr, pytr, pte, pyte, seed, device, weight_decays)["pixels"]
            pixel = {"top1": pfit["top1"], "size": pixel_size, "dim": pfit["dim"], "resolution": resolution,
                     "num_train": len(pytr), "num_test": len(pyte), "train": images_train, "test": images_test}
        codes_tok = _code_tokenizer(train_url)
        unconditional = None if recipe is None else recipe.removesuffix("-tiny").endswith("-uncond")
        if paper is not None and unconditional is False:
            log.warning("%s was trained with recipe %s; the paper probes an unconditional VIM (%s-uncond)",
                        ckpt, recipe, identity["name"])
        protocol.update({
            "layers": chosen, "trained_recipe": recipe, "trained_unconditional": unconditional,
            "features": "block output (before the final norm) averaged over the token positions "
                        "(VIM sec. 5.2 / iGPT), teacher forcing",
            "condition": "null (unconditional: no label or caption enters the features)",
            "codes_tokenizer": codes_tok,
            "codes_match_prior_tokenizer": (None if not codes_tok or "tokenizer" not in identity
                                            else codes_tok.get("sha256") == identity["tokenizer"]["sha256"])})
        if protocol["codes_match_prior_tokenizer"] is False:
            log.warning("the code shards were written by tokenizer %s, not the prior's own tokenizer %s",
                        codes_tok, identity["tokenizer"])
    else:
        n_blocks = len(model.encoder.blocks) if hasattr(model, "encoder_features") else 0
        blocks = list(range(n_blocks)) if layers is None else [range(n_blocks)[int(l)] for l in layers]
        res = int(model.image_size)
        tr, ytr, utr = _image_split(train_url, res, batch_size, max_samples, device, progress, "train", pixel_size,
                               model, blocks, num_workers)
        te, yte, ute = _image_split(test_url, res, batch_size, max_samples, device, progress, "test", pixel_size,
                               model, blocks, num_workers)
        if images_train is not None:
            log.info("tokenizer probe: the pixel baseline comes from the probed images; images_train/test ignored")
        protocol.update({"features": {"block_k": "ViT encoder residual stream after block k, averaged over the grid",
                                      "encoder": "pre-quantization latents averaged over the grid",
                                      "codes": "quantizer.lookup(codes) averaged over the tokens"},
                         "resolution": res, "crop": "center"})
    fits = _fit_all(tr, ytr, te, yte, seed, device, weight_decays)
    if "pixels" in fits:
        p = fits.pop("pixels")
        pixel = {"top1": p["top1"], "size": pixel_size, "dim": p["dim"], "resolution": protocol.get("resolution")}
    scores = {k: v["top1"] for k, v in fits.items()}
    finite = {k: v for k, v in scores.items() if math.isfinite(v)}
    best = max(finite, key=lambda k: finite[k]) if finite else None
    result: dict[str, Any] = {
        "task": "linear-probe", "kind": kind,
        "layers": scores, "best_layer": (int(best) if kind == "prior" and best is not None else best),
        "best_top1": finite.get(best) if best is not None else None,
        "pixel_baseline": pixel, "fits": fits, "paper_layer": paper,
        "num_train": int(len(ytr)), "num_test": int(len(yte)),
        "num_classes": int(max(ytr.max(), yte.max())) + 1, "unlabelled": {"train": utr, "test": ute},
        "chance": float(np.bincount(yte.numpy()).max() / len(yte)),   # majority class of the test split
        "protocol": protocol,
    }
    result["seconds"] = round(time.perf_counter() - t0, 3)
    if out_url is not None:
        plot_probe(scores, sibling_url(out_url, ".png"), title=f"linear probe: {identity['name']}",
                   baselines={"raw pixels": pixel["top1"]} if pixel is not None else None)
        write_result(result, out_url, {"plot": sibling_url(out_url, ".png")}, identity["package"])
    return result
