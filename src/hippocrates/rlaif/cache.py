"""A persistent on-disk cache of judge answers (sqlite), so a rerun never asks a paid API twice.

The key covers everything that could change an answer: the judge (backend, model, base URL),
the rubric (version and content hash), the question and both responses in their shown order, and
the verdict's source (``logprobs`` or ``text``: different prompts, different answers). A text
verdict is stored as the label and the reply; a log-prob verdict as the two log-probabilities, so
the position-bias correction is computed afresh over each run's items. Every answer is committed
the moment it arrives, so a crash loses at most the requests in flight. Only successful answers
are stored: a failure is retried on the next run.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from hippocrates.rlaif.judges import JudgeItem, Rubric, Source, Verdict

SCHEMA = """CREATE TABLE IF NOT EXISTS verdicts (
    key TEXT PRIMARY KEY, judge TEXT NOT NULL, rubric_version TEXT NOT NULL,
    verdict TEXT NOT NULL, reason TEXT NOT NULL, raw TEXT, created REAL NOT NULL,
    source TEXT NOT NULL DEFAULT 'text', scores TEXT)"""


def cache_key(judge: str, rubric: Rubric, item: JudgeItem, source: Source = "text") -> str:
    payload = [judge, rubric.version, rubric.sha256, item.prompt, item.response_a, item.response_b, source]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


class JudgeCache:
    """Thread-safe get/put of verdicts by key; each put is its own committed transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(verdicts)")}
        if "source" not in columns:  # a cache written before log-prob verdicts
            self._db.execute("ALTER TABLE verdicts ADD COLUMN source TEXT NOT NULL DEFAULT 'text'")
            self._db.execute("ALTER TABLE verdicts ADD COLUMN scores TEXT")
        self._db.commit()

    def get(self, key: str) -> Verdict | None:
        """The stored answer: a text verdict, or for log-probs a Verdict whose ``scores`` hold them."""
        with self._lock:
            row = self._db.execute(
                "SELECT verdict, reason, raw, source, scores FROM verdicts WHERE key = ?", (key,)
            ).fetchone()
        if not row:
            return None
        scores = json.loads(row[4]) if row[4] else {}
        return Verdict(row[0], reason=row[1], raw=row[2], cached=True, scores=scores, source=row[3])

    def put(self, key: str, judge: str, rubric_version: str, verdict: Verdict) -> None:
        if not verdict.ok:
            return
        scores = json.dumps(verdict.scores) if verdict.scores else None
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, judge, rubric_version, verdict.verdict, verdict.reason, verdict.raw, time.time(),
                 verdict.source, scores),
            )  # fmt: skip
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
