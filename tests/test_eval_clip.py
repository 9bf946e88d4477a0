"""``evals/clip_score.py``: CLIP score (Hessel et al. 2021) of a text prior's samples.

A small open_clip architecture (the ViT-B-32 config shrunk through ``overrides``: one 64-wide
layer per tower, 32 px input) with random weights saved to a file and loaded the way a user's real
CLIP weights are (a path, or the ``$VQSCALE_CACHE/weights`` cache), never downloaded; and a tiny
random text prior package end to end."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

import model_zoo.t2i_prior  # noqa: F401  (registers the preset)
from evals.clip_score import (CLIPWeightsNotFound, clip_score, clip_weight_candidates, evaluate_clip_score,
                              load_clip, read_prompts)
from model_zoo import create_model
from model_zoo.package import save_package
from model_zoo.grids import grid_shape

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"embed_dim": 32,
         "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
PROMPTS = ["a red square", "a handwritten digit seven", "a photo of a cat"]


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """Random weights of the small CLIP, as a safetensors file (the format a user would cache)."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, **SMALL)
    path = str(tmp_path_factory.mktemp("clip") / "small-clip.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path, model.state_dict()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_loads_weights_from_a_path_and_scores_deterministically(clip_file):
    path, state = clip_file
    clip = load_clip("ViT-B-32", path, overrides=SMALL)
    for k, v in clip.model.state_dict().items():          # the file's tensors, not a fresh init
        assert torch.equal(v, state[k]), k
    assert clip.info["weights"] == path and len(clip.info["sha256"]) == 64
    images = _images(5)
    a = clip_score(images, PROMPTS[0], clip.model, clip.preprocess, clip.text_tokenizer)
    b = clip_score(images, [PROMPTS[0]] * 5, clip.model, clip.preprocess, clip.text_tokenizer, batch_size=2)
    assert a.shape == (5,) and a.dtype == torch.float64
    assert torch.all((a >= 0) & (a <= 100)) and bool((a > 0).any())   # not all clamped away
    assert torch.allclose(a, b, atol=1e-4)                 # batching does not change a score
    # The formula, against open_clip's own embeddings.
    with torch.no_grad():
        img = clip.model.encode_image(clip.preprocess(images))
        txt = clip.model.encode_text(clip.text_tokenizer([PROMPTS[0]] * 5))
    ref = 100 * torch.nn.functional.cosine_similarity(img, txt).clamp_min(0)
    assert torch.allclose(a.float(), ref, atol=1e-4)
    with pytest.raises(ValueError, match="2 captions for 5 images"):
        clip_score(images, PROMPTS[:2], clip.model, clip.preprocess, clip.text_tokenizer)


def test_cache_lookup_and_missing_weights_error(clip_file, tmp_path, monkeypatch):
    monkeypatch.setenv("VQSCALE_CACHE", str(tmp_path / "cache"))
    cands = clip_weight_candidates("ViT-B-32")
    assert cands[0] == os.path.join(str(tmp_path / "cache"), "weights", "openclip-vit-b-32.safetensors")
    with pytest.raises(CLIPWeightsNotFound, match="never downloaded") as e:
        load_clip("ViT-B-32")
    assert "openclip-vit-b-32.safetensors" in str(e.value) and isinstance(e.value, FileNotFoundError)
    with pytest.raises(CLIPWeightsNotFound, match="does not exist"):
        load_clip("ViT-B-32", str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="bundled"):
        load_clip("hf-hub:someone/clip")
    os.makedirs(os.path.dirname(cands[0]))
    os.symlink(clip_file[0], cands[0])
    clip = load_clip("ViT-B-32", overrides=SMALL)
    assert clip.info["weights"] == cands[0]


def test_preprocess_resizes_shortest_side_and_crops(clip_file):
    clip = load_clip("ViT-B-32", clip_file[0], overrides=SMALL)
    x = clip.preprocess(torch.zeros(2, 3, 48, 64))          # mid-grey, non-square
    assert x.shape == (2, 3, 32, 32)
    grey = (torch.full((3,), 128 / 255.0) - clip.preprocess.mean.flatten()) / clip.preprocess.std.flatten()
    assert torch.allclose(x[0, :, 5, 7], grey, atol=1e-5)


def test_read_prompts_from_a_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# captions\na cat\n\n  two dogs  \n")
    assert read_prompts(str(f)) == ["a cat", "two dogs"]
    assert read_prompts(["x"]) == ["x"]
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts([])


def test_end_to_end_on_a_tiny_text_prior(clip_file, tmp_path):
    torch.manual_seed(0)
    prior = create_model("t2i-prior-1b-tiny").eval()
    tok = create_model("vqgan-f8-tiny")                     # 4x4 tokens, 64 codes: the prior's grid
    pkg = str(tmp_path / "t2i")
    save_package(prior, pkg, tokenizer=tok)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = str(tmp_path / "res" / "clip.json")
    kw = dict(num_per_prompt=2, seed=3, guidance=2.0, top_k=16, clip_weights=clip_file[0], clip_overrides=SMALL,
              device="cpu", progress=False)
    r = evaluate_clip_score(pkg, str(prompts), out, batch_size=2, **kw)
    assert r["num_prompts"] == 3 and r["num_images"] == 6 and 0 < r["clip_score"] <= 100
    assert [p["prompt"] for p in r["per_prompt"]] == PROMPTS
    assert all(len(p["scores"]) == 2 for p in r["per_prompt"])
    assert r["protocol"]["clip"]["sha256"] and r["protocol"]["sampling"]["guidance"] == 2.0
    with open(out) as f:
        assert json.load(f)["clip_score"] == r["clip_score"]
    grid = Image.open(r["files"]["grid"])
    assert grid.size[::-1] == grid_shape(6, tok.image_size, tok.image_size, ncol=2)   # one row per prompt
    # Per-sample seeds: another batch size, the same images and scores.
    again = evaluate_clip_score(pkg, PROMPTS, None, batch_size=1, **kw)
    # CLIP score is 100 x a float32 cosine: batch 1 vs 2 rounds convolutions and attention differently,
    # 1e-5 in the score on one CPU, 1e-3 on another (6.9943 vs 6.9953); a different sampled token
    # would move a score by whole units, so 0.05 still catches a real change.
    for a, b in zip(again["per_prompt"], r["per_prompt"]):
        assert a["prompt"] == b["prompt"] and a["scores"] == pytest.approx(b["scores"], abs=0.05)
    with pytest.raises(ValueError, match="not text-conditional"):
        vim = create_model("vim-small-tiny", codebook_size=64, grid_size=(4, 4))
        save_package(vim, str(tmp_path / "vim"), tokenizer=tok)
        evaluate_clip_score(str(tmp_path / "vim"), PROMPTS, None, **kw)


def test_command_line_clip_score_and_text_prior_generation(clip_file, tmp_path, capsys, monkeypatch):
    """`vqscale eval clip-score` with the small architecture given as --clip-overrides, and
    `vqscale eval generation --prompts` on the same text prior (FID-type metrics skipped without
    Inception weights): JSON, grid and TensorBoard events written, the same scores as the API."""
    from pretrain.cli import main

    monkeypatch.setenv("VQSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    pkg = str(tmp_path / "t2i")
    save_package(create_model("t2i-prior-1b-tiny").eval(), pkg, tokenizer=create_model("vqgan-f8-tiny"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment line\n" + "\n".join(PROMPTS) + "\n")
    overrides = tmp_path / "small-clip.json"
    overrides.write_text(json.dumps(SMALL))
    out = tmp_path / "ev" / "clip.json"
    common = ["--ckpt", pkg, "--device", "cpu", "--batch-size", "2"]
    assert main(["eval", "clip-score", *common, "--prompts", str(prompts), "--out", str(out),
                 "--clip-weights", clip_file[0], "--clip-overrides", str(overrides), "--num-per-prompt", "2",
                 "--seed", "3", "--guidance", "2.0"]) == 0
    r = json.load(open(out))
    assert '"clip_score"' in capsys.readouterr().out and r["num_images"] == 6
    api = evaluate_clip_score(pkg, str(prompts), None, num_per_prompt=2, seed=3, guidance=2.0,
                              clip_weights=clip_file[0], clip_overrides=SMALL, batch_size=2, device="cpu",
                              progress=False)
    assert r["clip_score"] == pytest.approx(api["clip_score"], abs=1e-9)
    assert os.path.exists(r["files"]["grid"]) and os.listdir(r["files"]["tensorboard"])
    # without weights: one line, exit 2
    assert main(["eval", "clip-score", *common, "--prompts", str(prompts), "--out", str(out),
                 "--clip-overrides", json.dumps(SMALL)]) == 2
    assert "never downloaded" in capsys.readouterr().err
    gen = tmp_path / "ev" / "gen.json"
    assert main(["eval", "generation", *common, "--prompts", str(prompts), "--num-samples", "4",
                 "--out", str(gen)]) == 0
    g = json.load(open(gen))
    assert g["protocol"]["condition"]["prompts"] == PROMPTS and g["fid"] is None
    assert any("Inception" in n for n in g["notes"]) and os.path.exists(g["files"]["grid"])
    assert main(["eval", "generation", *common, "--class-labels", "0-3", "--num-samples", "4",
                 "--out", str(gen)]) == 2
    assert "text-conditional" in capsys.readouterr().err
