"""Tests of model_zoo.losses and model_zoo.discriminators (CPU, random weights)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model_zoo import discriminators as D
from model_zoo import losses as L
from model_zoo.registry import create_model, list_models


# ------------------------------------------------------------------------------ logit-Laplace

@pytest.mark.parametrize("mu,b", [(0.0, 0.1), (0.0, 0.5), (1.5, 0.3), (-2.0, 0.8), (0.7, 1.0)])
def test_logit_laplace_density_integrates_to_one(mu, b):
    # The density over x in (0, 1): with eps = 0 the squeeze is the identity map [-1, 1] -> (0, 1).
    x = torch.linspace(0, 1, 2_000_001, dtype=torch.float64)[1:-1]
    mu_t = torch.full_like(x, mu)
    log_b = torch.full_like(x, math.log(b))
    nll = L.logit_laplace_nll(2 * x - 1, mu_t, log_b, eps=0.0, reduction="none")
    assert torch.trapezoid(torch.exp(-nll), x).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("mu,b", [(0.0, 0.2), (1.0, 0.5), (-0.5, 1.0)])
def test_logit_laplace_mass_on_squeezed_range(mu, b):
    # With eps = 0.1 targets live in [eps, 1 - eps]; the mass there is the Laplace CDF difference
    # at the logits of the ends, and ~1 for a sharp density in the middle.
    eps = 0.1
    t = torch.linspace(-1, 1, 400_001, dtype=torch.float64)
    xs = (1 - 2 * eps) * (t + 1) / 2 + eps
    nll = L.logit_laplace_nll(t, torch.full_like(t, mu), torch.full_like(t, math.log(b)), eps=eps, reduction="none")
    mass = torch.trapezoid(torch.exp(-nll), xs).item()

    def cdf(z):
        return 0.5 + 0.5 * math.copysign(1.0, z - mu) * (1 - math.exp(-abs(z - mu) / b))
    lo, hi = math.log(eps / (1 - eps)), math.log((1 - eps) / eps)
    assert mass == pytest.approx(cdf(hi) - cdf(lo), abs=1e-4)
    if mu == 0.0:
        assert mass > 0.99


def test_logit_laplace_minimum_at_squeezed_target():
    eps = 0.1
    for target in (-1.0, -0.3, 0.0, 0.55, 1.0):
        x = torch.tensor(target, dtype=torch.float64)
        mus = torch.linspace(-4, 4, 80_001, dtype=torch.float64)
        nll = L.logit_laplace_nll(x.expand_as(mus), mus, torch.zeros_like(mus), eps=eps, reduction="none")
        best = mus[nll.argmin()]
        xs = (1 - 2 * eps) * (target + 1) / 2 + eps
        assert best.item() == pytest.approx(math.log(xs / (1 - xs)), abs=2e-4)
        # and the mean map takes that location back to the target pixel
        assert L.logit_laplace_mean(best, eps).item() == pytest.approx(target, abs=1e-3)


def test_logit_laplace_is_not_l1():
    # Same pixel-space error of the decoded image, different NLL: an L1 would give equal values.
    eps, log_b = 0.1, torch.zeros(())
    errs = []
    for target in (0.0, 0.9):
        x = torch.tensor(target, dtype=torch.float64)
        pred = torch.tensor(target - 0.1, dtype=torch.float64)
        xs = (1 - 2 * eps) * (pred + 1) / 2 + eps
        mu = torch.log(xs / (1 - xs))
        assert L.logit_laplace_mean(mu, eps).item() == pytest.approx(target - 0.1, abs=1e-9)
        errs.append(L.logit_laplace_nll(x, mu, log_b, eps=eps).item())
    assert abs(errs[0] - errs[1]) > 0.05
    # nor is it affine in |x - mu| in pixel space: it includes log(2b) + log x(1-x), depends on b
    x = torch.tensor([0.3])
    a = L.logit_laplace_nll(x, torch.tensor([0.0]), torch.tensor([0.0]))
    b = L.logit_laplace_nll(x, torch.tensor([0.0]), torch.tensor([-1.0]))
    assert a.item() != pytest.approx(b.item())


def test_logit_laplace_split_and_grad():
    out = torch.randn(2, 6, 4, 4, requires_grad=True)
    mu, log_b = L.split_logit_laplace(out)
    assert mu.shape == log_b.shape == (2, 3, 4, 4)
    assert torch.equal(mu, out[:, :3]) and torch.equal(log_b, out[:, 3:])
    img = L.logit_laplace_mean(mu)
    assert img.min() >= -1 and img.max() <= 1
    loss = L.logit_laplace_nll(torch.rand(2, 3, 4, 4) * 2 - 1, mu, log_b)
    loss.backward()
    assert torch.isfinite(out.grad).all() and out.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        L.split_logit_laplace(torch.randn(1, 5, 2, 2))


def test_pixel_losses():
    a, b = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    assert L.l1_loss(a, b).item() == pytest.approx(0.5)
    assert L.l2_loss(a, b).item() == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------- LPIPS

@pytest.fixture(scope="module")
def lpips():
    torch.manual_seed(0)
    return L.LPIPS(pretrained=False)


def test_lpips_zero_positive_and_grad(lpips):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(lpips(x, x), torch.zeros(2))
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_lpips_frozen(lpips):
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training and not any(m.training for m in lpips.modules())
    assert all((lin.model[1].weight >= 0).all() for lin in lpips.lins)


def test_lpips_vgg_matches_torchvision_layout(lpips):
    import torchvision  # installed with the project (open_clip needs it); checked against its VGG16
    with torch.device("meta"):
        ref = torchvision.models.vgg16(weights=None).features
    ref_sd = {k: v.shape for k, v in ref.state_dict().items()}
    ours = {k: v.shape for k, v in lpips.net.features.state_dict().items()}
    assert ours == ref_sd   # same keys and shapes: torchvision checkpoints load unchanged


def test_lpips_pretrained_without_weights_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("VQSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(L.LPIPSWeightsNotFound, match="lpips_vgg16.safetensors") as e:
        L.LPIPS()
    assert str(tmp_path / "cache" / "weights") in str(e.value)
    assert "pretrained=False" in str(e.value)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_lpips_safetensors_roundtrip_through_cache(lpips, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    monkeypatch.setenv("VQSCALE_CACHE", str(tmp_path))
    (tmp_path / "weights").mkdir()
    save_file({k: v.contiguous() for k, v in lpips.state_dict().items()},
              str(tmp_path / "weights" / "lpips_vgg16.safetensors"))
    loaded = L.LPIPS(pretrained=True)
    assert loaded.source.endswith("lpips_vgg16.safetensors")
    _assert_same_weights(lpips, loaded)
    x, y = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    assert torch.allclose(loaded(x, y), lpips(x, y))
    # the same file through an fsspec URL (the storage seam's remote path)
    import fsspec
    with fsspec.open("memory://vqscale-test/lpips.safetensors", "wb") as f:
        f.write((tmp_path / "weights" / "lpips_vgg16.safetensors").read_bytes())
    _assert_same_weights(lpips, L.LPIPS(weights="memory://vqscale-test/lpips.safetensors"))
    bf16 = L.LPIPS(pretrained=False).to(torch.bfloat16)   # a cast module still takes float inputs
    assert bf16(x, y).dtype == torch.float32


def test_lpips_torchvision_and_lpips_files_convert(lpips, tmp_path, monkeypatch):
    # torchvision layout (features.N.*, plus a classifier that must be ignored) + lpips heads
    # (lin{i}.model.1.weight) as torch .pth files, found in the cache, converted, reloaded.
    monkeypatch.setenv("VQSCALE_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    wdir = tmp_path / "weights"
    wdir.mkdir()
    vgg = {f"features.{k}": v for k, v in lpips.net.features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(vgg, wdir / "vgg16-397923af.pth")
    torch.save({k: v for k, v in lpips.state_dict().items() if k.startswith("lin")}, wdir / "vgg.pth")
    loaded = L.LPIPS()
    _assert_same_weights(lpips, loaded)
    out = L.convert_lpips_weights(str(wdir / "vgg16-397923af.pth"), str(wdir / "vgg.pth"), str(tmp_path / "full.safetensors"))
    _assert_same_weights(lpips, L.LPIPS(weights=out))
    # lpips/taming full state dict layout (net.sliceK.N.*)
    slices = {}
    for k, v in lpips.state_dict().items():
        if k.startswith("net.features."):
            idx = int(k.split(".")[2])
            s = next(i for i, tap in enumerate(L._VGG16_TAPS, 1) if idx <= tap)
            k = k.replace("net.features.", f"net.slice{s}.")
        slices[k] = v
    torch.save(slices, tmp_path / "taming.pth")
    _assert_same_weights(lpips, L.LPIPS(weights=str(tmp_path / "taming.pth")))


def test_lpips_rejects_incomplete_or_negative(lpips, tmp_path):
    sd = dict(lpips.state_dict())
    sd.pop("lin2.model.1.weight")
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="lack"):
        L.LPIPS(weights=str(tmp_path / "bad.pth"))
    sd = dict(lpips.state_dict())
    sd["lin0.model.1.weight"] = -sd["lin0.model.1.weight"] - 1
    torch.save(sd, tmp_path / "neg.pth")
    with pytest.raises(ValueError, match="negative"):
        L.LPIPS(weights=str(tmp_path / "neg.pth"))


# ------------------------------------------------------------------------- contrastive (RegVQ)

def _feats(seed, shapes=((2, 8, 8, 8), (2, 16, 4, 4))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) for s in shapes]


def test_contrastive_lower_for_perfect_recon():
    loss = L.ProbabilisticContrastiveLoss(num_patches=16, tau=0.07)
    fi, fr = _feats(0), _feats(1)
    d = torch.rand(2, 8, 8) + 0.1
    same = loss(fi, fi, d, generator=torch.Generator().manual_seed(0))
    rand = loss(fr, fi, d, generator=torch.Generator().manual_seed(0))
    assert same < rand


def test_contrastive_uniform_weights_is_summed_patchnce():
    # Equal distances (any value, or all 0: nothing sampled) -> w' = 1/L: eq. (3) is the sum of
    # CUT's PatchNCE terms, anchors the input's features, candidates the reconstruction's.
    fi, fr = _feats(2, ((1, 4, 2, 2),)), _feats(3, ((1, 4, 2, 2),))
    loss = L.ProbabilisticContrastiveLoss(num_patches=4, tau=0.5)
    y = F.normalize(fi[0].flatten(2)[0].T, dim=1)
    z = F.normalize(fr[0].flatten(2)[0].T, dim=1)
    ref = F.cross_entropy(y @ z.T / 0.5, torch.arange(4), reduction="sum")   # the permutation does not matter
    for d in (3.0, 1.0, 0.0):
        assert loss(fr, fi, torch.full((1, 2, 2), d)).item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(L.pcl_weights(torch.tensor([[0.0, 0.0], [1.0, 3.0]])),
                          torch.tensor([[0.5, 0.5], [0.25, 0.75]]))


def test_contrastive_resamples_distance_map_and_grads():
    loss = L.ProbabilisticContrastiveLoss(num_patches=8)
    fi = _feats(5, ((2, 8, 16, 16), (2, 8, 2, 2)))
    fr = [f.clone().requires_grad_(True) for f in _feats(6, ((2, 8, 16, 16), (2, 8, 2, 2)))]
    out = loss(fr, fi, torch.rand(2, 16))   # [B, N] token distances on a 4x4 grid
    out.backward()
    assert torch.isfinite(out) and all(f.grad is not None for f in fr)
    assert L._resize_map(torch.tensor([[[0.0, 1.0], [2.0, 3.0]]]), (4, 4))[0, :2, :2].eq(0).all()
    assert L._resize_map(torch.arange(16.0).view(1, 4, 4), (2, 2))[0, 0, 0] == pytest.approx(2.5)


# ------------------------------------------------------------------------------- adversarial

def test_gan_losses_known_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    # hinge: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.25 + 0.5)
    assert L.d_loss(real, fake, "hinge").item() == pytest.approx(0.375)
    assert L.g_loss(fake, "hinge").item() == pytest.approx(1.5)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    ns_d = 0.5 * ((sp(-2.0) + sp(-0.5)) / 2 + (sp(-3.0) + sp(0.0)) / 2)
    assert L.d_loss(real, fake, "non_saturating").item() == pytest.approx(ns_d, rel=1e-6)
    assert L.g_loss(fake, "non_saturating").item() == pytest.approx((sp(3.0) + sp(0.0)) / 2, rel=1e-6)
    with pytest.raises(ValueError):
        L.g_loss(fake, "wgan")


def test_adaptive_weight_hand_computation():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    nll = (w ** 2).sum()          # grad 2w = (2, 4), norm sqrt(20)
    g = (3 * w).sum()             # grad (3, 3), norm sqrt(18)
    aw = L.adaptive_weight(nll, g, w)
    assert aw.item() == pytest.approx(math.sqrt(20) / (math.sqrt(18) + 1e-4), rel=1e-6)
    assert not aw.requires_grad
    assert L.adaptive_weight(nll, 1e-9 * g, w, max=7.0).item() == 7.0
    (nll + aw * g).backward()     # graphs were retained
    with torch.no_grad():
        assert L.adaptive_weight((w ** 2).sum(), w.sum(), w).item() == 0.0


def test_r1_penalty():
    x = torch.randn(3, 4, requires_grad=True)
    r1 = L.r1_penalty((x * 2).sum(1), x)   # grad of each logit w.r.t. its row: all 2s
    assert r1.item() == pytest.approx(16.0)


def test_loss_weights_defaults():
    w = L.LossWeights()
    assert (w.l2, w.perceptual, w.adversarial, w.logit_laplace, w.commitment) == (1.0, 0.1, 0.1, 0.1, 0.25)
    assert w.l1 == w.prior_kl == w.contrastive == 0.0
    with pytest.raises(Exception):
        w.l2 = 2.0
    assert L.LossWeights.taming_vqgan().l1 == 1.0


# ---------------------------------------------------------------------------- discriminators

def test_registered_presets():
    assert {"stylegan2-disc", "stylegan2-disc-tiny", "patchgan", "patchgan-tiny"} <= set(
        list_models(kind="discriminator"))


def test_stylegan2_tiny_forward_backward():
    torch.manual_seed(0)
    d = create_model("stylegan2-disc-tiny")
    x = torch.randn(6, 3, 32, 32, requires_grad=True)   # 6: mbstd uses groups of 3
    out = d(x)
    assert out.shape == (6, 1)
    L.d_loss(out[:3], out[3:]).backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in d.parameters())


def test_stylegan2_full_preset_on_meta():
    with torch.device("meta"):
        d = create_model("stylegan2-disc")
    cfg = d.config
    assert [cfg.channels(r) for r in (256, 128, 64, 4)] == [128, 256, 512, 512]
    assert 25e6 < sum(p.numel() for p in d.parameters()) < 32e6


def test_equalized_lr_runtime_scaling():
    conv = D.EqualConv2d(4, 5, 3, padding=1, lr_mul=0.5, bias_init=1.0)
    x = torch.randn(2, 4, 6, 6)
    ref = F.conv2d(x, conv.weight * (0.5 / math.sqrt(4 * 9)), conv.bias * 0.5, padding=1)
    assert torch.allclose(conv(x), ref, atol=1e-6)
    lin = D.EqualLinear(16, 3, lr_mul=0.01)
    assert lin.weight.std().item() == pytest.approx(100.0, rel=0.5)   # stored N(0,1)/lr_mul
    v = torch.randn(4, 16)
    assert torch.allclose(lin(v), F.linear(v, lin.weight * 0.01 / 4.0, lin.bias * 0.01), atol=1e-5)
    act = D.EqualLinear(16, 3, activation=True)
    assert torch.allclose(act(v), F.leaky_relu(F.linear(v, act.weight / 4.0) + act.bias, 0.2) * math.sqrt(2), atol=1e-6)


def test_minibatch_std_adds_channel():
    m = D.MinibatchStdDev(group_size=4)
    x = torch.randn(8, 5, 3, 3)
    y = m(x)
    assert y.shape == (8, 6, 3, 3) and torch.equal(y[:, :5], x)
    # sample n is in group n % 2; its stat is the std over the group, averaged over C, H, W
    g0 = x[0::2]
    ref = torch.sqrt(g0.var(0, unbiased=False) + 1e-8).mean()
    assert torch.allclose(y[0, 5], ref.expand(3, 3), atol=1e-6)
    assert m(torch.randn(6, 5, 3, 3)).shape == (6, 6, 3, 3)   # 6 % 4 != 0: groups of 3


def test_blur_filter_normalized():
    k = D.make_blur_kernel((1, 3, 3, 1))
    assert k.sum().item() == pytest.approx(1.0)
    assert torch.allclose(k, torch.tensor([1.0, 3, 3, 1]).outer(torch.tensor([1.0, 3, 3, 1])) / 64)
    blur = D.Blur((1, 3, 3, 1), pad=(1, 2))
    x = torch.full((1, 2, 8, 8), 3.0)
    assert torch.allclose(blur(x)[..., 2:-2, 2:-2], torch.full_like(blur(x)[..., 2:-2, 2:-2], 3.0))


@pytest.mark.parametrize("norm", ["batch", "act", "none"])
def test_patchgan_tiny_forward_backward(norm):
    d = create_model("patchgan-tiny", norm=norm)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = d(x)
    assert out.shape == (2, 1, 32 // 4 - 2, 32 // 4 - 2)
    L.g_loss(out).backward()
    assert torch.isfinite(x.grad).all()


def test_patchgan_default_shape():
    d = create_model("patchgan")
    assert len([m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]) == 5
    assert d(torch.randn(1, 3, 64, 64)).shape == (1, 1, 6, 6)
