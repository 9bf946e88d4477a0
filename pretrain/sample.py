"""``vqscale sample``: images from a prior, decoded by its image tokenizer, as a PNG grid.

The prior's package holds its image tokenizer (model_zoo/package.py), so one path gives both. Every
sample ``i`` (0-based, over the whole run) draws its tokens with the seed
``sampling.sample_seeds(seed, i)`` and the priors' counter-based sampling noise, so sample ``i``
gets the same tokens whatever ``--batch-size`` is, and the same command writes a byte-identical
PNG (eval mode, no dropout; PNG encoding carries no timestamp). Two caveats, both float rounding:
the tokenizer's conv kernels may round differently for another batch size (MQ-VAE: ~1e-5, which
can move a pixel by one level of 255), and on GPU a near-tie between two tokens' logits can flip
when the batch size changes the matmul reduction order. Byte-identical grids therefore need the
same ``--batch-size`` and device.

Conditions: ``--class C`` for class-conditional priors (VIM, Stackformer; ``-1`` is the
unconditional null class) and ``--prompt TEXT`` for text priors, tokenized by the prior's own
frozen text encoder (``""`` is the unconditional caption). ``--guidance`` is the
classifier-free guidance scale (1 = plain conditional sampling). ``--position-top-k`` /
``--position-top-p`` filter Stackformer's position draws apart from its codes (the official
sampler: ``--top-k 100 --position-top-k 10 --top-p 0.95``).

Rejection sampling (VIM, Yu et al. 2021): with ``--accept RATE < 1`` and a classifier
(``--classifier digits-judge``, the offline judge of the demo digits; from Python, any callable
``classifier(images, labels) -> scores``), ``ceil(num / RATE)`` candidates are drawn (candidate
``i`` from seed ``(seed, i)``, as always), the classifier scores them (higher is better) and the
``num`` best-scored are kept, in candidate order (:func:`rejection_sample`).

The summary line (stdout, JSON): ``num``, ``seconds`` (the whole job: loading, generation, decoding, writing),
``tokens_per_s`` (prior tokens generated per second of generation alone), ``out`` and the
sampling settings.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import torch

from model_zoo.grids import DEFAULT_NCOL, save_grid
from model_zoo.package import load_prior_with_tokenizer
from model_zoo.sampling import SamplingConfig, keep_best, num_candidates, sample_seeds

from .resolve import ResolveError, as_package


# ---------------------------------------------------------------------------------- priors

class SampleError(ValueError):
    """A sampling request that cannot be served (bad path, condition the prior does not take)."""


def resolve_prior(path: str) -> str:
    """The zoo package URL for ``path``: a package, a run directory (its latest checkpoint) or a
    step folder (exported once, :func:`pretrain.resolve.as_package`); it must hold a prior."""
    try:
        return as_package(path, kind="prior")
    except ResolveError as e:
        raise SampleError(f"--prior {e}") from None


def text_encoder_of(prior: torch.nn.Module):
    """The frozen text encoder of a text-conditional prior, else None."""
    enc = getattr(prior, "text_encoder", None)
    return enc if enc is not None and hasattr(enc, "tokenize") else None


def make_condition(prior: torch.nn.Module, batch_size: int, class_label: int | None = None,
                   prompt: str | None = None, device: torch.device | str = "cpu"):
    """The prior's condition for a batch: class labels ``[B]`` or ``{"tokens": [B, L]}``."""
    if (class_label is None) == (prompt is None):
        raise SampleError("give exactly one of a class label or a prompt")
    enc = text_encoder_of(prior)
    if prompt is not None:
        if enc is None:
            raise SampleError(f"{getattr(prior, 'registry_name', type(prior).__name__)} is class-conditional: "
                              "use --class, not --prompt")
        return {"tokens": enc.tokenize([prompt] * batch_size).to(device)}
    if enc is not None:
        raise SampleError(f"{getattr(prior, 'registry_name', type(prior).__name__)} is text-conditional: "
                          "use --prompt, not --class")
    num_classes = getattr(prior, "num_classes", None)
    if class_label < -1 or (num_classes is not None and class_label >= num_classes):
        raise SampleError(f"class {class_label} is out of range: the prior has {num_classes} classes "
                          "(-1 = unconditional)")
    return torch.full((batch_size,), int(class_label), dtype=torch.long, device=device)


@torch.no_grad()
def sample_images(prior, image_tokenizer, num: int, sampling, seed: int = 0, batch_size: int = 16,
                  class_label: int | None = None, prompt: str | None = None, progress: bool = True,
                  start_index: int = 0) -> tuple[torch.Tensor, float]:
    """``num`` images ``[num, 3, H, W]`` on CPU and the seconds spent in ``prior.generate``.

    Sample ``start_index + i`` is drawn with ``sample_seeds(seed, start_index + i)`` (so shards of
    one big request, e.g. one per rank, give the images the single request would)."""
    from tqdm import tqdm

    if num < 1 or batch_size < 1:
        raise SampleError(f"--num and --batch-size must be >= 1, got {num} and {batch_size}")
    device = next(prior.parameters()).device
    out, gen_s = [], 0.0
    with tqdm(total=num, desc="sampling", unit="img", disable=not progress) as bar:
        for lo in range(0, num, batch_size):
            b = min(batch_size, num - lo)
            idx = torch.arange(start_index + lo, start_index + lo + b, dtype=torch.long)
            seeds = sample_seeds(seed, idx).to(device)
            cond = make_condition(prior, b, class_label, prompt, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            gen = prior.generate(cond, b, sampling, seeds)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            gen_s += time.perf_counter() - t0
            codes, positions = gen if isinstance(gen, tuple) else (gen, None)   # Stackformer: (codes, positions)
            images = image_tokenizer.decode(codes.to(device), None if positions is None else positions.to(device))
            out.append(images.float().cpu())
            bar.update(b)
    return torch.cat(out), gen_s


Classifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def rejection_sample(prior, image_tokenizer, num: int, sampling, classifier: Classifier, acceptance_rate: float,
                     seed: int = 0, batch_size: int = 16, class_label: int | None = None,
                     prompt: str | None = None, progress: bool = True) -> tuple[torch.Tensor, float, dict[str, Any]]:
    """VIM's rejection sampling: ``num`` images kept of ``ceil(num / acceptance_rate)``
    candidates (:func:`sample_images`, candidate ``i`` from seed ``(seed, i)``), the ones that
    ``classifier(images [b, 3, H, W] in [-1, 1], labels long [b]) -> scores [b]`` scores highest
    (labels: the requested class, -1 for a prompt or the null class). Returns the kept images,
    the seconds in ``prior.generate`` and ``{acceptance_rate, candidates, kept, scores}``
    (``kept``: candidate indices, ascending)."""
    if classifier is None:
        raise SampleError("rejection sampling (an acceptance rate below 1) needs a classifier")
    try:
        n = num_candidates(num, acceptance_rate)
    except ValueError as e:
        raise SampleError(str(e)) from None
    images, gen_s = sample_images(prior, image_tokenizer, n, sampling, seed=seed, batch_size=batch_size,
                                  class_label=class_label, prompt=prompt, progress=progress)
    label = -1 if class_label is None else int(class_label)
    scores = []
    for lo in range(0, n, batch_size):
        part = images[lo:lo + batch_size]
        s = torch.as_tensor(classifier(part, torch.full((len(part),), label, dtype=torch.long)))
        if s.shape != (len(part),):
            raise SampleError(f"the classifier returned scores of shape {tuple(s.shape)} for {len(part)} images")
        scores.append(s.detach().float().cpu())
    scores = torch.cat(scores)
    kept = keep_best(scores, num)
    return images[kept], gen_s, {"acceptance_rate": float(acceptance_rate), "candidates": n,
                                 "kept": kept.tolist(), "scores": scores.tolist()}


def run_sample(prior: str, out: str, num: int, class_label: int | None = None, prompt: str | None = None,
               seed: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               guidance: float = 1.0, batch_size: int = 16, use_cache: bool = True,
               device: str | None = None, ncol: int = DEFAULT_NCOL, progress: bool = True,
               position_top_k: int | None = None, position_top_p: float | None = None,
               acceptance_rate: float = 1.0, classifier: Classifier | None = None) -> dict[str, Any]:
    """The ``vqscale sample`` job: load, generate, decode, write the grid; returns the summary.
    ``acceptance_rate < 1`` with a ``classifier``: :func:`rejection_sample`."""
    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SampleError("--device cuda: no CUDA device is available")
    try:
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                                  guidance_scale=guidance, use_cache=use_cache,
                                  position_top_k=position_top_k, position_top_p=position_top_p)
    except ValueError as e:
        raise SampleError(str(e)) from None
    if acceptance_rate != 1.0 and classifier is None:
        raise SampleError("--accept below 1 needs a classifier to score the samples (--classifier)")
    url = resolve_prior(prior)
    model, image_tokenizer = load_prior_with_tokenizer(url, device=device)
    rejection = None
    if acceptance_rate != 1.0:
        images, gen_s, info = rejection_sample(model, image_tokenizer, num, sampling, classifier, acceptance_rate,
                                               seed=seed, batch_size=batch_size, class_label=class_label,
                                               prompt=prompt, progress=progress)
        rejection = {k: info[k] for k in ("acceptance_rate", "candidates", "kept")}
    else:
        images, gen_s = sample_images(model, image_tokenizer, num, sampling, seed=seed, batch_size=batch_size,
                                      class_label=class_label, prompt=prompt, progress=progress)
    save_grid(images, out, ncol=ncol)
    tokens = (rejection["candidates"] if rejection else num) * int(model.num_tokens)
    return {
        "num": num,
        "seconds": round(time.perf_counter() - t0, 3),
        "tokens_per_s": round(tokens / gen_s, 1) if gen_s > 0 else None,
        "out": out,
        "prior": getattr(model, "registry_name", None),
        "condition": {"prompt": prompt} if prompt is not None else {"class": class_label},
        "seed": seed,
        "device": device,
        "sampling": {"temperature": temperature, "top_k": top_k, "top_p": top_p,
                     "guidance": guidance, "use_cache": use_cache,
                     "position_top_k": position_top_k, "position_top_p": position_top_p},
        "rejection": rejection,
        "image_size": list(images.shape[-2:]),
    }


def main_sample(args, classifier: Classifier | None = None) -> int:
    """CLI glue: ``args`` from the ``sample`` sub-parser of pretrain/cli.py; ``classifier`` the
    one ``--classifier`` named (pretrain/cli.py builds it: pretrain does not import evals)."""
    summary = run_sample(args.prior, args.out, args.num, class_label=args.class_label, prompt=args.prompt,
                         seed=args.seed, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         guidance=args.guidance, batch_size=args.batch_size, use_cache=not args.no_cache,
                         device=args.device, position_top_k=args.position_top_k,
                         position_top_p=args.position_top_p, acceptance_rate=args.accept,
                         classifier=classifier)
    print(json.dumps(summary), flush=True)
    return 0
