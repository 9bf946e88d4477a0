"""Where an evaluation's result goes: its JSON file, and the same numbers and pictures in TensorBoard.

Every eval ends in :func:`write_result`. It records the training step of the evaluated checkpoint
(the step a run directory or step folder was exported at; None for a package made by hand) and
logs the result's scalars (``eval/<task>/<name>``, nested blocks as ``codebook/usage`` or
``layers/3``) and its PNG plots and grids at that step into ``tb/`` next to the JSON. A job array
over the checkpoints of one run (``vqscale submit --sweep``) writing its results into one folder
so draws one curve per metric against training steps, next to the training curves
(``tensorboard --logdir RUN``). Each process writes its own event file, so concurrent jobs
into one folder do not clash.
"""

from __future__ import annotations

import io
from typing import Any, Mapping

import numpy as np

from data_pipeline import storage
from model_zoo.package import read_config, result_scalars

__all__ = ["checkpoint_step", "scalars", "sibling_url", "tensorboard_dir", "write_result"]

def checkpoint_step(package: str | None) -> int | None:
    """The training step a package was exported from (its card's ``step``), else None."""
    if package is None:
        return None
    step = (read_config(package).get("card") or {}).get("step")
    return None if step is None else int(step)


def scalars(result: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a result, one level of nesting flattened with ``/`` (the same
    reading the model card of an exported package takes of these files)."""
    return result_scalars(dict(result))


def sibling_url(out_url: str, suffix: str) -> str:
    """``.../results.json`` -> ``.../results{suffix}``: files written next to the JSON."""
    stem = out_url[:-5] if out_url.endswith(".json") else out_url
    return stem + suffix


def tensorboard_dir(out_url: str) -> str:
    return storage.join(storage.dirname(out_url), "tb")


def _task(result: Mapping[str, Any]) -> str:
    return str(result.get("task") or (result.get("protocol") or {}).get("task") or "eval")


def _log_tensorboard(result: Mapping[str, Any], files: Mapping[str, str], tb_url: str, step: int) -> None:
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    task = _task(result)
    with storage.StagedDir(tb_url) as stage:
        writer = SummaryWriter(log_dir=stage.path)
        try:
            for name, value in scalars(result).items():
                writer.add_scalar(f"eval/{task}/{name}", value, step)
            for name, url in files.items():
                if url.endswith(".png"):
                    img = np.asarray(Image.open(io.BytesIO(storage.read_bytes(url))).convert("RGB"))
                    writer.add_image(f"eval/{task}/{name}", img, step, dataformats="HWC")
        finally:
            writer.close()


def write_result(result: dict[str, Any], out_url: str, files: Mapping[str, str] | None = None,
                 package: str | None = None, tensorboard: bool = True) -> dict[str, Any]:
    """Add ``step`` and ``files`` (the plots already written, plus ``json`` and ``tensorboard``) to
    ``result``, log it to TensorBoard and write it as JSON at ``out_url``; returns ``result``."""
    step = checkpoint_step(package)
    result["step"] = step
    files = {**(files or {}), "json": out_url}
    if tensorboard:
        files["tensorboard"] = tensorboard_dir(out_url)
        _log_tensorboard(result, files, files["tensorboard"], step or 0)
    result["files"] = files
    storage.write_json(out_url, result)
    return result
