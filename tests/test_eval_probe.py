"""``evals/probe.py``: linear probes of priors (code shards, every block, null condition) and of
tokenizers (image shards), with the raw-pixel baseline.

Tiny random-weight packages (a prior "trained for 0 steps") on synthetic class-patterned code
shards (tests.test_trainer.make_codes), split by shard into a training and a held-out root, and the
demo dataset (real sklearn digits and photo crops) for the image side."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

import model_zoo.stackformer  # noqa: F401  (registers the presets)
import model_zoo.t2i_prior  # noqa: F401
import model_zoo.vim  # noqa: F401
from data_pipeline import storage
from data_pipeline.codes import CodeShardWriter, write_code_manifest
from data_pipeline.demo import build_demo
from evals.probe import evaluate_linear_probe, pixel_features
from model_zoo import create_model
from model_zoo.package import save_package
from tests.test_trainer import CODEBOOK, make_codes

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"


def _split_codes(root: str, grid=(4, 4), kept=None) -> tuple[str, str]:
    """Five shards of one synthetic dataset (same class patterns): four to train, one held out."""
    make_codes(os.path.join(root, "train"), shards=5, per_shard=30, grid=grid, kept=kept)
    train, test = os.path.join(root, "train"), os.path.join(root, "test")
    entries = storage.read_json(os.path.join(train, "manifest.json"))["shards"]
    os.makedirs(test)
    shutil.move(os.path.join(train, entries[-1]["name"]), os.path.join(test, entries[-1]["name"]))
    n = kept or grid[0] * grid[1]
    write_code_manifest(train, entries[:-1], "synthetic", "0" * 64, grid, CODEBOOK, n)
    write_code_manifest(test, entries[-1:], "synthetic", "0" * 64, grid, CODEBOOK, n)
    return train, test


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    return _split_codes(str(tmp_path_factory.mktemp("codes")))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    build_demo(str(root / "train"), quick=True, holdout=str(root / "test"), holdout_every=4, progress=False)
    return str(root / "train"), str(root / "test")


def _package(tmp_path, prior_name: str, tok_name: str) -> str:
    torch.manual_seed(0)
    tok = create_model(tok_name)
    prior = create_model(prior_name, codebook_size=tok.codebook_size, grid_size=tok.grid_size)
    url = str(tmp_path / prior_name)
    save_package(prior, url, tokenizer=tok)       # random weights: a prior trained for 0 steps
    return url


def _check(result: dict, out: str, keys: list[str]) -> None:
    assert list(result["layers"]) == keys
    assert all(0.0 <= v <= 1.0 for v in result["layers"].values())
    assert str(result["best_layer"]) in keys
    assert result["best_top1"] == max(result["layers"].values())
    with open(out) as f:
        on_disk = json.load(f)
    assert on_disk["layers"] == result["layers"] and on_disk["protocol"]["task"] == "linear-probe"
    png = out[:-5] + ".png"
    assert result["files"]["plot"] == png and on_disk["files"]["json"] == out
    with open(png, "rb") as f:
        assert f.read(8) == PNG


def test_vim_probe_every_block_with_pixel_baseline(tmp_path, codes, demo):
    url = _package(tmp_path, "vim-small-tiny", "vqgan-f8-tiny")
    out = str(tmp_path / "res" / "probe.json")
    r = evaluate_linear_probe(url, *codes, out, batch_size=32, device="cpu", progress=False,
                              images_train=demo[0], images_test=demo[1], num_workers=0)
    _check(r, out, ["0", "1"])                               # vim-small-tiny has 2 blocks
    assert r["kind"] == "prior" and isinstance(r["best_layer"], int)
    assert (r["num_train"], r["num_test"], r["num_classes"]) == (120, 30, 10)
    # Class patterns with 20% of the tokens replaced are separable even by random features.
    assert r["best_top1"] > 2 * r["chance"]
    p = r["protocol"]
    assert p["condition"].startswith("null") and p["model"]["name"] == "vim-small-tiny"
    assert p["codes_match_prior_tokenizer"] is False           # make_codes' made-up tokenizer
    # The pixel baseline, at the prior's tokenizer's resolution (32 px -> 16x16x3).
    pix = r["pixel_baseline"]
    assert pix["resolution"] == 32 and pix["dim"] == 768 and 0.0 <= pix["top1"] <= 1.0


def test_layer_subset_max_samples_and_determinism(tmp_path, codes):
    url = _package(tmp_path, "vim-small-tiny", "vqgan-f8-tiny")
    kw = dict(batch_size=16, device="cpu", progress=False, max_samples=50)
    a = evaluate_linear_probe(url, *codes, str(tmp_path / "a.json"), layers=[-1], **kw)
    b = evaluate_linear_probe(url, *codes, None, layers=[1], **kw)
    assert list(a["layers"]) == ["1"] and a["layers"] == b["layers"]    # -1 is the last block
    assert (a["num_train"], a["num_test"]) == (50, 30) and "files" not in b
    with pytest.raises(IndexError):
        evaluate_linear_probe(url, *codes, None, layers=[2], **kw)
    with pytest.raises(ValueError, match="both images_train and images_test"):
        evaluate_linear_probe(url, *codes, None, images_train=codes[0], **kw)


def test_paper_probe_block_is_the_default_and_all_sweeps(tmp_path, codes, monkeypatch):
    """vim-base / vim-large: the paper's block (10 of 24, 15 of 36, counted from 1) by default;
    ``layers="all"`` sweeps; other priors sweep by default. The recipe on the model card is kept."""
    import model_zoo.vim as vim
    from evals.probe import paper_probe_layer

    assert paper_probe_layer("vim-base", 24) == 9 and paper_probe_layer("vim-large", 36) == 14
    assert paper_probe_layer("vim-base", 2) is None and paper_probe_layer("vim-small", 12) is None
    # the tiny twin stands in for vim-base: its 2 blocks, the paper's at "block 2 of 2"
    monkeypatch.setitem(vim.PAPER_PROBE_BLOCKS, "vim-base-tiny", (2, 2))
    torch.manual_seed(0)
    tok = create_model("vqgan-f8-tiny")
    prior = create_model("vim-base-tiny", codebook_size=tok.codebook_size, grid_size=tok.grid_size)
    url = str(tmp_path / "uncond")
    save_package(prior, url, tokenizer=tok, card_extra={"training": {"recipe": "vim-base-uncond-tiny"}})
    kw = dict(batch_size=32, device="cpu", progress=False, max_samples=40, weight_decays=(1e-3,))
    r = evaluate_linear_probe(url, *codes, None, **kw)
    assert list(r["layers"]) == ["1"] and r["paper_layer"] == 1 and r["best_layer"] == 1
    p = r["protocol"]
    assert p["layers"].startswith("the paper's probe block (2 of 2)")
    assert p["trained_recipe"] == "vim-base-uncond-tiny" and p["trained_unconditional"] is True
    swept = evaluate_linear_probe(url, *codes, None, layers="all", **kw)
    assert list(swept["layers"]) == ["0", "1"] and swept["layers"]["1"] == r["layers"]["1"]
    assert swept["protocol"]["layers"] == "every block"
    with pytest.raises(ValueError, match="'all'"):
        evaluate_linear_probe(url, *codes, None, layers="some", **kw)


def test_text_prior_and_stackformer_probe(tmp_path, codes):
    """The text prior probes with the empty caption; Stackformer with the kept positions."""
    t2i = _package(tmp_path, "t2i-prior-1b-tiny", "vqgan-f8-tiny")
    r = evaluate_linear_probe(t2i, *codes, str(tmp_path / "t2i.json"), device="cpu", progress=False,
                              weight_decays=[1e-2])
    _check(r, str(tmp_path / "t2i.json"), ["0", "1"])
    masked = _split_codes(str(tmp_path / "masked"), grid=(8, 8), kept=16)
    sf = _package(tmp_path, "stackformer-base-tiny", "mq-vae-f8-tiny")
    r = evaluate_linear_probe(sf, *masked, None, device="cpu", progress=False, weight_decays=[1e-2])
    assert set(r["layers"]) == {"0", "1"} and all(0.0 <= v <= 1.0 for v in r["layers"].values())


def test_unlabelled_samples_are_skipped_and_counted(tmp_path, codes):
    root = str(tmp_path / "mixed")
    rng = np.random.default_rng(3)
    w = CodeShardWriter(root, "codes-000000.tar", codebook_size=CODEBOOK, grid_size=(4, 4))
    for i in range(12):
        w.write(f"{i:04d}", rng.integers(0, CODEBOOK, 16).astype(np.int32), label=(i % 3) if i < 9 else None)
    write_code_manifest(root, [w.close()], "synthetic", "0" * 64, (4, 4), CODEBOOK, 16)
    url = _package(tmp_path, "vim-small-tiny", "vqgan-f8-tiny")
    r = evaluate_linear_probe(url, codes[0], root, None, device="cpu", progress=False, weight_decays=[1e-2])
    assert r["num_test"] == 9 and r["unlabelled"] == {"train": 0, "test": 3}


def test_tokenizer_probe_and_pixel_baseline_on_demo_digits(tmp_path, demo):
    torch.manual_seed(0)
    url = str(tmp_path / "vqgan")
    save_package(create_model("vqgan-f8-tiny"), url)
    out = str(tmp_path / "tok.json")
    r = evaluate_linear_probe(url, *demo, out, batch_size=64, device="cpu", progress=False, num_workers=0)
    _check(r, out, ["encoder", "codes"])
    assert r["kind"] == "tokenizer" and r["num_classes"] == 20          # 10 digits + 10 photos
    pix = r["pixel_baseline"]
    assert pix["dim"] == 3 * 16 * 16 and pix["resolution"] == 32
    # Real digits and photo crops at 16x16: far above the majority class (~10%).
    assert pix["top1"] > 0.7 and pix["top1"] > 4 * r["chance"], (pix, r["chance"])


def test_vit_tokenizer_probes_encoder_blocks(tmp_path, demo):
    torch.manual_seed(0)
    url = str(tmp_path / "vit")
    save_package(create_model("vit-vqgan-ss-tiny"), url)
    r = evaluate_linear_probe(url, *demo, None, layers=[-1], max_samples=96, batch_size=48, device="cpu",
                              progress=False, num_workers=0, weight_decays=[1e-2])
    assert list(r["layers"]) == ["block_1", "encoder", "codes"] and r["num_train"] == 96
    assert all(f["weight_decay"] == 1e-2 for f in r["fits"].values())


def test_pixel_features_are_area_averages():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    f = pixel_features(x, size=2)
    assert f.shape == (2, 12)
    assert torch.allclose(f[0, 0], x[0, 0, :2, :2].mean())
