"""Training losses for the tokenizers (stage 1).

- Logit-Laplace likelihood: Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation" (DALL-E),
  sec. 2.1 / appendix A.3, used by ViT-VQGAN (Yu et al. 2021, "Vector-quantized Image Modeling
  with Improved VQGAN", sec. 3.3) next to an L2 term.
- LPIPS perceptual distance: Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features
  as a Perceptual Metric" (VGG16 trunk of Simonyan & Zisserman 2015 + learned linear heads).
- Probabilistic contrastive loss: Zhang et al. CVPR 2023, "Regularized Vector Quantization for
  Tokenized Image Synthesis": PatchNCE (Park et al. 2020, "Contrastive Learning for Unpaired
  Image-to-Image Translation", CUT) on perceptual features, positives weighted by the
  quantization distance ``||z - z_q||^2``.
- Adversarial losses: hinge (Lim & Ye 2017; Miyato et al. 2018) and non-saturating (Goodfellow et
  al. 2014), the adaptive weight of taming-transformers (Esser et al. 2021, "Taming Transformers
  for High-Resolution Image Synthesis", eq. 7) and the R1 penalty (Mescheder et al. 2018) that
  StyleGAN2 (Karras et al. 2020) pairs with its discriminator.

Images are ``[B, 3, H, W]`` in ``[-1, 1]`` (DESIGN.md). Pretrained LPIPS weights only exist online,
so they are loaded from a path/URL or the cache (``VQSCALE_CACHE``); ``pretrained=False`` builds the
same network with random weights (tests).
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
    "convert_lpips_weights", "ProbabilisticContrastiveLoss", "d_loss", "g_loss", "adaptive_weight",
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


def lpips_weight_candidates() -> dict[str, list[str]]:
    """Where :class:`LPIPS` looks, in order: a complete file (ours, or lpips/taming's full
    state dict) under ``$VQSCALE_CACHE/weights``; else a torchvision VGG16 checkpoint (there, or
    torch hub's cache, where ``torchvision.models.vgg16(weights=...)`` puts it) plus the LPIPS
    linear heads (``vgg.pth`` of the ``lpips`` package, v0.1)."""
    wdir = storage.join(_cache_dir(), "weights")
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch")
    hub = os.path.join(torch_home, "hub", "checkpoints")
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


class _VGG16Features(nn.Module):
    """torchvision's ``vgg16().features`` up to relu5_3, same module indices (so its state dict
    keys ``features.N.*`` load unchanged), built here so that model_zoo needs no torchvision."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
                c_in = v
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _VGG16_TAPS:
                feats.append(x)
        return feats


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
        self.net = _VGG16Features()
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
        # torchvision's VGG init; heads non-negative as LPIPS constrains them (a distance).
        for m in self.net.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for lin in self.lins:
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

        def first(urls: list[str]) -> str | None:
            return next((u for u in urls if storage.exists(u)), None)

        full = first(cand["full"])
        if full is not None:
            return _canonical_keys(load_state_dict_file(full)), full
        vgg, lin = first(cand["vgg"]), first(cand["lin"])
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
        own = self.state_dict()
        missing = sorted(set(own) - set(sd))
        if missing:
            raise ValueError(f"LPIPS weights from {source} lack {len(missing)} tensors, e.g. {missing[:3]}")
        for k, t in own.items():
            if tuple(sd[k].shape) != tuple(t.shape):
                raise ValueError(f"LPIPS weights from {source}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(t.shape)}")
        for lin in (k for k in own if k.startswith("lin")):
            if (sd[lin] < 0).any():
                raise ValueError(f"LPIPS weights from {source}: head {lin} has negative weights (not an LPIPS head)")
        self.load_state_dict({k: sd[k] for k in own}, strict=True)
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
# Probabilistic contrastive loss (Regularized VQ) = distance-weighted PatchNCE (CUT)
# --------------------------------------------------------------------------------------------

def _resize_map(d: Tensor, size: tuple[int, int]) -> Tensor:
    """Resample a ``[B, h, w]`` distance map to a feature map's ``(H, W)``. Upsampling repeats a
    token's distance over the feature positions its patch covers (nearest); downsampling averages
    the tokens a feature position covers (area). Both keep zeros exact when sizes divide."""
    if tuple(d.shape[-2:]) == tuple(size):
        return d
    up = size[0] >= d.shape[-2] and size[1] >= d.shape[-1]
    return F.interpolate(d[:, None], size=size, mode="nearest-exact" if up else "area")[:, 0]


class ProbabilisticContrastiveLoss(nn.Module):
    """PatchNCE (Park et al. 2020) with positives weighted by the quantization distance, the
    probabilistic contrastive loss of Regularized VQ (Zhang et al. CVPR 2023).

    Per feature layer, ``num_patches`` positions are sampled (the same for the whole batch, as in
    CUT). The reconstruction's feature at a position is the query; the input's feature at the same
    position is the positive, the input's features at the other sampled positions of the same
    image are negatives; InfoNCE with temperature ``tau`` on l2-normalized features. Position i's
    term is weighted by ``w_i = d_i / mean_j d_j`` over the sampled positions of that image, with
    ``d`` the distance map resampled to the layer's resolution: weights have **mean 1**, so with
    equal distances this is plain PatchNCE and the loss scale does not depend on ``num_patches``;
    positions with zero distance contribute nothing (an image with all-zero distances gives 0).
    The input's features are targets (detached). Returns the mean over positions, images and layers.

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
            idx = torch.randperm(H * W, generator=generator, device="cpu")[:P].to(fr.device)
            q = F.normalize(fr.flatten(2)[:, :, idx].float(), dim=1).transpose(1, 2)            # [B, P, C]
            k = F.normalize(fi.detach().flatten(2)[:, :, idx].float(), dim=1).transpose(1, 2)   # [B, P, C]
            logits = q @ k.transpose(1, 2) / self.tau                                            # [B, P, P]
            target = torch.arange(P, device=fr.device).repeat(B)
            nce = F.cross_entropy(logits.flatten(0, 1), target, reduction="none").view(B, P)
            w = _resize_map(d.to(fr.device), (H, W)).flatten(1)[:, idx]                           # [B, P]
            w = w / w.mean(dim=1, keepdim=True).clamp_min(1e-12)
            total = total + (w * nce).mean()
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
