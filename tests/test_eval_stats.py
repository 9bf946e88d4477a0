"""evals.stats: FID, IS, KID, precision/recall against independent or analytic values, and
reference statistics files on a local path and on memory:// (through data_pipeline.storage)."""

from __future__ import annotations

import io
import uuid
import warnings

import numpy as np
import pytest
import torch
from scipy import linalg

from data_pipeline import storage
from evals import stats


def _spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _fid_reference(mu1, s1, mu2, s2):
    """pytorch-fid's formula written out, without any of the module's code paths."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _fid_eigen(mu1, s1, mu2, s2):
    """Tr sqrtm(s1 s2) = sum of sqrt(eig(s1^1/2 s2 s1^1/2)): a second, sqrtm-free reference."""
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr)


# ----------------------------------------------------------------------------------------- FID


def test_frechet_matches_independent_computation():
    rng = np.random.default_rng(0)
    d = 64
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _spd(rng, d), _spd(rng, d)
    got = stats.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_fid_reference(mu1, s1, mu2, s2), rel=1e-6)
    assert got == pytest.approx(_fid_eigen(mu1, s1, mu2, s2), rel=1e-6)
    # float32 inputs and torch tensors are accepted and give the same number
    got32 = stats.frechet_distance(torch.from_numpy(mu1), s1.astype(np.float32), mu2, s2)
    assert got32 == pytest.approx(got, rel=1e-4)


def test_frechet_of_identical_sets_is_zero():
    feats = np.random.default_rng(1).normal(size=(500, 32)).astype(np.float32)
    mu, sigma = stats.feature_stats(feats)
    assert mu.dtype == sigma.dtype == np.float64
    assert mu.shape == (32,) and sigma.shape == (32, 32)
    assert abs(stats.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_analytic_diagonal_gaussians():
    rng = np.random.default_rng(2)
    d = 16
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert stats.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # singular diagonal covariances (zero variance in some directions) still give the exact value
    a[:4] = 0.0
    b[2:6] = 0.0
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert stats.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_singular_product_uses_eps_fix():
    # Rank-1 and rank-2 covariances whose product A = s1 s2 is rank 1 with eigenvalue 1, so
    # Tr sqrtm(A) = 1 and FID = Tr s1 + Tr s2 - 2 = 3 + 7 - 2 = 8. SciPy's sqrtm returns NaNs for
    # this product (it is singular): only the eps fallback gets a number.
    a = np.array([[1.0, -1, 0, -1]])
    b = np.array([[-1.0, -1, -1, 0], [-1, -1, 1, -1]])
    s1, s2 = a.T @ a, b.T @ b
    mu = np.zeros(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw_fails = not np.isfinite(linalg.sqrtm(s1 @ s2)).all()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = stats.frechet_distance(mu, s1, mu, s2)
    assert got == pytest.approx(8.0, abs=1e-2)
    if raw_fails:
        assert any("adding" in str(w.message) for w in caught)


def test_frechet_rejects_bad_shapes_and_complex_roots():
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="different lengths"):
        stats.frechet_distance(mu, s, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"sigma2 must be \[3, 3\]"):
        stats.frechet_distance(mu, s, mu, np.eye(4))
    with pytest.raises(ValueError, match="1-D"):
        stats.frechet_distance(np.zeros((3, 1)), s, mu, s)
    # a "covariance" with a negative eigenvalue has no real root: the imaginary part is reported
    with pytest.raises(ValueError, match="imaginary"):
        stats.frechet_distance(mu, np.diag([1.0, 1, -1]), mu, s)


# ------------------------------------------------------------------------------------------ IS


def test_inception_score_bounds():
    c = 10
    const = np.tile(np.eye(c)[3], (1000, 1))
    assert stats.inception_score(const, splits=1) == pytest.approx((1.0, 0.0))
    soft_const = np.tile(np.full(c, 1.0 / c), (1000, 1)).astype(np.float32)
    assert stats.inception_score(soft_const, splits=10)[0] == pytest.approx(1.0, rel=1e-6)

    onehot = np.eye(c)[np.arange(1000) % c]  # balanced, confident
    mean, std = stats.inception_score(onehot, splits=1)
    assert mean == pytest.approx(c, rel=1e-6) and std == 0.0
    rng = np.random.default_rng(3)
    mean10, std10 = stats.inception_score(onehot[rng.permutation(1000)], splits=10)
    assert mean10 == pytest.approx(c, rel=0.05) and std10 < 0.5


def test_inception_score_rejects_logits():
    with pytest.raises(ValueError, match="probabilities"):
        stats.inception_score(np.random.default_rng(0).normal(size=(20, 5)))
    with pytest.raises(ValueError, match="splits"):
        stats.inception_score(np.full((5, 2), 0.5), splits=6)


# ----------------------------------------------------------------------------------------- KID


def test_kid_self_shift_and_seed():
    rng = np.random.default_rng(4)
    # Subsets of a set against itself share points, whose k(x, x) lands in the cross term and
    # biases KID negative by about 2 * overlap * (k(x,x) - k(x,y)) / m^2: a large pool keeps the
    # overlap (m^2 / n = 13 points) small.
    a = rng.normal(size=(3000, 32))
    b = rng.normal(size=(3000, 32))
    same, _ = stats.kid(a, a, subsets=20, subset_size=200)
    iid, _ = stats.kid(a, b, subsets=20, subset_size=200)
    shifted, _ = stats.kid(a, b + 1.0, subsets=20, subset_size=200)
    assert abs(same) < 1e-2 and abs(iid) < 1e-2
    assert shifted > 1.0
    def small(seed):
        return stats.kid(a, b, subsets=5, subset_size=100, seed=seed)

    assert small(7) == small(7)
    assert small(7) != small(8)


def test_kid_clips_subset_size_with_warning():
    rng = np.random.default_rng(5)
    with pytest.warns(RuntimeWarning, match="subset_size"):
        mean, std = stats.kid(rng.normal(size=(50, 8)), rng.normal(size=(80, 8)), subsets=3, subset_size=1000)
    assert np.isfinite(mean) and np.isfinite(std)


# --------------------------------------------------------------------------- precision / recall


def _modes(rng, centers, n_per, scale=0.05):
    return np.concatenate([c + scale * rng.normal(size=(n_per, centers.shape[1])) for c in centers])


def test_precision_recall_self_and_disjoint():
    rng = np.random.default_rng(6)
    real = rng.normal(size=(400, 16)).astype(np.float32)
    assert stats.precision_recall(real, real, k=3, batch=64) == (1.0, 1.0)
    far = real + 100.0
    assert stats.precision_recall(real, far, k=3, batch=64) == (0.0, 0.0)
    # torch inputs work the same
    assert stats.precision_recall(torch.from_numpy(real), torch.from_numpy(real), k=3) == (1.0, 1.0)


def test_precision_recall_half_the_modes():
    rng = np.random.default_rng(7)
    # Low-dimensional modes: with a few hundred samples per mode, k-NN balls cover a mode's bulk
    # (in 8-D, samples of the same distribution already fall outside 15% of the time at k=3).
    centers = 10.0 * rng.normal(size=(10, 2))
    real = _modes(rng, centers, 200)
    fake = _modes(rng, centers[:5], 200)  # all fakes on real modes, but only half the modes
    precision, recall = stats.precision_recall(real, fake, k=5, batch=128)
    assert precision > 0.95
    assert recall == pytest.approx(0.5, abs=0.05)


# ---------------------------------------------------------------------------- reference files


@pytest.fixture(params=["local", "memory"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    url = f"memory://vqs-stats-{uuid.uuid4().hex[:12]}"
    request.addfinalizer(lambda: storage.rmtree(url))
    return url


def test_ref_stats_round_trip(base):
    rng = np.random.default_rng(8)
    mu, sigma = stats.feature_stats(rng.normal(size=(100, 12)))
    url = storage.join(base, "refs", "stats.npz")
    meta = {"feature_extractor": "inception-v3-pt", "num_images": 100, "resolution": 256,
            "resize_filter": "bicubic", "dataset": "s3://bucket/imagenet/val/"}
    stats.save_ref_stats(url, mu, sigma, **meta)
    loaded = stats.load_ref_stats(url)
    np.testing.assert_array_equal(loaded["mu"], mu)
    np.testing.assert_array_equal(loaded["sigma"], sigma)
    assert loaded["meta"] == meta


def test_ref_stats_adm_format_and_errors(base):
    rng = np.random.default_rng(9)
    mu, sigma = rng.normal(size=6).astype(np.float32), np.eye(6, dtype=np.float32)

    def put(name, **arrays):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        url = storage.join(base, name)
        storage.write_bytes(url, buf.getvalue())
        return url

    images = rng.integers(0, 255, size=(4, 8, 8, 3), dtype=np.uint8)
    adm = put("adm.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:3], sigma_s=np.eye(3))
    loaded = stats.load_ref_stats(adm)
    np.testing.assert_array_equal(loaded["mu"], mu)
    assert loaded["sigma"].dtype == np.float64 and loaded["meta"] == {}

    with pytest.raises(KeyError, match=r"\['mu_s', 'sigma'\]"):
        stats.load_ref_stats(put("nomu.npz", sigma=sigma, mu_s=mu))
    with pytest.raises(KeyError, match="vqscale eval ref-stats") as e:
        stats.load_ref_stats(put("images.npz", arr_0=images))
    assert "arr_0" in str(e.value)
    with pytest.raises(ValueError, match="do not match"):
        stats.load_ref_stats(put("bad.npz", mu=mu, sigma=np.eye(5)))
    with pytest.raises(ValueError, match="sigma must be"):
        stats.save_ref_stats(storage.join(base, "x.npz"), mu, np.eye(5))
