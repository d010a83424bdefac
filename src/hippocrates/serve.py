"""``hippo serve``: any model the framework loads, behind an OpenAI-compatible HTTP API.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON, or server-sent events
in OpenAI's chunk format with ``stream: true``), ``GET /v1/models``, ``GET /v1/models/{id}``,
``GET /v1/stats`` (request counters, so tests and benchmarks can count what reached the server)
and ``GET /health`` (no key needed, for load balancers).

It binds to 127.0.0.1 unless told otherwise. With ``--api-key`` (or ``HIPPO_API_KEY``) every
``/v1`` request needs ``Authorization: Bearer KEY`` (compared in constant time); binding any other
address requires a key. Limits are explicit and every refusal is OpenAI's error object
``{"error": {"message", "type", "param", "code"}}``: bodies over ``--max-body-kb`` get 413,
malformed requests 400 naming the field, fields the server cannot honour (``tools``,
``response_format`` other than text, ``n`` > 1, penalties, ...) 400 naming the field rather than
being ignored, ``max_tokens`` over ``--max-tokens`` 400, and once ``--max-concurrency`` requests
are admitted (running or queued) new ones get 429 with ``Retry-After``. Every error response is
one line on stderr with the request id (also sent as ``x-request-id``).

Requests that arrive together are generated as one left-padded batch (up to ``--max-batch``) on
one model thread, each with its own seed, stop strings, token budget and log-probabilities
(:func:`hippocrates.rlaif.sampling.generate_rows`); temperature 0 is greedy. A stop string ends
that row's generation where it appears: the text stops before it and ``usage`` counts the tokens
generated up to it. ``usage`` and ``logprobs`` include the end-of-sequence token when the model
produced one (as vLLM); ``logprobs`` are the model's log-probabilities before temperature and top_p.
The tokenizer is used by the request handlers and the model thread, so every use holds one lock.
SIGINT/SIGTERM stop accepting, finish the requests in flight, then exit 0.

Why not ``transformers serve``: it ignores ``logprobs``/``top_logprobs``, which the HTTP judge
needs, and loads models through its own manager rather than :func:`hippocrates.models.resolve_model`
(aliases, GGUF files, run folders).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from hippocrates.progress import status
from hippocrates.rlaif.sampling import RowSpec, StepLogprobs

MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API and vLLM (OpenAI's legacy completions allow 5)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes

# Fields of OpenAI's requests that ask for something this server does not do. They are accepted
# only with the value that asks for nothing (and null); any other value is a 400 naming the field.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "store": (False,),
    "metadata": ({},),
    "modalities": (["text"],),
    "service_tier": ("auto", "default"),
    "echo": (False,),
    "best_of": (1,),
    "suffix": ("",),
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """What both endpoints share."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    user: str | None = None  # an end-user id for the caller's records; asks nothing of generation

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 16 or not all(stops):
            raise ApiError(400, "stop: at most 16 non-empty strings", param="stop")
        return tuple(stops)


class ChatRequest(Sampling):
    """OpenAI's chat-completions request, plus vLLM's ``continue_final_message`` and
    ``add_generation_prompt`` (the log-prob judge continues an assistant turn)."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    continue_final_message: bool = False
    add_generation_prompt: bool = True


class CompletionRequest(Sampling):
    """OpenAI's (legacy) completions request: one prompt, continued as it is."""

    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


@dataclass
class Limits:
    max_tokens: int = 512
    max_concurrency: int = 16
    max_batch: int = 8
    max_body_bytes: int = 1 << 20


@dataclass(frozen=True)
class TokenInfo:
    """One generated token for ``logprobs``: its text, log-probability, alternatives, text offset."""

    text: str
    logprob: float
    top: tuple[tuple[str, float], ...]
    offset: int


@dataclass(frozen=True)
class Piece:
    """Text (and its tokens) a streaming request may send now."""

    text: str
    tokens: list[TokenInfo]


@dataclass(frozen=True)
class Done:
    text: str
    tokens: list[TokenInfo]
    n_tokens: int
    finish_reason: str
    prompt_tokens: int


@dataclass(frozen=True)
class Failed:
    error: BaseException


@dataclass
class Job:
    ids: list[int]
    spec: RowSpec
    stops: tuple[str, ...]
    stream: bool
    events: asyncio.Queue
    cancelled: bool = False  # the client went away: the model thread ends the row


@dataclass
class State:
    model: Any
    tokenizer: Any
    name: str
    aliases: set[str]
    limits: Limits
    api_key: bytes | None = None
    queue: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None
    pending: int = 0
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
    token_texts: dict[int, str] = field(default_factory=dict)
    counters: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("requests", "completions", "streams", "rejected_busy", "bad_requests", "errors", "batches",
             "max_batch_seen", "prompt_tokens", "completion_tokens"),
            0,
        )
    )  # fmt: skip

    def encode(self, text: str, special: bool) -> list[int]:
        with self.tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_text(self, token: int) -> str:
        """A token's text for ``logprobs``; special tokens by name (``<|im_end|>``)."""
        text = self.token_texts.get(token)
        if text is None:
            with self.tokenizer_lock:
                text = self.tokenizer.decode([token], clean_up_tokenization_spaces=False)
            self.token_texts[token] = text
        return text


class ApiError(Exception):
    """A request the server refuses, as OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def error_response(exc: ApiError, rid: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.code}}
    return JSONResponse(body, status_code=exc.status, headers={"x-request-id": rid, **(headers or {})})


def request_id(request: Request, prefix: str = "req") -> str:
    """The id of this request, made on first use; it names the request in logs and responses."""
    rid = getattr(request.state, "rid", None)
    if rid is None:
        rid = request.state.rid = f"{prefix}-{uuid.uuid4().hex}"
    return rid


async def read_json_body(request: Any, limit: int) -> Any:
    """The request body as JSON, refusing more than ``limit`` bytes before reading them all."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"request body is larger than the limit of {limit} bytes")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None


def parse_request(data: Any, schema: type[Sampling], state: State) -> Any:
    """Validate a request; refuse unknown fields and fields asking for what we do not do, by name."""
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    for key in ("messages",) if schema is ChatRequest else ("prompt",):
        if key not in data:
            raise ApiError(400, f"'{key}' is required", param=key, code="missing_required_parameter")
    kept = {}
    for key, value in data.items():
        if key in schema.model_fields:
            kept[key] = value
        elif key not in NEUTRAL:
            raise ApiError(400, f"unknown field '{key}'", param=key, code="unsupported_parameter")
        elif value is not None and value not in NEUTRAL[key]:
            raise ApiError(
                400,
                f"'{key}' is not supported by this server (got {json.dumps(value)[:60]}); leave it out",
                param=key,
                code="unsupported_parameter",
            )
    try:
        req = schema.model_validate(kept)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where.split(".")[0]) from None
    if req.model and req.model not in state.aliases:
        raise ApiError(
            404, f"model '{req.model}' is not served here; use '{state.name}'", param="model",
            code="model_not_found",
        )  # fmt: skip
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if asked and asked > state.limits.max_tokens:
        raise ApiError(
            400, f"max_tokens must be <= {state.limits.max_tokens} (got {asked})", param="max_tokens"
        )
    return req


def render_chat(state: State, req: ChatRequest) -> tuple[str, bool]:
    """The conversation as the model reads it (:mod:`hippocrates.chat`) and whether the tokenizer
    adds its special tokens; ``continue_final_message`` leaves the last assistant turn open."""
    from hippocrates import chat
    from hippocrates.errors import HippoError

    turns = [{"role": m.role, "content": m.text()} for m in req.messages]
    if req.continue_final_message and req.add_generation_prompt:
        raise ApiError(
            400, "continue_final_message needs add_generation_prompt: false", param="add_generation_prompt"
        )
    with state.tokenizer_lock:
        try:
            fmt = chat.choose_format(state.tokenizer, "auto")
            text = chat.render(
                state.tokenizer,
                turns,
                fmt,
                add_generation_prompt=req.add_generation_prompt,
                continue_final=req.continue_final_message,
            )
        except HippoError as exc:
            raise ApiError(400, f"messages: {exc}", param="messages") from None
    return text, chat.adds_special_tokens(fmt)


class RowText:
    """One request's text as its tokens arrive (model thread): decoded, cut at the first stop
    string, and released to a stream only once no stop string can still begin in it."""

    def __init__(self, state: State, job: Job) -> None:
        self.state, self.job = state, job
        self.stops = job.stops
        self.incremental = job.stream or bool(job.stops) or job.spec.top_logprobs is not None
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.tokens: list[int] = []
        self.steps: list[StepLogprobs | None] = []
        self.starts: list[int] = []
        self.text = ""
        self.cut: int | None = None
        self.sent = self.sent_tokens = 0

    def push(self, token: int, logprobs: StepLogprobs | None) -> bool:
        """Add a token; True when a stop string has appeared (generation of this row ends)."""
        self.tokens.append(token)
        self.steps.append(logprobs)
        if not self.incremental:
            return False
        self.starts.append(len(self.text.rstrip("\ufffd")))
        self.text = self.state.decode(self.tokens)
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.cut = min(hits)
            return True
        return False

    def release(self, final: bool = False) -> Piece:
        """The text and tokens not sent yet that may be sent now (everything, when ``final``)."""
        if final and not self.incremental:
            self.text = self.state.decode(self.tokens)
        if self.cut is not None:
            end = self.cut
        elif final:
            end = len(self.text)
        else:
            end = len(self.text.rstrip("\ufffd")) - self.hold
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent : end], end
        first = last = self.sent_tokens
        if final and self.cut is None:
            last = len(self.tokens)
        else:
            while last < len(self.starts) and self.starts[last] < end:
                last += 1
        self.sent_tokens = last
        return Piece(piece, self.infos(first, last))

    def infos(self, first: int, last: int) -> list[TokenInfo]:
        if self.job.spec.top_logprobs is None:
            return []
        out = []
        for k in range(first, last):
            step = self.steps[k]
            assert step is not None
            top = tuple((self.state.token_text(t), lp) for t, lp in step.top)
            out.append(TokenInfo(self.state.token_text(self.tokens[k]), step.logprob, top, self.starts[k]))
        return out

    def final_text(self) -> str:
        return self.text if self.cut is None else self.text[: self.cut]


class BatchSink:
    """Feeds a batch's tokens to each job's :class:`RowText` and posts events to its queue."""

    def __init__(self, state: State, jobs: list[Job]) -> None:
        self.state, self.jobs = state, jobs
        self.rows = [RowText(state, j) for j in jobs]
        self.finished = [False] * len(jobs)

    def post(self, job: Job, event: Piece | Done | Failed) -> None:
        assert self.state.loop is not None
        self.state.loop.call_soon_threadsafe(job.events.put_nowait, event)

    def token(self, row: int, token: int, logprobs: StepLogprobs | None, eos: bool) -> bool:
        job, text = self.jobs[row], self.rows[row]
        if job.cancelled:
            return True
        stopped = text.push(token, logprobs)
        if job.stream and not stopped:
            piece = text.release()
            if piece.text or piece.tokens:
                self.post(job, piece)
        return stopped

    def finish(self, row: int, reason: str) -> None:
        job, text = self.jobs[row], self.rows[row]
        self.finished[row] = True
        piece = text.release(final=True)
        if job.stream:
            self.post(job, piece)
        tokens = [] if job.stream else text.infos(0, text.sent_tokens)
        self.post(job, Done(text.final_text(), tokens, len(text.tokens), reason, len(job.ids)))

    def fail(self, error: BaseException) -> None:
        for row, job in enumerate(self.jobs):
            if not self.finished[row]:
                self.post(job, Failed(error))


async def batch_worker(state: State, executor: ThreadPoolExecutor) -> None:
    """Take whatever requests are waiting (up to max_batch) and generate them as one batch."""
    from hippocrates.rlaif.sampling import generate_rows, pad_id

    loop = asyncio.get_running_loop()
    assert state.queue is not None
    pad = pad_id(state.tokenizer)
    while True:
        jobs: list[Job] = [await state.queue.get()]
        while len(jobs) < state.limits.max_batch and not state.queue.empty():
            jobs.append(state.queue.get_nowait())
        jobs = [j for j in jobs if not j.cancelled]
        if not jobs:
            continue
        state.counters["batches"] += 1
        state.counters["max_batch_seen"] = max(state.counters["max_batch_seen"], len(jobs))
        sink = BatchSink(state, jobs)

        def run(sink: BatchSink = sink, jobs: list[Job] = jobs) -> None:
            try:
                generate_rows(
                    state.model,
                    [j.ids for j in jobs],
                    [j.spec for j in jobs],
                    pad_token_id=pad,
                    sink=sink,
                    eos_token_id=state.tokenizer.eos_token_id,
                )
            except Exception as exc:  # every request of the batch gets a 500 naming it
                sink.fail(exc)

        await loop.run_in_executor(executor, run)


class Admission:
    """A request's place among the ``--max-concurrency`` admitted; given back exactly once."""

    def __init__(self, state: State) -> None:
        if state.pending >= state.limits.max_concurrency:
            state.counters["rejected_busy"] += 1
            raise ApiError(
                429,
                f"server busy: {state.limits.max_concurrency} requests in progress; retry shortly",
                "rate_limit_error",
                code="rate_limit_exceeded",
            )
        self.state, self.held = state, True
        state.pending += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.state.pending -= 1


class ChatShape:
    """OpenAI's chat-completion objects."""

    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    @staticmethod
    def logprobs(tokens: list[TokenInfo]) -> dict[str, Any]:
        def entry(text: str, logprob: float) -> dict[str, Any]:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        content = [
            {**entry(t.text, t.logprob), "top_logprobs": [entry(s, lp) for s, lp in t.top]} for t in tokens
        ]
        return {"content": content, "refusal": None}

    def choice(self, text: str, tokens: list[TokenInfo] | None, finish: str) -> dict[str, Any]:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None if tokens is None else self.logprobs(tokens),
            "finish_reason": finish,
        }

    def delta(
        self, text: str | None, tokens: list[TokenInfo] | None, finish: str | None, first: bool = False
    ) -> dict[str, Any]:
        delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
        return {
            "index": 0,
            "delta": delta,
            "logprobs": None if tokens is None else self.logprobs(tokens),
            "finish_reason": finish,
        }


class CompletionShape:
    """OpenAI's (legacy) text-completion objects."""

    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    @staticmethod
    def logprobs(tokens: list[TokenInfo]) -> dict[str, Any]:
        return {
            "tokens": [t.text for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens],
            "text_offset": [t.offset for t in tokens],
        }

    def choice(self, text: str, tokens: list[TokenInfo] | None, finish: str | None) -> dict[str, Any]:
        return {
            "index": 0,
            "text": text,
            "logprobs": None if tokens is None else self.logprobs(tokens),
            "finish_reason": finish,
        }

    def delta(
        self, text: str | None, tokens: list[TokenInfo] | None, finish: str | None, first: bool = False
    ) -> dict[str, Any]:
        return self.choice(text or "", tokens, finish)


def usage(done: Done) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.n_tokens,
        "total_tokens": done.prompt_tokens + done.n_tokens,
    }


def create_app(
    model: Any,
    tokenizer: Any,
    name: str,
    limits: Limits,
    aliases: set[str] | None = None,
    api_key: str | None = None,
) -> FastAPI:
    """The FastAPI app around a loaded model (one model thread, requests batched by ``batch_worker``)."""
    state = State(model.eval(), tokenizer, name, {name, *(aliases or set())}, limits)
    state.api_key = api_key.encode() if api_key else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.queue, state.loop = asyncio.Queue(), asyncio.get_running_loop()
        executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        worker = asyncio.create_task(batch_worker(state, executor))
        yield
        worker.cancel()
        executor.shutdown(wait=True)

    def log_failure(rid: str, exc: ApiError) -> None:
        status(f"request {rid} failed: {exc.status} {exc.kind}: {exc.message}")

    async def require_key(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), state.api_key)):
            raise ApiError(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    app = FastAPI(title="hippo serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if exc.status != 429:  # refusals when busy are counted as rejected_busy
            state.counters["errors" if exc.status >= 500 else "bad_requests"] += 1
        rid = request_id(request)
        log_failure(rid, exc)
        return error_response(exc, rid, {"Retry-After": "1"} if exc.status == 429 else None)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return await _api_error(request, ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return await _api_error(request, ApiError(400, str(exc.errors()[0].get("msg", "invalid request"))))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        return await _api_error(request, ApiError(500, f"{type(exc).__name__}: {exc}", "server_error"))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": state.name}

    def model_card() -> dict[str, Any]:
        return {"id": state.name, "object": "model", "created": 0, "owned_by": "hippocrates"}

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id:path}")
    async def model_info(model_id: str) -> dict[str, Any]:
        if model_id not in state.aliases:
            raise ApiError(
                404, f"model '{model_id}' is not served here; use '{state.name}'", param="model",
                code="model_not_found",
            )  # fmt: skip
        return model_card()

    @v1.get("/stats")
    async def stats() -> dict[str, Any]:
        return {**state.counters, "in_flight": state.pending, **limits.__dict__}

    def prepare(
        text: str, special: bool, asked: int | None, default: int, param: str
    ) -> tuple[list[int], int]:
        """The prompt's token ids and the token budget, checked against the model's context."""
        ids = state.encode(text, special)
        if not ids:
            raise ApiError(400, f"{param}: the prompt is empty", param=param)
        context = getattr(state.model.config, "max_position_embeddings", None)
        budget = asked or default
        if context and len(ids) + budget > context:
            if asked is not None or len(ids) >= context:
                raise ApiError(
                    400,
                    f"prompt ({len(ids)} tokens) + max_tokens ({budget}) exceeds the model's "
                    f"context of {context} tokens",
                    param=param,
                    code="context_length_exceeded",
                )
            budget = context - len(ids)  # no max_tokens given: what the context leaves
        return ids, budget

    async def complete(
        rid: str,
        req: Sampling,
        ids: list[int],
        budget: int,
        top: int | None,
        shape: ChatShape | CompletionShape,
        admission: Admission,
    ):
        """Queue the request, then answer with one JSON object or a stream of chunks."""
        seed = req.seed if req.seed is not None else random.getrandbits(63)
        spec = RowSpec(seed, req.temperature, req.top_p if req.temperature > 0 else 1.0, budget, top)
        job = Job(ids, spec, req.stops(), req.stream, asyncio.Queue())
        assert state.queue is not None
        await state.queue.put(job)
        try:
            event = await job.events.get()  # the prompt has been read (or generation failed)
            while not req.stream and isinstance(event, Piece):
                event = await job.events.get()
        except BaseException:
            job.cancelled = True
            admission.release()
            raise
        if isinstance(event, Failed):
            admission.release()
            raise ApiError(
                500, f"generation failed: {type(event.error).__name__}: {event.error}", "server_error"
            )
        created, want = int(time.time()), top is not None
        if not req.stream:
            assert isinstance(event, Done)
            admission.release()
            count(event)
            body = {
                "id": rid,
                "object": shape.object,
                "created": created,
                "model": state.name,
                "choices": [shape.choice(event.text, event.tokens if want else None, event.finish_reason)],
                "usage": usage(event),
            }
            return JSONResponse(body, headers={"x-request-id": rid})
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        state.counters["streams"] += 1

        def chunk(choice: dict[str, Any] | None, done: Done | None = None) -> str:
            body = {"id": rid, "object": shape.chunk_object, "created": created, "model": state.name,
                    "choices": [] if choice is None else [choice]}  # fmt: skip
            if include_usage:
                body["usage"] = usage(done) if done else None
            return f"data: {json.dumps(body)}\n\n"

        async def events(event: Piece | Done | Failed) -> AsyncIterator[str]:
            try:
                if isinstance(shape, ChatShape):
                    yield chunk(shape.delta(None, None, None, first=True))
                while True:
                    if isinstance(event, Piece):
                        if event.text or event.tokens:
                            yield chunk(shape.delta(event.text, event.tokens if want else None, None))
                    elif isinstance(event, Done):
                        count(event)
                        admission.release()  # before the last bytes: the client may ask again at once
                        yield chunk(shape.delta(None, [] if want else None, event.finish_reason))
                        if include_usage:
                            yield chunk(None, event)
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        error = ApiError(500, f"generation failed: {type(event.error).__name__}: {event.error}",
                                         "server_error")  # fmt: skip
                        state.counters["errors"] += 1
                        log_failure(rid, error)
                        body = {
                            "error": {
                                "message": error.message,
                                "type": error.kind,
                                "param": None,
                                "code": None,
                            }
                        }
                        yield f"data: {json.dumps(body)}\n\n"
                        return
                    event = await job.events.get()
            finally:
                job.cancelled = True  # the client left early, or the stream is over
                admission.release()

        return StreamingResponse(
            events(event),
            media_type="text/event-stream",
            headers={"x-request-id": rid, "cache-control": "no-cache"},
        )

    def count(done: Done) -> None:
        state.counters["completions"] += 1
        state.counters["prompt_tokens"] += done.prompt_tokens
        state.counters["completion_tokens"] += done.n_tokens

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        state.counters["requests"] += 1
        rid = request_id(request, ChatShape.prefix)
        req = parse_request(await read_json_body(request, limits.max_body_bytes), ChatRequest, state)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        req.stops()
        admission = Admission(state)
        try:
            text, special = render_chat(state, req)
            asked = req.max_completion_tokens or req.max_tokens
            ids, budget = prepare(text, special, asked, min(256, limits.max_tokens), "messages")
            top = (req.top_logprobs or 0) if req.logprobs else None
            return await complete(rid, req, ids, budget, top, ChatShape(), admission)
        except BaseException:
            admission.release()
            raise

    @v1.post("/completions")
    async def completions(request: Request):
        state.counters["requests"] += 1
        rid = request_id(request, CompletionShape.prefix)
        req = parse_request(await read_json_body(request, limits.max_body_bytes), CompletionRequest, state)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(
                    400, "prompt: one prompt per request (a string or a list of one)", param="prompt"
                )
            prompt = prompt[0]
        req.stops()
        admission = Admission(state)
        try:
            ids, budget = prepare(prompt, True, req.max_tokens, min(16, limits.max_tokens), "prompt")
            return await complete(rid, req, ids, budget, req.logprobs, CompletionShape(), admission)
        except BaseException:
            admission.release()
            raise

    app.include_router(v1)
    return app


def default_threads() -> int:
    """Torch threads for serving: ``OMP_NUM_THREADS`` when set, else the CPUs this process may use
    less one (at least 1), which leaves a core to the HTTP event loop and tokenization; on a small
    shared host more threads than free cores make every step wait for the slowest."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus - 1)


# every numeric flag and its allowed range
FLAG_RANGES: dict[str, tuple[int, int]] = {
    "port": (1, 65535),
    "max_tokens": (1, 1_000_000),
    "max_concurrency": (1, 100_000),
    "max_batch": (1, 4096),
    "max_body_kb": (1, 1 << 20),
    "threads": (1, 4096),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "endpoints: /v1/chat/completions, /v1/completions (stream: true for SSE), /v1/models, "
        "/v1/models/{id}, /v1/stats, /health\n"
        "API key: --api-key or HIPPO_API_KEY (prefer the env var: arguments show in ps); every /v1 request "
        "then needs\n'Authorization: Bearer KEY'. Binding a non-loopback --host requires a key."
    )
    parser.add_argument(
        "model", nargs="?", help="model spec: alias, HF directory, .gguf file or org/name (a stage output)"
    )
    parser.add_argument("--model", dest="model_flag", metavar="MODEL", help="the model, given as a flag")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port, 1-65535 (default 8000)")
    parser.add_argument("--served-model-name", help="model id clients send (default: the model spec)")
    parser.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $HIPPO_API_KEY, else none)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for"
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=16,
        help="requests admitted at once (running + queued); more get 429",
    )
    parser.add_argument("--max-batch", type=int, default=8, help="requests generated together in one batch")
    parser.add_argument("--max-body-kb", type=int, default=1024, help="largest request body accepted")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: $OMP_NUM_THREADS if set, else usable CPUs - 1, at least 1, "
        "leaving a core to the HTTP event loop)",
    )
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--trust-remote-code", action="store_true")


def check_arguments(args: argparse.Namespace) -> str | None:
    """Every numeric flag in range and a key when reachable from other machines; returns the key."""
    from hippocrates.errors import HippoError

    if args.model and args.model_flag and args.model != args.model_flag:
        raise HippoError(f"two models given: {args.model} and --model {args.model_flag}")
    args.model = args.model or args.model_flag
    if not args.model:
        raise HippoError("no model given: hippo serve MODEL (an alias, HF directory, .gguf file or org/name)")

    for flag, (low, high) in FLAG_RANGES.items():
        value = getattr(args, flag)
        if value is not None and not low <= value <= high:
            raise HippoError(f"--{flag.replace('_', '-')} must be between {low} and {high} (got {value})")
    api_key = args.api_key or os.environ.get("HIPPO_API_KEY") or None
    if not _is_loopback(args.host) and not api_key:
        raise HippoError(
            f"--host {args.host} is reachable from other machines: set an API key "
            "(HIPPO_API_KEY or --api-key)"
        )
    return api_key


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from hippocrates.errors import HippoError
    from hippocrates.models import load_model, load_tokenizer, resolve_model

    api_key = check_arguments(args)
    _check_port(args.host, args.port)  # fail in a second, not after loading the model
    resolved = resolve_model(args.model)
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(resolved, trust_remote_code=args.trust_remote_code)
    model = load_model(
        resolved,
        precision=args.precision,
        trust_remote_code=args.trust_remote_code,
        device="cuda" if torch.cuda.is_available() else None,
    )
    name = args.served_model_name or args.model
    limits = Limits(args.max_tokens, args.max_concurrency, args.max_batch, args.max_body_kb * 1024)
    app = create_app(model, tokenizer, name, limits, aliases={args.model, resolved.path}, api_key=api_key)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=60,
        access_log=False,
    )
    server = uvicorn.Server(config)
    key = "API key required" if api_key else "no API key"
    status(
        f"serving '{name}' on http://{args.host}:{args.port}/v1 ({threads} torch threads, {key}; "
        "Ctrl-C to stop)"
    )
    # uvicorn re-raises the signal that stopped it once it has shut down; make that a no-op so a
    # graceful stop exits 0 instead of dying by SIGTERM or raising KeyboardInterrupt.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind
        raise HippoError(f"could not listen on {args.host}:{args.port} (port in use?)") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    status("server stopped")
    return 0


def _check_port(host: str, port: int) -> None:
    from hippocrates.errors import HippoError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise HippoError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
