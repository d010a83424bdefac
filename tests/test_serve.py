"""``hippo serve`` as a real subprocess on loopback with the embedded model, driven by the official
``openai`` client: chat and text completions, streaming, log-probabilities, stop strings, API keys,
OpenAI-shaped 4xx errors, concurrency, saturation, both HTTP judges (log-prob verdicts equal the
local judge's), and graceful shutdown.

The server is started once for the module and stopped by the last test (SIGTERM while a request
is in flight); the fixture kills it if a test failed before that. It runs on one thread: on the
shared 2-core test machine two OpenMP threads stall each other and make it several times slower.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from hippocrates.cli import main
from hippocrates.data.io import read_jsonl
from hippocrates.rlaif.cache import JudgeCache
from hippocrates.rlaif.http_judge import HTTPJudge
from hippocrates.rlaif.judges import JudgeItem, Rubric, load_rubric

LABELS = Path(__file__).resolve().parents[1] / "data" / "demo" / "preferences" / "human_labels.jsonl"
NAME = "smollm2"
KEY = "test-key-7f3a"
QUESTION = [{"role": "user", "content": "What is a normal body temperature?"}]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log
        self.auth = {"Authorization": f"Bearer {KEY}"}

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=120, **kw)

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/v1/stats", headers=self.auth, timeout=10).json()

    def post(self, path: str, body: dict, timeout: float = 120) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/{path}", json=body, headers=self.auth, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(embedded_model_dir: Path, tmp_path_factory) -> Iterator[Server]:
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "hippocrates.cli", "serve", "--model", str(embedded_model_dir),
           "--served-model-name", NAME, "--port", str(port), "--max-tokens", "64",
           "--max-concurrency", "4", "--max-batch", "4", "--max-body-kb", "64"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HIPPO_API_KEY": KEY}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    srv = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"hippo serve exited early:\n{log.read_text()}"
            try:
                if httpx.get(f"{srv.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            pytest.fail(f"hippo serve did not come up in 180 s:\n{log.read_text()}")
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def test_busy_port_is_a_one_line_error_before_loading_the_model():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "hippocrates.cli",
            "serve",
            "--model",
            "/nonexistent",
            "--port",
            str(port),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"hippo serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "70000"], "--port must be between 1 and 65535 (got 70000)"),
        (["--port", "0"], "--port must be between 1 and 65535 (got 0)"),
        (["--threads", "0"], "--threads must be between 1 and 4096 (got 0)"),
        (["--max-batch", "-1"], "--max-batch must be between 1 and 4096 (got -1)"),
        (["--max-body-kb", "0"], "--max-body-kb must be between 1 and 1048576 (got 0)"),
        (["--host", "0.0.0.0"], "--host 0.0.0.0 is reachable from other machines: set an API key"),
    ],
)
def test_bad_flags_are_one_line_errors_before_loading(flags: list[str], message: str, capsys, monkeypatch):
    monkeypatch.delenv("HIPPO_API_KEY", raising=False)
    assert main(["serve", "--model", "/nonexistent", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hippo serve: error: {message}") and "\n" not in err


def test_models_health_and_keys(server: Server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4")
    assert missing.value.body["code"] == "model_not_found"
    assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"  # no key needed
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        refused = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10)
        error = refused.json()["error"]
        assert refused.status_code == 401 and error["code"] == "invalid_api_key", refused.text
        assert set(error) == {"message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_greedy_chat_is_deterministic_and_counted(server: Server):
    client, before = server.client(), server.stats()
    first = client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0, max_tokens=6)
    second = client.chat.completions.create(
        messages=QUESTION, model=NAME, temperature=0, max_tokens=6, seed=123
    )
    assert first.object == "chat.completion" and first.model == NAME
    assert first.choices[0].message.content == second.choices[0].message.content != ""
    assert first.choices[0].finish_reason in ("stop", "length")
    assert 0 < first.usage.completion_tokens <= 6 and first.usage.prompt_tokens > 5
    after = server.stats()
    assert after["requests"] - before["requests"] == 2 and after["completions"] - before["completions"] == 2


def test_streaming_chat_sends_the_same_text_in_chunks(server: Server):
    client = server.client()
    whole = client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0, max_tokens=10)
    stream = client.chat.completions.create(
        model=NAME, messages=QUESTION, temperature=0, max_tokens=10, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) > 3
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_logprobs_cover_the_reply(server: Server):
    reply = server.client().chat.completions.create(
        model=NAME, messages=QUESTION, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    choice = reply.choices[0]
    tokens = choice.logprobs.content
    assert len(tokens) == reply.usage.completion_tokens
    assert "".join(t.token for t in tokens).startswith(choice.message.content)
    for t in tokens:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0 and bytes(t.bytes).decode() == t.token
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen token is the most likely
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
    plain = server.client().chat.completions.create(
        model=NAME, messages=QUESTION, temperature=0, max_tokens=6
    )
    assert plain.choices[0].logprobs is None


def test_text_completions_with_logprobs_and_streaming(server: Server):
    client = server.client()
    prompt = "The normal resting heart rate of an adult is"
    reply = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=8, logprobs=2)
    choice = reply.choices[0]
    assert reply.object == "text_completion" and choice.text and reply.usage.completion_tokens == 8
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.token_logprobs) == 8
    assert lp.text_offset == [len("".join(lp.tokens[:k])) for k in range(8)]
    assert all(
        len(top) <= 2 and max(top, key=top.get) == tok
        for top, tok in zip(lp.top_logprobs, lp.tokens, strict=True)
    )
    streamed = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    default = client.completions.create(model=NAME, prompt=prompt, temperature=0)  # OpenAI's default: 16
    assert default.usage.completion_tokens <= 16


def test_stop_strings_end_generation_and_usage_counts_what_was_generated(server: Server):
    client = server.client()
    full = client.completions.create(model=NAME, prompt="List three symptoms of flu:", temperature=0,
                                     max_tokens=24, logprobs=0)  # fmt: skip
    text, tokens = full.choices[0].text, full.choices[0].logprobs.tokens
    words = re.findall(r" [a-z]{4,}", text)
    assert len(words) >= 2, text
    stop = words[1]  # a word some tokens into the reply
    cut = text.index(stop)
    generated = next(k for k in range(len(tokens)) if len("".join(tokens[: k + 1])) >= cut + len(stop)) + 1
    for stream in (False, True):
        reply = client.completions.create(model=NAME, prompt="List three symptoms of flu:", temperature=0,
                                          max_tokens=24, stop=[stop, "zzzz"], stream=stream,
                                          stream_options={"include_usage": True} if stream else None)  # fmt: skip
        if stream:
            chunks = list(reply)
            got = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = next(
                c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
            )
            used = chunks[-1].usage.completion_tokens
        else:
            got, finish, used = (
                reply.choices[0].text,
                reply.choices[0].finish_reason,
                reply.usage.completion_tokens,
            )
        assert got == text[:cut] and finish == "stop"
        assert used == generated < 24  # generation stopped there; later tokens were never made


@pytest.mark.parametrize(
    "path, body, status, param, message",
    [
        ("chat/completions", {}, 400, "messages", "'messages' is required"),
        ("chat/completions", {"messages": "hello"}, 400, "messages", "messages"),
        ("chat/completions", {"messages": []}, 400, "messages", "messages"),
        ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages", "messages.0.content"),
        ("chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages", "messages.0.role"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "x"}]}, 400, "messages",
         "messages.0.name"),
        ("chat/completions", {"temperature": "hot"}, 400, "temperature", "temperature"),
        ("chat/completions", {"max_tokens": 1000}, 400, "max_tokens", "max_tokens must be <= 64"),
        ("chat/completions", {"n": 2}, 400, "n", "n"),
        ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
         "'tools' is not supported"),
        ("chat/completions", {"response_format": {"type": "json_object"}}, 400, "response_format",
         "not supported"),
        ("chat/completions", {"logit_bias": {"50256": -100}}, 400, "logit_bias", "not supported"),
        ("chat/completions", {"frequency_penalty": 0.5}, 400, "frequency_penalty", "not supported"),
        ("chat/completions", {"guided_json": {}}, 400, "guided_json", "unknown field 'guided_json'"),
        ("chat/completions", {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "top_logprobs"),
        ("chat/completions", {"top_logprobs": 2}, 400, "top_logprobs", "needs logprobs: true"),
        ("chat/completions", {"stop": [""]}, 400, "stop", "non-empty"),
        ("chat/completions", {"seed": 2**70}, 400, "seed", "seed"),
        ("chat/completions", {"continue_final_message": True}, 400, "add_generation_prompt",
         "add_generation_prompt: false"),
        ("chat/completions", {"model": "gpt-4"}, 404, "model", "not served here"),
        ("chat/completions", {"messages": [{"role": "user", "content": "x" * 70_000}]}, 413, None,
         "larger than the limit"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hello " * 9000}]}, 400, "messages",
         "exceeds the model's context"),
        ("completions", {}, 400, "prompt", "'prompt' is required"),
        ("completions", {"prompt": ["a", "b"]}, 400, "prompt", "one prompt per request"),
        ("completions", {"prompt": "hi", "echo": True}, 400, "echo", "not supported"),
        ("completions", {"prompt": "hi", "best_of": 3}, 400, "best_of", "not supported"),
        ("completions", {"prompt": ""}, 400, "prompt", "empty"),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_error_objects(
    server: Server, path: str, body: dict, status: int, param: str | None, message: str
):
    if path == "chat/completions" and param != "messages":
        body = {"messages": [{"role": "user", "content": "hi"}], **body}
    response = server.post(path, body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (
        message in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"
    )
    assert error["code"] is None or isinstance(error["code"], str)
    rid = response.headers["x-request-id"]
    assert f"request {rid} failed: {status}" in server.log.read_text()  # one log line per failed request


def test_malformed_json_and_unknown_routes(server: Server):
    bad = httpx.post(
        f"{server.url}/v1/chat/completions", content=b"{not json", headers=server.auth, timeout=30
    )
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    missing = httpx.get(f"{server.url}/v1/nothing", headers=server.auth, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] is None


def test_concurrent_requests_from_threads_all_succeed(server: Server):
    """Requests tokenized while the model thread decodes other streams: never a 500."""
    errors_before = server.stats()["errors"]
    client, failures, texts = server.client(), [], {}

    def work(k: int) -> None:
        try:
            for round_ in range(2):
                if (k + round_) % 3 == 0:
                    stream = client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0,
                                                            max_tokens=6, stream=True, stop=["\n"])  # fmt: skip
                    texts.setdefault("stream", set()).add(
                        "".join(c.choices[0].delta.content or "" for c in stream)
                    )
                elif (k + round_) % 3 == 1:
                    reply = client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0,
                                                           max_tokens=6, stop=["\n"], logprobs=True)  # fmt: skip
                    texts.setdefault("chat", set()).add(reply.choices[0].message.content)
                else:
                    client.completions.create(
                        model=NAME, prompt=f"Fever number {k}", max_tokens=4, logprobs=1
                    )
        except Exception as exc:  # collected: the assertion below shows them
            failures.append(repr(exc))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]  # = --max-concurrency
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert failures == [] and server.stats()["errors"] == errors_before
    assert all(texts["stream"]) and all(texts["chat"])


def test_saturated_server_answers_429(server: Server):
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def call() -> None:
        response = server.post("chat/completions", {"messages": QUESTION, "temperature": 0, "max_tokens": 8})
        with lock:
            results.append(response)

    threads = [threading.Thread(target=call) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    codes = sorted(r.status_code for r in results)
    assert len(codes) == 10 and codes.count(200) >= 4 and 429 in codes, codes
    busy = next(r for r in results if r.status_code == 429)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"
    assert server.stats()["max_batch_seen"] >= 2  # concurrent requests were generated together


@pytest.fixture(scope="module")
def short_rubric(tmp_path_factory) -> Rubric:
    """A one-line rubric: judge prompts of ~150 tokens instead of ~550 keep these tests quick."""
    path = tmp_path_factory.mktemp("rubric") / "rubric.md"
    path.write_text("rubric_version: test-1\nPrefer the answer that is safer and more accurate.\n")
    return load_rubric(path)


def label_items(n: int) -> list[JudgeItem]:
    rows = read_jsonl(LABELS)[:n]
    return [JudgeItem(r["prompt"], *o) for r in rows
            for o in ((r["response_a"], r["response_b"]), (r["response_b"], r["response_a"]))]  # fmt: skip


def test_http_logprob_verdicts_equal_the_local_judge(
    server: Server, embedded_model_dir: Path, short_rubric: Rubric, tmp_path: Path
):
    import torch

    from hippocrates.models import load_model, load_tokenizer
    from hippocrates.rlaif.local_judge import LocalJudge

    items = label_items(2)
    cache = JudgeCache(tmp_path / "cache.sqlite")
    http = HTTPJudge(f"{server.url}/v1", NAME, rubric=short_rubric, api_key=KEY, verdict="logprobs",
                     concurrency=4, timeout_s=120, cache=cache)  # fmt: skip
    remote = http.judge_pairs(items)
    assert http.stats["verdicts"] == {"logprobs": 4, "text": 0} and http.stats["failed"] == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = load_model(str(embedded_model_dir)), load_tokenizer(str(embedded_model_dir))
        local = LocalJudge(model, tok, rubric=short_rubric, tie_threshold=0.02).judge_pairs(items)
    finally:
        torch.set_num_threads(threads)
    assert [v.verdict for v in remote] == [v.verdict for v in local]
    assert [v.raw_verdict for v in remote] == [v.raw_verdict for v in local]
    for r, lo in zip(remote, local, strict=True):
        assert r.scores["logp_a"] == pytest.approx(lo.scores["logp_a"], abs=1e-3)
        assert r.scores["logp_b"] == pytest.approx(lo.scores["logp_b"], abs=1e-3)
    asked = server.stats()["requests"]
    again = HTTPJudge(f"{server.url}/v1", NAME, rubric=short_rubric, api_key=KEY, cache=cache)
    assert [v.verdict for v in again.judge_pairs(items)] == [v.verdict for v in remote]
    assert server.stats()["requests"] == asked and again.stats["cache_hits"] == 4  # all cached


def test_http_text_verdicts_against_hippo_serve_and_cache(
    server: Server, short_rubric: Rubric, tmp_path: Path
):
    items = label_items(2)[2:]  # chest pain: reassurance vs calling emergency services, both orders
    cache = JudgeCache(tmp_path / "cache.sqlite")
    before = server.stats()["requests"]
    judge = HTTPJudge(f"{server.url}/v1", NAME, rubric=short_rubric, api_key=KEY, verdict="text",
                      max_tokens=4, concurrency=2, timeout_s=120, cache=cache)  # fmt: skip
    verdicts = judge.judge_pairs(items)
    assert len(verdicts) == 2 and server.stats()["requests"] - before == judge.stats["requests"] == 2
    assert judge.stats["answered"] == 2, [v.error for v in verdicts]  # the reply is parsed to A/B/tie
    assert all(v.source == "text" for v in verdicts)
    middle = server.stats()["requests"]
    again = HTTPJudge(f"{server.url}/v1", NAME, rubric=short_rubric, api_key=KEY, verdict="text", cache=cache)
    cached = again.judge_pairs(items)
    assert server.stats()["requests"] == middle  # the second run asks nothing
    assert [v.verdict for v in cached] == [v.verdict for v in verdicts] and all(v.cached for v in cached)


def test_sigterm_finishes_the_request_in_flight_then_exits_0(server: Server):
    """Runs last: stops the module's server."""
    result: dict[str, httpx.Response] = {}
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 16}
    thread = threading.Thread(target=lambda: result.update(r=server.post("chat/completions", body)))
    thread.start()
    deadline = time.monotonic() + 30
    while server.stats()["in_flight"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    thread.join(timeout=120)
    assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["message"]["content"]
    assert server.proc.wait(timeout=60) == 0
    assert "server stopped" in server.log.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=2)
