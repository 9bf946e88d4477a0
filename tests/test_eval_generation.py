"""evals/generation.py: sharded sampling and the generation metrics, on a tiny prior package
(vim-small-tiny over vit-vqgan-ss-tiny, 32 px, random weights).

- 1 process and 2 real processes (torchrun, gloo, this file as the script) give the same tokens
  per sample index, and the same metrics once rank 0 has gathered the features by index;
- end to end with the FID Inception network built from a random state dict saved to a file,
  reference statistics and features saved like real ones: every metric finite, the protocol
  complete, the grid written;
- the digits-judge path, and the skip (not crash) without Inception weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:      # when run as a script by torch.distributed.run
    sys.path.insert(0, _ROOT)

import model_zoo  # noqa: E402,F401  (registers the presets)
import model_zoo.vim  # noqa: E402,F401
from model_zoo import create_model  # noqa: E402
from model_zoo.package import save_package  # noqa: E402
from model_zoo.sampling import SamplingConfig  # noqa: E402
from evals.generation import (evaluate_generation, generate_sharded, rank_indices,  # noqa: E402
                              resolve_labels)

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLING = SamplingConfig(temperature=1.0, top_k=32, top_p=0.95, guidance_scale=1.5)
SEED, N, BATCH = 7, 6, 2
EVAL_ARGS = dict(num_samples=N, top_k=32, top_p=0.95, guidance=1.5, seed=SEED, batch_size=BATCH,
                 digits_judge=True, progress=False)


@pytest.fixture(scope="module")
def prior_pkg(tmp_path_factory) -> str:
    torch.manual_seed(0)
    tok = create_model("vit-vqgan-ss-tiny").eval()
    prior = create_model("vim-small-tiny", codebook_size=tok.codebook_size, grid_size=tok.grid_size).eval()
    url = str(tmp_path_factory.mktemp("zoo") / "vim")
    save_package(prior, url, tokenizer=tok)
    return url


@pytest.fixture
def no_inception(tmp_path, monkeypatch):
    """No Inception weights anywhere load_inception looks (our cache, torch hub's)."""
    monkeypatch.setenv("VQSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def _worker(pkg: str, out_dir: str) -> None:
    from pretrain.distributed import destroy_distributed, init_distributed

    os.environ["VQSCALE_CACHE"] = os.path.join(out_dir, "cache")        # no Inception weights here either
    os.environ["TORCH_HOME"] = os.path.join(out_dir, "torch_home")
    env = init_distributed("gloo")
    shard = generate_sharded(pkg, N, SAMPLING, seed=SEED, batch_size=BATCH, decode=False)
    torch.save({"indices": shard.indices, "codes": shard.codes, "labels": shard.labels},
               os.path.join(out_dir, f"rank{env.rank}.pt"))
    res = evaluate_generation(pkg, os.path.join(out_dir, "eval2.json"), **EVAL_ARGS)
    assert res["class_accuracy"] is not None   # every rank gets rank 0's result
    destroy_distributed()


def test_indices_and_labels(prior_pkg):
    assert rank_indices(7, 1, 3).tolist() == [1, 4] and rank_indices(2, 2, 3).tolist() == []
    prior = create_model("vim-small-tiny")
    idx = torch.arange(12)
    assert resolve_labels(prior, idx, "balanced").tolist() == (idx % 10).tolist()
    assert resolve_labels(prior, idx, [3, -1]).tolist() == [3, -1] * 6
    with pytest.raises(ValueError, match="class_labels"):
        resolve_labels(prior, idx, [10])


@pytest.mark.multiprocess
def test_two_processes_match_one_process(prior_pkg, tmp_path, no_inception):
    from tests.launch import torchrun

    proc = torchrun(__file__, prior_pkg, str(tmp_path), nproc=2, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = generate_sharded(prior_pkg, N, SAMPLING, seed=SEED, batch_size=BATCH, decode=False)
    assert one.indices.tolist() == list(range(N)) and one.codes.shape == (N, 64)
    seen = set()
    for r in range(2):
        part = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert part["indices"].tolist() == list(range(r, N, 2))
        for i, codes, label in zip(part["indices"].tolist(), part["codes"], part["labels"].tolist()):
            assert torch.equal(codes, one.codes[i]) and label == one.labels[i] == i % 10, i
            seen.add(i)
    assert seen == set(range(N))

    res1 = evaluate_generation(prior_pkg, str(tmp_path / "eval1.json"), **EVAL_ARGS)
    res2 = json.loads((tmp_path / "eval2.json").read_text())
    assert res1["protocol"]["world_size"] == 1 and res2["protocol"]["world_size"] == 2
    # Gathered by index: the same samples in the same order, so the same numbers (the decoder
    # saw other batch compositions, hence approx for the FID).
    assert res2["class_accuracy"] == res1["class_accuracy"]
    assert res2["digits"]["per_class"] == json.loads(json.dumps(res1["digits"]["per_class"]))
    assert res2["digits_fid"] == pytest.approx(res1["digits_fid"], rel=1e-4)
    grid1 = np.asarray(Image.open(tmp_path / "eval1_grid.png"))
    assert np.array_equal(grid1, np.asarray(Image.open(tmp_path / "eval2_grid.png")))


def test_end_to_end_with_inception(prior_pkg, tmp_path):
    from threadpoolctl import threadpool_limits

    from evals import inception as inc
    from evals.stats import save_ref_stats

    weights = tmp_path / "inception.pth"
    torch.save(inc.random_state_dict(seed=0), weights)
    rng = np.random.default_rng(0)
    # Non-negative and small, like pool features (averages of ReLUs) of the random network.
    real = np.abs(rng.normal(0, 0.2, size=(8, 2048)))
    ref_stats, ref_feats = str(tmp_path / "ref.npz"), str(tmp_path / "ref_feats.npz")
    save_ref_stats(ref_stats, real.mean(0), np.cov(real, rowvar=False), resolution=32, num_images=8,
                   extractor=inc.EXTRACTOR_NAME)
    np.savez(ref_feats, pool=real)
    out = str(tmp_path / "gen.json")
    # sqrtm of a 2048x2048 product is the slow part (~12 s on one core); BLAS threads fighting
    # over a shared 2-core machine make it several times slower.
    with threadpool_limits(1):
        res = evaluate_generation(prior_pkg, out, num_samples=8, ref_stats=ref_stats, ref_features=ref_feats,
                                  inception_weights=str(weights), temperature=0.9, top_k=16, guidance=2.0,
                                  seed=3, batch_size=4, digits_judge=True, progress=False)
    saved = json.loads(open(out).read())
    assert saved == json.loads(json.dumps(res))
    for key in ("fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall",
                "class_accuracy", "digits_fid"):
        assert isinstance(saved[key], float) and np.isfinite(saved[key]), key
    assert saved["fid"] > 0 and saved["is_mean"] >= 1.0 and 0 <= saved["precision"] <= 1
    p = saved["protocol"]
    assert p["num_samples"] == 8 and p["reference_num_samples"] == 50_000 and p["resolution"] == 32
    assert p["resize"] == inc.RESIZE and "sample_seeds(seed, i)" in p["seeding"] and p["seed"] == 3
    assert p["sampling"] == {"temperature": 0.9, "top_k": 16, "top_p": 1.0, "guidance": 2.0, "use_cache": True}
    assert p["feature_extractor"]["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert p["ref_stats"]["url"] == ref_stats and p["ref_stats"]["meta"]["num_images"] == 8
    assert p["ref_features"]["num_images"] == 8 and p["condition"]["num_classes"] == 10
    assert p["prior"]["name"] == "vim-small-tiny" and len(p["prior"]["sha256"]) == 64
    assert any("rank-deficient" in n for n in saved["notes"])
    grid = Image.open(saved["files"]["grid"])
    assert grid.size == (8 * 34 + 2, 34 + 2)   # 8 samples of 32 px, one row, 2 px padding


def test_digits_judge_path_and_missing_inception(prior_pkg, tmp_path, no_inception):
    res = evaluate_generation(prior_pkg, None, num_samples=4, class_labels=[3, -1], batch_size=4,
                              digits_judge=True, progress=False)
    assert 0.0 <= res["class_accuracy"] <= 1.0 and np.isfinite(res["digits_fid"])
    assert res["digits"]["judged"] == 2 and res["digits"]["skipped"] == 2
    assert res["fid"] is None and res["is_mean"] is None and res["protocol"]["feature_extractor"] is None
    assert any("no Inception weights" in n for n in res["notes"])
    from evals.inception import InceptionWeightsNotFound
    with pytest.raises(InceptionWeightsNotFound):   # asked for explicitly: an error, not a skip
        evaluate_generation(prior_pkg, None, num_samples=2, inception_weights=str(tmp_path / "none.pth"),
                            progress=False)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
