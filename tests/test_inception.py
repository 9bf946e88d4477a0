"""evals.inception: torch-fidelity's FID Inception network with a randomly initialized state dict
saved to a file, loaded through the same path users take with the real weights (explicit path,
remote URL, $VQSCALE_CACHE); the clear error when there are none; the [-1, 1] -> uint8 step
against the project's PNG writer; reference statistics of a tiny real shard dataset."""

from __future__ import annotations

import hashlib
import io
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import storage
from data_pipeline.images import decode_image, resize_crop
from evals import inception as inc
from evals.stats import feature_stats, load_ref_stats
from tests.datasets import image_bytes, make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _no_download(*args, **kwargs):
    raise AssertionError("torch-fidelity tried to download the Inception weights")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any attempt by torch-fidelity to fetch its weights fails the test."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    monkeypatch.setattr(fe, "load_state_dict_from_url", _no_download)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("inception") / inc.WEIGHTS_FILES[1]
    torch.save(inc.random_state_dict(seed=0), path)
    return str(path)


@pytest.fixture(scope="module")
def model(weights_file):
    with pytest.MonkeyPatch.context() as mp:
        import torch_fidelity.feature_extractor_inceptionv3 as fe
        mp.setattr(fe, "load_state_dict_from_url", _no_download)
        return inc.load_inception(weights_file)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> str:
    cache = tmp_path / "cache"
    monkeypatch.setenv("VQSCALE_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))   # torch hub's cache, also looked at
    return str(cache)


def _images(n: int, h: int = 24, w: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


# ------------------------------------------------------------------------------- loading

def test_random_state_dict_file_loads_like_real_weights(model, weights_file):
    sd = torch.load(weights_file, weights_only=True)
    loaded = model.net.state_dict()
    assert set(sd) == set(loaded) and len(sd) > 500
    assert all(torch.equal(sd[k], loaded[k]) for k in sd)
    with open(weights_file, "rb") as f:
        assert model.weights_sha256 == hashlib.sha256(f.read()).hexdigest()
    assert model.source == weights_file
    assert model.name == "torch-fidelity/inception-v3-compat"
    model.train()   # a parent's .train() must not switch BatchNorm to batch statistics
    assert not model.training and not model.net.training
    assert not any(p.requires_grad for p in model.parameters())
    assert inc.random_state_dict(seed=0)["fc.weight"].equal(sd["fc.weight"])   # seeded


@pytest.mark.parametrize("name", inc.WEIGHTS_FILES)
def test_cache_lookup(weights_file, empty_cache, name):
    target = os.path.join(empty_cache, "weights", name)
    os.makedirs(os.path.dirname(target))
    shutil.copy(weights_file, target)
    assert inc.inception_weight_candidates()[inc.WEIGHTS_FILES.index(name)] == target
    m = inc.load_inception()
    assert m.source == target
    x = _images(1)
    assert torch.equal(m(x)["pool"], inc.load_inception(weights_file)(x)["pool"])


def test_missing_weights_clear_error(empty_cache, tmp_path):
    with pytest.raises(inc.InceptionWeightsNotFound) as e:
        inc.load_inception()
    assert isinstance(e.value, FileNotFoundError)
    msg = str(e.value)
    assert inc.WEIGHTS_URL in msg
    assert os.path.join(empty_cache, "weights", inc.WEIGHTS_FILES[0]) in msg
    missing = str(tmp_path / "nowhere.pth")
    with pytest.raises(inc.InceptionWeightsNotFound, match="nowhere.pth"):
        inc.load_inception(missing)
    with pytest.raises(inc.InceptionWeightsNotFound, match="memory://"):
        inc.load_inception("memory://no-such-bucket/weights.pth")


def test_remote_weights_are_copied_to_the_cache(weights_file, empty_cache):
    url = f"memory://inception-{os.getpid()}/{inc.WEIGHTS_FILES[0]}"
    with open(weights_file, "rb") as f:
        storage.write_bytes(url, f.read())
    try:
        m = inc.load_inception(url)
        assert m.source == url
        copies = [os.path.join(d, f) for d, _, fs in os.walk(empty_cache) for f in fs]
        assert len(copies) == 1 and copies[0].endswith(inc.WEIGHTS_FILES[0])
        mtime = os.path.getmtime(copies[0])
        inc.load_inception(url)   # second load reuses the copy
        assert os.path.getmtime(copies[0]) == mtime
    finally:
        storage.remove(url)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def _touch(path):
    open(path, "w").close()
    return {}


def test_refuses_pickles_that_run_code_and_wrong_weights(tmp_path, weights_file):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "x": _Payload(str(marker))}, evil)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        inc.load_inception(str(evil))
    assert not marker.exists()

    sd = torch.load(weights_file, weights_only=True)
    sd["fc.weight"] = sd["fc.weight"][:10]
    wrong = tmp_path / "wrong.pth"
    torch.save(sd, wrong)
    with pytest.raises(ValueError, match="could not be loaded as FID Inception weights"):
        inc.load_inception(str(wrong))


# ------------------------------------------------------------------------------- features

def test_features_shapes_finite_deterministic(model):
    x = _images(3)
    a, b = model(x), model(x)
    assert a["pool"].shape == (3, 2048) and a["logits"].shape == (3, 1008)
    assert a["pool"].dtype == torch.float32
    assert all(torch.isfinite(v).all() for v in a.values())
    assert torch.equal(a["pool"], b["pool"]) and torch.equal(a["logits"], b["logits"])
    assert a["pool"].std() > 0 and (a["pool"][0] - a["pool"][1]).abs().max() > 0   # not degenerate
    # uint8 input is the same as its float image; any size is resized to 299 inside.
    assert torch.equal(model(inc.to_uint8(x))["pool"], a["pool"])
    odd = model(_images(1, 17, 40))
    assert odd["pool"].shape == (1, 2048) and torch.isfinite(odd["logits"]).all()
    # logits are the pool features times fc without its bias (torch-fidelity's logits_unbiased)
    w = model.net.fc.weight
    torch.testing.assert_close(a["logits"], a["pool"] @ w.T, rtol=1e-4, atol=1e-4)


def test_to_uint8_matches_png_of_the_images(tmp_path):
    from model_zoo.grids import PAD, save_grid
    x = _images(2, 8, 8, seed=3) * 1.2   # some values outside [-1, 1]: clamped
    x[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 0.5 / 127.5 - 1, 1.5 / 127.5 - 1])   # ends, half-way
    u = inc.to_uint8(x)
    assert u.dtype == torch.uint8 and u.shape == x.shape
    for i in range(2):
        path = str(tmp_path / f"{i}.png")
        save_grid(x[i:i + 1], path)
        png = np.asarray(Image.open(path).convert("RGB"))[PAD:PAD + 8, PAD:PAD + 8]
        np.testing.assert_array_equal(u[i].permute(1, 2, 0).numpy(), png)
    # Every 8-bit value survives the loader's uint8 -> [-1, 1] and back.
    v = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(inc.to_uint8(v.float() / 127.5 - 1.0), v)
    with pytest.raises(ValueError, match="NaN"):
        inc.to_uint8(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        inc.to_uint8(torch.zeros(3, 4, 4))


def test_extract_batches_and_max_images(model):
    x = _images(4, seed=1)
    batches = [x[:2], {"image": x[2:]}]
    feats = inc.extract(iter(batches), model, "cpu", progress=False, max_images=3)
    assert feats["pool"].shape == (3, 2048) and feats["logits"].shape == (3, 1008)
    assert feats["pool"].dtype == np.float64
    direct = model(x[:3])
    np.testing.assert_allclose(feats["pool"], direct["pool"].double().numpy(), rtol=1e-5, atol=1e-6)
    empty = inc.extract([], model, progress=False)
    assert empty["pool"].shape == (0, 2048)


# ------------------------------------------------------------------------ reference statistics

def test_compute_ref_stats_on_a_shard_dataset(tmp_path, weights_file):
    root = str(tmp_path / "data")
    keys = make_dataset(root, [4, 4])
    out = str(tmp_path / "ref" / "stats.npz")
    res = inc.compute_ref_stats(root, out, inception_weights=weights_file, resolution=16,
                                batch_size=3, device="cpu", progress=False)
    ref = load_ref_stats(out)
    assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)
    np.testing.assert_array_equal(ref["mu"], res["mu"])
    meta = ref["meta"]
    assert meta["num_images"] == len(keys) == 8 and meta["resolution"] == 16
    assert meta["data"] == root and meta["resize"] == "torch-fidelity bilinear to 299 (TF-compatible)"
    assert meta["extractor"] == "torch-fidelity/inception-v3-compat"
    with open(weights_file, "rb") as f:
        assert meta["weights_sha256"] == hashlib.sha256(f.read()).hexdigest()

    # The same images decoded and centre-cropped by hand give the same statistics.
    model = inc.load_inception(weights_file)
    imgs = [np.asarray(resize_crop(decode_image(image_bytes(i)), 16, "center", None)) for i in range(8)]
    u8 = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    mu, sigma = feature_stats(model(u8)["pool"])
    np.testing.assert_allclose(ref["mu"], mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ref["sigma"], sigma, rtol=1e-3, atol=1e-5)

    few = inc.compute_ref_stats(root, f"memory://refstats-{os.getpid()}/s.npz", weights_file,
                                resolution=16, max_images=3, batch_size=2, device="cpu",
                                num_workers=0, progress=False)
    assert few["meta"]["num_images"] == 3
    assert load_ref_stats(f"memory://refstats-{os.getpid()}/s.npz")["mu"].shape == (2048,)
    storage.remove(f"memory://refstats-{os.getpid()}/s.npz")
