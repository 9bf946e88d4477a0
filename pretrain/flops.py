"""Training FLOPs, model FLOPs utilization (MFU) and the matmul ceiling a device really reaches.

MFU is the FLOPs the model needs per step (forward + backward), times steps per second, over the
device's peak. Recomputation (activation checkpointing) and padding do not count: it is the
model's work, not the hardware's (Chowdhery et al., "PaLM", 2022, appendix B).

- :func:`transformer_flops_per_token` is PaLM's closed form, which torchtitan also divides by:
  ``6 N + 12 L d T`` per token, with ``N`` the matmul parameters (embedding tables excluded: a
  lookup is not a matmul), ``L`` layers, width ``d`` and attention context ``T``.
- :func:`count_flops` counts what a function runs (forward and backward), from the shapes, with
  torch's ``FlopCounterMode``: matmuls, convolutions and attention. On the meta device nothing is
  computed, so a 1.7B prior or ViT-VQGAN with its losses is counted in a second on a laptop.
- :func:`step_flops_per_sample` counts one training step of a run per sample: a prior's forward
  and backward; a tokenizer's forward and backward with its perceptual term (LPIPS' VGG forward
  and its backward to the image) and its adversarial term (the discriminator on the fakes with
  the backward to them), plus the discriminator's own step (reals and fakes, forward and
  backward). The adversarial parts are their own entries, because they run only from
  ``discriminator.start_step`` on (:func:`flops_at_step`). StyleGAN2's lazy R1 (every 16th step)
  and the EMA update are left out.
- :func:`matmul_peak` measures the best rate of large square matmuls on a device. An MFU against
  it says how close a step comes to what this device does at best. The datasheet peak (989 TFLOP/s
  for an H100 SXM in dense bf16) is the other denominator; it comes from :data:`PEAK_FLOPS` or
  from the user.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from model_zoo.losses import LPIPS, VGG19Features
from model_zoo.registry import create_model
from model_zoo.stackformer import Stackformer

from .models import model_from_config

__all__ = ["PEAK_FLOPS", "peak_flops", "transformer_flops_per_token", "count_flops", "step_flops_per_sample",
           "flops_at_step", "matmul_peak", "matmul_params"]

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), matched by substring of
# torch.cuda.get_device_name().
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device | str | None = None, override_tflops: float | None = None) -> float | None:
    """The datasheet peak of ``device`` (bf16 dense), or ``override_tflops`` x 1e12; None where unknown (CPUs)."""
    if override_tflops:
        return float(override_tflops) * 1e12
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(dev)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def matmul_params(model: nn.Module) -> int:
    """Parameters used in matmuls: all but embedding tables (and the frozen text encoder, whose
    forward is not trained and is counted apart)."""
    skip = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip and p.requires_grad)


def transformer_flops_per_token(params: int, layers: int, width: int, context: int) -> float:
    """PaLM's training FLOPs per token: ``6 N + 12 L d T`` (forward + backward)."""
    return 6.0 * params + 12.0 * layers * width * context


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of what ``fn`` runs (call ``.backward()`` inside to count the backward too)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def _meta_model(name: str, args: dict[str, Any]) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **args)


def step_flops_per_sample(cfg, derived: dict[str, Any] | None = None) -> dict[str, float]:
    """Training FLOPs per sample of one step of the run ``cfg`` (a ``RunConfig``), by parts, counted
    on the meta device at batch 1. ``derived``: what the trainer derives from the data (a prior's
    grid and codebook). Returns ``{"total": ..., part: ...}``."""
    derived = dict(derived or {})
    with torch.device("meta"):
        model = model_from_config(cfg, derived)
    model.train()
    parts: dict[str, float] = {}
    if cfg.stage == "prior":
        parts["prior"] = count_flops(lambda: _prior_step(model))
    else:
        res = int(getattr(model, "image_size", 0) or cfg.data.resolution)
        x = torch.zeros(1, 3, res, res, device="meta")
        loss_cfg = cfg.tokenizer_loss
        lpips = vgg19 = None
        if loss_cfg.perceptual > 0:
            with torch.device("meta"):
                lpips = LPIPS(pretrained=False)
        if loss_cfg.contrastive > 0:   # Regularized VQ's contrastive loss: its own VGG-19 pass
            with torch.device("meta"):
                vgg19 = VGG19Features(pretrained=False)
        disc = None
        if cfg.discriminator.model and loss_cfg.adversarial > 0:
            disc = _meta_model(cfg.discriminator.model, dict(cfg.discriminator.model_args))
        out: dict[str, torch.Tensor] = {}

        def generator_step(with_disc: bool) -> None:
            recon = model(x).recon
            loss = recon.float().abs().mean()
            if lpips is not None:
                loss = loss + lpips(recon, x).mean()
            if vgg19 is not None:
                loss = loss + sum(f.float().mean() for f in vgg19(torch.cat([recon, x])))
            if with_disc:
                loss = loss + disc(recon).mean()
            loss.backward()
            out["recon"] = recon.detach()

        parts["generator"] = count_flops(lambda: generator_step(False))
        if disc is not None:
            # The GAN term and the discriminator's step run only from discriminator.start_step on:
            # they are separate parts, left out of the steps before it (:func:`flops_at_step`).
            parts["adversarial"] = count_flops(lambda: generator_step(True)) - parts["generator"]

            def disc_step() -> None:
                (disc(x).mean() + disc(out["recon"]).mean()).backward()

            parts["discriminator"] = count_flops(disc_step)
    parts["total"] = float(sum(parts.values()))
    return parts


def flops_at_step(parts: dict[str, float], cfg, step: int) -> float:
    """Training FLOPs per sample of step ``step``: :func:`step_flops_per_sample`'s total, less the
    adversarial parts before ``discriminator.start_step`` (taming's recipes start them late)."""
    if step >= cfg.discriminator.start_step:
        return parts["total"]
    return parts["total"] - parts.get("adversarial", 0.0) - parts.get("discriminator", 0.0)


def _prior_step(model: nn.Module) -> None:
    codes = torch.zeros(1, model.num_tokens, dtype=torch.long, device="meta")
    cond = model.null_condition(1)
    positions = None        # only Stackformer models kept positions (MQ-VAE tokens)
    if isinstance(model, Stackformer):
        positions = torch.zeros(1, model.num_tokens, dtype=torch.long, device="meta")
    logits = model(codes, cond, positions)
    logits = logits[0] if isinstance(logits, tuple) else logits
    logits.float().sum().backward()


def matmul_peak(device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                sizes: tuple[int, ...] | None = None, seconds: float = 0.5) -> dict[str, Any]:
    """The best measured FLOP/s of square matmuls ``n x n @ n x n`` on ``device`` in ``dtype``:
    ``{"flops": best, "n": its size, "by_size": {n: rate}}``. Each size is warmed up, then timed
    for about ``seconds`` (synchronizing only at the ends)."""
    dev = torch.device(device)
    if sizes is None:
        sizes = (4096, 8192, 16384) if dev.type == "cuda" else (512, 1024, 2048)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    by_size: dict[int, float] = {}
    for n in sizes:
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        a @ b
        sync()
        reps, t0 = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            if reps % 4 == 0:
                sync()
                if time.perf_counter() - t0 >= seconds:
                    break
        sync()
        by_size[n] = 2.0 * n ** 3 * reps / (time.perf_counter() - t0)
        del a, b
    best = max(by_size, key=by_size.get)
    return {"flops": by_size[best], "n": best, "dtype": str(dtype).replace("torch.", ""), "by_size": by_size}
