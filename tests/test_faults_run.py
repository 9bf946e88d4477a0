"""Faults injected into real `vqscale train` runs (issue 20, parts 3 and 4: nothing silently wrong).

Each case is done for real: real shard files, a real SeaweedFS killed by its pid and restarted, a
real tmpfs that fills up (where root can mount one; else a writer patched to fail as a full disk
does), loader worker processes alive when the error comes. What must hold:

* a fatal error (a bug, a failed save) ends the process within seconds, with ``status.json``
  "failed" and the reason in one line (the loader's workers used to keep it alive 5 minutes);
* defect counts and lost samples are in ``metrics.jsonl``, TensorBoard, ``status.json`` and the
  progress bar, over the run (a resume starts from the checkpoint's counts);
* a source that is down is waited for (``data.retry_for_s``): an object store restarted within
  it loses nothing; a longer outage loses samples, and more than ``data.max_lost_fraction`` of
  them stops the run with one line;
* a shard whose bytes changed after its manifest was written is reported (``checksum_mismatch``).

Tiny recipes, a few steps each; the whole module takes about two minutes on 2 cores.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import uuid

import pytest

from data_pipeline import storage
from data_pipeline.defects import REASONS
from data_pipeline.shards import ShardWriter, make_manifest
from tests.conftest import start_s3_or_skip
from tests.datasets import sample_files
from tests.launch import ROOT, job_env
from tests.s3server import SeaweedS3
from tests.test_trainer import make_codes

RECIPE = "vit-vqgan-ss-tiny"            # about 0.05 s a step on a CPU core


# ---- running `vqscale train` ---------------------------------------------------------------------

def _sets(**kv) -> list[str]:
    out = []
    for k, v in kv.items():
        out += ["--set", f"{k.replace('__', '.')}={v}"]
    return out


def _base_sets(data: str, steps: int, **extra) -> list[str]:
    kv = {"data__url": data, "steps": steps, "global_batch_size": 8, "data__num_workers": 2,
          "data__shuffle_buffer": 16, "validation__visuals_every": 0, "log__progress": "false",
          "log__every": 1, "checkpoint__every": 1000}
    kv.update(extra)
    return _sets(**kv)


def _start(run_dir: str, sets: list[str], prelude: str | None = None, env: dict | None = None,
           recipe: str = RECIPE) -> subprocess.Popen:
    """``vqscale train`` in a child process; ``prelude``: Python run in it before the CLI (to
    patch a writer, or to make S3 calls fail fast so the test sees our retry policy, not
    botocore's)."""
    head = [sys.executable, "-m", "pretrain.cli"] if prelude is None else \
        [sys.executable, "-c", prelude + "\nfrom pretrain.cli import entry\nentry()"]
    cmd = head + ["train", "--recipe", recipe, "--run-dir", run_dir, *sets]
    return subprocess.Popen(cmd, env={**job_env(), **(env or {})}, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"`vqscale train` still running after {timeout:.0f}s; stderr tail:\n{err[-3000:]}")
    return proc.returncode, out, err


def _status(run_dir: str) -> dict:
    return json.load(open(os.path.join(run_dir, "status.json")))


def _metrics(run_dir: str) -> list[dict]:
    return [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")) if x.strip()]


def _assert_failed_fast(run_dir: str, ended_at: float, err: str, pattern: str) -> dict:
    """status.json says "failed" with a one-line reason matching ``pattern``, and the process
    ended soon after the trainer wrote it (the bug: 300 s later)."""
    st = _status(run_dir)
    assert st["state"] == "failed", (st, err[-3000:])
    reason = st.get("reason", "")
    assert reason and "\n" not in reason and re.search(pattern, reason, re.I), (reason, err[-3000:])
    lingered = ended_at - st["time"]
    assert lingered < 20, f"the process lived {lingered:.0f}s after the run failed"
    return st


def _wait_for_step(proc: subprocess.Popen, run_dir: str, step: int, timeout: float = 120) -> None:
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if os.path.exists(path):
            lines = [x for x in open(path).read().splitlines() if x.strip()]
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        time.sleep(0.05)
    pytest.fail(f"the run did not reach step {step} in {timeout}s")


# ---- part 3: a fatal error ends the process within seconds ------------------------------------------

# A bug that strikes at step 3, inside the training loop, with the loader's workers alive.
_BUG_AT_STEP_3 = """
from pretrain.step import Objective
_step = Objective.train_step
def _buggy(self, engines, micro_batches, step, **kwargs):
    if step == 2:
        raise RuntimeError("injected bug at step 3")
    return _step(self, engines, micro_batches, step, **kwargs)
Objective.train_step = _buggy
"""


def test_a_fatal_error_with_loader_workers_alive_ends_the_process_within_seconds(tmp_path):
    """A fatal error at step 3 with 2 loader workers alive: the process used to end 5 min 10 s
    later (the workers, terminated at exit, sat out their 300 s SIGTERM grace, and
    multiprocessing joined them)."""
    data = make_codes(str(tmp_path / "codes"))
    run = str(tmp_path / "run")
    proc = _start(run, _base_sets(data, 20), recipe="vim-small-tiny", prelude=_BUG_AT_STEP_3)
    rc, _out, err = _finish(proc, timeout=120)
    ended = time.time()
    assert rc != 0
    st = _assert_failed_fast(run, ended, err, r"^RuntimeError: injected bug at step 3$")
    assert st["step"] == 2


def _mount_tmpfs(path: str, size: str) -> bool:
    os.makedirs(path, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                           capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


# Where no tmpfs can be mounted: every torch.save after setup fails as on a full disk.
_FULL_DISK_WRITER = """
import errno, torch
def _full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device (patched writer)")
torch.save = _full
"""


def test_a_save_that_fails_on_a_full_disk_ends_the_run_within_seconds_as_failed(tmp_path):
    """The run directory on a 2 MB tmpfs: config, logs and metrics fit, the first checkpoint
    (about 6 MB) does not. Before: status.json stayed "running" (its own write failed on the
    full disk and replaced the error) and the process lived on for minutes."""
    from tests.datasets import make_dataset

    data = str(tmp_path / "images")
    make_dataset(data, [20, 20, 20, 20])
    disk = str(tmp_path / "disk")
    mounted = _mount_tmpfs(disk, "2m")
    run = os.path.join(disk, "run")
    try:
        proc = _start(run, _base_sets(data, 10, checkpoint__every=5),
                      prelude=None if mounted else _FULL_DISK_WRITER)
        rc, _out, err = _finish(proc, timeout=120)
        ended = time.time()
        assert rc != 0
        st = _assert_failed_fast(run, ended, err,
                                 r"^CheckpointSaveError: saving the checkpoint of step 5 .* failed \(no space left")
        assert st["step"] == 5 and st["last_checkpoint"] is None, st
        assert not os.path.exists(os.path.join(run, "checkpoints", "latest"))
    finally:
        if mounted:
            subprocess.run(["umount", "-l", disk], capture_output=True, timeout=30)


# ---- part 4: data loss is visible where users look -----------------------------------------------------

def _defective_dataset(root: str) -> dict:
    """110 samples in 7 shards: 4 good ones, one with a corrupt image, one cut inside its 7th
    sample (4 samples lost per read) and one rewritten after the manifest (checksum mismatch,
    every sample still readable)."""
    shards = []
    n = 0

    def shard(prefix: str, count: int, files_of) -> dict:
        nonlocal n
        w = ShardWriter(root, prefix=prefix, write_manifest=False)
        for _ in range(count):
            w.write(f"k{n:05d}", files_of(n))
            n += 1
        w.close()
        return w.shards[0]

    for j in range(4):
        shards.append(shard(f"good{j}", 20, sample_files))
    shards.append(shard("corrupt", 10, lambda i: {**sample_files(i), "png": b"\x89PNG\r\n\x1a\nnot an image"}
                        if i % 10 == 3 else sample_files(i)))
    cut = shard("cut", 10, sample_files)
    path = os.path.join(root, cut["name"])
    raw = open(path, "rb").read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".png")][6]
    with open(path, "wb") as f:
        f.write(raw[: member.offset_data + member.size // 2])
    shards.append(cut)
    changed = shard("changed", 10, sample_files)
    shards.append(changed)
    storage.write_json(os.path.join(root, "manifest.json"), make_manifest(shards))
    # The shard is rewritten after its manifest entry: same keys, other pixels.
    first = n - 10
    w = ShardWriter(root, prefix="changed", write_manifest=False)
    for i in range(first, n):
        w.write(f"k{i:05d}", sample_files(i + 1000))
    w.close()
    assert w.shards[0]["name"] == changed["name"] and w.shards[0]["sha256"] != changed["sha256"]
    return {"samples": n, "changed": changed["name"]}


def test_defect_counts_reach_metrics_tensorboard_status_and_the_progress_bar_across_a_resume(tmp_path):
    data = str(tmp_path / "images")
    _defective_dataset(data)
    run = str(tmp_path / "run")
    # 40 steps of 8: about 3 epochs of 110 samples; 4 of every 110 are lost (3.6%), so the
    # give-up threshold is raised for this run (its default, 1%, is tested below).
    sets = _base_sets(data, 40, log__every=5, checkpoint__every=20, data__max_lost_fraction=0.2,
                      log__progress="true")
    rc, _out, err = _finish(_start(run, sets), timeout=180)
    assert rc == 0, err[-3000:]
    last = _metrics(run)[-1]
    assert last["step"] == 40
    for key in ("corrupt_image", "truncated_shard", "checksum_mismatch"):
        assert last[f"data/{key}"] >= 2, (key, last)      # one per epoch read
    assert last["data/lost_samples"] >= 8 and last["data/lost_samples"] % 4 == 0, last
    assert last["data/defects"] == sum(last[f"data/{r}"] for r in REASONS)
    assert 0 < last["data/lost_fraction"] < 0.2
    st = _status(run)
    assert st["state"] == "finished"
    for key in ("corrupt_image", "truncated_shard", "checksum_mismatch", "lost_samples", "defects"):
        assert st["data"][key] == int(last[f"data/{key}"]), (key, st["data"], last)
    assert st["data"]["lost_fraction"] == pytest.approx(last["data/lost_fraction"], abs=1e-5)
    assert re.search(r"defects=\d+.*lost=\d+", err), err[-2000:]          # the progress bar's postfix
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(os.path.join(run, "tb"))
    tb.Reload()
    events = tb.Scalars("data/lost_samples")
    assert events[-1].step == 40 and events[-1].value == last["data/lost_samples"]
    # Resumed: the counts go on from the checkpoint's, not from zero.
    saved = json.load(open(os.path.join(run, "checkpoints", "step_00000040", "loader_state.json")))["defects"]
    assert saved["lost_samples"] == last["data/lost_samples"]
    rc, _out, err = _finish(_start(run, _base_sets(data, 41, log__every=5, checkpoint__every=20,
                                                   data__max_lost_fraction=0.2)), timeout=180)
    assert rc == 0, err[-3000:]
    after = _metrics(run)[-1]
    assert after["step"] == 41
    for key in ("corrupt_image", "truncated_shard", "checksum_mismatch", "lost_samples"):
        assert after[f"data/{key}"] >= last[f"data/{key}"], (key, after, last)
    assert _status(run)["data"]["lost_samples"] == int(after["data/lost_samples"])


def test_a_shard_changed_after_its_manifest_is_reported_as_a_checksum_mismatch(tmp_path):
    """By the training stream (its samples still delivered: the bytes are reported, not
    dropped) and by `vqscale data inspect`."""
    from data_pipeline.config import DataConfig
    from data_pipeline.images import image_loader
    from data_pipeline.inspection import inspect_dataset

    root = str(tmp_path / "images")
    info = _defective_dataset(root)
    loader = image_loader(DataConfig(url=root, resolution=8, shuffle_buffer=8), 10, num_workers=2, max_epochs=1)
    keys = [k for b in loader for k in b["key"]]
    d = loader.defects
    assert d.by_reason["checksum_mismatch"] == 1
    assert [ex["shard"] for ex in d.examples if ex["reason"] == "checksum_mismatch"] == \
        [os.path.join(root, info["changed"])]
    assert len(keys) == info["samples"] - 1 - 4      # all but the corrupt image and the cut shard's tail
    assert d.lost_samples == 4
    summary = inspect_dataset(root, progress=False)
    assert summary["defects"]["by_reason"]["checksum_mismatch"] == 1
    assert summary["lost_samples"] == 4
    # Without the check (data.verify_checksums=false) nothing is reported.
    quiet = image_loader(DataConfig(url=root, resolution=8, shuffle_buffer=8, verify_checksums=False), 10,
                         num_workers=0, max_epochs=1)
    list(quiet)
    assert "checksum_mismatch" not in quiet.defects.by_reason


# ---- part 4: the give-up policy against a real object store killed by pid ---------------------------

class RestartableSeaweed(SeaweedS3):
    """The test server, killed with SIGKILL by its pid (a crash, not a shutdown) and started again
    on the same ports and data folder."""

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)       # weed runs in its own session: its group
        self.proc.wait(timeout=30)
        self.proc = None
        self._client = None

    def restart(self) -> None:
        for name in ("master", "volume", "filer", "s3"):      # stale sockets of the killed process
            for path in (f"/tmp/seaweedfs-{name}-grpc-{self.ports[name + '_grpc']}.sock",
                         os.path.join(self.tmpdir, f"{name}.sock")):
                if os.path.exists(path):
                    os.remove(path)
        if self._log_file is None or self._log_file.closed:
            self._log_file = open(self.log_path, "ab")
        self.proc = self._launch()       # the same environment as the first start (no AWS_*)
        self._wait_ready()

    def ensure_up(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            self.restart()


@pytest.fixture(scope="module")
def weed():
    """A SeaweedFS of this module's own (the session's is shared with other tests); skipped where
    it cannot start, except under CI=true."""
    server = start_s3_or_skip(RestartableSeaweed())
    try:
        yield server
    finally:
        server.stop(timeout=3)


# One try per S3 request (botocore's own retries, adaptive and up to 5 attempts, would stretch
# each of ours to tens of seconds): the loader's retry policy is what is under test.
_S3_FAST_FAIL = """
from data_pipeline import storage
storage.configure("s3", config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10})
"""


def _s3_images(weed, tmp_path) -> str:
    from tests.datasets import make_dataset

    local = str(tmp_path / "images")
    make_dataset(local, [20] * 8)
    bucket = weed.create_bucket("f-" + uuid.uuid4().hex[:16])
    fs = weed._fs()
    for name in sorted(os.listdir(local)):
        fs.pipe_file(f"{bucket[5:]}/images/{name}", open(os.path.join(local, name), "rb").read())
    return f"{bucket}/images"


def test_an_object_store_restarted_within_retry_for_s_loses_nothing(weed, tmp_path):
    weed.ensure_up()
    data = _s3_images(weed, tmp_path)
    run = str(tmp_path / "run")
    sets = _base_sets(data, 40, data__num_workers=1, data__retry_for_s=90, data__retry_backoff=0.2,
                      data__retries=1)
    proc = _start(run, sets, prelude=_S3_FAST_FAIL, env=weed.env())
    try:
        _wait_for_step(proc, run, 3)
        weed.kill()                     # an epoch is 20 steps (1 s): reads fail from here on
        time.sleep(1)
        weed.restart()                  # about 10-15 s on 2 cores: well within retry_for_s
        rc, _out, err = _finish(proc, timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, err[-3000:]
    st = _status(run)
    assert st["state"] == "finished" and st["step"] == 40
    assert st["data"]["lost_samples"] == 0 and st["data"]["defects"] == 0, st["data"]
    last = _metrics(run)[-1]
    assert last["data/lost_samples"] == 0 and last["data/defects"] == 0
    log0 = open(os.path.join(run, "logs", "rank0.log")).read()
    assert re.search(r"read error on s3://\S+ .*retry \d+", log0), "the outage was never met by a read"


def test_an_outage_longer_than_retry_for_s_stops_the_run_at_max_lost_fraction(weed, tmp_path):
    weed.ensure_up()
    data = _s3_images(weed, tmp_path)
    run = str(tmp_path / "run")
    sets = _base_sets(data, 400, data__num_workers=1, data__retry_for_s=2, data__retry_backoff=0.2,
                      data__retries=1)          # data.max_lost_fraction: its default, 0.01
    proc = _start(run, sets, prelude=_S3_FAST_FAIL, env=weed.env())
    try:
        _wait_for_step(proc, run, 3)
        weed.kill()                     # and not restarted while the run lives
        killed = time.time()
        rc, _out, err = _finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    ended = time.time()
    assert rc == 2, err[-3000:]
    errors = [x for x in err.splitlines() if x.startswith("vqscale: error: ")]
    assert len(errors) == 1 and "data.max_lost_fraction=0.01" in errors[0], err[-3000:]   # one line
    st = _assert_failed_fast(run, ended, err, r"DataLossError: \d+ samples lost.*max_lost_fraction=0\.01")
    assert st["data"]["lost_samples"] >= 20, st["data"]
    assert st["data"].get("unreadable_shard", 0) + st["data"].get("io_error", 0) >= 1, st["data"]
    assert st["data"]["lost_fraction"] > 0.01
    assert ended - killed < 60, f"{ended - killed:.0f}s from the outage to the end of the run"
