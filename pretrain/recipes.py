"""Recipes: named, typed run configurations (torchtitan's ``llama3_debugmodel``, big_vision's
``runlocal``). A recipe is a registered function returning a :class:`RunConfig`; the command line
takes a recipe name plus ``--set`` overrides (``vqscale train --recipe vim-base --set optim.lr=1e-4``).

Every registry preset that trains (tokenizers and priors) has a recipe of the same name with the
papers' training settings, and a tiny CPU twin with the suffix ``-tiny`` that CI runs: the same
objective and code path, a tiny model, a few steps, small batches on the bundled demo data.

Paper settings (global batch, optimizer, schedule), as the papers' training sections give them;
they were not re-checked against the PDFs in this offline workplace:

* ViT-VQGAN (Yu et al. 2021, sec. 4.1): batch 256, Adam(0.9, 0.99), peak lr 1e-4 after a 5k-step
  linear warmup, cosine decay, 500k steps, L2 1.0 + perceptual 0.1 + logit-Laplace 0.1.
* VQGAN / MQ-VAE / Regularized VQ (taming-transformers' training configs): Adam(0.5, 0.9), base
  lr 4.5e-6 scaled by the batch size, no decay, L1 + LPIPS.
* Discriminators (StyleGAN2 for ViT-VQGAN, PatchGAN for the taming family): see
  :func:`_discriminator` for the settings and where they come from.
* VIM (sec. 4.2): batch 1024, Adam(0.9, 0.96), peak lr 4.5e-4 after 5k warmup steps, cosine decay,
  450k steps, class dropout 0.1 for classifier-free guidance.
* Stackformer (MQ-VAE's stage 2) and the text prior: GPT-style AdamW(0.9, 0.95), weight decay
  0.01, lr 4.5e-4 (documented defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal

from data_pipeline.config import DataConfig

from .config import ConfigError
from .engine import DeepSpeedSettings, OptimConfig
from .objectives import PriorLossConfig, TokenizerLossConfig

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
    decay: float = 0.0               # 0 disables; sharded like ZeRO-3 (pretrain.engine.EMA)
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
class DiscriminatorConfig:
    """The adversarial game of a tokenizer run (:mod:`pretrain.gan`). ``model`` is a registry
    discriminator (``""`` = no GAN: a single-engine run); it gets its own optimizer and LR schedule
    (``optim``) and its own DeepSpeed engine (``deepspeed``; the supported generator/discriminator
    ZeRO stages are in pretrain/gan.py). The adversarial weight stays ``tokenizer_loss.adversarial``.

    ``start_step``: the first step (0-based) with the GAN term and discriminator updates (taming's
    ``disc_start``); ``loss``: hinge or non-saturating; ``adaptive_weight``: taming's adaptive
    weight on the decoder's last layer (False: 1); ``lecam_weight``/``lecam_decay``: LeCam
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
    lecam_weight: float = 0.0
    lecam_decay: float = 0.99
    r1_weight: float = 0.0
    r1_every: int = 16


@dataclass(frozen=True)
class RunConfig:
    """The resolved configuration of a run; written to ``RUN_DIR/config.json`` and every checkpoint."""

    name: str = "vit-vqgan-ss-tiny"
    seed: int = 0
    run_dir: str = ""                # "" = runs/NAME
    stage: Literal["tokenizer", "prior"] = "tokenizer"
    model: str = "vit-vqgan-ss-tiny"  # registry preset
    model_args: dict[str, Any] = field(default_factory=dict)   # overrides of the preset's config
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

_VIT_VQGAN_OPTIM = OptimConfig(lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-4, warmup_steps=5000,
                               total_steps=500_000, min_lr_ratio=0.5, grad_clip=1.0)
# taming-transformers: base_learning_rate 4.5e-6 x batch size (256 -> 1.15e-3 is their "lr");
# Adam(0.5, 0.9), constant.
_TAMING_OPTIM = OptimConfig(lr=4.5e-6 * 256, betas=(0.5, 0.9), weight_decay=0.0, warmup_steps=0,
                            total_steps=0, grad_clip=0.0)
_VIM_OPTIM = OptimConfig(lr=4.5e-4, betas=(0.9, 0.96), weight_decay=0.045, warmup_steps=5000,
                         total_steps=450_000, min_lr_ratio=0.0, grad_clip=1.0)
_GPT_OPTIM = OptimConfig(lr=4.5e-4, betas=(0.9, 0.95), weight_decay=0.01, warmup_steps=5000,
                         total_steps=300_000, min_lr_ratio=0.1, grad_clip=1.0)

_TOKENIZERS = {   # name -> (optimizer, global batch, steps, resolution)
    "vit-vqgan-ss": (_VIT_VQGAN_OPTIM, 256, 500_000, 256),
    "vit-vqgan-bb": (_VIT_VQGAN_OPTIM, 256, 500_000, 256),
    "vit-vqgan-sl": (_VIT_VQGAN_OPTIM, 256, 500_000, 256),
    "vqgan-f8": (_TAMING_OPTIM, 256, 500_000, 256),
    "vqgan-f16": (_TAMING_OPTIM, 256, 500_000, 256),
    # Regularized VQ builds on VQGAN and its 256 px benchmarks; its own optimizer, batch and
    # schedule are not in the paper's text available offline: taming's. Its quantizer and loss
    # settings (and their sources): model_zoo/vqgan.py REGVQ_F16, pretrain/objectives.py LOSS_PRESETS.
    "regvq-f16": (_TAMING_OPTIM, 256, 500_000, 256),
    "mq-vae-f8": (_TAMING_OPTIM, 256, 500_000, 256),
}
# Presets with only a CPU twin (the vqgan-f8 backbone with the codebooks that reach full use:
# model_zoo/vqgan.py): a -tiny recipe each, with the settings of the recipe named here.
_TINY_ONLY_TOKENIZERS = {"vqgan-f8-fsq": "vqgan-f8", "vqgan-f8-lfq": "vqgan-f8", "vqgan-f8-simvq": "vqgan-f8"}
_PRIORS = {       # name -> (optimizer, global batch, steps)
    "vim-small": (_VIM_OPTIM, 1024, 450_000),
    "vim-base": (_VIM_OPTIM, 1024, 450_000),
    "vim-large": (_VIM_OPTIM, 1024, 450_000),
    "t2i-prior-1b": (_GPT_OPTIM, 1024, 300_000),
    "stackformer-base": (_GPT_OPTIM, 512, 300_000),
}

# The tiny twins: the bundled demo data (built under the run directory when data.url is empty),
# a few steps with a short warmup, checkpoints and visuals often enough to be seen.
_TINY_DS = DeepSpeedSettings(zero_stage=2)
_TINY_LOG = LogConfig(every=5)


def _tiny_optim(base: OptimConfig, steps: int, lr: float) -> OptimConfig:
    return replace(base, lr=lr, warmup_steps=max(1, steps // 10), total_steps=steps)


# The papers' discriminators (pretrain/gan.py trains them):
# * ViT-VQGAN (Yu et al. 2021, sec. 3.3): StyleGAN2's discriminator, adversarial weight 0.1, the
#   same Adam(0.9, 0.99) schedule as the generator. The paper gives no start step and no loss
#   details: StyleGAN2's non-saturating loss with lazy R1 (gamma 10 every 16 steps, as StyleGAN2
#   and the enhancing-transformers ViT-VQGAN reimplementation), discriminator on from step 0.
# * VQGAN / Regularized VQ / MQ-VAE (taming-transformers' VQLPIPSWithDiscriminator): PatchGAN
#   (3 layers, ndf 64, BatchNorm), hinge loss, adaptive weight, the generator's optimizer
#   (Adam(0.5, 0.9), same lr), disc_start 250001 from taming's configs/imagenet_vqgan.yaml (the
#   ImageNet f16 model). MQ-VAE and Regularized VQ reuse taming's loss module; their own start
#   steps were not available offline, so taming's is used.
# The -tiny twins use the -tiny discriminators, switched on after 20% of their steps.
_TAMING_DISC_START = 250_001


def _discriminator(name: str, tiny: bool, optim: OptimConfig, steps: int, res: int) -> DiscriminatorConfig:
    vit = name.startswith("vit-vqgan")
    model = ("stylegan2-disc" if vit else "patchgan") + ("-tiny" if tiny else "")
    args: dict[str, Any] = {}
    if vit and res != (32 if tiny else 256):
        args["resolution"] = res
    cfg = DiscriminatorConfig(model=model, model_args=args, optim=optim, deepspeed=DeepSpeedSettings(zero_stage=2),
                              start_step=0 if vit else _TAMING_DISC_START,
                              loss="non_saturating" if vit else "hinge",
                              r1_weight=10.0 if vit else 0.0, r1_every=16)
    if tiny:
        start = steps // 5
        cfg = replace(cfg, start_step=start, optim=replace(optim, total_steps=steps - start))
    return cfg


def _tokenizer_recipe(name: str, tiny: bool) -> RunConfig:
    optim, batch, steps, res = _TOKENIZERS[_TINY_ONLY_TOKENIZERS.get(name, name)]
    loss = TokenizerLossConfig.for_tokenizer(name)
    cfg = RunConfig(name=name + ("-tiny" if tiny else ""), stage="tokenizer", model=name + ("-tiny" if tiny else ""),
                    global_batch_size=batch, steps=steps, optim=optim, tokenizer_loss=loss,
                    data=DataConfig(resolution=res), ema=EMAConfig(decay=0.999),
                    deepspeed=DeepSpeedSettings(zero_stage=2),
                    discriminator=_discriminator(name, False, optim, steps, res))
    if not tiny:
        return cfg
    from model_zoo.registry import create_model

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
                   deepspeed=_TINY_DS, log=_TINY_LOG, discriminator=_discriminator(name, True, optim, steps, res))


def _prior_recipe(name: str, tiny: bool) -> RunConfig:
    optim, batch, steps = _PRIORS[name]
    cfg = RunConfig(name=name + ("-tiny" if tiny else ""), stage="prior", model=name + ("-tiny" if tiny else ""),
                    global_batch_size=batch, steps=steps, optim=optim, ema=EMAConfig(decay=0.9999),
                    deepspeed=DeepSpeedSettings(zero_stage=3, param_persistence_threshold=100_000))
    if not tiny:
        return cfg
    steps = 200
    return replace(cfg, global_batch_size=32, steps=steps, optim=_tiny_optim(optim, steps, 3e-3),
                   data=DataConfig(num_workers=1, shuffle_buffer=64, interleave=2),
                   validation=ValidationConfig(every=50, batches=2, visuals_every=100),
                   prior_loss=PriorLossConfig(num_visuals=8, visual_guidance_scale=2.0),
                   checkpoint=CheckpointConfig(every=50, keep_last=2), ema=EMAConfig(decay=0.99),
                   deepspeed=_TINY_DS, log=_TINY_LOG)


def _meta_device():
    import torch

    return torch.device("meta")


def _register_all() -> None:
    for name in _TOKENIZERS:
        for tiny in (False, True):
            register_recipe(name + ("-tiny" if tiny else ""))(lambda n=name, t=tiny: _tokenizer_recipe(n, t))
    for name in _TINY_ONLY_TOKENIZERS:
        register_recipe(name + "-tiny")(lambda n=name: _tokenizer_recipe(n, True))
    for name in _PRIORS:
        for tiny in (False, True):
            register_recipe(name + ("-tiny" if tiny else ""))(lambda n=name, t=tiny: _prior_recipe(n, t))


_register_all()
