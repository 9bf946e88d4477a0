"""Frozen text encoders for text-conditional priors.

Backends (every model is built from a config with random weights, then real weights are loaded
from a file; nothing is downloaded):

- ``open_clip``: the TEXT tower of an open_clip model config bundled with the package
  ("ViT-B-32", "ViT-L-14", ...), built with ``open_clip.model._build_text_tower`` (the same
  builder ``open_clip.CLIP`` uses; no vision tower is ever built). Radford et al., "Learning
  Transferable Visual Models From Natural Language Supervision", 2021; Cherti et al.,
  "Reproducible scaling laws for contrastive language-image learning", 2023.
- ``hf_clip``: ``transformers.CLIPTextModelWithProjection`` from a ``CLIPTextConfig``.
- ``t5``: ``transformers.T5EncoderModel`` from a ``T5Config`` (Raffel et al. 2020; the frozen T5
  encoder of Imagen, Saharia et al. 2022).

Outputs: per-token hidden states ``[B, L, C]`` (after the final LayerNorm; for prefix or
cross-attention), a BoolTensor mask ``[B, L]`` (True = real token: everything up to and including
the first end-of-text token) and a pooled vector (CLIP: the projected EOT state; T5: the masked
mean). CLIP towers are causal, so the states of real tokens do not depend on padding; T5 is
bidirectional and gets the mask as its attention mask.

Tokenizers: CLIP uses open_clip's BPE (``bpe_simple_vocab_16e6.txt.gz`` ships inside the package;
SOT 49406, EOT 49407, zero padding to 77). ``hf_clip`` uses a local ``transformers`` tokenizer
folder when one is given or cached, else the same BPE (the vocabulary is CLIP's). T5 needs a
local tokenizer folder (``tokenizer_path``, or ``$VQSCALE_CACHE/tokenizers/<name>/``); there is no
offline fallback, and :meth:`TextEncoder.tokenize` says where it looked. The empty caption ""
is the unconditional caption: it tokenizes to SOT, EOT (T5: just ``</s>``).

Frozen: no parameter requires grad, :meth:`TextEncoder.train` always leaves the module in eval
mode (so a parent prior's ``.train()`` cannot enable dropout), and encoding runs under no_grad.

Weights: ``weights`` (a path or any storage URL; safetensors or a torch file read with
``weights_only=True``), else with ``pretrained=True`` the cache ``$VQSCALE_CACHE/weights/<name>.
{safetensors,pt,bin}`` (``VQSCALE_CACHE`` defaults to ``~/.cache/vqscale``); none found raises
:class:`TextEncoderWeightsNotFound` naming every path checked. Accepted layouts: our own
(:meth:`TextEncoder.save_weights`), a full open_clip CLIP checkpoint (``visual.*`` dropped), a
transformers ``CLIPModel`` checkpoint (``vision_model.*`` dropped) and a
``T5ForConditionalGeneration`` one (decoder dropped). A model built on the meta device skips
loading (structure only): materialize it with ``to_empty`` and call :meth:`load_weights`.

Cached embeddings (DESIGN.md: ``KEY.txtemb.npy``, float16): :func:`to_cached` keeps the real
tokens of one caption (``[L', C]``), :func:`from_cached` pads a batch of them back to
``(hidden [B, L, C], mask [B, L])`` with zeros at masked positions (the encoder's own states
there differ; consumers must honour the mask, as they must for live encodings).

Parameter counts, measured with ``count_params`` on the meta device:

=========================  ===========  =====  ======  ============================================
preset                     parameters   width  pooled  what
=========================  ===========  =====  ======  ============================================
openclip-vit-b-32-text      63,428,096    512     512  open_clip ViT-B-32 text tower (12 x 512, 8 heads)
openclip-vit-l-14-text     123,650,304    768     768  open_clip ViT-L-14 text tower (12 x 768, 12 heads)
hf-clip-text               123,650,304    768     768  CLIPTextConfig of openai/clip-vit-large-patch14
t5-base-encoder            109,628,544    768     768  T5 (original t5-base) encoder, 12 x 768, d_ff 3072
=========================  ===========  =====  ======  ============================================

The ``-tiny`` twins (width 64 (T5: 32), 2 layers, 2 heads) keep the real CLIP vocabulary (49408)
and BPE; the T5 twin has a 128-token vocabulary and needs a tokenizer folder built for it (the
tests write one with the ``tokenizers`` library).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from data_pipeline import storage

from .weights import load_state_dict_file

from .registry import register_model

CLIP_SOT, CLIP_EOT = 49406, 49407   # open_clip BPE start/end of text (vocabulary 49408)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin")
_FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class TextEncoderConfig:
    backend: Literal["open_clip", "hf_clip", "t5"] = "open_clip"
    # open_clip: a bundled model config name ("ViT-B-32", "ViT-L-14"). hf_clip / t5: "" for the
    # library's config defaults, or a folder/URL holding a transformers config.json (a full
    # CLIPConfig's text_config is used).
    model: str = "ViT-B-32"
    # Replace fields of that text config: open_clip CLIPTextCfg fields plus "embed_dim" and
    # "quick_gelu"; CLIPTextConfig / T5Config fields.
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    max_length: int = 77              # tokens per caption (padding and truncation); 77 for CLIP
    name: str = ""                    # file stem in the weights/tokenizers cache (presets: their name)
    pretrained: bool = False          # load weights (from `weights`, else the cache) or fail
    weights: str | None = None        # explicit weights file (path or URL); implies loading
    tokenizer_path: str | None = None # transformers tokenizer folder (required for t5 unless cached)
    init_seed: int | None = 0         # random init seed (same random encoder in every process)


class TextEncoderWeightsNotFound(FileNotFoundError):
    """``pretrained=True`` and no weights file at the given path or in the cache."""


@dataclass
class TextEncoderOutput:
    hidden: Tensor        # [B, L, C]
    mask: Tensor          # bool [B, L], True = real token
    pooled: Tensor        # [B, pooled_dim]


def cache_dir() -> str:
    return os.environ.get("VQSCALE_CACHE") or os.path.expanduser("~/.cache/vqscale")


def weight_candidates(name: str) -> list[str]:
    """Where ``pretrained=True`` looks for weights when no ``weights`` file is given."""
    if not name:
        return []
    wdir = storage.join(cache_dir(), "weights")
    return [storage.join(wdir, name + s) for s in WEIGHT_SUFFIXES]


def load_state_dict(url: str) -> dict[str, Tensor]:
    """A safetensors or torch file (any storage URL) as a flat CPU state dict."""
    return load_state_dict_file(url)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------- building


def _open_clip_tower(cfg: TextEncoderConfig) -> tuple[nn.Module, int, int]:
    import open_clip
    from open_clip.model import CLIPTextCfg, _build_text_tower
    mc = open_clip.get_model_config(cfg.model)
    if mc is None:
        raise ValueError(f"open_clip has no bundled model config {cfg.model!r} (e.g. 'ViT-B-32', 'ViT-L-14')")
    kw = dict(cfg.model_kwargs)
    embed_dim, quick_gelu = kw.pop("embed_dim", mc["embed_dim"]), kw.pop("quick_gelu", mc.get("quick_gelu", False))
    text_cfg = {**mc["text_cfg"], **kw, "context_length": cfg.max_length, "output_tokens": True}
    if text_cfg.get("hf_model_name"):
        raise ValueError(f"{cfg.model}: its text tower is a Hugging Face model; use backend 'hf_clip' or 't5'")
    tower = _build_text_tower(embed_dim, CLIPTextCfg(**text_cfg), quick_gelu=quick_gelu)
    return tower, tower.width, (embed_dim if tower.text_projection is not None else tower.width)


def _hf_config_dict(model: str, kwargs: dict[str, Any], text: bool) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if model:
        d = storage.read_json(storage.join(model, "config.json"))
        if text and "text_config" in d:   # a full CLIPConfig
            d = {**d["text_config"], "projection_dim": d.get("projection_dim", d["text_config"].get("projection_dim"))}
        d = {k: v for k, v in d.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    return {**d, **kwargs}


def _build_backbone(cfg: TextEncoderConfig) -> tuple[nn.Module, int, int, int, int]:
    """(module, width, pooled_dim, eos_id, pad_id)."""
    if cfg.backend == "open_clip":
        tower, width, pooled = _open_clip_tower(cfg)
        return tower, width, pooled, CLIP_EOT, int(tower.pad_id)
    if cfg.backend == "hf_clip":
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection
        kw = {"max_position_embeddings": cfg.max_length, "bos_token_id": CLIP_SOT, "eos_token_id": CLIP_EOT,
              "pad_token_id": 0, **_hf_config_dict(cfg.model, cfg.model_kwargs, text=True)}
        if kw["eos_token_id"] == 2:   # openai configs' legacy id (HF then pools at argmax = CLIP's EOT)
            kw["eos_token_id"] = CLIP_EOT
        c = CLIPTextConfig(**kw)
        if c.max_position_embeddings < cfg.max_length:
            raise ValueError(f"max_length {cfg.max_length} > max_position_embeddings {c.max_position_embeddings}")
        return CLIPTextModelWithProjection(c), c.hidden_size, c.projection_dim, int(c.eos_token_id), 0
    if cfg.backend == "t5":
        from transformers import T5Config, T5EncoderModel
        c = T5Config(**_hf_config_dict(cfg.model, cfg.model_kwargs, text=False))
        return T5EncoderModel(c), c.d_model, c.d_model, int(c.eos_token_id), int(c.pad_token_id)
    raise ValueError(f"backend must be 'open_clip', 'hf_clip' or 't5', got {cfg.backend!r}")


def _canonical_keys(sd: dict[str, Tensor], backend: str) -> dict[str, Tensor]:
    """Rename the checkpoint layouts we accept to the backbone's own keys (extra keys are ignored
    by the loader; missing ones are an error)."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if backend == "open_clip":
            k = k.removeprefix("text.")        # open_clip CustomTextCLIP layout
            if k.startswith(("visual.", "logit_")):
                continue
        elif backend == "t5" and k.startswith(("decoder.", "lm_head.")):
            continue
        elif backend == "hf_clip" and k.startswith(("vision_model.", "visual_projection.", "logit_")):
            continue
        out[k] = v
    return out


class _TextTokenizer:
    """A transformers tokenizer folder (``folder``), else open_clip's BPE (model ``clip_model``, or
    its plain SimpleTokenizer when None): captions -> LongTensor ``[B, max_length]``."""

    def __init__(self, max_length: int, folder: str | None = None, clip_model: str | None = None):
        self.max_length, self.hf = max_length, folder is not None
        if self.hf:
            from transformers import AutoTokenizer
            self.tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.eos_id = self.tok.eos_token_id
        else:
            import open_clip
            from open_clip.tokenizer import SimpleTokenizer
            self.tok = (open_clip.get_tokenizer(clip_model, context_length=max_length) if clip_model
                        else SimpleTokenizer(context_length=max_length))
            self.eos_id = self.tok.eot_token_id

    def __call__(self, captions: list[str]) -> Tensor:
        if self.hf:
            return self.tok(captions, padding="max_length", truncation=True, max_length=self.max_length,
                            return_tensors="pt")["input_ids"].long()
        return self.tok(captions, context_length=self.max_length).long()


def _local_folder(url: str) -> str:
    """A tokenizer folder on any storage URL as a local folder (remote ones are copied into the
    cache once, keyed by URL)."""
    if not storage.is_remote(url):
        return storage.local_path(url)
    local = os.path.join(cache_dir(), "tokenizers", "remote-" + hashlib.sha256(url.encode()).hexdigest()[:16])
    if not os.path.isdir(local):
        storage.download_dir(url, local)
    return local


def token_mask(tokens: Tensor, eos_id: int, pad_id: int) -> Tensor:
    """True up to and including the first EOS of each row; rows without an EOS: ``tokens != pad``."""
    is_eos = tokens == eos_id
    upto_first = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    return torch.where(is_eos.any(1, keepdim=True), upto_first, tokens != pad_id)


# ------------------------------------------------------------------------------------ the module


class TextEncoder(nn.Module):
    """A frozen text encoder: ``tokenize`` -> ``encode`` (or ``encode_text`` for both).

    Attributes: ``width`` (C of the per-token states), ``pooled_dim``, ``max_length`` (L),
    ``eos_id``/``pad_id``, ``source`` (where the weights came from, or "random(seed=...)").
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        with torch.random.fork_rng(devices=[]):   # a seeded random encoder is the same everywhere
            if cfg.init_seed is not None:
                torch.manual_seed(cfg.init_seed)
            self.model, self.width, self.pooled_dim, self.eos_id, self.pad_id = _build_backbone(cfg)
        self.max_length = cfg.max_length
        self.source = f"random(seed={cfg.init_seed})"
        self._text_tokenizer: Any = None
        self.requires_grad_(False)
        self.eval()
        on_meta = any(p.is_meta for p in self.parameters())
        if (cfg.pretrained or cfg.weights is not None) and not on_meta:
            self.load_weights(cfg.weights)

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(False)   # frozen: always eval (no dropout), whatever the parent does

    # ------------------------------------------------------------------------------ tokenizing
    def text_tokenizer_candidates(self) -> list[str]:
        cands = [self.config.tokenizer_path] if self.config.tokenizer_path else []
        if self.config.name and self.config.backend != "open_clip":
            cands.append(storage.join(cache_dir(), "tokenizers", self.config.name))
        return cands

    def _get_text_tokenizer(self):
        if self._text_tokenizer is not None:
            return self._text_tokenizer
        cfg = self.config
        if cfg.backend == "open_clip" and not cfg.tokenizer_path:
            tok = _TextTokenizer(cfg.max_length, clip_model=cfg.model)
        else:
            found = next((c for c in self.text_tokenizer_candidates() if storage.isdir(c)), None)
            if found is not None:
                tok = _TextTokenizer(cfg.max_length, folder=_local_folder(found))
            elif cfg.tokenizer_path:
                raise FileNotFoundError(f"tokenizer folder {cfg.tokenizer_path} does not exist")
            elif cfg.backend == "hf_clip":
                tok = _TextTokenizer(cfg.max_length)   # CLIP's BPE vocabulary, bundled with open_clip
            else:
                raise FileNotFoundError(
                    f"the {cfg.backend} text encoder {cfg.name or cfg.model!r} needs a transformers tokenizer "
                    f"folder (tokenizer.json or spiece.model + tokenizer_config.json) and none can be downloaded "
                    f"here; checked {self.text_tokenizer_candidates() or '(no name, no tokenizer_path)'}. Pass "
                    f"tokenizer_path=FOLDER or put one at $VQSCALE_CACHE/tokenizers/<name>/.")
        if tok.eos_id != self.eos_id:
            raise ValueError(f"tokenizer EOS id {tok.eos_id} != the model's {self.eos_id}: wrong tokenizer?")
        self._text_tokenizer = tok
        return tok

    def tokenize(self, captions: Sequence[str]) -> Tensor:
        """Captions -> LongTensor ``[B, max_length]`` on CPU (padded; too long ones truncated, EOS kept)."""
        if isinstance(captions, str):
            raise TypeError("tokenize takes a list of captions, not one string")
        return self._get_text_tokenizer()(list(captions))

    def null_tokens(self, batch_size: int) -> Tensor:
        """Tokens of the unconditional (empty) caption."""
        return self.tokenize([""] * batch_size)

    def mask(self, tokens: Tensor) -> Tensor:
        return token_mask(tokens, self.eos_id, self.pad_id)

    # ------------------------------------------------------------------------------- encoding
    @torch.no_grad()
    def forward(self, tokens: Tensor) -> TextEncoderOutput:
        tokens = tokens.to(next(self.parameters()).device).long()
        if tokens.shape[1] > self.max_length:
            raise ValueError(f"{tokens.shape[1]} tokens per caption, more than max_length={self.max_length}")
        mask = self.mask(tokens)
        if self.config.backend == "open_clip":
            # open_clip's causal mask is fixed at max_length: pad shorter tokens (causal, so padding
            # cannot reach real tokens) and cut the states back.
            L = tokens.shape[1]
            full = nn.functional.pad(tokens, (0, self.max_length - L), value=self.pad_id)
            pooled, hidden = self.model(full)
            hidden = hidden[:, :L]
        elif self.config.backend == "hf_clip":
            out = self.model(input_ids=tokens, attention_mask=mask.long())
            hidden, pooled = out.last_hidden_state, out.text_embeds
        else:
            hidden = self.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
        return TextEncoderOutput(hidden, mask, pooled)

    def encode(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens ``[B, L]`` -> (hidden ``[B, L, width]``, mask bool ``[B, L]``), no grad."""
        out = self.forward(tokens)
        return out.hidden, out.mask

    def encode_text(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        return self.encode(self.tokenize(captions))

    def cache_key(self, caption: str) -> str:
        """Key of a caption's embedding under THIS encoder (name, length and weights included)."""
        return cache_key(caption, f"{self.config.name or self.config.model}|{self.config.backend}|{self.max_length}|{self.source}")

    # -------------------------------------------------------------------------------- weights
    def _tied(self) -> dict[str, list[str]]:
        """Groups of state-dict keys that are one tensor (T5's shared / encoder.embed_tokens)."""
        groups: dict[int, list[str]] = {}
        for k, v in self.model.state_dict(keep_vars=True).items():
            groups.setdefault(id(v), []).append(k)
        return {ks[0]: ks for ks in groups.values() if len(ks) > 1}

    def weights_state_dict(self) -> dict[str, Tensor]:
        """The backbone's state dict with each tied tensor once (what :meth:`save_weights` writes)."""
        sd = self.model.state_dict()
        for keys in self._tied().values():
            for k in keys[1:]:
                sd.pop(k)
        return {k: v.detach().cpu().contiguous() for k, v in sd.items()}

    def save_weights(self, url: str) -> str:
        """Write the weights as safetensors (atomically, any storage URL); returns ``url``."""
        from safetensors.torch import save
        storage.write_bytes(url, save(self.weights_state_dict(), metadata={"name": self.config.name,
                                                                           "backend": self.config.backend}))
        return url

    @torch.no_grad()
    def load_weights(self, weights: str | None = None) -> str:
        """Load from ``weights`` (path/URL) or the cache; returns the source. See the module doc."""
        if weights is None:
            cands = weight_candidates(self.config.name)
            weights = next((c for c in cands if storage.exists(c)), None)
            if weights is None:
                raise TextEncoderWeightsNotFound(
                    f"no weights for text encoder {self.config.name or self.config.model!r} ({self.config.backend}); "
                    f"this machine cannot download them. Checked: {cands or '(no name: nothing to look up)'}. "
                    f"Put a checkpoint at {cands[0] if cands else '$VQSCALE_CACHE/weights/<name>.safetensors'} "
                    f"(save one with TextEncoder.save_weights, or copy an open_clip / transformers checkpoint), "
                    f"pass weights=PATH, set VQSCALE_CACHE, or use pretrained=False for random weights.")
        elif not storage.exists(weights):
            raise TextEncoderWeightsNotFound(f"text encoder weights file {weights} does not exist")
        sd = _canonical_keys(load_state_dict(weights), self.config.backend)
        for keys in self._tied().values():   # a tied tensor may be stored under any of its names
            have = next((k for k in keys if k in sd), None)
            for k in keys:
                if have is not None:
                    sd.setdefault(k, sd[have])
        own = self.model.state_dict()
        missing = sorted(set(own) - set(sd))
        if missing:
            raise ValueError(f"text encoder weights from {weights} lack {len(missing)} of {len(own)} tensors, "
                             f"e.g. {missing[:3]} (wrong architecture or backend {self.config.backend!r}?)")
        for k, t in own.items():
            if tuple(sd[k].shape) != tuple(t.shape):
                raise ValueError(f"text encoder weights from {weights}: {k} has shape {tuple(sd[k].shape)}, "
                                 f"expected {tuple(t.shape)}")
        self.model.load_state_dict({k: sd[k] for k in own}, strict=True)
        self.source = weights
        return weights


# ------------------------------------------------------------------------ cached embeddings


def cache_key(caption: str, encoder: str = "") -> str:
    """A stable hex key for ``caption`` (exact text, not normalized) under ``encoder``."""
    return hashlib.sha256(f"{encoder}\x00{caption}".encode("utf-8")).hexdigest()[:32]


def to_cached(hidden: Tensor, mask: Tensor) -> np.ndarray:
    """One caption's encoding (``[L, C]`` + ``[L]``, or a batch of one) -> float16 ``[L', C]`` holding
    the real tokens only (masks are prefixes: SOT ... EOT). Values beyond float16's range are
    clamped to +-65504 (a final LayerNorm keeps them far inside it)."""
    if hidden.dim() == 3:
        if hidden.shape[0] != 1:
            raise ValueError(f"to_cached takes one caption; got a batch of {hidden.shape[0]} (use to_cached_batch)")
        hidden, mask = hidden[0], mask[0]
    if hidden.dim() != 2 or mask.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [L, C] and mask [L], got {tuple(hidden.shape)} and {tuple(mask.shape)}")
    kept = hidden[mask.bool()].detach().float().clamp(-_FP16_MAX, _FP16_MAX)
    return kept.cpu().numpy().astype(np.float16)


def to_cached_batch(hidden: Tensor, mask: Tensor) -> list[np.ndarray]:
    return [to_cached(h, m) for h, m in zip(hidden, mask)]


def from_cached(arrays: Sequence[np.ndarray], length: int | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Cached ``[L_i, C]`` arrays -> (hidden ``[B, L, C]`` zero-padded, mask bool ``[B, L]``); ``L`` is
    ``length`` (e.g. the encoder's max_length, for fixed shapes) or the longest ``L_i``."""
    if not len(arrays):
        raise ValueError("from_cached needs at least one array")
    arrs = [np.asarray(a) for a in arrays]
    widths = {a.shape[1] if a.ndim == 2 else None for a in arrs}
    if len(widths) != 1 or None in widths:
        raise ValueError(f"cached embeddings must all be [L_i, C] with one C; got shapes {[a.shape for a in arrs]}")
    longest = max(a.shape[0] for a in arrs)
    L = longest if length is None else int(length)
    if longest > L:
        raise ValueError(f"a cached embedding has {longest} tokens, more than length={L}")
    hidden = torch.zeros(len(arrs), L, widths.pop(), dtype=dtype)
    mask = torch.zeros(len(arrs), L, dtype=torch.bool)
    for i, a in enumerate(arrs):
        hidden[i, : a.shape[0]] = torch.from_numpy(a.astype(np.float32)).to(dtype)
        mask[i, : a.shape[0]] = True
    return hidden, mask


# ----------------------------------------------------------------------------------- presets

_FULL: dict[str, dict[str, Any]] = {
    "openclip-vit-b-32-text": dict(backend="open_clip", model="ViT-B-32", max_length=77),
    "openclip-vit-l-14-text": dict(backend="open_clip", model="ViT-L-14", max_length=77),
    "hf-clip-text": dict(backend="hf_clip", model="", max_length=77, model_kwargs=dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        projection_dim=768, hidden_act="quick_gelu")),
    "t5-base-encoder": dict(backend="t5", model="", max_length=128, model_kwargs=dict(
        vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
        feed_forward_proj="relu")),
}
_TINY: dict[str, dict[str, Any]] = {
    "openclip-vit-b-32-text": dict(model_kwargs=dict(width=64, layers=2, heads=2, embed_dim=32)),
    "openclip-vit-l-14-text": dict(model_kwargs=dict(width=64, layers=2, heads=2, embed_dim=48)),
    "hf-clip-text": dict(model_kwargs=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                           num_attention_heads=2, projection_dim=32, hidden_act="quick_gelu")),
    "t5-base-encoder": dict(max_length=32, model_kwargs=dict(
        vocab_size=128, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, feed_forward_proj="relu")),
}


def _build(name: str, tiny: bool, overrides: dict[str, Any]) -> TextEncoder:
    base = _FULL[name]
    fields = {**base, **(_TINY[name] if tiny else {})}
    fields["name"] = name + ("-tiny" if tiny else "")
    fields["pretrained"] = not tiny   # a full-size encoder is only useful with its real weights
    mk = overrides.pop("model_kwargs", None)
    if mk is not None:   # merged, so one field can change without restating the others
        fields["model_kwargs"] = {**fields.get("model_kwargs", {}), **mk}
    return TextEncoder(dataclasses.replace(TextEncoderConfig(**fields), **overrides))


@register_model("openclip-vit-b-32-text", kind="text_encoder")
def openclip_vit_b_32_text(**overrides) -> TextEncoder:
    """open_clip ViT-B-32 text tower (63.4M), width 512, 77 tokens; weights required."""
    return _build("openclip-vit-b-32-text", False, overrides)


@register_model("openclip-vit-l-14-text", kind="text_encoder")
def openclip_vit_l_14_text(**overrides) -> TextEncoder:
    """open_clip ViT-L-14 text tower (123.7M), width 768, 77 tokens; weights required."""
    return _build("openclip-vit-l-14-text", False, overrides)


@register_model("hf-clip-text", kind="text_encoder")
def hf_clip_text(**overrides) -> TextEncoder:
    """transformers CLIP text model + projection, openai/clip-vit-large-patch14 sizes (123.7M)."""
    return _build("hf-clip-text", False, overrides)


@register_model("t5-base-encoder", kind="text_encoder")
def t5_base_encoder(**overrides) -> TextEncoder:
    """T5-base encoder (109.6M), width 768, 128 tokens; needs weights and a tokenizer folder."""
    return _build("t5-base-encoder", False, overrides)


@register_model("openclip-vit-b-32-text-tiny", kind="text_encoder")
def openclip_vit_b_32_text_tiny(**overrides) -> TextEncoder:
    """CPU twin: width 64, 2 layers, 2 heads, pooled 32; real BPE and 49408 vocabulary; random init."""
    return _build("openclip-vit-b-32-text", True, overrides)


@register_model("openclip-vit-l-14-text-tiny", kind="text_encoder")
def openclip_vit_l_14_text_tiny(**overrides) -> TextEncoder:
    """CPU twin: width 64, 2 layers, 2 heads, pooled 48; real BPE; random init."""
    return _build("openclip-vit-l-14-text", True, overrides)


@register_model("hf-clip-text-tiny", kind="text_encoder")
def hf_clip_text_tiny(**overrides) -> TextEncoder:
    """CPU twin: width 64, 2 layers, 2 heads, pooled 32; CLIP BPE fallback tokenizer; random init."""
    return _build("hf-clip-text", True, overrides)


@register_model("t5-base-encoder-tiny", kind="text_encoder")
def t5_base_encoder_tiny(**overrides) -> TextEncoder:
    """CPU twin: width 32, 2 layers, vocabulary 128, 32 tokens; needs ``tokenizer_path`` to tokenize."""
    return _build("t5-base-encoder", True, overrides)
