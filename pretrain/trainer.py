"""The Trainer: ONE loop for both stages (torchtitan's ``Trainer``; the objective owns the loss).

Owns the run: the process group and per-rank logs, seeds, the loader (image shards for a
tokenizer, code shards for a prior), the model from the registry, its DeepSpeed engine(s) and EMA,
resume from ``RUN_DIR/checkpoints/latest``, the step loop with gradient accumulation, guard rails,
validation and visuals, metrics, checkpoints and ``status.json``.

A step is the objective's ``train_step`` (:mod:`pretrain.step`) over ``gradient_accumulation_steps``
micro-batches per rank: per micro-batch each engine's loss -> ``engine.backward(loss);
engine.step()``, DeepSpeed accumulating and stepping the optimizer at the boundary; it returns a
``StepReport`` that the Trainer's components read (guard rails, logs, cadence:
:mod:`pretrain.components`). Step numbers count finished optimizer steps (checkpoint
``step_00000100`` holds the state after 100 steps).

GAN tokenizer runs (``cfg.discriminator.model`` set; :mod:`pretrain.gan`): always two engines,
"generator" (the tokenizer, with the EMA) and "discriminator", each with its own optimizer,
schedule and ZeRO stage, both in every checkpoint, whatever the step count (the discriminator
idles before ``discriminator.start_step``). Skips are counted per engine
(``guard/disc_skipped_steps``; either engine's streak can stop the run). A checkpoint of the
older single-engine layout ("model", written by a GAN recipe that stopped before the start step)
loads into the generator (:func:`pretrain.checkpoint.load_checkpoint`). The resolver exports the
generator.

Exact resume: the checkpoint restores weights, optimizer, schedule, EMA, every rank's RNG and the
loader state; nothing between two steps draws from the training RNG (validation, visuals and the
creation of loader iterators run under ``torch.random.fork_rng``). So on the same world size a run
killed after step N continues bit-identically in fp32 on CPU (tested with SIGKILL).

Guard rails: a non-finite gradient makes the engine skip the optimizer step on every rank
(:mod:`pretrain.runtime`); the Trainer counts skips (``guard/skipped_steps``), does not update the EMA
on them, and after ``guard.max_consecutive_skips`` in a row saves a checkpoint and stops with
:class:`TrainingDiverged`. Codebook usage below the objective's threshold is logged as a warning.
SIGTERM/SIGUSR1 (Slurm pre-emption) stop every rank after the same step with a checkpoint.
Collectives time out after ``guard.collective_timeout_s``; each rank logs to ``logs/rank{r}.log``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist

from data_pipeline import storage
from data_pipeline.codes import code_loader, manifest_labels
from data_pipeline.images import image_loader
from data_pipeline.stream import check_lost_fraction
from model_zoo.grids import save_grid
from model_zoo.package import PackageError, load_package

from . import checkpoint as ckpt
from .config import ConfigError, apply_overrides, to_dict, write_resolved
from .distributed import init_distributed, process_stop_flag, setup_rank_logging
from .ema import EMA
from .flops import flops_at_step, peak_flops, step_flops_per_sample
from .gan import GANTokenizerObjective, build_discriminator, check_supported
from .metrics import MetricLogger, update_status
from .models import check_model_args, model_from_config
from .components import Guard, KeysFile, Profiler, due
from .objectives import COLLAPSE_METRIC, CaptionTokenizer, CollapseWatch, build_objective
from .optim import gradient_accumulation_steps
from .recipes import RunConfig, get_recipe
from .repro import run_metadata, seed_everything
from .resolve import ResolveError, as_package, check_model_path, tokenizer_identity
from .runtime import build_engine, check_deepspeed_version
from .step import MicroBatches, StepReport

log = logging.getLogger("vqscale.trainer")

__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "CheckpointSaveError"]


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; a checkpoint of the last good weights was written."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (the previous one stays ``latest``)."""


def _disk_note(run_dir: str, e: BaseException) -> str:
    """``" (no space left on DEVICE: N bytes free)"`` when a local run directory's disk is full:
    DeepSpeed's and torch's writers report a full disk as ``unexpected pos 7424 vs 7316``."""
    if storage.is_remote(run_dir):
        return ""
    import shutil

    try:
        free = shutil.disk_usage(storage.local_path(run_dir)).free
    except OSError:
        return ""
    full = free < 1 << 20 or getattr(e, "errno", None) == 28 or "No space left" in str(e)
    return f" (no space left on the run directory's disk: {free} bytes free)" if full else ""


@dataclass
class TrainResult:
    run_dir: str
    state: str                        # finished | stopped | diverged
    step: int
    last_checkpoint: str | None
    skipped_steps: int
    resumed_from: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0


# ---- building blocks (also used by the resolver and the demo) ----------------------------------

def _local_dir(run_dir: str) -> str:
    """A local folder for what only writes locally (rank logs, profiler traces, key audits)."""
    if not storage.is_remote(run_dir):
        return storage.local_path(run_dir)
    cache = os.environ.get("VQSCALE_CACHE") or os.path.expanduser("~/.cache/vqscale")
    return os.path.join(cache, "runs", hashlib.sha256(run_dir.encode()).hexdigest()[:16])


def _no_rng():
    """Run something without touching the training RNG (CPU and CUDA)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


def _new_window() -> dict[str, float]:
    """What the log interval accumulates: data wait, samples, tokens, steps, model FLOPs."""
    return {"t": time.perf_counter(), "wait": 0.0, "samples": 0, "tokens": 0, "steps": 0, "flops": 0.0}


def _add_to_window(window: dict[str, float], report: StepReport, flops_per_sample: float) -> None:
    window["wait"] += report.data_wait_s
    window["samples"] += report.samples
    window["tokens"] += report.tokens
    window["steps"] += 1
    window["flops"] += flops_per_sample * report.samples


def _mean_over_ranks(values: dict[str, torch.Tensor | float], device) -> dict[str, float]:
    """Means over ranks of same-keyed scalars (one all_reduce)."""
    keys = sorted(values)
    if not keys:
        return {}
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).detach().cpu() for k in keys]).to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.cpu().tolist()))


# ---- the Trainer --------------------------------------------------------------------------------

class Trainer:
    """``Trainer(cfg).fit()`` trains ``cfg`` to ``cfg.steps`` (resuming from the run directory)."""

    def __init__(self, cfg: RunConfig, progress: bool | None = None):
        if cfg.steps < 1:
            raise ValueError(f"steps must be >= 1, got {cfg.steps}")
        self.cfg = dataclasses.replace(cfg, run_dir=cfg.resolved_run_dir())
        self.progress = cfg.log.progress if progress is None else progress
        self.run_dir = self.cfg.run_dir
        check_model_args(cfg)
        check_storage(self.cfg)
        check_deepspeed_version()
        _check_init_from(cfg.checkpoint.init_from)
        check_prior_inputs(cfg)

    # -- setup ----------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        self.env = init_distributed(timeout_s=cfg.guard.collective_timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_dir = _local_dir(self.run_dir)
        setup_rank_logging(self.local_dir, self.rank)
        on_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
        self.reduce_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        seed_everything(cfg.seed, self.rank)
        self.micro = cfg.micro_batch_size or cfg.global_batch_size // self.world
        self.gas = gradient_accumulation_steps(cfg.global_batch_size, self.micro, self.world)
        if self.rank == 0:
            write_resolved(cfg, storage.join(self.run_dir, "config.json"),
                           extra={**run_metadata(), "world_size": self.world, "micro_batch_size": self.micro,
                                  "gradient_accumulation_steps": self.gas})
        self.loader, derived = self._make_loader(cfg.data.url, self.micro, cfg.seed, cfg.data.num_workers)
        self.derived = derived
        self.model = model_from_config(cfg, derived)
        self.tokenizer_identity: dict[str, str] | None = None   # a prior's tokenizer: {name, sha256, url}
        self.image_tokenizer = self._image_tokenizer()
        lcfg = cfg.tokenizer_loss if cfg.stage == "tokenizer" else cfg.prior_loss
        if cfg.stage == "tokenizer" and cfg.discriminator.model:
            # two engines: the tokenizer ("generator") and the discriminator (pretrain/gan.py)
            check_supported(cfg.deepspeed.zero_stage, cfg.discriminator)
            with _no_rng():       # its init never shifts the training RNG (and is the same on every rank)
                torch.manual_seed(cfg.seed + 1)
                disc = build_discriminator(cfg.discriminator)
            check_supported(cfg.deepspeed.zero_stage, cfg.discriminator, disc)
            self.objective = GANTokenizerObjective(lcfg, cfg.discriminator)
            self.objective.bind_discriminator(disc)            # before ZeRO-3 partitions it
            modules = {"generator": self.model, "discriminator": disc}
        else:
            self.objective = build_objective(cfg.stage, lcfg, image_tokenizer=self.image_tokenizer)
            modules = {"model": self.model}
        if cfg.stage == "prior" and getattr(getattr(self.model, "config", None), "text_encoder", None):
            self.loader.spec = dataclasses.replace(
                self.loader.spec, collate=CaptionTokenizer.for_prior(self.model).wrap(self.loader.spec.collate))
        self.engines = {}
        for name in self.objective.models:
            if name not in modules:
                raise NotImplementedError(f"objective needs an engine {name!r}: only {sorted(modules)} are built here")
            optim, ds = ((cfg.discriminator.optim, cfg.discriminator.deepspeed) if name == "discriminator"
                         else (cfg.optim, cfg.deepspeed))
            self.engines[name] = build_engine(modules[name], optim, ds, self.micro, cfg.global_batch_size, name=name)
        self.main = self.objective.models[0]          # the engine of the trained model: "model" or "generator"
        self.engine = self.engines[self.main]
        if cfg.compile:
            self.engine.compile()
        self.emas = {self.main: EMA(self.engine, cfg.ema.decay, cfg.ema.warmup)} if cfg.ema.decay > 0 else {}
        self.logger = MetricLogger(self.run_dir, rank=self.rank)
        self.val_loader = None
        if cfg.validation.url:
            self.val_loader, _ = self._make_loader(cfg.validation.url, self.micro, cfg.seed + 1, 0)
            self.val_state = self.val_loader.state_dict()
        self._collapse = CollapseWatch(every=10 * cfg.log.every)
        self.guard = Guard(self.objective.models, cfg.guard.max_consecutive_skips)

    def _make_loader(self, url: str, batch: int, seed: int, workers: int):
        cfg = self.cfg
        if not url:
            raise ValueError(f"run {cfg.name!r}: data.url is empty; point it at "
                             f"{'image' if cfg.stage == 'tokenizer' else 'code'} shards (--set data.url=...)")
        if cfg.stage == "tokenizer":
            dcfg = dataclasses.replace(cfg.data, url=url, num_workers=workers)
            return image_loader(dcfg, batch, seed=seed, device=self.device), {}
        d = cfg.data
        loader = code_loader(url, batch, seed=seed, num_workers=workers, shuffle_buffer=d.shuffle_buffer,
                             interleave=d.interleave, pin_memory=d.pin_memory, retries=d.retries,
                             retry_backoff=d.retry_backoff, retry_for_s=d.retry_for_s,
                             verify_checksums=d.verify_checksums)
        dec = loader.spec.decode
        derived = {"codebook_size": dec.codebook_size, "grid_size": dec.grid_size, "num_tokens": dec.num_tokens}
        return loader, derived

    def _image_tokenizer(self):
        if self.cfg.stage != "prior" or not self.cfg.tokenizer:
            return None
        url = as_package(self.cfg.tokenizer, kind="tokenizer")
        # Which tokenizer this prior models, by identity and by absolute location: the recorded
        # setting may be a path relative to wherever the run was started (see resolve.export_step).
        self.tokenizer_identity = tokenizer_identity(url)
        tok = load_package(url, device=self.device)
        return tok.eval().requires_grad_(False)

    def _resume(self) -> int | None:
        cfg = self.cfg
        res = None
        if cfg.checkpoint.resume:
            res = ckpt.load_checkpoint(self.run_dir, self.engines, emas=self.emas)
        if res is None and cfg.checkpoint.init_from:
            ckpt.load_checkpoint(cfg.checkpoint.init_from, self.engines, emas=self.emas, weights_only=True)
            log.info("warm start from %s (weights only)", cfg.checkpoint.init_from)
            return None
        if res is None:
            return None
        if res.loader_state is not None:
            self.loader.load_state_dict(res.loader_state)
        self.guard.restore(res.meta.get("trainer", {}))
        self.step = res.step
        self.samples_seen = res.samples_seen
        return res.step

    # -- pieces of a step -----------------------------------------------------------------------
    def _batches(self) -> Iterator[dict]:
        while True:
            # The DataLoader draws its base seed from the global RNG when it starts, i.e. at the
            # first next() of the (lazy) loader iterator: keep that out of the training RNG.
            with _no_rng():
                it = iter(self.loader)
                first = next(it, None)
            if first is None:
                raise RuntimeError(f"the training data {self.cfg.data.url} yielded no batch")
            yield first
            yield from it

    def _validate(self) -> dict[str, float]:
        self.val_loader.load_state_dict(self.val_state)
        sums: dict[str, float] = {}
        with _no_rng():
            it = iter(self.val_loader)
            for _ in range(self.cfg.validation.batches):
                for k, v in self.objective.validation(self.engines, next(it), self.step).items():
                    sums[k] = sums.get(k, 0.0) + v
        means = {k: v / self.cfg.validation.batches for k, v in sums.items()}
        val = _mean_over_ranks(means, self.reduce_device)
        self.logger.scalars(self.step, val, prefix="val/")
        log.info("step %d validation: %s", self.step,
                 ", ".join(f"{k}={v:.4g}" for k, v in sorted(val.items()) if k.startswith("loss")))
        return val

    def _visual_batch(self) -> dict:
        """A fixed batch for the grids: the first of the validation data, else of the training
        data (a separate loader, so the training stream is untouched)."""
        if self.val_loader is not None:
            self.val_loader.load_state_dict(self.val_state)
            loader = self.val_loader
        else:
            loader, _ = self._make_loader(self.cfg.data.url, self.micro, self.cfg.seed + 2, 0)
        with _no_rng():
            return next(iter(loader))

    def _visuals(self, batch: dict) -> None:
        ema = self.emas.get(self.main)
        with _no_rng(), (ema.swapped_in() if ema is not None else contextlib.nullcontext()):
            grids = self.objective.visuals(self.engines, batch)
        for name, images in grids.items():
            self.logger.images(self.step, f"visuals/{name}", images)
            if self.rank == 0:
                save_grid(images, storage.join(self.run_dir, "samples", f"{name}_{ckpt.step_name(self.step)}.png"))

    def _save(self, metrics: dict[str, float]) -> str:
        self.guard.settle()
        state = self.loader.state_dict()
        try:
            url = ckpt.save_checkpoint(self.run_dir, self.step, self.engines, emas=self.emas,
                                       samples_seen=int(state["samples"]), loader_state=state,
                                       config=to_dict(self.cfg), metrics=metrics,
                                       keep_last=self.cfg.checkpoint.keep_last,
                                       extra_meta={"trainer": dict(self.guard.counters),
                                                   "trainer_model_args": self.derived,
                                                   "tokenizer_package": self.tokenizer_identity})
        except Exception as e:
            raise CheckpointSaveError(f"saving the checkpoint of step {self.step} into {self.run_dir} failed"
                                      f"{_disk_note(self.run_dir, e)}: {one_line_reason(e)}") from e
        self.last_checkpoint = url
        self.logger.flush()              # what a checkpoint covers is also in metrics.jsonl and tb/
        self._status("running")
        return url

    def _status(self, state: str, reason: str | None = None) -> None:
        """``status.json``: state, step, last checkpoint, the data totals of the last log point
        and, for a failed run, ``reason`` (the error's one line)."""
        if self.rank != 0:
            return
        job = {"job_id": os.environ["SLURM_JOB_ID"]} if os.environ.get("SLURM_JOB_ID") else {}
        totals = getattr(self, "_data", None)
        data = _status_data(totals) if totals else {}
        update_status(self.run_dir, state=state, step=self.step, steps=self.cfg.steps,
                      last_checkpoint=self.last_checkpoint, world_size=self.world,
                      skipped_steps=self.guard.counters["skipped_steps"], **job, **data,
                      **({"reason": reason} if reason else {}), drop=() if reason else ("reason",))
        self._data_in_status = dict(totals or {})

    def _failed_before_the_loop(self, e: BaseException) -> None:
        """Setup or resume failed: ``status.json`` says so, with the reason (rank 0; never raises)."""
        rank = getattr(self, "rank", None)
        if rank is None:
            rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
        if rank != 0:
            return
        try:
            update_status(self.run_dir, state="failed", step=self.step, steps=self.cfg.steps,
                          last_checkpoint=self.last_checkpoint, reason=one_line_reason(e))
        except Exception as err:  # noqa: BLE001 - the run's own error is the one to report
            log.error("could not write %s/status.json: %s", self.run_dir, one_line_reason(err))
        with contextlib.suppress(Exception):
            self.logger.close()

    def _memory(self) -> dict[str, float]:
        out = {"memory/host_max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        if self.device.type == "cuda":
            out["memory/gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return out

    # -- the loop -------------------------------------------------------------------------------
    def _start(self) -> tuple[int | None, dict | None]:
        """Set up and resume: (the step resumed at or None, the fixed batch of the visuals)."""
        cfg = self.cfg
        try:
            self._setup()
            resumed = self._resume()
            if resumed is not None:
                self.last_checkpoint = ckpt.latest_step_url(self.run_dir)
            log.info("run %s: %s %s, %d steps, global batch %d = %d ranks x %d micro x %d accumulation%s",
                     self.run_dir, cfg.stage, cfg.model, cfg.steps, cfg.global_batch_size, self.world, self.micro,
                     self.gas, f", resumed at step {resumed}" if resumed is not None else "")
            self._status("running")     # from the start: a run that fails before its first checkpoint says so too
            return resumed, (self._visual_batch() if cfg.validation.visuals_every > 0 else None)
        except BaseException as e:
            self._failed_before_the_loop(e)
            raise

    def _check_diverged(self, last_metrics: dict[str, float]) -> None:
        """After an engine's ``guard.max_consecutive_skips`` skipped steps in a row: a checkpoint
        of the last good weights, then :class:`TrainingDiverged`."""
        diverged = self.guard.diverged()
        if diverged is None:
            return
        self._save(last_metrics)
        raise TrainingDiverged(
            f"{diverged[0]} non-finite steps{diverged[1]} in a row at step {self.step} "
            f"(guard.max_consecutive_skips={self.cfg.guard.max_consecutive_skips}); the weights of the "
            f"last good step are saved in {self.last_checkpoint}. Lower optim.lr, raise "
            f"optim.warmup_steps or check the data, then resume")

    def fit(self) -> TrainResult:
        t_start = time.time()
        self.step, self.last_checkpoint, self.samples_seen = 0, None, 0
        self._data: dict[str, float] = {}            # the loader's data totals at the last log point
        self._data_in_status: dict[str, float] = {}
        cfg = self.cfg
        resumed, visual_batch = self._start()
        stop = process_stop_flag().install()
        keys = KeysFile(self.local_dir, self.rank, cfg.log.record_keys)
        profiler = Profiler(cfg.log.profile_start, cfg.log.profile_steps, os.path.join(self.local_dir, "profile"),
                            self.rank, self.device.type == "cuda")
        bar = None
        if self.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {cfg.name}", unit="step", dynamic_ncols=True)
        peak = None if os.environ.get("DS_ACCELERATOR") == "cpu" and not cfg.log.peak_tflops else \
            peak_flops(self.device, cfg.log.peak_tflops or None)
        flops = step_flops_per_sample(cfg, self.derived) if peak is not None else None
        state, last_metrics, reason = "finished", {}, None
        window = _new_window()
        batches = self._batches()
        try:
            while self.step < cfg.steps:
                profiler.before_step(self.step)
                report = self.objective.train_step(
                    self.engines, MicroBatches(batches, self.gas, keys=cfg.log.record_keys), self.step,
                    poison=self.step + 1 in cfg.guard.inject_nan_steps and self.rank == 0)
                self.step += 1
                profiler.after_step(self.step)
                if self.guard.observe(self.step, report):
                    for ema in self.emas.values():
                        ema.update()
                keys.write(self.step, report.keys)
                self.samples_seen += report.samples * self.world
                _add_to_window(window, report, flops_at_step(flops, cfg, self.step - 1) if flops is not None else 0.0)
                if due(self.step, cfg.log.every, cfg.steps) or self.step == 1:
                    last_metrics = self._log(report.metrics, window, peak, bar)
                    window = _new_window()
                if bar is not None:
                    bar.update(1)
                if self.val_loader is not None and due(self.step, cfg.validation.every):
                    self._validate()
                if visual_batch is not None and due(self.step, cfg.validation.visuals_every):
                    self._visuals(visual_batch)
                self._check_diverged(last_metrics)
                if stop.should_stop():
                    state = "stopped"
                    self._save(last_metrics)
                    log.warning("stopped by %s after step %d; checkpoint %s", stop.reason or "a signal",
                                self.step, self.last_checkpoint)
                    break
                if due(self.step, cfg.checkpoint.every, cfg.steps):
                    self._save(last_metrics)
            if self.step >= cfg.steps and self.last_checkpoint is None:
                self._save(last_metrics)      # resumed a finished run: nothing to do
        except BaseException as e:
            state = "diverged" if isinstance(e, TrainingDiverged) else "failed"
            reason = one_line_reason(e)
            raise
        finally:
            # A failed run ends within seconds, with status "failed" and its reason: the loader's
            # workers go first (they used to outlive an error by WORKER_TERM_GRACE_S), and no
            # step of the cleanup may hide the error or keep the status from being written
            # (a full disk fails the logger's flush too).
            cleanup = [batches.close, stop.uninstall, profiler.stop, bar.close if bar is not None else None,
                       keys.close, self.guard.settle, lambda: self._status(state, reason), self.logger.close]
            for fn in cleanup:
                if fn is None:
                    continue
                try:
                    fn()
                except Exception as cleanup_error:  # noqa: BLE001 - the run's own outcome wins
                    # (a failed device must not hide the real error either: the counters are a report)
                    if state in ("finished", "stopped") and fn != self.guard.settle:
                        raise
                    log.error("while ending a %s run: %s", state, one_line_reason(cleanup_error))
        return TrainResult(run_dir=self.run_dir, state=state, step=self.step, last_checkpoint=self.last_checkpoint,
                           skipped_steps=self.guard.counters["skipped_steps"], resumed_from=resumed,
                           metrics=last_metrics, wall_s=time.time() - t_start)

    def _log(self, metrics: dict[str, torch.Tensor], window: dict, peak: float | None, bar=None) -> dict[str, float]:
        """A log point: the step's metrics and the window's rates, means over ranks, to
        metrics.jsonl, TensorBoard and the progress bar; new data defects also to status.json,
        and the data-loss policy judged."""
        self.guard.settle()
        out = _mean_over_ranks(metrics, self.reduce_device)
        dt = max(1e-9, time.perf_counter() - window["t"])
        extra = {"images_per_s": window["samples"] * self.world / dt,
                 "data_wait_fraction": window["wait"] / dt,
                 "step_time_s": dt / max(1, window["steps"])}
        if window["tokens"]:
            extra["tokens_per_s"] = window["tokens"] * self.world / dt
        extra = _mean_over_ranks(extra, self.reduce_device)   # per-rank estimates of global rates
        out.update(extra)
        for name, engine in self.engines.items():
            prefix = "gan/" if name == "discriminator" else ""
            out[f"{prefix}lr"] = float(engine.get_lr()[0])
            gn = engine.get_global_grad_norm()
            if gn is not None:
                out[f"{prefix}grad_norm"] = float(gn)
        out.update(self.guard.metrics())
        # (the loader's samples_seen is the global count at its last load plus this rank's since)
        out["samples_seen"] = float(self.samples_seen)
        # What the data cost so far, over ranks and across resumes (a collective): each defect
        # reason, lost samples and their fraction (the give-up policy judges it after the log).
        self._data = self.loader.data_totals()
        out.update({f"data/{k}": v for k, v in self._data.items() if k != "samples"})
        if peak is not None:
            out["mfu"] = window["flops"] / dt / peak
        out.update(self._memory())
        if self._collapse.update(self.step, out.get(COLLAPSE_METRIC, 0.0) > 0):
            log.warning("step %d: codebook collapse: %.1f%% of the codes the batch could use are in use",
                        self.step, 100 * out.get("codebook/usage_of_possible", float("nan")))
        self.logger.scalars(self.step, out)
        if self.rank == 0 and not self.progress:
            log.info("step %d: loss %.4f, %.1f img/s, data wait %.0f%%", self.step, out.get("loss", math.nan),
                     out["images_per_s"], 100 * out["data_wait_fraction"])
        if bar is not None:
            lost = {k: int(self._data.get(k, 0)) for k in ("defects", "lost_samples")}
            bar.set_postfix(loss=f"{out.get('loss', float('nan')):.4f}", skipped=self.guard.counters["skipped_steps"],
                            **{("lost" if k == "lost_samples" else k): v for k, v in lost.items() if v})
        if self.rank == 0 and _counts(self._data) != _counts(self._data_in_status):
            self._status("running")       # new defects or losses: visible where users look
        check_lost_fraction(self._data, self.cfg.data.max_lost_fraction, self.cfg.data.retry_for_s)
        return out


def one_line_reason(e: BaseException) -> str:
    """An error as the one line ``status.json`` keeps: ``Type: first line``. An error re-raised
    from a loader worker (``Caught X in DataLoader worker process N.`` and the worker's traceback)
    gives the worker's own last line."""
    text = str(e).strip()
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    if lines and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        return lines[-1][:1000]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")[:1000]


def _counts(totals: dict[str, float]) -> dict[str, float]:
    """The defect and loss counts of data totals (not the samples delivered, which always grow)."""
    return {k: v for k, v in totals.items() if k not in ("samples", "lost_fraction")}


def _status_data(totals: dict[str, float]) -> dict[str, Any]:
    """The data totals as ``status.json`` shows them: samples, defects and lost samples, each
    defect reason and ``filtered`` that is not zero, and the lost fraction."""
    counts = {k: int(v) for k, v in totals.items()
              if k not in ("lost_fraction", "samples") and (v or k in ("defects", "lost_samples"))}
    return {"data": {"samples": int(totals.get("samples", 0)), **counts,
                     "lost_fraction": round(totals.get("lost_fraction", 0.0), 6)}}


def _check_init_from(url: str) -> None:
    """A warm start that would load nothing is a config error, found before anything starts (a
    mistyped path or a file that is not a checkpoint used to train from scratch after logging
    "warm start from ...")."""
    if url and ckpt.resolve_step_url(url) is None:
        raise ConfigError(f"checkpoint.init_from={url!r}: no checkpoint there; give a run directory (its "
                          "checkpoints/latest), its checkpoints/ folder or a step folder (step_NNNNNNNN)")


def check_storage(cfg: RunConfig) -> None:
    """The run's S3 buckets (data, validation, run directory, tokenizer, warm start) usable:
    :func:`data_pipeline.storage.check_access`, before anything starts (a StorageError: one line)."""
    if cfg.data.s3_endpoint_url:
        storage.configure("s3", endpoint_url=cfg.data.s3_endpoint_url)
    storage.check_access(cfg.data.url, cfg.validation.url, cfg.run_dir, cfg.tokenizer, cfg.checkpoint.init_from)


def check_prior_inputs(cfg: RunConfig) -> None:
    """A prior run's tokenizer and class count, checked before anything starts (and by ``vqscale
    submit`` before queueing): ``tokenizer`` must be a tokenizer's zoo package, run directory or
    step folder (a pickle there failed inside the run's setup), and a class-conditional prior must
    have a class for every label its code shards record (it failed at step 1)."""
    if cfg.stage != "prior":
        return
    if cfg.tokenizer:
        try:
            check_model_path(cfg.tokenizer, kind="tokenizer")
        except PackageError as e:      # a package, damaged: the message says how to write it again
            raise ConfigError(f"tokenizer={cfg.tokenizer!r}: {e}") from None
        except ResolveError as e:
            raise ConfigError(f"tokenizer={cfg.tokenizer!r}: {e}; give the tokenizer's zoo package (a folder "
                              f"with config.json and model.safetensors: `vqscale zoo export RUN_DIR --out DIR` "
                              f"writes one), its run directory or a step folder") from None
    _check_class_count(cfg)


def _check_class_count(cfg: RunConfig) -> None:
    if cfg.prior_loss.condition == "unconditional":
        return
    found = {}
    for url in (cfg.data.url, cfg.validation.url):
        if url:
            found.update(manifest_labels(url))
    if not found:
        return
    root, (lo, hi) = max(found.items(), key=lambda kv: kv[1][1])
    try:
        num = getattr(model_from_config(cfg, device="meta"), "num_classes", None)
    except (TypeError, ValueError):
        return          # check_model_args reports bad model_args
    if isinstance(num, int) and hi >= num:
        raise ConfigError(f"the code shards at {root} have labels {lo}..{hi} ({hi + 1} classes) but the prior "
                          f"{cfg.model!r} has {num} classes: set --set model.num_classes={hi + 1}")


def run_train(recipe: str, overrides=(), run_dir: str | None = None, resume: bool = True) -> TrainResult:
    """``vqscale train``: a recipe plus ``--set`` overrides, trained (resuming by default)."""
    cfg = apply_overrides(get_recipe(recipe), list(overrides))
    if run_dir:
        cfg = dataclasses.replace(cfg, run_dir=run_dir)
    if not resume:
        cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=False))
    return Trainer(cfg).fit()
