"""One writer per output folder: a lock file that a second run on the same folder runs into.

``hold(folder)`` takes an exclusive ``flock`` on ``folder/.hippo.lock`` and writes the holder's pid,
host, command and start time into it. A second ``hippo`` command on the same folder refuses at
once, naming that pid. The kernel releases the lock when its process dies however it dies
(``kill -9`` included), so a lock can never go stale; the file of a dead holder is recognised
and reported ("ended without releasing") when the next run takes over. Locks are re-entrant
within one process (the pipeline calls the stages, the stages call eval), and under a
distributed launch only rank 0 takes them: the other ranks belong to the same job.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from hippocrates.data.io import os_error
from hippocrates.errors import HippoError
from hippocrates.progress import status

LOCK_NAME = ".hippo.lock"
_held: dict[Path, int] = {}  # folder -> open file descriptor, for re-entrance in this process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(text: str) -> dict:
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict) -> str:
    command = " ".join(info.get("command") or []) or "?"
    host = info.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"pid {info.get('pid', '?')}{where} ({command}, since {info.get('started', '?')})"


def _is_worker_rank() -> bool:
    from hippocrates import accel

    return accel.world_size() > 1 and not accel.is_main_process()


def _acquire(key: Path, folder: str | Path) -> int:
    """An open, exclusively locked descriptor of the folder's lock file (retrying if it was replaced)."""
    for _ in range(10):
        try:
            key.mkdir(parents=True, exist_ok=True)
            fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise os_error(exc, key) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(os.pread(fd, 65536, 0).decode("utf-8", "replace"))
            os.close(fd)
            raise HippoError(
                f"{folder}: in use by another run, {_describe(info)}; wait for it to finish or stop it"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(key / LOCK_NAME).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder finished and removed the file between our open and our lock
    raise HippoError(f"{folder}: could not take the lock {key / LOCK_NAME}")


@contextlib.contextmanager
def hold(folder: str | Path) -> Iterator[None]:
    """Hold the folder's lock for the block; refuse with one line when another process holds it."""
    key = Path(folder).resolve()
    if key.exists() and not key.is_dir():
        raise HippoError(f"{folder}: is a file, not a folder")
    if key in _held or _is_worker_rank():
        yield
        return
    fd = _acquire(key, folder)
    previous = _holder(os.pread(fd, 65536, 0).decode("utf-8", "replace"))
    if previous.get("pid") and previous.get("host") == socket.gethostname() and not _alive(previous["pid"]):
        status(f"{folder}: the previous run, {_describe(previous)}, ended without finishing; taking over")
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": ["hippo", *sys.argv[1:]] if sys.argv and sys.argv[0].endswith("hippo") else sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _held[key] = fd
    try:
        yield
    finally:
        _held.pop(key, None)
        with contextlib.suppress(OSError):
            os.unlink(key / LOCK_NAME)  # a clean finish leaves no lock file behind
        os.close(fd)  # closing releases the flock
