"""``vqscale eval ...``: the command line of the evaluation jobs (each imported only when it runs).

Every metric takes ``--ckpt`` (zoo package, run directory or step folder; one resolver) and
writes ``--out`` (JSON, with its PNG plots next to it). Submitted through ``vqscale submit`` they
run as separate jobs, a ``--sweep`` over checkpoints making a job array.
"""

from __future__ import annotations

import argparse
import json
import sys

from data_pipeline import storage

METRICS = ("reconstruction", "generation", "codebook", "linear-probe", "clip-score", "ref-stats")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="metric", metavar="METRIC", required=True)

    def common(q, data: bool = True):
        q.add_argument("--ckpt", required=True, help="zoo package, run directory or step folder")
        if data:
            q.add_argument("--data", required=True, help="image dataset (folder, prefix or URL)")
        q.add_argument("--out", required=True, help="results JSON path or URL (plots go next to it)")
        q.add_argument("--batch-size", type=int, default=32)
        q.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")

    r = sub.add_parser("reconstruction", help="rFID, PSNR, SSIM, LPIPS and codebook health of a tokenizer")
    common(r)
    r.add_argument("--inception-weights", default=None,
                   help="FID Inception weights file (default: $VQSCALE_CACHE/weights; rFID is skipped if absent)")
    r.add_argument("--resolution", type=int, default=None, help="default: the tokenizer's image size")
    r.add_argument("--max-images", type=int, default=None)

    c = sub.add_parser("codebook", help="codebook usage, perplexity and dead codes over a whole dataset")
    common(c)
    c.add_argument("--resolution", type=int, default=None)
    c.add_argument("--max-images", type=int, default=None)

    g = sub.add_parser("generation", help="FID, IS, KID, precision/recall of a prior's samples")
    common(g, data=False)
    g.add_argument("--ref-stats", default=None, help="reference statistics .npz (ours or the ADM evaluator's)")
    g.add_argument("--ref-features", default=None, help="reference pool features .npz (`pool`): adds KID, precision/recall")
    g.add_argument("--inception-weights", default=None)
    g.add_argument("--num-samples", type=int, default=50000, help="default 50000 (the published protocol)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--guidance", type=float, default=1.0)
    g.add_argument("--class-labels", default="balanced", metavar="SPEC",
                   help="class-conditional priors: 'balanced' (sample i gets class i %% C, the default), "
                        "a list and ranges ('0-9', '1,4,7'; sample i gets the (i %% n)-th) or -1 (unconditional)")
    g.add_argument("--prompts", default=None,
                   help="text-conditional priors: a text file (one prompt per line) or URL; sample i gets "
                        "prompt i %% n (default: the empty caption)")
    g.add_argument("--digits-judge", action="store_true",
                   help="also score samples with the offline digits classifier (demo data)")

    lp = sub.add_parser("linear-probe", help="top-1 of a linear classifier on each block's features")
    common(lp)
    lp.add_argument("--test-data", required=True, help="held-out split (labels from .cls)")
    lp.add_argument("--max-samples", type=int, default=None)
    lp.add_argument("--layers", default=None,
                    help="comma-separated block indices, or 'all' (default: the paper's probe block for vim-base "
                         "(10 of 24) and vim-large (15 of 36), every block for other priors and tokenizers)")
    lp.add_argument("--images-train", default=None, help="image shards for the raw-pixel baseline of a prior")
    lp.add_argument("--images-test", default=None)

    cs = sub.add_parser("clip-score", help="CLIP score of a text-conditional prior's samples")
    common(cs, data=False)
    cs.add_argument("--prompts", required=True, help="a text file (one prompt per line) or URL")
    cs.add_argument("--clip-model", default="ViT-B-32")
    cs.add_argument("--clip-weights", default=None,
                    help="open_clip weights file or URL (default: $VQSCALE_CACHE/weights/MODEL.safetensors|.bin|.pt)")
    cs.add_argument("--clip-overrides", default=None, metavar="JSON",
                    help="a custom architecture: top-level config fields (embed_dim, vision_cfg, text_cfg) replacing "
                         "the bundled ones, as JSON text or a .json file")
    cs.add_argument("--num-per-prompt", type=int, default=4)
    cs.add_argument("--seed", type=int, default=0)
    cs.add_argument("--guidance", type=float, default=1.0)

    rs = sub.add_parser("ref-stats", help="Inception statistics of a dataset for FID (computed once)")
    rs.add_argument("--data", required=True)
    rs.add_argument("--out", required=True, help="stats .npz path or URL")
    rs.add_argument("--inception-weights", default=None)
    rs.add_argument("--resolution", type=int, default=None, help="centre crop side (default 256)")
    rs.add_argument("--max-images", type=int, default=None)
    rs.add_argument("--batch-size", type=int, default=64)
    rs.add_argument("--device", default=None)


def parse_class_labels(spec: str):
    """``balanced`` -> None; ``0-9,12`` -> [0, ..., 9, 12]; ``-1`` -> [-1] (unconditional)."""
    spec = spec.strip()
    if spec == "balanced":
        return None
    labels: list[int] = []
    try:
        for part in spec.split(","):
            a, sep, b = part.strip().partition("-") if not part.strip().startswith("-") else (part.strip(), "", "")
            labels += list(range(int(a), int(b) + 1)) if sep else [int(a)]
    except ValueError:
        raise ValueError(f"--class-labels {spec!r}: expected 'balanced', -1 or integers and ranges like 0-9,12") from None
    if not labels:
        raise ValueError(f"--class-labels {spec!r} names no class")
    return labels


def _features(weights: str | None, device):
    from .inception import InceptionWeightsNotFound, load_inception

    try:
        return load_inception(weights, device=device)
    except InceptionWeightsNotFound as e:
        if weights:                     # a file the user named must exist
            raise
        print(f"vqscale eval: no Inception weights, FID-type metrics are skipped ({str(e).splitlines()[0]})",
              file=sys.stderr)
        return None


def main_eval(args) -> int:
    # Each metric's module (torch, model_zoo, pretrain's resolver) is imported lazily, inside the
    # branch of _run (and here, _features) that runs it: `vqscale --help` imports this module for
    # its arguments and must stay fast (DESIGN.md), and a metric loads only its own modules.
    from .inception import InceptionWeightsNotFound

    try:
        result = _run(args)
    except (InceptionWeightsNotFound, FileNotFoundError, ValueError) as e:
        print(f"vqscale: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(_summary(result), indent=2))
    return 0


def _summary(result: dict) -> dict:
    """The headline numbers for the console: scalars, and those of the metric blocks one level
    down (``codebook.usage``); the full result is in the JSON file."""
    out = {}
    for k, v in result.items():
        if isinstance(v, (int, float, str)) or v is None:
            out[k] = v
        elif isinstance(v, dict) and k not in ("protocol", "files", "defects"):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float, str))})
    return out


def _run(args) -> dict:
    m = args.metric
    if m == "ref-stats":
        from .inception import compute_ref_stats

        st = compute_ref_stats(args.data, args.out, inception_weights=args.inception_weights,
                               resolution=args.resolution, max_images=args.max_images,
                               batch_size=args.batch_size, device=args.device)
        return {"out": args.out, **st["meta"]}
    if m == "reconstruction":
        from .reconstruction import evaluate_reconstruction

        feats = _features(args.inception_weights, args.device)
        return evaluate_reconstruction(args.ckpt, args.data, args.out, features=feats, resolution=args.resolution,
                                       batch_size=args.batch_size, max_images=args.max_images, device=args.device)
    if m == "codebook":
        from .codebook import evaluate_codebook

        return evaluate_codebook(args.ckpt, args.data, args.out, resolution=args.resolution,
                                 batch_size=args.batch_size, max_images=args.max_images, device=args.device)
    if m == "generation":
        from .clip_score import read_prompts
        from .generation import evaluate_generation

        prompts = read_prompts(args.prompts) if args.prompts else None
        return evaluate_generation(args.ckpt, args.out, num_samples=args.num_samples, ref_stats=args.ref_stats,
                                   ref_features=args.ref_features,
                                   inception_weights=args.inception_weights, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, guidance=args.guidance, seed=args.seed,
                                   batch_size=args.batch_size, digits_judge=args.digits_judge,
                                   class_labels=parse_class_labels(args.class_labels), prompts=prompts,
                                   device=args.device)
    if m == "linear-probe":
        from .probe import evaluate_linear_probe

        layers = None
        if args.layers:
            layers = "all" if args.layers.strip() == "all" else [int(x) for x in args.layers.split(",")]
        return evaluate_linear_probe(args.ckpt, args.data, args.test_data, args.out, layers=layers,
                                     max_samples=args.max_samples, batch_size=args.batch_size, device=args.device,
                                     images_train=args.images_train, images_test=args.images_test)
    if m == "clip-score":
        from .clip_score import evaluate_clip_score

        overrides = None
        if args.clip_overrides:
            text = args.clip_overrides
            overrides = json.loads(storage.read_text(text) if text.endswith(".json") else text)
        return evaluate_clip_score(args.ckpt, args.prompts, args.out, num_per_prompt=args.num_per_prompt,
                                   seed=args.seed, guidance=args.guidance, clip_model=args.clip_model,
                                   clip_weights=args.clip_weights, clip_overrides=overrides,
                                   batch_size=args.batch_size, device=args.device)
    raise AssertionError(m)
