"""The ``vqscale`` command: one verb per job, each module imported only when its verb runs.

This is the one place that sees every package (DESIGN.md). Errors a user can fix (a bad
override, a dataset URL with no shards) end the command with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

EPILOG = """examples:
  vqscale demo --quick
  vqscale data build-demo --out s3://bucket/demo
  vqscale data shard --src ~/images --out s3://bucket/mydata --shard-size 256MB --resize 384
  vqscale data inspect s3://bucket/mydata
  vqscale sample --prior s3://bucket/zoo/vim-base --class 207 --num 16 --out grid.png
  vqscale tokenize --tokenizer s3://bucket/zoo/vit-vqgan-ss --data s3://bucket/mydata --out s3://bucket/mydata-codes
  vqscale submit --cluster slurm --nodes 16 --gpus-per-node 8 -- train --recipe vim-base
  vqscale status runs/vim-base
  vqscale zoo export runs/vim-base --out runs/vim-base/export   then   vqscale zoo publish runs/vim-base/export --zoo s3://bucket/zoo
"""


def _kv_floats(items: Sequence[str], flag: str) -> dict[str, float]:
    out = {}
    for item in items or ():
        k, sep, v = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[k] = float(v)
        except ValueError:
            raise SystemExit(f"vqscale: error: {flag} expects FIELD=NUMBER, got {item!r}") from None
    return out


def _recipe_names() -> list[str]:
    from .recipes import list_recipes       # lazy, as every package here: see main()

    return list_recipes()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vqscale", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Pretrain discrete image tokenizers and autoregressive priors, laptop to cluster.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    d = sub.add_parser("demo", help="the main job on embedded defaults (CPU, bundled images)",
                       description="Both stages end to end on a CPU: build the demo dataset, train a tiny "
                                   "ViT-VQGAN, tokenize, train a tiny class-conditional VIM and sample a grid, "
                                   "under runs/demo. A second run resumes finished stages instead of redoing them. "
                                   "--set tokenizer.K=V / prior.K=V override the two training recipes.")
    d.add_argument("--quick", action="store_true", help="a smaller dataset and fewer steps (about 3 minutes)")
    d.add_argument("--data", default=None, metavar="URL",
                   help="where the demo dataset goes (default RUN/data; e.g. s3://bucket/demo)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set data.resolution=32 (repeatable)")

    tr = sub.add_parser("train", help="train a tokenizer or a prior from a recipe (resumes from latest)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Train RECIPE with DeepSpeed on every rank torchrun or Slurm started (or one "
                                    "process). A run directory that has a checkpoint is resumed from its latest one "
                                    "(exactly, on the same world size; through DeepSpeed's universal format on "
                                    "another). SIGTERM/SIGUSR1/SIGUSR2 stop after the current step with a checkpoint.",
                        epilog="recipes: " + ", ".join(_recipe_names()))
    tr.add_argument("--recipe", required=True, help="recipe name (see the list below); -tiny ones run on a CPU")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set optim.lr=1e-4 --set data.url=s3://b/laion; a field "
                         "of the model preset's config: --set model.quantizer.codebook_size=1024 (repeatable)")
    tr.add_argument("--run-dir", default=None, help="run directory, local or URL (default runs/RECIPE)")
    tr.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints of the run directory")

    data = sub.add_parser("data", help="build, shard and inspect datasets")
    dsub = data.add_subparsers(dest="data_verb", metavar="ACTION", required=True)
    b = dsub.add_parser("build-demo", help="write the demo dataset (images shipped in scikit-learn/-image)")
    b.add_argument("--out", required=True, help="output folder or URL (e.g. s3://bucket/demo)")
    b.add_argument("--quick", action="store_true", help="about 400 samples instead of about 2,400")
    b.add_argument("--shard-samples", type=int, default=100, help="samples per shard (default 100)")
    b.add_argument("--seed", type=int, default=0)

    s = dsub.add_parser("shard", help="pack an image folder or img2dataset output into shards")
    s.add_argument("--src", required=True, help="image folder (class sub-folders = labels) or .tar shards")
    s.add_argument("--out", required=True, help="output folder or URL")
    s.add_argument("--shard-size", default="256MB", help="target shard size (default 256MB)")
    s.add_argument("--shard-samples", type=int, default=None, help="also cap samples per shard")
    s.add_argument("--resize", type=int, default=0, help="pre-resize: shorter side down to N pixels")
    s.add_argument("--prefix", default="data", help="shard name prefix (default data)")

    i = dsub.add_parser("inspect", help="read a whole dataset and print a JSON summary")
    i.add_argument("url", help="dataset folder, prefix, brace pattern or mixture")
    i.add_argument("--threads", type=int, default=4, help="shards read at once (default 4)")
    i.add_argument("--min-width", type=int, default=0)
    i.add_argument("--min-height", type=int, default=0)
    i.add_argument("--min-aspect", type=float, default=0.0)
    i.add_argument("--max-aspect", type=float, default=0.0)
    i.add_argument("--field-min", action="append", default=[], metavar="FIELD=X",
                   help="drop samples whose metadata FIELD < X (e.g. similarity=0.28)")
    i.add_argument("--field-max", action="append", default=[], metavar="FIELD=X",
                   help="drop samples whose metadata FIELD > X (e.g. pwatermark=0.8)")
    i.add_argument("--out", default=None, help="also write the JSON here")

    sm = sub.add_parser("sample", help="sample images from a prior and write a PNG grid",
                        description="Load a prior's zoo package (and the tokenizer inside it), generate "
                                    "--num images in batches and write them as one PNG grid. Sample i draws "
                                    "its tokens from the seed derived from (--seed, i), whatever the batch size.")
    sm.add_argument("--prior", required=True, help="the prior's zoo package (folder or URL)")
    cond = sm.add_mutually_exclusive_group(required=True)
    cond.add_argument("--class", dest="class_label", type=int, help="class label (-1 = unconditional)")
    cond.add_argument("--prompt", help="caption, for text-conditional priors (\"\" = unconditional)")
    sm.add_argument("--num", type=int, required=True, help="number of images")
    sm.add_argument("--out", required=True, help="PNG grid path or URL")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    sm.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    sm.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    sm.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    sm.add_argument("--position-top-k", type=int, default=None,
                    help="Stackformer: top-k of the position draws (default: --top-k; official: 10)")
    sm.add_argument("--position-top-p", type=float, default=None,
                    help="Stackformer: top-p of the position draws (default: --top-p; official: 0.95)")
    sm.add_argument("--accept", type=float, default=1.0, metavar="RATE",
                    help="rejection sampling (VIM): draw ceil(num / RATE) candidates and keep the num that "
                         "--classifier scores highest (default 1.0: off)")
    sm.add_argument("--classifier", choices=["digits-judge"], default=None,
                    help="the classifier of --accept: digits-judge (the offline judge of the demo digits; "
                         "score = log-probability of the requested digit)")
    sm.add_argument("--batch-size", type=int, default=16, help="images generated at once (default 16)")
    sm.add_argument("--no-cache", action="store_true", help="recompute every step (no KV cache)")
    sm.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")

    tk = sub.add_parser("tokenize", help="encode image shards into code shards (stage-2 input)",
                        description="Run a trained tokenizer over image shards on every rank (under torchrun each "
                                    "rank takes shards j % world == rank) and write one code shard per image shard, "
                                    "with the same name, under --out, then manifest.json. Resumable: finished code "
                                    "shards are skipped. An --out made by another tokenizer is refused.")
    tk.add_argument("--tokenizer", required=True, help="the tokenizer's zoo package (folder or URL)")
    tk.add_argument("--data", required=True, help="image dataset (folder/prefix with manifest.json, brace pattern, .tar)")
    tk.add_argument("--out", required=True, help="output folder or URL for the code shards")
    tk.add_argument("--batch-size", type=int, default=64, help="images encoded at once (default 64)")
    tk.add_argument("--resolution", type=int, default=None,
                    help="centre-crop side in pixels (default: the tokenizer's image_size)")
    tk.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    tk.add_argument("--text-encoder", default=None, metavar="NAME",
                    help="also cache per-token caption embeddings (KEY.txtemb.npy) from this registered text encoder")
    tk.add_argument("--limit-shards", type=int, default=None, metavar="N", help="only the first N shards of --data")
    tk.add_argument("--decode-threads", type=int, default=None, help="image decoding threads (default min(8, CPUs))")

    from evals.cli import add_arguments as add_eval_arguments

    ev = sub.add_parser("eval", help="metrics of a checkpoint: reconstruction, generation, codebook, "
                                     "linear-probe, clip-score, ref-stats",
                        description="Checkpoint in (zoo package, run directory or step folder), metrics JSON and "
                                    "PNG plots out. Weights that only exist online (Inception, LPIPS, CLIP) are "
                                    "read from a path or $VQSCALE_CACHE/weights, never downloaded.")
    add_eval_arguments(ev)

    from cluster.submit import EPILOG as SUBMIT_EPILOG
    from cluster.submit import add_arguments as add_submit_arguments

    sb = sub.add_parser("submit", help="run a verb as a cluster job (Slurm through submitit, or local)",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SUBMIT_EPILOG,
                        description="Submit `vqscale VERB ARGS` as a job: one task per GPU on --nodes nodes "
                                    "(Slurm), or the same number of processes here (--cluster local). The "
                                    "command is checked before submission. Pre-emption and time limits "
                                    "checkpoint and requeue the job; --dry-run prints the sbatch script.")
    add_submit_arguments(sb)
    zoo = sub.add_parser("zoo", help="export a run as a zoo package; publish, list and pull packages",
                         description="Model-zoo packages: config.json + model.safetensors + README.md + "
                                     "checksums.sha256 (the layout Hugging Face Hub tooling expects). --zoo "
                                     "defaults to $VQSCALE_ZOO; pulled packages go to $VQSCALE_CACHE/zoo.")
    zsub = zoo.add_subparsers(dest="zoo_verb", metavar="ACTION", required=True)
    ze = zsub.add_parser("export", help="consolidate a run's checkpoint (any ZeRO stage) into a package")
    ze.add_argument("run_dir", help="run directory (its latest checkpoint, or --step) or step folder")
    ze.add_argument("--out", required=True, help="package folder or URL")
    ze.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the latest)")
    ze.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                    help="--ema: the EMA weights (an error if the run kept none); --no-ema: the live weights "
                         "(default: EMA when the run kept one)")
    ze.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                    help="dtype of the saved floating-point weights (default fp32)")
    ze.add_argument("--tokenizer", default=None,
                    help="a prior's tokenizer (package, run dir or step folder; default: the one its run recorded)")
    zp = zsub.add_parser("publish", help="copy a package into a zoo and index it")
    zp.add_argument("package", help="package folder or URL")
    zp.add_argument("--zoo", default=None, help="zoo root, local or URL (default $VQSCALE_ZOO)")
    zp.add_argument("--name", default=None, help="name in the zoo (default: the package's registry name)")
    zl = zsub.add_parser("list", help="the packages of a zoo")
    zl.add_argument("zoo", nargs="?", default=None, help="zoo root (default $VQSCALE_ZOO)")
    zl.add_argument("--json", action="store_true", help="print the entries as JSON")
    zu = zsub.add_parser("pull", help="download a package into the local cache, verified")
    zu.add_argument("name")
    zu.add_argument("--zoo", default=None, help="zoo root (default $VQSCALE_ZOO)")
    zu.add_argument("--cache", default=None, help="cache folder (default $VQSCALE_CACHE, else ~/.cache/vqscale)")

    st = sub.add_parser("status", help="print a run's or job's status.json and its queue state")
    st.add_argument("run_dir", help="run directory or job folder (local or URL)")
    st.add_argument("--json", action="store_true", help="print the raw JSON")
    return p


def _data(args) -> int:
    from data_pipeline import storage

    if args.data_verb == "build-demo":
        from data_pipeline.demo import build_demo

        m = build_demo(args.out, quick=args.quick, shard_samples=args.shard_samples, seed=args.seed)
        print(json.dumps({"out": args.out, "shards": len(m["shards"]), "samples": m["samples"],
                          "bytes": m["bytes"]}))
        return 0
    if args.data_verb == "shard":
        from data_pipeline.pack import pack

        m = pack(args.src, args.out, shard_size=args.shard_size, shard_samples=args.shard_samples,
                 resize=args.resize, prefix=args.prefix)
        print(json.dumps({"out": args.out, "shards": len(m["shards"]), "samples": m["samples"],
                          "bytes": m["bytes"], "defects": m["defects"]["total"]}))
        return 0
    if args.data_verb == "inspect":
        from data_pipeline.config import FilterConfig
        from data_pipeline.inspection import inspect_dataset

        filters = FilterConfig(min_width=args.min_width, min_height=args.min_height,
                               min_aspect=args.min_aspect, max_aspect=args.max_aspect,
                               field_min=_kv_floats(args.field_min, "--field-min"),
                               field_max=_kv_floats(args.field_max, "--field-max"))
        summary = inspect_dataset(args.url, filters=filters, threads=args.threads)
        text = json.dumps(summary, indent=2)
        if args.out:
            storage.write_text(args.out, text + "\n")
        print(text)
        return 0
    raise AssertionError(args.data_verb)


def _zoo(args) -> int:
    from model_zoo import zoo
    from model_zoo.package import PackageError, read_config

    from .resolve import ResolveError, export_run
    from .safe_load import UnsafeCheckpointError

    try:
        if args.zoo_verb == "export":
            import torch

            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
            out = export_run(args.run_dir, args.out, step=args.step, ema=args.ema, dtype=dtype,
                             tokenizer=args.tokenizer)
            meta = read_config(out)
            print(json.dumps({"out": out, "name": meta["name"], "kind": meta["kind"], "dtype": meta["dtype"],
                              "step": meta["card"].get("step"), "weights": meta["card"].get("weights")}))
            return 0
        if args.zoo_verb == "publish":
            entry = zoo.publish(args.package, args.zoo, name=args.name)
            print(json.dumps({k: entry[k] for k in ("name", "model", "kind", "path", "checksums_sha256")}))
            return 0
        if args.zoo_verb == "list":
            entries = zoo.list_entries(args.zoo)
            print(json.dumps(entries, indent=2) if args.json else zoo.format_entries(entries))
            return 0
        if args.zoo_verb == "pull":
            print(zoo.pull(args.name, args.zoo, cache=args.cache))
            return 0
    except (PackageError, ResolveError, FileNotFoundError, UnsafeCheckpointError) as e:
        print(f"vqscale: error: {e}", file=sys.stderr)
        return 2
    raise AssertionError(args.zoo_verb)


def _demo_closing_line(m: dict) -> str:
    """The demo's last line: the numbers the README's table reports, held-out codebook usage first
    (a tokenizer that collapsed shows here, not only in TensorBoard)."""
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    used = (f"{m['codebook_used']} of {m['codebook_size']} codes ({f(m['codebook_usage'], '.0%')})"
            if m.get("codebook_used") is not None else f(m.get("codebook_usage"), ".0%"))
    return (f"[demo] held-out codebook usage {used}, perplexity {f(m.get('codebook_perplexity'), '.1f')}; "
            f"PSNR {f(m.get('holdout_psnr'), '.2f')} dB, SSIM {f(m.get('holdout_ssim'), '.3f')}; "
            f"digits class accuracy {f(m.get('digits_class_accuracy'), '.2f')}, "
            f"judge FID {f(m.get('digits_fid'), '.1f')}")


def _urls(args: argparse.Namespace) -> list[str]:
    """Every string argument of the command (URLs, ``--set KEY=URL`` overrides): what
    :func:`data_pipeline.storage.check_access` checks before the verb starts (no credentials, a
    dead endpoint or a missing bucket is one line and exit 2, not a traceback after retries)."""
    out = []
    for v in vars(args).values():
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += [x for x in v if isinstance(x, str)]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # The dispatch imports every package lazily, here and in the branch of the verb that runs (also
    # _data, _zoo, build_parser and entry): `import pretrain.cli` and `vqscale --help` stay fast
    # (DESIGN.md), and a verb loads only its own modules.
    from data_pipeline import storage
    from data_pipeline.sources import DataError
    from data_pipeline.storage import StorageError

    from .checksums import CheckpointDamaged
    from .config import ConfigError
    from .safe_load import UnsafeCheckpointError

    try:
        if args.verb != "submit":     # a job's command checks its storage where it runs
            storage.check_access(*_urls(args))
        if args.verb == "demo":
            from .demo import run_demo

            result = run_demo(quick=args.quick, overrides=args.overrides, data=args.data)
            from evals.offline import demo_metrics

            c = result["config"]
            metrics = demo_metrics(result, guidance=c["guidance_scale"], temperature=c["temperature"], seed=c["seed"])
            result["evals"] = metrics
            storage.write_json(storage.join(result["run_dir"], "demo_summary.json"), result)
            print("[demo] offline metrics (no downloaded weights; JSON and plots in "
                  f"{' and '.join(metrics['files'].values())}):\n" + json.dumps(metrics, indent=2), flush=True)
            print(_demo_closing_line(metrics), flush=True)
            return 0
        if args.verb == "data":
            return _data(args)
        if args.verb == "train":
            from .trainer import TrainingDiverged, run_train

            try:
                res = run_train(args.recipe, args.overrides, run_dir=args.run_dir, resume=not args.no_resume)
            except TrainingDiverged as e:
                print(f"vqscale: training diverged: {e}", file=sys.stderr)
                return 3
            print(json.dumps({"run_dir": res.run_dir, "state": res.state, "step": res.step,
                              "last_checkpoint": res.last_checkpoint, "skipped_steps": res.skipped_steps,
                              "resumed_from": res.resumed_from, "wall_s": round(res.wall_s, 1)}))
            return 0 if res.state in ("finished", "stopped") else 1
        if args.verb == "sample":
            from model_zoo.package import PackageError

            from .sample import SampleError, main_sample

            classifier = None
            if args.classifier == "digits-judge":
                from evals.digits import load_digits_judge

                classifier = load_digits_judge().score
            try:
                return main_sample(args, classifier=classifier)
            except (PackageError, SampleError) as e:
                print(f"vqscale: error: {e}", file=sys.stderr)
                return 2
        if args.verb == "tokenize":
            from model_zoo.package import PackageError

            from .tokenize_job import TokenizeError, main_tokenize

            try:
                return main_tokenize(args)
            except (PackageError, TokenizeError) as e:
                print(f"vqscale: error: {e}", file=sys.stderr)
                return 2
        if args.verb == "eval":
            from evals.cli import main_eval

            return main_eval(args)
        if args.verb == "submit":
            from cluster.job import CommandLine
            from cluster.submit import main_submit

            # by its importable name (not __main__ under `python -m`), so submitit pickles a reference
            from pretrain import cli as command

            return main_submit(args, CommandLine(main=command.main, build_parser=command.build_parser))
        if args.verb == "status":
            from cluster.status import main_status

            return main_status(args)
        if args.verb == "zoo":
            return _zoo(args)
    except (ConfigError, DataError, UnsafeCheckpointError, CheckpointDamaged, StorageError) as e:
        print(f"vqscale: error: {e}", file=sys.stderr)
        return 2
    raise AssertionError(args.verb)


def entry() -> None:
    """The ``vqscale`` command: :func:`main`, then an exit that a rank's teardown cannot turn
    into a failure (see :func:`pretrain.distributed.exit_process`)."""
    code = main()
    from .distributed import exit_process

    exit_process(code)


if __name__ == "__main__":
    entry()
