"""Training losses for the tokenizers (stage 1).

- Logit-Laplace likelihood: Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation" (DALL-E),
  sec. 2.1 / appendix A.3, used by ViT-VQGAN (Yu et al. 2021, "Vector-quantized Image Modeling
  with Improved VQGAN", sec. 3.3) next to an L2 term.
- LPIPS perceptual distance: Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features
  as a Perceptual Metric" (VGG16 trunk of Simonyan & Zisserman 2015 + learned linear heads).
- Probabilistic contrastive loss (PCL): Zhang et al. CVPR 2023, "Regularized Vector Quantization
  for Tokenized Image Synthesis" (arXiv:2303.06424), eq. (3): PatchNCE (Park et al. 2020,
  "Contrastive Learning for Unpaired Image-to-Image Translation", CUT) on frozen VGG-19 features
  (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), the positive weighted inside the log by the
  normalized distance between the sampled and the best-matching code, negatives scaled by 1/L.
- Adversarial losses: hinge (Lim & Ye 2017; Miyato et al. 2018) and non-saturating (Goodfellow et
  al. 2014), the adaptive weight of taming-transformers (Esser et al. 2021, "Taming Transformers
  for High-Resolution Image Synthesis", eq. 7) and the R1 penalty (Mescheder et al. 2018) that
  StyleGAN2 (Karras et al. 2020) pairs with its discriminator.

Images are ``[B, 3, H, W]`` in ``[-1, 1]`` (DESIGN.md). Pretrained LPIPS and VGG-19 weights only
exist online, so they are loaded from a path/URL or the cache (``VQSCALE_CACHE``, torch hub's);
``pretrained=False`` builds the same network with random weights (tests).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline import storage

from .weights import load_state_dict_file

__all__ = [
    "logit_laplace_log_prob", "logit_laplace_nll", "split_logit_laplace", "logit_laplace_mean",
    "l1_loss", "l2_loss", "LPIPS", "LPIPSWeightsNotFound", "lpips_weight_candidates",
    "convert_lpips_weights", "VGG19Features", "VGGWeightsNotFound", "vgg19_weight_candidates",
    "ProbabilisticContrastiveLoss", "pcl_weights", "d_loss", "g_loss", "adaptive_weight",
    "r1_penalty", "LossWeights",
]


# --------------------------------------------------------------------------------------------
# Logit-Laplace (DALL-E, sec. 2.1 and appendix A.3)
# --------------------------------------------------------------------------------------------

def _squeeze(x: Tensor, eps: float) -> Tensor:
    """Pixels in [-1, 1] -> (0, 1) -> [eps, 1 - eps]. The logit of 0 or 1 is infinite, so DALL-E
    keeps targets away from the ends of the support (eps = 0.1 in the paper)."""
    return (1 - 2 * eps) * ((x + 1) * 0.5) + eps


def logit_laplace_log_prob(x: Tensor, mu: Tensor, log_b: Tensor) -> Tensor:
    """Elementwise log-density of the logit-Laplace distribution on ``x`` in (0, 1):

    ``f(x | mu, b) = 1 / (2 b x (1 - x)) * exp(-|logit(x) - mu| / b)``,

    i.e. the density of ``sigmoid(y)`` for ``y ~ Laplace(mu, b)``; ``1 / (x (1 - x))`` is the
    Jacobian of the logit, which makes it integrate to 1 over (0, 1)."""
    log_x, log_1mx = torch.log(x), torch.log1p(-x)
    logit = log_x - log_1mx
    return -(math.log(2.0) + log_b + log_x + log_1mx) - (logit - mu).abs() * torch.exp(-log_b)


def logit_laplace_nll(x_target: Tensor, mu: Tensor, log_b: Tensor, eps: float = 0.1,
                      reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of target pixels ``x_target`` in [-1, 1] under the logit-Laplace
    distribution with location ``mu`` and log-scale ``log_b`` (same shape, e.g. from
    :func:`split_logit_laplace`). The target is squeezed to ``[eps, 1 - eps]`` first (DALL-E).

    Includes every term (``log 2b`` and the ``log x(1-x)`` Jacobian), so ``exp(-nll)`` is a proper
    density over the squeezed pixel value. ``reduction``: "mean" (per pixel, default), "sum",
    "none". Computed in float32 at least: the Jacobian and ``exp(-log_b)`` overflow in half.
    """
    dtype = torch.promote_types(mu.dtype, torch.float32)
    x = _squeeze(x_target.to(dtype), eps)
    nll = -logit_laplace_log_prob(x, mu.to(dtype), log_b.to(dtype))
    if reduction == "mean":
        return nll.mean()
    if reduction == "sum":
        return nll.sum()
    if reduction == "none":
        return nll
    raise ValueError(f"reduction must be mean|sum|none, got {reduction!r}")


def split_logit_laplace(out: Tensor) -> tuple[Tensor, Tensor]:
    """Split a decoder output with 2C channels (DALL-E: 6 for RGB) into ``(mu, log_b)``: the
    first C channels are the locations, the last C the log-scales."""
    if out.shape[1] % 2:
        raise ValueError(f"expected an even channel count (mu and log_b), got {out.shape[1]}")
    mu, log_b = out.chunk(2, dim=1)
    return mu, log_b


def logit_laplace_mean(mu: Tensor, eps: float = 0.1) -> Tensor:
    """Map locations back to an image in [-1, 1]: ``sigmoid(mu)`` is the median of the squeezed
    pixel; undo the squeeze and clamp (DALL-E's reconstruction ``clamp((sigmoid(mu) - eps) /
    (1 - 2 eps), 0, 1)``)."""
    x = ((torch.sigmoid(mu) - eps) / (1 - 2 * eps)).clamp(0.0, 1.0)
    return x * 2 - 1


# --------------------------------------------------------------------------------------------
# Pixel reconstruction
# --------------------------------------------------------------------------------------------

def l1_loss(recon: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error per pixel (taming-transformers' pixel loss)."""
    return (recon.float() - target.float()).abs().mean()


def l2_loss(recon: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per pixel (ViT-VQGAN's L2 term, weight 1.0)."""
    return (recon.float() - target.float()).pow(2).mean()


# --------------------------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018) on VGG16 (Simonyan & Zisserman 2015)
# --------------------------------------------------------------------------------------------

# torchvision's VGG16 "features" configuration (cfg "D"); "M" is a 2x2 max-pool.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices into `features` after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (LPIPS' five slices).
_VGG16_TAPS = (3, 8, 15, 22, 29)
_VGG16_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS' ScalingLayer: maps [-1, 1] inputs to ImageNet-normalized ones.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)

FULL_WEIGHT_FILES = ("lpips_vgg16.safetensors", "lpips_vgg16.pth")
VGG_WEIGHT_FILES = ("vgg16.safetensors", "vgg16-397923af.pth", "vgg16.pth")
LIN_WEIGHT_FILES = ("lpips_vgg16_lin.safetensors", "lpips_vgg16_lin.pth", "vgg.pth")


class LPIPSWeightsNotFound(FileNotFoundError):
    """No pretrained LPIPS weights at the given path or in the cache."""


def _cache_dir() -> str:
    return os.environ.get("VQSCALE_CACHE") or os.path.expanduser("~/.cache/vqscale")


def _torch_hub_checkpoints() -> str:
    """Where ``torchvision.models.*(weights=...)`` puts its downloads."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch")
    return os.path.join(torch_home, "hub", "checkpoints")


def lpips_weight_candidates() -> dict[str, list[str]]:
    """Where :class:`LPIPS` looks, in order: a complete file (ours, or lpips/taming's full
    state dict) under ``$VQSCALE_CACHE/weights``; else a torchvision VGG16 checkpoint (there, or
    torch hub's cache, where ``torchvision.models.vgg16(weights=...)`` puts it) plus the LPIPS
    linear heads (``vgg.pth`` of the ``lpips`` package, v0.1)."""
    wdir = storage.join(_cache_dir(), "weights")
    hub = _torch_hub_checkpoints()
    return {
        "full": [storage.join(wdir, f) for f in FULL_WEIGHT_FILES],
        "vgg": [storage.join(wdir, f) for f in VGG_WEIGHT_FILES] + [os.path.join(hub, "vgg16-397923af.pth")],
        "lin": [storage.join(wdir, f) for f in LIN_WEIGHT_FILES],
    }


def _canonical_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename the layouts we accept to ours: torchvision (``features.N.*``), lpips/taming
    (``net.sliceK.N.*``, N the original VGG index), lpips heads (``linK.model.1.weight``).
    Classifier weights and LPIPS' scaling constants are dropped (not used / built in)."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        for prefix in ("module.", "loss.", "perceptual_loss."):   # DDP / taming VQGAN checkpoints
            k = k.removeprefix(prefix)
        if k.startswith("features."):
            k = "net." + k
        k = re.sub(r"^net\.slice\d+\.(\d+)\.", r"net.features.\1.", k)
        if k.startswith(("net.features.", "lin")):
            out[k] = v
    return out


class _VGGFeatures(nn.Module):
    """torchvision's ``vgg16().features`` / ``vgg19().features`` (``cfg``) up to the last tap, same
    module indices (so their state dict keys ``features.N.*`` load unchanged), built here so that
    model_zoo needs no torchvision. ``forward`` returns the activations after the ``taps``."""

    def __init__(self, cfg: tuple = _VGG16_CFG, taps: tuple[int, ...] = _VGG16_TAPS):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.taps = taps

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                feats.append(x)
        return feats

    @torch.no_grad()
    def random_init(self) -> None:
        # torchvision's VGG init
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)


def _load_checked(module: nn.Module, sd: dict[str, Tensor], source: str, what: str) -> None:
    """``module.load_state_dict`` from canonical keys after naming what is missing or misshapen
    (extra keys, e.g. a classifier, are ignored)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    if missing:
        raise ValueError(f"{what} weights from {source} lack {len(missing)} tensors, e.g. {missing[:3]}")
    for k, t in own.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise ValueError(f"{what} weights from {source}: {k} has shape {tuple(sd[k].shape)}, "
                             f"expected {tuple(t.shape)}")
    module.load_state_dict({k: sd[k] for k in own}, strict=True)


def _first_existing(urls: list[str]) -> str | None:
    return next((u for u in urls if storage.exists(u)), None)


class _NetLin(nn.Module):
    """A LPIPS head: dropout + 1x1 conv to one channel, no bias (keys ``model.1.weight``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """LPIPS distance (Zhang et al. 2018, "lin" variant on VGG16). ``forward(x, y) -> [B]``.

    Inputs in [-1, 1] are shifted/scaled as LPIPS does, VGG16 features at relu1_2, relu2_2,
    relu3_3, relu4_3, relu5_3 are unit-normalized over channels, squared differences weighted per
    channel by non-negative 1x1 heads, averaged over space and summed over layers.

    Weights: ``weights`` (a complete file: ours, or lpips/taming full state dict), or
    ``vgg_weights`` + ``lin_weights`` (torchvision VGG16 checkpoint + lpips ``vgg.pth``), else the
    cache (:func:`lpips_weight_candidates`). No weights found raises :class:`LPIPSWeightsNotFound`
    unless ``pretrained=False`` (random weights; tests). The module is frozen (no parameter
    requires grad, always eval mode) but differentiable w.r.t. its inputs.
    """

    def __init__(self, pretrained: bool = True, weights: str | None = None,
                 vgg_weights: str | None = None, lin_weights: str | None = None):
        super().__init__()
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = _VGGFeatures()
        for i, c in enumerate(_VGG16_CHANNELS):
            self.add_module(f"lin{i}", _NetLin(c))
        self._random_init()
        self.source: str = "random"
        if pretrained:
            self.load_weights(weights, vgg_weights, lin_weights)
        self.requires_grad_(False)
        self.eval()

    @property
    def lins(self) -> list[_NetLin]:
        return [getattr(self, f"lin{i}") for i in range(len(_VGG16_CHANNELS))]

    @torch.no_grad()
    def _random_init(self) -> None:
        self.net.random_init()
        for lin in self.lins:   # non-negative, as LPIPS constrains its heads (a distance)
            w = lin.model[1].weight
            nn.init.uniform_(w, 0.0, 2.0 / w.shape[1])

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)   # frozen metric: a parent's .train() must not enable dropout

    def load_weights(self, weights: str | None = None, vgg_weights: str | None = None,
                     lin_weights: str | None = None) -> None:
        """Load pretrained weights from explicit paths/URLs or the cache (see class doc)."""
        if weights is not None:
            sd, src = _canonical_keys(load_state_dict_file(weights)), weights
        elif vgg_weights is not None or lin_weights is not None:
            if vgg_weights is None or lin_weights is None:
                raise ValueError("give both vgg_weights and lin_weights (or one complete `weights` file)")
            sd = {**_canonical_keys(load_state_dict_file(vgg_weights)), **_canonical_keys(load_state_dict_file(lin_weights))}
            src = f"{vgg_weights} + {lin_weights}"
        else:
            sd, src = self._from_cache()
        self._load_canonical(sd, src)

    def _from_cache(self) -> tuple[dict[str, Tensor], str]:
        cand = lpips_weight_candidates()
        full = _first_existing(cand["full"])
        if full is not None:
            return _canonical_keys(load_state_dict_file(full)), full
        vgg, lin = _first_existing(cand["vgg"]), _first_existing(cand["lin"])
        if vgg is not None and lin is not None:
            sd = {**_canonical_keys(load_state_dict_file(vgg)), **_canonical_keys(load_state_dict_file(lin))}
            return sd, f"{vgg} + {lin}"
        raise LPIPSWeightsNotFound(
            "pretrained LPIPS (VGG16) weights not found; this machine cannot download them. Put either\n"
            f"  a complete file at {cand['full'][0]} (write one with "
            "model_zoo.losses.convert_lpips_weights), or\n"
            f"  torchvision's VGG16 checkpoint (vgg16-397923af.pth) at one of {cand['vgg']}\n"
            f"  and the lpips package's linear heads (lpips/weights/v0.1/vgg.pth) at one of {cand['lin']};\n"
            "or pass LPIPS(weights=PATH), set VQSCALE_CACHE, or use pretrained=False for random weights.")

    @torch.no_grad()
    def _load_canonical(self, sd: dict[str, Tensor], source: str) -> None:
        for lin in (k for k in self.state_dict() if k.startswith("lin")):
            if lin in sd and (sd[lin] < 0).any():
                raise ValueError(f"LPIPS weights from {source}: head {lin} has negative weights (not an LPIPS head)")
        _load_checked(self, sd, source, "LPIPS")
        self.source = source

    def features(self, x: Tensor) -> list[Tensor]:
        """The five VGG16 relu features of images in [-1, 1] (also what PatchNCE uses)."""
        w = self.net.features[0].weight
        return self.net(((x - self.shift) / self.scale).to(w.dtype))

    def distance_from_features(self, fx: list[Tensor], fy: list[Tensor]) -> Tensor:
        """LPIPS from precomputed :meth:`features`, so an objective can reuse them."""
        total = 0
        for lin, a, b in zip(self.lins, fx, fy):
            # F.normalize (not x / (||x|| + eps)) keeps the gradient finite at all-zero features.
            d = (F.normalize(a.float(), dim=1, eps=1e-10) - F.normalize(b.float(), dim=1, eps=1e-10)) ** 2
            # the head's 1x1 conv in float32 whatever the module's dtype (dropout is off: eval)
            total = total + F.conv2d(d, lin.model[1].weight.float()).mean(dim=(1, 2, 3))
        return total

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        f = self.features(torch.cat([x, y], dim=0))   # one pass over both batches
        n = x.shape[0]
        return self.distance_from_features([t[:n] for t in f], [t[n:] for t in f])


def convert_lpips_weights(vgg_weights: str, lin_weights: str, out: str) -> str:
    """Combine a torchvision VGG16 checkpoint and LPIPS linear heads into one safetensors file
    (e.g. ``$VQSCALE_CACHE/weights/lpips_vgg16.safetensors``), written atomically; returns ``out``."""
    from safetensors.torch import save as st_save
    m = LPIPS(pretrained=False)
    m.load_weights(vgg_weights=vgg_weights, lin_weights=lin_weights)
    storage.write_bytes(out, st_save({k: v.contiguous() for k, v in m.state_dict().items()}))
    return out


# --------------------------------------------------------------------------------------------
# VGG-19 features and the probabilistic contrastive loss (Regularized VQ, eq. 3)
# --------------------------------------------------------------------------------------------

# torchvision's VGG-19 (cfg "E") up to relu5_3. Regularized VQ (sec. 3.3) takes relu1_2, relu2_2,
# relu3_3, relu4_3 and relu5_3 of a pretrained VGG-19: at VGG-19's own indices (its blocks 3-5
# have four convs, so these are not VGG16's indices).
_VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512)
_VGG19_TAPS = (3, 8, 15, 24, 33)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)   # torchvision's input normalization for its VGG weights
_IMAGENET_STD = (0.229, 0.224, 0.225)
VGG19_WEIGHT_FILES = ("vgg19.safetensors", "vgg19-dcbb9e9d.pth", "vgg19.pth")


class VGGWeightsNotFound(FileNotFoundError):
    """No pretrained VGG-19 weights at the given path or in the caches."""


def vgg19_weight_candidates() -> list[str]:
    """Where :class:`VGG19Features` looks, in order: ``$VQSCALE_CACHE/weights/`` (a safetensors
    file or torchvision's checkpoint), then torch hub's cache, where
    ``torchvision.models.vgg19(weights="IMAGENET1K_V1")`` puts ``vgg19-dcbb9e9d.pth``."""
    wdir = storage.join(_cache_dir(), "weights")
    return [storage.join(wdir, f) for f in VGG19_WEIGHT_FILES] + [
        os.path.join(_torch_hub_checkpoints(), "vgg19-dcbb9e9d.pth")]


class VGG19Features(nn.Module):
    """Frozen ImageNet VGG-19 features of images in [-1, 1]: ``forward(x) -> [relu1_2, relu2_2,
    relu3_3, relu4_3, relu5_3]`` (what the probabilistic contrastive loss compares).

    Weights: ``weights`` (a torchvision ``vgg19`` state dict, or ours, any storage URL), else the
    caches (:func:`vgg19_weight_candidates`); none found raises :class:`VGGWeightsNotFound` unless
    ``pretrained=False`` (random weights of the same architecture; tests). No parameter requires
    grad and the module stays in eval mode, but it is differentiable w.r.t. its input."""

    def __init__(self, pretrained: bool = True, weights: str | None = None):
        super().__init__()
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.net = _VGGFeatures(_VGG19_CFG, _VGG19_TAPS)
        self.net.random_init()
        self.source = "random"
        if pretrained or weights is not None:
            self.load_weights(weights)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGG19Features":
        return super().train(False)

    @torch.no_grad()
    def load_weights(self, weights: str | None = None) -> None:
        src = weights if weights is not None else _first_existing(vgg19_weight_candidates())
        if src is None:
            raise VGGWeightsNotFound(
                "pretrained VGG-19 weights (the probabilistic contrastive loss's features) not found; this "
                f"machine cannot download them. Put torchvision's vgg19-dcbb9e9d.pth at one of "
                f"{vgg19_weight_candidates()}, pass VGG19Features(weights=PATH), set VQSCALE_CACHE, or use "
                "pretrained=False for random weights.")
        _load_checked(self, _canonical_keys(load_state_dict_file(src)), src, "VGG-19")
        self.source = src

    def forward(self, x: Tensor) -> list[Tensor]:
        w = self.net.features[0].weight
        return self.net((((x + 1) * 0.5 - self.mean) / self.std).to(w.dtype))


def _resize_map(d: Tensor, size: tuple[int, int]) -> Tensor:
    """Resample a ``[B, h, w]`` distance map to a feature map's ``(H, W)``. Upsampling repeats a
    token's distance over the feature positions its patch covers (nearest); downsampling averages
    the tokens a feature position covers (area). Both keep zeros exact when sizes divide."""
    if tuple(d.shape[-2:]) == tuple(size):
        return d
    up = size[0] >= d.shape[-2] and size[1] >= d.shape[-1]
    return F.interpolate(d[:, None], size=size, mode="nearest-exact" if up else "area")[:, 0]


def pcl_weights(w: Tensor) -> Tensor:
    """eq. (3)'s ``w'``: ``w [B, L]`` normalized to sum 1 over each image's L positions; an image
    whose weights are all 0 (no sampled code differs from its best match, or an eval forward) gets
    uniform ``1/L``, which makes eq. (3) the sum of CUT's PatchNCE terms."""
    total = w.sum(1, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(1e-30), torch.full_like(w, 1.0 / w.shape[1]))


class ProbabilisticContrastiveLoss(nn.Module):
    """Regularized VQ's probabilistic contrastive loss, eq. (3) of Zhang et al. (CVPR 2023)::

        L_pcl = -sum_{i=1..L} log  w'_i e^{y_i.z_i/tau} / (w'_i e^{y_i.z_i/tau} + 1/L sum_{j!=i} e^{y_i.z_j/tau})

    per image and feature layer: ``y`` the input image's features (the anchors; targets, no
    gradient), ``z`` the reconstruction's, both l2-normalized over channels, at ``L = num_patches``
    positions drawn per layer (the same for the whole batch, as in CUT; all positions if fewer);
    ``w_i = ||z_s - z_q||^2`` at position i (the distance between the sampled and the best-matching
    code; ``distances``, on the token grid, resampled to the layer's resolution) and ``w'`` those
    weights normalized over the L positions (:func:`pcl_weights`). Inside the log the weight scales
    the positive: the more a sampled code perturbs its region, the weaker the pull there (elastic
    reconstruction); the 1/L keeps the negatives at the scale of one positive (the paper's reason
    for it). Returns eq. (3) (a sum over the L positions, as written) averaged over images and
    layers; a layer with a single position has no negatives and adds 0.

    ``w'_i = 0`` (positions quantized by argmax, or a sample that drew its best match) makes the
    term infinite through its constant ``-log w'_i``, which carries no gradient; the term is then
    its finite part ``-y_i.z_i/tau + log(1/L sum_{j!=i} e^{y_i.z_j/tau})``, whose gradient is the
    limit of eq. (3)'s as ``w'_i -> 0`` (a full pull).

    ``distances``: ``[B, h, w]``, or ``[B, N]`` with a square token grid.
    """

    def __init__(self, num_patches: int = 256, tau: float = 0.07):
        super().__init__()
        self.num_patches = num_patches
        self.tau = tau

    def forward(self, feats_recon: list[Tensor], feats_input: list[Tensor], distances: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
        if len(feats_recon) != len(feats_input) or not feats_recon:
            raise ValueError("need the same, non-zero number of recon and input feature layers")
        d = distances.detach().float()
        if d.dim() == 2:
            side = math.isqrt(d.shape[1])
            if side * side != d.shape[1]:
                raise ValueError(f"distances [B, N] need a square grid (N={d.shape[1]}); pass [B, h, w]")
            d = d.view(d.shape[0], side, side)
        total = 0
        for fr, fi in zip(feats_recon, feats_input):
            B, C, H, W = fr.shape
            P = min(self.num_patches, H * W)
            if P < 2:
                continue
            idx = torch.randperm(H * W, generator=generator, device="cpu")[:P].to(fr.device)
            z = F.normalize(fr.flatten(2)[:, :, idx].float(), dim=1).transpose(1, 2)            # [B, L, C]
            y = F.normalize(fi.detach().flatten(2)[:, :, idx].float(), dim=1).transpose(1, 2)   # [B, L, C]
            s = y @ z.transpose(1, 2) / self.tau                     # [B, L anchors i, L candidates j]
            pos = s.diagonal(dim1=1, dim2=2)
            eye = torch.eye(P, dtype=torch.bool, device=s.device)
            log_neg = torch.logsumexp(s.masked_fill(eye, float("-inf")), dim=2) - math.log(P)
            w = pcl_weights(_resize_map(d.to(fr.device), (H, W)).flatten(1)[:, idx])
            # -log(w e^a / (w e^a + n)) = softplus(log n - log w - a), stable for any magnitudes
            term = torch.where(w > 0, F.softplus(log_neg - pos - torch.log(w.clamp_min(1e-30))), log_neg - pos)
            total = total + term.sum(1).mean()
        return total / len(feats_recon)


# --------------------------------------------------------------------------------------------
# Adversarial losses
# --------------------------------------------------------------------------------------------

_KINDS = ("hinge", "non_saturating")


def d_loss(real_logits: Tensor, fake_logits: Tensor, kind: str = "hinge") -> Tensor:
    """Discriminator loss, taming-transformers' convention: half the sum of the real and fake
    terms. ``hinge``: ``mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))``; ``non_saturating``
    (``vanilla``): ``mean(softplus(-D(x))) + mean(softplus(D(G(z))))`` (= BCE with logits)."""
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    if kind in ("non_saturating", "vanilla"):
        return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")


def g_loss(fake_logits: Tensor, kind: str = "hinge") -> Tensor:
    """Generator loss: ``hinge``: ``-mean(D(G(z)))``; ``non_saturating``: ``mean(softplus(-D(G(z))))``
    = ``-mean(log sigmoid(D(G(z))))`` (Goodfellow et al. 2014's non-saturating heuristic)."""
    fake = fake_logits.float()
    if kind == "hinge":
        return -fake.mean()
    if kind in ("non_saturating", "vanilla"):
        return F.softplus(-fake).mean()
    raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")


def adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max: float = 1e4,  # noqa: A002
                    eps: float = 1e-4) -> Tensor:
    """taming-transformers' adaptive GAN weight (Esser et al. 2021, eq. 7):
    ``||grad_L nll|| / (||grad_L g|| + eps)`` with L the decoder's last layer, clamped to
    ``[0, max]`` and detached (it is a weight, not a path for gradients). The caller multiplies
    it by its adversarial weight. Both losses keep their graphs (``retain_graph``) for backward.
    Without a graph (e.g. evaluation under ``no_grad``) it returns 0, as taming does."""
    if not (nll_loss.requires_grad and g_loss.requires_grad):
        return torch.zeros((), device=last_layer.device)
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = nll_grad.float().norm() / (g_grad.float().norm() + eps)
    return w.clamp(0.0, max).detach()


def r1_penalty(real_logits: Tensor, real_images: Tensor) -> Tensor:
    """R1 gradient penalty (Mescheder et al. 2018), ``E ||grad_x D(x)||^2`` on real images (which
    must require grad), the regularizer StyleGAN2 uses with its discriminator (weight gamma/2,
    applied lazily every few steps by the trainer)."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


# --------------------------------------------------------------------------------------------
# Loss weights
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossWeights:
    """Weights of the tokenizer objective's terms. Defaults are ViT-VQGAN's (Yu et al. 2021, sec.
    3.3 / 4.1): ``L = L_VQ + 0.1 L_adv + 0.1 L_perceptual + 0.1 L_logit-laplace + 1.0 L_2`` with
    commitment ``beta = 0.25``. ``l1`` is taming's pixel loss, ``prior_kl`` and ``contrastive``
    Regularized VQ's prior regularizer and probabilistic contrastive loss (off unless a recipe
    sets them). ``adversarial`` multiplies :func:`adaptive_weight` when the objective uses it."""

    l1: float = 0.0
    l2: float = 1.0
    perceptual: float = 0.1
    adversarial: float = 0.1
    logit_laplace: float = 0.1
    commitment: float = 0.25
    prior_kl: float = 0.0
    contrastive: float = 0.0

    @classmethod
    def taming_vqgan(cls) -> "LossWeights":
        """taming-transformers' VQGAN: L1 + LPIPS (1.0), discriminator weight 0.8 (times the
        adaptive weight), beta 0.25, no L2 / logit-Laplace."""
        return cls(l1=1.0, l2=0.0, perceptual=1.0, adversarial=0.8, logit_laplace=0.0)
