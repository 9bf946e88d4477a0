"""What runs inside every task of a cluster job: one ``vqscale`` verb, the stop flag, the requeue.

submitit pickles a :class:`VerbJob` and every task (one per GPU; ``srun`` starts them under Slurm,
submitit's controller on ``--cluster local``) unpickles and calls it. The verb then runs exactly
as under torchrun: ``pretrain.distributed`` reads the rank, world size and master address from
Slurm's variables (the local cluster's are translated to torchrun's here).

Pre-emption and time limits. submitit installs a SIGUSR2 handler that checkpoints at once, inside
the signal, by pickling the job; a sharded DeepSpeed save is a collective that every rank must
enter at the same step, which cannot happen in a signal handler. For ``train`` we therefore put
the process stop flag (:func:`pretrain.distributed.process_stop_flag`) in place of submitit's
handlers before anything else runs: a signal only sets the flag, every rank learns of it at the
next step boundary (one all-reduce), all ranks write the checkpoint together and leave the
training loop, and then rank 0 asks submitit to requeue the job: submitit calls
:meth:`VerbJob.checkpoint`, pickles the resubmission it returns and runs ``scontrol requeue``.
The requeued job resumes from ``checkpoints/latest`` with its data position.

Which signal means what: SIGUSR2 is submitit's pre-emption/time-limit signal (``--signal=USR2@S``
in the sbatch script, or ``scancel --signal=USR2``) and leads to a requeue; SIGTERM alone is a
cancel (or Slurm's own pre-emption, after which Slurm requeues the job itself), so it leads to a
checkpoint and a clean exit without a requeue. A job requeued ``max_requeues`` times stops with a
message instead of requeueing again.

Verbs other than ``train`` keep submitit's handlers: their output is written file by file and a
rerun skips finished files (the tokenize job), so requeueing at once loses nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any, Callable

log = logging.getLogger("vqscale.cluster")

__all__ = ["VerbJob", "CommandLine", "RequeueLimitReached", "PREEMPT_SIGNAL"]

PREEMPT_SIGNAL = "SIGUSR2"


class RequeueLimitReached(RuntimeError):
    """The job was pre-empted or timed out more often than ``--max-requeues`` allows."""


@dataclasses.dataclass(frozen=True)
class CommandLine:
    """The ``vqscale`` command as functions, handed down by it (``pretrain/cli.py``, which sees
    every package) so that cluster never imports the module above it: ``main(argv) -> exit code``
    runs a verb inside a task (submitit pickles it by reference), ``build_parser()`` checks a
    command at submission."""

    main: Callable[[list[str]], int]
    build_parser: Callable[[], Any]


@dataclasses.dataclass
class VerbJob:
    """One ``vqscale VERB ARGS...`` command as a checkpointable submitit job."""

    argv: list[str]                    # e.g. ["train", "--recipe", "vim-base", "--run-dir", "..."]
    status_dir: str                    # the folder (or URL) whose status.json this job keeps up to date
    entry: Callable[[list[str]], int]  # runs the verb: CommandLine.main
    max_requeues: int = 20
    requeues: int = 0
    master_port: int | None = None     # --cluster local: a port chosen at submission

    @property
    def verb(self) -> str:
        return self.argv[0] if self.argv else ""

    # -- submitit's Checkpointable protocol ------------------------------------------------------
    def checkpoint(self, *args: Any, **kwargs: Any):
        """The resubmission submitit pickles before requeueing: the same command, one more requeue."""
        import submitit

        return submitit.helpers.DelayedSubmission(dataclasses.replace(self, requeues=self.requeues + 1),
                                                   *args, **kwargs)

    # -- inside each task -------------------------------------------------------------------------
    def __call__(self) -> dict:
        import submitit
        from submitit.core.job_environment import SignalHandler
        from submitit.core.utils import DelayedSubmission

        # lazy (also in _status): `vqscale --help` imports this module, through cluster.submit, and
        # pretrain brings torch
        from pretrain.distributed import process_stop_flag

        env = submitit.JobEnvironment()
        rank = env.global_rank
        if env.cluster == "local":
            self._export_local(env)
        flag, handler = None, None
        if self.verb == "train":
            # ours in place of submitit's USR2 (and TERM) handlers; see the module docstring
            flag = process_stop_flag().install()
            handler = SignalHandler(env, env.paths, DelayedSubmission.load(env.paths.submitted_pickle))
        if rank == 0:
            self._status(state="running", job_id=str(env.job_id), cluster=env.cluster,
                         requeues=self.requeues, tasks=env.num_tasks, nodes=env.num_nodes,
                         submitit_folder=str(env.paths.folder))
        log.info("task %d/%d of job %s (%s, requeue %d): vqscale %s", rank, env.num_tasks, env.job_id,
                 env.cluster, self.requeues, " ".join(self.argv))
        try:
            rc = self.entry(list(self.argv))
        except BaseException:
            if rank == 0:
                self._status(state="failed")
            raise
        if flag is not None and flag.agreed and PREEMPT_SIGNAL in flag.seen:
            self._requeue(rank, env.cluster, handler)          # does not return
        if flag is not None:
            flag.uninstall()
        if rc != 0:
            if rank == 0 and self.verb != "train":      # the trainer wrote its own final state
                self._status(state="failed", exit_code=rc)
            raise RuntimeError(f"`vqscale {' '.join(self.argv)}` exited with code {rc} on rank {rank}; "
                               f"see the logs under {env.paths.folder} and {self.status_dir}/logs")
        if rank == 0 and self.verb != "train":
            self._status(state="finished", exit_code=0)
        return {"rank": rank, "exit_code": rc, "requeues": self.requeues, "status_dir": self.status_dir}

    def _requeue(self, rank: int, cluster: str, handler) -> None:
        """The checkpoint is written; requeue (rank 0) or wait to be ended by the requeue (others)."""
        if self.requeues >= self.max_requeues:
            msg = (f"the job was pre-empted or timed out {self.requeues + 1} times; the limit is "
                   f"{self.max_requeues} requeues (vqscale submit --max-requeues). The last checkpoint "
                   f"is saved: submit the same command again to continue from it")
            if rank == 0:
                self._status(state="requeue-limit")
            log.error(msg)
            raise RequeueLimitReached(msg)
        if rank != 0:
            # Under Slurm, rank 0's requeue ends this task; exiting first with an error status
            # could end the whole step before rank 0 has requeued, on clusters that kill a step
            # when one task fails. submitit's local controller instead restarts the job once every
            # task has exited and one of them asked for a requeue, so there we leave at once.
            if cluster != "local":
                log.info("rank %d: checkpoint written, waiting for rank 0 to requeue the job", rank)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                time.sleep(float(os.environ.get("VQSCALE_REQUEUE_WAIT_S", 300)))
            raise SystemExit(-1)
        self._status(state="requeued", requeues=self.requeues + 1)
        log.warning("pre-empted or timed out: checkpoint written, requeueing (%d of at most %d)",
                    self.requeues + 1, self.max_requeues)
        handler.checkpoint_and_try_requeue(signal.SIGUSR2)    # submitit: checkpoint(), requeue, exit

    def _export_local(self, env) -> None:
        """submitit's local controller names ranks its own way; give the verb torchrun's names."""
        port = self.master_port or 29500
        os.environ.update({"RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks),
                           "LOCAL_RANK": str(env.local_rank), "LOCAL_WORLD_SIZE": str(env.num_tasks),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})

    def _status(self, **fields: Any) -> None:
        from pretrain.metrics import update_status

        try:
            update_status(self.status_dir, **fields)
        except OSError as e:      # the status file is a report; a storage hiccup must not end the job
            log.warning("could not update %s/status.json: %s", self.status_dir, e)
