"""The pure math of generative-model metrics: feature statistics in, numbers out. No model code.

This module owns:

- Fréchet distance between Gaussians fitted to features (FID: Heusel et al., "GANs Trained by a
  Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", 2017).
- Reference statistics files (``mu``, ``sigma`` in an .npz) on any storage URL.
- Inception Score (Salimans et al., "Improved Techniques for Training GANs", 2016).
- Kernel Inception Distance (Bińkowski et al., "Demystifying MMD GANs", 2018).
- Improved precision and recall (Kynkäänniemi et al., "Improved Precision and Recall Metric for
  Assessing Generative Models", 2019).

The FID formula and its numerical fix (``eps`` on the covariance diagonals when the matrix square
root fails; the real part kept unless the diagonal's imaginary part exceeds 1e-3) follow
pytorch-fid and the ADM evaluator (Dhariwal & Nichol, "Diffusion Models Beat GANs on Image
Synthesis", 2021), so numbers are comparable with published ones; the reference-statistics format
is that of the ADM evaluator's reference batches. KID and IS follow torch-fidelity (population
standard deviation over subsets/splits).
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Any

import numpy as np
import scipy
from scipy import linalg
from scipy.special import xlogy

from data_pipeline import storage

__all__ = [
    "feature_stats", "frechet_distance", "save_ref_stats", "load_ref_stats",
    "inception_score", "kid", "precision_recall",
]

# SciPy 1.16 deprecated sqrtm's `disp` (removed in 1.18); before that, disp=False is what keeps
# sqrtm from printing its error estimate.
_SQRTM_HAS_DISP = tuple(int(p) for p in scipy.__version__.split(".")[:2]) < (1, 16)


def _as_array(x: Any, name: str, ndim: int | None = None, dtype=np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on a GPU
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=dtype)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    return a


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (float64) of features ``[N, D]``."""
    f = _as_array(features, "features", ndim=2)
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm(m: np.ndarray) -> np.ndarray:
    if _SQRTM_HAS_DISP:
        return linalg.sqrtm(m, disp=False)[0]
    with warnings.catch_warnings():
        # Rank-deficient statistics (fewer samples than dimensions) make the product singular;
        # SciPy >= 1.16 still returns an accurate root then, and a failure shows up as non-finite
        # values, which frechet_distance handles (and warns about) itself.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(m)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))``, as pytorch-fid computes it."""
    mu1 = np.atleast_1d(_as_array(mu1, "mu1"))
    mu2 = np.atleast_1d(_as_array(mu2, "mu2"))
    sigma1 = np.atleast_2d(_as_array(sigma1, "sigma1"))
    sigma2 = np.atleast_2d(_as_array(sigma2, "sigma2"))
    if mu1.ndim != 1 or mu2.ndim != 1:
        raise ValueError(f"means must be 1-D, got shapes {mu1.shape} and {mu2.shape}")
    if mu1.shape != mu2.shape:
        raise ValueError(f"means have different lengths: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must be [{d}, {d}] to match the means, got {s.shape}")

    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: sqrtm(sigma1 @ sigma2) is not finite (singular product); adding "
                      f"{eps} to the covariance diagonals", RuntimeWarning, stacklevel=2)
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Only the trace is used, so (like pytorch-fid and ADM) only the diagonal must be real.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm(sigma1 @ sigma2) has a significant imaginary component "
                             f"(max |imag| = {np.max(np.abs(covmean.imag)):.3g}); the "
                             f"statistics are probably too few samples or not covariances")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def save_ref_stats(path_or_url: str, mu, sigma, **meta: Any) -> None:
    """Write ``mu``, ``sigma`` (float64) and ``meta`` (a JSON string: feature extractor, number of
    images, resolution, resize filter, dataset URL...) as an .npz at ``path_or_url``."""
    mu = _as_array(mu, "mu", ndim=1)
    sigma = _as_array(sigma, "sigma", ndim=2)
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"sigma must be [{mu.shape[0]}, {mu.shape[0]}] to match mu, got {sigma.shape}")
    buf = io.BytesIO()
    # The zip writer seeks back to patch headers, which an S3 upload stream cannot do: build in memory.
    np.savez(buf, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta, sort_keys=True)))
    storage.write_bytes(path_or_url, buf.getvalue())


def load_ref_stats(path_or_url: str) -> dict[str, Any]:
    """``{"mu", "sigma", "meta"}`` from our files or the ADM evaluator's reference batches
    (whose extra ``arr_0``, ``mu_s``, ``sigma_s`` are left unread)."""
    # A seekable file rather than read_bytes: np.load reads only the members asked for, and an ADM
    # reference batch carries gigabytes of images in arr_0 that are never needed here.
    with storage.open(path_or_url, "rb") as f:
        try:
            npz = np.load(f, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path_or_url} is not a statistics .npz: {e}") from e
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError(f"{path_or_url} is a single .npy array, not a statistics .npz (mu, sigma)")
        with npz:
            keys = sorted(npz.files)
            if "mu" not in keys or "sigma" not in keys:
                hint = (" It holds raw reference images (arr_0): compute statistics first with "
                        "`vqscale eval ref-stats --data URL --out stats.npz`." if "arr_0" in keys else "")
                raise KeyError(f"{path_or_url} has no 'mu'/'sigma' statistics; its keys are {keys}.{hint}")
            mu = np.asarray(npz["mu"], dtype=np.float64)
            sigma = np.asarray(npz["sigma"], dtype=np.float64)
            meta = json.loads(str(npz["meta"])) if "meta" in keys else {}
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path_or_url}: mu {mu.shape} and sigma {sigma.shape} do not match")
    return {"mu": mu, "sigma": sigma, "meta": meta}


def inception_score(probs, splits: int = 10) -> tuple[float, float]:
    """Mean and (population) std over ``splits`` of ``exp(E_x[KL(p(y|x) || p(y))])``, with ``p(y)``
    the split's marginal. ``probs`` are class probabilities ``[N, C]`` (softmax, not logits)."""
    p = _as_array(probs, "probs", ndim=2)
    n = p.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, {n}] for {n} predictions, got {splits}")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probs must be class probabilities (non-negative rows summing to 1), not logits")
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        py = part.mean(axis=0, keepdims=True)
        # xlogy makes 0 * log 0 = 0, which confident one-hot predictions hit on every row.
        kl = (xlogy(part, part) - xlogy(part, py)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    m = x.shape[0]
    kxx = (x @ x.T * gamma + coef0) ** degree
    kyy = (y @ y.T * gamma + coef0) ** degree
    kxy = (x @ y.T * gamma + coef0) ** degree
    # torch-fidelity's "unbiased" estimator: within-set diagonals dropped, the cross term kept whole.
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / (m * m))


def kid(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
        gamma: float | None = None, coef0: float = 1, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and (population) std of the unbiased MMD^2 with the kernel
    ``(gamma x.y + coef0)^degree`` (gamma = 1/D by default) over ``subsets`` random subsets."""
    a = _as_array(feats_a, "feats_a", ndim=2)
    b = _as_array(feats_b, "feats_b", ndim=2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    if m < subset_size:
        warnings.warn(f"KID: subset_size {subset_size} is more than the samples available "
                      f"({a.shape[0]}, {b.shape[0]}); using {m}", RuntimeWarning, stacklevel=2)
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    rng = np.random.default_rng(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        mmds[i] = _mmd2_unbiased(x, y, degree, gamma, coef0)
    return float(mmds.mean()), float(mmds.std())


def precision_recall(real, fake, k: int = 3, batch: int = 1024,
                     device: str | None = None) -> tuple[float, float]:
    """Improved precision (fraction of fake samples inside the real manifold) and recall (fraction
    of real samples inside the fake manifold), each manifold a union of balls around its samples
    with radius the distance to the k-th nearest neighbour in the same set.

    Distances are computed ``batch`` rows at a time, so memory is about ``batch * N * 4`` bytes
    rather than ``N * N * 4`` (10 GB at 50k). ``device`` defaults to that of a torch ``real``.
    """
    import torch  # only this metric needs torch; FID from stored statistics should not pay for it

    if device is None:
        device = real.device if isinstance(real, torch.Tensor) else "cpu"

    def to_tensor(x, name):
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(_as_array(x, name, dtype=np.float32))
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        return t.detach().to(device=device, dtype=torch.float32)

    r, f = to_tensor(real, "real"), to_tensor(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dimensions differ: {r.shape[1]} vs {f.shape[1]}")
    if not 1 <= k < min(r.shape[0], f.shape[0]):
        raise ValueError(f"k must be in [1, {min(r.shape[0], f.shape[0]) - 1}] for sets of "
                         f"{r.shape[0]} and {f.shape[0]} samples, got {k}")

    def radii(x):
        out = torch.empty(x.shape[0], device=x.device)
        for s in range(0, x.shape[0], batch):
            # k + 1: each point is its own nearest neighbour, at distance 0.
            out[s:s + batch] = torch.cdist(x[s:s + batch], x).kthvalue(k + 1, dim=1).values
        return out

    def covered(queries, refs, ref_radii):
        inside = torch.empty(queries.shape[0], dtype=torch.bool, device=queries.device)
        for s in range(0, queries.shape[0], batch):
            inside[s:s + batch] = (torch.cdist(queries[s:s + batch], refs) <= ref_radii).any(dim=1)
        return inside.float().mean().item()

    precision = covered(f, r, radii(r))
    recall = covered(r, f, radii(f))
    return precision, recall
