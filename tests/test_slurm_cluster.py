"""The Slurm test cluster itself: multi-node srun ranks, signal delivery, requeue."""

from __future__ import annotations

import os
import time


def _wait_files(paths, timeout=90.0):
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(p) for p in paths):
        assert time.monotonic() < deadline, f"not created in {timeout} s: {paths}"
        time.sleep(0.1)


def test_srun_ranks_span_two_nodes(slurm_cluster, tmp_path):
    out = tmp_path / "ranks.txt"
    # single quotes: the batch shell must not expand $SLURM_PROCID (it would print its own, 0)
    jid = slurm_cluster.sbatch(
        "--nodes=2", "--ntasks-per-node=2", f"--output={out}",
        "--wrap", "srun bash -c 'echo $SLURM_PROCID $SLURM_NODEID $SLURMD_NODENAME'",
    )
    assert slurm_cluster.wait_state(jid, ["COMPLETED", "FAILED", "CANCELLED"], timeout=90) == "COMPLETED"
    rows = [line.split() for line in out.read_text().splitlines() if line.strip()]
    assert sorted(int(r[0]) for r in rows) == [0, 1, 2, 3]
    assert {int(r[1]) for r in rows} == {0, 1}
    assert {r[2] for r in rows} == {"n1", "n2"}


def test_scancel_signal_reaches_srun_task(slurm_cluster, tmp_path):
    script = tmp_path / "trap.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"trap 'echo USR2 > {tmp_path}/got.$SLURM_PROCID; exit 0' USR2\n"
        f"touch {tmp_path}/started.$SLURM_PROCID\n"
        "for i in $(seq 600); do sleep 0.1; done\n"
        "exit 3\n"
    )
    script.chmod(0o755)
    jid = slurm_cluster.sbatch("--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/out.txt",
                               "--wrap", f"srun {script}")
    _wait_files([tmp_path / "started.0", tmp_path / "started.1"])
    slurm_cluster.run("scancel", "--signal=USR2", str(jid))
    assert slurm_cluster.wait_state(jid, ["COMPLETED", "FAILED", "CANCELLED"], timeout=90) == "COMPLETED"
    assert (tmp_path / "got.0").read_text().strip() == "USR2"
    assert (tmp_path / "got.1").read_text().strip() == "USR2"


def test_requeue_and_release_restart_quickly(slurm_cluster, tmp_path):
    """A requeued job waits ~120 s (BeginTime) unless released; released, it starts at once.

    Waits are generous (a loaded machine) but all well under the 120 s hold, so a release that
    does nothing still fails. The old instance must be gone before the release: on a loaded
    machine its late completion report (exit by SIGTERM) could otherwise land on the restarted
    instance of the same job id and mark it FAILED (seen in a loaded CI-like run)."""
    out = tmp_path / "out.txt"
    jid = slurm_cluster.sbatch("--nodes=1", f"--output={out}", "--open-mode=append",
                               "--wrap", "echo start $SLURM_RESTART_COUNT; sleep 300")
    slurm_cluster.wait_state(jid, "RUNNING", timeout=90)
    slurm_cluster.run("scontrol", "requeue", str(jid))
    slurm_cluster.wait_state(jid, "PENDING", timeout=90)  # held by BeginTime, ~120 s by default
    slurm_cluster.wait_gone(jid, timeout=90)
    t0 = time.monotonic()
    slurm_cluster.release(jid)
    slurm_cluster.wait_state(jid, "RUNNING", timeout=90)
    assert time.monotonic() - t0 < 90
    deadline = time.monotonic() + 60
    while "start 1" not in out.read_text():
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.1)
    slurm_cluster.run("scancel", str(jid))
