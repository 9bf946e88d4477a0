"""Checkpoint files never run code: ``pretrain.safe_load`` reads every torch file with
``weights_only=True`` (DeepSpeed's own loads included, while vqscale resumes or exports), the
allowlist covers every file a real DeepSpeed run writes, and a poisoned file stops a resume or an
export with one clear line, its code not run."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pretrain import safe_load
from tests.launch import ROOT, job_env
from tests.test_trainer import make_codes


class _RunsCode:
    """Unpickling this object calls ``exec``: it writes ``marker`` if it ever runs."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _poison(path: str, marker: str) -> None:
    torch.save({"module": {"w": torch.zeros(2)}, "payload": _RunsCode(marker)}, path)


def _poison_in_step(path: str, marker: str) -> None:
    """Poison a file of a checkpoint step folder and update its checksum manifest as an attacker
    would (the manifest alone stops an accidental change, not a deliberate one)."""
    from pretrain.checksums import MANIFEST, manifest_text
    from model_zoo.package import parse_checksums, sha256_file

    _poison(path, marker)
    step = os.path.dirname(os.path.dirname(path))
    sums = parse_checksums(open(os.path.join(step, MANIFEST)).read(), step)
    sums[os.path.relpath(path, step).replace(os.sep, "/")] = sha256_file(path)
    with open(os.path.join(step, MANIFEST), "w") as f:
        f.write(manifest_text(sums))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker, bad, good = str(tmp_path / "ran"), str(tmp_path / "bad.pt"), str(tmp_path / "good.pt")
    _poison(bad, marker)
    torch.save({"w": torch.arange(3), "n": 1, "names": ["a"]}, good)
    real = torch.load
    with pytest.raises(safe_load.UnsafeCheckpointError, match=r"bad\.pt holds a Python object .*GLOBAL exec\)$"):
        safe_load.load(bad)
    with safe_load.weights_only_loads():
        assert torch.load is safe_load.load
        with safe_load.weights_only_loads():            # nested blocks restore only at the outermost
            pass
        assert torch.load is safe_load.load
        with pytest.raises(safe_load.UnsafeCheckpointError):
            torch.load(bad, weights_only=False)          # what DeepSpeed asks for is overridden
        assert torch.equal(torch.load(good, weights_only=False)["w"], torch.arange(3))
    assert torch.load is real
    assert not os.path.exists(marker)
    # the check is real: torch's own unpickler with weights_only=False does run it
    torch.load(bad, weights_only=False)
    assert open(marker).read() == "ran"


def _train(run: str, codes: str, tok: str) -> subprocess.CompletedProcess:
    sets = [f"data.url={codes}", "steps=2", "checkpoint.every=2", "global_batch_size=8", "data.num_workers=0",
            "validation.visuals_every=0", "validation.every=0", "log.progress=false", f"tokenizer={tok}",
            "optim.warmup_steps=1", "optim.total_steps=2"]
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "--recipe", "vim-small-tiny", "--run-dir", run]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, env=job_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_deepspeed_checkpoints_load_and_poisoned_ones_are_refused(tmp_path):
    from model_zoo.package import save_package
    from model_zoo.registry import create_model

    codes = make_codes(str(tmp_path / "codes"), shards=2, per_shard=16)
    tok = str(tmp_path / "tok")
    save_package(create_model("vqgan-f8-tiny"), tok)
    run = str(tmp_path / "run")
    res = _train(run, codes, tok)
    assert res.returncode == 0, res.stderr[-4000:]
    step = os.path.join(run, "checkpoints", "step_00000002")
    files = glob.glob(os.path.join(step, "**", "*.pt"), recursive=True)
    names = {os.path.basename(f) for f in files}
    assert {"mp_rank_00_model_states.pt", "rank0.pt"} <= names and any(n.endswith("optim_states.pt") for n in names)
    for f in files:                                      # the allowlist covers all of them
        safe_load.load(f, map_location="cpu")

    # a poisoned optimizer shard: DeepSpeed's own load (inside a resume) refuses it
    marker = str(tmp_path / "ran")
    resumed = str(tmp_path / "resumed")
    shutil.copytree(run, resumed)
    optim = glob.glob(os.path.join(resumed, "checkpoints", "step_00000002", "model", "*optim_states.pt"))[0]
    _poison_in_step(optim, marker)
    res = _train(resumed, codes, tok)
    assert res.returncode == 2, res.stderr[-4000:]
    assert "optim_states.pt holds a Python object" in res.stderr and "refused" in res.stderr
    # a poisoned model state: the export refuses it
    model_states = os.path.join(run, "checkpoints", "step_00000002", "model", "mp_rank_00_model_states.pt")
    _poison_in_step(model_states, marker)
    res = subprocess.run([sys.executable, "-m", "pretrain.cli", "zoo", "export", run, "--out", str(tmp_path / "pkg")],
                         env=job_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "model_states.pt holds a Python object" in res.stderr, res.stderr[-4000:]
    assert not os.path.exists(str(tmp_path / "pkg"))
    assert not os.path.exists(marker)
