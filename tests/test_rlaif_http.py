"""The HTTP judge against a small, real, deliberately faulty OpenAI-style server on loopback.

The server's behaviour is chosen by a marker in the patient question: answer, fail once (500 or
429), always fail (503), hang past the client timeout, drip its reply a byte at a time, reply
without a verdict, or reject (400). It never returns log-probabilities. It counts every request
it receives, so the tests can check retries, failure accounting, the cache (nothing answered is
asked again), the fallback to text verdicts and crash safety on the server side.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import served
from hippocrates.config import JudgeSettings
from hippocrates.errors import HippoError
from hippocrates.rlaif.cache import JudgeCache
from hippocrates.rlaif.http_judge import HTTPJudge
from hippocrates.rlaif.judges import JudgeItem, load_rubric

MARKERS = ("OK", "FLAKY", "RATE", "DOWN", "HANG", "GARBLE", "BADREQ")
DRIP_DELAY_S = 0.05  # between the bytes of a dripped reply: each read is quick, the whole reply is not


class FaultyServer(ThreadingHTTPServer):
    daemon_threads = True  # a hanging handler must not block shutdown

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.counts: Counter[str] = Counter()
        self.auth: list[str | None] = []
        self.lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:  # a timed-out client closed the socket
        pass

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    server: FaultyServer

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def reply(self, code: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def answer(self, text: str) -> None:
        self.reply(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})

    def drip(self, text: str) -> None:
        data = json.dumps(
            {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            for byte in data:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(DRIP_DELAY_S)
        except OSError:  # the client gave up
            pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        marker = next((m for m in (*MARKERS, "DRIP", "NOPREFILL") if f"[{m}]" in content), "PREFER-SHORT")
        with self.server.lock:
            self.server.counts[marker] += 1
            self.server.counts["total"] += 1
            self.server.auth.append(self.headers.get("Authorization"))
            seen = self.server.counts[marker]
        if marker == "FLAKY" and seen == 1:
            return self.reply(500, {"error": {"message": "internal error"}})
        if marker == "RATE" and seen == 1:
            return self.reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
        if marker == "DOWN":
            return self.reply(503, {"error": {"message": "overloaded"}})
        if marker == "HANG":
            time.sleep(1.5)
        if marker == "DRIP":
            return self.drip("Verdict: A")
        if marker == "NOPREFILL" and "continue_final_message" in body:  # as OpenAI answers it
            message = "Unrecognized request argument supplied: continue_final_message"
            return self.reply(400, {"error": {"message": message, "param": None, "code": None}})
        if marker == "GARBLE":
            return self.answer("Both answers have merit and it depends.")
        if marker == "BADREQ":
            return self.reply(400, {"error": {"message": "context length exceeded"}})
        if marker == "PREFER-SHORT":  # a consistent judge: the shorter response wins in either order
            a = re.search(r"Response A:\n(.*?)\n\nResponse B:", content, re.S).group(1)
            b = re.search(r"Response B:\n(.*?)\n\nWhich response", content, re.S).group(1)
            return self.answer(f"Verdict: {'A' if len(a) < len(b) else 'B'}\nReason: more concise.")
        return self.answer("Verdict: B\nReason: safer advice." if marker == "FLAKY" else "Verdict: A")


@pytest.fixture
def server() -> Iterator[FaultyServer]:
    with served(FaultyServer()) as srv:
        yield srv


def make_judge(server: FaultyServer, cache: JudgeCache | None, **kw) -> HTTPJudge:
    options = {"timeout_s": 0.3, "max_retries": 1, "concurrency": 4, "verdict": "text", **kw}
    return HTTPJudge(server.base_url, "fake-judge", rubric=load_rubric(), cache=cache, **options)


def test_faults_are_retried_then_counted_and_answers_never_asked_twice(server: FaultyServer, tmp_path: Path):
    items = [JudgeItem(f"Question [{m}]?", "first answer", "second answer") for m in MARKERS]
    cache = JudgeCache(tmp_path / "cache.sqlite")
    judge = make_judge(server, cache)
    verdicts = judge.judge_pairs(items)
    got = {m: v for m, v in zip(MARKERS, verdicts, strict=True)}
    assert [got[m].verdict for m in ("OK", "FLAKY", "RATE")] == ["A", "B", "A"]
    assert got["FLAKY"].reason == "safer advice."
    assert got["DOWN"].verdict is None and got["DOWN"].error.startswith("HTTP 503: overloaded")
    assert got["HANG"].verdict is None and got["HANG"].error == "timeout: no complete answer within 0.3 s"
    assert got["GARBLE"].verdict is None and got["GARBLE"].error.startswith("unparsable verdict")
    assert got["GARBLE"].raw == "Both answers have merit and it depends."
    assert got["BADREQ"].verdict is None and "context length exceeded" in got["BADREQ"].error
    # server side: retries for 5xx/429/timeouts (1 + max_retries), none for 400 or an unparsable reply
    expected = {"OK": 1, "FLAKY": 2, "RATE": 2, "DOWN": 2, "HANG": 2, "GARBLE": 1, "BADREQ": 1}
    assert {m: server.counts[m] for m in MARKERS} == expected
    assert judge.stats["requests"] == sum(expected.values()) and judge.stats["retries"] == 4
    assert judge.stats["answered"] == 3 and judge.stats["failed"] == 4
    assert len(cache) == 3  # only answers are cached

    again = make_judge(server, cache).judge_pairs(items)  # the rerun asks only what failed
    assert [v.cached for v in again[:3]] == [True, True, True]
    assert [v.verdict for v in again[:3]] == ["A", "B", "A"]
    rerun = {m: server.counts[m] - expected[m] for m in MARKERS}
    assert rerun == {"OK": 0, "FLAKY": 0, "RATE": 0, "DOWN": 2, "HANG": 2, "GARBLE": 1, "BADREQ": 1}


def test_a_crash_keeps_every_answer_already_received(server: FaultyServer, tmp_path: Path, monkeypatch):
    items = [JudgeItem(f"Question {i} [OK]?", "a", "b") for i in range(8)]
    cache = JudgeCache(tmp_path / "cache.sqlite")
    real_put, calls = JudgeCache.put, []

    def crashing_put(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        real_put(self, *args)

    monkeypatch.setattr(JudgeCache, "put", crashing_put)
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_judge(server, cache, concurrency=2).judge_pairs(items)
    first_run = server.counts["total"]
    assert len(cache) == first_run - 1  # every answer received is saved, except the one that crashed
    monkeypatch.setattr(JudgeCache, "put", real_put)
    verdicts = make_judge(server, cache).judge_pairs(items)
    assert all(v.verdict == "A" for v in verdicts)
    assert server.counts["total"] - first_run == len(items) - (first_run - 1)  # saved ones are not asked


def test_api_key_goes_only_into_the_header(server: FaultyServer, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HIPPO_TEST_JUDGE_KEY", "sk-test-sekrit")
    config = JudgeSettings(
        backend="http",
        base_url=server.base_url,
        model="fake-judge",
        api_key_env="HIPPO_TEST_JUDGE_KEY",
        timeout_s=0.3,
        max_retries=0,
        verdict="text",
    )
    judge = HTTPJudge.from_config(config, rubric=load_rubric(), cache_path=tmp_path / "c.sqlite")
    verdicts = judge.judge_pairs([JudgeItem("Q [OK]", "a", "b"), JudgeItem("Q [DOWN]", "a", "b")])
    assert server.auth == ["Bearer sk-test-sekrit"] * 2
    shown = repr(judge) + json.dumps(judge.stats) + json.dumps([v.to_dict() for v in verdicts])
    assert "sekrit" not in shown
    monkeypatch.delenv("HIPPO_TEST_JUDGE_KEY")
    with pytest.raises(HippoError, match="HIPPO_TEST_JUDGE_KEY is not set"):
        HTTPJudge.from_config(config, rubric=load_rubric(), cache_path=None)


def test_annotate_with_http_judge_reruns_from_cache(
    server: FaultyServer, tmp_path: Path, tiny_llama_dir: Path, monkeypatch
):
    from hippocrates.cli import main
    from hippocrates.data.io import read_json, read_jsonl

    monkeypatch.setenv("HIPPO_TEST_JUDGE_KEY", "sk-test-sekrit")
    prompts = tmp_path / "q.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(3))
    )
    judge = {
        "backend": "http",
        "base_url": server.base_url,
        "model": "fake-judge",
        "api_key_env": "HIPPO_TEST_JUDGE_KEY",
        "timeout_s": 5,
        "verdict": "text",
    }
    recipe = {
        "name": "http",
        "base_model": str(tiny_llama_dir),
        "output_dir": str(tmp_path / "run"),
        "stages": {
            "annotate": {
                "prompts": str(prompts),
                "n_candidates": 2,
                "max_new_tokens": 4,
                "top_p": 1.0,
                "judge": judge,
            }
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    assert main(["annotate", str(path)]) == 0
    out = tmp_path / "run" / "annotate"
    metrics = read_json(out / "metrics.json")
    asked = server.counts["total"]
    assert asked == metrics["judged_pairs"] * 2 and metrics["consistency_rate"] == 1.0
    assert metrics["corrected_consistency_rate"] is None  # text verdicts: nothing was corrected
    assert metrics["judge_stats"]["annotate"]["asked"] == asked
    prefs = read_jsonl(out / "preferences.jsonl")
    assert len(prefs) == metrics["judged_pairs"] and all(
        len(p["chosen"]) <= len(p["rejected"]) for p in prefs
    )
    assert all(p["reason"] == "more concise." and p["judge"].startswith("http:fake-judge@") for p in prefs)
    assert (tmp_path / "run" / "judge_cache.sqlite").is_file()
    for name in ("metrics.json", "manifest.json", "preferences.jsonl", "set_aside.jsonl"):
        assert "sekrit" not in (out / name).read_text()
    assert main(["annotate", str(path)]) == 0  # same candidates (seeded), every verdict cached
    assert server.counts["total"] == asked
    assert read_json(out / "metrics.json")["judge_stats"]["annotate"]["cache_hits"] == asked


def test_auto_mode_falls_back_to_text_verdicts_and_says_so(server: FaultyServer, tmp_path: Path):
    items = [JudgeItem(f"Question {i}?", "a short answer", "a much longer answer") for i in range(3)]
    judge = make_judge(server, JudgeCache(tmp_path / "c.sqlite"), verdict="auto", concurrency=1)
    verdicts = judge.judge_pairs(items)
    assert [v.verdict for v in verdicts] == ["A", "A", "A"] and {v.source for v in verdicts} == {"text"}
    assert judge.stats["verdicts"] == {"logprobs": 0, "text": 3}
    # one request learnt that the endpoint gives no log-probabilities; later items went straight to text
    assert judge.stats["logprob_fallbacks"] == {"the endpoint returned no log-probabilities": 3}
    assert server.counts["total"] == 3 + 1 == judge.stats["requests"]
    strict = make_judge(server, None, verdict="logprobs", concurrency=1).judge_pairs(items[:1])
    assert strict[0].verdict is None and strict[0].error.startswith("no log-prob verdict")


def test_auto_mode_tells_a_refused_logprob_request_from_a_refused_item(server: FaultyServer):
    refused = [JudgeItem(f"Question [NOPREFILL] {i}?", "a", "bb") for i in range(3)]
    judge = make_judge(server, None, verdict="auto", concurrency=1)
    assert [v.verdict for v in judge.judge_pairs(refused)] == ["A", "A", "A"]
    reason = "HTTP 400: Unrecognized request argument supplied: continue_final_message"
    assert judge.stats["logprob_fallbacks"] == {reason: 3} and server.counts["NOPREFILL"] == 3 + 1
    # a 400 about the item itself (too long) is not the endpoint's answer for every item
    judge = make_judge(server, None, verdict="auto", concurrency=1)
    verdicts = judge.judge_pairs(
        [JudgeItem("Question [BADREQ]?", "a", "b"), JudgeItem("Question 2?", "a", "bb")]
    )
    assert verdicts[0].error == "HTTP 400: context length exceeded" and verdicts[1].verdict == "A"
    assert server.counts["BADREQ"] == 2  # log-probs refused for this item, then its text request too
    assert judge.stats["logprob_fallbacks"] == {
        "HTTP 400: context length exceeded": 1,
        "the endpoint returned no log-probabilities": 1,
    }


def test_the_timeout_is_a_deadline_for_the_whole_reply(server: FaultyServer):
    """A server that drips its (valid) reply keeps every read short; the deadline still ends it."""
    judge = make_judge(server, None, timeout_s=0.5, max_retries=0)
    (verdict,) = judge.judge_pairs([JudgeItem("Question [DRIP]?", "a", "b")])
    assert verdict.verdict is None and verdict.error == "timeout: no complete answer within 0.5 s"
    assert judge.stats["errors"] == {"timeout": 1} and server.counts["DRIP"] == 1


@pytest.mark.parametrize(
    "down, share, failure",
    [
        (2, None, "4 of 4 judge calls failed (HTTP 503: 4): every call failed"),
        (2, 1.0, "4 of 4 judge calls failed (HTTP 503: 4): every call failed"),
        (1, None, None),  # the default fails only when every call failed
        (1, 0.25, "2 of 4 judge calls failed (HTTP 503: 2): more than judge.max_failed_share=0.25"),
    ],
)
def test_annotate_fails_when_too_many_judge_calls_fail(
    server: FaultyServer, tmp_path: Path, tiny_llama_dir: Path, capsys, down: int, share, failure
):
    from hippocrates.cli import main

    prompts = tmp_path / "q.jsonl"
    questions = [f"Question {'[DOWN] ' if i < down else ''}{i}?" for i in range(2)]
    prompts.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": q}) + "\n" for i, q in enumerate(questions))
    )
    judge = {"backend": "http", "base_url": server.base_url, "model": "fake-judge", "max_retries": 0,
             "verdict": "text", "max_failed_share": share}  # fmt: skip
    recipe = {"name": "dead", "base_model": str(tiny_llama_dir), "output_dir": str(tmp_path / "run"),
              "stages": {"annotate": {"prompts": str(prompts), "n_candidates": 2, "max_new_tokens": 4,
                                      "judge": judge}}}  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    code = main(["annotate", str(path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hippo annotate")]
    if failure is None:
        assert code == 0 and err == [] and (tmp_path / "run" / "annotate" / "metrics.json").is_file()
        return
    assert code == 2 and len(err) == 1 and f"annotate: {failure}" in err[0], err
    assert not (tmp_path / "run" / "annotate").exists()
