"""Bad input, named and counted.

Every reader in the pipeline (the training stream, ``vqscale data inspect``, the tokenize job)
reports a skipped sample or shard through one vocabulary of reasons, so counts from different
tools add up. Nothing bad is dropped silently: it is counted here, logged with its shard and key,
and the first examples are kept for the summary.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Iterable

log = logging.getLogger("vqscale.data")

# Reasons a sample or shard is skipped. A defect is bad input; a filtered sample is good input
# that a configured filter rejected, and is counted apart.
MISSING_IMAGE = "missing_image"          # a sample (key group) with no image file
EMPTY_IMAGE = "empty_image"              # a zero-byte image file
CORRUPT_IMAGE = "corrupt_image"          # the image bytes do not decode
CORRUPT_METADATA = "corrupt_metadata"    # KEY.json / KEY.cls that does not parse
MISSING_CODES = "missing_codes"          # a code-shard sample without KEY.codes.npy
CORRUPT_CODES = "corrupt_codes"          # codes that do not load or have the wrong shape
TRUNCATED_SHARD = "truncated_shard"      # a tar that ends in the middle of a member
UNREADABLE_SHARD = "unreadable_shard"    # a shard that cannot be opened or is not a tar
IO_ERROR = "io_error"                    # a read failed mid-stream after all retries
CHECKSUM_MISMATCH = "checksum_mismatch"  # a shard whose bytes are not those the manifest's sha256 names

REASONS = (MISSING_IMAGE, EMPTY_IMAGE, CORRUPT_IMAGE, CORRUPT_METADATA, MISSING_CODES,
           CORRUPT_CODES, TRUNCATED_SHARD, UNREADABLE_SHARD, IO_ERROR, CHECKSUM_MISMATCH)

MAX_EXAMPLES = 100


class SampleDefect(Exception):
    """Raised by a decoder for a sample that must be skipped and counted as a defect."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SampleFiltered(Exception):
    """Raised by a decoder for a good sample that a configured filter rejects."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DefectLog:
    """Counts defects by reason, keeps the first examples, logs each with shard and key.

    The first ``log_first`` defects are logged at WARNING, the rest at DEBUG, so a dataset with
    a million broken images does not flood the training log but nothing is invisible.
    """

    def __init__(self, log_first: int = 20):
        self.by_reason: Counter[str] = Counter()
        self.examples: list[dict[str, str]] = []
        self.filtered: Counter[str] = Counter()
        self.lost_samples = 0  # samples a manifest promised that a broken shard did not deliver
        self._log_first = log_first

    def defect(self, reason: str, shard: str, key: str = "", detail: str = "") -> None:
        self.by_reason[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            ex = {"shard": shard, "key": key, "reason": reason}
            if detail:
                ex["detail"] = detail[:200]
            self.examples.append(ex)
        level = logging.WARNING if self.total <= self._log_first else logging.DEBUG
        log.log(level, "skipped %s in %s%s%s", reason, shard, f" key={key}" if key else "",
                f": {detail[:200]}" if detail else "")

    def filter(self, reason: str) -> None:
        self.filtered[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def summary(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": dict(sorted(self.by_reason.items())),
                "examples": list(self.examples)}

    def to_state(self) -> dict[str, Any]:
        return {"by_reason": dict(self.by_reason), "examples": list(self.examples),
                "filtered": dict(self.filtered), "lost_samples": self.lost_samples}

    def take_delta(self) -> dict[str, Any]:
        """Return what was counted since the last call and reset (worker → main process)."""
        out = self.to_state()
        self.by_reason.clear()
        self.examples.clear()
        self.filtered.clear()
        self.lost_samples = 0
        return out

    def add_state(self, state: dict[str, Any]) -> None:
        self.by_reason.update(state.get("by_reason", {}))
        self.filtered.update(state.get("filtered", {}))
        self.lost_samples += int(state.get("lost_samples", 0))
        room = MAX_EXAMPLES - len(self.examples)
        if room > 0:
            self.examples.extend(state.get("examples", [])[:room])

    @classmethod
    def merged(cls, states: Iterable[dict[str, Any]]) -> "DefectLog":
        out = cls()
        for s in states:
            out.add_state(s)
        return out
