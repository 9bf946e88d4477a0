"""The model-zoo package: one trained model as a self-describing folder (DESIGN.md, "Model-zoo package").

A package is a folder, local or at any storage URL (``s3://bucket/zoo/vim-base``)::

    config.json        {"schema_version": 2, "name": REGISTRY NAME, "kind": "tokenizer" | "prior" | ...,
                        "config": the model's full config dataclass as JSON,
                        "tokenizer": "tokenizer" (priors only: the folder of its tokenizer),
                        "tokenizer_model": {"name", "checksums_sha256"} (priors only: the identity
                        code manifests carry), "text_encoder": {"name", "overrides", "weights"}
                        (text priors only: the frozen encoder it expects, not in the package),
                        "dtype", "parameters", "card" (training facts, metrics, intended use)}
    model.safetensors  the state dict (safetensors only: loading never unpickles anything)
    README.md          the model card: name, kind, paper, parameter count, config, metrics
    checksums.sha256   ``sha256sum`` format, one line per file of the package (the tokenizer's
                       files included); ``sha256sum -c checksums.sha256`` checks a package by hand
    tokenizer/         priors only: the tokenizer's own package

Rebuilding a model from ``config.json``: the config dict is turned back into the config dataclass
by its type hints (nested dataclasses such as ``QuantizerConfig`` / ``TransformerConfig`` rebuilt,
JSON lists back to tuples where the field is a tuple, fields added since the package was written
take their defaults, unknown fields are an error), and every field is passed to the registered
preset as an override: ``create_model(name, **fields)``. Passing typed values, not dicts, means
no preset has to know how to parse JSON, and it uses the one path every preset already supports
(overrides replace config fields). The config class is found from the preset itself, built on the
meta device (no memory, no init cost). After building, the model's config must equal the saved
one field for field, so a preset that silently ignores or rewrites an override is caught instead
of loading weights into the wrong model.

Schema versions: a package written by an older vqscale loads through explicit upgrade functions
(:data:`UPGRADES`, one per version step, applied in order on read); a newer one is refused with a
message to upgrade vqscale. The folder is what Hugging Face Hub tooling expects (``config.json``,
``model.safetensors``, a ``README.md`` with a YAML header), so it uploads as is.

Writes are atomic at the package level, not only per file: the package is assembled in a local
folder and ``checksums.sha256`` is published last (an existing one is removed first when
overwriting), so a reader sees either no package, the old one or the whole new one; a local target
is swapped in with renames. Loading verifies every checksum before reading any weights, so a
truncated upload, a tampered or missing file is a :class:`PackageError`, never a silently wrong
model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import types
import typing
import uuid
from typing import Any

import torch
from torch import nn

from data_pipeline import storage

from .registry import create_model, model_entry

SCHEMA_VERSION = 2
CONFIG, WEIGHTS, CARD, CHECKSUMS = "config.json", "model.safetensors", "README.md", "checksums.sha256"
TOKENIZER_DIR = "tokenizer"
REQUIRED = (CONFIG, WEIGHTS, CARD)


class PackageError(ValueError):
    """A model-zoo package that cannot be written or loaded as asked (the message says why)."""


# ------------------------------------------------------------------------------------ configs

def model_config(model: nn.Module):
    """The model's frozen config dataclass (its ``.config`` attribute)."""
    cfg = getattr(model, "config", None)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return cfg
    raise PackageError(f"{type(model).__name__} has no config dataclass (.config)")


def config_to_dict(cfg) -> dict[str, Any]:
    """``dataclasses.asdict`` checked to be plain JSON (tuples become lists)."""
    data = dataclasses.asdict(cfg)
    try:
        return json.loads(json.dumps(data))
    except TypeError as e:
        raise PackageError(f"{type(cfg).__name__} holds a value JSON cannot store: {e}") from None


def _convert(hint: Any, value: Any, where: str) -> Any:
    """A JSON value back into the type ``hint`` names (dataclasses, tuples, unions of them)."""
    if value is None:
        return None
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, dict):
            raise PackageError(f"config field {where}: expected an object for {hint.__name__}, got {value!r}")
        return config_from_dict(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        for a in options:   # the member that matches the JSON shape of the value
            if dataclasses.is_dataclass(a) and isinstance(value, dict):
                return _convert(a, value, where)
            if typing.get_origin(a) in (tuple, list) and isinstance(value, list):
                return _convert(a, value, where)
        return value
    if origin is tuple and isinstance(value, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, where) for v in value)
        if args and len(args) == len(value):
            return tuple(_convert(a, v, where) for a, v in zip(args, value))
        return tuple(value)
    if origin is list and isinstance(value, list):
        return [_convert(args[0], v, where) for v in value] if args else list(value)
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return {k: _convert(args[1], v, where) for k, v in value.items()}
    return value


def config_from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Rebuild config dataclass ``cls`` from :func:`config_to_dict` output (see the module doc)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise PackageError(f"config fields {unknown} are unknown to {cls.__name__}{' at ' + where if where else ''}: "
                           f"the package was written by a newer vqscale")
    kwargs = {k: _convert(hints.get(k, Any), v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise PackageError(f"cannot rebuild {cls.__name__} from the saved config: {e}") from None


def build_model(name: str, config: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """The registered preset ``name`` with exactly the saved ``config`` (random weights)."""
    try:
        model_entry(name)
    except KeyError as e:
        raise PackageError(f"cannot rebuild the package's model: {e.args[0]}") from None
    with torch.device("meta"):
        proto = create_model(name)
    cfg = config_from_dict(type(model_config(proto)), config)
    overrides = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}
    with torch.device(device):
        model = create_model(name, **overrides)
    got = model_config(model)
    if got != cfg:
        diff = [f.name for f in dataclasses.fields(cfg) if getattr(got, f.name, None) != getattr(cfg, f.name)]
        raise PackageError(f"preset {name!r} did not reproduce the saved config (fields {diff} differ): "
                           f"its overrides must replace config fields")
    return model


# --------------------------------------------------------------------------------- checksums

def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def local_files(folder: str) -> list[str]:
    out = []
    for root, _dirs, files in os.walk(folder):
        for f in files:
            out.append(os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/"))
    return sorted(out)


def write_checksums(folder: str) -> dict[str, str]:
    """Hash every file under a local package folder into ``checksums.sha256``, which goes last."""
    # Nested files (the tokenizer's package, its own checksums too) are listed: one pass checks all.
    sums = {rel: sha256_file(os.path.join(folder, rel)) for rel in local_files(folder) if rel != CHECKSUMS}
    with open(os.path.join(folder, CHECKSUMS), "w") as f:
        f.writelines(f"{digest}  {rel}\n" for rel, digest in sums.items())
    return sums


def parse_checksums(text: str, where: str) -> dict[str, str]:
    sums = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        rel = rel.lstrip("*")
        if not sep or len(digest) != 64 or not rel or rel.startswith("/") or ".." in rel.split("/"):
            raise PackageError(f"{where} line {n} is not a sha256sum line: {line!r}")
        sums[rel] = digest.lower()
    return sums


def check_safetensors_file(path: str, where: str) -> None:
    """Raise :class:`PackageError` unless ``path`` starts like a safetensors file: an 8-byte
    little-endian header length, then that many bytes of a JSON object. A pickle renamed
    ``model.safetensors`` (its checksum updated to match) used to fail inside safetensors' loader
    with "header too large" and a traceback. ``path`` may be a URL (two small reads)."""
    try:
        size = storage.size(path)
    except FileNotFoundError:
        raise PackageError(f"{where} is missing") from None
    with storage.open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        problem = None
        if n < 2 or n > size - 8:
            problem = (f"its first 8 bytes give a header of {n} bytes in a file of {size}" if n >= 0
                       else f"it has {size} bytes")
        else:
            try:
                header = json.loads(f.read(n))
                if not isinstance(header, dict):
                    problem = "its header is not a JSON object"
            except ValueError:
                problem = "its header is not JSON"
    if problem:
        raise PackageError(f"{where} is not a safetensors file ({problem}; a pickle or another format under "
                           f"that name?): packages hold safetensors weights only, so write it again with "
                           f"`vqscale zoo export` or model_zoo.package.save_package")


def verify_folder(folder: str, url: str = "") -> dict[str, Any]:
    """Check a local package folder against its checksums; return its ``config.json``."""
    where = url or folder
    if not os.path.isfile(os.path.join(folder, CONFIG)):
        raise PackageError(f"{where} is not a model-zoo package: no {CONFIG}")
    path = os.path.join(folder, CHECKSUMS)
    if not os.path.isfile(path):
        raise PackageError(f"{where} is an incomplete package: no {CHECKSUMS} (interrupted write?)")
    with open(path) as f:
        sums = parse_checksums(f.read(), storage.join(where, CHECKSUMS))
    for req in REQUIRED:
        if req not in sums:
            raise PackageError(f"{where}: {CHECKSUMS} does not list {req}")
    for rel, digest in sums.items():
        file = os.path.join(folder, *rel.split("/"))
        if not os.path.isfile(file):
            raise PackageError(f"{where}: missing file {rel} (listed in {CHECKSUMS})")
        if sha256_file(file) != digest:
            raise PackageError(f"{where}: checksum mismatch for {rel} (corrupt or modified file)")
        if rel.rsplit("/", 1)[-1] == WEIGHTS:
            check_safetensors_file(file, f"{where}: {rel}")
    with open(os.path.join(folder, CONFIG)) as f:
        meta = checked_meta(json.load(f), where)
    if meta.get("tokenizer"):
        for req in REQUIRED:   # the nested package is covered by these checksums, so it must be listed
            if f"{meta['tokenizer']}/{req}" not in sums:
                raise PackageError(f"{where}: {CHECKSUMS} does not list {meta['tokenizer']}/{req}")
    return meta


def _upgrade_1_to_2(meta: dict[str, Any]) -> dict[str, Any]:
    """Version 1 named its dependencies only by folder and config: add the version-2 fields (the
    tokenizer's identity is unknown without reading its files, so None; the text encoder is the
    one its config names)."""
    cfg = meta.get("config") or {}
    enc = None
    if isinstance(cfg.get("text_encoder"), str):
        enc = {"name": cfg["text_encoder"], "overrides": cfg.get("text_encoder_overrides") or {},
               "weights": TEXT_ENCODER_WEIGHTS}
    tok = None
    if meta.get("tokenizer"):
        tok = {"name": None, "checksums_sha256": None}
    return {**meta, "schema_version": 2, "tokenizer_model": tok, "text_encoder": enc}


# version v -> the function that turns a version-v config.json into version v + 1
UPGRADES = {1: _upgrade_1_to_2}
TEXT_ENCODER_WEIGHTS = "not in the package: $VQSCALE_CACHE/weights/NAME.safetensors (or a path given to the encoder)"


def checked_meta(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """A package's ``config.json``, checked and upgraded to :data:`SCHEMA_VERSION`."""
    version = meta.get("schema_version")
    if not isinstance(version, int) or version < 1:
        raise PackageError(f"{where}/{CONFIG} has no integer schema_version: not a model-zoo package")
    if version > SCHEMA_VERSION:
        raise PackageError(f"{where} has package schema_version {version}, newer than the {SCHEMA_VERSION} "
                           f"this vqscale reads: upgrade vqscale")
    while meta["schema_version"] < SCHEMA_VERSION:
        meta = UPGRADES[meta["schema_version"]](meta)
    for key in ("name", "kind", "config"):
        if key not in meta:
            raise PackageError(f"{where}/{CONFIG} lacks {key!r}")
    return meta


# ------------------------------------------------------------------------------------- saving

def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())   # shared parameters counted once


def _dtype_name(model: nn.Module) -> str | None:
    # Parameters only: some modules keep float32 statistics buffers in a bf16 model (EMA counts).
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


# Result blocks that describe how a number was made, or list items, rather than being results.
_NOT_SCALARS = {"protocol", "files", "defects", "fits", "per_prompt", "notes", "unlabelled", "seconds",
                "generation_seconds", "step"}


def result_scalars(result: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of an eval result (or any metrics dict), one level of nesting flattened
    with ``/`` (``codebook/usage``); descriptions (protocol, files, ...) and lists are left out."""
    import math

    out: dict[str, float] = {}

    def put(name: str, v: Any) -> None:
        if not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v):
            out[name] = float(v)

    for k, v in result.items():
        if k in _NOT_SCALARS:
            continue
        if isinstance(v, dict):
            for kk, vv in v.items():
                put(f"{k}/{kk}", vv)
        else:
            put(k, v)
    return out


INTENDED_USE = {
    "tokenizer": "Turns images into discrete codes and back: the stage-1 model whose codes a prior is trained on, "
                 "and a reconstruction baseline. Not a generative model by itself.",
    "prior": "Generates image codes that its tokenizer (in `tokenizer/`) decodes into images: research on "
             "autoregressive image generation and representation learning (linear probes). Trained on the data "
             "named below; samples reflect that data's content and biases.",
}


def _card_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v).replace("|", "\\|")


def model_card(meta: dict[str, Any], paper: str = "", tokenizer_meta: dict[str, Any] | None = None) -> str:
    """The package README: a YAML header for Hub tooling, what the model is, how it was trained,
    what was measured (``card``: ``training``, ``metrics``, ``intended_use`` and any other keys),
    and how to load it."""
    kind = meta["kind"]
    tags = ["vqscale", meta["name"], {"tokenizer": "image-tokenizer", "prior": "image-generation"}.get(kind, kind)]
    lines = ["---", "library_name: vqscale", "tags:", *[f"- {t}" for t in tags], "---", "",
             f"# {meta['name']}", "", f"- kind: {kind}",
             f"- parameters: {meta['parameters']:,}", f"- weights: {WEIGHTS} ({meta.get('dtype') or 'mixed'})"]
    if paper:
        lines.append(f"- paper: {paper}")
    if tokenizer_meta is not None:
        lines.append(f"- tokenizer: {tokenizer_meta['name']} (in `{TOKENIZER_DIR}/`, "
                     f"{tokenizer_meta['parameters']:,} parameters)")
    enc = meta.get("text_encoder")
    if enc:
        lines.append(f"- text encoder: {enc['name']} (frozen; {enc['weights']})")
    card = dict(meta.get("card") or {})
    use = card.pop("intended_use", None) or INTENDED_USE.get(kind)
    if "training" in card:          # shown there
        card.pop("step", None)
        card.pop("weights", None)
    for title, key in (("Training", "training"), ("Metrics", "metrics")):
        block = card.pop(key, None)
        if block:
            lines += ["", f"## {title}", "", "| | |", "| --- | --- |"]
            lines += [f"| {k} | {_card_value(v)} |" for k, v in _flatten(block)]
    if card:
        lines += ["", "## Details", "", "| | |", "| --- | --- |"]
        lines += [f"| {k} | {_card_value(v)} |" for k, v in _flatten(card)]
    if use:
        lines += ["", "## Intended use", "", use]
    lines += ["", "## Config", "", "| field | value |", "| --- | --- |"]
    lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in _flatten(meta["config"])]
    lines += ["", "## Use", "", "```python", "from model_zoo import from_pretrained",
              f'model = from_pretrained("{meta["name"]}")   # a zoo name ($VQSCALE_ZOO), folder or URL; verified, '
              f'eval mode', "```", "",
              f"`{CHECKSUMS}` lists the sha256 of every file (`sha256sum -c {CHECKSUMS}`).", ""]
    return "\n".join(lines)


def _write_local(model: nn.Module, folder: str, name: str | None, tokenizer, card_extra) -> dict[str, Any]:
    """Assemble a complete package (checksums included) in a local folder; return its meta."""
    from safetensors.torch import save_model

    name = name or getattr(model, "registry_name", None)
    if not name:
        raise PackageError(f"{type(model).__name__} has no registry name: pass name=")
    try:
        entry = model_entry(name)
    except KeyError as e:
        raise PackageError(f"cannot package as {e.args[0]}") from None
    cfg = model_config(model)
    config = config_to_dict(cfg)
    with torch.device("meta"):
        proto = create_model(name)
    if type(proto) is not type(model):
        raise PackageError(f"{name!r} builds a {type(proto).__name__}, not this {type(model).__name__}: wrong name")
    if config_from_dict(type(cfg), config) != cfg:   # fail at save time, not when someone loads it
        raise PackageError(f"{type(cfg).__name__} does not survive a JSON round trip")
    meta: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "name": name, "kind": entry.kind,
                            "config": config, "dtype": _dtype_name(model), "parameters": param_count(model),
                            "card": dict(card_extra or {}), "tokenizer_model": None,
                            "text_encoder": None}
    if isinstance(getattr(cfg, "text_encoder", None), str):
        meta["text_encoder"] = {"name": cfg.text_encoder,
                                "overrides": config.get("text_encoder_overrides") or {},
                                "weights": TEXT_ENCODER_WEIGHTS}
    tok_meta = None
    if tokenizer is not None:
        if entry.kind != "prior":
            raise PackageError(f"only a prior's package holds a tokenizer ({name} is a {entry.kind})")
        tok_dir = os.path.join(folder, TOKENIZER_DIR)
        if isinstance(tokenizer, (str, os.PathLike)):   # an existing package: verified, copied in
            tok_meta = _fetch_verified(os.fspath(tokenizer), tok_dir)
            tok_model = build_model(tok_meta["name"], tok_meta["config"], "meta")
        else:
            tok_meta, tok_model = _write_local(tokenizer, tok_dir, None, None, None), tokenizer
        if tok_meta["kind"] != "tokenizer":
            raise PackageError(f"the tokenizer given is a {tok_meta['kind']} ({tok_meta['name']})")
        _check_pair(model, tok_model)
        meta["tokenizer"] = TOKENIZER_DIR
        meta["tokenizer_model"] = {"name": tok_meta["name"],
                                   "checksums_sha256": sha256_file(os.path.join(tok_dir, CHECKSUMS))}
    elif entry.kind == "prior":
        raise PackageError("a prior's package holds its tokenizer: pass tokenizer= (a model or a package URL)")
    os.makedirs(folder, exist_ok=True)
    with torch.no_grad():
        save_model(model, os.path.join(folder, WEIGHTS), metadata={"name": name, "format": "pt"},
                   force_contiguous=True)
    with open(os.path.join(folder, CONFIG), "w") as f:
        f.write(json.dumps(meta, indent=2) + "\n")
    with open(os.path.join(folder, CARD), "w") as f:
        f.write(model_card(meta, entry.paper, tok_meta))
    write_checksums(folder)
    return meta


def _check_pair(prior: nn.Module, tokenizer: nn.Module) -> None:
    """The prior must model exactly the tokens this tokenizer emits."""
    for attr in ("codebook_size", "grid_size", "num_tokens"):
        p, t = (getattr(m, attr, None) for m in (prior, tokenizer))
        p, t = (tuple(v) if isinstance(v, (tuple, list)) else v for v in (p, t))
        if p is not None and t is not None and p != t:
            raise PackageError(f"prior and tokenizer disagree on {attr}: {p} vs {t}")


def _publish(folder: str, url: str) -> None:
    """Replace whatever is at ``url`` with the complete local package ``folder``."""
    if not storage.is_remote(url):
        target = os.path.abspath(storage.local_path(url))
        if os.path.abspath(folder) == target:
            return
        old = None
        if os.path.exists(target):
            if os.listdir(target) and not os.path.isfile(os.path.join(target, CONFIG)):
                raise PackageError(f"{url} exists and is not a model-zoo package: refusing to overwrite it")
            old = f"{target}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(folder, target)          # same parent folder: a rename, never a partial package
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return
    existing = set()
    if storage.exists(storage.join(url, CONFIG)):
        fs, path = storage.filesystem(url)
        existing = {p[len(path.rstrip("/")) + 1:] for p in fs.find(path)}
        storage.remove(storage.join(url, CHECKSUMS))   # the old package reads as incomplete from here
    elif storage.listdir(url):
        raise PackageError(f"{url} exists and is not a model-zoo package: refusing to overwrite it")
    files = local_files(folder)
    for rel in files:                                   # nested tokenizer checksums are ordinary files
        if rel != CHECKSUMS:
            with open(os.path.join(folder, rel), "rb") as src, storage.atomic_open(storage.join(url, rel)) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
    for rel in sorted(existing - set(files)):
        storage.remove(storage.join(url, rel))
    with open(os.path.join(folder, CHECKSUMS), "rb") as src:
        storage.write_bytes(storage.join(url, CHECKSUMS), src.read())   # last: the package is now whole


def save_package(model: nn.Module, url: str, name: str | None = None, tokenizer=None,
                 card_extra: dict[str, Any] | None = None) -> str:
    """Write ``model`` as a zoo package at ``url`` (local folder or storage URL); returns ``url``.

    ``name``: the registry name (default: ``model.registry_name``, set by ``create_model``).
    ``tokenizer``: for a prior, its tokenizer (a model, or the URL of its package), stored in
    ``tokenizer/``; its token grid and codebook must match the prior's. ``card_extra``: metrics
    and notes for the model card (also kept in ``config.json`` under ``card``).
    """
    url = os.fspath(url)
    if storage.is_remote(url):
        with tempfile.TemporaryDirectory(prefix="vqscale-pkg-") as tmp:
            folder = os.path.join(tmp, "pkg")
            _write_local(model, folder, name, tokenizer, card_extra)
            _publish(folder, url)
        return url
    target = os.path.abspath(storage.local_path(url))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=parent)
    try:
        _write_local(model, folder, name, tokenizer, card_extra)
        _publish(folder, url)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return url


# ------------------------------------------------------------------------------------ loading

def read_config(url: str) -> dict[str, Any]:
    """``config.json`` of a package (unverified: for listing and resolving)."""
    path = storage.join(os.fspath(url), CONFIG)
    if not storage.exists(path):
        raise PackageError(f"{url} is not a model-zoo package: no {CONFIG}")
    return checked_meta(storage.read_json(path), os.fspath(url))


def package_sha256(url: str) -> str:
    """A package's identity: the sha256 of its ``checksums.sha256`` (which lists the sha256 of every
    other file, so any change to weights, config or card changes it). Code shards record it as
    ``tokenizer.sha256``; a prior's checkpoints record their tokenizer's."""
    path = storage.join(os.fspath(url), CHECKSUMS)
    if not storage.exists(path):
        raise PackageError(f"{url} is not a complete model-zoo package: no {CHECKSUMS}")
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()


def is_package(url: str) -> bool:
    try:
        read_config(url)
        return True
    except (PackageError, ValueError, OSError):
        return False


def _fetch_verified(url: str, dest: str | None = None) -> dict[str, Any]:
    """Verify the package at ``url``; with ``dest``, also leave a verified local copy there."""
    url = os.fspath(url)
    if not storage.is_remote(url) and dest is None:
        return verify_folder(storage.local_path(url), url)
    if not storage.is_remote(url):
        shutil.copytree(storage.local_path(url), dest, dirs_exist_ok=True)
    else:
        if not storage.exists(storage.join(url, CONFIG)):
            raise PackageError(f"{url} is not a model-zoo package: no {CONFIG}")
        if dest is None:
            raise AssertionError("a remote package needs a local destination")
        storage.download_dir(url, dest)
    return verify_folder(dest, url)


def _load_local(folder: str, meta: dict[str, Any], device, dtype) -> nn.Module:
    from safetensors.torch import load_model

    model = build_model(meta["name"], meta["config"], device)
    try:
        load_model(model, os.path.join(folder, WEIGHTS), strict=True, device=str(device))
    except RuntimeError as e:
        raise PackageError(f"the weights of {meta['name']} do not fit its config: {e}") from None
    if dtype is None and meta.get("dtype") and meta["dtype"] != "float32":
        dtype = getattr(torch, meta["dtype"])
    if dtype is not None:
        model = model.to(dtype)
    model.registry_name = meta["name"]
    return model.eval()


def _with_local(url: str, fn):
    """Run ``fn(folder, meta)`` on a verified local copy of the package (no copy if local)."""
    url = os.fspath(url)
    if not storage.is_remote(url):
        folder = storage.local_path(url)
        return fn(folder, verify_folder(folder, url))
    with tempfile.TemporaryDirectory(prefix="vqscale-pkg-") as tmp:
        meta = _fetch_verified(url, tmp)
        return fn(tmp, meta)


def load_package(url: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Verify and load a package: the model in eval mode, with ``registry_name`` set.

    ``dtype`` None keeps the dtype it was saved in. Raises :class:`PackageError` for a missing
    or modified file, an unknown registry name or a package newer than this code.
    """
    return _with_local(url, lambda folder, meta: _load_local(folder, meta, device, dtype))


def load_prior_with_tokenizer(url: str, device: str | torch.device = "cpu",
                              dtype: torch.dtype | None = None) -> tuple[nn.Module, nn.Module]:
    """A prior's package -> ``(prior, tokenizer)``, both verified (one pass over the checksums,
    which list the tokenizer's files too) and in eval mode."""
    def load(folder: str, meta: dict[str, Any]):
        if meta["kind"] != "prior" or not meta.get("tokenizer"):
            raise PackageError(f"{url} holds a {meta['kind']} ({meta['name']}), not a prior with its tokenizer")
        tok_folder = os.path.join(folder, *meta["tokenizer"].split("/"))
        with open(os.path.join(tok_folder, CONFIG)) as f:
            tok_meta = checked_meta(json.load(f), storage.join(url, meta["tokenizer"]))
        prior = _load_local(folder, meta, device, dtype)
        tokenizer = _load_local(tok_folder, tok_meta, device, dtype)
        _check_pair(prior, tokenizer)
        return prior, tokenizer
    return _with_local(url, load)


__all__ = ["SCHEMA_VERSION", "UPGRADES", "checked_meta", "result_scalars", "PackageError", "save_package", "load_package", "load_prior_with_tokenizer",
           "read_config", "is_package", "package_sha256", "build_model", "config_from_dict", "config_to_dict", "model_config",
           "model_card", "verify_folder"]
