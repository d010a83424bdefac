"""A judge behind any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp, OpenAI,
``hippo serve``), through the official ``openai`` client.

Where the verdict comes from (``verdict``):

* ``logprobs``: the conversation of :func:`~.judges.verdict_messages` (the judge prompt, then the
  assistant's open ``Better response: Response``) goes out with ``continue_final_message: true`` and
  ``add_generation_prompt: false`` (vLLM's names; ``hippo serve`` honours them), ``max_tokens: 1``,
  ``logprobs: true`` and ``top_logprobs: 20``. The verdict compares log P(" A") with log P(" B")
  by the local judge's rule (:func:`~.judges.logprob_verdicts`, with ``calibrate`` and
  ``tie_threshold``), so both judges of the same model give the same verdicts.
* ``text``: the judge writes ``Verdict: A|B|tie`` and ``Reason: ...`` (``max_tokens``).
* ``auto`` (default): log-probs; an item whose request is refused (400, 404, 422) or whose reply
  lacks the log-probabilities of both letters gets a text verdict instead, and once the endpoint
  has shown it offers none (a reply without log-probabilities, a refusal naming those fields, a
  404), every later item does. ``stats["verdicts"]`` counts both sources and
  ``stats["logprob_fallbacks"]`` the reasons.

The client retries 408, 409, 429, 5xx, timeouts and dropped connections up to ``max_retries``
times (backing off from 0.5 s to 8 s, honouring Retry-After); other errors and replies without a
verdict fail at once, since asking again at temperature 0 gives the same answer. ``timeout_s``
bounds each HTTP exchange as a whole, body included (:class:`DeadlineTransport`): a server that
drips bytes cannot hold a request longer. Requests run ``concurrency`` at a time on one event
loop; each answer goes into the sqlite cache the moment it arrives, so a rerun asks only what
was never answered. The API key is read from the env var the recipe names and only ever goes
into the Authorization header, never into logs or outputs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx

from hippocrates.errors import HippoError
from hippocrates.progress import progress
from hippocrates.rlaif.cache import JudgeCache, cache_key
from hippocrates.rlaif.judges import (
    CONTENT_FREE,
    JudgeItem,
    Rubric,
    Source,
    Verdict,
    items_to_score,
    judge_prompt,
    logprob_verdicts,
    margin_label,
    parse_verdict,
    verdict_messages,
)

VerdictMode = Literal["auto", "logprobs", "text"]
TOP_LOGPROBS = 20  # OpenAI's and vLLM's largest top_logprobs
REFUSED = (400, 404, 422)  # the endpoint does not take a log-prob request
T = TypeVar("T")


class DeadlineTransport(httpx.AsyncBaseTransport):
    """One deadline for a whole HTTP exchange (connect, send, headers and the complete body).

    httpx's timeouts apply to each connect and each read, so a server sending one byte per second
    keeps a request alive for ever; here the exchange ends after ``seconds`` whatever the pace,
    as a timeout the openai client retries. It also counts the requests sent, retries included.
    """

    def __init__(self, seconds: float, connections: int) -> None:
        self.seconds = seconds
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.inner = httpx.AsyncHTTPTransport(limits=limits)
        self.requests = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        try:
            return await asyncio.wait_for(self._exchange(request), self.seconds)
        except asyncio.TimeoutError:
            raise httpx.ReadTimeout(
                f"no complete answer within {self.seconds:g} s", request=request
            ) from None

    async def _exchange(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        try:
            body = b"".join([chunk async for chunk in response.stream])  # type: ignore[union-attr]
        finally:
            await response.aclose()
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=httpx.ByteStream(body),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


class HTTPJudge:
    """Judge pairs through an OpenAI-compatible API: log-prob or text verdicts, retries, a cache.

    What is asked and how the reply is read are the hooks :meth:`messages`, :meth:`text_messages`,
    :meth:`parse`, :meth:`key` and ``letters`` (the two next tokens a log-prob verdict compares), so
    a subclass asks another question through the same client, deadline, retries and cache (the
    rubric grader of ``hippo eval --mode rubric``).
    """

    letters = ("A", "B")
    verdict_format = "'Verdict: A|B|tie'"

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
        max_tokens: int = 128,
        verdict: VerdictMode = "auto",
        calibrate: str = "question",
        tie_threshold: float = 0.02,
        cache: JudgeCache | None = None,
    ) -> None:
        self.base_url, self.model, self.rubric = base_url.rstrip("/"), model, rubric
        self.name = f"http:{model}@{self.base_url}"
        self.timeout_s, self.max_retries, self.concurrency = timeout_s, max_retries, concurrency
        self.max_tokens, self.verdict, self.cache = max_tokens, verdict, cache
        self.calibrate, self.tie_threshold = calibrate, tie_threshold
        self._api_key = api_key
        self._no_logprobs: str | None = None  # why the endpoint gives no log-prob verdicts (auto)
        self._halt = False
        self.stats: dict[str, Any] = {}
        self.reset_stats()

    def __repr__(self) -> str:  # never shows the key
        return f"HTTPJudge({self.name!r})"

    def reset_stats(self) -> None:
        self.stats = {
            "items": 0,
            "cache_hits": 0,
            "asked": 0,
            "requests": 0,
            "retries": 0,
            "answered": 0,
            "failed": 0,
            "errors": {},
            "verdict_mode": self.verdict,
            "verdicts": {"logprobs": 0, "text": 0},
            "logprob_fallbacks": {},
        }

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
            max_tokens=config.max_tokens,
            verdict=config.verdict,
            calibrate=config.calibrate,
            tie_threshold=config.tie_threshold,
            cache=JudgeCache(cache_path) if cache_path else None,
        )

    def messages(self, item: Any) -> list[dict[str, str]]:
        """The log-prob request's conversation: its open last message is continued by the verdict."""
        return verdict_messages(self.rubric, item)

    def text_messages(self, item: Any) -> list[dict[str, str]]:
        """The text request's conversation, answered with a verdict :meth:`parse` reads."""
        return [{"role": "user", "content": judge_prompt(self.rubric, item)}]

    def parse(self, text: str) -> tuple[Any, str]:
        """``(label, reason)`` of a text reply; label None when the reply holds no verdict."""
        return parse_verdict(text)

    def key(self, item: Any, source: Source) -> str:
        """The item's cache key."""
        return cache_key(self.name, self.rubric, item, source)

    def judge_pairs(self, items: list[JudgeItem]) -> list[Verdict]:
        """One verdict per item; cached answers are not asked again, identical items are asked once."""
        self.stats["items"] += len(items)
        return _run(self._judge(items))

    async def _judge(self, items: list[JudgeItem]) -> list[Verdict]:
        import openai

        distinct = list(dict.fromkeys(items))
        wanted = distinct if self.verdict == "text" else items_to_score(distinct, self.calibrate)
        asked_for = set(distinct)
        scores: dict[JudgeItem, tuple[float, float]] = {}
        settled: dict[JudgeItem, Verdict] = {}  # text verdicts and failures
        pending = []
        for item in wanted:
            hit = self._cached(item, item in asked_for)
            if hit is None:
                pending.append(item)
            elif hit.source == "logprobs":
                scores[item] = (hit.scores["logp_a"], hit.scores["logp_b"])
            else:
                settled[item] = hit
            self.stats["cache_hits"] += hit is not None
        if pending:
            transport = DeadlineTransport(self.timeout_s, self.concurrency)
            client = openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=self._api_key or "EMPTY",
                max_retries=self.max_retries,
                timeout=self.timeout_s,
                http_client=httpx.AsyncClient(transport=transport),
            )
            async with client:
                await self._ask_all(client, pending, asked_for, scores, settled)
            self.stats["requests"] += transport.requests
            self.stats["retries"] = self.stats["requests"] - self.stats["asked"]
        return self._decide(items, distinct, scores, settled)

    def _cached(self, item: JudgeItem, asked_for: bool) -> Verdict | None:
        if self.cache is None:
            return None
        sources: list[Source] = [] if self.verdict == "text" else ["logprobs"]
        if asked_for and self.verdict != "logprobs":
            sources.append("text")
        for source in sources:
            hit = self.cache.get(self.key(item, source))
            if hit is not None:
                return hit
        return None

    async def _ask_all(
        self,
        client: Any,
        pending: list[JudgeItem],
        asked_for: set[JudgeItem],
        scores: dict[JudgeItem, tuple[float, float]],
        settled: dict[JudgeItem, Verdict],
    ) -> None:
        """Ask every pending item, ``concurrency`` at a time. If saving an answer fails (a crash),
        nothing new starts, the requests in flight finish and are saved, then the error is raised."""
        gate = asyncio.Semaphore(self.concurrency)
        self._halt = False

        async def one(item: JudgeItem) -> None:
            if self._halt:
                return
            async with gate:
                if self._halt:
                    return
                try:
                    answer = await self._settle(client, item, item in asked_for)
                except BaseException:
                    self._halt = True
                    raise
            if isinstance(answer, tuple):
                scores[item] = answer
            elif answer is not None:
                settled[item] = answer

        tasks = [asyncio.ensure_future(one(item)) for item in pending]
        first: BaseException | None = None
        for done in progress(asyncio.as_completed(tasks), desc="judging (http)", total=len(tasks)):
            try:
                await done
            except Exception as exc:  # keep waiting for the requests in flight
                first = first or exc
        if first is not None:
            raise first

    async def _settle(
        self, client: Any, item: JudgeItem, asked_for: bool
    ) -> tuple[float, float] | Verdict | None:
        """Log-probs, or a text verdict (or failure); None for a calibration item without log-probs."""
        if self.verdict != "text":
            reason = self._no_logprobs
            if reason is None:
                outcome = await self._ask_logprobs(client, item)
                if isinstance(outcome, tuple):
                    lp_a, lp_b = outcome
                    measured = Verdict(
                        margin_label(lp_a - lp_b, 0.0),
                        scores={"logp_a": lp_a, "logp_b": lp_b},
                        source="logprobs",
                    )
                    self._save(item, measured)
                    return outcome
                if isinstance(outcome, Verdict):
                    return outcome
                reason = outcome
            if not asked_for:  # a mirror for the position-bias correction: nothing to fall back to
                return None
            fallbacks = self.stats["logprob_fallbacks"]
            fallbacks[reason] = fallbacks.get(reason, 0) + 1
            if self.verdict == "logprobs":
                return self._failed(f"no log-prob verdict: {reason}")
        if not asked_for:
            return None
        if self.cache is not None:
            hit = self.cache.get(self.key(item, "text"))
            if hit is not None:
                self.stats["cache_hits"] += 1
                return hit
        verdict = await self._ask_text(client, item)
        self._save(item, verdict)
        return verdict

    def _save(self, item: JudgeItem, verdict: Verdict) -> None:
        """Commit the answer to the cache the moment it arrives (a crash loses nothing received)."""
        if self.cache is not None:
            key = self.key(item, verdict.source)
            self.cache.put(key, self.name, self.rubric.version, verdict)

    async def _ask_logprobs(self, client: Any, item: JudgeItem) -> tuple[float, float] | Verdict | str:
        """``(log P(" A"), log P(" B"))``; a failed Verdict; or why the reply has no log-prob verdict."""
        import openai

        self.stats["asked"] += 1
        try:
            reply = await client.chat.completions.create(
                model=self.model,
                messages=self.messages(item),
                max_tokens=1,
                temperature=0,
                logprobs=True,
                top_logprobs=TOP_LOGPROBS,
                extra_body={"continue_final_message": True, "add_generation_prompt": False},
            )
        except openai.APIStatusError as exc:
            if exc.status_code in REFUSED and self.verdict == "auto":
                reason = f"HTTP {exc.status_code}: {_status_message(exc)}"
                if _refuses_logprob_fields(exc):  # the endpoint will refuse every item alike
                    self._no_logprobs = reason
                return reason
            return self._failed(_describe(exc, self.timeout_s))
        except openai.OpenAIError as exc:
            return self._failed(_describe(exc, self.timeout_s))
        try:
            top = reply.choices[0].logprobs.content[0].top_logprobs
            options = [(str(t.token), float(t.logprob)) for t in top]
        except (AttributeError, IndexError, TypeError, ValueError):
            self._no_logprobs = "the endpoint returned no log-probabilities"
            return self._no_logprobs
        first, second = self.letters
        lp_a, lp_b = _letter_logprob(options, first), _letter_logprob(options, second)
        if lp_a is None or lp_b is None:
            missing = " and ".join(f"' {x}'" for x, lp in ((first, lp_a), (second, lp_b)) if lp is None)
            return f"{missing} not among the top {TOP_LOGPROBS} log-probabilities"
        self.stats["answered"] += 1
        return lp_a, lp_b

    async def _ask_text(self, client: Any, item: JudgeItem) -> Verdict:
        import openai

        self.stats["asked"] += 1
        try:
            reply = await client.chat.completions.create(
                model=self.model,
                messages=self.text_messages(item),
                max_tokens=self.max_tokens,
                temperature=0,
            )
        except openai.OpenAIError as exc:
            return self._failed(_describe(exc, self.timeout_s))
        try:
            text = reply.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError):
            return self._failed("malformed response: no choices[0].message.content")
        label, reason = self.parse(text)
        if label is None:
            self.stats["failed"] += 1
            self._count_error("unparsable verdict")
            return Verdict(None, raw=text, error=f"unparsable verdict: no {self.verdict_format} in the reply")
        self.stats["answered"] += 1
        return Verdict(label, reason=reason, raw=text)

    def _failed(self, error: str) -> Verdict:
        self.stats["failed"] += 1
        self._count_error(error.split(":")[0])
        return Verdict(None, error=error)

    def _count_error(self, kind: str) -> None:
        self.stats["errors"][kind] = self.stats["errors"].get(kind, 0) + 1

    def _decide(
        self,
        items: list[JudgeItem],
        distinct: list[JudgeItem],
        scores: dict[JudgeItem, tuple[float, float]],
        settled: dict[JudgeItem, Verdict],
    ) -> list[Verdict]:
        """Log-prob verdicts by the shared rule, text verdicts as given, failures kept; per item."""
        scored = [i for i in distinct if i in scores]
        decided: dict[JudgeItem, Verdict] = dict(settled)
        if scored and self.calibrate == "content-free" and CONTENT_FREE not in scores:
            for item in scored:
                decided[item] = Verdict(None, error="content-free calibration pair got no log-probabilities")
        elif scored:
            verdicts = logprob_verdicts(
                scored, scores, calibrate=self.calibrate, tie_threshold=self.tie_threshold
            )
            decided.update(zip(scored, verdicts, strict=True))
        for item in distinct:
            verdict = decided.get(item)
            if verdict is not None and verdict.ok:
                self.stats["verdicts"][verdict.source] += 1
        return [decided.get(i) or Verdict(None, error="not asked: the run stopped") for i in items]


def _letter_logprob(options: list[tuple[str, float]], letter: str) -> float | None:
    """log P of the verdict token: `` A`` as the local judge reads it, else a bare ``A``."""
    exact = [lp for token, lp in options if token == f" {letter}"]
    if exact:
        return exact[0]
    loose = [lp for token, lp in options if token.strip() == letter]
    return max(loose) if loose else None


def _refuses_logprob_fields(exc: Any) -> bool:
    """Whether a refusal is about the log-prob request itself (not, say, this item's length)."""
    body = exc.body.get("error", exc.body) if isinstance(exc.body, dict) else {}
    code = body.get("code") if isinstance(body, dict) else None
    text = f"{_status_message(exc)} {body.get('param') if isinstance(body, dict) else ''}"
    fields = ("continue_final_message", "add_generation_prompt", "logprobs", "top_logprobs")
    return code == "unsupported_parameter" or exc.status_code == 404 or any(f in text for f in fields)


def _status_message(exc: Any) -> str:
    """The server's error message (OpenAI style ``{"error": {"message"}}``), cut to one short line."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message", inner) if isinstance(inner, dict) else inner
    else:
        message = body or exc.message
    return " ".join(str(message).split())[:200]


def _describe(exc: Exception, timeout_s: float) -> str:
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return f"timeout: no complete answer within {timeout_s:g} s"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return f"connection error: {type(cause).__name__}"
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {_status_message(exc)}"
    return f"client error: {type(exc).__name__}: {exc}"


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run the judge's event loop; from inside a running loop (a notebook), on a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
