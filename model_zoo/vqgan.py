"""VQGAN: the convolutional tokenizer of Esser, Rombach & Ommer, "Taming Transformers for
High-Resolution Image Synthesis" (CVPR 2021; github.com/CompVis/taming-transformers), and the
Regularized VQ tokenizer of Zhang et al., "Regularized Vector Quantization for Tokenized Image
Synthesis" (CVPR 2023), which keeps the VQGAN f16 backbone and changes only the quantizer.

Architecture (taming ``modules/diffusionmodules/model.py``; module names kept so that taming
state dicts map over by renaming only the quantizer): ``Encoder`` = conv_in 3x3, one level per
``ch_mult`` entry with ``num_res_blocks`` ResnetBlocks (GroupNorm(32) + swish + conv3x3, dropout,
1x1 "nin" shortcut when the width changes), an AttnBlock after each ResnetBlock at the
resolutions in ``attn_resolutions``, a strided Downsample between levels, a middle block
(resnet-attn-resnet), GroupNorm + swish + conv_out to ``z_channels``. ``Decoder`` mirrors it with
``num_res_blocks + 1`` blocks per level and nearest Upsample + conv. ``quant_conv`` /
``post_quant_conv`` are 1x1 convs between ``z_channels`` and the code dimension
(taming's ``embed_dim``, here ``quantizer.dim``). Downsampling factor f = 2 ** (len(ch_mult) - 1).

Presets (taming defaults; 256 px input):

=================  ===============  =====  ============  ============  ==========  ==============
preset             ch_mult          attn   z_channels    codes         grid        parameters
=================  ===============  =====  ============  ============  ==========  ==============
vqgan-f16          (1,1,2,2,4)      (16,)  256           16384 x 256   16 x 16     76,073,859
vqgan-f8           (1,1,2,4)        (32,)  256           8192 x 256    32 x 32     66,890,627
regvq-f16          (1,1,2,2,4)      (16,)  256           1024 x 256    16 x 16     72,141,699
=================  ===============  =====  ============  ============  ==========  ==============

Parameters measured on the meta device with the project's ``VectorQuantizer`` (generator only:
no discriminator or LPIPS). vqgan-f16 = encoder 29,298,176 + decoder 42,449,795 + codebook
4,194,304 + quant_conv/post_quant_conv 131,584; the f8 backbone is encoder 26,345,728 + decoder
38,316,163. All: ch=128, num_res_blocks=2, dropout 0.

* ``vqgan-f16`` is taming's ImageNet f16-16384 model (``vqgan_imagenet_f16_16384``).
* ``vqgan-f8`` uses the backbone of taming's OpenImages f8 release with ch_mult (1,1,2,4),
  attention at 32 and 8192 x 256 codes (released as Gumbel-VQ; here plain VQ by default, pass
  ``quantizer={"kind": "gumbel"}`` for the released variant).
* ``regvq-f16``: Regularized VQ on the VQGAN f16 backbone (model_zoo/regularized_vq.py), quantizer
  with ``prior_kl=True`` (KL of the distribution of the codes used in the batch to a uniform
  prior), ``stochastic_mask_ratio=0.4`` (40% of positions sampled from ``p(k | z)``, the rest
  argmax) and ``prior_temperature=0.1`` (the sharpness of ``p(k | z)``). Codebook 1024 x 256 (the
  sources of each number: comment at ``REGVQ_F16``). ``quantizer={"codebook_size": 16384}`` gives
  the taming ImageNet size.

Each preset has a ``-tiny`` CPU twin with the same downsampling factor (ch 32, one ResnetBlock
per level, codebook 64 x 32, a 4 x 4 grid): vqgan-f8-tiny 32 px, 1,113,283 parameters;
vqgan-f16-tiny and regvq-f16-tiny 64 px, 1,409,475 parameters.

CPU presets of the codebooks that reach full use (model_zoo/quantizers.py and
model_zoo/scalar_quantizers.py), on the vqgan-f8-tiny backbone, 64 codes each:
``vqgan-f8-fsq-tiny`` (FSQ, levels (4, 4, 4)), ``vqgan-f8-lfq-tiny`` (LFQ, 6 bits, MAGVIT-2 entropy
loss) and ``vqgan-f8-simvq-tiny`` (SimVQ). Any preset takes them through its quantizer, e.g.
``quantizer={"kind": "fsq", "fsq_levels": (8, 5, 5, 5), "codebook_size": 1000, "dim": 4}``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .interfaces import Tokenizer, TokenizerOutput, Tokens
from .quantizers import QuantizerConfig, build_quantizer
from .registry import register_model

TAMING = "Esser et al., Taming Transformers for High-Resolution Image Synthesis, CVPR 2021"
REGVQ = "Zhang et al., Regularized Vector Quantization for Tokenized Image Synthesis, CVPR 2023"


@dataclass(frozen=True)
class VQGANConfig:
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    dropout: float = 0.0
    # taming's VectorQuantizer2: unfactorized, un-normalized 256-d codes, beta 0.25.
    quantizer: QuantizerConfig = field(default_factory=lambda: QuantizerConfig(
        codebook_size=16384, dim=256, factorized=False, l2_normalize=False, beta=0.25))

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def replace_config(cfg, **overrides):
    """``dataclasses.replace`` that also accepts a dict for a nested dataclass field
    (``quantizer={"codebook_size": 1024}``), so registry overrides can reach the quantizer."""
    for k, v in list(overrides.items()):
        cur = getattr(cfg, k, None)
        if isinstance(v, dict) and dataclasses.is_dataclass(cur):
            overrides[k] = dataclasses.replace(cur, **v)
        elif isinstance(v, list):
            overrides[k] = tuple(v)   # configs come back from JSON with lists; keep them hashable
    return dataclasses.replace(cfg, **overrides)


# ---------------------------------------------------------------------------------------------
# Building blocks (taming-transformers / DDPM layout)


def Normalize(channels: int) -> nn.GroupNorm:
    # 32 groups and eps 1e-6 as in taming; widths must be multiples of 32.
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            # taming's default (conv_shortcut=False): a 1x1 "network in network" projection.
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, pre-GroupNorm, residual.

    ``attn_bias`` (``[B, h*w]``, added to every query's logits) lets MQ-VAE's de-mask module
    down-weight keys; ``None`` is plain attention (the fused SDPA kernel)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as ``[B, 1, h*w, C]`` (one head)."""
        h = self.norm(x)
        return tuple(t(h).flatten(2).transpose(1, 2).unsqueeze(1) for t in (self.q, self.k, self.v))

    def weights(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The attention matrix ``[B, h*w (query), h*w (key)]`` that ``forward`` applies."""
        q, k, _ = self.qkv(x)
        logits = (q @ k.transpose(-1, -2)).squeeze(1) * self.channels ** -0.5
        if attn_bias is not None:
            logits = logits + attn_bias[:, None, :]
        return logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(x)
        mask = None if attn_bias is None else attn_bias[:, None, None, :].to(q.dtype)
        # Default scale 1/sqrt(C) is taming's int(c) ** -0.5.
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric (right/bottom) zero pad, as taming: halves even sizes exactly with a 3x3/2
        # conv and keeps its checkpoints' alignment.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Nearest + conv rather than a transposed conv: no checkerboard artifacts.
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """Images ``[B, in_channels, R, R]`` -> features ``[B, z_channels, R/f, R/f]``."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], resolution: int, z_channels: int,
                 in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_ch_mult = (1,) + tuple(ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features ``[B, z_channels, r, r]`` -> images ``[B, out_ch, r*f, r*f]`` (no output
    activation: the losses see raw values, as in taming).

    ``with_stem=False`` drops conv_in and the middle block, and the input must then have
    ``ch * ch_mult[-1]`` channels: MQ-VAE's de-mask module takes their place."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], resolution: int, z_channels: int,
                 out_ch: int = 3, dropout: float = 0.0, with_stem: bool = True):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.with_stem = with_stem
        block_in = ch * ch_mult[-1]
        self.in_channels = z_channels if with_stem else block_in
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        if with_stem:
            self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
            self.mid = nn.Module()
            self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
            self.mid.attn_1 = AttnBlock(block_in)
            self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            self.up.insert(0, up)   # prepend: up[i] is level i, as in the encoder (and taming)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z
        if self.with_stem:
            h = self.conv_in(h)
            h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------
# The tokenizer


def backbone_kwargs(cfg) -> dict:
    """Encoder/Decoder arguments from a VQGAN-style config (VQGANConfig, MQVAEConfig)."""
    if cfg.resolution % cfg.downsample:
        raise ValueError(f"resolution {cfg.resolution} not divisible by f={cfg.downsample}")
    return dict(ch=cfg.ch, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                attn_resolutions=tuple(cfg.attn_resolutions), resolution=cfg.resolution,
                z_channels=cfg.z_channels, dropout=cfg.dropout)


class VQGAN(Tokenizer):
    """Encoder -> quant_conv -> VectorQuantizer -> post_quant_conv -> Decoder.

    ``encode`` gives ``Tokens(codes [B, h*w] raster order, positions=None)``."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.config = cfg
        backbone = backbone_kwargs(cfg)
        self.encoder = Encoder(in_channels=cfg.in_channels, **backbone)
        self.decoder = Decoder(out_ch=cfg.out_ch, **backbone)
        dim = cfg.quantizer.dim
        self.quant_conv = nn.Conv2d(cfg.z_channels, dim, 1)
        self.quantizer = build_quantizer(dim, cfg.quantizer)
        self.post_quant_conv = nn.Conv2d(dim, cfg.z_channels, 1)
        r = cfg.resolution // cfg.downsample
        self.image_size = cfg.resolution
        self.grid_size = (r, r)
        self.num_tokens = r * r
        self.codebook_size = self.quantizer.codebook_size

    def set_step(self, step: int) -> None:
        """Forwarded to the quantizer (Gumbel temperature annealing)."""
        self.quantizer.set_step(step)

    def _quantize(self, images: torch.Tensor):
        z = self.quant_conv(self.encoder(images))                  # [B, D, h, w]
        return self.quantizer(z.permute(0, 2, 3, 1))               # channels last: [B, h, w, D]

    def _decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:  # [B, h, w, D]
        return self.decoder(self.post_quant_conv(z_q.permute(0, 3, 1, 2)))

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        q = self._quantize(images)
        recon = self._decode_latent(q.z_q)
        return TokenizerOutput(recon=recon, quant=q, tokens=Tokens(q.codes.flatten(1)))

    def encode(self, images: torch.Tensor) -> Tokens:
        """Codes ``[B, h*w]`` in raster order. Call in eval mode: in train mode the quantizer
        updates its statistics and Regularized VQ samples 40% of the codes."""
        return Tokens(self._quantize(images).codes.flatten(1))

    def decode(self, codes: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is not None:
            raise ValueError("VQGAN codes cover the full grid; positions must be None")
        h, w = self.grid_size
        z_q = self.quantizer.lookup(codes.reshape(codes.shape[0], h, w))
        # lookup returns the fp32 codebook; match the decoder (bf16 / fp64 casts of the model).
        return self._decode_latent(z_q.to(self.post_quant_conv.weight.dtype))

    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight


# ---------------------------------------------------------------------------------------------
# Presets

VQGAN_F16 = VQGANConfig()
VQGAN_F8 = VQGANConfig(ch_mult=(1, 1, 2, 4), attn_resolutions=(32,), quantizer=QuantizerConfig(
    codebook_size=8192, dim=256, factorized=False, l2_normalize=False, beta=0.25))
# Regularized VQ keeps the VQGAN f16 backbone and its quantizer's geometry (taming's unfactorized,
# un-normalized 256-d codes, beta 0.25: the paper's baseline) and changes the quantization:
# - prior_kl: the prior distribution regularization, sec. 3.1, eq. (1);
# - stochastic_mask_ratio 0.4: sec. 3.2, the ratio whose reconstruction and generation the
#   paper's mask-ratio study (its Fig. 3, ADE20K) found best;
# - prior_temperature 0.1: ours, not the paper's (its encoder predicts the distribution; here it is
#   the distances', at T = 0.1 in units of the codebook spread: model_zoo/regularized_vq.py);
# - codebook_size 1024: the smallest size of the paper's codebook-size study (its Fig. 8, 1024 to
#   8192 on ADE20K); the paper's text available offline states no other.
REGVQ_F16 = VQGANConfig(quantizer=QuantizerConfig(
    codebook_size=1024, dim=256, factorized=False, l2_normalize=False, beta=0.25,
    prior_kl=True, stochastic_mask_ratio=0.4, prior_temperature=0.1))


def _tiny(cfg: VQGANConfig) -> VQGANConfig:
    """CPU twin: same downsampling factor and quantizer options, narrow and a 4 x 4 grid."""
    f = cfg.downsample
    return replace_config(cfg, resolution=4 * f, ch=32, ch_mult=(1, 1) + (2,) * (len(cfg.ch_mult) - 2),
                          num_res_blocks=1, attn_resolutions=(4,), z_channels=32,
                          quantizer={"codebook_size": 64, "dim": 32})


@register_model("vqgan-f16", kind="tokenizer", paper=TAMING)
def vqgan_f16(**overrides) -> VQGAN:
    """taming ImageNet f16-16384: 256 px -> 16 x 16 codes of 16384 x 256; 76,073,859 parameters."""
    return VQGAN(replace_config(VQGAN_F16, **overrides))


@register_model("vqgan-f16-tiny", kind="tokenizer", paper=TAMING)
def vqgan_f16_tiny(**overrides) -> VQGAN:
    return VQGAN(replace_config(_tiny(VQGAN_F16), **overrides))


@register_model("vqgan-f8", kind="tokenizer", paper=TAMING)
def vqgan_f8(**overrides) -> VQGAN:
    """taming OpenImages f8 backbone: 256 px -> 32 x 32 codes of 8192 x 256; 66,890,627 parameters."""
    return VQGAN(replace_config(VQGAN_F8, **overrides))


@register_model("vqgan-f8-tiny", kind="tokenizer", paper=TAMING)
def vqgan_f8_tiny(**overrides) -> VQGAN:
    return VQGAN(replace_config(_tiny(VQGAN_F8), **overrides))


@register_model("regvq-f16", kind="tokenizer", paper=REGVQ)
def regvq_f16(**overrides) -> VQGAN:
    """Regularized VQ on VQGAN f16: prior KL + 40% stochastic mask, 1024 x 256 codes; 72,141,699
    parameters."""
    return VQGAN(replace_config(REGVQ_F16, **overrides))


@register_model("regvq-f16-tiny", kind="tokenizer", paper=REGVQ)
def regvq_f16_tiny(**overrides) -> VQGAN:
    return VQGAN(replace_config(_tiny(REGVQ_F16), **overrides))


# ---------------------------------------------------------------------------------------------
# Codebooks that reach full use, on the vqgan-f8 backbone: CPU presets with 64 codes (no full-size
# preset or recipe yet). The encoder emits the quantizer's own channels (quant_conv to 3 for FSQ,
# 6 for LFQ), as the FSQ and MAGVIT-2 tokenizers do.

FSQ = "Mentzer et al., Finite Scalar Quantization: VQ-VAE Made Simple, ICLR 2024 (arXiv:2309.15505)"
LFQ = ("Yu et al., Language Model Beats Diffusion - Tokenizer is Key to Visual Generation, ICLR 2024 "
       "(arXiv:2310.05737)")
SIMVQ = ("Zhu et al., Addressing Representation Collapse in Vector Quantized Models with One Linear Layer "
         "(arXiv:2411.02038)")
FSQ_F8_TINY = replace_config(_tiny(VQGAN_F8), quantizer={"kind": "fsq", "fsq_levels": (4, 4, 4), "dim": 3})
LFQ_F8_TINY = replace_config(_tiny(VQGAN_F8), quantizer={"kind": "lfq", "dim": 6})
SIMVQ_F8_TINY = replace_config(_tiny(VQGAN_F8), quantizer={"simvq": True})


@register_model("vqgan-f8-fsq-tiny", kind="tokenizer", paper=FSQ)
def vqgan_f8_fsq_tiny(**overrides) -> VQGAN:
    """vqgan-f8-tiny with FSQ, levels (4, 4, 4): 64 codes."""
    return VQGAN(replace_config(FSQ_F8_TINY, **overrides))


@register_model("vqgan-f8-lfq-tiny", kind="tokenizer", paper=LFQ)
def vqgan_f8_lfq_tiny(**overrides) -> VQGAN:
    """vqgan-f8-tiny with LFQ, 6 bits (64 codes) and the MAGVIT-2 entropy loss."""
    return VQGAN(replace_config(LFQ_F8_TINY, **overrides))


@register_model("vqgan-f8-simvq-tiny", kind="tokenizer", paper=SIMVQ)
def vqgan_f8_simvq_tiny(**overrides) -> VQGAN:
    """vqgan-f8-tiny with SimVQ: 64 frozen random codes of dim 32 times one learnable 32 x 32 map."""
    return VQGAN(replace_config(SIMVQ_F8_TINY, **overrides))
