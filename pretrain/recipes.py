"""Recipes: named, typed run configurations (torchtitan's ``llama3_debugmodel``, big_vision's
``runlocal``). A recipe is a registered function returning a :class:`RunConfig`; the command line
takes a recipe name plus ``--set`` overrides (``vqscale train --recipe vim-base --set optim.lr=1e-4``).

Every registry preset that trains (tokenizers and priors) has a recipe of the same name with the
papers' training settings, and a tiny CPU twin with the suffix ``-tiny`` that CI runs: the same
objective and code path, a tiny model, a few steps with a short warmup, small batches on the
bundled demo data. Two more paper runs have recipes of their own: ``vim-base-uncond`` /
``vim-large-uncond`` (the unconditional VIM the paper's linear probe reads) and
``vit-vqgan-bb-probe`` (the ViT-VQGAN without the perceptual loss that the probe's tokens come from).

Where each number comes from (the comments at each setting below say the same, per number):

* ViT-VQGAN (Yu et al. 2021, sec. 4.1, as issue 19 reads it): batch 256, Adam(0.9, 0.99),
  decoupled weight decay 1e-4, lr warmed up linearly to 1e-4 over 50k steps then cosine-decayed to
  5e-5 at 500k steps; L2 1.0 + perceptual 0.1 + logit-Laplace 0.1, and a FIXED adversarial weight
  0.1 (``discriminator.adaptive_weight=False``: not taming's adaptive weight). The probe tokenizer
  is the same run without the perceptual loss (LPIPS's VGG was trained with ImageNet labels).
* VIM (Yu et al. 2021, sec. 4.2, as issue 19 reads it): batch 1024, Adam(0.9, 0.96), lr warmed up
  to 4.5e-4 over 5k steps, constant, then an exponential decay from step 80k reaching 1e-5 (here at
  the last step, 450k). Class-conditional by the class token only: the paper has no class
  dropout and no classifier-free guidance, so the paper recipes train with ``class_dropout=0``
  (``model_args``); dropout and guidance stay available as vqscale options
  (``--set model.class_dropout=0.1``, ``vqscale sample --guidance``). Rejection sampling
  (a classifier keeps the best-scored fraction of the samples) is ``vqscale sample --accept``.
  The linear probe (sec. 5.2) reads an unconditional VIM at a middle block (Base: block 10 of 24,
  Large: 15 of 36): ``vim-*-uncond``, and ``vqscale eval linear-probe`` reads that block by
  default (``--layers all`` sweeps every block).
* VQGAN / Regularized VQ (taming-transformers' training configs): Adam(0.5, 0.9), base lr 4.5e-6
  scaled by the batch size, constant, L1 + LPIPS, PatchGAN from step 250,001 with 0.8 x the
  adaptive weight.
* MQ-VAE (the official code: configs/stage1/mqvae_imagenet_f8_r30.yml, train.py,
  modules/losses/vqperceptual.py, models/stage1_masked/mqvae.py): Adam(0.5, 0.9), lr = 4.5e-6 x the
  global batch (8 GPUs x 30), warmup 0.1 epoch then cosine to 0 over 50 epochs; taming's loss with
  the adversarial weight 0.75 x the adaptive weight, that product clamped to at most 1.0
  (``disc_weight_max``), the discriminator on from step 0.
* Stackformer (the official configs/stage2/stackformer_imagenet_v12p12_class.yml and
  models/stage2_masked/stackformer_class.py): AdamW(0.9, 0.95), weight decay 0.01, lr 5e-4 without
  warmup, cosine to 0 over 50 epochs, no gradient clipping, no class dropout; samples with top-k 100
  for codes and 10 for positions, top-p 0.95 for both (``visual_*`` here, ``vqscale sample
  --top-k 100 --position-top-k 10 --top-p 0.95``).
* The text prior (``t2i-prior-1b``, vqscale's own): GPT-style AdamW(0.9, 0.95), weight decay 0.01,
  lr 4.5e-4, warmup 5k, cosine to 0.1x.
* ``vim-small`` is vqscale's (no small VIM in the paper), the demo's prior: VIM's Adam(0.9, 0.96)
  with warmup + cosine and class dropout 0.1, because the demo samples with guidance 2.

Deliberate departures (vqscale values, each said where it is set): gradient clipping at 1.0 for
ViT-VQGAN and VIM (the papers give none), EMA weights for every run, VIM's schedule ending at
450k steps. The README's recipe table lists paper and vqscale values side by side.
None of the paper numbers were re-checked against the PDFs in this offline workplace; the
MQ-VAE/Stackformer numbers were read in the official repository
(github.com/CrossmodalGroup/MaskedVectorQuantization, commit f38a9ec).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal

from data_pipeline.config import DataConfig
from model_zoo.registry import create_model

from .config import ConfigError
from .model_overrides import TypedModelArgs
from .objectives import PriorLossConfig, TokenizerLossConfig
from .optim import OptimConfig
from .runtime import DeepSpeedSettings

__all__ = ["RunConfig", "ValidationConfig", "CheckpointConfig", "EMAConfig", "GuardConfig", "LogConfig",
           "DiscriminatorConfig", "register_recipe", "list_recipes", "get_recipe"]


@dataclass(frozen=True)
class ValidationConfig:
    """Held-out loss every ``every`` steps over ``batches`` fixed batches of ``url`` (image shards
    for a tokenizer, code shards for a prior; "" = no held-out loss), and a reconstruction or
    sample grid of a fixed batch every ``visuals_every`` steps (from ``url``, else the training data)."""

    url: str = ""
    every: int = 1000
    batches: int = 4
    visuals_every: int = 2000


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1000                # steps; a checkpoint is also written at the end and on a stop signal
    keep_last: int = 3
    resume: bool = True              # from RUN_DIR/checkpoints/latest when there is one
    init_from: str = ""              # warm start: weights of a run directory or step folder (not optimizer)


@dataclass(frozen=True)
class EMAConfig:
    decay: float = 0.0               # 0 disables; sharded like ZeRO-3 (pretrain.ema.EMA)
    warmup: bool = True              # decay ramps up as (1 + n) / (10 + n)


@dataclass(frozen=True)
class GuardConfig:
    max_consecutive_skips: int = 10  # non-finite steps in a row before the run stops (with a checkpoint)
    collective_timeout_s: float = 1800.0
    # Testing aid: these steps' loss is multiplied by NaN on rank 0 (exercises the skip path).
    inject_nan_steps: tuple[int, ...] = ()


@dataclass(frozen=True)
class LogConfig:
    every: int = 10                  # steps between scalar logs (all-reduced means over ranks)
    progress: bool = True            # console progress bar with ETA (rank 0)
    profile_steps: int = 0           # > 0: a torch.profiler trace of that many steps into RUN_DIR/profile/
    profile_start: int = 5
    record_keys: bool = False        # RUN_DIR/keys/rank{r}.jsonl: the sample keys of every step (audits)
    peak_tflops: float = 0.0         # MFU's denominator; 0 = the GPU's datasheet bf16 peak (pretrain/flops.py)


@dataclass(frozen=True)
class DiscriminatorConfig(TypedModelArgs):
    """The adversarial game of a tokenizer run (:mod:`pretrain.gan`). ``model`` is a registry
    discriminator (``""`` = no GAN: a single-engine run); it gets its own optimizer and LR schedule
    (``optim``) and its own DeepSpeed engine (``deepspeed``; the supported generator/discriminator
    ZeRO stages are in pretrain/gan.py). The adversarial weight stays ``tokenizer_loss.adversarial``.

    ``start_step``: the first step (0-based) with the GAN term and discriminator updates (taming's
    ``disc_start``); ``loss``: hinge or non-saturating; ``adaptive_weight``: taming's adaptive
    weight on the decoder's last layer (False: 1, i.e. the fixed weight ``tokenizer_loss.adversarial``);
    ``adaptive_weight_max``: an upper bound on ``tokenizer_loss.adversarial * adaptive weight``
    (None: none; the official MQ-VAE code's ``disc_weight_max``); ``lecam_weight``/``lecam_decay``: LeCam
    regularization (Tseng et al. 2021) and the decay of its EMAs of the mean logits; ``r1_weight``
    (gamma) / ``r1_every``: lazy R1 on the reals, ``gamma / 2 * r1_every * R1`` every ``r1_every``
    discriminator steps (StyleGAN2)."""

    model: str = ""
    model_args: dict[str, Any] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=lambda: DeepSpeedSettings(zero_stage=2))
    start_step: int = 0
    loss: Literal["hinge", "non_saturating"] = "hinge"
    adaptive_weight: bool = True
    adaptive_weight_max: float | None = None
    lecam_weight: float = 0.0
    lecam_decay: float = 0.99
    r1_weight: float = 0.0
    r1_every: int = 16


@dataclass(frozen=True)
class RunConfig(TypedModelArgs):
    """The resolved configuration of a run; written to ``RUN_DIR/config.json`` and every checkpoint."""

    name: str = "vit-vqgan-ss-tiny"
    seed: int = 0
    run_dir: str = ""                # "" = runs/NAME
    stage: Literal["tokenizer", "prior"] = "tokenizer"
    model: str = "vit-vqgan-ss-tiny"  # registry preset
    # overrides of the preset's config dataclass (nested dicts for its nested configs); set with
    # --set model.FIELD[.SUB]=V (or model_args.FIELD=V), checked against that dataclass's fields
    model_args: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = ""              # prior stage: tokenizer (package, run dir or step folder) for sample grids
    global_batch_size: int = 32      # stays fixed when the world size changes
    micro_batch_size: int = 0        # per rank and forward; 0 = global / world (no accumulation)
    steps: int = 1000
    compile: bool = False            # torch.compile the model (DeepSpeed engine.compile)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    tokenizer_loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)   # tokenizers: GAN
    prior_loss: PriorLossConfig = field(default_factory=PriorLossConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def resolved_run_dir(self) -> str:
        return self.run_dir or f"runs/{self.name}"


_RECIPES: dict[str, Callable[[], RunConfig]] = {}


def register_recipe(name: str):
    def deco(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
        if name in _RECIPES:
            raise ValueError(f"recipe {name!r} registered twice")
        _RECIPES[name] = fn
        return fn
    return deco


def list_recipes() -> list[str]:
    return sorted(_RECIPES)


def get_recipe(name: str) -> RunConfig:
    try:
        fn = _RECIPES[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(_RECIPES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown recipe '{name}'{hint}; known: {', '.join(list_recipes())}") from None
    return fn()


# ---- the paper settings ---------------------------------------------------------------------------

# ViT-VQGAN (Yu et al. 2021, sec. 4.1; issue 19's reading): Adam(0.9, 0.99), decoupled weight decay
# 1e-4, linear warmup to 1e-4 over 50k steps, cosine to 5e-5 (0.5 x 1e-4) at 500k steps.
# grad_clip 1.0 is vqscale's (the paper gives none).
_VIT_VQGAN_OPTIM = OptimConfig(lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-4, warmup_steps=50_000,
                               total_steps=500_000, min_lr_ratio=0.5, grad_clip=1.0)
# taming-transformers: base_learning_rate 4.5e-6 x batch size (256 -> 1.15e-3 is their "lr");
# Adam(0.5, 0.9), constant.
_TAMING_OPTIM = OptimConfig(lr=4.5e-6 * 256, betas=(0.5, 0.9), weight_decay=0.0, warmup_steps=0,
                            total_steps=0, grad_clip=0.0)
# MQ-VAE, the official code: train.py sets lr = num_gpus x per-GPU batch x base_learning_rate
# (4.5e-6, configs/stage1/mqvae_imagenet_f8_r30.yml), 8 GPUs (README) x 30 (the config's
# "batch_size: 4 # 30") = 240 -> 1.08e-3; models/stage1_masked/mqvae.py: Adam(0.5, 0.9) for both
# the autoencoder and the discriminator, each with "linear-warmup_cosine-decay": warmup_epochs 0.1,
# cosine to min_learning_rate 0.0 at the end of --max_epochs 50 (README). ImageNet's 1,281,167
# images at batch 240: 5,338 steps an epoch, so 534 warmup steps and 266,910 steps. No clipping
# (Lightning's default).
_MQVAE_BATCH, _MQVAE_STEPS = 240, 266_910
_MQVAE_OPTIM = OptimConfig(lr=4.5e-6 * _MQVAE_BATCH, betas=(0.5, 0.9), weight_decay=0.0, warmup_steps=534,
                           total_steps=_MQVAE_STEPS, min_lr_ratio=0.0, grad_clip=0.0)
# VIM (Yu et al. 2021, sec. 4.2; issue 19's reading): Adam(0.9, 0.96), linear warmup to 4.5e-4 over
# 5k steps, then constant until step 80k, then an exponential decay reaching 1e-5 at the last step
# (450k). weight_decay 0.045 is vqscale's earlier reading, not re-checked; grad_clip 1.0 is vqscale's.
_VIM_OPTIM = OptimConfig(lr=4.5e-4, betas=(0.9, 0.96), weight_decay=0.045, warmup_steps=5000,
                         total_steps=450_000, schedule="exponential", decay_start=80_000,
                         min_lr_ratio=1e-5 / 4.5e-4, grad_clip=1.0)
# vim-small (vqscale's; no small VIM in the paper): VIM's optimizer with warmup + cosine to 0, the
# schedule the demo's measured numbers (README) were trained with.
_VIM_SMALL_OPTIM = OptimConfig(lr=4.5e-4, betas=(0.9, 0.96), weight_decay=0.045, warmup_steps=5000,
                               total_steps=450_000, min_lr_ratio=0.0, grad_clip=1.0)
# The text prior (vqscale's): GPT-style AdamW, documented defaults.
_GPT_OPTIM = OptimConfig(lr=4.5e-4, betas=(0.9, 0.95), weight_decay=0.01, warmup_steps=5000,
                         total_steps=300_000, min_lr_ratio=0.1, grad_clip=1.0)
# Stackformer, the official configs/stage2/stackformer_imagenet_v12p12_class.yml: learning_rate
# 5e-4 (not batch-scaled), warmup_epochs 0, min_learning_rate 0.0 (cosine to 0), weight_decay 0.01;
# models/stage2_masked/stackformer_class.py: AdamW(0.9, 0.95); 50 epochs at 8 GPUs x 30 (as MQ-VAE);
# no clipping.
_STACKFORMER_OPTIM = OptimConfig(lr=5e-4, betas=(0.9, 0.95), weight_decay=0.01, warmup_steps=0,
                                 total_steps=_MQVAE_STEPS, min_lr_ratio=0.0, grad_clip=0.0)

_TOKENIZERS = {   # name -> (optimizer, global batch, steps, resolution)
    # ViT-VQGAN: batch 256, 500k steps, 256 px (sec. 4.1)
    "vit-vqgan-ss": (_VIT_VQGAN_OPTIM, 256, 500_000, 256),
    "vit-vqgan-bb": (_VIT_VQGAN_OPTIM, 256, 500_000, 256),
    "vit-vqgan-sl": (_VIT_VQGAN_OPTIM, 256, 500_000, 256),
    "vqgan-f8": (_TAMING_OPTIM, 256, 500_000, 256),
    "vqgan-f16": (_TAMING_OPTIM, 256, 500_000, 256),
    # Regularized VQ builds on VQGAN and its 256 px benchmarks; its own optimizer, batch and
    # schedule are not in the paper's text available offline: taming's. Its quantizer and loss
    # settings (and their sources): model_zoo/vqgan.py REGVQ_F16, pretrain/objectives.py LOSS_PRESETS.
    "regvq-f16": (_TAMING_OPTIM, 256, 500_000, 256),
    "mq-vae-f8": (_MQVAE_OPTIM, _MQVAE_BATCH, _MQVAE_STEPS, 256),
}
# Recipes of a paper run on a preset under another name: recipe -> (preset, what differs).
# vit-vqgan-bb-probe: the tokenizer of the VIM paper's linear probes, trained without the
# perceptual loss (LPIPS's VGG saw ImageNet labels; issue 19's reading of Yu et al. 2021). The
# ViT-VQGAN size follows vqscale's vim-base pairing (README: vim-base on vit-vqgan-bb codes).
_TOKENIZER_VARIANTS = {"vit-vqgan-bb-probe": ("vit-vqgan-bb", {"perceptual": 0.0})}
# Presets with only a CPU twin (the vqgan-f8 backbone with the codebooks that reach full use:
# model_zoo/vqgan.py): a -tiny recipe each, with the settings of the recipe named here.
_TINY_ONLY_TOKENIZERS = {"vqgan-f8-fsq": "vqgan-f8", "vqgan-f8-lfq": "vqgan-f8", "vqgan-f8-simvq": "vqgan-f8"}
_PRIORS = {       # name -> (optimizer, global batch, steps)
    "vim-small": (_VIM_SMALL_OPTIM, 1024, 450_000),
    # VIM: batch 1024, 450k steps (sec. 4.2)
    "vim-base": (_VIM_OPTIM, 1024, 450_000),
    "vim-large": (_VIM_OPTIM, 1024, 450_000),
    "t2i-prior-1b": (_GPT_OPTIM, 1024, 300_000),
    "stackformer-base": (_STACKFORMER_OPTIM, _MQVAE_BATCH, _MQVAE_STEPS),
}
# The unconditional VIMs of the paper's linear probe (sec. 5.2): every sample with the null class.
_UNCONDITIONAL_PRIORS = {"vim-base-uncond": "vim-base", "vim-large-uncond": "vim-large"}
# Priors whose papers train without label dropout (no classifier-free guidance in VIM; none in the
# official Stackformer class config): their recipes set model_args.class_dropout = 0.
_NO_CLASS_DROPOUT = ("vim-base", "vim-large", "stackformer-base")
# Stackformer's sampling, the official stackformer_class.py log_images defaults: top-k 100 for
# codes and 10 for positions, top-p 0.95 for both (temperature 1.0).
_STACKFORMER_VISUALS = dict(visual_top_k=100, visual_top_p=0.95, visual_position_top_k=10,
                            visual_position_top_p=0.95)

# The tiny twins: the bundled demo data (built under the run directory when data.url is empty),
# a few steps with a short warmup, checkpoints and visuals often enough to be seen.
_TINY_DS = DeepSpeedSettings(zero_stage=2)
_TINY_LOG = LogConfig(every=5)


def _tiny_optim(base: OptimConfig, steps: int, lr: float) -> OptimConfig:
    """``base`` squeezed into ``steps``: a short warmup, and an exponential decay starting at the
    same fraction of the run as in ``base``."""
    warmup = max(1, steps // 10)
    start = round(steps * base.decay_start / base.total_steps) if base.total_steps else 0
    return replace(base, lr=lr, warmup_steps=warmup, total_steps=steps,
                   decay_start=max(warmup, start) if base.schedule == "exponential" else base.decay_start)


# The papers' discriminators (pretrain/gan.py trains them):
# * ViT-VQGAN (Yu et al. 2021, sec. 3.3): StyleGAN2's discriminator, a FIXED adversarial weight 0.1
#   (tokenizer_loss.adversarial; adaptive_weight=False, issue 19's reading: not 0.1 x taming's
#   adaptive weight), the same Adam(0.9, 0.99) schedule as the generator. The paper gives no start
#   step and no loss details: StyleGAN2's non-saturating loss with lazy R1 (gamma 10 every 16 steps,
#   as StyleGAN2 and the enhancing-transformers ViT-VQGAN reimplementation), discriminator on from
#   step 0.
# * VQGAN / Regularized VQ (taming-transformers' VQLPIPSWithDiscriminator): PatchGAN (3 layers, ndf
#   64, BatchNorm), hinge loss, adaptive weight, the generator's optimizer (Adam(0.5, 0.9), same
#   lr), disc_start 250001 from taming's configs/imagenet_vqgan.yaml (the ImageNet f16 model).
#   Regularized VQ reuses taming's loss module; its own start step was not available offline.
# * MQ-VAE (the official configs/stage1/mqvae_imagenet_f8_r30.yml with modules/losses/vqperceptual.py,
#   taming's module plus a bound): PatchGAN, hinge, disc_start 0, disc_weight 0.75 (objectives.py
#   LOSS_PRESETS) times the adaptive weight, the product clamped to disc_weight_max 1.0; the
#   discriminator has the generator's optimizer and schedule (models/stage1_masked/mqvae.py).
# The -tiny twins use the -tiny discriminators, switched on after 20% of their steps.
_TAMING_DISC_START = 250_001


def _discriminator(name: str, tiny: bool, optim: OptimConfig, steps: int, res: int) -> DiscriminatorConfig:
    vit = name.startswith("vit-vqgan")
    mqvae = name.startswith("mq-vae")
    model = ("stylegan2-disc" if vit else "patchgan") + ("-tiny" if tiny else "")
    args: dict[str, Any] = {}
    if vit and res != (32 if tiny else 256):
        args["resolution"] = res
    cfg = DiscriminatorConfig(model=model, model_args=args, optim=optim, deepspeed=DeepSpeedSettings(zero_stage=2),
                              start_step=0 if vit or mqvae else _TAMING_DISC_START,
                              loss="non_saturating" if vit else "hinge",
                              adaptive_weight=not vit,                       # ViT-VQGAN: fixed 0.1
                              adaptive_weight_max=1.0 if mqvae else None,    # MQ-VAE: disc_weight_max 1.0
                              r1_weight=10.0 if vit else 0.0, r1_every=16)
    if tiny:
        start = steps // 5
        cfg = replace(cfg, start_step=start, optim=replace(optim, total_steps=steps - start))
    return cfg


def _tokenizer_recipe(name: str, tiny: bool) -> RunConfig:
    preset, loss_changes = _TOKENIZER_VARIANTS.get(name, (name, {}))
    optim, batch, steps, res = _TOKENIZERS[_TINY_ONLY_TOKENIZERS.get(preset, preset)]
    loss = replace(TokenizerLossConfig.for_tokenizer(preset), **loss_changes)
    suffix = "-tiny" if tiny else ""
    cfg = RunConfig(name=name + suffix, stage="tokenizer", model=preset + suffix,
                    global_batch_size=batch, steps=steps, optim=optim, tokenizer_loss=loss,
                    data=DataConfig(resolution=res), ema=EMAConfig(decay=0.999),
                    deepspeed=DeepSpeedSettings(zero_stage=2),
                    discriminator=_discriminator(preset, False, optim, steps, res))
    if not tiny:
        return cfg
    with _meta_device():
        res = int(create_model(cfg.model).image_size)
    steps = 200
    optim = _tiny_optim(optim, steps, 1e-3)
    # LPIPS needs VGG weights that exist only online: the CPU twins train without the perceptual
    # term (the full recipes load the weights from the cache, or fail naming where they looked).
    return replace(cfg, global_batch_size=16, steps=steps, optim=optim,
                   tokenizer_loss=replace(loss, perceptual=0.0, contrastive=0.0, num_visuals=8),
                   data=DataConfig(resolution=res, num_workers=1, shuffle_buffer=64, interleave=2),
                   validation=ValidationConfig(every=50, batches=2, visuals_every=100),
                   checkpoint=CheckpointConfig(every=50, keep_last=2), ema=EMAConfig(decay=0.99),
                   deepspeed=_TINY_DS, log=_TINY_LOG, discriminator=_discriminator(preset, True, optim, steps, res))


def _prior_recipe(name: str, tiny: bool) -> RunConfig:
    preset = _UNCONDITIONAL_PRIORS.get(name, name)
    optim, batch, steps = _PRIORS[preset]
    suffix = "-tiny" if tiny else ""
    model_args: dict[str, Any] = {"class_dropout": 0.0} if preset in _NO_CLASS_DROPOUT else {}
    loss = PriorLossConfig(condition="unconditional" if name in _UNCONDITIONAL_PRIORS else "auto",
                           **(_STACKFORMER_VISUALS if preset.startswith("stackformer") else {}))
    cfg = RunConfig(name=name + suffix, stage="prior", model=preset + suffix, model_args=model_args,
                    global_batch_size=batch, steps=steps, optim=optim, prior_loss=loss, ema=EMAConfig(decay=0.9999),
                    deepspeed=DeepSpeedSettings(zero_stage=3, param_persistence_threshold=100_000))
    if not tiny:
        return cfg
    steps = 200
    # guided visuals only where the model learns the unconditional branch (condition dropout on)
    guided = preset not in _NO_CLASS_DROPOUT and loss.condition == "auto"
    return replace(cfg, global_batch_size=32, steps=steps, optim=_tiny_optim(optim, steps, 3e-3),
                   data=DataConfig(num_workers=1, shuffle_buffer=64, interleave=2),
                   validation=ValidationConfig(every=50, batches=2, visuals_every=100),
                   prior_loss=replace(loss, num_visuals=8, visual_guidance_scale=2.0 if guided else 1.0),
                   checkpoint=CheckpointConfig(every=50, keep_last=2), ema=EMAConfig(decay=0.99),
                   deepspeed=_TINY_DS, log=_TINY_LOG)


def _meta_device():
    import torch

    return torch.device("meta")


def _register_all() -> None:
    for name in (*_TOKENIZERS, *_TOKENIZER_VARIANTS):
        for tiny in (False, True):
            register_recipe(name + ("-tiny" if tiny else ""))(lambda n=name, t=tiny: _tokenizer_recipe(n, t))
    for name in _TINY_ONLY_TOKENIZERS:
        register_recipe(name + "-tiny")(lambda n=name: _tokenizer_recipe(n, True))
    for name in (*_PRIORS, *_UNCONDITIONAL_PRIORS):
        for tiny in (False, True):
            register_recipe(name + ("-tiny" if tiny else ""))(lambda n=name, t=tiny: _prior_recipe(n, t))


_register_all()
