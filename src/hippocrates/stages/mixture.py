"""Weighted data mixtures.

``Source.weight`` is a relative sampling weight. With N records available in total, source i
contributes ``round(N * w_i / sum(w))`` examples: drawn without replacement when it has enough
records, and as whole passes plus a random remainder when it is up-sampled. Equal weights on
equal-sized sources therefore reproduce the data exactly once; a weight of 2 doubles a source's
share. Everything is seeded, so a resumed run sees the same mixture.

Streamed sources cannot be counted in advance, so they are interleaved instead: each next record
comes from a source drawn with probability proportional to its weight, until all are exhausted.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def mixture_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """How many examples each source contributes (see module docstring)."""
    total, weight_sum = sum(sizes), sum(w for n, w in zip(sizes, weights, strict=True) if n > 0)
    if total == 0 or weight_sum == 0:
        return [0 for _ in sizes]
    return [round(total * w / weight_sum) if n > 0 else 0 for n, w in zip(sizes, weights, strict=True)]


def sample_mixture(pools: Sequence[Sequence[T]], weights: Sequence[float], seed: int) -> list[T]:
    """Draw the weighted mixture from in-memory pools and shuffle it, deterministically for a seed."""
    rng = random.Random(seed)
    out: list[T] = []
    for pool, count in zip(pools, mixture_counts([len(p) for p in pools], weights), strict=True):
        passes, rest = divmod(count, len(pool)) if pool else (0, 0)
        out.extend(item for _ in range(passes) for item in pool)
        out.extend(rng.sample(list(pool), rest))
    rng.shuffle(out)
    return out


def interleave(streams: Sequence[Iterator[T]], weights: Sequence[float], seed: int) -> Iterator[T]:
    """Lazily interleave iterators by weight until every one is exhausted (memory stays constant)."""
    rng = random.Random(seed)
    live = [(iter(s), w) for s, w in zip(streams, weights, strict=True)]
    while live:
        index = rng.choices(range(len(live)), weights=[w for _, w in live])[0]
        try:
            yield next(live[index][0])
        except StopIteration:
            live.pop(index)
