"""The FID Inception network: images in, pool features and logits out; reference statistics.

FID (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", 2017) and IS (Salimans et al., 2016) are defined on one particular network: the
2015-12-05 TensorFlow graph of Inception-v3 (Szegedy et al., "Rethinking the Inception
Architecture for Computer Vision", CVPR 2016). torchvision's Inception-v3 is a different network
(other weights, other pooling in the last blocks, a different resize), and numbers from it are not
comparable with published ones. We use torch-fidelity's port (``FeatureExtractorInceptionV3``,
registered there as ``inception-v3-compat``): the TF weights converted to PyTorch, the TF graph's
quirks kept (average pools that skip padding, max pool in the last block), and TF 1.x's bilinear
resize to 299x299 re-implemented exactly (bit-exact on CPU), so its features match those of the
TF FID code that published numbers come from. It is maintained and tested against that reference;
we use it rather than porting the network again.

Weights cannot be downloaded here: :func:`load_inception` takes a path or URL (a remote file is
copied to the cache once), or finds the file in ``$VQSCALE_CACHE/weights`` (or where
torch-fidelity itself caches it); else :class:`InceptionWeightsNotFound` says where to put it.
The file is read by torch-fidelity's own loading code, after a ``weights_only`` read has checked
that it is plain tensors (torch-fidelity unpickles with ``weights_only=False``).

Images are float ``[-1, 1]`` (DESIGN.md); they are quantized to uint8 exactly as a PNG of them is
written (:func:`to_uint8`), since the network was defined on 8-bit images.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tempfile
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from data_pipeline import storage
from data_pipeline.config import DataConfig
from model_zoo.package import sha256_file

from .passes import fixed_pass
from .stats import feature_stats, save_ref_stats

__all__ = [
    "WEIGHTS_URL", "WEIGHTS_FILES", "EXTRACTOR_NAME", "RESIZE", "InceptionWeightsNotFound",
    "InceptionFeatures", "inception_weight_candidates", "load_inception", "random_state_dict",
    "to_uint8", "extract", "compute_ref_stats",
]

WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
# torch-fidelity's file name (what WEIGHTS_URL downloads as), then pytorch-fid's name for its
# conversion of the same graph (same state-dict keys).
WEIGHTS_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
EXTRACTOR_NAME = "torch-fidelity/inception-v3-compat"
RESIZE = "torch-fidelity bilinear to 299 (TF-compatible)"
_FEATURES = ["2048", "logits_unbiased"]   # pool3; logits without the fc bias (IS convention)


class InceptionWeightsNotFound(FileNotFoundError):
    """No Inception (FID) weights at the given path or in the cache."""


def _cache_dir() -> str:
    return os.environ.get("VQSCALE_CACHE") or os.path.expanduser("~/.cache/vqscale")


def inception_weight_candidates() -> list[str]:
    """Where :func:`load_inception` looks, in order: ``$VQSCALE_CACHE/weights/`` under either
    name of :data:`WEIGHTS_FILES`, then torch hub's cache (where torch-fidelity downloads it)."""
    wdir = storage.join(_cache_dir(), "weights")
    hub = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILES[0])
    return [storage.join(wdir, f) for f in WEIGHTS_FILES] + [hub]


def _not_found(what: str) -> InceptionWeightsNotFound:
    cand = inception_weight_candidates()
    return InceptionWeightsNotFound(
        f"{what}; this machine cannot download them. Download\n  {WEIGHTS_URL}\n"
        f"and put it at {cand[0]}\n(also looked at: {', '.join(cand[1:])}), or pass "
        "load_inception(weights=PATH_OR_URL), or set VQSCALE_CACHE to a folder whose weights/ "
        "holds it.")


def _local_copy(url: str) -> str:
    """A local path for ``url``; a remote file is copied once into the cache (torch-fidelity reads
    local paths only), keyed by its URL and refreshed when its size changes."""
    if not storage.is_remote(url):
        path = storage.local_path(url)
        if not os.path.isfile(path):
            raise _not_found(f"Inception weights not found at {url}")
        return path
    if not storage.exists(url):
        raise _not_found(f"Inception weights not found at {url}")
    root = _cache_dir()
    if storage.is_remote(root):
        root = os.path.join(tempfile.gettempdir(), "vqscale-cache")
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    local = os.path.join(root, "weights", "remote", key, storage.basename(url))
    if not (os.path.isfile(local) and os.path.getsize(local) == storage.size(url)):
        with storage.open(url, "rb") as src, storage.atomic_open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
    return local


def to_uint8(images: Tensor) -> Tensor:
    """float ``[B, 3, H, W]`` in ``[-1, 1]`` -> uint8, as a PNG of them is written
    (``round((x + 1) * 127.5)``, clamped; same as ``model_zoo.grids.save_grid``)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    x = images.detach().float()
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or inf; refusing to score them (they would become 0)")
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class InceptionFeatures(nn.Module):
    """The FID Inception network, frozen (eval mode, no grad). Call it on float ``[-1, 1]`` (or
    uint8) ``[B, 3, H, W]`` images of any size; returns ``{"pool": [B, 2048], "logits":
    [B, 1008]}`` float32 tensors on its device. ``logits`` has no fc bias, as the original IS code
    and torch-fidelity's ISC use them (``softmax`` of them goes to ``evals.stats.inception_score``).

    ``name``, ``weights_sha256`` (of the weights file) and ``source`` identify it in results."""

    name = EXTRACTOR_NAME

    def __init__(self, net: nn.Module, weights_sha256: str, source: str):
        super().__init__()
        self.net = net
        self.weights_sha256 = weights_sha256
        self.source = source
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)   # a metric: BatchNorm must keep its running statistics

    @property
    def device(self) -> torch.device:
        return self.net.fc.weight.device

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        # Quantize where the images are, then move a quarter of the bytes.
        x = to_uint8(images).to(self.device, non_blocking=True)
        pool, logits = self.net(x)
        return {"pool": pool, "logits": logits}

    def identity(self) -> dict[str, str]:
        import torch_fidelity
        return {"extractor": self.name, "weights_sha256": self.weights_sha256,
                "torch_fidelity": torch_fidelity.__version__, "resize": RESIZE}


def _check_plain_tensors(path: str, source: str) -> None:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{source} is not a plain tensor state dict; refusing to unpickle it: {e}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{source}: expected a flat state dict of tensors, got {type(sd).__name__}")


def load_inception(weights: str | None = None, device: str | torch.device | None = None) -> InceptionFeatures:
    """The FID Inception network with weights from ``weights`` (local path or any storage URL)
    or, when None, the first of :func:`inception_weight_candidates` that exists. Never downloads;
    raises :class:`InceptionWeightsNotFound` when there is no file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if weights is not None:
        source = os.fspath(weights)
        path = _local_copy(source)
    else:
        source = next((u for u in inception_weight_candidates() if storage.exists(u)), None)
        if source is None:
            raise _not_found("pretrained Inception (FID) weights not found")
        path = _local_copy(source)
    _check_plain_tensors(path, source)
    try:
        # A path given: torch-fidelity torch.load()s it and never touches the network.
        net = FeatureExtractorInceptionV3("inception-v3-compat", list(_FEATURES),
                                          feature_extractor_weights_path=path)
    except RuntimeError as e:   # strict load_state_dict (keys, shapes), or tensors saved on a GPU
        raise ValueError(f"{source} could not be loaded as FID Inception weights: {e}") from None
    model = InceptionFeatures(net, sha256_file(path), source)
    return model.to(device) if device is not None else model


def random_state_dict(seed: int = 0) -> dict[str, Tensor]:
    """The network's state dict with random (He-initialized, scale-preserving) weights, for tests
    and dry runs: ``torch.save`` it and load the file with :func:`load_inception` like the real one.
    Leaves the global RNG alone."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):   # the constructor's placeholder
            return None

    placeholder = io.BytesIO()
    torch.save({}, placeholder)
    placeholder.seek(0)
    with torch.random.fork_rng(devices=[]):
        net = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=placeholder)
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            if m.bias is not None:
                m.bias.zero_()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def extract(images_iter: Iterable[Any], model: InceptionFeatures, device: str | torch.device | None = None,
            progress: bool = True, total: int | None = None, max_images: int | None = None) -> dict[str, np.ndarray]:
    """Run ``model`` over an iterable of image batches (tensors ``[B, 3, H, W]``, float ``[-1, 1]``
    or uint8, or loader batch dicts with ``image``); returns ``{"pool": [N, 2048], "logits":
    [N, 1008]}`` float64 arrays. Stops after ``max_images`` when given."""
    from tqdm.auto import tqdm

    if device is not None:
        model.to(device)
    out: dict[str, list[np.ndarray]] = {"pool": [], "logits": []}
    n = 0
    limit = total if max_images is None else min(max_images, total or max_images)
    with tqdm(total=limit, unit="img", desc="inception", disable=not progress) as bar:
        for batch in images_iter:
            images = batch["image"] if isinstance(batch, dict) else batch
            if max_images is not None:
                images = images[:max_images - n]
            if images.shape[0]:
                feats = model(images)
                for k in out:
                    out[k].append(feats[k].double().cpu().numpy())
                n += images.shape[0]
                bar.update(images.shape[0])
            if max_images is not None and n >= max_images:
                break
    dims = {"pool": 2048, "logits": 1008}
    return {k: np.concatenate(v) if v else np.zeros((0, dims[k])) for k, v in out.items()}


def compute_ref_stats(data_url: str, out_url: str, inception_weights: str | None = None,
                      resolution: int | None = None, max_images: int | None = None,
                      batch_size: int = 64, device: str | torch.device | None = None,
                      num_workers: int = 2, progress: bool = True) -> dict[str, Any]:
    """Reference statistics of an image dataset for FID: one pass (centre crop to ``resolution``,
    default the data config's 256, no shuffling) through the Inception network; writes ``mu``,
    ``sigma`` and metadata to ``out_url`` (:func:`evals.stats.save_ref_stats`) and returns them
    as :func:`evals.stats.load_ref_stats` would."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_inception(inception_weights, device=device)   # before streaming: fail fast
    resolution = int(resolution or DataConfig.resolution)
    # uint8 straight to the network: no float round trip
    loader, source, _ = fixed_pass(data_url, resolution, batch_size, num_workers, to_float=False)
    total = source.total_samples
    feats = extract(loader, model, device, progress=progress, total=total, max_images=max_images)
    n = feats["pool"].shape[0]
    if n < 2:
        raise ValueError(f"{data_url}: {n} image(s) read; reference statistics need at least 2")
    mu, sigma = feature_stats(feats["pool"])
    meta = {**model.identity(), "num_images": n, "resolution": resolution, "crop": "center",
            "data": data_url}
    save_ref_stats(out_url, mu, sigma, **meta)
    return {"mu": mu, "sigma": sigma, "meta": meta}
