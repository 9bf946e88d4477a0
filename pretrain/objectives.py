"""Training objectives: what a step computes from a batch, so that ONE Trainer loop serves both
stages (torchtitan style: the loop owns engines, data, checkpoints; the objective owns the loss).

The contract with the Trainer (:mod:`pretrain.step`): each objective subclasses
:class:`pretrain.step.Objective`, names its engines in ``models`` and yields, per micro-batch, the
loss of each engine in ``updates``; the inherited ``train_step(engines, micro_batches, step)`` runs
the backward and optimizer step of every loss and returns a :class:`pretrain.step.StepReport`.
``__call__(models, batch, step) -> (loss, metrics)`` is the trained model's loss of one batch
(what ``updates`` yields for it); ``validation`` and ``visuals`` complete the interface.

The engines (the ``models`` argument) map those names to plain modules or wrappers keeping the
model in ``.module`` (DeepSpeed engines, DDP). Every training forward goes through the wrapper's
``forward``: DeepSpeed's
``engine.forward`` does bookkeeping that ZeRO-3 needs (measured with DeepSpeed 0.19.8, 2 ranks,
gradient accumulation 2: calling ``engine.module.loss`` directly leaves the ZeRO-3 update 2e-2 off a
plain-torch reference, the forward route matches it to 1e-8; ZeRO-2 is exact both ways), and DDP
needs it too. ``set_step`` and ``generate`` are called on the unwrapped model (sampling under
ZeRO-3 gathers the parameters first). Metrics are detached 0-dim tensors (no host sync per step).
Tokenizers return dataclasses (``TokenizerOutput``/``QuantizerOutput``); DeepSpeed's hooks only
walk tensors, tuples, lists and dicts, so :func:`pretrain.runtime.build_engine` teaches them
dataclasses (without it a ZeRO-3 tokenizer fails in backward). Both stages run at any ZeRO stage;
tokenizers at ZeRO-3 match ZeRO-2 bit for bit in fp32 (tests/test_zero3_tokenizer.py).

:class:`TokenizerObjective` (stage 1) adds, each with its weight from :class:`TokenizerLossConfig`:

- reconstruction: ``l2`` and ``l1`` on ``recon``; ``logit_laplace`` when the tokenizer returns
  ``extra["logit_laplace_params"]`` (ViT-VQGAN; ``losses.logit_laplace_nll`` with the tokenizer's eps);
- ``perceptual``: LPIPS (``model_zoo.losses.LPIPS``), mean over the batch;
- ``quantizer``: ``quant.loss`` exactly as the quantizer returns it, i.e. ``codebook + beta *
  commitment`` (beta = the quantizer config's, 0.25 by default; EMA codebooks have no codebook
  term; Gumbel adds its own weighted KL). The objective never re-weights commitment: its weight is
  the quantizer's ``beta``; ``loss/commitment`` and ``loss/codebook`` are logged unweighted;
- Regularized VQ: ``prior_kl * quant.losses["prior_kl"]`` (returned unweighted by the quantizer,
  not in ``quant.loss``) and ``contrastive *`` the probabilistic contrastive loss (eq. 3 of the
  paper, ``losses.ProbabilisticContrastiveLoss``) on frozen VGG-19 features of (recon, input),
  positives weighted by ``quant.sample_distances`` (``||z_s - z_q||^2``, sampled vs best-matching
  code) on the token grid (masked tokenizers: scattered to their kept positions, 0 elsewhere);
- MQ-VAE: nothing else: ``MQVAE.forward`` returns no loss terms (``extra`` holds ``mask_scores``
  and ``keep_mask``; top-k keeps exactly k positions, so the code-ratio loss of the official
  budget variant has nothing to control). Its objective is the VQGAN one (L1 + LPIPS + quantizer);
  ``mqvae/score_mean`` is logged.

  total = l1 L1 + l2 L2 + logit_laplace NLL + perceptual LPIPS + quantizer quant.loss
          + prior_kl KL + contrastive PCL   [+ adversarial term: see below]

Adversarial hook: :meth:`TokenizerObjective.adversarial_term` gets the reconstruction loss
``nll`` (the weighted pixel + perceptual terms, with graph) and returns None here. The GAN
objective (:class:`pretrain.gan.GANTokenizerObjective`, ``models = ("generator",
"discriminator")``) overrides it to return ``cfg.adversarial * adaptive_weight * g`` with
``g = losses.g_loss(D(recon))`` (D with detached weights, the adaptive weight computed so that
it works under ZeRO; see that module), and adds the discriminator's loss for the second engine.
Passing a "discriminator" to this objective raises instead of silently training without one.

:class:`PriorObjective` (stage 2): the prior's own loss, ``model_zoo.interfaces.next_token_loss``
of the teacher-forced output of its ``forward`` (called through the engine): code CE, plus
position CE for Stackformer (official weight 1.0). Every prior drops its condition in ``forward``
in training mode (classifier-free guidance). The condition comes from the batch: class labels
(``label``, -1 = unconditional) or, for the text prior, cached per-token embeddings
(``text_embedding`` + ``text_mask``), else ``text_tokens`` (tokenized in the
loader's workers by a :class:`CaptionTokenizer`), else ``caption`` strings tokenized here.
Metrics: the CE terms, token accuracy and bits per token.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_zoo import losses as L
from model_zoo.interfaces import TokenizerOutput, next_token_loss
from model_zoo.registry import create_model
from model_zoo.sampling import SamplingConfig, sample_seeds

from .distributed import rank_world
from .runtime import gathered
from .step import Objective

__all__ = ["TokenizerLossConfig", "PriorLossConfig", "TokenizerObjective", "PriorObjective",
           "CaptionTokenizer", "build_objective", "unwrap", "COLLAPSE_METRIC", "CollapseWatch", "LOSS_PRESETS"]

COLLAPSE_METRIC = "codebook/collapse_warning"   # 1.0 when codebook usage is below the threshold
_LN2 = math.log(2.0)
# the prior's loss terms as metrics
_PRIOR_METRIC = {"code_ce": "loss/code_ce", "code_accuracy": "accuracy/code", "position_ce": "loss/position_ce",
                 "position_accuracy": "accuracy/position"}


class CollapseWatch:
    """When to warn about codebook collapse: the flag (:data:`COLLAPSE_METRIC`) set at ``persist``
    consecutive log points, then at most once per ``every`` steps while it stays set.

    One flagged log point is not collapse. The first training step measures the initial codebook
    (random codes that ``data_init`` replaces after that very step; a fresh FSQ/LFQ projection whose
    outputs all round to one code), and one batch can dip; a collapsed codebook stays collapsed, so
    it is still reported, one log interval later."""

    def __init__(self, every: int, persist: int = 2):
        self.every, self.persist = every, persist
        self._streak, self._warned = 0, -10**9

    def update(self, step: int, flagged: bool) -> bool:
        self._streak = self._streak + 1 if flagged else 0
        if self._streak >= self.persist and step - self._warned >= self.every:
            self._warned = step
            return True
        return False


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DeepSpeed engine / DDP wrapper (both keep it in ``.module``)."""
    return getattr(model, "module", model)


def _device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _model_input(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` in the model's parameter dtype (DeepSpeed's bf16 mode casts the module, not its inputs)."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return x if p is None else x.to(p.dtype)


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module):
    """Eval mode (no dropout, no EMA/restart updates in the quantizer), then the previous modes."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, was in zip(modules, modes):
            m.train(was)


# ---------------------------------------------------------------------------- stage 1: tokenizers

@dataclass(frozen=True)
class TokenizerLossConfig:
    """Weights of the stage-1 terms. Defaults are ViT-VQGAN's (Yu et al. 2021, sec. 3.3 / 4.1):
    ``L2 1.0 + perceptual 0.1 + logit-Laplace 0.1 (+ adversarial 0.1)``, commitment ``beta = 0.25``
    inside the quantizer (``QuantizerConfig.beta``; ``quantizer`` weighs ``quant.loss`` as a
    whole and stays 1.0). A weight of 0 removes its term (not computed, not logged)."""

    l1: float = 0.0
    l2: float = 1.0
    logit_laplace: float = 0.1
    logit_laplace_eps: float | None = None   # None: the tokenizer's own (config.logit_laplace_eps), else 0.1
    perceptual: float = 0.1
    perceptual_pretrained: bool = True       # LPIPS / VGG-19 weights from the cache/path (False: random; tests)
    quantizer: float = 1.0
    prior_kl: float = 0.0                    # Regularized VQ prior distribution regularization
    contrastive: float = 0.0                 # Regularized VQ probabilistic contrastive loss
    contrastive_patches: int = 256           # L, PatchNCE positions per layer (CUT's num_patches)
    contrastive_tau: float = 0.07            # PatchNCE temperature (CUT's nce_T)
    adversarial: float = 0.1                 # used by the GAN objective (pretrain/gan.py), not here
    collapse_warning_usage: float = 0.05     # warn below this fraction of the codes the batch could use
    num_visuals: int = 8

    @classmethod
    def for_tokenizer(cls, name: str) -> "TokenizerLossConfig":
        """The paper preset for a registry name (:data:`LOSS_PRESETS`, by name prefix)."""
        for prefix in ("vit-vqgan", "regvq", "mq-vae", "vqgan"):   # "vqgan" last: a suffix of "vit-vqgan"
            if name.startswith(prefix):
                return cls(**LOSS_PRESETS[prefix])
        raise ValueError(f"no loss preset for tokenizer {name!r}; known prefixes: {sorted(LOSS_PRESETS)}")


# taming-transformers' VQLPIPSWithDiscriminator: L1 + LPIPS 1.0, codebook weight 1.0,
# discriminator weight 0.8 (times the adaptive weight).
_TAMING = dict(l1=1.0, l2=0.0, logit_laplace=0.0, perceptual=1.0, adversarial=0.8)
LOSS_PRESETS: dict[str, dict[str, float]] = {
    "vit-vqgan": {},            # the defaults: ViT-VQGAN
    "vqgan": _TAMING,
    # Regularized VQ: the VQGAN objective plus its prior KL (eq. 1) and probabilistic contrastive
    # loss (eq. 3, on 256 patches per VGG-19 layer at temperature 0.07: CUT's num_patches and nce_T,
    # the PatchNCE the paper builds on). Neither weight is stated in the paper's text available
    # offline (no released code or config): eq. (3) at 1.0 as the paper adds its terms; the KL at
    # 0.03, measured: at 1.0 (and 0.1) the tiny VQGAN of tests/test_regvq.py reconstructs digits
    # about 2 dB (1.5 dB) below plain VQ, at 0.03 every code stays in use at a smaller cost.
    "regvq": {**_TAMING, "prior_kl": 0.03, "contrastive": 1.0},
    # MQ-VAE's released stage-1 config (mqvae_imagenet_f8_r30): taming's loss, disc_weight 0.75
    # (times the adaptive weight, the product clamped to disc_weight_max 1.0: the recipe's
    # discriminator.adaptive_weight_max).
    "mq-vae": {**_TAMING, "adversarial": 0.75},
}


def psnr(recon: Tensor, target: Tensor) -> Tensor:
    """Mean PSNR (dB) over the batch of images in [-1, 1] (recon clamped to the range)."""
    r = (recon.detach().float().clamp(-1, 1) + 1) / 2
    t = (target.detach().float().clamp(-1, 1) + 1) / 2
    mse = (r - t).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1.0 / mse)).mean()


def distance_grid(out: TokenizerOutput, grid_size: tuple[int, int]) -> Tensor:
    """The contrastive loss's weights ``quant.sample_distances`` as ``[B, h, w]`` on the token grid
    (zeros for a quantizer that samples nothing: uniform weights). Masked tokenizers (MQ-VAE)
    quantize only their kept positions: the others get 0."""
    d = out.quant.sample_distances
    if d is None:
        d = torch.zeros_like(out.quant.distances)
    h, w = grid_size
    d = d.reshape(d.shape[0], -1).float()
    if out.tokens.positions is not None:
        d = d.new_zeros(d.shape[0], h * w).scatter(1, out.tokens.positions.to(d.device), d)
    return d.view(d.shape[0], h, w)


class TokenizerObjective(Objective):
    """Stage-1 objective (module docstring). ``perceptual``: an LPIPS instance to use, else one is
    built when a perceptual weight is set; ``contrastive_features``: the VGG-19 of the contrastive
    loss, else one is built when a contrastive weight is set (both ``cfg.perceptual_pretrained``)."""

    models: tuple[str, ...] = ("model",)

    def __init__(self, cfg: TokenizerLossConfig | None = None, perceptual: L.LPIPS | None = None,
                 contrastive_features: nn.Module | None = None):
        self.cfg = cfg = cfg or TokenizerLossConfig()
        self.lpips = perceptual if perceptual is not None or cfg.perceptual <= 0 else L.LPIPS(
            pretrained=cfg.perceptual_pretrained)
        self.vgg19 = contrastive_features if contrastive_features is not None or cfg.contrastive <= 0 else (
            L.VGG19Features(pretrained=cfg.perceptual_pretrained))
        self.contrastive_loss = L.ProbabilisticContrastiveLoss(cfg.contrastive_patches, cfg.contrastive_tau)
        self._warned: set[str] = set()

    # ---- the pieces ------------------------------------------------------------------------------

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, stacklevel=3)

    @staticmethod
    def _on(net: nn.Module, device: torch.device) -> nn.Module:
        if _device(net) != device:
            net.to(device)
        return net

    @staticmethod
    def _pair_features(features, recon: Tensor, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """One pass of ``features`` over [recon; input]: (recon features, input features)."""
        f = features(torch.cat([recon, images.to(recon.dtype)], 0))
        n = recon.shape[0]
        return [t[:n] for t in f], [t[n:] for t in f]

    @staticmethod
    def _images(batch: dict) -> Tensor:
        x = batch["image"]
        return x if x.is_floating_point() else x.float() / 127.5 - 1.0   # uint8 straight from workers

    def losses(self, out: TokenizerOutput, images: Tensor, grid_size: tuple[int, int],
               logit_laplace_eps: float = 0.1) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(total, nll, terms)`` for a tokenizer output: ``terms`` are the UNWEIGHTED terms
        (with graph) whose weight is non-zero, ``nll`` the weighted reconstruction part (pixel +
        perceptual: what an adaptive GAN weight balances), ``total`` the weighted sum of all."""
        cfg, recon = self.cfg, out.recon
        terms: dict[str, Tensor] = {}
        if cfg.l2 > 0:
            terms["l2"] = L.l2_loss(recon, images)
        if cfg.l1 > 0:
            terms["l1"] = L.l1_loss(recon, images)
        params = out.extra.get("logit_laplace_params")
        if cfg.logit_laplace > 0 and params is not None:
            mu, log_b = L.split_logit_laplace(params)
            terms["logit_laplace"] = L.logit_laplace_nll(images, mu, log_b, eps=logit_laplace_eps)
        if cfg.perceptual > 0:
            lp = self._on(self.lpips, recon.device)
            terms["perceptual"] = lp.distance_from_features(*self._pair_features(lp.features, recon, images)).mean()
        if cfg.quantizer > 0:
            terms["quantizer"] = out.quant.loss.float()
        if cfg.prior_kl > 0:
            if "prior_kl" in out.quant.losses:
                terms["prior_kl"] = out.quant.losses["prior_kl"]
            else:
                self._warn_once("prior_kl", "prior_kl weight is set but the quantizer computes no prior KL "
                                            "(QuantizerConfig.prior_kl=False): the term is skipped")
        if cfg.contrastive > 0:
            feats = self._pair_features(self._on(self.vgg19, recon.device), recon, images)
            terms["contrastive"] = self.contrastive_loss(*feats, distance_grid(out, grid_size))
        weight = {"l2": cfg.l2, "l1": cfg.l1, "logit_laplace": cfg.logit_laplace, "perceptual": cfg.perceptual,
                  "quantizer": cfg.quantizer, "prior_kl": cfg.prior_kl, "contrastive": cfg.contrastive}
        zero = recon.new_zeros((), dtype=torch.float32)
        nll = sum((weight[k] * terms[k] for k in ("l2", "l1", "logit_laplace", "perceptual") if k in terms), zero)
        total = nll + sum((weight[k] * terms[k] for k in ("quantizer", "prior_kl", "contrastive") if k in terms), zero)
        return total, nll, terms

    def adversarial_term(self, models: dict[str, nn.Module], out: TokenizerOutput, images: Tensor,
                         nll: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]] | None:
        """Hook for the GAN objective (module docstring): returns ``(weighted g term, metrics)``
        to add to the generator's loss, or None. Not implemented here."""
        if "discriminator" in models:
            raise NotImplementedError("the adversarial game is not implemented by TokenizerObjective; "
                                      "use the GAN objective")
        return None

    def _metrics(self, out: TokenizerOutput, images: Tensor, total: Tensor,
                 terms: dict[str, Tensor], codebook_size: int, training: bool) -> dict[str, Tensor]:
        m = {"loss": total.detach()}
        m.update({f"loss/{k}": v.detach().float() for k, v in terms.items()})
        for k in ("codebook", "commitment", "gumbel_kl", "entropy", "per_sample_entropy", "batch_entropy"):
            # parts of quant.loss, unweighted (the last three: LFQ's entropy loss)
            if k in out.quant.losses:
                m[f"loss/{k}"] = out.quant.losses[k].detach().float()
        if "prior_kl" in out.quant.losses and "loss/prior_kl" not in m:   # computed, not weighted
            m["codebook/prior_kl"] = out.quant.losses["prior_kl"].detach().float()
        stats = {k: v.detach().float() for k, v in out.quant.stats.items()}
        for k, v in stats.items():
            m[f"codebook/{k}"] = v
        if "dead_codes" in stats:
            m["codebook/dead_fraction"] = stats["dead_codes"] / codebook_size
        if "usage" in stats:
            # Usage is of the batch (all-reduced over ranks in training, local in eval); n tokens
            # can use at most n codes, so the warning compares with what the batch could have used.
            tokens = out.quant.codes.numel() * (rank_world()[1] if training else 1)
            possible = min(1.0, tokens / codebook_size)
            m["codebook/usage_of_possible"] = stats["usage"] / possible
            m[COLLAPSE_METRIC] = (m["codebook/usage_of_possible"] < self.cfg.collapse_warning_usage).float()
        m["psnr"] = psnr(out.recon, images)
        if "mask_scores" in out.extra:
            m["mqvae/score_mean"] = out.extra["mask_scores"].detach().float().mean()
        return m

    def _step(self, models: dict[str, nn.Module], batch: dict, step: int):
        model = models[self.models[0]]
        tok = unwrap(model)
        if hasattr(tok, "set_step"):
            tok.set_step(step)     # Gumbel temperature schedule
        images = self._images(batch).to(_device(tok))     # float32 targets of the losses
        out = model(_model_input(tok, images))
        eps = self.cfg.logit_laplace_eps
        if eps is None:
            eps = getattr(getattr(tok, "config", None), "logit_laplace_eps", 0.1)
        if self.cfg.logit_laplace > 0 and "logit_laplace_params" not in out.extra:
            self._warn_once("logit_laplace", f"{type(tok).__name__} returns no logit-Laplace parameters: "
                                             "the logit_laplace term is skipped")
        total, nll, terms = self.losses(out, images, tok.grid_size, eps)
        metrics = self._metrics(out, images, total, terms, tok.codebook_size, tok.training)
        # ---- adversarial hook: a GAN objective adds cfg.adversarial * adaptive_weight * g_loss here.
        adv = self.adversarial_term(models, out, images, nll, step)
        if adv is not None:
            total = total + adv[0]
            metrics.update(adv[1])
            metrics["loss"] = total.detach()
        return total, metrics, out, images

    # ---- the interface ---------------------------------------------------------------------------

    def __call__(self, models: dict[str, nn.Module], batch: dict, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        total, metrics, _, _ = self._step(models, batch, step)
        return total, metrics

    def updates(self, models: dict[str, nn.Module], batch: dict, step: int):
        yield (self.models[0], *self(models, batch, step))

    def validation(self, models: dict[str, nn.Module], batch: dict, step: int) -> dict[str, float]:
        with _eval_mode(models[self.models[0]]):
            _, metrics, _, _ = self._step(models, batch, step)
        return {k: float(v) for k, v in metrics.items()}

    def visuals(self, models: dict[str, nn.Module], batch: dict) -> dict[str, Tensor]:
        """``reconstruction``: input | recon side by side, ``[n, 3, H, 2W]``; masked tokenizers
        add a third panel, the input with the dropped grid positions dimmed."""
        model = models[self.models[0]]
        n = min(self.cfg.num_visuals, len(batch["image"]))
        images = self._images(batch)[:n].to(_device(unwrap(model)))
        with _eval_mode(model):
            out = model(_model_input(unwrap(model), images))
        panels = [images.float(), out.recon.float().clamp(-1, 1)]
        keep = out.extra.get("keep_mask")
        if keep is not None:
            h, w = unwrap(model).grid_size
            m = F.interpolate(keep.float().view(n, 1, h, w), size=images.shape[-2:], mode="nearest")
            panels.append((images.float() + 1) * (0.25 + 0.75 * m) - 1)
        return {"reconstruction": torch.cat(panels, dim=-1).cpu()}


# -------------------------------------------------------------------------------- stage 2: priors

@dataclass(frozen=True)
class PriorLossConfig:
    """Stage 2 is next-token cross-entropy as each prior's ``loss`` defines it (VIM and the text
    prior: code CE; Stackformer: code CE + position CE with the official weight 1.0). Condition
    dropout is each prior's own config (``class_dropout`` / ``caption_dropout``, default 0.1, for
    classifier-free guidance); VIM's and Stackformer's are vqscale's options, not their papers',
    and their paper recipes turn them off (``model.class_dropout=0``).
    ``condition="unconditional"`` trains every sample with the null condition (the paper's
    unconditional VIM, ``vim-base-uncond``). The ``visual_*`` fields set the few samples drawn by
    :meth:`PriorObjective.visuals` (same seeds every time); ``visual_position_top_k`` /
    ``visual_position_top_p`` filter Stackformer's position draws (None: as its codes)."""

    condition: Literal["auto", "unconditional"] = "auto"
    num_visuals: int = 4
    visual_seed: int = 0
    visual_temperature: float = 1.0
    visual_top_k: int = 0
    visual_top_p: float = 1.0
    visual_guidance_scale: float = 1.0
    visual_position_top_k: int | None = None
    visual_position_top_p: float | None = None


class CaptionTokenizer:
    """Picklable captions -> ``text_tokens`` for a loader's workers (the spec tokenizes captions
    there). Built from the text encoder's registry name and overrides (``for_prior(prior)``); the
    encoder is built on the meta device (no weights, no memory) only to get its tokenizer, the very
    one ``prior.text_encoder.tokenize`` uses. ``__call__(batch)`` returns the batch with
    ``text_tokens [B, L]``; ``wrap(collate)`` tokenizes after a collate function in the worker."""

    def __init__(self, text_encoder: str, overrides: dict[str, Any] | None = None):
        self.text_encoder, self.overrides = text_encoder, dict(overrides or {})
        self._encoder = None

    @classmethod
    def for_prior(cls, prior: nn.Module) -> "CaptionTokenizer":
        cfg = unwrap(prior).config
        return cls(cfg.text_encoder, dict(cfg.text_encoder_overrides))

    def __getstate__(self) -> dict[str, Any]:
        return {"text_encoder": self.text_encoder, "overrides": self.overrides, "_encoder": None}

    def tokenize(self, captions: list[str]) -> Tensor:
        if self._encoder is None:
            with torch.device("meta"):
                self._encoder = create_model(self.text_encoder, **self.overrides)
        return self._encoder.tokenize(list(captions))

    def __call__(self, batch: dict) -> dict:
        return {**batch, "text_tokens": self.tokenize(batch["caption"])}

    def wrap(self, collate):
        """``collate`` followed by tokenization, picklable when ``collate`` is (module-level)."""
        return functools.partial(_collate_then_tokenize, collate, self)


def _collate_then_tokenize(collate, text_tokenizer: CaptionTokenizer, samples: list) -> dict:
    return text_tokenizer(collate(samples))


def _is_text_prior(prior: nn.Module) -> bool:
    return hasattr(prior, "text_encoder") and hasattr(prior, "encode_condition")


class PriorObjective(Objective):
    """Stage-2 objective (module docstring). ``image_tokenizer`` (optional, any Tokenizer matching the
    prior's codes) decodes the samples of :meth:`visuals`; without it ``visuals`` returns {}."""

    models: tuple[str, ...] = ("model",)

    def __init__(self, cfg: PriorLossConfig | None = None, image_tokenizer: nn.Module | None = None):
        self.cfg = cfg or PriorLossConfig()
        self.image_tokenizer = image_tokenizer
        self._warned = False

    def condition(self, prior: nn.Module, batch: dict, n: int | None = None):
        """The prior's condition for the first ``n`` (default all) samples of ``batch``."""
        b = len(batch["codes"]) if "codes" in batch else len(batch["caption"])
        n = b if n is None else n
        if self.cfg.condition == "unconditional":
            return prior.null_condition(n)
        if not _is_text_prior(prior):
            return batch["label"][:n]
        emb = batch.get("text_embedding")
        if emb is not None and emb.dim() == 3:
            mask = batch.get("text_mask")
            return {"embedding": emb[:n], "mask": None if mask is None else mask[:n]}
        if emb is not None and not self._warned:   # pooled [B, C]: the prior needs per-token states
            self._warned = True
            warnings.warn("pooled text embeddings cannot condition the text prior; using the captions")
        if batch.get("text_tokens") is not None:
            return {"tokens": batch["text_tokens"][:n]}
        return {"tokens": prior.text_encoder.tokenize(list(batch["caption"][:n]))}

    def _step(self, models: dict[str, nn.Module], batch: dict):
        model = models[self.models[0]]
        prior = unwrap(model)
        dev = _device(prior)
        codes = batch["codes"].to(dev, non_blocking=True).long()
        positions = batch.get("positions")
        positions = None if positions is None else positions.to(dev, non_blocking=True).long()
        cond = self.condition(prior, batch)
        # Through the wrapper's forward: DeepSpeed's engine.forward does bookkeeping that ZeRO-3
        # needs (calling prior.loss on the bare module gives wrong updates under ZeRO-3), DDP too;
        # the loss of the output is the prior's own (model_zoo.interfaces.next_token_loss).
        loss, terms = next_token_loss(model(codes, cond, positions), codes, positions)
        m = {"loss": loss.detach(), **{_PRIOR_METRIC[k]: v for k, v in terms.items()}}
        # Bits per token: Stackformer's token is a (code, position) pair, so its loss is both CEs.
        m["bits_per_token"] = m["loss"] / _LN2
        m["bits_per_code"] = m["loss/code_ce"] / _LN2
        return loss, m

    def __call__(self, models: dict[str, nn.Module], batch: dict, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self._step(models, batch)

    def updates(self, models: dict[str, nn.Module], batch: dict, step: int):
        yield (self.models[0], *self._step(models, batch))

    def validation(self, models: dict[str, nn.Module], batch: dict, step: int) -> dict[str, float]:
        with _eval_mode(models[self.models[0]]):   # no dropout, no condition dropout
            _, m = self._step(models, batch)
        return {k: float(v) for k, v in m.items()}

    def visuals(self, models: dict[str, nn.Module], batch: dict) -> dict[str, Tensor]:
        """``samples``: ``num_visuals`` images drawn for the batch's first conditions (labels or
        captions) with fixed seeds, decoded by the tokenizer, ``[n, 3, H, W]`` in [-1, 1]. Under
        ZeRO-3 every rank must call it (the forward gathers parameters)."""
        if self.image_tokenizer is None or self.cfg.num_visuals <= 0:
            return {}
        cfg, prior = self.cfg, unwrap(models[self.models[0]])
        tok = unwrap(self.image_tokenizer)
        if tok.codebook_size != prior.codebook_size:
            raise ValueError(f"tokenizer codebook {tok.codebook_size} != prior codebook {prior.codebook_size}")
        n = min(cfg.num_visuals, len(batch["codes"]) if "codes" in batch else len(batch["caption"]))
        sampling = SamplingConfig(temperature=cfg.visual_temperature, top_k=cfg.visual_top_k,
                                  top_p=cfg.visual_top_p, guidance_scale=cfg.visual_guidance_scale,
                                  position_top_k=cfg.visual_position_top_k,
                                  position_top_p=cfg.visual_position_top_p)
        seeds = sample_seeds(cfg.visual_seed, torch.arange(n))
        with _eval_mode(prior, tok), gathered(list(prior.parameters())):
            out = prior.generate(self.condition(prior, batch, n), n, sampling, seeds)
            codes, positions = out if isinstance(out, tuple) else (out, None)
            tdev = _device(tok)
            images = tok.decode(codes.to(tdev), None if positions is None else positions.to(tdev))
        return {"samples": images.float().clamp(-1, 1).cpu()}


# -------------------------------------------------------------------------------------------------

def build_objective(kind: Literal["tokenizer", "prior"], cfg=None, *, perceptual: L.LPIPS | None = None,
                    image_tokenizer: nn.Module | None = None):
    """The objective of a stage: ``"tokenizer"`` -> :class:`TokenizerObjective` (``cfg`` a
    :class:`TokenizerLossConfig`, optional ``perceptual`` LPIPS), ``"prior"`` ->
    :class:`PriorObjective` (``cfg`` a :class:`PriorLossConfig`, optional ``image_tokenizer`` for visuals)."""
    if kind == "tokenizer":
        if cfg is not None and not isinstance(cfg, TokenizerLossConfig):
            raise TypeError(f"the tokenizer objective takes a TokenizerLossConfig, got {type(cfg).__name__}")
        return TokenizerObjective(cfg, perceptual=perceptual)
    if kind == "prior":
        if cfg is not None and not isinstance(cfg, PriorLossConfig):
            raise TypeError(f"the prior objective takes a PriorLossConfig, got {type(cfg).__name__}")
        return PriorObjective(cfg, image_tokenizer=image_tokenizer)
    raise ValueError(f"objective kind must be 'tokenizer' or 'prior', got {kind!r}")
