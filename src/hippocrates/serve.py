"""``hippo serve``: any model the framework loads, behind an OpenAI-compatible HTTP API.

Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/stats`` (request counters,
so tests and benchmarks can count what reached the server) and ``GET /health``.

It binds to 127.0.0.1 unless told otherwise, since there is no authentication. Limits are explicit
and every refusal is a JSON error with one clear message: bodies over ``--max-body-kb`` get 413,
malformed requests 400, ``max_tokens`` over ``--max-tokens`` 400, and once ``--max-concurrency``
requests are admitted (running or queued) new ones get 429 with ``Retry-After``. Requests that
arrive together are generated as one left-padded batch (up to ``--max-batch``) on one model thread,
each with its own seed; temperature 0 is greedy. SIGINT/SIGTERM stop accepting, finish the requests
in flight, then exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import signal
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from hippocrates.progress import status


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(BaseModel):
    """The subset of the OpenAI chat-completions request we honour; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    stream: Literal[False] = False
    stop: str | list[str] | None = None
    seed: int | None = None


@dataclass
class Limits:
    max_tokens: int = 512
    max_concurrency: int = 16
    max_batch: int = 8
    max_body_bytes: int = 1 << 20


@dataclass
class Job:
    prompt: str
    spec: Any
    future: asyncio.Future


@dataclass
class State:
    model: Any
    tokenizer: Any
    name: str
    aliases: set[str]
    limits: Limits
    queue: asyncio.Queue | None = None
    pending: int = 0
    counters: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "requests",
                "completions",
                "rejected_busy",
                "bad_requests",
                "errors",
                "batches",
                "max_batch_seen",
                "prompt_tokens",
                "completion_tokens",
            ),
            0,
        )
    )


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_response(exc: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.status}}
    return JSONResponse(body, status_code=exc.status, headers=headers)


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


def parse_request(data: Any, state: State) -> ChatRequest:
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    if "messages" not in data:
        raise ApiError(400, "'messages' is required: a list of {role, content} objects", param="messages")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None
    if req.model and req.model not in state.aliases:
        raise ApiError(
            404, f"model '{req.model}' is not served here; use '{state.name}'", "not_found_error", "model"
        )
    asked = req.max_completion_tokens or req.max_tokens
    if asked and asked > state.limits.max_tokens:
        raise ApiError(
            400, f"max_tokens must be <= {state.limits.max_tokens} (got {asked})", param="max_tokens"
        )
    return req


def render_chat(tokenizer: Any, messages: list[Message]) -> str:
    """The conversation as the model reads it (:mod:`hippocrates.chat`: its template, else Alpaca)."""
    from hippocrates import chat
    from hippocrates.errors import HippoError

    turns = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        return chat.render(tokenizer, turns, chat.choose_format(tokenizer, "auto"))
    except HippoError as exc:
        raise ApiError(400, f"messages: {exc}", param="messages") from None


async def batch_worker(state: State, executor: ThreadPoolExecutor) -> None:
    """Take whatever requests are waiting (up to max_batch) and generate them as one batch."""
    from hippocrates.rlaif.sampling import generate

    loop = asyncio.get_running_loop()
    assert state.queue is not None
    while True:
        jobs: list[Job] = [await state.queue.get()]
        while len(jobs) < state.limits.max_batch and not state.queue.empty():
            jobs.append(state.queue.get_nowait())
        jobs = [j for j in jobs if not j.future.done()]  # the client went away
        if not jobs:
            continue
        state.counters["batches"] += 1
        state.counters["max_batch_seen"] = max(state.counters["max_batch_seen"], len(jobs))
        try:
            # without a chat template the tokenizer adds BOS itself (templates include it)
            special = not getattr(state.tokenizer, "chat_template", None)  # = chat.adds_special_tokens
            run = partial(generate, add_special_tokens=special)
            prompts, specs = [j.prompt for j in jobs], [j.spec for j in jobs]
            outs = await loop.run_in_executor(executor, run, state.model, state.tokenizer, prompts, specs)
        except Exception as exc:
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(exc)
            continue
        for j, out in zip(jobs, outs, strict=True):
            if not j.future.done():
                j.future.set_result(out)


def apply_stop(text: str, stop: str | list[str] | None) -> tuple[str, bool]:
    """Cut the text at the first stop string; True when one was found."""
    stops = [stop] if isinstance(stop, str) else (stop or [])
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def create_app(model: Any, tokenizer: Any, name: str, limits: Limits, aliases: set[str] | None = None):
    """The FastAPI app around a loaded model (one model thread, requests batched by ``batch_worker``)."""
    from hippocrates.rlaif.sampling import RowSpec

    state = State(model.eval(), tokenizer, name, {name, *(aliases or set())}, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.queue = asyncio.Queue()
        executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        worker = asyncio.create_task(batch_worker(state, executor))
        yield
        worker.cancel()
        executor.shutdown(wait=True)

    app = FastAPI(title="hippo serve", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        state.counters["bad_requests" if exc.status < 500 and exc.status != 429 else "errors"] += 1
        return error_response(exc, {"Retry-After": "1"} if exc.status == 429 else None)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return error_response(ApiError(exc.status_code, str(exc.detail), "invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(ApiError(400, str(exc.errors()[0].get("msg", "invalid request"))))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": state.name}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": state.name, "object": "model", "created": 0, "owned_by": "hippocrates"}],
        }

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        return {**state.counters, "in_flight": state.pending, **limits.__dict__}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        state.counters["requests"] += 1
        req = parse_request(await read_json_body(request, limits.max_body_bytes), state)
        if state.pending >= limits.max_concurrency:
            state.counters["rejected_busy"] += 1
            raise ApiError(
                429,
                f"server busy: {limits.max_concurrency} requests in progress; retry shortly",
                "rate_limit_error",
            )
        prompt = render_chat(state.tokenizer, req.messages)
        budget = req.max_completion_tokens or req.max_tokens or min(256, limits.max_tokens)
        context = getattr(state.model.config, "max_position_embeddings", None)
        n_prompt = len(state.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if context and n_prompt + budget > context:
            raise ApiError(
                400,
                f"prompt ({n_prompt} tokens) + max_tokens ({budget}) exceeds the model's "
                f"context of {context} tokens",
                param="messages",
            )
        seed = req.seed if req.seed is not None else random.getrandbits(63)
        spec = RowSpec(seed, req.temperature, req.top_p if req.temperature > 0 else 1.0, budget)
        state.pending += 1
        try:
            future = asyncio.get_running_loop().create_future()
            assert state.queue is not None
            await state.queue.put(Job(prompt, spec, future))
            try:
                out = await future
            except Exception as exc:
                raise ApiError(
                    500, f"generation failed: {type(exc).__name__}: {exc}", "server_error"
                ) from None
        finally:
            state.pending -= 1
        text, stopped = apply_stop(out.text, req.stop)
        state.counters["completions"] += 1
        state.counters["prompt_tokens"] += out.prompt_tokens
        state.counters["completion_tokens"] += out.n_tokens
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": state.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop" if stopped else out.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.n_tokens,
                "total_tokens": out.prompt_tokens + out.n_tokens,
            },
        }

    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="model spec: alias, HF directory, .gguf file or org/name"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", help="model id clients send (default: the --model spec)")
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
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--trust-remote-code", action="store_true")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from hippocrates.errors import HippoError
    from hippocrates.models import load_model, load_tokenizer, resolve_model

    for flag in ("port", "max_tokens", "max_concurrency", "max_batch", "max_body_kb"):
        if getattr(args, flag) < (0 if flag == "port" else 1):
            raise HippoError(f"--{flag.replace('_', '-')} must be positive")
    _check_port(args.host, args.port)  # fail in a second, not after loading the model
    resolved = resolve_model(args.model)
    tokenizer = load_tokenizer(resolved, trust_remote_code=args.trust_remote_code)
    model = load_model(
        resolved,
        precision=args.precision,
        trust_remote_code=args.trust_remote_code,
        device="cuda" if _has_cuda() else None,
    )
    name = args.served_model_name or args.model
    limits = Limits(args.max_tokens, args.max_concurrency, args.max_batch, args.max_body_kb * 1024)
    app = create_app(model, tokenizer, name, limits, aliases={args.model, resolved.path})
    if not _is_loopback(args.host):
        status(f"warning: listening on {args.host}, reachable from other machines, with no authentication")
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=60,
        access_log=False,
    )
    server = uvicorn.Server(config)
    status(f"serving '{name}' on http://{args.host}:{args.port}/v1 (Ctrl-C to stop)")
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


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
