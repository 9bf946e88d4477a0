"""The text-conditional prior: a decoder-only transformer over image codes, conditioned on a frozen
text encoder, with classifier-free guidance.

The image side is VIM's (Yu et al. 2021, arXiv:2110.04627, sec. 4): code embeddings plus learned
position embeddings over the token grid, the shared causal :class:`~model_zoo.transformer.Transformer`
and a linear head to codebook logits. The text side is a FROZEN text encoder (open_clip or
transformers, ``model_zoo.text_encoders``) built from the registry name ``text_encoder``; its
per-token hidden states condition the prior in one of two ways (``conditioning``):

- ``"prefix"`` (DALL-E, Ramesh et al. 2021; Parti-style decoder-only): the states are normalized,
  projected to the prior's width and placed before the image tokens, so every image token attends
  causally to the whole caption. Padded text positions are masked out by PACKING rather than by an
  attention mask (the shared Transformer has none for self-attention): row ``b`` is laid out as
  ``[its l_b real text states, <start-of-image>, code_0, ..., code_{k-1}, zeros...]``, i.e. the padding
  moves behind the image tokens, where causal attention never lets a real position see it. Image
  positions carry grid position embeddings (never sequence positions), so a caption's logits do
  not depend on how it was padded, and the logits are gathered at ``l_b + i``. Cached generation
  needs one cache length for all rows, so rows are decoded in groups of equal text length, each
  group with its own KV cache, in lock step (one forward per distinct length per step; with one
  caption and CFG that is two forwards: the caption and the empty caption). A key-padding mask in
  the Transformer's self-attention (not in its API today) would make that a single forward.
- ``"cross_attention"`` (Imagen/Muse/Parti-style encoder-decoder conditioning): every block gets a
  cross-attention sublayer (``TransformerConfig(cross_attention=True, context_dim=text width)``,
  set automatically from the encoder) over the normalized text states with the encoder's mask as
  ``context_mask``. Its keys/values are computed once per generation and kept in the KV cache.

Conditions (``condition``): ``{"tokens": long [B, L]}`` (the frozen encoder runs under no_grad),
``{"embedding": [B, L, C], "mask": bool [B, L]}`` (cached embeddings, e.g. the float16
``KEY.txtemb.npy`` of a code shard via ``text_encoders.from_cached``: the encoder is skipped), or a
list of caption strings (tokenized and encoded). The empty caption ``""`` is the unconditional
condition (:meth:`T2IPrior.null_condition`); in training each caption is replaced by it with
probability ``caption_dropout`` (Ho & Salimans 2021) so that one network serves both CFG branches.

The text encoder is a submodule (it moves with ``.to()``), but it is NOT trained and NOT part of
the prior's weights: every parameter has ``requires_grad=False`` (so optimizers built from
trainable parameters never see it), it stays in eval mode and encodes under no_grad, and
``state_dict()`` leaves out its ``text_encoder.*`` tensors (``load_state_dict`` keeps the ones it
has), so checkpoints and zoo packages hold the prior only, not another copy of a frozen 63M (or
multi-billion T5) network. Its weights come from its own loading, every time the prior is built:
the text encoder preset's ``weights`` path or its cache (``$VQSCALE_CACHE/weights/<name>.
safetensors``; full-size presets require them and fail loudly without them), or a seeded random
init for the ``-tiny`` presets (the same in every process). Options go through the config's
``text_encoder_overrides`` (saved with the prior's config, so a package names its encoder).

Parameter counts, measured with ``count_prior_params`` on the meta device (the prior only; the
frozen text encoder apart):

====================================  =============  =========================================
preset (conditioning)                  prior params   frozen text encoder (not trained)
====================================  =============  =========================================
t2i-prior-1b (prefix)                   957,523,968  openclip-vit-b-32-text, 63,428,096
t2i-prior-1b (cross_attention)        1,155,043,584  same
t2i-prior-1b-tiny (prefix)                  113,664  openclip-vit-b-32-text-tiny, 3,269,184
t2i-prior-1b-tiny (cross_attention)         143,040  same
====================================  =============  =========================================

``t2i-prior-1b``: 32x32 grid (1024 tokens of a 256 px, patch-8 image tokenizer), codebook 8192, 24
blocks of width 1792 (14 heads of 128, MLP 7168): 925,403,136 in the blocks (24 x 38,558,464),
14,680,064 each for the code embedding and the bias-free head, 1,835,008 for the grid positions,
919,296 for the text projection (512 -> 1792), plus norms and the start token. Cross-attention
replaces the text projection by 24 cross-attention sublayers of 8,268,288 (query and output
1792 x 1792, keys/values from the 512-d text states).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import text_encoders  # noqa: F401  (registers the text encoder presets this prior builds)
from .interfaces import Prior
from .registry import create_model, register_model
from .sampling import SamplingConfig, cfg_logits, sample_tokens
from .transformer import KVCache, Transformer, TransformerConfig
from .vqgan import replace_config

T2I_PAPER = ("Ramesh et al. 2021, Zero-Shot Text-to-Image Generation, arXiv:2102.12092; "
             "Yu et al. 2022, Scaling Autoregressive Models for Content-Rich Text-to-Image Generation "
             "(Parti), arXiv:2206.10789; Ho & Salimans 2021, Classifier-Free Diffusion Guidance")


@dataclass(frozen=True)
class T2IPriorConfig:
    codebook_size: int = 8192
    grid_size: tuple[int, int] = (32, 32)
    transformer: TransformerConfig = field(default_factory=lambda: TransformerConfig(
        width=1792, depth=24, heads=14, mlp_dim=7168, dropout=0.1))
    conditioning: Literal["prefix", "cross_attention"] = "prefix"
    text_encoder: str = "openclip-vit-b-32-text"      # a registry preset of kind "text_encoder"
    # Fields of the text encoder's own config, e.g. {"weights": "s3://b/clip.safetensors"} or
    # {"pretrained": False} (random weights: tests, smoke runs).
    text_encoder_overrides: dict[str, Any] = field(default_factory=dict)
    caption_dropout: float = 0.1       # caption -> "" during training (classifier-free guidance)
    init_std: float = 0.02             # embeddings, position table, text projection and head

    def __post_init__(self) -> None:
        if self.conditioning not in ("prefix", "cross_attention"):
            raise ValueError(f"conditioning must be 'prefix' or 'cross_attention', got {self.conditioning!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.conditioning == "prefix" and self.transformer.cross_attention:
            raise ValueError("prefix conditioning uses no cross-attention; set conditioning='cross_attention'")


def count_prior_params(model: "T2IPrior") -> int:
    """Parameters of the prior itself, the frozen text encoder excluded."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("text_encoder."))


def _pad_to(hidden: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    extra = length - hidden.shape[1]
    if extra <= 0:
        return hidden, mask
    return F.pad(hidden, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def _cat_text(*texts: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Stack text batches of different lengths (zero-padded, masked)."""
    length = max(h.shape[1] for h, _ in texts)
    padded = [_pad_to(h, m, length) for h, m in texts]
    return torch.cat([h for h, _ in padded]), torch.cat([m for _, m in padded])


def _compact(hidden: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Real text positions first (order kept), cut to the longest caption: (hidden, mask, lengths)."""
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    mask = mask.gather(1, order)
    hidden = hidden.gather(1, order[..., None].expand_as(hidden))
    lengths = mask.sum(1)
    if hidden.device.type == "meta":    # structure only (FLOP counts): no values to cut by
        return hidden, mask, lengths
    longest = int(lengths.max()) if lengths.numel() else 0
    return hidden[:, :longest], mask[:, :longest], lengths


def _drop_text_encoder(module: "T2IPrior", state_dict: dict, prefix: str, local_metadata) -> None:
    for k in [k for k in state_dict if k.startswith(prefix + "text_encoder.")]:
        del state_dict[k]


def _keep_text_encoder(module: "T2IPrior", state_dict: dict, prefix: str, *args) -> None:
    # A state dict without the frozen encoder (ours) loads strictly: its tensors load onto themselves.
    for k, v in module.text_encoder.state_dict(keep_vars=True).items():
        state_dict.setdefault(prefix + "text_encoder." + k, v.detach())


class T2IPrior(Prior):
    """Decoder-only prior over image codes conditioned on a frozen text encoder (module doc)."""

    def __init__(self, cfg: T2IPriorConfig):
        super().__init__()
        self.config = cfg
        self.codebook_size = cfg.codebook_size
        self.grid_size = tuple(cfg.grid_size)
        self.num_tokens = self.grid_size[0] * self.grid_size[1]
        self.conditioning = cfg.conditioning
        self.text_encoder = create_model(cfg.text_encoder, **dict(cfg.text_encoder_overrides))
        self.text_encoder.requires_grad_(False)       # frozen: never in an optimizer
        self.text_encoder.eval()
        # Not part of the prior's weights (module doc): dropped from state_dict, kept on load.
        self.register_state_dict_post_hook(_drop_text_encoder)
        self.register_load_state_dict_pre_hook(_keep_text_encoder)
        c = self.text_encoder.width
        tcfg = cfg.transformer
        if cfg.conditioning == "cross_attention":
            if tcfg.context_dim not in (None, c):
                raise ValueError(f"context_dim {tcfg.context_dim} != the text encoder's width {c}")
            tcfg = dataclasses.replace(tcfg, cross_attention=True, context_dim=c)
        self.transformer_cfg = tcfg
        d = tcfg.width
        self.code_embed = nn.Embedding(cfg.codebook_size, d)
        self.pos_embed = nn.Parameter(torch.empty(self.num_tokens, d))   # over the token grid
        self.start = nn.Parameter(torch.empty(d))                        # <start-of-image>
        self.text_norm = nn.LayerNorm(c)       # encoders differ in scale (CLIP LN, T5 RMSNorm)
        self.text_proj = nn.Linear(c, d) if cfg.conditioning == "prefix" else None
        self.drop = nn.Dropout(tcfg.dropout)   # embedding dropout
        self.transformer = Transformer(tcfg)
        self.head = nn.Linear(d, cfg.codebook_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        std = self.config.init_std
        for w in (self.code_embed.weight, self.pos_embed, self.start, self.head.weight):
            nn.init.normal_(w, 0.0, std)
        if self.text_proj is not None:
            nn.init.normal_(self.text_proj.weight, 0.0, std)
            nn.init.zeros_(self.text_proj.bias)
        nn.init.ones_(self.text_norm.weight)
        nn.init.zeros_(self.text_norm.bias)
        self.transformer.init_weights(std)

    @property
    def _param(self) -> Tensor:
        return self.start

    # ---- conditions -------------------------------------------------------------------------

    def null_condition(self, batch_size: int) -> dict[str, Tensor]:
        """The empty caption's tokens, ``{"tokens": [B, L]}``."""
        return {"tokens": self.text_encoder.null_tokens(batch_size).to(self._param.device)}

    def encode_condition(self, condition, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Any accepted condition (or None: the empty caption) -> (text states ``[B, L, C]`` in the
        prior's dtype, mask bool ``[B, L]``); a batch of one is expanded to ``batch_size``. A dict with
        both ``embedding`` and ``tokens`` uses the embedding."""
        dev, dtype = self._param.device, self._param.dtype
        if condition is None:
            condition = self.null_condition(1)
        if isinstance(condition, str):
            condition = [condition]
        if isinstance(condition, dict) and "embedding" in condition:   # cached: skip the encoder
            hidden = torch.as_tensor(condition["embedding"])
            mask = condition.get("mask")
            mask = (torch.ones(hidden.shape[:2], dtype=torch.bool) if mask is None
                    else torch.as_tensor(mask).to(torch.bool))
        elif isinstance(condition, dict) and "tokens" in condition:
            hidden, mask = self.text_encoder.encode(condition["tokens"])
        elif isinstance(condition, Sequence) and condition and all(isinstance(s, str) for s in condition):
            hidden, mask = self.text_encoder.encode_text(list(condition))
        else:
            raise TypeError("condition must be {'tokens': [B, L]}, {'embedding': [B, L, C], 'mask': [B, L]} "
                            f"or a list of captions, got {type(condition).__name__}")
        if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
            raise ValueError(f"text states must be [B, L, C] with a [B, L] mask, got {tuple(hidden.shape)} "
                             f"and {tuple(mask.shape)}")
        if hidden.shape[2] != self.text_encoder.width:
            raise ValueError(f"text states have width {hidden.shape[2]}, the text encoder "
                             f"{self.config.text_encoder!r} has {self.text_encoder.width}")
        hidden, mask = hidden.detach().to(dev, dtype), mask.to(dev)
        if batch_size is not None and hidden.shape[0] != batch_size:
            if hidden.shape[0] != 1:
                raise ValueError(f"condition has batch {hidden.shape[0]}, expected {batch_size} (or 1)")
            hidden, mask = hidden.expand(batch_size, -1, -1), mask.expand(batch_size, -1)
        return hidden, mask

    def _null_text(self, batch_size: int) -> tuple[Tensor, Tensor]:
        hidden, mask, _ = _compact(*self.encode_condition(self.null_condition(1)))
        return hidden.expand(batch_size, -1, -1), mask.expand(batch_size, -1)

    def _drop_captions(self, hidden: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Training: each caption becomes the empty caption with probability ``caption_dropout``."""
        b = hidden.shape[0]
        # drawn on the host: whether any caption drops decides the shapes below, and reading that
        # from an accelerator would stall every training step on a host sync
        drop = torch.rand(b) < self.config.caption_dropout
        if not bool(drop.any()):
            return hidden, mask
        drop = drop.to(hidden.device, non_blocking=True)
        nh, nm = self._null_text(b)
        length = max(hidden.shape[1], nh.shape[1])
        (hidden, mask), (nh, nm) = _pad_to(hidden, mask, length), _pad_to(nh, nm, length)
        return torch.where(drop[:, None, None], nh, hidden), torch.where(drop[:, None], nm, mask)

    # ---- the network ------------------------------------------------------------------------

    def _image_inputs(self, codes: Tensor, start: int = 0, with_start: bool = True) -> Tensor:
        """``[<start>,] code_embed(codes) + pos[start : start + k]`` -> ``[B, (1 +) k, D]``."""
        x = self.code_embed(codes) + self.pos_embed[start:start + codes.shape[1]].to(self._param.dtype)
        if with_start:
            x = torch.cat([self.start.expand(codes.shape[0], 1, -1), x], 1)
        return self.drop(x)

    def _prefix(self, hidden: Tensor) -> Tensor:
        return self.drop(self.text_proj(self.text_norm(hidden)))

    def _hidden(self, hidden: Tensor, mask: Tensor, codes: Tensor, upto: int | None = None) -> Tensor:
        """Transformer states at the ``1 + k`` image-side positions (``<start>``, then ``codes
        [B, k]``): position ``j`` has seen the caption and ``codes[:, :j]``. ``[B, 1 + k, D]``."""
        img = self._image_inputs(codes)
        if self.conditioning == "cross_attention":
            return self.transformer(img, context=self.text_norm(hidden), context_mask=mask, upto=upto)
        hidden, mask, lengths = _compact(hidden, mask)
        text = self._prefix(hidden) * mask[..., None].to(img.dtype)      # padding zeroed...
        idx = (lengths[:, None] + torch.arange(img.shape[1], device=img.device))[..., None]
        idx = idx.expand(-1, -1, img.shape[2])
        x = torch.cat([text, torch.zeros_like(img)], 1).scatter(1, idx, img)   # ...and moved behind
        return self.transformer(x, upto=upto).gather(1, idx)

    def _check_codes(self, codes: Tensor) -> None:
        if codes.dim() != 2 or codes.shape[1] != self.num_tokens:
            raise ValueError(f"codes must be [B, {self.num_tokens}], got {tuple(codes.shape)}")

    def forward(self, codes: Tensor, condition, positions: Tensor | None = None) -> Tensor:
        """Teacher forcing: ``logits [B, N, V]``; ``logits[:, i]`` predicts ``codes[:, i]`` from the
        caption and ``codes[:, :i]``. In training, captions are dropped (``caption_dropout``)."""
        self._check_codes(codes)
        hidden, mask = self.encode_condition(condition, codes.shape[0])
        if self.training and self.config.caption_dropout > 0:
            hidden, mask = self._drop_captions(hidden, mask)
        return self.head(self._hidden(hidden, mask, codes[:, :-1]))

    def features(self, codes: Tensor, condition, layer: int, positions: Tensor | None = None) -> Tensor:
        """Block ``layer``'s output (no final norm) averaged over the ``N`` positions that hold the
        image's codes (all of them are fed), ``[B, D]``. Pass ``null_condition`` for a caption-free
        probe."""
        self._check_codes(codes)
        depth = self.transformer_cfg.depth
        if not -depth <= layer < depth:
            raise ValueError(f"layer must be in [-{depth}, {depth})")
        hidden, mask = self.encode_condition(condition, codes.shape[0])
        return self._hidden(hidden, mask, codes, upto=layer)[:, 1:].mean(1)

    # ---- sampling ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, condition, num_samples: int, sampling: SamplingConfig, seeds: Tensor) -> Tensor:
        """Sample codes ``[num_samples, N]``. ``condition`` holds one caption (shared) or
        ``num_samples``; ``seeds [num_samples]`` make each sample independent of the batch. With
        ``guidance_scale != 1`` the conditional and the empty-caption rows run as one batch.
        Call in eval mode."""
        n, dev = num_samples, self._param.device
        seeds = torch.as_tensor(seeds, dtype=torch.long, device=dev).reshape(-1)
        if seeds.shape[0] != n:
            raise ValueError(f"{seeds.shape[0]} seeds for {n} samples")
        hidden, mask = self.encode_condition(condition, n)
        scale = float(sampling.guidance_scale)
        if scale != 1.0:
            hidden, mask = _cat_text((hidden, mask), self._null_text(n))
        rows = hidden.shape[0]
        if sampling.use_cache:
            step = (self._cross_decoder(hidden, mask) if self.conditioning == "cross_attention"
                    else self._prefix_decoder(hidden, mask))
        else:
            def step(t: int, codes: Tensor) -> Tensor:   # the whole sequence again, every step
                return self._hidden(hidden, mask, codes[:, :t])[:, -1]
        codes = torch.zeros(n, self.num_tokens, dtype=torch.long, device=dev)
        for t in range(self.num_tokens):
            logits = self.head(step(t, codes.repeat(rows // n, 1)))
            logits = logits if logits.dtype == torch.float64 else logits.float()
            if rows > n:
                logits = cfg_logits(logits[:n], logits[n:], scale)
            codes[:, t] = sample_tokens(logits, sampling, seeds, t)
        return codes

    def _cross_decoder(self, hidden: Tensor, mask: Tensor):
        """KV-cached steps for cross-attention: the context's keys/values are computed at step 0
        and kept in the cache."""
        cache = self.transformer.new_cache(hidden.shape[0], self.num_tokens)
        context = self.text_norm(hidden)

        def step(t: int, codes: Tensor) -> Tensor:
            x = (self._image_inputs(codes[:, :0]) if t == 0
                 else self._image_inputs(codes[:, t - 1:t], start=t - 1, with_start=False))
            return self.transformer(x, cache=cache, context=context, context_mask=mask)[:, -1]
        return step

    def _prefix_decoder(self, hidden: Tensor, mask: Tensor):
        """KV-cached steps for the text prefix: rows are grouped by caption length (no padding
        inside a group), each group prefills its caption and ``<start>`` into its own cache, and
        all groups step together."""
        hidden, mask, lengths = _compact(hidden, mask)
        groups: list[tuple[Tensor, int, KVCache]] = []
        for length in torch.unique(lengths).tolist():
            rows = torch.nonzero(lengths == length).flatten()
            groups.append((rows, int(length), self.transformer.new_cache(rows.numel(), int(length) + self.num_tokens)))

        def step(t: int, codes: Tensor) -> Tensor:
            out = None
            for rows, length, cache in groups:
                if t == 0:
                    x = torch.cat([self._prefix(hidden[rows, :length]), self._image_inputs(codes[rows, :0])], 1)
                else:
                    x = self._image_inputs(codes[rows, t - 1:t], start=t - 1, with_start=False)
                h = self.transformer(x, cache=cache)[:, -1]
                out = h.new_empty(codes.shape[0], h.shape[-1]) if out is None else out
                out[rows] = h
            return out
        return step


# ---------------------------------------------------------------------------------------------
# Presets


T2I_PRIOR_1B = T2IPriorConfig()
T2I_PRIOR_1B_TINY = T2IPriorConfig(
    codebook_size=64, grid_size=(4, 4),
    transformer=TransformerConfig(width=64, depth=2, heads=2, mlp_dim=256),
    text_encoder="openclip-vit-b-32-text-tiny")


def _replace(cfg: T2IPriorConfig, overrides: dict) -> T2IPriorConfig:
    if "grid_size" in overrides:
        overrides["grid_size"] = tuple(overrides["grid_size"])
    return replace_config(cfg, **overrides)


@register_model("t2i-prior-1b", kind="prior", paper=T2I_PAPER)
def t2i_prior_1b(**overrides) -> T2IPrior:
    """Text-to-image prior: 957,523,968 parameters (prefix; 1,155,043,584 with cross-attention)
    over 32x32 codes of 8192, conditioned on the frozen open_clip ViT-B-32 text tower, whose
    weights it loads from its own path/cache (``text_encoder_overrides={"weights": URL}``)."""
    return T2IPrior(_replace(T2I_PRIOR_1B, overrides))


@register_model("t2i-prior-1b-tiny", kind="prior", paper=T2I_PAPER)
def t2i_prior_1b_tiny(**overrides) -> T2IPrior:
    """CPU twin: 4x4 codes of 64, 2 blocks of width 64, the tiny (random) open_clip text tower."""
    return T2IPrior(_replace(T2I_PRIOR_1B_TINY, overrides))


__all__ = ["T2IPriorConfig", "T2IPrior", "count_prior_params"]
