"""Stackformer: the stage-2 prior over MQ-VAE's variable-position tokens.

Huang, Mao, Wang & Zhang, "Not All Image Regions Matter: Masked Vector Quantization for
Autoregressive Image Generation" (CVPR 2023; github.com/CrossmodalGroup/MaskedVectorQuantization).

MQ-VAE keeps ``k`` of the ``h*w`` grid positions, so an image is a sequence of ``k`` pairs
``(c_i, p_i)``: a code and its flat raster position, sorted by position. Stackformer models the
pairs with two stacked causal transformers, a Code-Transformer and a Position-Transformer (the
released class-conditional ImageNet config, ``ReverseStackedPositionGPT``, "first sample value,
then position": 12 + 12 layers, width 1024, 16 heads). The factorization, exactly::

    p(c_1, p_1, ..., c_k, p_k | y) = prod_i  p(c_i | y, c_<i, p_<i) * p(p_i | y, c_<=i, p_<i)

* Code-Transformer input, step ``i = 1..k``: ``x_1 = E_cls(y) + S_1`` (the class token) and
  ``x_i = E_code(c_{i-1}) + E_grid(p_{i-1}) + S_i`` -- the previous code plus the embedding of
  its position on the full grid, plus a learned embedding ``S`` of the step index (the official
  "absolute position"). Its (final-normed) hidden state ``h_i`` gives the code logits for
  ``c_i`` through a bias-free linear head.
* Position-Transformer input, step ``i``: ``h_i + E_code(c_i)`` -- the code transformer's hidden
  state plus the embedding of the code just predicted (teacher-forced in training, the sampled
  code in generation; ``E_code`` is shared, as in the official code). It is a separate causal
  stack over the same ``k`` steps; its hidden state ``g_i`` gives the logits for ``p_i`` over
  the ``h*w`` grid positions.
* Loss = code cross-entropy + position cross-entropy (the official ``loss_position_weight`` is
  1.0), both returned by name.

Positions are strictly increasing (MQ-VAE sorts its kept positions). ``forward`` therefore masks
(``-inf``) every position that cannot come next given the previous position: ``p_i`` must satisfy
``p_{i-1} < p_i <= h*w - k + (i - 1)`` (1-based ``i``; ``p_0 = -1``) so that the ``k - i``
tokens still to come fit after it. The position CE is then the exact NLL of the distribution that
``generate`` samples from, and a sample always holds exactly ``k`` distinct, sorted, in-grid
positions. (The official sampler only forbids already-used positions, so it can emit unsorted
positions; sorting is the project's contract for MQ-VAE tokens.) With classifier-free guidance
the mask is applied after mixing the conditional and unconditional logits.

Parametrization vs the official code: the class token has its own table (the official code
appends 1000 class ids to the code vocabulary and gives the class token a "start" grid
position; same function class); each stack ends in its final LayerNorm and the heads are
bias-free linears (official: LN + bias-free linear); the position stack reads the code stack's
normed output. Dropout 0.1 everywhere, attention dropout 0.1, init normal(0, 0.02), as released.

Conditioning is by class label (``-1`` = unconditional, mapped to the null class
``num_classes``); during training labels are replaced by the null class with probability
``class_dropout`` so that one network serves both CFG branches. Class dropout and guidance are
vqscale's options, not the official code's (its class-conditional config trains without label
dropout and samples without guidance; the ``stackformer-base`` recipe sets ``class_dropout=0``).
Generation keeps a KV cache for each stack; code draws use sampling step ``2i`` and position draws
``2i + 1`` so the two draws of a step see different counter-based noise. Position draws use
``sampling.for_positions()`` (``position_top_k`` / ``position_top_p``; the official sampler
filters codes with top-k 100 and positions with top-k 10, top-p 0.95 for both).

Parameter counts, measured on the meta device: ``stackformer-base`` (32 x 32 grid, k = 256,
codebook 1024, 1000 classes, 12 + 12 layers, width 1024, 16 heads, MLP 4096):
**307,794,944** (each stack 151,156,736 = 12 blocks of 12,596,224 + the final norm; embeddings
code 1,048,576, grid 1,048,576, class 1,025,024 (1001 x 1024), step 262,144; heads 1,048,576
each). ``stackformer-base-tiny``: 8 x 8 grid, k = 16, codebook 64, 1000 classes, 2 + 2 layers of
width 64, 2 heads, MLP 256: **281,664** parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .interfaces import Prior, class_labels
from .registry import register_model
from .sampling import SamplingConfig, cfg_logits, guided_rows, sample_tokens
from .transformer import Transformer, TransformerConfig
from .vqgan import replace_config

STACKFORMER_PAPER = ("Huang et al., Not All Image Regions Matter: Masked Vector Quantization for "
                     "Autoregressive Image Generation, CVPR 2023")


@dataclass(frozen=True)
class StackformerConfig:
    codebook_size: int = 1024
    grid_size: tuple[int, int] = (32, 32)
    num_tokens: int = 256              # k kept positions (keep ratio 0.25 at 32 x 32)
    num_classes: int = 1000
    code_transformer: TransformerConfig = field(default_factory=lambda: TransformerConfig(
        width=1024, depth=12, heads=16, mlp_dim=4096, dropout=0.1, attn_dropout=0.1))
    position_transformer: TransformerConfig = field(default_factory=lambda: TransformerConfig(
        width=1024, depth=12, heads=16, mlp_dim=4096, dropout=0.1, attn_dropout=0.1))
    class_dropout: float = 0.1         # label -> null class during training (CFG; not in the official code)
    init_std: float = 0.02             # minGPT / official init of embeddings and linear layers

    def __post_init__(self) -> None:
        h, w = self.grid_size
        if not 1 <= self.num_tokens <= h * w:
            raise ValueError(f"num_tokens {self.num_tokens} must be in [1, {h * w}]")
        if self.code_transformer.width != self.position_transformer.width:
            # The position stack reads the code stack's hidden state (plus a code embedding).
            raise ValueError("code and position transformers must have the same width")
        if self.code_transformer.cross_attention or self.position_transformer.cross_attention:
            raise ValueError("Stackformer is class-conditioned by its first token, no cross-attention")

    @property
    def num_positions(self) -> int:
        return self.grid_size[0] * self.grid_size[1]


def position_mask(prev: torch.Tensor, step: torch.Tensor | int, num_tokens: int,
                  num_positions: int) -> torch.Tensor:
    """Allowed next positions, bool ``[..., num_positions]``.

    ``prev [...]``: the previous position (-1 before the first token); ``step``: the 0-based index
    of the token being predicted. Allowed: ``prev < q <= num_positions - num_tokens + step``, so a
    position is never repeated, order is raster order, and the remaining tokens always fit.
    """
    q = torch.arange(num_positions, device=prev.device)
    step = torch.as_tensor(step, device=prev.device)
    hi = num_positions - num_tokens + step
    return (q > prev[..., None]) & (q <= hi[..., None])


class Stackformer(Prior):
    """Code-Transformer + Position-Transformer over MQ-VAE's ``(code, position)`` pairs."""

    def __init__(self, cfg: StackformerConfig):
        super().__init__()
        self.config = cfg
        self.codebook_size = cfg.codebook_size
        self.num_tokens = cfg.num_tokens
        self.grid_size = tuple(cfg.grid_size)
        self.num_positions = cfg.num_positions
        self.num_classes = cfg.num_classes
        d = cfg.code_transformer.width
        self.code_embed = nn.Embedding(cfg.codebook_size, d)          # shared by both stacks
        self.grid_embed = nn.Embedding(cfg.num_positions, d)          # position on the full grid
        self.class_embed = nn.Embedding(cfg.num_classes + 1, d)       # + the null class
        self.step_embed = nn.Parameter(torch.empty(cfg.num_tokens, d))  # sequence index
        self.drop = nn.Dropout(cfg.code_transformer.dropout)             # embedding dropout
        self.position_drop = nn.Dropout(cfg.position_transformer.dropout)
        self.code_transformer = Transformer(cfg.code_transformer)
        self.position_transformer = Transformer(cfg.position_transformer)
        # Bias-free heads after the stacks' final LayerNorms (the official heads are LN + Linear).
        self.code_head = nn.Linear(d, cfg.codebook_size, bias=False)
        self.position_head = nn.Linear(d, cfg.num_positions, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """normal(0, init_std) embeddings and heads (minGPT / the official code); each stack keeps
        its own GPT-2 init (residual projections scaled by ``1/sqrt(2 depth)``)."""
        std = self.config.init_std
        for w in (self.code_embed.weight, self.grid_embed.weight, self.class_embed.weight,
                  self.step_embed, self.code_head.weight, self.position_head.weight):
            nn.init.normal_(w, 0.0, std)
        self.code_transformer.init_weights(std)
        self.position_transformer.init_weights(std)

    # ---- conditions -------------------------------------------------------------------------

    def null_condition(self, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size,), -1, dtype=torch.long, device=self.step_embed.device)

    def _labels(self, condition, batch_size: int) -> torch.Tensor:
        """Class ids in ``[0, num_classes]`` (``-1`` / None -> the null class), ``[B]``."""
        y = class_labels(condition, batch_size, self.num_classes - 1, self.step_embed.device,
                         f"class labels must be in [-1, {self.num_classes})")
        return torch.where(y < 0, torch.full_like(y, self.num_classes), y)

    # ---- teacher forcing --------------------------------------------------------------------

    def _check(self, codes: torch.Tensor, positions: torch.Tensor | None) -> None:
        if positions is None:
            raise ValueError("Stackformer needs the kept positions (MQ-VAE tokens)")
        if codes.shape != positions.shape or codes.dim() != 2:
            raise ValueError(f"codes {tuple(codes.shape)} and positions {tuple(positions.shape)} "
                             "must both be [B, N]")
        if codes.shape[1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens, got {codes.shape[1]}")

    def _code_inputs(self, labels: torch.Tensor, codes: torch.Tensor,
                     positions: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Code-transformer inputs for steps ``start .. start + T - 1`` (0-based), where the
        step-0 input is the class token and the step-``i`` input is pair ``i - 1``. ``codes`` /
        ``positions`` hold the pairs feeding those steps (``[B, T]`` or ``[B, T - 1]`` with the
        class token first when ``start == 0``)."""
        parts = []
        if start == 0:
            parts.append(self.class_embed(labels)[:, None])
        if codes.shape[1]:
            parts.append(self.code_embed(codes) + self.grid_embed(positions))
        x = torch.cat(parts, 1)
        return self.drop(x + self.step_embed[start:start + x.shape[1]].to(x.dtype))

    def _condition_labels(self, condition, batch_size: int) -> torch.Tensor:
        labels = self._labels(condition, batch_size)
        if self.training and self.config.class_dropout > 0:
            drop = torch.rand(batch_size, device=labels.device) < self.config.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return labels

    def forward(self, codes: torch.Tensor, condition, positions: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: ``(code_logits [B, k, V], position_logits [B, k, h*w])``; row ``i``
        predicts ``codes[:, i]`` from (condition, pairs ``< i``) and ``positions[:, i]`` from
        (condition, pairs ``< i``, ``codes[:, i]``). Impossible positions are ``-inf``."""
        self._check(codes, positions)
        B, k = codes.shape
        labels = self._condition_labels(condition, B)
        h = self.code_transformer(self._code_inputs(labels, codes[:, :-1], positions[:, :-1]))
        g = self.position_transformer(self.position_drop(h + self.code_embed(codes)))
        code_logits = self.code_head(h)
        position_logits = self.position_head(g)
        prev = F.pad(positions[:, :-1], (1, 0), value=-1)
        allowed = position_mask(prev, torch.arange(k, device=codes.device), k, self.num_positions)
        return code_logits, position_logits.masked_fill(~allowed, float("-inf"))

    # ``loss`` (Prior's, model_zoo.interfaces.next_token_loss): ``code CE + position CE``
    # (unweighted, the official ``loss_position_weight`` 1.0). Positions must be sorted and
    # distinct (MQ-VAE's contract): an impossible target position has probability 0 under the
    # mask, so its CE is infinite.

    def features(self, codes: torch.Tensor, condition, layer: int,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
        """Code-transformer block ``layer`` output (no final norm) averaged over the ``k``
        teacher-forced steps (the class token and pairs ``1 .. k-1``), ``[B, D]``. Pass the null
        condition for a label-free linear probe."""
        self._check(codes, positions)
        depth = self.config.code_transformer.depth
        if not -depth <= layer < depth:
            raise ValueError(f"layer must be in [-{depth}, {depth})")
        labels = self._labels(condition, codes.shape[0])
        x = self._code_inputs(labels, codes[:, :-1], positions[:, :-1])
        return self.code_transformer(x, upto=layer).mean(1)

    # ---- sampling ---------------------------------------------------------------------------

    def _guide(self, logits: torch.Tensor, n: int, scale: float) -> torch.Tensor:
        """CFG over the ``[cond; uncond]`` rows, in fp32 (bf16 models too)."""
        logits = logits.float()
        return cfg_logits(logits[:n], logits[n:], scale) if logits.shape[0] > n else logits

    @torch.no_grad()
    def generate(self, condition, num_samples: int, sampling: SamplingConfig,
                 seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``(codes [n, k], positions [n, k])`` -- positions strictly increasing, in the
        grid, exactly ``k`` of them. Classifier-free guidance runs the conditional and the
        unconditional rows as one batch of ``2n`` and guides both heads. Codes are filtered by
        ``sampling.top_k`` / ``top_p``, positions by ``sampling.for_positions()``. Call in eval mode."""
        n, k, dev = num_samples, self.num_tokens, self.step_embed.device
        seeds, labels, scale = guided_rows(seeds, self._labels(condition, n), sampling, self.num_classes)
        rows = labels.shape[0]
        position_sampling = sampling.for_positions()
        codes = torch.zeros(n, k, dtype=torch.long, device=dev)
        positions = torch.zeros(n, k, dtype=torch.long, device=dev)
        prev = torch.full((n,), -1, dtype=torch.long, device=dev)
        caches = None
        if sampling.use_cache:
            dtype = self.step_embed.dtype
            caches = (self.code_transformer.new_cache(rows, k, dev, dtype),
                      self.position_transformer.new_cache(rows, k, dev, dtype))
        rep = rows // n                          # 2 with CFG: [cond rows; uncond rows]
        g_inputs = []                            # position-stack inputs, uncached path only
        for i in range(k):
            if caches is not None:               # only the newest pair goes in
                x = self._code_inputs(labels, codes[:, i - 1:i].repeat(rep, 1),
                                      positions[:, i - 1:i].repeat(rep, 1), start=i) if i \
                    else self._code_inputs(labels, codes[:, :0], positions[:, :0])
                h = self.code_transformer(x, cache=caches[0])[:, -1]
            else:                                # the whole prefix, every step
                x = self._code_inputs(labels, codes[:, :i].repeat(rep, 1),
                                      positions[:, :i].repeat(rep, 1))
                h = self.code_transformer(x)[:, -1]
            logits = self._guide(self.code_head(h), n, scale)
            codes[:, i] = sample_tokens(logits, sampling, seeds, 2 * i)

            g_in = (h + self.code_embed(codes[:, i].repeat(rep)))[:, None]
            if caches is not None:
                g = self.position_transformer(g_in, cache=caches[1])[:, -1]
            else:
                g_inputs.append(g_in)
                g = self.position_transformer(torch.cat(g_inputs, 1))[:, -1]
            logits = self._guide(self.position_head(g), n, scale)
            allowed = position_mask(prev, i, k, self.num_positions)
            positions[:, i] = sample_tokens(logits.masked_fill(~allowed, float("-inf")),
                                            position_sampling, seeds, 2 * i + 1)
            prev = positions[:, i]
        return codes, positions


# ---------------------------------------------------------------------------------------------
# Presets


STACKFORMER_BASE = StackformerConfig()
STACKFORMER_BASE_TINY = StackformerConfig(
    codebook_size=64, grid_size=(8, 8), num_tokens=16,
    code_transformer=TransformerConfig(width=64, depth=2, heads=2, mlp_dim=256),
    position_transformer=TransformerConfig(width=64, depth=2, heads=2, mlp_dim=256))


@register_model("stackformer-base", kind="prior", paper=STACKFORMER_PAPER)
def stackformer_base(**overrides) -> Stackformer:
    """The released class-conditional ImageNet Stackformer for ``mq-vae-f8`` tokens (12 + 12
    layers, width 1024, 16 heads): 307,794,944 parameters."""
    return Stackformer(replace_config(STACKFORMER_BASE, **overrides))


@register_model("stackformer-base-tiny", kind="prior", paper=STACKFORMER_PAPER)
def stackformer_base_tiny(**overrides) -> Stackformer:
    """CPU twin matching ``mq-vae-f8-tiny`` tokens (8 x 8 grid, 16 kept codes of 64)."""
    return Stackformer(replace_config(STACKFORMER_BASE_TINY, **overrides))


__all__ = ["StackformerConfig", "Stackformer", "position_mask"]
