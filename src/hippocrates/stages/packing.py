"""Pure-Python packing helpers (no torch import, so ``hippo sft --help`` stays instant).

Samples are packed into rows of at most ``max_seq_len`` tokens by best-fit decreasing; each row
keeps its samples' lengths so the collator can restart ``position_ids`` at every sample.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Any

IGNORE = -100


def pack_bfd(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of sample indices into rows of at most ``capacity`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), kept sorted
    for i in order:
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot < len(free):
            room, b = free.pop(slot)
            bins[b].append(i)
            room -= lengths[i]
        else:
            bins.append([i])
            b, room = len(bins) - 1, capacity - lengths[i]
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def make_rows(samples: Sequence[dict[str, list[int]]], capacity: int, packing: bool) -> list[dict[str, Any]]:
    """Training rows: packed samples (with their lengths) or one sample per row."""
    groups = (
        pack_bfd([len(s["input_ids"]) for s in samples], capacity)
        if packing
        else [[i] for i in range(len(samples))]
    )
    rows = []
    for group in groups:
        parts = [samples[i] for i in group]
        rows.append(
            {
                "input_ids": [t for p in parts for t in p["input_ids"]],
                "labels": [t for p in parts for t in p["labels"]],
                "seq_lengths": [len(p["input_ids"]) for p in parts],
            }
        )
    return rows


def count_tokens(rows: Iterable[dict[str, Any]]) -> tuple[int, int]:
    """(all tokens, supervised tokens) in rows, for throughput and metrics."""
    total = supervised = 0
    for row in rows:
        total += len(row["input_ids"])
        supervised += sum(1 for t in row["labels"][1:] if t != IGNORE)
    return total, supervised
