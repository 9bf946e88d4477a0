"""What every benchmark script writes: its result as JSON, with when, where and how it ran."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any, Callable, Iterable


def write_json(path: str, result: dict[str, Any]) -> dict[str, Any]:
    """Add the date, torch version, host and command line to ``result``; write it to ``path``."""
    import torch

    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
              "host": platform.node(), "cpu_count": os.cpu_count(), "command": " ".join(sys.argv), **result}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return result


def seed_ranges(rows: Iterable[dict], group: Callable[[dict], Any], fields: Callable[[dict], dict],
                metrics: Iterable[str]) -> list[dict]:
    """One summary per group of rows (a variant's seeds): ``fields(row)`` of its first row, the
    number of rows as ``seeds`` and the ``(min, max)`` of each metric over them."""
    metrics = tuple(metrics)
    out: dict[Any, dict] = {}
    for r in rows:
        s = out.setdefault(group(r), {**fields(r), "seeds": 0})
        s["seeds"] += 1
        for k in metrics:
            lo, hi = s.get(k, (r[k], r[k]))
            s[k] = (min(lo, r[k]), max(hi, r[k]))
    return list(out.values())
