"""ViT-VQGAN: a Vision-Transformer image tokenizer.

Yu et al., "Vector-quantized Image Modeling with Improved VQGAN", ICLR 2022, arXiv:2110.04627.

Encoder: 8x8 patches -> linear patch embedding (a stride-8 conv, the same map as a linear layer on
flattened patches) -> learned position embeddings -> pre-norm transformer blocks (LayerNorm, MHSA
through ``F.scaled_dot_product_attention``, GELU MLP) -> final LayerNorm -> "a feed-forward layer
with tanh activation after the transformer blocks" (Linear, tanh, Linear) -> the factorized,
l2-normalized quantizer (``VectorQuantizer(in_dim=encoder width)``: 32-d lookup, 8192 codes).
Decoder: the mirror (linear in-projection, position embeddings, blocks, LayerNorm, the tanh
feed-forward) then a linear layer to the patch pixels and un-patchify, "no activation at the
outputs". At 256 px with 8 px patches the grid is 32x32 = 1024 tokens.

Position embeddings: learned (ViT's default, trunc-normal 0.02), because the paper builds on ViT
and says nothing else, and every preset keeps one fixed grid, so fixed sin-cos tables would buy no
resolution flexibility that is used. ``pos_embed="sincos"`` (2-D, MAE-style, computed on the fly,
no parameters) is there for runs that change resolution.

Logit-Laplace (``logit_laplace=True``, the paper's recon loss mix): the decoder emits 6 channels,
``mu`` (logit space) then ``log_b`` per RGB channel; the raw 6 channels go to
``extra["logit_laplace_params"]`` for the NLL (``losses.logit_laplace_nll``, which squeezes
targets to ``[eps, 1 - eps]``, DALL-E). ``recon`` is the image the L2/perceptual/GAN terms see:
the distribution's median ``sigmoid(mu)`` with the same squeeze undone, ``(sigmoid(mu) - eps) /
(1 - 2 eps)``, mapped to [-1, 1], so the NLL and the L2 term pull toward the same pixel. It is
not clamped (DALL-E clamps only for display; a clamp would cut the L2/GAN gradient of saturated
pixels), so it spans [-1.25, 1.25] at eps 0.1: clamp for display, as for the raw 3-channel output
of ``logit_laplace=False``.

Parameter counts, measured with ``count_params`` on the meta device (paper, Table 1: ~32M, 91M,
599M per encoder or decoder for Small, Base, Large). Encoder and decoder counts include the patch
embedding / decoder in-projection, the 1024 x width position table, the tanh feed-forward
(hidden = MLP width) and the logit-Laplace pixel head (6 channels). The quantizer (8192 x 32
codebook plus its in/out projections, model_zoo/quantizers.py) is counted apart.

=============  =========== =========== =========== ============  ==========================
preset         encoder     decoder     quantizer   total         paper (encoder / decoder)
=============  =========== =========== =========== ============  ==========================
vit-vqgan-ss    27,942,912  28,303,744     295,456   56,542,112  ~32M / ~32M
vit-vqgan-bb    90,713,088  91,450,752     312,096  182,475,936  ~91M / ~91M
vit-vqgan-sl    27,942,912 645,253,504     295,456  673,491,872  ~32M / ~599M
=============  =========== =========== =========== ============  ==========================

Measured vs paper: Base matches (90.7M / 91.5M vs ~91M). Small is ~4M under 32M and Large ~46M
over 599M. The blocks alone are 25.2M (8 x 3.15M) for Small and 629.4M (32 x 19.67M) for Large,
so no choice of extras (tanh FFN 2.1M / 13.1M, position table 0.5M / 1.3M) reconciles both;
the paper does not say what it counted, and the architecture is not bent to hit its numbers.
Without logit-Laplace the pixel head is half as wide (Small decoder: 28,205,248).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .interfaces import Tokenizer, TokenizerOutput, Tokens
from .quantizers import QuantizerConfig, build_quantizer
from .registry import register_model

PAPER = "Yu et al. 2021, Vector-quantized Image Modeling with Improved VQGAN, arXiv:2110.04627"


@dataclass(frozen=True)
class ViTVQGANConfig:
    image_size: int = 256
    patch_size: int = 8
    in_channels: int = 3
    enc_width: int = 512
    enc_depth: int = 8
    enc_heads: int = 8
    enc_mlp_dim: int = 2048
    dec_width: int = 512
    dec_depth: int = 8
    dec_heads: int = 8
    dec_mlp_dim: int = 2048
    dropout: float = 0.0            # residual-branch and embedding dropout
    attn_dropout: float = 0.0       # on attention probabilities (SDPA's dropout_p)
    qkv_bias: bool = True
    norm_eps: float = 1e-6          # ViT's (JAX) LayerNorm epsilon
    pos_embed: Literal["learned", "sincos"] = "learned"
    logit_laplace: bool = True      # decoder emits (mu, log_b) per channel: 2 * in_channels
    logit_laplace_eps: float = 0.1  # target squeeze of the NLL (losses.logit_laplace_nll default)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for side in ("enc", "dec"):
            w, h = getattr(self, f"{side}_width"), getattr(self, f"{side}_heads")
            if w % h:
                raise ValueError(f"{side}_width {w} is not divisible by {side}_heads {h}")
            if self.pos_embed == "sincos" and w % 4:
                raise ValueError(f"2-D sincos position embeddings need {side}_width % 4 == 0, got {w}")
        if not 0.0 <= self.logit_laplace_eps < 0.5:
            raise ValueError(f"logit_laplace_eps must be in [0, 0.5), got {self.logit_laplace_eps}")
        if self.pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {self.pos_embed!r}")

    @property
    def grid_size(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return (g, g)

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.logit_laplace else self.in_channels


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on the meta device; shared tensors are counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def sincos_2d(grid: tuple[int, int], dim: int, device=None, dtype=None) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table ``[h*w, dim]`` (dim/2 channels per axis), raster order."""
    h, w = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    out = [f(pos.reshape(-1, 1) * omega) for pos in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1).to(dtype or torch.float32)


class PosEmbed(nn.Module):
    def __init__(self, grid: tuple[int, int], dim: int, kind: str):
        super().__init__()
        self.grid, self.dim, self.kind = grid, dim, kind
        # Learned: a parameter (saved in the state dict). Sincos: recomputed per call, so a model
        # built on the meta device and materialized later never holds a stale buffer.
        self.weight = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim)) if kind == "learned" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return x + self.weight
        return x + sincos_2d(self.grid, self.dim, device=x.device, dtype=x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool, attn_dropout: float, dropout: float):
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        # SDPA picks the fused flash / memory-efficient kernel when one applies (bidirectional,
        # no mask): the 1024-token grid makes the attention matrix the memory hot spot.
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.drop(self.proj(x.transpose(1, 2).reshape(b, n, d)))


class MLP(nn.Module):
    """Two linear layers around an activation: GELU inside blocks, tanh for the paper's extra FFN."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module], dropout: float = 0.0):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act(), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block (ViT); a self-contained unit that pretrain may checkpoint."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, cfg: ViTVQGANConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, heads, cfg.qkv_bias, cfg.attn_dropout, cfg.dropout)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = MLP(dim, mlp_dim, nn.GELU, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Trunk(nn.Module):
    """Position embeddings, blocks, final LayerNorm and the tanh feed-forward: shared by both ends."""

    def __init__(self, cfg: ViTVQGANConfig, width: int, depth: int, heads: int, mlp_dim: int):
        super().__init__()
        self.pos_embed = PosEmbed(cfg.grid_size, width, cfg.pos_embed)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_dim, cfg) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=cfg.norm_eps)
        # "We also add a feed-forward layer with tanh activation after the transformer blocks":
        # two layers (hidden = the block MLP width), no residual, no dropout. The bounded tanh
        # keeps the features fed to the quantizer (and to the pixel head) in a stable range.
        self.ffn = MLP(width, mlp_dim, nn.Tanh)

    def forward(self, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        x = self.drop(self.pos_embed(x))
        if layer is not None:
            stop = range(len(self.blocks))[layer]          # IndexError when out of range
            for blk in self.blocks[: stop + 1]:
                x = blk(x)
            return x
        for blk in self.blocks:
            x = blk(x)
        return self.ffn(self.norm(x))


class ViTEncoder(_Trunk):
    def __init__(self, cfg: ViTVQGANConfig):
        super().__init__(cfg, cfg.enc_width, cfg.enc_depth, cfg.enc_heads, cfg.enc_mlp_dim)
        # A stride-p conv is exactly a linear map of each flattened p x p patch.
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.enc_width, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, images: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)      # [B, N, D], raster order
        return super().forward(x, layer)


class ViTDecoder(_Trunk):
    def __init__(self, cfg: ViTVQGANConfig):
        super().__init__(cfg, cfg.dec_width, cfg.dec_depth, cfg.dec_heads, cfg.dec_mlp_dim)
        self.grid, self.patch, self.out_channels = cfg.grid_size, cfg.patch_size, cfg.out_channels
        # The quantizer returns vectors in the encoder width; the in-projection also bridges
        # encoder and decoder of different widths (Small encoder + Large decoder).
        self.in_proj = nn.Linear(cfg.enc_width, cfg.dec_width)
        self.to_pixels = nn.Linear(cfg.dec_width, cfg.patch_size ** 2 * cfg.out_channels)

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        x = self.to_pixels(super().forward(self.in_proj(z_q)))       # no output activation
        (h, w), p, c = self.grid, self.patch, self.out_channels
        x = x.view(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)


def _init_vit(m: nn.Module) -> None:
    # ViT/MAE initialization; applied to encoder and decoder only, so the quantizer keeps its own.
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, PosEmbed) and m.weight is not None:
        nn.init.trunc_normal_(m.weight, std=0.02)


class ViTVQGAN(Tokenizer):
    """ViT-VQGAN tokenizer: ``encode`` -> ``Tokens``, ``decode`` -> images, ``forward`` for training."""

    def __init__(self, cfg: ViTVQGANConfig):
        super().__init__()
        self.config = cfg
        self.encoder = ViTEncoder(cfg)
        self.quantizer = build_quantizer(cfg.enc_width, cfg.quantizer)
        self.decoder = ViTDecoder(cfg)
        self.image_size = cfg.image_size
        self.grid_size = cfg.grid_size
        self.num_tokens = cfg.num_tokens
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialize every weight; also for a model built on meta and materialized with
        ``to_empty`` (whose storage is uninitialized)."""
        self.encoder.apply(_init_vit)
        self.decoder.apply(_init_vit)
        self.quantizer.reset_parameters()

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def set_step(self, step: int) -> None:
        """Forwarded to the quantizer (Gumbel temperature annealing, dead-code restarts)."""
        self.quantizer.set_step(step)

    def _to_image(self, out: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.config.logit_laplace:
            return out, {}
        # Median sigmoid(mu) of the squeezed pixel, squeeze undone (unclamped), then [0, 1] -> [-1, 1].
        eps = self.config.logit_laplace_eps
        x01 = (torch.sigmoid(out[:, : self.config.in_channels]) - eps) / (1.0 - 2.0 * eps)
        return 2.0 * x01 - 1.0, {"logit_laplace_params": out}

    def _check_images(self, images: torch.Tensor) -> None:
        want = (self.config.in_channels, self.config.image_size, self.config.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"expected images [B, {want[0]}, {want[1]}, {want[2]}], got {tuple(images.shape)}")

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        self._check_images(images)
        quant = self.quantizer(self.encoder(images))   # z_q: straight-through to the encoder
        recon, extra = self._to_image(self.decoder(quant.z_q))
        return TokenizerOutput(recon=recon, quant=quant, tokens=Tokens(codes=quant.codes), extra=extra)

    def encode(self, images: torch.Tensor) -> Tokens:
        """Codes ``[B, N]`` in raster order. Call in eval mode: in train mode the quantizer's
        forward may also update its EMA statistics or sample codes (stochastic masking)."""
        self._check_images(images)
        return Tokens(codes=self.quantizer(self.encoder(images)).codes)

    def decode(self, codes: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Codes ``[B, N]`` (or ``[B, h, w]``) -> images ``[B, 3, H, W]`` (the recon of ``forward``)."""
        if positions is not None:
            raise ValueError("ViT-VQGAN keeps every position; positions must be None")
        codes = codes.reshape(codes.shape[0], -1)
        if codes.shape[1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} codes per image, got {codes.shape[1]}")
        return self._to_image(self.decoder(self.quantizer.lookup(codes)))[0]

    def encoder_features(self, images: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Token features ``[B, N, D_enc]`` for linear probes: ``layer=None`` is the encoder's
        output (after LayerNorm and the tanh FFN, before quantization); an int ``k`` is the
        residual stream after block ``k`` (0-based, negative counts from the end)."""
        self._check_images(images)
        return self.encoder(images, layer=layer)

    def last_layer(self) -> torch.Tensor:
        return self.decoder.to_pixels.weight

    def param_counts(self) -> dict[str, int]:
        counts = {k: count_params(getattr(self, k)) for k in ("encoder", "decoder", "quantizer")}
        counts["total"] = count_params(self)
        return counts


# --------------------------------------------------------------------------------------------
# Presets. Table 1 of the paper: Small / Base / Large transformer sizes; "-tiny" CPU twins keep the
# same structure (patch grid, tanh FFN, factorized quantizer) at 32 px.

_SIZES = {
    "small": dict(width=512, depth=8, heads=8, mlp_dim=2048),
    "base": dict(width=768, depth=12, heads=12, mlp_dim=3072),
    "large": dict(width=1280, depth=32, heads=16, mlp_dim=5120),
}
_TINY_SIZES = {
    "small": dict(width=64, depth=2, heads=2, mlp_dim=256),
    "base": dict(width=96, depth=2, heads=3, mlp_dim=384),
    "large": dict(width=128, depth=3, heads=4, mlp_dim=512),
}


def _apply_overrides(cfg: ViTVQGANConfig, overrides: dict[str, Any]) -> ViTVQGANConfig:
    """``dataclasses.replace``; ``quantizer`` may be a QuantizerConfig or a dict of its fields."""
    q = overrides.get("quantizer")
    if isinstance(q, dict):
        overrides = {**overrides, "quantizer": dataclasses.replace(cfg.quantizer, **q)}
    return dataclasses.replace(cfg, **overrides)


def _build(enc: str, dec: str, tiny: bool, overrides: dict[str, Any]) -> ViTVQGAN:
    sizes = _TINY_SIZES if tiny else _SIZES
    e, d = sizes[enc], sizes[dec]
    cfg = ViTVQGANConfig(
        image_size=32 if tiny else 256,
        patch_size=4 if tiny else 8,
        enc_width=e["width"], enc_depth=e["depth"], enc_heads=e["heads"], enc_mlp_dim=e["mlp_dim"],
        dec_width=d["width"], dec_depth=d["depth"], dec_heads=d["heads"], dec_mlp_dim=d["mlp_dim"],
        quantizer=QuantizerConfig(codebook_size=64, dim=8) if tiny else QuantizerConfig(codebook_size=8192, dim=32),
    )
    return ViTVQGAN(_apply_overrides(cfg, overrides))


@register_model("vit-vqgan-ss", kind="tokenizer", paper=PAPER)
def vit_vqgan_ss(**overrides) -> ViTVQGAN:
    """Small encoder + Small decoder, 256 px, 32x32 tokens, 8192 codes."""
    return _build("small", "small", False, overrides)


@register_model("vit-vqgan-bb", kind="tokenizer", paper=PAPER)
def vit_vqgan_bb(**overrides) -> ViTVQGAN:
    """Base encoder + Base decoder."""
    return _build("base", "base", False, overrides)


@register_model("vit-vqgan-sl", kind="tokenizer", paper=PAPER)
def vit_vqgan_sl(**overrides) -> ViTVQGAN:
    """Small encoder + Large decoder (the paper's VIM tokenizer: cheap encoding, strong decoding)."""
    return _build("small", "large", False, overrides)


@register_model("vit-vqgan-ss-tiny", kind="tokenizer", paper=PAPER)
def vit_vqgan_ss_tiny(**overrides) -> ViTVQGAN:
    """CPU twin of vit-vqgan-ss: 32 px, patch 4 (8x8 tokens), width 64, 64 codes of dim 8."""
    return _build("small", "small", True, overrides)


@register_model("vit-vqgan-bb-tiny", kind="tokenizer", paper=PAPER)
def vit_vqgan_bb_tiny(**overrides) -> ViTVQGAN:
    """CPU twin of vit-vqgan-bb: width 96, 3 heads."""
    return _build("base", "base", True, overrides)


@register_model("vit-vqgan-sl-tiny", kind="tokenizer", paper=PAPER)
def vit_vqgan_sl_tiny(**overrides) -> ViTVQGAN:
    """CPU twin of vit-vqgan-sl: width-64 encoder, width-128 3-block decoder."""
    return _build("small", "large", True, overrides)
