"""``vqscale eval clip-score``: how well a text-conditional prior's images match their prompts.

CLIPScore (Hessel, Holtzman, Forbes, Le Bras & Choi, "CLIPScore: A Reference-free Evaluation
Metric for Image Captioning", EMNLP 2021) is ``w * max(cos(E_image, E_text), 0)`` with CLIP
(Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", 2021)
image and text embeddings. Hessel et al. use ``w = 2.5``; text-to-image papers (and torchmetrics'
``CLIPScore``) report ``w = 100``, which is what this module reports: ``100 * max(cos, 0)`` per
(image, prompt) pair, averaged over all generated images. Scores depend on the CLIP model and its
weights, both recorded in the result; only numbers from the same CLIP are comparable.

The CLIP model is open_clip's (Cherti et al., "Reproducible scaling laws for contrastive
language-image learning", CVPR 2023), built from its bundled config (``ViT-B-32``, ``ViT-L-14``,
...) with weights from a file: ``weights`` (a path or storage URL) or the cache
``$VQSCALE_CACHE/weights/openclip-<name lowercased>.{safetensors,pt,bin}`` (e.g.
``openclip-vit-b-32.safetensors``; a copy of open_clip's ``open_clip_pytorch_model.bin`` works).
Nothing is downloaded: without a file, :class:`CLIPWeightsNotFound` names every path checked.

Preprocessing is on tensors, so generated images never leave the device: images in ``[-1, 1]`` are
rounded to 8-bit levels (the score is that of the images a user would save), resized with the
model's own preprocessing config (bicubic with antialiasing, which matches PIL's filter, shortest
side to the input size, then center crop) and normalized with its mean and std.

:func:`evaluate_clip_score` generates ``num_per_prompt`` images per prompt with the sampling code
of ``vqscale sample`` (pretrain/sample.py): image ``i`` of prompt ``j`` is global sample
``j * num_per_prompt + i``, with its own seed ``sample_seeds(seed, j * num_per_prompt + i)``, so the
images do not depend on the batch size, and the same prompt file and seed give the same images
(the same as ``vqscale sample --prompt`` would for that prompt at those sample indices).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from data_pipeline import storage
from model_zoo.grids import save_grid
from model_zoo.package import load_prior_with_tokenizer, sha256_file
from model_zoo.sampling import SamplingConfig
from model_zoo.text_encoders import WEIGHT_SUFFIXES, cache_dir
from pretrain.sample import resolve_prior, sample_images, text_encoder_of

from .report import sibling_url, write_result

__all__ = ["CLIP_SCALE", "CLIPWeightsNotFound", "LoadedCLIP", "TensorPreprocess", "clip_weight_candidates",
           "load_clip", "clip_score", "read_prompts", "evaluate_clip_score"]

CLIP_SCALE = 100.0
GRID_PROMPTS = 16          # rows of the PNG grid (one per prompt); the JSON has every prompt


class CLIPWeightsNotFound(FileNotFoundError):
    """No CLIP weights at the given path or in the cache (they are never downloaded)."""


class LoadedCLIP(NamedTuple):
    model: torch.nn.Module            # open_clip CLIP, eval mode
    preprocess: Callable              # float [-1, 1] [B, 3, H, W] -> normalized model input
    text_tokenizer: Callable          # list[str] -> long [B, context_length]
    info: dict[str, Any]              # model name, weights path, sha256, bytes


def clip_weight_candidates(model_name: str) -> list[str]:
    """Where :func:`load_clip` looks when no ``weights`` are given."""
    stem = "openclip-" + model_name.lower().replace("/", "-")
    return [storage.join(cache_dir(), "weights", stem + s) for s in WEIGHT_SUFFIXES]


class TensorPreprocess:
    """open_clip's image preprocessing (resize, center crop, normalize) on float tensors."""

    def __init__(self, size, mean: Sequence[float], std: Sequence[float], interpolation: str = "bicubic",
                 resize_mode: str = "shortest", fill_color: float = 0.0):
        self.size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.interpolation = {"bicubic": "bicubic", "bilinear": "bilinear"}.get(interpolation, "bicubic")
        if resize_mode not in ("shortest", "squash", "longest"):
            raise ValueError(f"unknown resize_mode {resize_mode!r}")
        self.resize_mode, self.fill_color = resize_mode, float(fill_color)

    def _resize(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == hw:
            return x
        return F.interpolate(x, size=hw, mode=self.interpolation, align_corners=False, antialias=True)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # 8-bit levels first: the score of the PNG a user would save, not of off-grid floats.
        x = ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 255.0
        th, tw = self.size
        h, w = x.shape[-2:]
        if self.resize_mode == "squash":
            x = self._resize(x, (th, tw))
        elif self.resize_mode == "shortest":
            s = max(th / h, tw / w)
            x = self._resize(x, (max(th, round(h * s)), max(tw, round(w * s))))
            top, left = (x.shape[-2] - th) // 2, (x.shape[-1] - tw) // 2
            x = x[..., top:top + th, left:left + tw]
        else:   # longest: fit inside, pad the rest with fill_color
            s = min(th / h, tw / w)
            x = self._resize(x, (min(th, round(h * s)), min(tw, round(w * s))))
            ph, pw = th - x.shape[-2], tw - x.shape[-1]
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=self.fill_color / 255.0)
        x = x.clamp(0, 1)   # bicubic overshoots; PIL clips to the 8-bit range
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def load_clip(model_name: str = "ViT-B-32", weights: str | None = None, device: str | torch.device = "cpu",
              overrides: dict[str, Any] | None = None) -> LoadedCLIP:
    """An open_clip model from its bundled config ``model_name`` with weights from ``weights`` (path
    or storage URL) or the cache (:func:`clip_weight_candidates`); raises :class:`CLIPWeightsNotFound`
    otherwise, before building anything. ``overrides``: top-level config fields (``embed_dim``,
    ``vision_cfg``, ``text_cfg``) replacing the bundled ones, for custom architectures."""
    import open_clip

    if model_name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"{model_name!r}: give a bundled open_clip config name (e.g. 'ViT-B-32'); "
                         "hub names would download")
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"open_clip has no bundled model config {model_name!r} (e.g. 'ViT-B-32', 'ViT-L-14')")
    if weights is None:
        cands = clip_weight_candidates(model_name)
        weights = next((c for c in cands if storage.exists(c)), None)
        if weights is None:
            raise CLIPWeightsNotFound(
                f"no weights for CLIP {model_name!r}; they are never downloaded. Checked: {cands}. Put an "
                f"open_clip checkpoint (state dict, safetensors or torch) at {cands[0]}, pass weights=PATH "
                f"(--clip-weights), or set VQSCALE_CACHE.")
    elif not storage.exists(weights):
        raise CLIPWeightsNotFound(f"CLIP weights file {weights} does not exist")
    with tempfile.TemporaryDirectory(prefix="vqscale-clip-") as tmp:
        local = weights
        if storage.is_remote(weights):
            local = os.path.join(tmp, os.path.basename(weights.rstrip("/")) or "weights.bin")
            with storage.open(weights, "rb") as src, open(local, "wb") as dst:
                while chunk := src.read(8 << 20):
                    dst.write(chunk)
        # An absolute path: open_clip reads `pretrained` as a download tag before a file path.
        local = os.path.abspath(storage.local_path(local))
        model = open_clip.create_model(model_name, pretrained=local, device=device, pretrained_image=False,
                                       pretrained_text=False, **(overrides or {}))
        info = {"model": model_name, "weights": weights, "sha256": sha256_file(local),
                "bytes": os.path.getsize(local), "overrides": overrides or None}
    pcfg = open_clip.get_model_preprocess_cfg(model)
    preprocess = TensorPreprocess(pcfg["size"], pcfg["mean"], pcfg["std"], pcfg.get("interpolation", "bicubic"),
                                  pcfg.get("resize_mode", "shortest"), pcfg.get("fill_color", 0))
    text_tokenizer = open_clip.get_tokenizer(model_name, context_length=model.context_length)
    return LoadedCLIP(model.eval(), preprocess, text_tokenizer, info)


@torch.no_grad()
def clip_score(images: torch.Tensor, captions: str | Sequence[str], model, preprocess: Callable,
               text_tokenizer: Callable | None = None, batch_size: int = 64) -> torch.Tensor:
    """Per-image CLIP score ``100 * max(cos(image, caption), 0)``, float64 ``[B]`` on CPU (the
    CLIP score of a set is their mean). ``images`` float ``[B, 3, H, W]`` in ``[-1, 1]``;
    ``captions``: one per image, or one string for all. ``text_tokenizer`` default: open_clip's BPE
    (every non-Hugging-Face CLIP)."""
    if text_tokenizer is None:
        import open_clip
        text_tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=model.context_length)
    b = images.shape[0]
    captions = [captions] * b if isinstance(captions, str) else list(captions)
    if len(captions) != b:
        raise ValueError(f"{len(captions)} captions for {b} images")
    device = next(model.parameters()).device
    out = []
    for lo in range(0, b, batch_size):
        x = preprocess(images[lo:lo + batch_size].to(device))
        img = model.encode_image(x.to(next(model.parameters()).dtype)).float()
        txt = model.encode_text(text_tokenizer(captions[lo:lo + batch_size]).to(device)).float()
        cos = F.cosine_similarity(img, txt, dim=-1)
        out.append((CLIP_SCALE * cos.clamp_min(0)).double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def read_prompts(prompts: str | Sequence[str]) -> list[str]:
    """A list of prompts, or the URL of a text file: one prompt per line; blank lines and lines
    starting with ``#`` are skipped."""
    if isinstance(prompts, str):
        lines = storage.read_text(prompts).splitlines()
        prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts")
    return prompts


def evaluate_clip_score(ckpt: str, prompts: str | Sequence[str], out_url: str | None = None,
                        num_per_prompt: int = 4, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        guidance: float = 1.0, use_cache: bool = True, batch_size: int = 16, seed: int = 0,
                        clip_model: str = "ViT-B-32", clip_weights: str | None = None,
                        clip_overrides: dict[str, Any] | None = None, device=None,
                        progress: bool = True) -> dict[str, Any]:
    """Generate ``num_per_prompt`` images per prompt with the text prior ``ckpt`` (package, run
    directory or step folder) and score them against their prompt with CLIP. With ``out_url``
    (``.json``), writes the result there and a grid next to it (``<stem>.png``: one row per prompt,
    the first :data:`GRID_PROMPTS` prompts).

    Returns ``clip_score`` (mean over all images), ``clip_score_std``, ``per_prompt`` (prompt, its
    images' scores, their mean), ``num_images``, ``protocol`` (CLIP model and weights sha256, the
    formula, sampling, seed), ``seconds`` and ``generation_seconds``."""
    t0 = time.perf_counter()
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    prompts = read_prompts(prompts)
    if num_per_prompt < 1:
        raise ValueError(f"num_per_prompt must be >= 1, got {num_per_prompt}")
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance,
                              use_cache=use_cache)
    clip = load_clip(clip_model, clip_weights, device, clip_overrides)   # fails fast, before the prior
    url = resolve_prior(ckpt)
    prior, image_tokenizer = load_prior_with_tokenizer(url, device=device)
    if text_encoder_of(prior) is None:
        raise ValueError(f"{getattr(prior, 'registry_name', ckpt)} is not text-conditional: CLIP score needs a "
                         f"text prior")
    per_prompt, grid, all_scores, gen_s = [], [], [], 0.0
    from tqdm import tqdm
    for j, prompt in enumerate(tqdm(prompts, desc="clip-score", unit="prompt", disable=not progress)):
        images, s = sample_images(prior, image_tokenizer, num_per_prompt, sampling, seed=seed, batch_size=batch_size,
                                  prompt=prompt, progress=False, start_index=j * num_per_prompt)
        gen_s += s
        scores = clip_score(images, prompt, clip.model, clip.preprocess, clip.text_tokenizer)
        all_scores.append(scores)
        per_prompt.append({"prompt": prompt, "scores": [round(float(v), 4) for v in scores],
                           "mean": float(scores.mean())})
        if j < GRID_PROMPTS:
            grid.append(images)
    flat = torch.cat(all_scores)
    result: dict[str, Any] = {
        "task": "clip-score",
        "clip_score": float(flat.mean()),
        "clip_score_std": float(flat.std()) if flat.numel() > 1 else 0.0,
        "num_prompts": len(prompts), "num_images": int(flat.numel()),
        "per_prompt": per_prompt,
        "protocol": {
            "task": "clip-score", "ckpt": ckpt, "prior": getattr(prior, "registry_name", None), "package": url,
            "formula": f"{CLIP_SCALE:g} * max(cos(clip_image, clip_text), 0), mean over images (Hessel et al. 2021)",
            "clip": clip.info, "preprocess": {"size": list(clip.preprocess.size), "resize": clip.preprocess.resize_mode,
                                              "interpolation": clip.preprocess.interpolation, "input": "8-bit rounded"},
            "num_per_prompt": num_per_prompt, "seed": seed,
            "seeds": "sample_seeds(seed, prompt_index * num_per_prompt + i)",
            "sampling": {"temperature": temperature, "top_k": top_k, "top_p": top_p, "guidance": guidance,
                         "use_cache": use_cache},
            "image_size": list(grid[0].shape[-2:]), "device": str(device)},
        "generation_seconds": round(gen_s, 3),
    }
    if not math.isfinite(result["clip_score"]):
        raise RuntimeError("CLIP score is not finite (NaN weights or images?)")
    result["seconds"] = round(time.perf_counter() - t0, 3)
    if out_url is not None:
        png = sibling_url(out_url, ".png")
        save_grid(torch.cat(grid), png, ncol=num_per_prompt)
        write_result(result, out_url, {"grid": png}, url)
    return result
