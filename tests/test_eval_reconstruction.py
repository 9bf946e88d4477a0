"""Tokenizer evaluations (evals/reconstruction.py, evals/codebook.py).

The metric functions against independent references (SSIM against scikit-image, PSNR against
its formula, codebook statistics on hand-made codes with known answers); the whole evaluations on
a tiny tokenizer saved as a real zoo package and a tiny webdataset, with a fixed random conv net as
the feature extractor and a randomly initialised LPIPS, checked against the tokenizer's own
encode/decode of independently preprocessed images.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import storage
from data_pipeline.images import decode_image, image_bytes, resize_crop
from data_pipeline.shards import iter_shard
from evals.codebook import CodebookStats, evaluate_codebook, plot_histogram
from evals.reconstruction import PSNR_MAX_DB, FeatureMoments, evaluate_reconstruction, psnr, ssim
from evals.stats import feature_stats
from model_zoo import create_model
from model_zoo.losses import LPIPS
from model_zoo.package import load_package, save_package
from tests.datasets import make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOKENIZER = "vit-vqgan-ss-tiny"   # 32 px, 8x8 tokens, 64 codes
SIZES = [10, 10, 9]               # 29 images: batches of 8 end with a short one


# ------------------------------------------------------------------------------ metrics

def _photo(size: int = 64) -> np.ndarray:
    from skimage import data
    img = data.astronaut()[100:100 + 4 * size:4, 150:150 + 4 * size:4]
    return img.astype(np.float64) / 255.0


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    clean = _photo(64)
    cases = [
        (clean, np.clip(clean + rng.normal(scale=0.1, size=clean.shape), 0, 1)),
        (clean, np.clip(clean * 0.7 + 0.1, 0, 1)),
        (clean[:48, :40], np.clip(clean[:48, :40] + rng.normal(scale=0.3, size=(48, 40, 3)), 0, 1)),
        (rng.random((20, 31, 3)), rng.random((20, 31, 3))),
    ]
    for a, b in cases:
        ref = structural_similarity(a, b, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1)
        ours = ssim(torch.from_numpy(a).permute(2, 0, 1)[None].float(),
                    torch.from_numpy(b).permute(2, 0, 1)[None].float())
        assert ours.shape == (1,) and abs(float(ours[0]) - ref) < 1e-4, (float(ours[0]), ref)
    # A batch scores each image on its own.
    x = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a, _ in cases[:2]]).float()
    y = torch.stack([torch.from_numpy(b).permute(2, 0, 1) for _, b in cases[:2]]).float()
    batch = ssim(x, y)
    for i in range(2):
        assert abs(float(batch[i]) - float(ssim(x[i:i + 1], y[i:i + 1])[0])) < 1e-12
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_psnr_identical_is_capped_and_noise_matches_formula():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.random((3, 3, 16, 16)))
    same = psnr(x, x)
    assert torch.all(same == PSNR_MAX_DB)
    noise = torch.from_numpy(rng.normal(scale=[[[[0.01]]], [[[0.05]]], [[[0.2]]]], size=x.shape))
    y = x + noise
    expected = [10 * math.log10(1.0 / float(((x[i] - y[i]) ** 2).mean())) for i in range(3)]
    got = psnr(x.float(), y.float())
    assert np.allclose(got.numpy(), expected, atol=1e-4), (got, expected)
    assert got[0] > got[1] > got[2]


def test_feature_moments_match_feature_stats():
    rng = np.random.default_rng(2)
    feats = rng.normal(loc=50.0, scale=3.0, size=(37, 5)) @ rng.normal(size=(5, 5))
    m = FeatureMoments()
    for s in range(0, 37, 8):                      # uneven batches, last one short
        m.update(torch.from_numpy(feats[s:s + 8]).float())
    mu, sigma = m.stats()
    ref_mu, ref_sigma = feature_stats(feats.astype(np.float32))
    assert np.allclose(mu, ref_mu, rtol=1e-6, atol=1e-5)
    assert np.allclose(sigma, ref_sigma, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- codebook

def test_codebook_stats_known_answers():
    k = 16
    uniform = CodebookStats(k)
    uniform.update(torch.arange(k).repeat(3, 2))      # every code 6 times
    s = uniform.summary()
    assert s["usage"] == 1.0 and s["dead_codes"] == 0 and s["dead_code_ids"] == []
    assert s["perplexity"] == pytest.approx(k) and s["entropy"] == pytest.approx(math.log(k))
    assert s["images"] == 3 and s["tokens"] == 6 * k and s["tokens_per_image"] == 2 * k
    assert s["top_share"] == {"1": pytest.approx(1 / k), "10": pytest.approx(10 / k)}

    half = CodebookStats(k)                           # even codes only, uniformly, over 3 batches
    for _ in range(3):
        half.update(torch.arange(0, k, 2)[None])
    s = half.summary(max_listed=5)
    assert s["usage"] == 0.5 and s["used_codes"] == 8 and s["perplexity"] == pytest.approx(8)
    assert s["dead_codes"] == 8 and s["dead_code_ids"] == [1, 3, 5, 7, 9] and s["dead_code_ids_truncated"]

    skew = CodebookStats(4)                           # p = (1/2, 1/4, 1/4, 0)
    skew.update(torch.tensor([[0, 0, 1, 2], [0, 0, 2, 1]]))
    s = skew.summary()
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert s["entropy"] == pytest.approx(h) and s["perplexity"] == pytest.approx(math.exp(h))
    assert s["top_share"]["1"] == 0.5 and s["dead_code_ids"] == [3]

    collapsed = CodebookStats(8)
    collapsed.update(torch.full((4, 10), 5))
    assert collapsed.summary()["perplexity"] == pytest.approx(1.0)

    assert CodebookStats(8).summary()["perplexity"] is None     # nothing counted is not collapse
    with pytest.raises(ValueError, match="codes must lie"):
        CodebookStats(8).update(torch.tensor([[8]]))

    masked = CodebookStats(8, num_positions=4)        # MQ-VAE style: 2 of 4 positions kept
    masked.update(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[0, 2], [0, 3]]))
    p = masked.summary()["positions"]
    assert p["ever_kept"] == 3 and p["kept_fraction_mean"] == 0.5
    assert p["kept_fraction_max"] == 1.0 and p["kept_fraction_min"] == 0.0


def test_plot_histogram_writes_png(tmp_path):
    counts = np.array([50, 20, 0, 5, 1, 0, 0, 9])
    url = str(tmp_path / "sub" / "hist.png")
    data = plot_histogram(counts, url)
    assert data.startswith(PNG_SIGNATURE) and open(url, "rb").read() == data
    plot_histogram(np.zeros(8), str(tmp_path / "empty.png"))   # all dead: still a figure


# ------------------------------------------------------------------------------ end to end

class RandomConvFeatures(torch.nn.Module):
    """A fixed random conv net standing in for Inception: ``{"pool": [B, 16], "logits": [B, 10]}``."""

    name = "random-conv-test"

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2)
        self.fc = torch.nn.Linear(16, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    @torch.no_grad()
    def forward(self, images):
        h = torch.relu(self.conv2(torch.relu(self.conv1(images))))
        pool = h.mean(dim=(2, 3))
        return {"pool": pool, "logits": self.fc(pool)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrec")
    data = str(root / "data")
    make_dataset(data, SIZES)
    torch.manual_seed(0)
    pkg = save_package(create_model(TOKENIZER), str(root / "pkg"))
    torch.manual_seed(1)
    lpips = LPIPS(pretrained=False)
    return {"root": root, "data": data, "pkg": pkg, "lpips": lpips, "features": RandomConvFeatures()}


def _reference(world) -> dict[str, float]:
    """PSNR/SSIM means and code counts from the tokenizer itself on independently read images."""
    model = load_package(world["pkg"])
    imgs = []
    for name in sorted(n for n in os.listdir(world["data"]) if n.endswith(".tar")):
        for _i, _key, files in iter_shard(os.path.join(world["data"], name)):
            img = resize_crop(decode_image(image_bytes(files), 32), 32, "center", None)
            imgs.append(torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1)
    x = torch.stack(imgs)
    with torch.no_grad():
        tok = model.encode(x)
        y = model.decode(tok.codes)
    y = ((y.clamp(-1, 1) + 1) * 127.5).round() / 255.0
    x = (x.double() + 1) / 2
    mse = ((x - y.double()) ** 2).flatten(1).mean(1).numpy()
    return {"n": len(imgs), "psnr": float(np.mean(10 * np.log10(1 / mse))),
            "counts": torch.bincount(tok.codes.flatten(), minlength=model.codebook_size).numpy()}


def test_evaluate_reconstruction_end_to_end(world, tmp_path):
    out = str(tmp_path / "res" / "recon.json")
    res = evaluate_reconstruction(world["pkg"], world["data"], out, features=world["features"],
                                  lpips=world["lpips"], batch_size=8, device="cpu", progress=False)
    ref = _reference(world)

    proto = res["protocol"]
    assert proto["ckpt"] == world["pkg"] and proto["tokenizer"]["name"] == TOKENIZER
    assert len(proto["tokenizer"]["sha256"]) == 64
    assert proto["data"] == world["data"] and proto["num_images"] == ref["n"] == sum(SIZES)
    assert proto["resolution"] == 32 and proto["crop"] == "center"
    assert proto["feature_extractor"] == "random-conv-test" and proto["lpips"] == "random"
    assert proto["feature_extractor_identity"] is None      # no identity() method to ask
    for key in ("psnr", "ssim", "lpips", "rfid", "mse"):
        assert isinstance(res[key], float) and math.isfinite(res[key]), (key, res[key])
    assert 0 < res["psnr"] < PSNR_MAX_DB and -1 <= res["ssim"] <= 1 and res["lpips"] >= 0 and res["rfid"] >= 0
    assert res["psnr"] == pytest.approx(ref["psnr"], abs=1e-5)
    assert any("RANDOM weights" in n for n in res["notes"])
    assert res["defects"]["total"] == 0

    cb = res["codebook"]
    assert cb["tokens"] == ref["n"] * 64 and cb["codebook_size"] == 64
    assert cb["used_codes"] == int((ref["counts"] > 0).sum())

    on_disk = json.loads(open(out).read())
    assert on_disk == json.loads(json.dumps(res))
    assert res["files"]["json"] == out and os.listdir(res["files"]["tensorboard"])
    for kind, path in res["files"].items():
        if kind in ("json", "tensorboard"):
            continue
        raw = open(path, "rb").read()
        assert raw.startswith(PNG_SIGNATURE), kind
    grid = np.array(Image.open(res["files"]["grid"]))
    assert grid.shape == (4 * 34 + 2, 8 * 34 + 2, 3)   # 16 images: 2 x (originals row, recon row)
    assert res["files"]["grid"] == str(tmp_path / "res" / "recon_grid.png")

    again = evaluate_reconstruction(world["pkg"], world["data"], None, features=world["features"],
                                    lpips=world["lpips"], batch_size=8, device="cpu", progress=False)
    timing = {"seconds", "images_per_s", "files", "step"}   # step and files: added when written
    assert {k: v for k, v in again.items() if k not in timing} == \
        {k: v for k, v in json.loads(json.dumps(res)).items() if k not in timing}


def test_skips_without_weights_or_features(world, tmp_path, monkeypatch):
    # Empty caches: the real LPIPS loader finds nothing and the evaluation goes on without it.
    monkeypatch.setenv("VQSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    res = evaluate_reconstruction(world["pkg"], world["data"], features=None, lpips=None,
                                  batch_size=4, max_images=6, device="cpu", progress=False, num_workers=0)
    assert res["lpips"] is None and res["rfid"] is None
    assert res["protocol"]["lpips"] is None and res["protocol"]["feature_extractor"] is None
    assert any(n.startswith("LPIPS skipped: pretrained weights not found") for n in res["notes"])
    assert any(n.startswith("rFID skipped") for n in res["notes"])
    assert res["protocol"]["num_images"] == 6 and res["codebook"]["images"] == 6
    assert math.isfinite(res["psnr"]) and math.isfinite(res["ssim"])


def test_evaluate_codebook_matches_reconstruction_codes(world, tmp_path):
    out = str(tmp_path / "cb.json")
    res = evaluate_codebook(world["pkg"], world["data"], out, batch_size=8, device="cpu", progress=False)
    ref = _reference(world)
    cb = res["codebook"]
    assert res["protocol"]["task"] == "codebook" and res["protocol"]["num_images"] == ref["n"]
    assert cb["tokens"] == ref["n"] * 64
    p = ref["counts"][ref["counts"] > 0] / ref["counts"].sum()
    assert cb["perplexity"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
    assert cb["dead_code_ids"] == np.flatnonzero(ref["counts"] == 0).tolist()
    assert open(res["files"]["histogram"], "rb").read().startswith(PNG_SIGNATURE)
    assert storage.read_json(out)["codebook"] == cb


def test_refuses_a_mixture(world):
    with pytest.raises(ValueError, match="one dataset at a time"):
        evaluate_codebook(world["pkg"], f"{world['data']}::0.5,{world['data']}::0.5", device="cpu",
                          progress=False)


def test_eval_command_line(world, tmp_path, monkeypatch, capsys):
    """`vqscale eval codebook|reconstruction|ref-stats` on the same tiny package and data: the JSON
    files are written, missing LPIPS/Inception weights skip their metrics (reconstruction) or end
    with a one-line error (ref-stats, which needs them), and a stand-in weights file is used."""
    from evals.inception import WEIGHTS_FILES, random_state_dict
    from evals.stats import load_ref_stats
    from pretrain.cli import main

    monkeypatch.setenv("VQSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    common = ["--ckpt", world["pkg"], "--data", world["data"], "--batch-size", "8", "--device", "cpu"]
    assert main(["eval", "codebook", *common, "--out", str(tmp_path / "cb.json")]) == 0
    cb = json.load(open(tmp_path / "cb.json"))
    assert cb["codebook"]["images"] == sum(SIZES) and 0 < cb["codebook"]["usage"] <= 1
    assert '"codebook.perplexity"' in capsys.readouterr().out
    assert os.path.exists(tmp_path / "cb_histogram.png")
    assert main(["eval", "reconstruction", *common, "--max-images", "8", "--out", str(tmp_path / "rec.json")]) == 0
    rec = json.load(open(tmp_path / "rec.json"))
    assert rec["rfid"] is None and math.isfinite(rec["psnr"]) and rec["protocol"]["num_images"] == 8
    capsys.readouterr()
    assert main(["eval", "ref-stats", "--data", world["data"], "--out", str(tmp_path / "ref.npz")]) == 2
    assert "Inception" in capsys.readouterr().err
    weights = tmp_path / "cache" / "weights" / WEIGHTS_FILES[0]
    weights.parent.mkdir(parents=True)
    torch.save(random_state_dict(0), weights)
    assert main(["eval", "ref-stats", "--data", world["data"], "--out", str(tmp_path / "ref.npz"),
                 "--resolution", "32", "--max-images", "4", "--batch-size", "4"]) == 0
    ref = load_ref_stats(str(tmp_path / "ref.npz"))
    assert ref["mu"].shape == (2048,) and ref["meta"]["num_images"] == 4
