"""The shipped digits judge (evals/digits.py): it recognises real demo digits, rejects noise,
gives finite features for a digits FID, and retrains deterministically."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evals import digits
from evals.digits import (SHIPPED_PATH, judge_features, judge_samples, load_digits_judge,
                          real_digits, train_digits_judge)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_shipped_file_is_small_and_records_its_accuracy():
    assert os.path.exists(SHIPPED_PATH)
    assert os.path.getsize(SHIPPED_PATH) < 1_000_000
    judge = load_digits_judge()
    assert judge.path == SHIPPED_PATH
    assert judge.meta["input_size"] == 64 and judge.meta["heldout_accuracy"] >= 0.97
    assert load_digits_judge() is judge   # loaded once per process


def test_judge_recognises_held_out_real_digits():
    x, y = real_digits("heldout")
    assert x.shape[1:] == (3, 64, 64) and len(x) == 360
    assert x.min() >= -1 and x.max() <= 1
    res = judge_samples(x, y)
    assert res["class_accuracy"] >= 0.95, res["per_class"]
    assert res["judged"] == 360 and res["skipped"] == 0
    assert set(res["per_class"]) == set(range(10))
    assert res["predictions"].shape == (360,)
    assert np.asarray(res["confusion"]).sum() == 360


def test_other_resolutions_and_non_digit_labels():
    x, y = real_digits("heldout")
    x, y = x[:100], y[:100].clone()
    # A generator at 32 px or 256 px: resized to the judge's 64 px.
    small = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    assert judge_samples(small, y)["class_accuracy"] >= 0.9
    big = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)
    assert judge_samples(big, y)["class_accuracy"] >= 0.95
    y[:10] = 12     # a photo class
    y[10:15] = -1   # unlabelled
    res = judge_samples(x, y)
    assert res["judged"] == 85 and res["skipped"] == 15
    assert len(res["predictions"]) == 100


def test_noise_scores_far_below_real_digits():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(500, 3, 64, 64, generator=g) * 2 - 1
    requested = torch.arange(500) % 10
    noise_acc = judge_samples(noise, requested)["class_accuracy"]
    x, y = real_digits("heldout")
    real_acc = judge_samples(x, y)["class_accuracy"]
    assert noise_acc <= 0.3, noise_acc
    assert real_acc - noise_acc >= 0.6


def test_features_are_finite_and_separate_real_from_noise():
    x, _ = real_digits("heldout")
    f_real = judge_features(x[:64])
    f_noise = judge_features(torch.rand(64, 3, 64, 64) * 2 - 1)
    assert f_real.shape == (64, load_digits_judge().feature_dim) and f_real.dtype == np.float64
    assert np.isfinite(f_real).all() and np.isfinite(f_noise).all()
    assert np.linalg.norm(f_real.mean(0) - f_noise.mean(0)) > 0.1 * np.linalg.norm(f_real.mean(0))


def test_retrain_is_deterministic(tmp_path):
    a = train_digits_judge(str(tmp_path / "a.safetensors"), seed=3, epochs=1, limit=256)
    b = train_digits_judge(str(tmp_path / "b.safetensors"), seed=3, epochs=1, limit=256)
    c = train_digits_judge(None, seed=4, epochs=1, limit=256)
    wa, wb, wc = (m["model"].body[0].weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
    loaded = load_digits_judge(str(tmp_path / "a.safetensors"))
    assert torch.equal(loaded.model.body[0].weight, wa)
    assert loaded.meta["seed"] == 3 and loaded.meta["train_samples"] == 256


def test_missing_shipped_file_trains_into_cache(tmp_path, monkeypatch):
    # Make the fallback cheap: the point is where it writes and that it loads what it wrote.
    monkeypatch.setattr(digits, "SHIPPED_PATH", str(tmp_path / "absent.safetensors"))
    monkeypatch.setenv("VQSCALE_CACHE", str(tmp_path / "cache"))
    real_train = digits.train_digits_judge
    monkeypatch.setattr(digits, "train_digits_judge",
                        lambda path: real_train(path, seed=0, epochs=1, limit=128))
    judge = digits.load_digits_judge()
    assert judge.path == str(tmp_path / "cache" / "evals" / "digits_judge.safetensors")
    assert os.path.exists(judge.path)
