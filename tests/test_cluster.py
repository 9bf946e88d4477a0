"""``vqscale submit`` and ``vqscale status`` end to end: the sbatch script of a 16 x 8 GPU request,
the local cluster against torchrun, and a real 2-node Slurm (tests/slurm_cluster.py) training a
tiny prior with DeepSpeed on gloo, pre-empted through submitit, requeued and resumed.

Every comparison is against a torchrun run of the same recipe and world size: the final weights
must agree to 1e-6 (they are in fact bit-identical: same data order, same reductions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.launch import ROOT, job_env
from tests.test_trainer import _keys, _losses, _prior_sets, make_codes

RECIPE = "vim-small-tiny"


def _vqscale(*args: str, env: dict | None = None, timeout: float = 600, cwd: str = ROOT,
             check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "pretrain.cli", *args], env=env or job_env(), cwd=cwd,
                         capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"vqscale {' '.join(args)} exited {out.returncode}\n{out.stdout[-3000:]}\n"
                             f"{out.stderr[-5000:]}")
    return out


def _torchrun_train(run: str, sets: list[str], nproc: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
           "--rdzv-endpoint=127.0.0.1:0", "-m", "pretrain.cli", "train", "--recipe", RECIPE, "--run-dir", run, *sets]
    out = subprocess.run(cmd, env=job_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]


def _weights(run: str) -> dict[str, torch.Tensor]:
    from pretrain.checkpoint import latest_step_url, load_consolidated

    return load_consolidated(latest_step_url(run), "model")


def _assert_same_weights(a: str, b: str) -> None:
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)
    worst = max(float((wa[k].detach().float() - wb[k].detach().float()).abs().max()) for k in wa)
    assert worst <= 1e-6, worst


# ---- the sbatch script (no Slurm needed) ------------------------------------------------------------
def _dry(capsys, *args: str) -> tuple[int, str, str]:
    from pretrain.cli import main

    rc = main(["submit", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_dry_run_of_a_16_node_8_gpu_request(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = _dry(capsys, "--cluster", "slurm", "--nodes", "16", "--gpus-per-node", "8", "--partition", "gpu",
                      "--account", "proj", "--qos", "high", "--time-min", "4320", "--constraint", "h100",
                      "--mem", "480G", "--exclusive", "--cpus-per-task", "10", "--env", "NCCL_SOCKET_IFNAME=ib0",
                      "--dry-run", "--", "train", "--recipe", "vim-base", "--set", "optim.lr=2e-4")
    assert rc == 0
    script, _, resolved = out.partition("# ---- resolved job")
    lines = script.splitlines()
    for flag in ("--nodes=16", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10",
                 "--partition=gpu", "--account=proj", "--qos=high", "--time=4320", "--constraint=h100",
                 "--mem=480G", "--exclusive", "--requeue", "--signal=USR2@120", "--job-name=vqscale-train-vim-base"):
        assert f"#SBATCH {flag}" in lines, flag
    run_dir = str(tmp_path / "runs" / "vim-base")
    assert f"#SBATCH --output={run_dir}/submitit/%j/%j_0_log.out" in lines
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}" in lines
    assert "export NCCL_SOCKET_IFNAME=ib0" in lines
    assert not any("DS_ACCELERATOR" in x for x in lines)          # a GPU job
    srun = [x for x in lines if x.startswith("srun ")]
    assert len(srun) == 1 and srun[0].endswith(f"-u -m submitit.core._submit {run_dir}/submitit/%j")
    assert f"--output {run_dir}/submitit/%j/%j_%t_log.out" in srun[0]
    job = json.loads(resolved.split("\n", 1)[1])
    assert job["world_size"] == 128 and job["nodes"] == 16 and job["tasks_per_node"] == 8
    task = job["tasks"][0]
    cfg = task["config"]
    assert cfg["optim"]["lr"] == 2e-4 and cfg["run_dir"] == run_dir
    assert cfg["global_batch_size"] == cfg["micro_batch_size"] * 128 * cfg["gradient_accumulation_steps"]
    assert task["command"][-2:] == ["--run-dir", run_dir]          # the job cannot depend on its cwd
    assert not os.path.exists(run_dir)                               # nothing was submitted or written


def test_dry_run_of_an_array_and_bad_submissions(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = _dry(capsys, "--cluster", "slurm", "--gpus-per-node", "1", "--sweep", "d=a,b,c", "--dry-run",
                      "--", "data", "inspect", "s3://bucket/{d}", "--out", "{d}.json")
    assert rc == 0
    assert "#SBATCH --array=0-2%3" in out.splitlines()
    job = json.loads(out.partition("# ---- resolved job")[2].split("\n", 1)[1])
    assert [t["command"][3] for t in job["tasks"]] == ["s3://bucket/a", "s3://bucket/b", "s3://bucket/c"]
    assert len({t["status_dir"] for t in job["tasks"]}) == 3
    # errors a user can fix are found before anything reaches the queue
    rc, _, err = _dry(capsys, "--cluster", "slurm", "--dry-run", "--", "train", "--recipe", "vim-base",
                      "--set", "optim.lrr=1")
    assert rc == 2 and "optim.lrr" in err and "optim.lr" in err
    # a model_args key the preset's config does not have (it failed inside the job, after queueing)
    rc, _, err = _dry(capsys, "--cluster", "slurm", "--dry-run", "--", "train", "--recipe", "vim-base",
                      "--set", "model_args.foo=1")
    assert rc == 2 and "'vim-base'" in err and "foo" in err and len(err.strip().splitlines()) == 1, err
    rc, _, err = _dry(capsys, "--cluster", "slurm", "--dry-run", "--", "train", "--recipe", "vit-vqgan-bb",
                      "--set", "model_args.quantizer.codebok_size=1024")
    assert rc == 2 and "codebok_size" in err and len(err.strip().splitlines()) == 1, err
    rc, _, err = _dry(capsys, "--cluster", "slurm", "--nodes", "3", "--gpus-per-node", "7", "--dry-run", "--",
                      "train", "--recipe", "vim-base")
    assert rc == 2 and "not a multiple" in err and "world size 21" in err
    rc, _, err = _dry(capsys, "--cluster", "slurm", "--gpus-per-node", "8", "--tasks-per-node", "4", "--dry-run",
                      "--", "train", "--recipe", "vim-base")
    assert rc == 2 and "must be equal" in err
    rc, _, err = _dry(capsys, "--cluster", "slurm", "--dry-run")
    assert rc == 2 and "no command" in err


def test_status_prints_a_run_directory(tmp_path, capsys):
    from pretrain.cli import main
    from pretrain.metrics import update_status

    update_status(str(tmp_path), state="submitted", job_id="7", cluster="local", requeues=0)
    update_status(str(tmp_path), state="running", step=3, steps=10)
    assert main(["status", str(tmp_path), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["state"], st["step"], st["job_id"], st["requeues"]) == ("running", 3, "7", 0)   # merged
    assert main(["status", str(tmp_path)]) == 0
    assert "step" in capsys.readouterr().out
    assert main(["status", str(tmp_path / "nowhere")]) == 2


# ---- the local cluster: the same job, N processes on this machine ----------------------------------------
@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    return make_codes(str(tmp_path_factory.mktemp("cluster") / "codes"))


def _reference_run(codes: str, factory, nproc: int, steps: int) -> tuple[str, list[str]]:
    sets = _prior_sets(codes, steps=steps, every=4)
    ref = str(factory.mktemp(f"ref{nproc}") / "run")
    _torchrun_train(ref, sets, nproc=nproc)
    return ref, sets


@pytest.fixture(scope="module")
def two_rank_reference(codes, tmp_path_factory):
    """The torchrun run the local-cluster jobs are compared with: 2 processes, 16 steps."""
    return _reference_run(codes, tmp_path_factory, nproc=2, steps=16)


@pytest.mark.multiprocess
def test_local_cluster_matches_torchrun(two_rank_reference, tmp_path):
    ref, sets = two_rank_reference
    run = str(tmp_path / "local")
    out = _vqscale("submit", "--cluster", "local", "--tasks-per-node", "2", "--", "train", "--recipe", RECIPE,
                   "--run-dir", run, *sets)
    assert json.loads(out.stdout.splitlines()[0])["cluster"] == "local"
    st = json.load(open(os.path.join(run, "status.json")))
    assert (st["state"], st["step"], st["cluster"], st["world_size"]) == ("finished", 16, "local", 2)
    assert sorted(os.listdir(os.path.join(run, "logs"))) == ["rank0.log", "rank1.log"]
    assert _losses(ref) == _losses(run)
    _assert_same_weights(ref, run)


def _task_pid(run: str, rank: int) -> int:
    """The pid in the first line of a rank's log (``TIME rankR PID logger ...``)."""
    first = open(os.path.join(run, "logs", f"rank{rank}.log")).readline().split()
    return int(first[3])


@pytest.mark.multiprocess
def test_local_cluster_preemption_requeues_and_resumes(two_rank_reference, tmp_path):
    """The time-limit/pre-emption signal (SIGUSR2, what submitit's local controller sends before
    the time limit) reaches both tasks: they checkpoint together, submitit's controller restarts
    the job, and it resumes where it stopped."""
    import signal

    ref, sets = two_rank_reference
    run = str(tmp_path / "local-preempted")
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.cli", "submit", "--cluster", "local",
                             "--tasks-per-node", "2", "--", "train", "--recipe", RECIPE, "--run-dir", run, *sets],
                            env=job_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while _steps_done(run) < 3:
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    for rank in range(2):
        os.kill(_task_pid(run, rank), signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-5000:]
    st = json.load(open(os.path.join(run, "status.json")))
    assert (st["state"], st["step"], st["requeues"]) == ("finished", 16, 1)
    log0 = open(os.path.join(run, "logs", "rank0.log")).read()
    stopped = [int(x.split("after step ")[1].split(";")[0]) for x in log0.splitlines() if "stopped by" in x]
    assert len(stopped) == 1 and 3 <= stopped[0] < 16 and f"resumed at step {stopped[0]}" in log0
    assert _losses(ref) == _losses(run)
    assert _keys(ref, ranks=2) == _keys(run, ranks=2)
    _assert_same_weights(ref, run)


# ---- a real Slurm: 2 nodes x 2 tasks --------------------------------------------------------------------
def _slurm_env(cluster) -> dict:
    return {**job_env(), **cluster.env()}


@pytest.fixture
def slurm(slurm_cluster, monkeypatch):
    """The cluster, with this process's Slurm commands (submitit's scancel) pointed at it."""
    for k, v in slurm_cluster.env().items():
        monkeypatch.setenv(k, v)
    return slurm_cluster


def _submit_slurm(cluster, run: str, sets: list[str], *extra: str, wait: bool = True) -> subprocess.CompletedProcess:
    return _vqscale("submit", "--cluster", "slurm", "--nodes", "2", "--tasks-per-node", "2", "--time-min", "20",
                    *extra, *(["--wait"] if wait else []), "--", "train", "--recipe", RECIPE, "--run-dir", run,
                    *sets, env=_slurm_env(cluster))


@pytest.fixture(scope="module")
def four_rank_reference(codes, tmp_path_factory):
    """The torchrun run every Slurm job is compared with: 4 processes, 24 steps."""
    return _reference_run(codes, tmp_path_factory, nproc=4, steps=24)


@pytest.mark.multiprocess
def test_slurm_two_nodes_train_matches_torchrun(slurm_cluster, four_rank_reference, tmp_path):
    ref, sets = four_rank_reference
    run = str(tmp_path / "slurm")
    out = _submit_slurm(slurm_cluster, run, sets)
    assert "finished" in out.stderr
    st = json.load(open(os.path.join(run, "status.json")))
    assert (st["state"], st["step"], st["cluster"], st["world_size"], st["nodes"]) == ("finished", 24, "slurm", 4, 2)
    assert sorted(os.listdir(os.path.join(run, "logs"))) == [f"rank{r}.log" for r in range(4)]
    err = [open(os.path.join(st["submitit_folder"], f"{st['job_id']}_{r}_log.err")).read() for r in range(4)]
    for r in range(4):                                          # ranks from Slurm's variables, not torchrun's
        assert f"process group up: rank {r}/4 (local {r % 2}) via slurm" in err[r], err[r][-2000:]
    assert _losses(ref) == _losses(run)
    assert _keys(ref, ranks=4) == _keys(run, ranks=4)          # the same samples on the same ranks
    _assert_same_weights(ref, run)


ENDED = (None, "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def _job(run: str):
    import submitit

    st = json.load(open(os.path.join(run, "status.json")))
    return submitit.SlurmJob(folder=os.path.dirname(st["submitit_folder"]) + "/%j", job_id=st["job_id"],
                             tasks=list(range(st["tasks"])))


def _steps_done(run: str) -> int:
    path = os.path.join(run, "keys", "rank0.jsonl")
    if not os.path.exists(path):
        return 0
    lines = [x for x in open(path).read().splitlines() if x.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


@pytest.mark.multiprocess
def test_slurm_preemption_checkpoints_requeues_and_resumes(slurm, four_rank_reference, tmp_path):
    ref, sets = four_rank_reference
    run = str(tmp_path / "preempted")
    _submit_slurm(slurm, run, sets, wait=False)
    job = _job(run)
    deadline = time.time() + 300
    while _steps_done(run) < 3:
        assert time.time() < deadline, slurm.log_tails()
        assert slurm.job_state(job.job_id) is not None, open(job.paths.stderr).read()[-3000:]
        time.sleep(0.05)
    job._interrupt()                    # submitit's pre-emption: SIGTERM, then USR2, to every task
    interrupted_at = _steps_done(run)
    assert interrupted_at < 24
    requeued, released_at = False, 0.0
    deadline = time.time() + 600
    while True:
        assert time.time() < deadline, slurm.log_tails()
        state = slurm.job_state(job.job_id)
        st = json.load(open(os.path.join(run, "status.json")))
        if state == "PENDING" and st.get("requeues") == 1 and time.time() - released_at > 5:
            # a requeued job waits 120 s (BeginTime) otherwise; again if a release came too early
            slurm.release(job.job_id)
            requeued, released_at = True, time.time()
        # Between `scontrol requeue` and PENDING the job can read as ended for a moment: it has
        # ended only when its own status says so too.
        if state in ENDED and st.get("state") not in ("requeued", "running", "submitted"):
            break
        time.sleep(0.5)
    assert requeued
    st = json.load(open(os.path.join(run, "status.json")))
    assert (st["state"], st["step"], st["requeues"]) == ("finished", 24, 1)
    log0 = open(os.path.join(run, "logs", "rank0.log")).read()
    stopped = [int(x.split("after step ")[1].split(";")[0]) for x in log0.splitlines() if "stopped by" in x]
    assert len(stopped) == 1 and interrupted_at <= stopped[0] < 24
    assert f"resumed at step {stopped[0]}" in log0              # nothing trained twice, nothing skipped
    assert _losses(ref) == _losses(run)
    assert _keys(ref, ranks=4) == _keys(run, ranks=4)
    _assert_same_weights(ref, run)


@pytest.mark.multiprocess
def test_slurm_requeue_limit_stops_with_a_message(slurm, codes, tmp_path):
    run = str(tmp_path / "limited")
    sets = _prior_sets(codes, steps=400, every=400)
    _vqscale("submit", "--cluster", "slurm", "--nodes", "1", "--tasks-per-node", "1", "--max-requeues", "0",
             "--", "train", "--recipe", RECIPE, "--run-dir", run, *sets, env=_slurm_env(slurm))
    job = _job(run)
    deadline = time.time() + 300
    while _steps_done(run) < 2:
        assert time.time() < deadline, slurm.log_tails()
        time.sleep(0.05)
    job._interrupt()
    while slurm.job_state(job.job_id) not in ENDED:
        assert time.time() < deadline, slurm.log_tails()
        time.sleep(0.5)
    st = json.load(open(os.path.join(run, "status.json")))
    assert st["state"] == "requeue-limit" and st["step"] < 400 and st["last_checkpoint"]
    err = open(job.paths.stderr).read()
    assert "the limit is 0 requeues" in err and "RequeueLimitReached" in err


@pytest.mark.multiprocess
def test_slurm_sweep_runs_as_a_job_array(slurm_cluster, tmp_path):
    """One array task per value (here: one `data inspect` per dataset, as an eval per checkpoint)."""
    from tests.datasets import make_dataset

    for name, sizes in (("a", [3, 4]), ("b", [5])):
        make_dataset(str(tmp_path / name), sizes)
    job_dir = str(tmp_path / "job")
    out = _vqscale("submit", "--cluster", "slurm", "--sweep", "d=a,b", "--job-dir", job_dir, "--wait", "--",
                   "data", "inspect", str(tmp_path / "{d}"), "--out", str(tmp_path / "{d}.json"),
                   env=_slurm_env(slurm_cluster), timeout=300)
    ids = [json.loads(x)["job_id"] for x in out.stdout.splitlines() if x.startswith("{")]
    assert len(ids) == 2 and ids[0].endswith("_0") and ids[1].endswith("_1")
    assert ids[0].split("_")[0] == ids[1].split("_")[0]                 # one array job
    for i, (name, n) in enumerate((("a", 7), ("b", 5))):
        assert json.load(open(tmp_path / f"{name}.json"))["samples"] == n
        st = json.load(open(os.path.join(job_dir, "tasks", str(i), "status.json")))
        assert (st["state"], st["job_id"], st["exit_code"]) == ("finished", ids[i], 0)
