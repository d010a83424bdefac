"""Reading and writing files: one text reader, one set of atomic writers, one error style.

Every problem a user's file or disk can cause ends as a :class:`HippoError` naming the place:
``file:line: not UTF-8 text (byte 0xff at offset 812)``, ``file:line: malformed JSON (...)``,
``runs/x: no space left on device``. Text is UTF-8; a leading byte-order mark is dropped.
Writers go through a temp file or folder that replaces the target only when complete, so a
crash, a full disk or a read-only folder never leaves something half-written that looks done.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hippocrates.errors import HippoError

BOM = "\ufeff"
REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOENT: "not found",
}


def os_error(exc: OSError, path: str | Path | None = None) -> HippoError:
    """One line for an operating-system failure, naming the path it concerned."""
    where = path if path is not None else (exc.filename or "?")
    reason = REASONS.get(exc.errno or -1) or (exc.strerror or str(exc)).lower()
    return HippoError(f"{where}: {reason}")


def full_disk(exc: BaseException) -> bool:
    """Libraries report a full disk in their own exception types (torch, safetensors)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc).lower()
    return "no space left" in text or "os error 28" in text or "file write failed" in text


# ------------------------------------------------------------------------------------------ reading


def read_bytes(path: str | Path) -> bytes:
    p = Path(path)
    if p.is_dir():
        raise HippoError(f"{p}: is a folder, not a file")
    if not p.is_file():
        raise HippoError(f"{p}: file not found")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise os_error(exc, p) from None


def decode(data: bytes, path: str | Path, first_line: int = 1, offset: int = 0) -> str:
    """``data`` as UTF-8 text; invalid bytes name the line and byte offset."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        raise HippoError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {offset + exc.start}); "
            "convert the file to UTF-8"
        ) from None
    return text[1:] if first_line == 1 and text.startswith(BOM) else text


def read_text(path: str | Path) -> str:
    """A whole text file (UTF-8, BOM dropped)."""
    return decode(read_bytes(path), path)


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` of each line, streamed, with its line ending; invalid bytes name the line."""
    p = Path(path)
    if p.is_dir():
        raise HippoError(f"{p}: is a folder, not a file")
    if not p.is_file():
        raise HippoError(f"{p}: file not found")
    try:
        with open(p, "rb") as fh:
            offset = 0
            for number, raw in enumerate(fh, 1):
                yield number, decode(raw, p, number, offset)
                offset += len(raw)
    except OSError as exc:
        raise os_error(exc, p) from None


def _json_error(exc: json.JSONDecodeError) -> str:
    return f"malformed JSON ({exc.msg}, column {exc.colno})"


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line; a bad line raises ``file:line: ...``."""
    for number, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HippoError(f"{path}:{number}: {_json_error(exc)}") from None
        if not isinstance(record, dict):
            raise HippoError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL file (see :func:`iter_jsonl`)."""
    return [record for _, record in iter_jsonl(path)]


def parse_json(text: str, path: str | Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise HippoError(f"{path}:{exc.lineno}: {_json_error(exc)}") from None


def read_json(path: str | Path) -> Any:
    """A whole JSON document; a syntax error or a bad byte names the file and line."""
    return parse_json(read_text(path), path)


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON document that must be an object (manifests, results files)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise HippoError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def iter_csv(path: str | Path, *, delimiter: str = ",", header: bool = True) -> Iterator[tuple[int, dict]]:
    """``(line, row)`` of a CSV/TSV file; with ``header=False`` the keys are column indices as strings."""
    lines = (text for _, text in iter_lines(path))
    first = next(lines, None)
    if first is None:
        return
    reader = csv.reader(_chain_first(first.removeprefix(BOM), lines), delimiter=delimiter)
    try:
        names = next(reader, None) if header else None
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            keys = names if names is not None else [str(i) for i in range(len(row))]
            yield reader.line_num, dict(zip(keys, row, strict=False))
    except csv.Error as exc:
        raise HippoError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def _chain_first(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def require_fields(record: dict[str, Any], fields: list[str], path: str | Path, line: int) -> None:
    """Raise ``file:line: missing field 'x'`` if any field is absent or empty."""
    for field in fields:
        value = record.get(field)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise HippoError(
                f"{path}:{line}: missing field '{field}' (have: {', '.join(sorted(record)) or 'none'})"
            )


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (for manifests and change detection)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        raise os_error(exc, path) from None
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ writing


def check_writable(path: str | Path) -> Path:
    """Make sure ``path`` is (or can become) a folder we can write in, before any long work.

    Writes and removes a probe file in the folder, or in its nearest existing parent when it does
    not exist yet (nothing is created), so a read-only mount, a missing permission or a path
    through a file is one line now rather than a traceback hours later.
    """
    p = Path(path)
    existing = next((q for q in [p, *p.parents] if q.exists()), None)
    if existing is None:
        raise HippoError(f"{p}: no existing parent folder")
    if not existing.is_dir():
        raise HippoError(f"{existing}: is a file, so {p} cannot be a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise os_error(exc, p) from None
    return p


def require_space(path: str | Path, nbytes: int, what: str = "the output") -> None:
    """Refuse to start writing ``nbytes`` (plus a 5% margin) where the disk holds less."""
    p = Path(path)
    existing = next((q for q in [p, *p.parents] if q.exists()), Path("."))
    free = shutil.disk_usage(existing).free
    if free < nbytes * 1.05:
        raise HippoError(
            f"{p}: not enough disk space for {what} ({nbytes / 2**20:,.0f} MB needed, {free / 2**20:,.0f} MB free)"
        )


def _write_failure(exc: BaseException, target: Path) -> HippoError | None:
    if isinstance(exc, HippoError):
        return None
    if full_disk(exc):
        return HippoError(f"{target}: no space left on device; nothing was written")
    if isinstance(exc, OSError):
        return os_error(exc, target)
    return None


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[str]:
    """Yield a temp path beside ``path``; it replaces ``path`` only if the block succeeds."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(fd)
        os.chmod(tmp, _default_mode(directory=False))
    except OSError as exc:
        raise os_error(exc, target) from None
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException as exc:
        mapped = _write_failure(exc, target)
        if mapped is not None:
            raise mapped from None
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; it becomes ``path`` only if the block succeeds.

    An existing ``path`` is replaced only after the new one is complete, so a crash never
    leaves a half-written directory that looks finished.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        os.chmod(tmp, _default_mode(directory=True))
    except OSError as exc:
        raise os_error(exc, target) from None
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException as exc:
        mapped = _write_failure(exc, target)
        if mapped is not None:
            raise mapped from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str, mode: int | None = None) -> None:
    """Write a text file atomically (``mode``: permissions, e.g. 0o644 for files meant to be shared)."""
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
        if mode is not None:
            os.chmod(tmp, mode)


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Write records as JSONL atomically (temp file + rename)."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_json(path: str | Path, data: Any) -> None:
    """Write a JSON document atomically."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def _default_mode(directory: bool) -> int:
    """Permissions a normal open()/mkdir() would give, honouring the umask (mkstemp uses 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask
