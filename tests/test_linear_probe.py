"""The VIM/iGPT linear-probe protocol (evals/linear_probe.py) on synthetic features with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evals.linear_probe import fit_linear_probe, plot_probe, probe_layers

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(n_per_class: int, num_classes: int = 5, dim: int = 32, spread: float = 8.0, seed: int = 0):
    """Gaussian blobs (unit variance) whose centres lie ``spread`` apart per axis: separable."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * spread
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = centres[y] + rng.normal(size=(len(y), dim))
    perm = rng.permutation(len(y))
    # An offset and scale far from 0/1 to exercise the standardization.
    return (x[perm] * 30.0 + 500.0).astype(np.float32), y[perm]


def test_separable_blobs_near_perfect():
    x, y = _blobs(300, seed=1)
    xtr, ytr, xte, yte = x[:1000], y[:1000], x[1000:], y[1000:]
    res = fit_linear_probe(xtr, ytr, xte, yte, seed=0)
    assert res["top1"] >= 0.98, res
    assert res["train_top1"] >= 0.98, res
    assert res["num_classes"] == 5 and res["dim"] == 32
    assert res["num_train"] == 1000 and res["num_test"] == 500
    assert res["weight_decay"] in res["val_top1"]


def test_shuffled_labels_give_chance():
    num_classes = 5
    x, y = _blobs(800, num_classes=num_classes, seed=2)     # 4000 samples
    rng = np.random.default_rng(3)
    y = rng.permutation(y)                                  # labels now independent of features
    res = fit_linear_probe(x[:2000], y[:2000], x[2000:], y[2000:], seed=0)
    assert abs(res["top1"] - 1.0 / num_classes) < 0.05, res


def test_deterministic_with_seed_and_tensor_inputs():
    x, y = _blobs(60, seed=4)
    noisy = x + np.random.default_rng(5).normal(scale=400.0, size=x.shape).astype(np.float32)
    a = fit_linear_probe(noisy[:200], y[:200], noisy[200:], y[200:], seed=7)
    b = fit_linear_probe(torch.from_numpy(noisy[:200]), torch.from_numpy(y[:200]),
                         torch.from_numpy(noisy[200:]), torch.from_numpy(y[200:]), seed=7)
    assert a == b


def test_probe_layers_and_num_classes():
    x, y = _blobs(100, seed=6)
    noise = np.random.default_rng(7).normal(size=x.shape).astype(np.float32)
    feats = {0: (noise[:300], noise[300:]), 1: (x[:300], x[300:])}
    res = probe_layers(feats, y[:300], y[300:], num_classes=8, weight_decays=(1e-3,))
    assert set(res) == {0, 1}
    assert res[1] >= 0.98 and res[0] < 0.5
    with pytest.raises(ValueError):
        fit_linear_probe(x[:300], y[:300], x[300:, :5], y[300:])


def test_plot_writes_png(tmp_path):
    out = tmp_path / "sub" / "probe.png"
    data = plot_probe({0: 0.31, 4: {"top1": 0.62}, 8: 0.55, 12: 0.4}, str(out), "VIM linear probe")
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert data == out.read_bytes()
    plot_probe({"embed": 0.2, "block3": 0.5}, f"file://{tmp_path}/named.png", "named layers")
    assert (tmp_path / "named.png").read_bytes()[:8] == PNG_SIGNATURE
    # a baseline is drawn (a different picture); a missing one (None) is left out
    with_line = plot_probe({0: 0.31, 4: 0.62}, str(tmp_path / "b.png"), "b", baselines={"raw pixels": 0.9})
    without = plot_probe({0: 0.31, 4: 0.62}, str(tmp_path / "c.png"), "b", baselines={"raw pixels": None})
    assert with_line[:8] == without[:8] == PNG_SIGNATURE and with_line != without
