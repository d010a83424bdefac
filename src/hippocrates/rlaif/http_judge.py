"""A judge behind any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp, OpenAI, hippo serve).

Requests run on a small thread pool (``concurrency``) with one shared httpx client. A 429, 5xx,
timeout or dropped connection is retried with exponential backoff (honouring ``Retry-After``);
other 4xx errors and replies without a ``Verdict:`` line fail at once, since asking again at
temperature 0 would give the same answer. Each verdict goes into the sqlite cache as it arrives
(from the worker thread), so a rerun after a crash asks only what was never answered. The API
key is read from the env var the recipe names and is only ever put in the Authorization header,
never in logs or outputs.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from hippocrates.errors import HippoError
from hippocrates.progress import progress
from hippocrates.rlaif.cache import JudgeCache, cache_key
from hippocrates.rlaif.judges import JudgeItem, Rubric, Verdict, judge_prompt, parse_verdict

MAX_BACKOFF_S = 60.0


def _retryable(code: int) -> bool:
    return code in (408, 409, 425, 429) or code >= 500


class HTTPJudge:
    """Judge pairs through an OpenAI-compatible chat-completions API, with retries and a cache."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        rubric: Rubric,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        concurrency: int = 4,
        backoff_s: float = 1.0,
        max_tokens: int = 128,
        cache: JudgeCache | None = None,
    ) -> None:
        self.base_url, self.model, self.rubric = base_url.rstrip("/"), model, rubric
        self.name = f"http:{model}@{self.base_url}"
        self.timeout_s, self.max_retries, self.concurrency = timeout_s, max_retries, concurrency
        self.backoff_s, self.max_tokens, self.cache = backoff_s, max_tokens, cache
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.stats: dict[str, Any] = {
            "items": 0,
            "requests": 0,
            "retries": 0,
            "cache_hits": 0,
            "asked": 0,
            "answered": 0,
            "failed": 0,
            "errors": {},
        }

    def __repr__(self) -> str:  # never shows the key
        return f"HTTPJudge({self.name!r})"

    @classmethod
    def from_config(cls, config: Any, *, rubric: Rubric, cache_path: Path | None) -> HTTPJudge:
        api_key = None
        if config.api_key_env:
            api_key = os.environ.get(config.api_key_env)
            if not api_key:
                raise HippoError(f"judge.api_key_env: environment variable {config.api_key_env} is not set")
        return cls(
            config.base_url,
            config.model,
            rubric=rubric,
            api_key=api_key,
            timeout_s=config.timeout_s,
            max_retries=config.max_retries,
            concurrency=config.concurrency,
            backoff_s=config.backoff_s,
            max_tokens=config.max_tokens,
            cache=JudgeCache(cache_path) if cache_path else None,
        )

    def judge_pairs(self, items: list[JudgeItem]) -> list[Verdict]:
        """One verdict per item; cached ones are not asked, identical items are asked once."""
        import httpx

        results: list[Verdict | None] = [None] * len(items)
        waiting: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            key = cache_key(self.name, self.rubric, item)
            hit = self.cache.get(key) if self.cache is not None and key not in waiting else None
            if hit:
                results[i] = hit
                self.stats["cache_hits"] += 1
            else:
                waiting.setdefault(key, []).append(i)
        self.stats["items"] += len(items)
        if waiting:
            limits = httpx.Limits(
                max_connections=self.concurrency, max_keepalive_connections=self.concurrency
            )
            with httpx.Client(timeout=self.timeout_s, limits=limits, headers=self._headers) as client:
                pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="judge")
                try:
                    futures = {
                        pool.submit(self._ask_and_save, client, items[idx[0]], key): key
                        for key, idx in waiting.items()
                    }
                    for future in progress(as_completed(futures), desc="judging (http)", total=len(futures)):
                        key = futures[future]
                        verdict, attempts = future.result()
                        self._count(verdict, attempts)
                        for i in waiting[key]:
                            results[i] = verdict
                finally:  # on a crash or Ctrl-C start nothing new; requests in flight finish and are saved
                    pool.shutdown(wait=True, cancel_futures=True)
        return [r for r in results if r is not None]

    def _count(self, verdict: Verdict, attempts: int) -> None:
        self.stats["asked"] += 1
        self.stats["requests"] += attempts
        self.stats["retries"] += max(attempts - 1, 0)
        if verdict.ok:
            self.stats["answered"] += 1
        else:
            self.stats["failed"] += 1
            kind = (verdict.error or "error").split(":")[0]
            self.stats["errors"][kind] = self.stats["errors"].get(kind, 0) + 1

    def _ask_and_save(self, client: Any, item: JudgeItem, key: str) -> tuple[Verdict, int]:
        """Ask, then commit the answer to the cache from this worker thread, the moment it arrives,
        so a crash of the main thread loses no answer that was received."""
        verdict, attempts = self._ask(client, item)
        if self.cache is not None:
            self.cache.put(key, self.name, self.rubric.version, verdict)
        return verdict, attempts

    def _ask(self, client: Any, item: JudgeItem) -> tuple[Verdict, int]:
        """Ask once, retrying transient failures; returns the verdict and the number of HTTP attempts."""
        import httpx

        body = {
            "model": self.model,
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "messages": [{"role": "user", "content": judge_prompt(self.rubric, item)}],
        }
        error, retry_after = "no attempt", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self._delay(attempt, retry_after))
                retry_after = None
            try:
                response = client.post(f"{self.base_url}/chat/completions", json=body)
            except httpx.TimeoutException:
                error = f"timeout: no answer within {self.timeout_s:g} s"
                continue
            except httpx.TransportError as exc:
                error = f"connection error: {type(exc).__name__}"
                continue
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {_error_message(response)}"
                retry_after = _seconds(response.headers.get("retry-after"))
                if _retryable(response.status_code):
                    continue
                return Verdict(None, error=error), attempt + 1
            return self._read(response), attempt + 1
        return Verdict(None, error=error), self.max_retries + 1

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter; a server's Retry-After wins when it asks for longer."""
        delay = self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random() / 2)
        return min(max(delay, retry_after or 0.0), MAX_BACKOFF_S)

    @staticmethod
    def _read(response: Any) -> Verdict:
        try:
            text = response.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            return Verdict(None, error="malformed response: no choices[0].message.content")
        label, reason = parse_verdict(text)
        if label is None:
            return Verdict(None, raw=text, error="unparsable verdict: no 'Verdict: A|B|tie' in the reply")
        return Verdict(label, reason=reason, raw=text)


def _seconds(value: str | None) -> float | None:
    """A numeric Retry-After header in seconds (the HTTP-date form is ignored)."""
    try:
        return max(float(value), 0.0) if value else None
    except ValueError:
        return None


def _error_message(response: Any) -> str:
    """The server's error message (OpenAI style ``{"error": {"message"}}``), cut to one short line."""
    try:
        data = response.json()
        err = data.get("error", data) if isinstance(data, dict) else data
        message = err.get("message", err) if isinstance(err, dict) else err
    except ValueError:
        message = response.text
    return " ".join(str(message).split())[:200] or response.reason_phrase
