"""Console output helpers: status lines on stderr and tqdm bars that stay quiet when not a TTY."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def status(message: str) -> None:
    """A one-line status message on stderr (stdout is kept for results)."""
    print(f"[hippo] {message}", file=sys.stderr, flush=True)


def progress(items: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Wrap an iterable in a tqdm progress bar on stderr."""
    from tqdm.auto import tqdm

    yield from tqdm(
        items, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False
    )
