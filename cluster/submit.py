"""``vqscale submit``: any verb as a job on Slurm (or on this machine) through submitit.

``vqscale submit --cluster slurm --nodes 16 --gpus-per-node 8 -- train --recipe vim-base`` checks
the command here (a wrong recipe or config key fails now, not after hours in the queue), then
submits it through submitit's AutoExecutor: one task per GPU, ``srun`` starting them, each task
running :class:`cluster.job.VerbJob`. ``--cluster local`` runs the same job with the same number
of processes on this machine (submitit's local executor) and waits for it. ``--dry-run`` prints
the sbatch script and the resolved config and submits nothing; it needs no Slurm.

Where things go. A ``train`` job's run directory is its ``--run-dir`` (default ``runs/RECIPE``),
made absolute because the job may start elsewhere; submitit's folder (pickles, one stdout/stderr
per task) is ``RUN_DIR/submitit/JOBID``, the per-rank logs ``RUN_DIR/logs``, and ``status.json``
sits next to them. Other verbs (and remote run directories, since submitit writes local files)
use a job folder, ``--job-dir`` or ``runs/jobs/VERB-TIME``.

Sweeps and arrays. ``--sweep ckpt=a,b,c`` (repeatable; the product of all sweeps) turns one
command with ``{ckpt}`` placeholders into a Slurm job array, one task per value, e.g. one eval per
checkpoint or per metric.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shlex
import signal
import sys
import time
from typing import Any, Sequence

from data_pipeline import storage

from .job import CommandLine, VerbJob
from .status import wait_jobs

CLUSTERS = ("local", "slurm")

EPILOG = """examples:
  vqscale submit --cluster local --nodes 1 --tasks-per-node 2 -- train --recipe vim-base-tiny
  vqscale submit --cluster slurm --nodes 16 --gpus-per-node 8 --partition gpu --account proj \\
      --time-min 4320 --cpus-per-task 10 --exclusive -- train --recipe vim-large --run-dir /shared/runs/vim-l
  vqscale submit --cluster slurm --nodes 16 --gpus-per-node 8 --dry-run -- train --recipe vim-base
  vqscale submit --cluster slurm --gpus-per-node 1 --sweep ckpt=runs/a,runs/b -- \\
      eval reconstruction --ckpt {ckpt} --data s3://b/val --out {ckpt}/evals/recon.json
"""


class SubmitError(ValueError):
    """A submission that cannot work, found before anything is submitted."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", choices=CLUSTERS, default="local",
                   help="slurm: submit to Slurm; local: run here with the same number of processes (default)")
    p.add_argument("--nodes", metavar="N", type=int, default=1, help="nodes (default 1; local runs them all on this machine)")
    p.add_argument("--gpus-per-node", metavar="G", type=int, default=0,
                   help="GPUs per node, one task per GPU (0 = a CPU job on the gloo backend)")
    p.add_argument("--tasks-per-node", metavar="T", type=int, default=None,
                   help="processes per node (default: --gpus-per-node, or 1 for a CPU job)")
    p.add_argument("--cpus-per-task", metavar="C", type=int, default=None, help="CPUs per process (data loading; e.g. 10)")
    p.add_argument("--partition", metavar="P", default=None)
    p.add_argument("--account", metavar="A", default=None)
    p.add_argument("--qos", metavar="Q", default=None)
    p.add_argument("--constraint", metavar="C", default=None, help="node features, e.g. 'h100&ib'")
    p.add_argument("--mem", metavar="MEM", default=None, help="memory per node as sbatch takes it (e.g. 480G; 0 = all)")
    p.add_argument("--exclusive", action="store_true", help="do not share nodes with other jobs")
    p.add_argument("--time-min", metavar="MIN", type=int, default=1440,
                   help="time limit in minutes (default 1440); at the limit the job checkpoints and requeues")
    p.add_argument("--job-name", metavar="NAME", default=None, help="default vqscale-VERB[-RECIPE]")
    p.add_argument("--signal-delay-s", metavar="S", type=int, default=120,
                   help="seconds before the time limit at which Slurm sends SIGUSR2 (default 120)")
    p.add_argument("--max-requeues", metavar="N", type=int, default=20,
                   help="pre-emptions/time limits after which the job stops instead of requeueing (default 20)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="export this variable in the job (repeatable), e.g. NCCL_SOCKET_IFNAME=ib0")
    p.add_argument("--setup", action="append", default=[], metavar="CMD",
                   help="shell line run in the sbatch script before the tasks start (repeatable)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="one array task per value; {KEY} in the command is replaced (repeatable: product)")
    p.add_argument("--array-parallelism", metavar="N", type=int, default=64, help="array tasks running at once (default 64)")
    p.add_argument("--job-dir", metavar="DIR", default=None,
                   help="job folder for submitit files and status.json (default: the run dir for train, "
                        "else runs/jobs/VERB-TIME)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the sbatch script and the resolved config; submit nothing")
    p.add_argument("--wait", action="store_true", help="follow a Slurm job until it ends (local jobs always wait)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- VERB ARGS",
                   help="the vqscale command to run, after --")


@dataclasses.dataclass
class Task:
    argv: list[str]
    status_dir: str
    config: dict | None = None      # the resolved run config of a train task


@dataclasses.dataclass
class Plan:
    cluster: str
    nodes: int
    tasks_per_node: int
    job_dir: str
    tasks: list[Task]
    params: dict[str, Any]          # sbatch parameters, submitit's Slurm names

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def submitit_folder(self) -> str:
        return os.path.join(self.job_dir, "submitit", "%j")


# ---- building the plan -----------------------------------------------------------------------------
def _sweeps(items: Sequence[str]) -> list[dict[str, str]]:
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v for v in values.split(",") if v]
        if not sep or not key or not vals:
            raise SubmitError(f"--sweep expects KEY=V1,V2,..., got {item!r}")
        axes.append([(key, v) for v in vals])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def _fill(argv: list[str], values: dict[str, str]) -> list[str]:
    out = []
    for a in argv:
        for k, v in values.items():
            a = a.replace("{" + k + "}", v)
        out.append(a)
    return out


def _parse_verb(argv: list[str], build_parser) -> argparse.Namespace:
    """Parse the command with vqscale's own parser so that a typo fails at submission."""
    if not argv:
        raise SubmitError("no command to run: put it after --, e.g. vqscale submit ... -- train --recipe vim-base")
    if argv[0] in ("submit", "status", "demo"):
        raise SubmitError(f"`{argv[0]}` is not a job verb; submit train, tokenize, sample or eval")
    parser = build_parser()
    try:
        return parser.parse_args(argv)
    except SystemExit as e:                 # argparse printed its message already
        raise SubmitError(f"the command `vqscale {shlex.join(argv)}` does not parse") from e


def _train_task(argv: list[str], ns: argparse.Namespace, world: int) -> Task:
    """Resolve the recipe and overrides now (bad keys fail here) and pin the run dir to an absolute path."""
    # pretrain is imported lazily in this module (also in submit_plan): `vqscale --help` imports it
    # for its arguments, and pretrain brings torch and the Trainer's data, metrics and DeepSpeed modules
    from pretrain.config import apply_overrides, to_dict
    from pretrain.optim import gradient_accumulation_steps
    from pretrain.recipes import get_recipe
    from pretrain.models import check_model_args
    from pretrain.trainer import check_prior_inputs, check_storage

    cfg = apply_overrides(get_recipe(ns.recipe), list(ns.overrides))
    check_model_args(cfg)
    run_dir = ns.run_dir or cfg.resolved_run_dir()
    if not storage.is_remote(run_dir):
        run_dir = os.path.abspath(storage.local_path(run_dir))
    cfg = dataclasses.replace(cfg, run_dir=run_dir)
    check_storage(cfg)               # its S3 buckets: credentials, endpoint, bucket
    check_prior_inputs(cfg)          # a tokenizer that is no package, too few classes for the labels
    micro = cfg.micro_batch_size or cfg.global_batch_size // world
    try:
        gas = gradient_accumulation_steps(cfg.global_batch_size, micro, world)
    except ValueError as e:
        raise SubmitError(f"{e} (world size {world} from --nodes x --tasks-per-node)") from None
    if ns.run_dir is None:
        argv = argv + ["--run-dir", run_dir]
    else:
        i = argv.index("--run-dir") if "--run-dir" in argv else None
        if i is not None:
            argv = argv[:i + 1] + [run_dir] + argv[i + 2:]
        else:                                   # --run-dir=X
            argv = [f"--run-dir={run_dir}" if a.startswith("--run-dir=") else a for a in argv]
    resolved = {**to_dict(cfg), "world_size": world, "micro_batch_size": micro,
                "gradient_accumulation_steps": gas}
    return Task(argv=argv, status_dir=run_dir, config=resolved)


def make_plan(args: argparse.Namespace, cli: CommandLine) -> Plan:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if args.nodes < 1 or args.gpus_per_node < 0:
        raise SubmitError("--nodes must be >= 1 and --gpus-per-node >= 0")
    tasks_per_node = args.tasks_per_node or args.gpus_per_node or 1
    if args.gpus_per_node and tasks_per_node != args.gpus_per_node:
        raise SubmitError(f"--tasks-per-node {tasks_per_node} with --gpus-per-node {args.gpus_per_node}: "
                          f"each task drives one GPU, so they must be equal")
    world = args.nodes * tasks_per_node
    combos = _sweeps(args.sweep)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tasks = []
    for values in combos:
        argv = _fill(command, values)
        ns = _parse_verb(argv, cli.build_parser)
        if ns.verb == "train":
            tasks.append(_train_task(argv, ns, world))
        else:
            tasks.append(Task(argv=argv, status_dir=""))
    verb = tasks[0].argv[0]
    if args.job_dir:
        job_dir = args.job_dir
    elif verb == "train" and len(tasks) == 1 and not storage.is_remote(tasks[0].status_dir):
        job_dir = tasks[0].status_dir
    else:
        job_dir = os.path.join("runs", "jobs", f"{verb}-{stamp}")
    if storage.is_remote(job_dir):
        raise SubmitError(f"--job-dir {job_dir}: submitit writes local files; use a shared filesystem path")
    job_dir = os.path.abspath(storage.local_path(job_dir))
    for i, t in enumerate(tasks):
        if not t.status_dir:
            t.status_dir = job_dir if len(tasks) == 1 else os.path.join(job_dir, "tasks", str(i))
    dirs = [t.status_dir for t in tasks]
    if len(set(dirs)) != len(dirs):
        raise SubmitError("the sweep gives several train tasks the same run directory; put {KEY} in --run-dir")
    if args.cluster == "local" and args.gpus_per_node:
        import torch

        have = torch.cuda.device_count()
        if have < args.nodes * args.gpus_per_node:
            raise SubmitError(f"--cluster local needs {args.nodes * args.gpus_per_node} GPUs, this machine has {have}")
    recipe = getattr(_parse_verb(tasks[0].argv, cli.build_parser), "recipe", None)
    name = args.job_name or "-".join(x for x in ("vqscale", verb, recipe) if x)
    return Plan(cluster=args.cluster, nodes=args.nodes, tasks_per_node=tasks_per_node, job_dir=job_dir,
                tasks=tasks, params=slurm_parameters(args, tasks_per_node, name))


def _env_items(items: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k.isidentifier():
            raise SubmitError(f"--env expects KEY=VALUE, got {item!r}")
        out.append((k, v))
    return out


def job_environment(args: argparse.Namespace) -> list[str]:
    """The sbatch script's exports: NCCL error handling and logging, threads, a CPU job's backend."""
    lines = [
        "# a failed or timed-out collective ends the job (and frees the nodes) instead of hanging it",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}",
        "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
        "# one thread pool per task: the CPUs Slurm gave it, not the whole node's",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}",
    ]
    if not args.gpus_per_node:
        lines += ["# a CPU job: DeepSpeed on CPU, collectives on gloo", "export DS_ACCELERATOR=cpu"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in _env_items(args.env)]
    return lines + list(args.setup)


def slurm_parameters(args: argparse.Namespace, tasks_per_node: int, name: str) -> dict[str, Any]:
    """sbatch options under submitit's Slurm names (``time``, ``ntasks_per_node``, ...)."""
    params: dict[str, Any] = {
        "job_name": name, "time": args.time_min, "nodes": args.nodes, "ntasks_per_node": tasks_per_node,
        "signal_delay_s": args.signal_delay_s, "setup": job_environment(args),
        # requeueable: Slurm's own pre-emption (PreemptMode=REQUEUE) and our scontrol requeue
        "additional_parameters": {"requeue": True},
        "array_parallelism": args.array_parallelism,
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    for key in ("cpus_per_task", "partition", "account", "qos", "constraint", "mem"):
        value = getattr(args, key)
        if value is not None:
            params[key] = value
    if args.exclusive:
        params["exclusive"] = True
    return params


def _python_command(folder: str) -> str:
    """The command submitit's Slurm executor puts after srun (its ``_submitit_command_str``)."""
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(folder)])


def sbatch_script(plan: Plan) -> str:
    """The sbatch script submitit will write for this plan (its own generator, so they agree)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = dict(plan.params)
    if len(plan.tasks) > 1:
        params["map_count"] = len(plan.tasks)
    return _make_sbatch_string(command=_python_command(plan.submitit_folder), folder=plan.submitit_folder, **params)


def describe(plan: Plan) -> dict:
    return {"cluster": plan.cluster, "nodes": plan.nodes, "tasks_per_node": plan.tasks_per_node,
            "world_size": plan.world_size, "job_dir": plan.job_dir, "submitit_folder": plan.submitit_folder,
            "tasks": [{"command": ["vqscale", *t.argv], "status_dir": t.status_dir,
                       **({"config": t.config} if t.config is not None else {})} for t in plan.tasks]}


# ---- submitting ------------------------------------------------------------------------------------
def executor_for(plan: Plan):
    import submitit

    os.makedirs(plan.job_dir, exist_ok=True)
    ex = submitit.AutoExecutor(folder=plan.submitit_folder, cluster=plan.cluster,
                               slurm_max_num_timeout=10**6)    # our own limit is --max-requeues
    if plan.cluster == "slurm":
        ex.update_parameters(**{f"slurm_{k}": v for k, v in plan.params.items()})
    else:
        # one node with every task on it; the controller joins the setup lines with &&, so no comments
        setup = [line for line in plan.params["setup"] if not line.lstrip().startswith("#")]
        ex.update_parameters(timeout_min=plan.params["time"], nodes=1, tasks_per_node=plan.world_size,
                             gpus_per_node=plan.nodes * plan.params.get("gpus_per_node", 0), local_setup=setup)
    return ex


def submit_plan(plan: Plan, max_requeues: int, cli: CommandLine) -> list:
    """Submit every task (an array when there are several); returns submitit jobs."""
    from pretrain.distributed import free_port
    from pretrain.metrics import update_status

    ex = executor_for(plan)

    port = free_port() if plan.cluster == "local" else None
    jobs_args = [VerbJob(argv=t.argv, status_dir=t.status_dir, entry=cli.main, max_requeues=max_requeues,
                         master_port=port)
                 for t in plan.tasks]
    if len(jobs_args) == 1:
        jobs = [ex.submit(jobs_args[0])]
    else:
        with ex.batch():
            jobs = [ex.submit(j) for j in jobs_args]
    for job, t in zip(jobs, plan.tasks):
        update_status(t.status_dir, state="submitted", job_id=str(job.job_id), cluster=plan.cluster,
                      requeues=0, command=["vqscale", *t.argv], nodes=plan.nodes,
                      tasks=plan.world_size, submitit_folder=str(job.paths.folder), job_dir=plan.job_dir)
    return jobs


def main_submit(args: argparse.Namespace, cli: CommandLine) -> int:
    """``vqscale submit``; ``cli``: the command's own entry points (cluster never imports them)."""
    try:
        plan = make_plan(args, cli)
    except SubmitError as e:
        print(f"vqscale: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        if plan.cluster == "slurm":
            print("# ---- sbatch script " + "-" * 60)
            print(sbatch_script(plan))
        print("# ---- resolved job " + "-" * 61)
        print(json.dumps(describe(plan), indent=2))
        return 0
    jobs = submit_plan(plan, args.max_requeues, cli)
    for job, t in zip(jobs, plan.tasks):
        print(json.dumps({"job_id": str(job.job_id), "cluster": plan.cluster, "status_dir": t.status_dir,
                          "logs": str(job.paths.folder)}))
    if plan.cluster == "local" or args.wait:
        try:
            return wait_jobs(jobs, [t.status_dir for t in plan.tasks], cluster=plan.cluster)
        except KeyboardInterrupt:
            if plan.cluster != "local":
                print(f"stopped following; the job keeps running (vqscale status {plan.tasks[0].status_dir})",
                      file=sys.stderr)
                return 130
            # submitit's controller forwards SIGTERM to the tasks: they checkpoint and exit
            print("interrupted: stopping the local job after a checkpoint ...", file=sys.stderr)
            for job in jobs:
                job._process.send_signal(signal.SIGTERM)
            for job in jobs:
                job._process.wait()
            return 130
    print(f"follow with: vqscale status {plan.tasks[0].status_dir}", file=sys.stderr)
    return 0
