"""Reading and writing data files with errors that name the file and line, and atomic outputs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hippocrates.errors import HippoError


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line; a bad line raises ``file:line: ...``."""
    p = Path(path)
    if not p.is_file():
        raise HippoError(f"{p}: file not found")
    with open(p, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HippoError(f"{p}:{number}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise HippoError(f"{p}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL file (see :func:`iter_jsonl`)."""
    return [record for _, record in iter_jsonl(path)]


def read_json(path: str | Path) -> Any:
    """A whole JSON document; a syntax error names the file and line."""
    p = Path(path)
    if not p.is_file():
        raise HippoError(f"{p}: file not found")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HippoError(f"{p}:{exc.lineno}: malformed JSON ({exc.msg})") from None


def require_fields(record: dict[str, Any], fields: list[str], path: str | Path, line: int) -> None:
    """Raise ``file:line: missing field 'x'`` if any field is absent or empty."""
    for field in fields:
        value = record.get(field)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise HippoError(
                f"{path}:{line}: missing field '{field}' (have: {', '.join(sorted(record)) or 'none'})"
            )


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Write records as JSONL atomically (temp file + rename)."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_json(path: str | Path, data: Any) -> None:
    """Write a JSON document atomically."""
    with atomic_file(path) as tmp:
        Path(tmp).write_text(
            json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8"
        )


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[str]:
    """Yield a temp path beside ``path``; it replaces ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, _default_mode(directory=False))
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; it becomes ``path`` only if the block succeeds.

    An existing ``path`` is replaced only after the new one is complete, so a crash never
    leaves a half-written directory that looks finished.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, _default_mode(directory=True))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _default_mode(directory: bool) -> int:
    """Permissions a normal open()/mkdir() would give, honouring the umask (mkstemp uses 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (for manifests and change detection)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
