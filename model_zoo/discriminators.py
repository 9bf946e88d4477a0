"""Discriminators for tokenizer training.

- StyleGAN2 discriminator (Karras et al. 2020, "Analyzing and Improving the Image Quality of
  StyleGAN", residual architecture, fig. 7), the one ViT-VQGAN trains against (Yu et al. 2021,
  sec. 3.3). Equalized learning rate (Karras et al. 2018, "Progressive Growing of GANs", sec.
  4.1), blurred downsampling with the [1, 3, 3, 1] FIR filter (Zhang 2019, "Making Convolutional
  Networks Shift-Invariant Again"; StyleGAN's upfirdn2d), minibatch standard deviation (Karras et
  al. 2018, sec. 3). Layer structure and names follow rosinality/stylegan2-pytorch.
- PatchGAN discriminator (Isola et al. 2017, "Image-to-Image Translation with Conditional
  Adversarial Networks", pix2pix), as taming-transformers' ``NLayerDiscriminator`` (Esser et al.
  2021) uses it, with BatchNorm or ActNorm (Kingma & Dhariwal 2018, Glow).

Each model has a frozen config dataclass; presets are registered with ``kind="discriminator"``.
Inputs are images ``[B, C, H, W]`` in [-1, 1]; outputs are logits (``[B, 1]`` for StyleGAN2,
``[B, 1, h, w]`` for PatchGAN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_model

__all__ = [
    "StyleGAN2DiscConfig", "PatchGANConfig", "StyleGAN2Discriminator", "PatchGANDiscriminator",
    "EqualConv2d", "EqualLinear", "FusedLeakyReLU", "Blur", "MinibatchStdDev", "ActNorm",
    "make_blur_kernel",
]

_STYLEGAN2 = "Karras et al. 2020, Analyzing and Improving the Image Quality of StyleGAN (StyleGAN2)"
_PIX2PIX = "Isola et al. 2017, pix2pix; Esser et al. 2021, taming-transformers NLayerDiscriminator"


@dataclass(frozen=True)
class StyleGAN2DiscConfig:
    """``channels(res) = min(max_channels, channel_base * channel_multiplier // res)``: with the
    defaults (base 16384, multiplier 2, max 512) this is StyleGAN2's config-F schedule
    (512 up to 64 px, 256 at 128, 128 at 256, 64 at 512)."""

    resolution: int = 256
    in_channels: int = 3
    channel_multiplier: int = 2
    channel_base: int = 16384
    max_channels: int = 512
    blur_kernel: tuple[int, ...] = (1, 3, 3, 1)
    mbstd_group_size: int = 4
    mbstd_num_features: int = 1
    lr_mul: float = 1.0

    def channels(self, res: int) -> int:
        return max(1, min(self.max_channels, self.channel_base * self.channel_multiplier // res))


@dataclass(frozen=True)
class PatchGANConfig:
    in_channels: int = 3
    ndf: int = 64
    n_layers: int = 3
    norm: str = "batch"   # "batch" (taming's default), "act" (ActNorm) or "none"


# --------------------------------------------------------------------------------------------
# StyleGAN2 building blocks
# --------------------------------------------------------------------------------------------

def make_blur_kernel(k: tuple[int, ...] | list[int]) -> Tensor:
    """Separable FIR filter: the outer product of ``k`` with itself, normalized to sum 1 so that
    blurring preserves the mean (a low-pass filter before stride-2 subsampling against aliasing)."""
    k1 = torch.tensor(k, dtype=torch.float32)
    k2 = k1[None, :] * k1[:, None]
    return k2 / k2.sum()


class Blur(nn.Module):
    """upfirdn2d with up = down = 1: pad, then a depthwise convolution with the FIR kernel
    (flipped, so it is a true convolution as in upfirdn2d; [1, 3, 3, 1] is symmetric anyway)."""

    def __init__(self, kernel: tuple[int, ...], pad: tuple[int, int]):
        super().__init__()
        # A constant, rebuilt from the config: not saved in checkpoints.
        self.register_buffer("kernel", make_blur_kernel(kernel), persistent=False)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        p0, p1 = self.pad
        w = self.kernel.flip(0, 1).to(x.dtype)[None, None].expand(c, 1, *self.kernel.shape)
        return F.conv2d(F.pad(x, (p0, p1, p0, p1)), w, groups=c)


class EqualConv2d(nn.Module):
    """Conv with equalized learning rate: weights are stored ~N(0, 1) / lr_mul and multiplied by
    ``lr_mul / sqrt(fan_in)`` at runtime (He init applied dynamically), so Adam's per-parameter
    step is the same relative change for every layer whatever its fan-in."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, bias_init: float = 0.0, lr_mul: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size) / lr_mul)
        self.scale = lr_mul / math.sqrt(in_channels * kernel_size * kernel_size)
        self.lr_mul = lr_mul
        self.stride, self.padding = stride, padding
        self.bias = nn.Parameter(torch.full((out_channels,), float(bias_init))) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        b = self.bias * self.lr_mul if self.bias is not None else None
        return F.conv2d(x, self.weight * self.scale, b, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, kernel_size={k}, stride={self.stride}, padding={self.padding}, scale={self.scale:.4g}"


class FusedLeakyReLU(nn.Module):
    """Bias + leaky ReLU(0.2) * sqrt(2): the gain keeps activations' second moment ~constant
    through layers (StyleGAN's ``fused_lrelu``; the bias lives here, not in the conv)."""

    def __init__(self, channels: int, bias: bool = True, negative_slope: float = 0.2, gain: float = math.sqrt(2)):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.negative_slope, self.gain = negative_slope, gain

    def forward(self, x: Tensor) -> Tensor:
        if self.bias is not None:
            x = x + self.bias.view(1, -1, *([1] * (x.dim() - 2)))
        return F.leaky_relu(x, self.negative_slope) * self.gain


class EqualLinear(nn.Module):
    """Dense layer with equalized learning rate and learning-rate multiplier (see EqualConv2d);
    ``activation=True`` applies the fused bias + leaky ReLU."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0, activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        b = self.bias * self.lr_mul if self.bias is not None else None
        if self.activation:
            out = F.linear(x, self.weight * self.scale)
            return F.leaky_relu(out + b if b is not None else out, 0.2) * math.sqrt(2)
        return F.linear(x, self.weight * self.scale, b)


class ConvLayer(nn.Sequential):
    """[Blur] + EqualConv2d (+ FusedLeakyReLU). With ``downsample`` the blur pads so that the
    stride-2 valid conv halves the size exactly: ``p = (len(k) - 2) + (kernel_size - 1)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, downsample: bool = False,
                 blur_kernel: tuple[int, ...] = (1, 3, 3, 1), bias: bool = True, activate: bool = True,
                 lr_mul: float = 1.0):
        layers: list[nn.Module] = []
        if downsample:
            p = (len(blur_kernel) - 2) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channels, out_channels, kernel_size, stride, padding,
                                  bias=bias and not activate, lr_mul=lr_mul))
        if activate:
            layers.append(FusedLeakyReLU(out_channels, bias=bias))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """Two 3x3 convs (the second downsampling) plus a 1x1 downsampling skip; the sum is divided by
    sqrt(2) to keep the variance of the two unit-variance branches' sum at 1."""

    def __init__(self, in_channels: int, out_channels: int, blur_kernel: tuple[int, ...], lr_mul: float = 1.0):
        super().__init__()
        self.conv1 = ConvLayer(in_channels, in_channels, 3, blur_kernel=blur_kernel, lr_mul=lr_mul)
        self.conv2 = ConvLayer(in_channels, out_channels, 3, downsample=True, blur_kernel=blur_kernel, lr_mul=lr_mul)
        self.skip = ConvLayer(in_channels, out_channels, 1, downsample=True, blur_kernel=blur_kernel,
                              bias=False, activate=False, lr_mul=lr_mul)

    def forward(self, x: Tensor) -> Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


class MinibatchStdDev(nn.Module):
    """Appends ``num_features`` channels holding the standard deviation of features across groups
    of ``group_size`` samples (averaged over channels and space), so the discriminator can see a
    lack of variety in a batch of fakes. Sample n belongs to group ``n % (B // G)`` (as StyleGAN2's
    reshape). G is the largest divisor of B not above ``group_size`` (a short last batch works)."""

    def __init__(self, group_size: int = 4, num_features: int = 1):
        super().__init__()
        self.group_size, self.num_features = group_size, num_features

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        G = max(g for g in range(1, min(self.group_size, B) + 1) if B % g == 0)
        F_ = self.num_features
        y = x.float().view(G, -1, F_, C // F_, H, W)
        y = torch.sqrt(y.var(dim=0, unbiased=False) + 1e-8)      # [B/G, F, C/F, H, W]
        y = y.mean(dim=(2, 3, 4))                                 # [B/G, F]
        y = y[:, :, None, None].repeat(G, 1, H, W).to(x.dtype)   # [B, F, H, W]
        return torch.cat([x, y], dim=1)


class StyleGAN2Discriminator(nn.Module):
    """StyleGAN2's residual discriminator: ``fromRGB`` 1x1 conv, one ResBlock per halving down to
    4x4, minibatch stddev, 3x3 conv, dense + leaky ReLU, dense to one logit. ``forward -> [B, 1]``."""

    def __init__(self, config: StyleGAN2DiscConfig | None = None):
        super().__init__()
        self.config = cfg = config or StyleGAN2DiscConfig()
        log_res = int(math.log2(cfg.resolution))
        if 2 ** log_res != cfg.resolution or cfg.resolution < 8:
            raise ValueError(f"resolution must be a power of two >= 8, got {cfg.resolution}")
        ch = cfg.channels
        convs: list[nn.Module] = [ConvLayer(cfg.in_channels, ch(cfg.resolution), 1, lr_mul=cfg.lr_mul)]
        in_ch = ch(cfg.resolution)
        for i in range(log_res, 2, -1):
            out_ch = ch(2 ** (i - 1))
            convs.append(ResBlock(in_ch, out_ch, cfg.blur_kernel, lr_mul=cfg.lr_mul))
            in_ch = out_ch
        self.convs = nn.Sequential(*convs)
        if in_ch % cfg.mbstd_num_features:
            raise ValueError("channels at 4x4 must be divisible by mbstd_num_features")
        self.mbstd = MinibatchStdDev(cfg.mbstd_group_size, cfg.mbstd_num_features)
        self.final_conv = ConvLayer(in_ch + cfg.mbstd_num_features, ch(4), 3, lr_mul=cfg.lr_mul)
        self.final_linear = nn.Sequential(
            EqualLinear(ch(4) * 4 * 4, ch(4), lr_mul=cfg.lr_mul, activation=True),
            EqualLinear(ch(4), 1, lr_mul=cfg.lr_mul),
        )

    def forward(self, x: Tensor) -> Tensor:
        res = self.config.resolution
        if x.shape[-2:] != (res, res):
            raise ValueError(f"expected {res}x{res} inputs, got {tuple(x.shape[-2:])}")
        out = self.final_conv(self.mbstd(self.convs(x)))
        return self.final_linear(out.flatten(1))


# --------------------------------------------------------------------------------------------
# PatchGAN
# --------------------------------------------------------------------------------------------

class ActNorm(nn.Module):
    """Per-channel affine ``scale * (x + loc)`` whose parameters are set from the first training
    batch so the output has zero mean and unit variance per channel (Glow); unlike BatchNorm it
    does not couple the samples of a batch afterwards. Parameter names follow taming's."""

    def __init__(self, channels: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        flat = x.transpose(0, 1).flatten(1).float()
        self.loc.copy_(-flat.mean(1).view_as(self.loc))
        self.scale.copy_((1.0 / (flat.std(1) + 1e-6)).view_as(self.scale))
        self.initialized.fill_(1)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.initialized.item() == 0:
            self._initialize(x)
        return self.scale * (x + self.loc)


class PatchGANDiscriminator(nn.Module):
    """pix2pix's N-layer PatchGAN (taming's ``NLayerDiscriminator``): kernel-4 convs, stride 2 for
    the first ``n_layers`` and 1 for the last two, channels ``ndf * min(2^n, 8)``, norm + leaky
    ReLU 0.2 between; each output logit judges one receptive-field patch (70x70 for n_layers=3).
    ``forward -> [B, 1, H / 2^n_layers - 2, W / 2^n_layers - 2]``. Init: N(0, 0.02) convs, norm
    scales N(1, 0.02) (pix2pix/DCGAN)."""

    def __init__(self, config: PatchGANConfig | None = None):
        super().__init__()
        self.config = cfg = config or PatchGANConfig()
        if cfg.norm not in ("batch", "act", "none"):
            raise ValueError(f"norm must be batch|act|none, got {cfg.norm!r}")

        def norm(c: int) -> nn.Module:
            return {"batch": lambda: nn.BatchNorm2d(c), "act": lambda: ActNorm(c), "none": nn.Identity}[cfg.norm]()

        use_bias = cfg.norm != "batch"   # BatchNorm's shift makes a conv bias redundant
        ndf, kw, pad = cfg.ndf, 4, 1
        seq: list[nn.Module] = [nn.Conv2d(cfg.in_channels, ndf, kw, 2, pad), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, cfg.n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, kw, 2, pad, bias=use_bias), norm(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** cfg.n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, kw, 1, pad, bias=use_bias), norm(ndf * mult), nn.LeakyReLU(0.2, True)]
        seq += [nn.Conv2d(ndf * mult, 1, kw, 1, pad)]
        self.main = nn.Sequential(*seq)   # keys main.N.* as taming's checkpoints
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

@register_model("stylegan2-disc", kind="discriminator", paper=_STYLEGAN2)
def stylegan2_disc_256(**overrides) -> StyleGAN2Discriminator:
    """ViT-VQGAN's discriminator at 256 px (config-F channels, 128..512)."""
    return StyleGAN2Discriminator(replace(StyleGAN2DiscConfig(resolution=256), **overrides))


@register_model("stylegan2-disc-tiny", kind="discriminator", paper=_STYLEGAN2)
def stylegan2_disc_tiny(**overrides) -> StyleGAN2Discriminator:
    """CPU twin: 32 px, channels 16..64."""
    cfg = StyleGAN2DiscConfig(resolution=32, channel_multiplier=1, channel_base=512, max_channels=64)
    return StyleGAN2Discriminator(replace(cfg, **overrides))


@register_model("patchgan", kind="discriminator", paper=_PIX2PIX)
def patchgan(**overrides) -> PatchGANDiscriminator:
    """taming-transformers' default: 3 layers, ndf 64, BatchNorm."""
    return PatchGANDiscriminator(replace(PatchGANConfig(), **overrides))


@register_model("patchgan-tiny", kind="discriminator", paper=_PIX2PIX)
def patchgan_tiny(**overrides) -> PatchGANDiscriminator:
    """CPU twin: 2 layers, ndf 16."""
    return PatchGANDiscriminator(replace(PatchGANConfig(ndf=16, n_layers=2), **overrides))
