"""VIM: Vector-quantized Image Modeling, the stage-2 prior over ViT-VQGAN codes.

Yu et al., "Vector-quantized Image Modeling with Improved VQGAN", ICLR 2022, arXiv:2110.04627,
sec. 4: a decoder-only transformer predicts the 32x32 = 1024 image tokens in raster order,
``p(z | y) = prod_i p(z_i | y, z_<i)``, trained by next-token cross-entropy.

* Sequence: ``[class token, code_1, ..., code_N]``; the output at slot ``i`` (0-based, slot 0 =
  class token) predicts ``code_{i+1}``, so teacher forcing feeds ``[class, code_1 .. code_{N-1}]``
  (``N`` slots) and ``forward`` returns ``[B, N, V]`` with ``logits[:, i]`` predicting
  ``codes[:, i]``.
* Class conditioning by the first token (a learned class embedding, ``num_classes + 1`` rows);
  unconditional generation is the extra null class ``num_classes`` (label ``-1`` maps to it). In
  training the label is replaced by the null class with probability ``class_dropout`` (applied in
  ``forward``, as the other priors drop their condition), so one network gives both branches of classifier-free guidance. Class dropout and
  guidance are vqscale's options, not the paper's (its class-conditional VIM has the class token
  and nothing else; the paper's recipes, pretrain/recipes.py, set ``class_dropout=0``); the
  config default 0.1 serves the CFG samplers of the demo and of ``vim-small``.
* Position embeddings: a learned table over the token grid, ``[N, D]``, row ``j`` added to slot
  ``j`` -- the slot whose output predicts grid cell ``j``. Every row is trained (the input
  ``code_N`` is never fed, so a table indexed by the input's own cell would leave a row unused).
* Pre-norm GPT blocks with a final LayerNorm (model_zoo/transformer.py), dropout 0.1, attention
  through ``F.scaled_dot_product_attention``; a bias-free linear head to ``codebook_size`` logits.
  Untied by default (``tie_embeddings=False``): the paper does not say, and untying costs only
  ``V x D`` parameters (12.6M of vim-base's 708M) while letting the input table and the output
  classifier specialize; ``tie_embeddings=True`` shares the token table with the head.

Generation keeps a KV cache (prefill the class token, then one token per step); classifier-free
guidance runs the conditional and unconditional rows in one batch of ``2n`` and mixes
``uncond + s * (cond - uncond)``; each sample draws from its own counter-based noise
(model_zoo/sampling.py), so its tokens do not depend on the batch or the number of processes.
``features(codes, y, layer)`` is block ``layer``'s residual stream averaged over the code slots
(class token excluded), the paper's linear-probe protocol (sec. 5.2: "average ... intermediate
features", probed per layer). The paper probes an unconditional VIM at a middle block: block 10 of
24 (Base) and 15 of 36 (Large) (:data:`PAPER_PROBE_BLOCKS`; issue 19's reading of the paper).

Parameter counts, measured on the meta device (grid 32x32, codebook 8192, 1000 classes, untied):

==========  ======  =====  =====  =====  ==============  ==========
preset      layers  width  heads  MLP    measured        paper
==========  ======  =====  =====  =====  ==============  ==========
vim-small   12      768    12     3072      99,194,112   (no small VIM in the paper)
vim-base    24      1536   16     6144     708,235,776   ~650M
vim-large   36      2048   32     8192   1,850,603,520   ~1.7B
==========  ======  =====  =====  =====  ==============  ==========

The blocks alone are 24 x 28.33M = 680.0M (Base) and 36 x 50.36M = 1,812.9M (Large), already
above the paper's totals before any embedding (token and head tables 8192 x D each, class table
1001 x D, position table 1024 x D), so the paper evidently counted differently (or rounded); the
architecture is not bent to hit its numbers. With tied embeddings: vim-small 92,902,656, vim-base
695,652,864, vim-large 1,833,826,304. Tiny twins (grid 4x4, codebook 64, 10 classes, untied):
vim-small-tiny 110,016, vim-base-tiny 238,752, vim-large-tiny 614,912 parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .interfaces import Prior, class_labels
from .registry import register_model
from .sampling import SamplingConfig, cfg_logits, guided_rows, sample_tokens
from .transformer import Transformer, TransformerConfig
from .vqgan import replace_config

PAPER = "Yu et al. 2021, Vector-quantized Image Modeling with Improved VQGAN, arXiv:2110.04627"

# The block the paper's linear probe reads, per preset: (block, of depth), counted from 1 as the
# paper counts ("block 10 of 24"), so ``features(..., layer=block - 1)``. Issue 19's reading of the
# paper (sec. 5.2), not re-checked against the PDF here; the all-block sweep finds the best block.
PAPER_PROBE_BLOCKS: dict[str, tuple[int, int]] = {"vim-base": (10, 24), "vim-large": (15, 36)}


@dataclass(frozen=True)
class VIMConfig:
    codebook_size: int = 8192
    grid_size: tuple[int, int] = (32, 32)
    num_classes: int = 1000
    transformer: TransformerConfig = field(default_factory=lambda: TransformerConfig(
        width=1536, depth=24, heads=16, mlp_dim=6144, dropout=0.1))
    class_dropout: float = 0.1      # P(label -> null class) in training, for CFG (vqscale's; the paper: 0)
    tie_embeddings: bool = False    # share the token embedding with the output head
    init_std: float = 0.02          # GPT-2 init of embeddings, position table and head

    def __post_init__(self) -> None:
        if self.transformer.cross_attention:
            raise ValueError("VIM is conditioned by its class token; it has no cross-attention")
        if not 0.0 <= self.class_dropout <= 1.0:
            raise ValueError(f"class_dropout must be in [0, 1], got {self.class_dropout}")
        if self.num_tokens < 2:
            raise ValueError(f"grid_size {self.grid_size} must hold at least 2 tokens")

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]


class VIM(Prior):
    """Class-conditional decoder-only transformer over ``N`` raster-order codes."""

    def __init__(self, cfg: VIMConfig):
        super().__init__()
        self.config = cfg
        self.codebook_size, self.num_classes = cfg.codebook_size, cfg.num_classes
        self.grid_size, self.num_tokens = tuple(cfg.grid_size), cfg.num_tokens
        self.null_class = cfg.num_classes
        d = cfg.transformer.width
        self.tok_embed = nn.Embedding(cfg.codebook_size, d)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, d)           # + the null class
        self.pos_embed = nn.Parameter(torch.empty(cfg.num_tokens, d))
        self.drop = nn.Dropout(cfg.transformer.dropout)
        self.transformer = Transformer(cfg.transformer)
        self.head = nn.Linear(d, cfg.codebook_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_embed.weight
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialize every weight (also after ``to_empty`` from the meta device)."""
        std = self.config.init_std
        self.transformer.init_weights(std)
        for w in (self.tok_embed.weight, self.class_embed.weight, self.pos_embed, self.head.weight):
            nn.init.normal_(w, 0.0, std)

    # ---- inputs -----------------------------------------------------------------------------

    @property
    def _device(self) -> torch.device:
        return self.pos_embed.device

    def null_condition(self, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size,), -1, dtype=torch.long, device=self._device)

    def _labels(self, condition, batch_size: int) -> torch.Tensor:
        """Class ids ``[B]`` in ``[0, num_classes]``: ``-1`` (or None) -> the null class; a single
        label is broadcast to the batch."""
        y = class_labels(condition, batch_size, self.num_classes, self._device,
                         f"labels must be in [-1, {self.num_classes}] (-1 / {self.num_classes} = unconditional)")
        return torch.where(y < 0, torch.full_like(y, self.null_class), y)

    def _embed(self, labels: torch.Tensor | None, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Inputs for slots ``start .. start + T - 1``: slot 0 is the class token (``labels``),
        slot ``j >= 1`` holds ``code_j``; ``codes [B, *]`` are the codes of the non-class slots."""
        x = self.tok_embed(codes)
        if start == 0:
            x = torch.cat([self.class_embed(labels)[:, None].to(x.dtype), x], dim=1)
        return self.drop(x + self.pos_embed[start: start + x.shape[1]])

    def _check(self, codes: torch.Tensor, positions: torch.Tensor | None) -> None:
        if positions is not None:
            raise ValueError("VIM models every grid position; positions must be None")
        if codes.dim() != 2 or codes.shape[1] != self.num_tokens:
            raise ValueError(f"expected codes [B, {self.num_tokens}], got {tuple(codes.shape)}")

    # ---- training ---------------------------------------------------------------------------

    def forward(self, codes: torch.Tensor, condition, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: ``[B, N, V]`` logits, row ``i`` predicting ``codes[:, i]``; in training
        mode each label is replaced by the null class with probability ``class_dropout``."""
        self._check(codes, positions)
        labels = self._labels(condition, codes.shape[0])
        if self.training and self.config.class_dropout > 0:
            # condition dropout for classifier-free guidance (-1 = the null class), in training mode
            drop = torch.rand(labels.shape, device=labels.device) < self.config.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return self.head(self.transformer(self._embed(labels, codes[:, :-1])))

    def features(self, codes: torch.Tensor, condition, layer: int,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
        """Block ``layer``'s output (before the final norm; negative counts from the end) averaged
        over the code slots ``code_1 .. code_{N-1}`` of the teacher-forced input (the class token
        excluded), ``[B, D]``. The blocks above ``layer`` are not run. Pass the null condition
        (``-1``) for a label-free probe."""
        self._check(codes, positions)
        labels = self._labels(condition, codes.shape[0])
        h = self.transformer(self._embed(labels, codes[:, :-1]), upto=layer)
        return h[:, 1:].mean(dim=1)

    # ---- sampling ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, condition, num_samples: int, sampling: SamplingConfig, seeds: torch.Tensor,
                 on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Sample ``[num_samples, N]`` codes. ``seeds [num_samples]`` (``sampling.sample_seeds``)
        fix each sample's noise; ``on_step(i, logits [n, V])`` (optional) sees the guided logits
        of every step before temperature and filtering. Runs in eval mode (dropout off) and
        restores the previous mode."""
        n, N, dev = int(num_samples), self.num_tokens, self._device
        # with guidance, the conditional and unconditional halves as one batch
        seeds, labels, scale = guided_rows(seeds, self._labels(condition, n), sampling, self.null_class)
        rows, rep = labels.shape[0], labels.shape[0] // n
        codes = torch.zeros(n, N, dtype=torch.long, device=dev)
        cache = self.transformer.new_cache(rows, N, dev, self.pos_embed.dtype) if sampling.use_cache else None
        was_training = self.training
        self.eval()
        try:
            for i in range(N):
                if cache is None:            # recompute the whole prefix (reference / benchmark)
                    h = self.transformer(self._embed(labels, codes[:, :i].repeat(rep, 1)))[:, -1]
                elif i == 0:                 # prefill: the class token
                    h = self.transformer(self._embed(labels, codes[:, :0].repeat(rep, 1)), cache=cache)[:, -1]
                else:                        # one new token, attending to the cached prefix
                    x = self._embed(None, codes[:, i - 1: i].repeat(rep, 1), start=i)
                    h = self.transformer(x, cache=cache)[:, -1]
                logits = self.head(h)
                logits = logits if logits.dtype == torch.float64 else logits.float()
                if rows > n:
                    logits = cfg_logits(logits[:n], logits[n:], scale)
                if on_step is not None:
                    on_step(i, logits)
                codes[:, i] = sample_tokens(logits, sampling, seeds, i)
        finally:
            self.train(was_training)
        return codes


# ---------------------------------------------------------------------------------------------
# Presets. The paper's VIM-Base and VIM-Large (sec. 4 / Table 3), a 12-layer vim-small for cheap
# runs and benchmarks, and "-tiny" CPU twins (4x4 grid, 64 codes, 10 classes).

_SIZES = {
    "small": TransformerConfig(width=768, depth=12, heads=12, mlp_dim=3072, dropout=0.1),
    "base": TransformerConfig(width=1536, depth=24, heads=16, mlp_dim=6144, dropout=0.1),
    "large": TransformerConfig(width=2048, depth=36, heads=32, mlp_dim=8192, dropout=0.1),
}
_TINY_SIZES = {
    "small": TransformerConfig(width=64, depth=2, heads=2, mlp_dim=256, dropout=0.1),
    "base": TransformerConfig(width=96, depth=2, heads=3, mlp_dim=384, dropout=0.1),
    "large": TransformerConfig(width=128, depth=3, heads=4, mlp_dim=512, dropout=0.1),
}


def _build(size: str, tiny: bool, overrides: dict) -> VIM:
    if tiny:
        cfg = VIMConfig(codebook_size=64, grid_size=(4, 4), num_classes=10, transformer=_TINY_SIZES[size])
    else:
        cfg = VIMConfig(transformer=_SIZES[size])
    return VIM(replace_config(cfg, **overrides))


@register_model("vim-small", kind="prior", paper=PAPER)
def vim_small(**overrides) -> VIM:
    """12 layers, width 768, 12 heads, MLP 3072 (not in the paper: a cheap VIM for small runs)."""
    return _build("small", False, overrides)


@register_model("vim-base", kind="prior", paper=PAPER)
def vim_base(**overrides) -> VIM:
    """VIM-Base: 24 layers, width 1536, 16 heads, MLP 6144; 32x32 tokens, 8192 codes, 1000 classes."""
    return _build("base", False, overrides)


@register_model("vim-large", kind="prior", paper=PAPER)
def vim_large(**overrides) -> VIM:
    """VIM-Large: 36 layers, width 2048, 32 heads, MLP 8192."""
    return _build("large", False, overrides)


@register_model("vim-small-tiny", kind="prior", paper=PAPER)
def vim_small_tiny(**overrides) -> VIM:
    """CPU twin of vim-small: width 64, 2 layers, 2 heads; 4x4 grid, 64 codes, 10 classes."""
    return _build("small", True, overrides)


@register_model("vim-base-tiny", kind="prior", paper=PAPER)
def vim_base_tiny(**overrides) -> VIM:
    """CPU twin of vim-base: width 96, 2 layers, 3 heads."""
    return _build("base", True, overrides)


@register_model("vim-large-tiny", kind="prior", paper=PAPER)
def vim_large_tiny(**overrides) -> VIM:
    """CPU twin of vim-large: width 128, 3 layers, 4 heads."""
    return _build("large", True, overrides)
