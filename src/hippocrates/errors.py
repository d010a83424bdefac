"""One exception type for every problem the user can fix.

The CLI turns a :class:`HippoError` into a single line on stderr and exit code 2,
so bad input never ends in a traceback.
"""

from __future__ import annotations

EXIT_USAGE = 2


class HippoError(Exception):
    """An error caused by the user's input (file, config key, model spec)."""


def where(path: object, line: int | None = None) -> str:
    """Format a location as ``path:line`` (or just ``path``) for error messages."""
    return f"{path}:{line}" if line else str(path)
