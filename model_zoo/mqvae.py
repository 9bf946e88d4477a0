"""MQ-VAE: Huang, Mao, Wang & Zhang, "Not All Image Regions Matter: Masked Vector Quantization
for Autoregressive Image Generation" (CVPR 2023; github.com/CrossmodalGroup/MaskedVectorQuantization).

Only the important regions of the feature grid are quantized, so the prior (Stackformer) models
``k`` codes and their positions instead of the whole grid:

1. VQGAN encoder (``model_zoo.vqgan.Encoder``) -> ``[B, z_channels, h, w]``.
2. Adaptive mask module (``AdaptiveMask``): a score network LayerNorm -> Conv3x3 -> ReLU ->
   Conv1x1 -> BatchNorm -> Sigmoid gives one importance score per position; the top
   ``k = round(keep_ratio * h * w)`` positions are kept (exactly k per image). Kept features
   (LayerNorm'd) are MULTIPLIED by their scores -- top-k selection itself has no gradient, so
   this product is the scorer's only learning signal -- and projected to the code dimension.
   ``positions`` are the sorted flat raster indices of the kept positions (the project contract).
3. Quantization of the kept features only: an EMA codebook of 1024 x 256.
4. Adaptive de-mask module (``AdaptiveDemask``): a learned mask token fills every masked
   position, kept positions get their quantized features; 1x1 projection, conv3x3, then
   ``demask_layers`` blocks of (ResnetBlock + self-attention) in which the attention weight of
   every key is multiplied by its mask value -- 1 for kept, 0.02 for masked positions -- and
   renormalized: ``w_ij = m_j exp(s_ij) / sum_l m_l exp(s_il)``, implemented exactly as the logit
   bias ``log m_j``. After each block the mask is raised to its square root (0.02 -> 0.141 ->
   0.376 -> ...), so later layers let inferred (masked) features contribute more and more.
   A last ResnetBlock, then the VQGAN decoder without its stem (the de-mask module replaces the
   decoder's conv_in and middle block, as in the official code).

Semantics chosen here, and where they differ from the official release:

* Re-weighting is renormalized (the project's pinned semantics, tested exactly; the official
  ``BiasedSelfAttnBlock`` multiplies the softmax by the mask without renormalizing unless
  ``reweight=True``).
* The score network's LayerNorm is over channels at each position (resolution independent); the
  official code normalizes over the whole ``[C, h, w]`` map. Both are without affine parameters.
* ``keep_ratio`` defaults to 0.25 (the project default: 256 of 1024 positions at f8, the token
  count of an f16 grid); the released ImageNet config ``mqvae_imagenet_f8_r30`` keeps 30%.
* The de-mask module's mask token is one learned vector shared by all masked positions, with no
  positional embedding (position comes from the convolutions), as in the official code.

Preset ``mq-vae-f8`` (the official stage-1 config; the release ships only an f8 stage-1 config,
so there is no f16 preset): 256 px, ch 128, ch_mult (1,1,2,2), 2 ResnetBlocks per level, attention at 32, z 256,
grid 32 x 32, 256 kept codes from an EMA codebook 1024 x 256, 8 de-mask layers:
**35,494,534 parameters** measured on the meta device (encoder 10,278,144, adaptive mask 655,875,
de-mask module 13,396,224, decoder without stem 11,164,291); the EMA codebook is a buffer, not a
parameter (1024 x 256 = 262,144 values, plus its EMA statistics). ``mq-vae-f8-tiny``: 64 px,
ch 32, grid 8 x 8, 16 kept codes of 64 x 32, 3 de-mask layers, 1,321,766 parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .interfaces import Tokenizer, TokenizerOutput, Tokens
from .quantizers import QuantizerConfig, build_quantizer
from .registry import register_model
from .vqgan import AttnBlock, Decoder, Encoder, ResnetBlock, backbone_kwargs, replace_config

MQVAE_PAPER = ("Huang et al., Not All Image Regions Matter: Masked Vector Quantization for "
               "Autoregressive Image Generation, CVPR 2023")


@dataclass(frozen=True)
class MQVAEConfig:
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (32,)
    z_channels: int = 256
    dropout: float = 0.0
    keep_ratio: float = 0.25          # fraction of grid positions that get a code
    demask_layers: int = 8
    mask_value: float = 0.02          # initial attention weight factor of masked keys
    quantizer: QuantizerConfig = field(default_factory=lambda: QuantizerConfig(
        codebook_size=1024, dim=256, factorized=False, l2_normalize=False, ema=True))

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def keep_count(keep_ratio: float, num_positions: int) -> int:
    """k = round(keep_ratio * h * w), at least 1 and at most every position."""
    return max(1, min(num_positions, round(keep_ratio * num_positions)))


def keep_mask_from_positions(positions: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Bool ``[B, h*w]``, True at the kept positions."""
    keep = torch.zeros(positions.shape[0], num_positions, dtype=torch.bool, device=positions.device)
    return keep.scatter(1, positions, True)


class AdaptiveMask(nn.Module):
    """Scores the grid and keeps the top ``num_keep`` positions (paper Sec. 3.1)."""

    def __init__(self, channels: int, code_dim: int, num_keep: int):
        super().__init__()
        self.num_keep = num_keep
        self.score_norm = nn.LayerNorm(channels, elementwise_affine=False)
        self.score_net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(channels, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())
        self.feature_norm = nn.LayerNorm(channels, elementwise_affine=False)
        # No bias: the score scales the projected feature as a whole (as in the official code).
        self.pre_projection = nn.Linear(channels, code_dim, bias=False)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Importance in (0, 1) per position, ``[B, h*w]`` raster order."""
        x = self.score_norm(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.score_net(x).flatten(1)

    def forward(self, h: torch.Tensor):
        """``h [B, C, H, W]`` -> (kept features ``[B, k, code_dim]``, positions ``[B, k]`` sorted,
        scores ``[B, H*W]``)."""
        C = h.shape[1]
        scores = self.scores(h)
        top = scores.detach().topk(self.num_keep, dim=1).indices
        # Raster order, not score order: the prior predicts positions left to right, top down.
        positions = top.sort(dim=1).values
        feats = self.feature_norm(h.flatten(2).transpose(1, 2))              # [B, HW, C]
        kept = feats.gather(1, positions[..., None].expand(-1, -1, C))
        kept = kept * scores.gather(1, positions)[..., None]                  # scorer's gradient
        return self.pre_projection(kept), positions, scores


class DemaskBlock(nn.Module):
    """ResnetBlock, then self-attention whose key weights are scaled by the mask."""

    def __init__(self, channels: int, dropout: float = 0.0):
        super().__init__()
        self.resblock = ResnetBlock(channels, channels, dropout)
        self.attn = AttnBlock(channels)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # softmax(s + log m) == m exp(s) / sum(m exp(s)): the multiplicative re-weighting,
        # renormalized, and it keeps the fused SDPA kernel.
        return self.attn(self.resblock(h), attn_bias=mask.log())

    def attention_weights(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.attn.weights(self.resblock(h), attn_bias=mask.log())


class AdaptiveDemask(nn.Module):
    """Rebuilds the full grid from the kept codes (paper Sec. 3.2)."""

    def __init__(self, code_dim: int, out_dim: int, num_layers: int, mask_value: float,
                 dropout: float = 0.0):
        super().__init__()
        self.mask_value = mask_value
        self.mask_token = nn.Parameter(torch.empty(code_dim))
        # Small uniform init, as the official code: near zero, so masked positions start as
        # "no information" relative to the codebook vectors.
        nn.init.uniform_(self.mask_token, -1.0 / code_dim, 1.0 / code_dim)
        self.post_projection = nn.Conv2d(code_dim, out_dim, 1)
        self.conv_in = nn.Conv2d(out_dim, out_dim, 3, 1, 1)
        self.blocks = nn.ModuleList(DemaskBlock(out_dim, dropout) for _ in range(num_layers))
        self.last_resblock = ResnetBlock(out_dim, out_dim, dropout)

    def stem(self, z_q: torch.Tensor, positions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Mask tokens everywhere, quantized features at ``positions``; projected, ``[B, D', H, W]``."""
        B, _, D = z_q.shape
        H, W = grid
        full = self.mask_token.to(z_q.dtype).expand(B, H * W, D)
        full = full.scatter(1, positions[..., None].expand(-1, -1, D), z_q)
        return self.conv_in(self.post_projection(full.transpose(1, 2).reshape(B, D, H, W)))

    def initial_mask(self, positions: torch.Tensor, num_positions: int, dtype) -> torch.Tensor:
        """1 at kept, ``mask_value`` at masked positions, ``[B, h*w]``."""
        keep = keep_mask_from_positions(positions, num_positions)
        one = torch.ones((), dtype=dtype, device=positions.device)
        return torch.where(keep, one, one * self.mask_value)

    def forward(self, z_q: torch.Tensor, positions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h = self.stem(z_q, positions, grid)
        mask = self.initial_mask(positions, grid[0] * grid[1], h.dtype)
        for block in self.blocks:
            h = block(h, mask)
            mask = mask.sqrt()   # masked keys gain weight layer by layer: 0.02, 0.141, 0.376 ...
        return self.last_resblock(h)

    def attention_weights(self, z_q: torch.Tensor, positions: torch.Tensor,
                          grid: tuple[int, int], layer: int = 0):
        """(weights ``[B, h*w query, h*w key]`` of block ``layer``, the mask it received)."""
        h = self.stem(z_q, positions, grid)
        mask = self.initial_mask(positions, grid[0] * grid[1], h.dtype)
        for block in self.blocks[:layer]:
            h = block(h, mask)
            mask = mask.sqrt()
        return self.blocks[layer].attention_weights(h, mask), mask


class MQVAE(Tokenizer):
    """Masked-quantization tokenizer: ``encode`` -> ``Tokens(codes [B, k], positions [B, k])``."""

    def __init__(self, cfg: MQVAEConfig):
        super().__init__()
        self.config = cfg
        backbone = backbone_kwargs(cfg)
        r = cfg.resolution // cfg.downsample
        self.image_size = cfg.resolution
        self.grid_size = (r, r)
        self.num_tokens = keep_count(cfg.keep_ratio, r * r)
        dim = cfg.quantizer.dim
        self.encoder = Encoder(in_channels=cfg.in_channels, **backbone)
        self.masker = AdaptiveMask(cfg.z_channels, dim, self.num_tokens)
        self.quantizer = build_quantizer(dim, cfg.quantizer)
        self.demasker = AdaptiveDemask(dim, cfg.ch * cfg.ch_mult[-1], cfg.demask_layers,
                                       cfg.mask_value, cfg.dropout)
        self.decoder = Decoder(out_ch=cfg.out_ch, with_stem=False, **backbone)
        self.codebook_size = self.quantizer.codebook_size

    @property
    def num_positions(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def set_step(self, step: int) -> None:
        self.quantizer.set_step(step)

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        kept, positions, scores = self.masker(self.encoder(images))
        q = self.quantizer(kept)                                          # [B, k, D]
        recon = self.decoder(self.demasker(q.z_q, positions, self.grid_size))
        extra = {"mask_scores": scores,
                 "keep_mask": keep_mask_from_positions(positions, self.num_positions)}
        return TokenizerOutput(recon=recon, quant=q, tokens=Tokens(q.codes, positions), extra=extra)

    def encode(self, images: torch.Tensor) -> Tokens:
        """Codes and sorted kept positions, both ``[B, k]``. Call in eval mode: in train mode the
        scorer's BatchNorm uses batch statistics and the EMA codebook updates."""
        kept, positions, _ = self.masker(self.encoder(images))
        return Tokens(self.quantizer(kept).codes, positions)

    def _check_positions(self, codes: torch.Tensor, positions: torch.Tensor | None) -> None:
        if positions is None:
            raise ValueError("MQ-VAE decode needs the kept positions")
        if positions.shape != codes.shape:
            raise ValueError(f"codes {tuple(codes.shape)} and positions {tuple(positions.shape)} differ")

    def _lookup(self, codes: torch.Tensor) -> torch.Tensor:
        # lookup returns the fp32 codebook; match the de-mask module (bf16 / fp64 casts).
        return self.quantizer.lookup(codes).to(self.demasker.post_projection.weight.dtype)

    def decode(self, codes: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        self._check_positions(codes, positions)
        z_q = self._lookup(codes)
        return self.decoder(self.demasker(z_q, positions, self.grid_size))

    def demask_attention(self, codes: torch.Tensor, positions: torch.Tensor, layer: int = 0):
        """The de-mask module's attention weights at block ``layer`` (default: the first), as
        ``(weights [B, h*w, h*w], mask [B, h*w])`` -- for tests and visualization."""
        self._check_positions(codes, positions)
        return self.demasker.attention_weights(self._lookup(codes), positions,
                                               self.grid_size, layer)

    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight


MQVAE_F8 = MQVAEConfig()
MQVAE_F8_TINY = replace_config(
    MQVAE_F8, resolution=64, ch=32, num_res_blocks=1, attn_resolutions=(8,), z_channels=32,
    demask_layers=3, quantizer={"codebook_size": 64, "dim": 32})


@register_model("mq-vae-f8", kind="tokenizer", paper=MQVAE_PAPER)
def mq_vae_f8(**overrides) -> MQVAE:
    """Official ImageNet stage-1 backbone (f8, 32 x 32 grid), 25% kept: 256 codes of 1024 x 256;
    35,494,534 parameters (+ the 1024 x 256 EMA codebook buffer)."""
    return MQVAE(replace_config(MQVAE_F8, **overrides))


@register_model("mq-vae-f8-tiny", kind="tokenizer", paper=MQVAE_PAPER)
def mq_vae_f8_tiny(**overrides) -> MQVAE:
    return MQVAE(replace_config(MQVAE_F8_TINY, **overrides))


__all__ = ["MQVAEConfig", "MQVAE", "AdaptiveMask", "AdaptiveDemask", "DemaskBlock",
           "keep_count", "keep_mask_from_positions"]
