"""Generation quality of a prior: sample, decode with its image tokenizer, score the images.

Metrics (all on rank 0, over every sample of the run):

- FID (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium", 2017): Inception pool features of the samples against reference statistics
  (``ref_stats``, an .npz of ``mu``/``sigma`` from ``vqscale eval ref-stats``).
- Inception Score (Salimans et al., "Improved Techniques for Training GANs", 2016): softmax of
  the Inception logits, 10 splits.
- KID (Bińkowski et al., 2018) and improved precision/recall (Kynkäänniemi et al., "Improved
  Precision and Recall Metric for Assessing Generative Models", 2019) need the reference
  *features*: reference statistics hold only ``mu``/``sigma``, so these run only when
  ``ref_features`` (an .npz with ``pool`` [N, 2048]) is given, and are skipped with a note otherwise.
- On the demo digits (``digits_judge=True``): class accuracy (fraction of samples that the
  offline judge of evals/digits.py classifies as the class they were asked for, digits 0-9 only)
  and a "digits FID" in the judge's 128-d feature space against the held-out real digits.

Protocol. VIM (Yu et al. 2021) and ADM (Dhariwal & Nichol 2021) report FID/IS on 50,000 samples
against ImageNet training-set statistics; fewer samples bias FID upwards (a 2048-d covariance is
poorly estimated), so small runs are for tracking, not tables. Sample ``i`` (0-based, over the
run) draws its tokens from ``model_zoo.sampling.sample_seeds(seed, i)`` with counter-based noise,
so its tokens depend neither on the batch size nor on the number of processes; of ``W``
processes, rank ``r`` generates the ``i`` with ``i % W == r``, scores them, and sends only
features to rank 0, which orders them by index. Class-conditional priors get label
``i % num_classes`` by default ("balanced": equal counts when ``num_samples`` is a multiple of
``num_classes``, as ADM's 50 per ImageNet class). Images are quantized to 8 bits (as a PNG of
them would be) before any network sees them.
"""

from __future__ import annotations

import os
import time
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from data_pipeline import storage
from model_zoo.grids import save_grid
from model_zoo.package import CHECKSUMS, load_prior_with_tokenizer, read_config
from model_zoo.sampling import SamplingConfig, sample_seeds
from pretrain.distributed import detect_env, init_distributed, rank_world
from pretrain.sample import resolve_prior, text_encoder_of

from .digits import NUM_DIGITS, load_digits_judge, real_digits
from .inception import RESIZE, InceptionWeightsNotFound, load_inception, to_uint8
from .report import sibling_url, write_result
from .stats import feature_stats, frechet_distance, inception_score, kid, load_ref_stats, precision_recall

__all__ = ["Shard", "rank_indices", "resolve_labels", "generate_sharded", "gather_to_rank0", "evaluate_generation"]

GRID_IMAGES = 64
REFERENCE_NUM_SAMPLES = 50_000
IS_SPLITS = 10
KID_SUBSET = 1000
PR_K = 3
SEEDING_RULE = ("sample i: tokens from model_zoo.sampling.sample_seeds(seed, i) with counter-based noise "
                "(independent of batch size and world size); rank r of W generates the i with i % W == r")


class Shard(NamedTuple):
    """One rank's samples: ``images`` float [n, 3, H, W] in [-1, 1] on CPU (None when not decoded),
    global ``indices`` and ``labels`` (long [n], -1 = unconditional / text), ``codes`` (long [n, N])
    and ``positions`` (masked priors, else None)."""

    images: torch.Tensor | None
    indices: torch.Tensor
    labels: torch.Tensor
    codes: torch.Tensor
    positions: torch.Tensor | None


def rank_indices(num_samples: int, rank: int, world_size: int) -> torch.Tensor:
    """The global sample indices rank ``rank`` generates: ``i % world_size == rank`` (strided, so
    every rank's share differs by at most one and the first samples are spread over all ranks)."""
    return torch.arange(rank, int(num_samples), int(world_size), dtype=torch.long)


def resolve_labels(prior, indices: torch.Tensor, class_labels: Any = None) -> torch.Tensor:
    """Class label of each sample index: None or ``"balanced"`` -> ``i % num_classes``; an int ->
    that class for all; a list -> ``class_labels[i % len]`` (``[-1]``: unconditional). Text priors
    get -1 (their condition is the prompt)."""
    if text_encoder_of(prior) is not None:
        if class_labels not in (None, "balanced"):
            raise ValueError("class_labels given for a text-conditional prior: use prompts")
        return torch.full_like(indices, -1)
    num_classes = int(prior.num_classes)
    if class_labels is None or class_labels == "balanced":
        return indices % num_classes
    table = torch.as_tensor([class_labels] if isinstance(class_labels, int) else list(class_labels),
                            dtype=torch.long).reshape(-1)
    if table.numel() == 0 or bool(((table < -1) | (table >= num_classes)).any()):
        raise ValueError(f"class_labels must be non-empty and in [-1, {num_classes}), got {class_labels}")
    return table[indices % table.numel()]


def _batches(prior, image_tokenizer, indices: torch.Tensor, labels: torch.Tensor, prompts, sampling, seed: int,
             batch_size: int, decode: bool = True, timing: dict | None = None):
    """Yield ``(indices, labels, codes, positions, images)`` per batch of this rank's samples."""
    device = next(prior.parameters()).device
    enc = text_encoder_of(prior)
    table = [""] if prompts is None else [prompts] if isinstance(prompts, str) else list(prompts)  # "": unconditional
    if (enc is None and prompts is not None) or not table:
        raise ValueError("prompts must be non-empty and are for text-conditional priors (else: class_labels)")
    for lo in range(0, len(indices), batch_size):
        idx, lab = indices[lo:lo + batch_size], labels[lo:lo + batch_size]
        cond = (lab.to(device) if enc is None else
                {"tokens": enc.tokenize([table[int(i) % len(table)] for i in idx]).to(device)})
        t0 = time.perf_counter()
        with torch.no_grad():
            gen = prior.generate(cond, len(idx), sampling, sample_seeds(seed, idx).to(device))
        codes, positions = gen if isinstance(gen, tuple) else (gen, None)   # Stackformer: (codes, positions)
        if timing is not None:
            timing["generate_s"] = timing.get("generate_s", 0.0) + time.perf_counter() - t0
        with torch.no_grad():
            images = image_tokenizer.decode(codes, positions).float() if decode else None
        yield idx, lab, codes, positions, images


def _load_pair(prior_pkg_path: str, device) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, str]]:
    """``(prior, image_tokenizer, {name, sha256, package})``, the sha256 that of the checksums file (which
    lists every file, the tokenizer's too), as evals/codebook.py identifies tokenizers."""
    import hashlib

    url = resolve_prior(prior_pkg_path)
    sha = hashlib.sha256(storage.read_bytes(storage.join(url, CHECKSUMS))).hexdigest()
    prior, image_tokenizer = load_prior_with_tokenizer(url, device=device)
    return prior.eval(), image_tokenizer.eval(), {"name": read_config(url)["name"], "package": url, "sha256": sha}


def _default_device(device) -> torch.device:
    # DS_ACCELERATOR=cpu: a CPU (gloo) job even where a GPU is visible, as pretrain.distributed reads it.
    if device is None and torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        return torch.device("cuda", torch.cuda.current_device())   # init_distributed set it per rank
    return torch.device(device or "cpu")


def generate_sharded(prior_pkg_path, num_samples: int, sampling, seed: int = 0, class_labels: Any = None,
                     prompts: str | Sequence[str] | None = None, batch_size: int = 16, device=None,
                     decode: bool = True) -> Shard:
    """This rank's share of ``num_samples`` samples (see :func:`rank_indices`; one process: all),
    generated ``batch_size`` at a time. ``prior_pkg_path``: a zoo package, run directory or step
    folder, or an already loaded ``(prior, image_tokenizer)`` pair. Labels: :func:`resolve_labels`;
    prompts (text priors): ``prompts[i % len]``, default the empty caption."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    if isinstance(prior_pkg_path, tuple):
        prior, image_tokenizer = prior_pkg_path
    else:
        prior, image_tokenizer, _ = _load_pair(prior_pkg_path, _default_device(device))
    rank, world = rank_world()
    indices = rank_indices(num_samples, rank, world)
    labels = resolve_labels(prior, indices, class_labels)
    parts = list(_batches(prior, image_tokenizer, indices, labels, prompts, sampling, seed, batch_size, decode))
    # None: nothing of that kind (not decoded, not masked), or no samples on this rank at all.
    cat = [None if not parts or parts[0][k] is None else torch.cat([p[k].cpu() for p in parts]) for k in range(5)]
    return Shard(cat[4], indices, labels, cat[2], cat[3])


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (rank order), None elsewhere. gather_object rather
    than all_gather: only rank 0 scores, and 50k x 2048 features need not be on every rank."""
    rank, world = rank_world()
    out = [obj] if world == 1 else [None] * world if rank == 0 else None
    if world > 1:
        torch.distributed.gather_object(obj, out, dst=0)
    return out


def _on_rank0(fn, what: str):
    """``fn()`` on rank 0; if it raises, every rank raises (rather than wait 30 min in a collective)."""
    result, error = None, None
    try:
        result = fn() if rank_world()[0] == 0 else None
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        error = e
    if rank_world()[1] > 1:
        box = [None if error is None else f"{what}: {type(error).__name__}: {error}"]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            raise RuntimeError(f"rank 0 failed: {box[0]}")
    if error is not None:
        raise error
    return result


def _load_refs(ref_stats: str | None, ref_features: str | None) -> dict[str, Any]:
    refs: dict[str, Any] = {}
    if ref_stats is not None:
        refs["stats"] = load_ref_stats(ref_stats)
    if ref_features is not None:
        with storage.open(ref_features, "rb") as f, np.load(f, allow_pickle=False) as npz:
            if "pool" not in npz.files:
                raise KeyError(f"{ref_features} has no 'pool' features; its keys are {sorted(npz.files)}")
            refs["pool"] = np.asarray(npz["pool"], dtype=np.float64)
    return refs


def _num(x) -> float | None:
    return float(x) if np.isfinite(float(x)) else None   # JSON has no NaN


def _inception(inception_weights, device, notes: list[str]):
    try:
        return load_inception(inception_weights, device=device)
    except InceptionWeightsNotFound as e:
        if inception_weights is not None:   # asked for explicitly: a missing file is an error
            raise
        notes.append(f"FID/IS/KID/precision-recall skipped: no Inception weights. {' '.join(str(e).split())}")
        return None


def _inception_metrics(pool, logits, refs, ident, resolution, device, notes) -> dict[str, Any]:
    n = pool.shape[0]
    out: dict[str, Any] = {}
    probs = torch.from_numpy(logits).double().softmax(1).numpy()
    out["is_mean"], out["is_std"] = (_num(v) for v in inception_score(probs, splits=min(IS_SPLITS, n)))
    ref = refs.get("stats")
    if ref is None and "pool" in refs and refs["pool"].shape[0] >= 2:
        ref = dict(zip(("mu", "sigma"), feature_stats(refs["pool"])), meta={})
    if ref is None:
        notes.append("FID skipped: no reference statistics (ref_stats) or features (ref_features)")
    elif n < 2:
        notes.append(f"FID skipped: {n} sample(s), a covariance needs at least 2")
    else:
        sha = ref["meta"].get("weights_sha256")
        if sha and sha != ident["weights_sha256"]:
            notes.append("reference statistics were computed with other Inception weights "
                         f"({sha[:12]} vs {ident['weights_sha256'][:12]}): FID is not comparable")
        if ref["meta"].get("resolution") not in (None, resolution):
            notes.append(f"reference statistics are at {ref['meta']['resolution']} px, samples at {resolution} px")
        out["fid"] = _num(frechet_distance(*feature_stats(pool), ref["mu"], ref["sigma"]))
        if n <= pool.shape[1]:
            notes.append(f"FID from {n} samples of {pool.shape[1]}-d features: rank-deficient covariance, "
                         f"biased upwards; published numbers use {REFERENCE_NUM_SAMPLES:,} samples")
    if "pool" not in refs:
        notes.append("KID and precision/recall skipped: reference statistics hold only mu/sigma; "
                     "pass ref_features (an .npz with 'pool' [N, 2048]) for them")
    else:
        real = refs["pool"]
        m = min(KID_SUBSET, n, real.shape[0])
        if m >= 2:
            out["kid_mean"], out["kid_std"] = (_num(v) for v in kid(real, pool, subset_size=m))
        if min(n, real.shape[0]) > PR_K:
            out["precision"], out["recall"] = (_num(v) for v in precision_recall(real, pool, k=PR_K, device=device))
        else:
            notes.append(f"precision/recall skipped: needs more than k={PR_K} samples per set")
    return out


def _digits_metrics(feats, logits, labels, judge, notes) -> dict[str, Any]:
    ok = (labels >= 0) & (labels < NUM_DIGITS)
    out: dict[str, Any] = {"judged": int(ok.sum()), "skipped": int((~ok).sum())}
    if ok.any():
        pred = logits.argmax(1)
        probs = torch.from_numpy(logits).softmax(1).numpy()
        out["class_accuracy"] = float((pred[ok] == labels[ok]).mean())
        out["confidence"] = float(probs[ok, labels[ok]].mean())
        out["per_class"] = {str(c): {"n": int((labels == c).sum()), "accuracy": float((pred[labels == c] == c).mean())}
                            for c in np.unique(labels[ok])}
    else:
        out["class_accuracy"] = None
        notes.append("class accuracy skipped: no sample was asked for a digit class 0-9")
    real = judge.features(real_digits("heldout")[0]).double().numpy()
    out["num_real"] = int(real.shape[0])
    if feats.shape[0] >= 2:
        out["fid"] = _num(frechet_distance(*feature_stats(feats), *feature_stats(real)))
    else:
        notes.append("digits FID skipped: fewer than 2 samples")
    return out


@torch.no_grad()
def evaluate_generation(ckpt: str, out_url: str | None = None, num_samples: int = REFERENCE_NUM_SAMPLES,
                        ref_stats: str | None = None, ref_features: str | None = None,
                        inception_weights: str | None = None, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0, guidance: float = 1.0, use_cache: bool = True, seed: int = 0,
                        batch_size: int = 32, digits_judge: bool = False, class_labels: Any = None,
                        prompts: str | Sequence[str] | None = None, device=None,
                        progress: bool = True) -> dict[str, Any]:
    """Sample ``num_samples`` images from the prior at ``ckpt`` and score them (module doc).

    Under torchrun/srun every rank calls this (the process group is started when it is not yet);
    each scores its own samples and rank 0 computes the metrics from all features, writes
    ``out_url`` (JSON) and ``<stem>_grid.png`` (the first 64 samples by index), and every rank
    returns the same dict. ``inception_weights`` None: the cached weights, or FID/IS skipped with
    a note when there are none; a path: it must load. ``ref_features``: an .npz with ``pool``
    for KID and precision/recall (and FID when ``ref_stats`` is not given)."""
    t_start = time.perf_counter()
    if rank_world()[1] == 1 and detect_env().world_size > 1:   # launched by torchrun/srun, group not up yet
        init_distributed()
    rank, world = rank_world()
    device = _default_device(device)
    sampling = SamplingConfig(temperature, top_k, top_p, guidance_scale=guidance, use_cache=use_cache)
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    notes: list[str] = []
    inception = _inception(inception_weights, device, notes)
    # Read the references before generating for hours, and on rank 0 only (50k x 2048 features).
    refs = _on_rank0(lambda: _load_refs(ref_stats, ref_features), "reading the reference files") or {}
    judge = load_digits_judge() if digits_judge else None
    prior, image_tokenizer, identity = _load_pair(ckpt, device)

    indices = rank_indices(num_samples, rank, world)
    labels = resolve_labels(prior, indices, class_labels)
    timing: dict[str, float] = {}
    keep: dict[str, list] = {"indices": [], "labels": [], "pool": [], "logits": [], "jfeat": [], "jlogits": []}
    grid: list[tuple[torch.Tensor, torch.Tensor]] = []
    resolution = None
    with tqdm(total=len(indices), desc="generation", unit="img", disable=not progress or rank != 0) as bar:
        for idx, lab, _, _, images in _batches(prior, image_tokenizer, indices, labels, prompts, sampling, seed,
                                               batch_size, timing=timing):
            # Quantize once: the networks score the 8-bit images a user would save.
            images = to_uint8(images).float().div_(127.5).sub_(1.0)
            resolution = int(images.shape[-1])
            batch = {"indices": idx, "labels": lab}
            if inception is not None:
                batch.update(inception(images))   # pool, logits
            if judge is not None:
                batch["jfeat"] = judge.features(images)
                batch["jlogits"] = judge.model.head(batch["jfeat"])   # eval mode: head(features) = logits
            for k, v in batch.items():
                keep[k].append(v.float().cpu().numpy() if v.is_floating_point() else v.numpy())
            first = idx < GRID_IMAGES
            if first.any():
                grid.append((idx[first], to_uint8(images[first.to(images.device)]).cpu()))
            bar.update(len(idx))
    parts = gather_to_rank0({**{k: np.concatenate(v) if v else None for k, v in keep.items()},
                             "grid": grid, "timing": timing})

    result: dict[str, Any] | None = None
    if rank == 0:
        # Every rank's samples in sample-index order (a rank with no samples sends None).
        cat = {k: np.concatenate([p[k] for p in parts if p[k] is not None]) if parts[0][k] is not None else None
               for k in keep}
        order = np.argsort(cat["indices"])
        allk = {k: None if v is None else v[order] for k, v in cat.items()}
        if not np.array_equal(allk["indices"], np.arange(num_samples)):
            raise RuntimeError("the ranks' sample indices do not cover 0..num_samples-1 exactly once")
        metrics = dict.fromkeys(("fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall"))
        ident = inception.identity() if inception is not None else None
        if inception is not None:
            metrics.update(_inception_metrics(allk["pool"], allk["logits"], refs, ident, resolution, device, notes))
        digits = (_digits_metrics(allk["jfeat"], allk["jlogits"], allk["labels"], judge, notes)
                  if judge is not None else None)
        gen_s = max(p["timing"].get("generate_s", 0.0) for p in parts)
        enc = text_encoder_of(prior)
        result = {
            "protocol": {
                "task": "generation", "ckpt": ckpt, "prior": identity,
                "tokenizer": getattr(image_tokenizer, "registry_name", type(image_tokenizer).__name__),
                "num_samples": int(num_samples), "reference_num_samples": REFERENCE_NUM_SAMPLES,
                "resolution": resolution, "resize": RESIZE, "quantization": "8-bit, as saved to PNG",
                "sampling": {"temperature": temperature, "top_k": top_k, "top_p": top_p,
                             "guidance": guidance, "use_cache": use_cache},
                "seed": int(seed), "seeding": SEEDING_RULE, "world_size": world, "batch_size": batch_size,
                "device": str(device),
                "condition": ({"prompts": prompts if prompts is not None else ""} if enc is not None else
                              {"class_labels": class_labels if class_labels is not None else "balanced",
                               "rule": "balanced: sample i gets class i % num_classes; list: labels[i % len]",
                               "num_classes": int(prior.num_classes)}),
                "feature_extractor": ident,
                "ref_stats": None if ref_stats is None else {"url": ref_stats, "meta": refs["stats"]["meta"]},
                "ref_features": (None if ref_features is None else
                                 {"url": ref_features, "num_images": int(refs["pool"].shape[0])}),
                "digits_judge": None if judge is None else {
                    "path": judge.path, "heldout_accuracy": judge.meta.get("heldout_accuracy"),
                    "reference": "evals.digits.real_digits('heldout')"},
            },
            **metrics,
            "class_accuracy": None if digits is None else digits["class_accuracy"],
            "digits_fid": None if digits is None else digits.get("fid"),
            "digits": digits,
            "notes": notes,
            "seconds": round(time.perf_counter() - t_start, 3),
            "tokens_per_s": (round(num_samples * int(prior.num_tokens) / gen_s, 1) if gen_s > 0 else None),
        }
        if out_url is not None:
            shown = sorted(((int(i), img) for p in parts for ids, imgs in p["grid"] for i, img in zip(ids, imgs)),
                           key=lambda t: t[0])
            grid_url = sibling_url(out_url, "_grid.png")
            save_grid(torch.stack([img for _, img in shown]).float().div(127.5).sub(1.0), grid_url)
            write_result(result, out_url, {"grid": grid_url}, identity["package"])
    if world > 1:
        box = [result]
        torch.distributed.broadcast_object_list(box, src=0)   # every rank returns rank 0's result
        result = box[0]
    return result
