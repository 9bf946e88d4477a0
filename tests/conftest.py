"""Shared fixtures: a real S3 server (SeaweedFS) for the session and a fresh bucket per test; a
real single-machine Slurm cluster for the session."""

from __future__ import annotations

import os
import shutil
import sys
import uuid

import pytest

# The repository root, so `import tests.s3server` and the project packages import however pytest
# was started (pytest's rootdir insertion normally does this already).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from data_pipeline import storage  # noqa: E402
from tests.s3server import SeaweedS3  # noqa: E402
from tests.slurm_cluster import SlurmCluster  # noqa: E402


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def start_s3_or_skip(server):
    """Start a SeaweedFS server object; skip the test where it cannot start, fail under CI=true."""
    try:
        server.start()
    except Exception as e:  # noqa: BLE001
        if _in_ci():
            raise RuntimeError(f"CI=true and the S3 test server could not start: {e}") from e
        pytest.skip(f"S3 test server (SeaweedFS) could not start: {e}")
    return server


@pytest.fixture(scope="session")
def s3_server():
    """A SeaweedFS S3 server on 127.0.0.1; ``os.environ`` points s3fs at it for the session.

    If it cannot start, tests that need it are skipped, except in CI (``CI=true``), where the
    fixture fails instead.
    """
    server = start_s3_or_skip(SeaweedS3())
    global _S3_SERVER
    _S3_SERVER = server
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    storage.configure("s3")  # drop cached filesystems so they see the new environment
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage.configure("s3")
        _S3_SERVER = None
        server.stop()


_S3_SERVER: SeaweedS3 | None = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that used the S3 server carries weed's log tail and the free disk space:
    an S3 InternalError says nothing of its cause, and CI output is all there is."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and _S3_SERVER is not None and "s3_server" in getattr(item, "fixturenames", ()):
        free = shutil.disk_usage(_S3_SERVER.tmpdir or "/tmp").free / 2**30
        report.sections.append(
            ("SeaweedFS", f"free disk: {free:.2f} GiB\n--- weed log tail ---\n{_S3_SERVER.log_tail(40)}"))


@pytest.fixture(scope="session")
def slurm_cluster():
    """A 2-node Slurm cluster (2 x 4 CPUs) on this machine; Slurm commands need its ``env()``
    (``os.environ`` is left alone, so only the tests that ask for it talk to it).

    Where Slurm cannot run (not root, no apt-get, install fails, daemons do not come up) tests
    that need it are skipped with the reason, except in CI (``CI=true``), where they fail.
    """
    cluster = SlurmCluster()
    try:
        cluster.start()
    except Exception as e:  # noqa: BLE001
        if _in_ci():
            pytest.fail(f"CI=true and the Slurm test cluster could not start: {e}", pytrace=False)
        pytest.skip(f"Slurm test cluster could not start: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket; yields ``s3://NAME``."""
    name = "t-" + uuid.uuid4().hex[:20]
    yield s3_server.create_bucket(name)
    try:
        s3_server.delete_bucket(name)
    except Exception:  # noqa: BLE001 - best effort; the server's folder is temporary anyway
        pass


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny problems: on a busy 2-core machine extra threads only
    wait on each other (seconds per fit). The previous setting is restored."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
