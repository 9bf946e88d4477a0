"""The causal transformer shared by every stage-2 prior (VIM, the text-conditional prior, Stackformer).

A GPT-style decoder (Radford et al. 2019; VIM, Yu et al. 2021, sec. 4): pre-norm blocks
``x + drop(attn(LN(x)))``, optionally ``x + drop(xattn(LN(x), context))`` (cross-attention to a
text encoder's output, as in Parti/Muse-style text-to-image priors), then
``x + drop(mlp(LN(x)))`` with a GELU MLP, and a final LayerNorm. All attention goes through
``F.scaled_dot_product_attention`` so that the fused flash / memory-efficient kernels are used on
GPU: the 1024-token grid of a 256 px ViT-VQGAN image makes the attention matrix the memory hot
spot in training.

Generation keeps a :class:`KVCache` (preallocated, so no per-step concatenation or reallocation):
``forward(x_new, cache=cache)`` appends the keys/values of the ``T`` new positions at
``cache.length`` and attends causally to everything cached so far, which turns sampling an
``N``-token image from ``O(N^2)`` token-forwards into ``O(N)``. Cross-attention keys/values depend
only on the context, so with a cache they are computed on the first call and reused afterwards.

Embeddings, position tables and output heads belong to the priors; so does embedding dropout (the
priors apply ``nn.Dropout(cfg.dropout)`` to their inputs). This module holds only the stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TransformerConfig:
    width: int
    depth: int
    heads: int
    mlp_dim: int
    dropout: float = 0.1            # residual/MLP/embedding dropout
    attn_dropout: float = 0.0       # on attention probabilities (SDPA's dropout_p)
    cross_attention: bool = False   # add a cross-attention sublayer to every block
    context_dim: int | None = None  # width of the cross-attention context (defaults to width)
    qkv_bias: bool = True
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


class KVCache:
    """Preallocated per-layer keys/values ``[B, heads, max_len, head_dim]``.

    ``length`` counts the filled positions; :meth:`Transformer.forward` writes the new positions of
    every layer at ``length`` and then advances it. ``cross`` holds each layer's cross-attention
    keys/values (computed once from the context).
    """

    def __init__(self, depth: int, batch_size: int, heads: int, head_dim: int, max_len: int,
                 device=None, dtype=None):
        shape = (batch_size, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * depth
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0

    def reset(self) -> None:
        self.length = 0
        self.cross = [None] * len(self.k)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v [B, heads, T, head_dim]`` of ``layer`` at ``length``; return all filled
        positions ``[:, :, :length + T]`` (``length`` itself is advanced by the transformer, once
        all layers have written)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)          # [B, H, T, hd]


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, hd = x.shape
    return x.transpose(1, 2).reshape(b, t, h * hd)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.heads, self.attn_dropout = cfg.heads, cfg.attn_dropout
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = (_split_heads(y, self.heads) for y in self.qkv(x).chunk(3, dim=-1))
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(layer, k, v)
        p = self.attn_dropout if self.training else 0.0
        if start == 0:
            # Prefill / training: plain causal attention (SDPA's flash path on GPU).
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=t > 1)
        elif t == 1:
            # One new token attends to every cached position: no mask at all.
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            # T new tokens after `start` cached ones: query i sees keys 0 .. start + i. SDPA's
            # is_causal aligns the mask top-left, which is wrong for a non-square block.
            qi = torch.arange(start, start + t, device=x.device)[:, None]
            mask = torch.arange(start + t, device=x.device)[None, :] <= qi
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.drop(self.proj(_merge_heads(out)))


class CrossAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.heads, self.attn_dropout = cfg.heads, cfg.attn_dropout
        self.q = nn.Linear(cfg.width, cfg.width, bias=cfg.qkv_bias)
        self.kv = nn.Linear(cfg.context_dim or cfg.width, 2 * cfg.width, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, context_mask: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        q = _split_heads(self.q(x), self.heads)
        if cache is not None and cache.cross[layer] is not None:
            k, v = cache.cross[layer]
        else:
            if context is None:
                raise ValueError("cross-attention needs a context (or a cache that already holds it)")
            k, v = (_split_heads(y, self.heads) for y in self.kv(context).chunk(2, dim=-1))
            if cache is not None:
                cache.cross[layer] = (k, v)
        mask, empty = None, None
        if context_mask is not None:
            # A row with nothing to attend to (all False) would give NaN from the softmax; it
            # attends to everything and its output is zeroed instead: an empty context adds nothing.
            context_mask = context_mask.to(torch.bool)
            empty = ~context_mask.any(dim=-1)                              # [B]
            mask = (context_mask | empty[:, None])[:, None, None, :]       # [B, 1, 1, S]
        p = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        if empty is not None:
            out = out.masked_fill(empty[:, None, None, None], 0.0)
        return self.drop(self.proj(_merge_heads(out)))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(cfg.width, cfg.mlp_dim), nn.GELU(), nn.Linear(cfg.mlp_dim, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention, GELU MLP, each a residual branch."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg)
        if cfg.cross_attention:
            self.norm_x = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
            self.xattn = CrossAttention(cfg)
        else:
            self.norm_x, self.xattn = None, None
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache, layer)
        if self.xattn is not None:
            x = x + self.xattn(self.norm_x(x), context, context_mask, cache, layer)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Causal transformer stack: ``blocks`` then the final LayerNorm ``norm``."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2 initialization: normal(0, 0.02) linear weights, zero biases, unit LayerNorms, and
        the projections that write into the residual stream (attention ``proj``, MLP ``fc2``)
        scaled by ``1/sqrt(2 * depth)`` so the stream's variance does not grow with depth. Also
        re-initializes a model built on meta and materialized with ``to_empty``."""
        resid_std = std / math.sqrt(2 * self.config.depth)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                last = name.rsplit(".", 1)[-1]
                nn.init.normal_(m.weight, 0.0, resid_std if last in ("proj", "fc2") else std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.config.depth, batch_size, self.config.heads, self.config.head_dim, max_len,
                       device=device if device is not None else p.device,
                       dtype=dtype if dtype is not None else p.dtype)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, upto: int | None = None) -> torch.Tensor:
        """``x [B, T, D]`` -> ``[B, T, D]``.

        With ``cache``, ``x`` holds only the new positions: they are appended at ``cache.length``
        and attend causally to all cached and new positions; the cache is advanced by ``T``.
        ``upto=L`` runs blocks ``0..L`` only (negative ``L`` counts from the end) and returns block
        ``L``'s output without the final norm (the linear-probe features); the blocks above are
        never run. Otherwise the output is ``norm(last block)``.
        """
        if self.config.cross_attention and context is None and (cache is None or cache.cross[0] is None):
            raise ValueError("this transformer has cross-attention: pass a context")
        if cache is not None and x.shape[0] != cache.batch_size:
            raise ValueError(f"batch {x.shape[0]} does not match the cache's {cache.batch_size}")
        blocks = self.blocks
        if upto is not None:
            if cache is not None:
                # The layers above would be left without keys/values for these positions.
                raise ValueError("upto (features) cannot be combined with a KV cache")
            blocks = self.blocks[: range(len(self.blocks))[upto] + 1]    # IndexError when out of range
        for i, blk in enumerate(blocks):
            x = blk(x, cache, i, context, context_mask)
        if cache is not None:
            cache.length += x.shape[1]
        return x if upto is not None else self.norm(x)
