"""Reading torch files without unpickling code: every ``torch.load`` vqscale makes, and every one
DeepSpeed makes while vqscale resumes, converts or consolidates a checkpoint.

A run directory may come from object storage or from somebody else (``init_from``, an export of
a colleague's run), so its ``.pt`` files are untrusted input. torch's ``weights_only`` unpickler
builds tensors, containers and plain values and refuses any other global. DeepSpeed 0.19's
checkpoints hold three small classes of its own besides tensors (the ZeRO stage enum, the loss
scaler and the fragment address of a parameter in a flat buffer); they are the whole allowlist
(:func:`pretrain.runtime.deepspeed_globals`, as only that module imports DeepSpeed), found by ``torch.serialization.get_unsafe_globals_in_checkpoint`` over every checkpoint file the
test suite writes (ZeRO-0/1/2/3, bf16, GAN pairs, universal folders).

DeepSpeed itself calls ``torch.load(..., weights_only=False)``. ``weights_only_loads()`` turns
those calls into safe ones for the duration of a block, so a resume or an export never runs code
from a checkpoint; a file that needs another global fails with torch's message naming it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import threading
from typing import Any, Iterator

__all__ = ["UnsafeCheckpointError", "load", "weights_only_loads"]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A torch file holds a Python object other than tensors, plain values and DeepSpeed's three
    classes: loading it could run code, so it is refused."""


_torch_load = None          # the real torch.load while weights_only_loads() has replaced it
_lock = threading.RLock()
_depth = 0


def load(f, map_location: Any = None, **kwargs) -> Any:
    """``torch.load`` with ``weights_only=True`` and DeepSpeed's classes allowed; a request for
    ``weights_only=False`` is overridden, not honoured."""
    import torch        # here, not at the top: the CLI imports this module for its error class

    from . import runtime       # lazy, as torch: runtime (the one module that imports DeepSpeed) names its classes

    kwargs.pop("weights_only", None)
    real = _torch_load or torch.load
    try:
        with torch.serialization.safe_globals(runtime.deepspeed_globals()):
            return real(f, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        name = os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "a torch file")
        text = str(e)
        found = re.search(r"Unsupported global: GLOBAL [\w.]+", text)
        detail = found.group(0) if found else (text.splitlines() or [type(e).__name__])[0]
        raise UnsafeCheckpointError(
            f"{name} holds a Python object that is not tensors or plain values, refused because "
            f"loading it could run code ({detail})") from e


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block, ``torch.load`` anywhere (DeepSpeed's calls included) is ``load``."""
    import torch

    global _depth, _torch_load
    with _lock:
        if _depth == 0:
            _torch_load, torch.load = torch.load, load
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.load, _torch_load = _torch_load, None
