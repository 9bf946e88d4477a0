"""Issue 20, part 5: bad inputs end with one line and exit 2, never a raw traceback.

Each case runs the real ``vqscale`` command in a subprocess and asserts exit code 2, no
``Traceback`` on stderr, and exactly one ``vqscale: error:`` line, the last one, naming what was
wrong and what to do:

- S3 without credentials, S3 with a dead endpoint (a closed port on 127.0.0.1; within seconds),
  a bucket that does not exist (``data build-demo`` into it): the storage seam's up-front check;
- a pickle renamed ``model.safetensors`` with its checksum updated (the package passes its
  checksums; its weights file is not safetensors);
- a pickle as ``--set tokenizer=``;
- a class-conditional prior with fewer classes than the code shards' labels (it failed at step 1);
- and ``vqscale submit`` refuses the config ones (tokenizer, class count) before anything is queued.

The S3 cases run against the real SeaweedFS server of ``tests/conftest.py`` (they fail instead of
skipping under ``CI=true``); the dead endpoint needs no server.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from tests.launch import ROOT, job_env

PRIOR = "vim-small-tiny"       # VIMConfig num_classes=10, codebook 64, grid 4x4


def _vqscale(args: list[str], env: dict | None = None, timeout: float = 180, cwd: str = ROOT):
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pretrain.cli", *args], env=env or job_env(), cwd=cwd,
                         capture_output=True, text=True, timeout=timeout)
    return out, time.monotonic() - t


def _one_line(out: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, no traceback, and exactly one error line, the last line of stderr, holding ``words``."""
    err = out.stderr
    assert out.returncode == 2, (out.returncode, err[-4000:])
    assert "Traceback" not in err, err[-4000:]
    lines = [x for x in err.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("vqscale: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-20:]
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def _no_aws_credentials(env: dict, tmp_path) -> dict:
    """``env`` with no AWS credentials anywhere botocore looks (and no instance metadata call)."""
    env = {k: v for k, v in env.items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                        "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
                        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")}
    env.update({"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
                "AWS_CONFIG_FILE": str(tmp_path / "no-config"), "AWS_EC2_METADATA_DISABLED": "true",
                "HOME": str(tmp_path)})
    return env


def _closed_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _codes(root: str, classes: int, shards: int = 2, per_shard: int = 12) -> str:
    """Code shards for ``PRIOR`` (codebook 64, 4x4) whose labels run 0..classes-1."""
    from data_pipeline.codes import CodeShardWriter, write_code_manifest

    rng = np.random.default_rng(0)
    entries, n = [], 0
    for s in range(shards):
        w = CodeShardWriter(root, f"codes-{s:06d}.tar", codebook_size=64, grid_size=(4, 4))
        for _ in range(per_shard):
            w.write(f"{n:08d}", rng.integers(0, 64, 16).astype(np.int32), label=n % classes, caption="")
            n += 1
        entries.append(w.close())
    write_code_manifest(root, entries, "synthetic", "0" * 64, (4, 4), 64, 16)
    return root


def _tokenizer_package(folder: str) -> str:
    import torch

    from model_zoo.package import save_package
    from model_zoo.registry import create_model

    torch.manual_seed(0)
    return save_package(create_model("vqgan-f8-tiny"), folder)


def _pickle_renamed_safetensors(folder: str) -> str:
    """A tokenizer package whose model.safetensors is a pickle, checksums updated to match."""
    import torch

    from model_zoo.package import write_checksums

    pkg = _tokenizer_package(folder)
    weights = os.path.join(pkg, "model.safetensors")
    torch.save({"w": torch.zeros(3)}, weights)     # torch.save writes a pickle (in a zip)
    write_checksums(pkg)
    return pkg


def _train(run: str, data: str, *sets: str) -> list[str]:
    args = ["train", "--recipe", PRIOR, "--run-dir", run, "--set", f"data.url={data}", "--set", "steps=2",
            "--set", "global_batch_size=4", "--set", "data.num_workers=0", "--set", "validation.visuals_every=0",
            "--set", "log.progress=false"]
    for s in sets:
        args += ["--set", s]
    return args


# ---- object storage ---------------------------------------------------------------------------------

@pytest.mark.s3
def test_s3_without_credentials_is_one_line(s3_bucket, tmp_path):
    env = _no_aws_credentials(job_env(), tmp_path)
    out, _ = _vqscale(["data", "inspect", f"{s3_bucket}/demo"], env=env)
    _one_line(out, f"{s3_bucket}/demo", "credentials", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    # a training run whose data is in the bucket: the same line, before the run directory is written
    run = tmp_path / "run"
    out, _ = _vqscale(_train(str(run), f"{s3_bucket}/codes"), env=env)
    _one_line(out, f"{s3_bucket}/codes", "credentials", "AWS_ACCESS_KEY_ID")
    assert not (run / "config.json").exists()


def test_s3_with_a_dead_endpoint_is_one_line_within_seconds(tmp_path):
    """No server: the endpoint is a closed port on 127.0.0.1 (connection refused)."""
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    env = {**job_env(), "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": endpoint,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    env.pop("AWS_ENDPOINT_URL_S3", None)
    run = tmp_path / "run"
    out, took = _vqscale(_train(str(run), "s3://vqs-bucket/codes"), env=env, timeout=120)
    line = _one_line(out, "s3://vqs-bucket/codes", endpoint, "AWS_ENDPOINT_URL")
    assert took < 40, (took, line)           # a subprocess that imports torch + a few connection attempts
    assert not (run / "config.json").exists()
    out, took = _vqscale(["data", "inspect", "s3://vqs-bucket/demo"], env=env, timeout=120)
    _one_line(out, "s3://vqs-bucket/demo", endpoint, "AWS_ENDPOINT_URL")
    assert took < 40, took


@pytest.mark.s3
def test_build_demo_into_a_missing_bucket_is_one_line(s3_server, tmp_path):
    bucket = "missing-" + uuid.uuid4().hex[:12]
    out, _ = _vqscale(["data", "build-demo", "--quick", "--out", f"s3://{bucket}/demo"])
    _one_line(out, f"s3://{bucket}/demo", f"bucket {bucket!r}", "does not exist", "create")


# ---- model packages -----------------------------------------------------------------------------------

def test_a_pickle_renamed_model_safetensors_is_one_line(tmp_path):
    from tests.datasets import make_dataset

    pkg = _pickle_renamed_safetensors(str(tmp_path / "tok"))
    images = str(tmp_path / "images")
    make_dataset(images, [4])
    out, _ = _vqscale(["tokenize", "--tokenizer", pkg, "--data", images, "--out", str(tmp_path / "codes"),
                       "--device", "cpu"])
    _one_line(out, pkg, "model.safetensors", "not a safetensors file")
    # a prior's run naming it as its tokenizer: the same, before the run begins
    run = tmp_path / "run"
    out, _ = _vqscale(_train(str(run), _codes(str(tmp_path / "c"), 10), f"tokenizer={pkg}"))
    _one_line(out, "tokenizer=", "model.safetensors", "not a safetensors file")
    assert not (run / "config.json").exists()


def test_a_pickle_as_the_tokenizer_is_one_line(tmp_path):
    junk = tmp_path / "tokenizer.pkl"
    junk.write_bytes(pickle.dumps({"w": [1.0]}))
    run = tmp_path / "run"
    out, _ = _vqscale(_train(str(run), _codes(str(tmp_path / "c"), 10), f"tokenizer={junk}"))
    _one_line(out, f"tokenizer={str(junk)!r}", "not a model-zoo package", "vqscale zoo export")
    assert not (run / "config.json").exists()


# ---- a prior's class count against the code shards' labels ----------------------------------------

def test_a_prior_with_fewer_classes_than_the_labels_is_one_line(tmp_path):
    data = _codes(str(tmp_path / "codes"), 20)
    tok = _tokenizer_package(str(tmp_path / "tok"))
    run = tmp_path / "run"
    out, _ = _vqscale(_train(str(run), data, f"tokenizer={tok}"), timeout=120)
    _one_line(out, "labels 0..19 (20 classes)", "10 classes", "--set model.num_classes=20")
    assert not (run / "config.json").exists()


# ---- vqscale submit: the config ones, before anything is queued -----------------------------------------

def test_submit_refuses_the_config_ones_before_queueing(tmp_path):
    data20 = _codes(str(tmp_path / "codes20"), 20)
    data10 = _codes(str(tmp_path / "codes10"), 10)
    tok = _tokenizer_package(str(tmp_path / "tok"))
    junk = tmp_path / "tokenizer.pkl"
    junk.write_bytes(pickle.dumps({"w": [1.0]}))
    bad_pkg = _pickle_renamed_safetensors(str(tmp_path / "bad-tok"))
    run = tmp_path / "run"
    cases = [(data20, f"tokenizer={tok}", ("labels 0..19 (20 classes)", "--set model.num_classes=20")),
             (data10, f"tokenizer={junk}", ("not a model-zoo package",)),
             (data10, f"tokenizer={bad_pkg}", ("not a safetensors file",))]
    for data, tok_set, words in cases:
        out, _ = _vqscale(["submit", "--cluster", "local", "--dry-run", "--job-dir", str(tmp_path / "job"), "--",
                           *_train(str(run), data, tok_set)])
        _one_line(out, *words)
        assert "#SBATCH" not in out.stdout and not run.exists() and not (tmp_path / "job").exists()
