"""The metric logger: TensorBoard scalars and images on rank 0, JSON lines, remote run dirs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_pipeline import storage
from model_zoo.grids import image_grid
from pretrain.metrics import MetricLogger


def _events(folder):
    acc = EventAccumulator(folder, size_guidance={"images": 10, "scalars": 100})
    acc.Reload()
    return acc


def test_rank0_writes_tensorboard_and_jsonl(tmp_path):
    run = str(tmp_path / "run")
    with MetricLogger(run, rank=0) as log:
        for step in range(3):
            logged = log.scalars(step, {"loss": torch.tensor(1.0 / (step + 1)), "lr": 1e-3, "flag": True,
                                        "vector": torch.ones(3), "name": "skip me"}, prefix="train/")
        assert set(logged) == {"train/loss", "train/lr", "train/flag"}
        grid = log.images(2, "recon", torch.rand(5, 3, 8, 8) * 2 - 1, ncol=4)
        assert grid.shape == (2 * 10 + 2, 4 * 10 + 2, 3)
    acc = _events(os.path.join(run, "tb"))
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([1.0, 0.5, 1.0 / 3])
    assert acc.Tags()["images"] == ["recon"]
    lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [0, 1, 2] and lines[1]["train/loss"] == 0.5


def test_other_ranks_write_nothing(tmp_path):
    run = str(tmp_path / "run")
    with MetricLogger(run, rank=1) as log:
        assert log.scalars(0, {"loss": 1.0}) == {"loss": 1.0}
        assert log.images(0, "x", torch.zeros(1, 3, 4, 4)) is None
    assert not os.path.exists(run)


def test_remote_run_dir_is_staged_and_uploaded():
    run = "memory://metrics-test/run"
    with MetricLogger(run, rank=0) as log:
        log.scalars(0, {"loss": 2.0})
        log.images(0, "samples", torch.zeros(2, 3, 4, 4))
    names = storage.listdir(storage.join(run, "tb"))
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert json.loads(storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()[0])["loss"] == 2.0


def test_image_grid_maps_range():
    g = image_grid(torch.stack([torch.full((3, 2, 2), -1.0), torch.full((3, 2, 2), 1.0)]), ncol=2, pad=0)
    assert g.shape == (2, 4, 3) and g[0, 0, 0] == 0 and g[0, 3, 0] == 255
