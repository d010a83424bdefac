"""``hippo serve`` as a real subprocess on loopback with the embedded model: the OpenAI-style API,
clear 4xx errors, saturation, the HTTP judge against it (with its cache), and graceful shutdown.

The server is started once for the module and stopped by the last test (SIGTERM while a request
is in flight); the fixture kills it if a test failed before that. It runs on one thread: on the
shared 2-core test machine two OpenMP threads stall each other and make it several times slower.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hippocrates.data.io import read_jsonl
from hippocrates.rlaif.cache import JudgeCache
from hippocrates.rlaif.http_judge import HTTPJudge
from hippocrates.rlaif.judges import JudgeItem, load_rubric

LABELS = Path(__file__).resolve().parents[1] / "data" / "demo" / "preferences" / "human_labels.jsonl"
NAME = "smollm2"


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/v1/stats", timeout=10).json()

    def chat(self, timeout: float = 120, **body) -> httpx.Response:
        body.setdefault("messages", [{"role": "user", "content": "What is a normal body temperature?"}])
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(embedded_model_dir: Path, tmp_path_factory) -> Iterator[Server]:
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "hippocrates.cli", "serve", "--model", str(embedded_model_dir),
           "--served-model-name", NAME, "--port", str(port), "--max-tokens", "64",
           "--max-concurrency", "3", "--max-batch", "4", "--max-body-kb", "64"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        )
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


def test_models_and_health(server: Server):
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
    assert models["object"] == "list" and models["data"][0]["id"] == NAME
    assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"


def test_greedy_completion_is_deterministic_and_counted(server: Server):
    before = server.stats()
    first = server.chat(temperature=0, max_tokens=6, model=NAME)
    second = server.chat(temperature=0, max_tokens=6, seed=123)
    assert first.status_code == second.status_code == 200, first.text
    a, b = first.json(), second.json()
    assert a["object"] == "chat.completion" and a["model"] == NAME
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"] != ""
    assert a["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < a["usage"]["completion_tokens"] <= 6 and a["usage"]["prompt_tokens"] > 5
    after = server.stats()
    assert after["requests"] - before["requests"] == 2 and after["completions"] - before["completions"] == 2


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({}, 400, "'messages' is required"),
        ({"messages": "hello"}, 400, "messages"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000},
            400,
            "max_tokens must be <= 64",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "stream": True}, 400, "stream"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, "not served here"),
        ({"messages": [{"role": "user", "content": "x" * 70_000}]}, 413, "larger than the limit"),
        ({"messages": [{"role": "user", "content": "hello " * 9000}]}, 400, "exceeds the model's context"),
    ],
)
def test_bad_requests_get_one_clear_json_error(server: Server, body: dict, status: int, message: str):
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"] and error["code"] == status


def test_malformed_json_and_unknown_routes(server: Server):
    bad = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", timeout=30)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    missing = httpx.get(f"{server.url}/v1/nothing", timeout=30)
    assert missing.status_code == 404 and "error" in missing.json()


def test_saturated_server_answers_429(server: Server):
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def call() -> None:
        response = server.chat(temperature=0, max_tokens=12)
        with lock:
            results.append(response)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    codes = sorted(r.status_code for r in results)
    assert len(codes) == 8 and codes.count(200) >= 3 and 429 in codes, codes
    busy = next(r for r in results if r.status_code == 429)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"
    assert server.stats()["max_batch_seen"] >= 2  # concurrent requests were generated together


def test_http_judge_against_hippo_serve_and_cache(server: Server, tmp_path: Path):
    row = read_jsonl(LABELS)[1]  # chest pain: reassurance vs calling emergency services
    items = [JudgeItem(row["prompt"], row["response_a"], row["response_b"]),
             JudgeItem(row["prompt"], row["response_b"], row["response_a"])]  # fmt: skip
    cache = JudgeCache(tmp_path / "cache.sqlite")
    before = server.stats()["requests"]
    judge = HTTPJudge(f"{server.url}/v1", NAME, rubric=load_rubric(), max_tokens=8, concurrency=2,
                      timeout_s=120, cache=cache)  # fmt: skip
    verdicts = judge.judge_pairs(items)
    assert len(verdicts) == 2 and server.stats()["requests"] - before == judge.stats["requests"] == 2
    assert judge.stats["answered"] == 2, [v.error for v in verdicts]  # the reply is parsed to A/B/tie
    middle = server.stats()["requests"]
    again = HTTPJudge(f"{server.url}/v1", NAME, rubric=load_rubric(), max_tokens=8, cache=cache)
    cached = again.judge_pairs(items)
    assert server.stats()["requests"] == middle  # the second run asks nothing
    assert [v.verdict for v in cached] == [v.verdict for v in verdicts] and all(v.cached for v in cached)


def test_sigterm_finishes_the_request_in_flight_then_exits_0(server: Server):
    """Runs last: stops the module's server."""
    result: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: result.update(r=server.chat(temperature=0, max_tokens=16)))
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
