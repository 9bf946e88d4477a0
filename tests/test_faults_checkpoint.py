"""Fault injection into checkpoints (issue 20, part 1): damaged step folders never load silently.

Every step folder carries ``checksums.sha256`` (:mod:`pretrain.checksums`). Each test damages a real
checkpoint written by ``vqscale train`` the way a cluster does (bytes overwritten on disk, a file
lost, a truncated copy, a stray ``latest``) and runs the real command on it: a resume falls back to
the newest step that verifies, says which file was wrong, and continues bit-identically from there;
with nothing left to fall back to, or for an export of a named damaged step, the command stops with
exit 2 and one line. Before manifests, three of these damages resumed silently with changed
training (model bytes, optimizer bytes, the RNG file deleted) and the others ended in tracebacks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.test_trainer import _ROOT, _env, _losses, _train_cmd, make_codes

STEPS, EVERY = 12, 4


def _sets(data: str) -> list[str]:
    return ["--set", f"data.url={data}", "--set", f"tokenizer={os.path.join(os.path.dirname(data), 'tok')}", "--set", f"steps={STEPS}", "--set", f"checkpoint.every={EVERY}",
            "--set", "checkpoint.keep_last=10", "--set", "log.every=1", "--set", "global_batch_size=8",
            "--set", "data.num_workers=0", "--set", "validation.visuals_every=0", "--set", "optim.warmup_steps=2",
            "--set", f"optim.total_steps={STEPS}", "--set", "log.progress=false"]


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=_env(), cwd=_ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 12-step run with checkpoints at steps 4, 8 and 12."""
    root = tmp_path_factory.mktemp("ckpt-faults")
    from model_zoo.package import save_package
    from model_zoo.registry import create_model

    data = make_codes(str(root / "codes"), shards=2, per_shard=16)
    save_package(create_model("vqgan-f8-tiny"), str(root / "tok"))    # a prior's package holds its tokenizer
    ref = str(root / "ref")
    out = _run(_train_cmd("vim-small-tiny", ref, _sets(data)))
    assert out.returncode == 0, out.stderr[-4000:]
    return {"data": data, "ref": ref, "root": root}


def _stopped_at_8(reference, name: str) -> str:
    """A copy of the reference run as a run stopped after its step-8 checkpoint."""
    run = str(reference["root"] / name)
    shutil.copytree(reference["ref"], run)
    shutil.rmtree(os.path.join(run, "checkpoints", "step_00000012"))
    with open(os.path.join(run, "checkpoints", "latest"), "w") as f:
        f.write("step_00000008\n")
    return run


def _overwrite(path: str, at: int, data: bytes = b"\xa5" * 16) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


STEP8 = os.path.join("checkpoints", "step_00000008")
# (damage, the file the warning must name); each is a fault a cluster's storage or a user makes
DAMAGES = {
    "model-bytes": (lambda s: _overwrite(os.path.join(s, "model", "mp_rank_00_model_states.pt"), 2000),
                    "model/mp_rank_00_model_states.pt: checksum mismatch"),
    "optimizer-bytes": (lambda s: _overwrite(os.path.join(s, "model", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                             1500), "optim_states.pt: checksum mismatch"),
    "rng-deleted": (lambda s: os.remove(os.path.join(s, "rng", "rank0.pt")), "rng/rank0.pt: missing"),
    "model-truncated": (lambda s: _truncate(os.path.join(s, "model", "mp_rank_00_model_states.pt")),
                        "model/mp_rank_00_model_states.pt: checksum mismatch"),
    "meta-garbled": (lambda s: _overwrite(os.path.join(s, "meta.json"), 0, b"\x00{]"), "meta.json: checksum mismatch"),
    "loader-state-garbled": (lambda s: _overwrite(os.path.join(s, "loader_state.json"), 5, b"zz"),
                             "loader_state.json: checksum mismatch"),
    "ema-deleted": (lambda s: os.remove(os.path.join(s, "ema", "model", "rank0.pt")), "ema/model/rank0.pt: missing"),
    "manifest-deleted": (lambda s: os.remove(os.path.join(s, "checksums.sha256")), "checksums.sha256: missing"),
}


def test_a_step_folder_lists_every_file_and_sha256sum_checks_it(reference):
    step = os.path.join(reference["ref"], STEP8)
    listed = {line.split("  ", 1)[1] for line in open(os.path.join(step, "checksums.sha256")).read().splitlines()}
    on_disk = {os.path.relpath(os.path.join(r, f), step) for r, _, fs in os.walk(step) for f in fs}
    assert listed == on_disk - {"checksums.sha256"} and "meta.json" in listed and "rng/rank0.pt" in listed
    assert json.load(open(os.path.join(step, "meta.json")))["checksums"] is True
    if shutil.which("sha256sum"):
        out = subprocess.run(["sha256sum", "--quiet", "-c", "checksums.sha256"], cwd=step, capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_latest_step_falls_back_to_the_newest_that_verifies(reference, damage):
    """The run resumes from step 4, names the damaged file, and trains on bit-identically."""
    run = _stopped_at_8(reference, damage)
    hurt, named = DAMAGES[damage]
    hurt(os.path.join(run, STEP8))
    out = _run(_train_cmd("vim-small-tiny", run, _sets(reference["data"])))
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["state"] == "finished" and summary["resumed_from"] == 4, summary
    assert named in out.stderr and "step_00000008 is damaged" in out.stderr, out.stderr[-3000:]
    assert "resuming from step_00000004, the newest step that verifies" in out.stderr
    ref, got = _losses(reference["ref"]), _losses(run)
    assert sorted(got) == list(range(1, STEPS + 1)) and all(got[s] == ref[s] for s in ref), (ref, got)
    # the damaged step was replaced by a fresh save, which verifies
    assert open(os.path.join(run, "checkpoints", "latest")).read().strip() == "step_00000012"
    step8 = os.path.join(run, STEP8)
    from pretrain.checkpoint import verify_step_folder

    verify_step_folder(step8, step8)


def _resume_as_the_reference(reference, run: str, resumed_from: int) -> str:
    """Resume ``run``; it must start at ``resumed_from`` and log the reference run's every loss.
    Returns its stderr."""
    out = _run(_train_cmd("vim-small-tiny", run, _sets(reference["data"])))
    assert out.returncode == 0, out.stderr[-4000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["resumed_from"] == resumed_from
    ref, got = _losses(reference["ref"]), _losses(run)
    assert all(got[s] == ref[s] for s in ref), (ref, got)
    return out.stderr


def test_a_stray_latest_falls_back_to_the_newest_step_that_verifies(reference):
    run = _stopped_at_8(reference, "stray-latest")
    with open(os.path.join(run, "checkpoints", "latest"), "w") as f:
        f.write("\x00\x00garbage")
    assert "latest is unreadable" in _resume_as_the_reference(reference, run, resumed_from=8)


def test_no_step_that_verifies_stops_with_one_line(reference):
    run = _stopped_at_8(reference, "all-damaged")
    _overwrite(os.path.join(run, STEP8, "model", "mp_rank_00_model_states.pt"), 2000)
    os.remove(os.path.join(run, "checkpoints", "step_00000004", "rng", "rank0.pt"))
    out = _run(_train_cmd("vim-small-tiny", run, _sets(reference["data"])))
    assert out.returncode == 2, (out.returncode, out.stderr[-4000:])
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("vqscale: error: no checkpoint of") and "step_00000008: model/mp_rank_00" in last, last
    assert "step_00000004: rng/rank0.pt: missing" in last and "--no-resume" in last, last
    status = json.load(open(os.path.join(run, "status.json")))
    assert status["state"] == "failed" and "no checkpoint of" in status.get("reason", ""), status


def test_export_verifies_and_falls_back_or_names_the_damaged_file(reference, tmp_path):
    run = _stopped_at_8(reference, "export")
    _overwrite(os.path.join(run, STEP8, "model", "mp_rank_00_model_states.pt"), 2000)
    zoo = [sys.executable, "-m", "pretrain.cli", "zoo", "export"]
    out = _run(zoo + [run, "--out", str(tmp_path / "pkg")])      # the run directory: its newest step that verifies
    assert out.returncode == 0, out.stderr[-4000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["step"] == 4
    assert "used step_00000004, the newest step" in out.stderr
    out = _run(zoo + [os.path.join(run, STEP8), "--out", str(tmp_path / "pkg8")])     # a named step: no fallback
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-4000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("vqscale: error: checkpoint ") and "model/mp_rank_00_model_states.pt: checksum" in last
    assert not (tmp_path / "pkg8").exists()


def test_a_checkpoint_without_a_manifest_still_resumes(reference):
    """Step folders written before manifests (no checksums.sha256, no "checksums" in meta.json)."""
    run = _stopped_at_8(reference, "legacy")
    step = os.path.join(run, STEP8)
    os.remove(os.path.join(step, "checksums.sha256"))
    meta = json.load(open(os.path.join(step, "meta.json")))
    del meta["checksums"]
    json.dump(meta, open(os.path.join(step, "meta.json"), "w"))
    assert "loaded unverified" in _resume_as_the_reference(reference, run, resumed_from=8)


def _metric_lines(text: str) -> dict[int, float]:
    return {d["step"]: d["loss"] for d in map(json.loads, text.splitlines()) if "loss" in d}


@pytest.mark.s3
def test_a_damaged_step_on_s3_falls_back_after_its_download_is_checked(reference, s3_bucket, tmp_path):
    """A remote run directory: each node downloads the step folder and checks that copy."""
    from data_pipeline import storage

    data, tok = f"{s3_bucket}/codes", f"{s3_bucket}/tok"
    storage.upload_dir(reference["data"], data)
    storage.upload_dir(str(reference["root"] / "tok"), tok)
    run = f"{s3_bucket}/runs/prior"
    env = {**_env(), "VQSCALE_CACHE": str(tmp_path / "cache")}
    sets = _sets(data) + ["--set", f"tokenizer={tok}"]
    first = subprocess.run(_train_cmd("vim-small-tiny", run, sets + ["--set", "steps=8"]), env=env, cwd=_ROOT,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-4000:]
    before = _metric_lines(storage.read_text(f"{run}/metrics.jsonl"))
    obj = f"{run}/{STEP8}/model/zero_pp_rank_0_mp_rank_00_optim_states.pt".replace(os.sep, "/")
    blob = bytearray(storage.read_bytes(obj))
    blob[1500:1516] = b"\xa5" * 16
    storage.write_bytes(obj, bytes(blob))
    out = subprocess.run(_train_cmd("vim-small-tiny", run, sets), env=env, cwd=_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["resumed_from"] == 4
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt: checksum mismatch" in out.stderr
    after = _metric_lines(storage.read_text(f"{run}/metrics.jsonl"))
    assert all(after[s] == before[s] for s in range(5, 9)), (before, after)      # steps 5-8 again, the same
    assert storage.read_text(f"{run}/checkpoints/latest").strip() == "step_00000012"


@pytest.mark.multiprocess
def test_two_ranks_agree_to_fall_back_when_one_finds_the_damage(reference, tmp_path):
    """ZeRO shards of 2 ranks: the check is split between them and its findings gathered, so both
    load the same older step (a rank falling back alone would hang or diverge)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
                "--rdzv-endpoint=127.0.0.1:0", "-m", "pretrain.cli", "train", "--recipe", "vim-small-tiny"]
    sets = _sets(reference["data"]) + ["--set", "deepspeed.zero_stage=2", "--set", "micro_batch_size=2"]
    ref, run = str(tmp_path / "ref2"), str(tmp_path / "run2")
    out = _run(torchrun + ["--run-dir", ref, *sets], timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    shutil.copytree(ref, run)
    shutil.rmtree(os.path.join(run, "checkpoints", "step_00000012"))
    with open(os.path.join(run, "checkpoints", "latest"), "w") as f:
        f.write("step_00000008\n")
    _overwrite(os.path.join(run, STEP8, "model", "zero_pp_rank_1_mp_rank_00_optim_states.pt"), 1500)
    out = _run(torchrun + ["--run-dir", run, *sets], timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: checksum mismatch" in out.stderr
    assert "resuming from step_00000004" in out.stderr
    a, b = _losses(ref), _losses(run)
    assert sorted(b) == list(range(1, STEPS + 1)) and all(a[s] == b[s] for s in a), (a, b)
