"""The registry drives these tests (timm's tests/test_models.py): every registered tokenizer's
tiny preset encodes, decodes and trains one step; every full-size preset has a tiny twin and builds
on the meta device; the README's parameter counts are the measured ones."""

from __future__ import annotations

import os
import re

import pytest
import torch

from model_zoo import create_model, list_models
from model_zoo.interfaces import Tokenizer, TokenizerOutput, Tokens

TOKENIZERS_TINY = list_models(kind="tokenizer", tiny=True)
TOKENIZERS_FULL = list_models(kind="tokenizer", tiny=False)
PRIORS_TINY = list_models(kind="prior", tiny=True)
PRIORS_FULL = list_models(kind="prior", tiny=False)
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_every_preset_has_a_tiny_twin():
    assert TOKENIZERS_FULL, "no tokenizer registered"
    for name in list_models(tiny=False):
        assert f"{name}-tiny" in list_models(tiny=True), f"{name} has no -tiny twin"


@pytest.mark.parametrize("name", TOKENIZERS_TINY)
def test_tiny_tokenizer_encode_decode_and_backward(name):
    torch.manual_seed(0)
    model = create_model(name)
    assert isinstance(model, Tokenizer)
    size = model.image_size
    x = torch.rand(2, 3, size, size) * 2 - 1
    out = model(x)
    assert isinstance(out, TokenizerOutput)
    assert out.recon.shape == x.shape
    loss = (out.recon - x).pow(2).mean() + out.quant.loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2
    model.eval()
    with torch.no_grad():
        tokens = model.encode(x)
        assert isinstance(tokens, Tokens)
        assert tokens.codes.shape == (2, model.num_tokens) and tokens.codes.dtype == torch.long
        assert 0 <= int(tokens.codes.min()) and int(tokens.codes.max()) < model.codebook_size
        if tokens.positions is not None:
            assert tokens.positions.shape == tokens.codes.shape
            assert bool((tokens.positions.diff(dim=1) > 0).all())
            assert int(tokens.positions.max()) < model.grid_size[0] * model.grid_size[1]
        else:
            assert model.num_tokens == model.grid_size[0] * model.grid_size[1]
        images = model.decode(tokens.codes, tokens.positions)
        assert images.shape == x.shape and torch.isfinite(images).all()
        assert torch.allclose(images, model(x).recon, atol=1e-5)


def _readme_counts() -> dict[str, int]:
    text = open(README).read()
    section = text.split("<!-- params:begin -->", 1)[1].split("<!-- params:end -->", 1)[0]
    out = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`([a-z0-9-]+)`\s*\|.*\|\s*([\d,]+)\s*\|\s*$", line)
        if m:
            out[m.group(1)] = int(m.group(2).replace(",", ""))
    return out


def test_readme_parameter_counts_are_measured_ones():
    documented = _readme_counts()
    assert set(documented) == set(TOKENIZERS_FULL) | set(PRIORS_FULL), "README's preset tables and the registry differ"
    for name, count in documented.items():
        with torch.device("meta"):
            model = create_model(name)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count, name


@pytest.mark.parametrize("name", PRIORS_TINY)
def test_tiny_prior_trains_samples_and_probes(name):
    from model_zoo.interfaces import Prior
    from model_zoo.sampling import SamplingConfig

    torch.manual_seed(0)
    prior = create_model(name)
    assert isinstance(prior, Prior)
    b, n = 2, prior.num_tokens
    codes = torch.randint(0, prior.codebook_size, (b, n))
    positions = None
    if name.startswith("stackformer"):
        cells = prior.grid_size[0] * prior.grid_size[1]
        positions = torch.stack([torch.randperm(cells)[:n].sort().values for _ in range(b)])
    condition = prior.null_condition(b)
    loss, terms = prior.loss(codes, condition, positions)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in prior.parameters())
    prior.eval()
    with torch.no_grad():
        out = prior.generate(condition, b, SamplingConfig(temperature=1.0, top_k=5), torch.tensor([3, 4]))
        gen = out[0] if isinstance(out, tuple) else out
        assert gen.shape == (b, n) and int(gen.max()) < prior.codebook_size and int(gen.min()) >= 0
        feats = prior.features(codes, condition, 0, positions) if positions is not None else \
            prior.features(codes, condition, 0)
        assert feats.ndim == 2 and feats.shape[0] == b
