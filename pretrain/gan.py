"""The adversarial game of stage 1 under DeepSpeed ZeRO: a generator (the tokenizer) and a
discriminator, two engines with their own optimizers and schedules, one Trainer.

Objective: :class:`GANTokenizerObjective` (``models = ("generator", "discriminator")``) is the
tokenizer objective of :mod:`pretrain.objectives` plus

* generator: ``cfg.adversarial * w * g_loss(D(recon))`` through the ``adversarial_term`` hook, from
  ``DiscriminatorConfig.start_step`` on (before it the term is absent and the discriminator does not
  train). ``w`` is taming's adaptive weight ``||grad nll|| / (||grad g|| + 1e-4)`` w.r.t. the
  decoder's last layer weight, clamped to [0, 1e4] and detached (``adaptive_weight=False``: w = 1,
  a fixed weight ``cfg.adversarial``, as ViT-VQGAN). ``DiscriminatorConfig.adaptive_weight_max``
  (None: no bound) caps the product ``cfg.adversarial * w``, as the official MQ-VAE code's
  ``disc_weight_max`` caps ``disc_weight * adaptive weight`` (modules/losses/vqperceptual.py);
* discriminator (:meth:`GANTokenizerObjective.discriminator_step`): ``d_loss(D(real),
  D(recon.detach()))`` (hinge or non-saturating), plus optional LeCam (``lecam_weight``, Tseng et
  al. 2021: ``mean(relu(D(real) - ema_fake)^2) + mean(relu(ema_real - D(fake))^2)`` with EMAs of the
  mean logits) and lazy R1 (``r1_weight`` = gamma: ``gamma / 2 * r1_every * E||grad_x D(x)||^2`` on
  the reals every ``r1_every`` discriminator steps, StyleGAN2's lazy regularization).

Why the naive two-engine code crashes, and what is done instead. Running ``disc_engine(recon)``
inside the generator's loss puts the discriminator's parameters into the generator's backward: the
discriminator engine's ZeRO gradient hooks fire in the middle of the generator engine's backward
(DeepSpeed 0.19.8: an IndexError in the ZeRO-2 reducer) and its output hooks run its backward
prologue outside ``engine.backward`` ("Direct calls to tensor.backward() are not supported" at
stage 0). Here:

1. **D(recon) in the generator's loss** is ``torch.func.functional_call`` of a hook-free replica of
   the discriminator (a copy on the meta device, made before the engine exists, so it holds no
   memory and no DeepSpeed hook) with the discriminator's current parameters **detached** (under a
   ZeRO-3 discriminator: gathered with ``deepspeed.zero.GatheredParameters`` and cloned) and
   **clones** of its buffers (BatchNorm statistics are updated only by the discriminator's own
   pass). Gradients reach ``recon`` (and so the generator) and nothing else; no hook of the
   discriminator engine fires. The generator's step leaves the discriminator's whole state dict
   bit-identical (tested).
2. **The discriminator's loss** runs through the discriminator ENGINE's ``forward`` (so ZeRO-3 can
   fetch/release its parameters and DeepSpeed's backward prologue runs) in ONE call per
   micro-batch: the engine's module is :class:`GANDiscriminator`, which runs the network on the
   reals and the (detached) fakes separately (separate BatchNorm/minibatch-stddev statistics, as
   taming) and computes R1 inside that forward (``create_graph`` double backward; the engine's
   output hooks are registered after ``forward`` returns, so the inner ``autograd.grad`` never runs
   them). Its inputs carry no generator graph, so the discriminator's step never touches the
   generator (tested with consolidated state dicts).
3. **The adaptive weight** needs ``d nll / d W`` and ``d g / d W`` for the last layer ``W``. Taking
   ``autograd.grad`` w.r.t. ``W`` through the engine's graph would (a) run the generator engine's
   backward prologue early (its output hooks fire once per forward; the real ``engine.backward``
   afterwards would then run without it and read a stale gradient-accumulation boundary), and (b)
   fail under ZeRO-3, where ``W`` is partitioned (0 elements outside its module's forward). So the
   gradients are taken w.r.t. the last layer's OUTPUT ``h`` (captured by a forward hook together
   with its input ``x``), with the engine's output hooks and ZeRO-3's pre-backward module hooks
   paused for that call, and ``dW`` follows from ``h = f(W, x)`` by a vector-Jacobian product of
   the layer's own functional form (``F.linear`` / ``Conv._conv_forward``) at the whole ``W``
   (gathered under ZeRO-3 with ``GatheredParameters``, read only). Same number as taming's, at every
   ZeRO stage; ``gan/adaptive_weight`` is logged. A last layer that is not a Linear/Conv (or was not
   called through its module) falls back to w = 1 with a one-time warning.

Checkpoints: both engines (``generator/``, ``discriminator/``), each with its optimizer and LR
schedule; the EMA (if any) is the generator's (``ema/generator``). The LeCam EMAs are buffers of
:class:`GANDiscriminator` (all-reduced over ranks before each update, so every rank holds the same
values), hence in the discriminator's DeepSpeed checkpoint: resume is exact. The discriminator's
schedule counts its own optimizer steps (it starts at ``start_step``, warmup included).

Supported ZeRO stages. Measured with DeepSpeed 0.19.8 on 2 CPU processes (gloo, fp32, gradient
accumulation 2, 3 optimizer steps, LeCam on, R1 on where allowed): every pair below trains
bit-identically to plain PyTorch (AdamW, the same schedule, gradients averaged over the ranks in
DeepSpeed's order), both models' weights and every loss, and passes the isolation checks; all 16
pairs with vqgan-f8-tiny + patchgan-tiny, spot checks with vit-vqgan-ss-tiny + stylegan2-disc-tiny
and mq-vae-f8-tiny + patchgan-tiny. ``tests/test_gan.py`` keeps (1,1), (2,2), (3,3), (3,2) and
(2,0) in CI, plus the Trainer with kill-and-resume at (1,1), (2,2), (3,3)::

    generator \\ discriminator   ZeRO-0   ZeRO-1   ZeRO-2   ZeRO-3
    ZeRO-0                        yes      yes      yes      yes (no R1)
    ZeRO-1                        yes      yes      yes      yes (no R1)
    ZeRO-2                        yes      yes      yes      yes (no R1)
    ZeRO-3                        yes      yes      yes      yes (no R1)

Refused at start-up (:func:`check_supported`, one clear line): R1 (``r1_weight > 0``) with a
ZeRO-3 discriminator (R1 is a double backward through the discriminator; ZeRO-3 has released the
conv weights the second-order backward reads: measured, ``RuntimeError: expected stride to be a
single integer value ...`` in the engine's backward, at generator ZeRO-2 and ZeRO-3), and a
PatchGAN with ActNorm (its data-dependent init writes into parameters, which ZeRO's fp32 master
copies overwrite). Not measured here: bf16/fp16 and CUDA/NCCL (no GPU in this workplace; nothing
above is dtype-specific, and the adaptive weight takes its gradients from the unscaled losses).
The recipes put the discriminator at ZeRO-2 (it is small; its optimizer state is still
partitioned), whatever the generator's stage.
"""

from __future__ import annotations

import copy
import logging
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_zoo import losses as L
from model_zoo.discriminators import ActNorm
from model_zoo.registry import create_model

from .models import preset_args
from .objectives import TokenizerLossConfig, TokenizerObjective, _device, _model_input, unwrap
from .recipes import DiscriminatorConfig
from .runtime import backward_hooks_paused, gathered, is_partitioned

log = logging.getLogger("vqscale.gan")

__all__ = ["GANDiscriminator", "GANTokenizerObjective", "check_supported", "build_discriminator",
           "SUPPORTED_STAGES"]

# (generator stage, discriminator stage) pairs that train (module docstring); R1 is further limited.
SUPPORTED_STAGES = frozenset((g, d) for g in (0, 1, 2, 3) for d in (0, 1, 2, 3))


def check_supported(generator_stage: int, disc_cfg, discriminator: nn.Module | None = None) -> None:
    """Raise ``ValueError`` (one clear line) for a combination the module docstring does not support."""
    d = int(disc_cfg.deepspeed.zero_stage)
    g = int(generator_stage)
    if (g, d) not in SUPPORTED_STAGES:
        raise ValueError(
            f"GAN training with the generator at ZeRO-{g} and the discriminator at ZeRO-{d} is not supported; "
            f"supported: ZeRO-0/1/2/3 for each (see pretrain/gan.py). "
            f"Set deepspeed.zero_stage / discriminator.deepspeed.zero_stage")
    if disc_cfg.r1_weight > 0 and d == 3:
        raise ValueError("R1 (discriminator.r1_weight > 0) needs a double backward, which a ZeRO-3 discriminator "
                         "cannot do; set discriminator.deepspeed.zero_stage to 0, 1 or 2, or r1_weight=0")
    if disc_cfg.loss not in ("hinge", "non_saturating"):
        raise ValueError(f"discriminator.loss must be 'hinge' or 'non_saturating', got {disc_cfg.loss!r}")
    if disc_cfg.r1_every < 1:
        raise ValueError(f"discriminator.r1_every must be >= 1, got {disc_cfg.r1_every}")
    if discriminator is not None:
        if any(isinstance(m, ActNorm) for m in discriminator.modules()):
            raise ValueError("a discriminator with ActNorm cannot train under ZeRO (its data-dependent init writes "
                             "into parameters that the fp32 master copies overwrite); use norm='batch' or 'none'")


class GANDiscriminator(nn.Module):
    """The discriminator engine's module: the registry discriminator ``net`` plus the LeCam EMAs.

    ``forward(real, fake, r1=False) -> {"logits_real", "logits_fake"[, "r1"]}``: the network on
    the reals and on the fakes (two passes), and with ``r1`` the R1 penalty on the reals (computed
    here, inside the engine's forward; see the module docstring). ``lecam_ema`` holds
    ``[ema of mean D(real), ema of mean D(fake), initialized]``.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("lecam_ema", torch.zeros(3, dtype=torch.float32))

    def forward(self, real: Tensor, fake: Tensor, r1: bool = False) -> dict[str, Tensor]:
        if r1:
            real = real.detach().requires_grad_(True)
        logits_real = self.net(real)
        out = {"logits_real": logits_real, "logits_fake": self.net(fake)}
        if r1:
            out["r1"] = L.r1_penalty(logits_real, real)
        return out


def build_discriminator(disc_cfg) -> GANDiscriminator:
    """The discriminator of ``disc_cfg`` (a ``DiscriminatorConfig``) from the registry, wrapped."""
    return GANDiscriminator(create_model(disc_cfg.model, **preset_args(disc_cfg)))


# ---- the objective ------------------------------------------------------------------------------

class GANTokenizerObjective(TokenizerObjective):
    """Stage 1 with the adversarial game (module docstring). ``disc`` is the run's
    ``DiscriminatorConfig``. Call :meth:`bind_discriminator` with the discriminator module before
    its engine is built (the Trainer does); plain modules are bound on first use."""

    models: tuple[str, ...] = ("generator", "discriminator")

    def __init__(self, cfg: TokenizerLossConfig | None = None, disc=None, perceptual: L.LPIPS | None = None):
        super().__init__(cfg, perceptual=perceptual)
        if disc is None:
            disc = DiscriminatorConfig(model="patchgan")
        self.disc = disc
        self.batch_cache: dict[str, Tensor] | None = None
        self._replica: nn.Module | None = None
        self._capture: dict[str, Tensor] = {}
        self._hooked: nn.Module | None = None
        self._last_module: nn.Module | None = None

    # -- set-up -------------------------------------------------------------------------------------
    def bind_discriminator(self, module: nn.Module) -> None:
        """Keep a hook-free replica of the discriminator network on the meta device (no memory)
        for the generator's pass. Call before the module is partitioned (ZeRO-3)."""
        net = module.net if isinstance(module, GANDiscriminator) else module
        if any(is_partitioned(p) for p in net.parameters()):
            raise RuntimeError("bind_discriminator must see the discriminator before its ZeRO-3 engine exists")
        self._replica = copy.deepcopy(net).to("meta")

    def active(self, step: int) -> bool:
        """Whether the adversarial game runs at ``step`` (0-based, the step being computed)."""
        return step >= self.disc.start_step

    def _hook_last_layer(self, tok: nn.Module) -> None:
        if self._hooked is tok:
            return
        weight = tok.last_layer()
        owner = next((m for m in tok.modules() if getattr(m, "weight", None) is weight), None)
        self._hooked, self._last_module = tok, owner
        if owner is None:
            return
        capture = self._capture
        # Under torch.compile (compile=true) the layer would run inside the compiled graph, whose
        # intermediate outputs autograd cannot differentiate through to: run it eagerly (one graph
        # break at the model's end) so that ``h`` lies on recon's autograd path.
        # (bound with MethodType, so a deepcopy of the model, e.g. an EMA, rebinds it to the copy)
        owner.forward = types.MethodType(torch.compiler.disable(type(owner).forward, recursive=False), owner)

        def hook(module, args, output):
            if torch.is_grad_enabled() and isinstance(output, Tensor) and args:
                capture["x"], capture["h"] = args[0].detach(), output

        owner.register_forward_hook(hook)

    # -- the generator's side -------------------------------------------------------------------------
    def __call__(self, models: dict[str, nn.Module], batch: dict, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        gen = models[self.models[0]]
        self._hook_last_layer(unwrap(gen))
        self._capture.clear()
        total, metrics, out, images = self._step(models, batch, step)
        self._capture.clear()
        self.batch_cache = {"real": images.detach(), "fake": out.recon.detach()}
        return total, metrics

    def updates(self, models: dict[str, nn.Module], batch: dict, step: int):
        """The generator's loss; then, from ``start_step`` on (its engine idles before), the
        discriminator's on the same micro-batch's reals and the reconstructions of the generator
        as it was before its update (``batch_cache``)."""
        yield ("generator", *self(models, batch, step))
        if self.active(step):
            yield ("discriminator", *self.discriminator_step(models, self.batch_cache, step))

    def _disc_logits_frozen(self, models: dict[str, nn.Module], recon: Tensor) -> Tensor:
        """D(recon) with the discriminator's current weights detached (module docstring, point 1)."""
        wrapper = unwrap(models["discriminator"])
        net = wrapper.net if isinstance(wrapper, GANDiscriminator) else wrapper
        if self._replica is None:
            self.bind_discriminator(net)
        params = dict(net.named_parameters())
        with gathered(list(params.values())):
            zero3 = any(is_partitioned(p) for p in params.values())
            state = {n: (p.detach().clone() if zero3 else p.detach()) for n, p in params.items()}
        state.update({n: b.detach().clone() for n, b in net.named_buffers()})
        return torch.func.functional_call(self._replica, state, (_model_input(net, recon),))

    def _adaptive_weight(self, tok: nn.Module, out, nll: Tensor, g: Tensor) -> Tensor:
        """taming's adaptive weight through the last layer's output (module docstring, point 3)."""
        owner, h, x = self._last_module, self._capture.get("h"), self._capture.get("x")
        conv = isinstance(owner, nn.modules.conv._ConvNd) and not owner.transposed
        if owner is None or h is None or not (isinstance(owner, nn.Linear) or conv):
            self._warn_once("adaptive", f"{type(tok).__name__}: the adaptive GAN weight needs the last layer to be a "
                                        "Linear/Conv called as a module; using weight 1.0")
            return torch.ones((), device=g.device)
        with backward_hooks_paused(out, tok):
            grad_nll = torch.autograd.grad(nll, h, retain_graph=True, allow_unused=True)[0]
            grad_g = torch.autograd.grad(g, h, retain_graph=True, allow_unused=True)[0]
        if grad_nll is None or grad_g is None:     # a term that does not reach the last layer
            self._warn_once("adaptive_unused", "the reconstruction or GAN loss does not depend on the last layer; "
                                               "adaptive weight 1.0")
            return torch.ones((), device=g.device)
        with gathered([owner.weight]):
            w = owner.weight.detach().clone()
        w.requires_grad_(True)
        with torch.enable_grad():
            y = F.linear(x, w) if isinstance(owner, nn.Linear) else owner._conv_forward(x, w, None)
            d_nll, d_g = (torch.autograd.grad(y, w, grad_outputs=gr.to(y.dtype), retain_graph=True)[0]
                          for gr in (grad_nll, grad_g))
        weight = d_nll.float().norm() / (d_g.float().norm() + 1e-4)
        return weight.clamp(0.0, 1e4).detach()

    def adversarial_term(self, models: dict[str, nn.Module], out, images: Tensor, nll: Tensor,
                         step: int) -> tuple[Tensor, dict[str, Tensor]] | None:
        if "discriminator" not in models or not self.active(step) or not torch.is_grad_enabled():
            return None                          # before start_step, and in validation (no_grad)
        tok = unwrap(models[self.models[0]])
        logits = self._disc_logits_frozen(models, out.recon)
        g = L.g_loss(logits, self.disc.loss)
        if self.disc.adaptive_weight and nll.requires_grad:
            w = self._adaptive_weight(tok, out, nll, g)
        else:
            w = torch.ones((), device=g.device)
        scale = self.cfg.adversarial * w
        if self.disc.adaptive_weight_max is not None:
            scale = scale.clamp(max=float(self.disc.adaptive_weight_max))
        term = scale * g
        return term, {"gan/g_loss": g.detach(), "gan/adaptive_weight": w.detach().float(),
                      "gan/adversarial_weight": scale.detach().float(),
                      "gan/logits_fake_g": logits.detach().float().mean()}

    # -- the discriminator's side ---------------------------------------------------------------------
    def discriminator_step(self, models: dict[str, nn.Module], batch_cache: dict[str, Tensor],
                           step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The discriminator's loss on the reals and the detached reconstructions of the
        generator's last micro-batch, through the discriminator engine's forward."""
        cfg = self.disc
        engine = models["discriminator"]
        wrapper = unwrap(engine)
        dev = _device(wrapper)
        net = wrapper.net if isinstance(wrapper, GANDiscriminator) else wrapper
        real = _model_input(net, batch_cache["real"].to(dev))
        fake = _model_input(net, batch_cache["fake"].to(dev).detach())
        dstep = step - cfg.start_step
        r1_now = cfg.r1_weight > 0 and dstep % cfg.r1_every == 0
        out = engine(real, fake, r1_now)
        lr, lf = out["logits_real"].float(), out["logits_fake"].float()
        d = L.d_loss(lr, lf, cfg.loss)
        loss = d
        m = {"gan/d_loss": d.detach(), "gan/logits_real": lr.detach().mean(), "gan/logits_fake": lf.detach().mean()}
        if cfg.lecam_weight > 0:
            ema = self._update_lecam(wrapper, lr, lf)
            reg = F.relu(lr - ema[1]).pow(2).mean() + F.relu(ema[0] - lf).pow(2).mean()
            loss = loss + cfg.lecam_weight * reg
            m["gan/lecam"] = reg.detach()
            m["gan/lecam_ema_real"], m["gan/lecam_ema_fake"] = ema[0].clone(), ema[1].clone()
        if r1_now:
            r1 = out["r1"].float()
            loss = loss + 0.5 * cfg.r1_weight * cfg.r1_every * r1     # lazy R1 (StyleGAN2)
            m["gan/r1"] = r1.detach()
        return loss, m

    @torch.no_grad()
    def _update_lecam(self, wrapper: nn.Module, lr: Tensor, lf: Tensor) -> Tensor:
        """EMA of the mean logits over all ranks (the same on every rank, so checkpoints hold it whole)."""
        import torch.distributed as dist

        means = torch.stack([lr.mean(), lf.mean()]).double()
        if dist.is_initialized() and dist.get_world_size() > 1:
            comm = means if dist.get_backend() == "nccl" else means.cpu()
            dist.all_reduce(comm)
            means = (comm / dist.get_world_size()).to(lr.device)
        buf = wrapper.lecam_ema
        decay = float(self.disc.lecam_decay)
        if float(buf[2]) == 0.0:
            buf[:2] = means.to(buf.dtype)
            buf[2] = 1.0
        else:
            buf[:2] = (decay * buf[:2].double() + (1 - decay) * means).to(buf.dtype)
        return buf[:2].detach().float()
