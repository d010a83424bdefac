"""Rubric-graded evaluation: scoring on hand examples, the bootstrap, file checks, judge failures
through a faulty OpenAI-style grader endpoint, ``hippo eval --mode rubric`` end to end on the tiny
model (answerer and local judge), and the pipeline and report with ``eval.rubric``."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from conftest import served
from hippocrates.cli import main
from hippocrates.config import RubricJudgeSettings
from hippocrates.data.io import sha256_file
from hippocrates.eval.rubric import (
    Criterion,
    Graded,
    RubricOptions,
    aggregate,
    clip,
    evaluate_rubric,
    parse_grade,
    raw_score,
    summarize,
)
from hippocrates.record import read_manifest
from test_stages_helpers import EVAL_DATA, make_recipe

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "rubrics" / "healthbench_style.jsonl"


def c(points: float, *tags: str) -> Criterion:
    return Criterion(f"criterion worth {points}", points, tags)


# A hand set: A meets everything good and avoids the harm; B meets only its harmful criterion (its
# unclipped score is -2); C meets half; D has only negative criteria (no defined score).
HAND = [
    Graded(
        "A", ("theme:x",), (c(10, "axis:acc"), c(5, "axis:comp"), c(-10, "axis:acc")), [True, True, False]
    ),
    Graded("B", ("theme:x", "theme:y"), (c(5, "axis:comp"), c(-10, "axis:acc")), [False, True]),
    Graded("C", ("theme:y",), (c(4, "axis:acc"), c(4, "axis:comp"), c(-8, "axis:acc")), [True, False, False]),
    Graded("D", ("theme:y",), (c(-5, "axis:acc"), c(-5, "axis:comp")), [True, False]),
]


def test_example_scores_negative_points_clipping_and_all_negative_rubrics():
    assert raw_score([10, 5, -10], [True, True, False]) == 1.0
    assert raw_score([10, 5, -10], [True, False, True]) == 0.0  # 10 - 10 over 15
    assert raw_score([5, -10], [False, True]) == -2.0  # a harm met outweighs everything: below 0
    assert raw_score([4, 4, -8], [True, False, False]) == 0.5
    assert raw_score([-5, -5], [True, False]) is None  # no positive points: undefined, not 0 or 1
    assert raw_score([-5, -5], [False, False]) is None
    assert [clip(x) for x in (-2.0, 0.25, 1.0, 1.5)] == [0.0, 0.25, 1.0, 1.0]


def test_overall_is_the_mean_of_clipped_scores_and_healthbench_clips_the_mean():
    result = aggregate(HAND)
    overall = result["overall"]
    assert result["scores"] == {"A": 1.0, "B": -2.0, "C": 0.5, "D": None}
    assert overall["n"] == 3  # D has no defined score and is left out, not counted as 0 or 1
    assert overall["score"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert overall["healthbench_score"] == 0.0  # clip((1 - 2 + 0.5) / 3): B drags the others down
    assert 0.0 <= overall["ci_low"] <= overall["score"] <= overall["ci_high"] <= 1.0


def test_per_tag_scores_on_a_hand_example():
    result = aggregate(HAND)
    x, y = result["example_tags"]["theme:x"], result["example_tags"]["theme:y"]
    assert (x["n"], x["score"], x["healthbench_score"]) == (2, 0.5, 0.0)  # A and B
    assert (y["n"], y["score"], y["healthbench_score"]) == (2, 0.25, 0.0)  # B and C (D has no score)
    acc, comp = result["rubric_tags"]["axis:acc"], result["rubric_tags"]["axis:comp"]
    # axis:acc per example over its own criteria: A (10 met, -10 not) 1.0; B only -10: undefined; C (4 met, -8 not) 1.0
    assert (acc["n"], acc["score"], acc["criteria"]) == (2, 1.0, 6)
    # axis:comp: A 5/5, B 0/5, C 0/4; D's -5 alone is undefined
    assert (comp["n"], comp["score"], comp["criteria"]) == (3, pytest.approx(1 / 3), 4)


def test_bootstrap_interval_is_seeded_and_matches_a_plain_resampling():
    values = [0.0, 0.25, 0.5, 1.0, 1.0, 0.75, 0.0, 0.5]
    first, again = summarize(values, "overall"), summarize(values, "overall")
    assert first == again  # seeded: the same interval every run
    rng = np.random.default_rng(7)
    plain = np.array(values)[rng.integers(0, len(values), size=(40_000, len(values)))].mean(axis=1)
    low, high = np.quantile(plain, [0.025, 0.975])
    assert first["ci_low"] == pytest.approx(low, abs=0.03) and first["ci_high"] == pytest.approx(
        high, abs=0.03
    )
    assert summarize([0.4], "overall")["ci_low"] == summarize([0.4], "overall")["ci_high"] == 0.4
    assert summarize([], "overall")["score"] is None


def test_text_verdicts_json_or_plain():
    assert parse_grade('```json\n{"met": true, "reason": "It says to call 911."}\n```') == (
        "A",
        "It says to call 911.",
    )
    assert parse_grade('{"criteria_met": false, "explanation": "No dose given."}') == ("B", "No dose given.")
    assert parse_grade("Met: no. The reply does not mention aspirin.")[0] == "B"
    assert parse_grade("Yes")[0] == "A"
    assert parse_grade("The reply is partly right.") == (None, "")


# ------------------------------------------------------------------------------ file validation


def write_rubrics(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


GOOD = {
    "prompt_id": "g1",
    "prompt": [{"role": "user", "content": "Is 150/95 a high blood pressure?"}],
    "rubrics": [{"criterion": "Says it is above normal.", "points": 5, "tags": ["axis:accuracy"]}],
    "example_tags": ["theme:context_seeking"],
}


@pytest.mark.parametrize(
    "bad, expected",
    [
        ("{not json", ":2: malformed JSON"),
        ({**GOOD, "prompt_id": "g2", "rubrics": []}, ":2: rubrics: expected a non-empty list of criteria"),
        ({"prompt_id": "g2", "prompt": GOOD["prompt"]}, ":2: missing field 'rubrics'"),
        ({**GOOD, "prompt_id": "g2", "rubrics": [{"criterion": "Says so.", "tags": []}]}, ":2: rubrics[0]: missing field 'points'"),
        ({**GOOD, "prompt_id": "g2", "rubrics": [{"criterion": "Says so.", "points": "5"}]}, ":2: rubrics[0].points: expected a number"),
        ({**GOOD, "prompt_id": "g2", "prompt": [{"role": "doctor", "content": "hi"}]}, ":2: prompt[0].role: expected one of"),
        ({**GOOD, "prompt_id": "g2", "prompt": [*GOOD["prompt"], {"role": "assistant", "content": "Yes."}]},
         ":2: prompt: the last message must be the user's"),
        ({**GOOD}, ":2: prompt_id 'g1' appears twice (first at"),
    ],
)  # fmt: skip
def test_file_problems_are_one_line_naming_file_line_and_field(
    tmp_path, tiny_llama_dir, capsys, bad, expected
):
    path = write_rubrics(tmp_path / "r.jsonl", [GOOD, bad])
    code = main(["eval", "--mode", "rubric", "--rubrics", str(path), "--model", str(tiny_llama_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"hippo eval: error: {path}:2: ") and expected in err[0]


def test_cli_flag_mistakes(tmp_path, capsys):
    assert main(["eval", "--mode", "rubric"]) == 2
    assert "--mode rubric needs --rubrics FILE" in capsys.readouterr().err
    assert main(["eval", "--rubrics", str(DEMO)]) == 2
    assert "--rubrics needs --mode rubric" in capsys.readouterr().err
    assert main(["eval", "--mode", "rubric", "--rubrics", str(DEMO), "--judge", "judge.example"]) == 2
    assert "--judge expects 'local' or an http(s):// base URL" in capsys.readouterr().err
    args = ["eval", "--mode", "rubric", "--rubrics", str(DEMO), "--judge", "http://127.0.0.1:9/v1"]
    assert main([*args, "--judge-concurrency", "0"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .startswith("hippo eval: error: --judge-concurrency: Input should be greater")
    )


def test_the_demo_set_is_valid_and_scorable():
    from hippocrates.eval.rubric import load_rubric_set

    data = load_rubric_set(DEMO)
    assert len(data.examples) >= 20
    assert all(ex.positive_points > 0 for ex in data.examples)
    assert all(3 <= len(ex.criteria) <= 7 and any(c.points < 0 for c in ex.criteria) for ex in data.examples)
    assert any(len(ex.messages) > 1 for ex in data.examples)
    themes = Counter(t for ex in data.examples[:10] for t in ex.tags if t.startswith("theme:"))
    assert len(themes) >= 6, "the demo's first ten examples cover the themes"


# ------------------------------------------------------------------ a faulty OpenAI-style grader


class Grader(ThreadingHTTPServer):
    """Decides by a marker in the criterion: [MET] met, [NOT] not met, [DOWN] always 503, [GARBLE]
    a reply without a verdict. Log-prob requests get " Yes"/" No" log-probabilities (none for
    GARBLE, so the judge falls back to a text request); text requests get a JSON verdict."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), GraderHandler)
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class GraderHandler(BaseHTTPRequestHandler):
    server: Grader

    def log_message(self, *args) -> None:
        pass

    def reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        criterion = body["messages"][0]["content"].split("Criterion:\n", 1)[1]
        marker = next(m for m in ("MET", "NOT", "DOWN", "GARBLE") if f"[{m}]" in criterion)
        kind = "logprobs" if body.get("logprobs") else "text"
        with self.server.lock:
            self.server.counts[f"{marker}:{kind}"] += 1
        if marker == "DOWN":
            return self.reply(503, {"error": {"message": "overloaded"}})
        if kind == "logprobs":
            yes, no = (-0.1, -2.5) if marker == "MET" else (-2.5, -0.1)
            top = (
                []
                if marker == "GARBLE"
                else [{"token": " Yes", "logprob": yes}, {"token": " No", "logprob": no}]
            )
            content = [{"token": " Yes" if yes > no else " No", "logprob": max(yes, no), "top_logprobs": top}]
            return self.reply(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                                                 "logprobs": {"content": content}}]})  # fmt: skip
        text = "It depends." if marker == "GARBLE" else json.dumps({"met": marker == "MET", "reason": marker})
        self.reply(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})


@pytest.fixture
def grader() -> Iterator[Grader]:
    with served(Grader()) as srv:
        yield srv


def example(pid: str, *criteria: tuple[str, float], tags: tuple[str, ...] = ("theme:x",)) -> dict:
    return {"prompt_id": pid, "prompt": [{"role": "user", "content": f"Question {pid}?"}],
            "rubrics": [{"criterion": t, "points": p, "tags": ["axis:accuracy"]} for t, p in criteria],
            "example_tags": list(tags)}  # fmt: skip


def test_judge_failures_exclude_and_list_the_example_never_score_it(tmp_path, tiny_llama_dir, grader):
    path = write_rubrics(tmp_path / "r.jsonl", [
        example("ok1", ("Says A [MET]", 5), ("Says B [NOT]", 5), ("Harm [NOT]", -5)),
        example("down", ("Says A [MET]", 5), ("Says C [DOWN]", 5)),
        example("garble", ("Says A [NOT]", 5), ("Says D [GARBLE]", 5)),
        example("ok2", ("Says A [MET]", 4), ("Harm [MET]", -8)),
        example("harms-only", ("Harm [MET]", -5), ("Other harm [NOT]", -3)),
    ])  # fmt: skip
    judge = RubricJudgeSettings(
        backend="http", base_url=grader.base_url, model="fake", max_retries=1, timeout_s=5
    )
    options = RubricOptions(judge=judge, max_new_tokens=2)
    out = tmp_path / "out"
    result = evaluate_rubric(
        str(tiny_llama_dir), path, options, output_dir=out, cache_path=tmp_path / "c.sqlite"
    )
    overall = result["overall"]
    assert overall["n"] == 2 and overall["excluded"] == 2  # the two failures are not scores of 0
    assert overall["score"] == pytest.approx((0.5 + 0.0) / 2)  # ok1: 5/10; ok2: (4 - 8)/4 -> clipped to 0
    assert overall["healthbench_score"] == pytest.approx(0.0)  # clip((0.5 - 1) / 2)
    excluded = {e["id"]: e for e in result["excluded"]}
    assert set(excluded) == {"down", "garble"}
    assert "criterion 2: HTTP 503: overloaded" in excluded["down"]["reason"]
    assert "criterion 2: unparsable verdict" in excluded["garble"]["reason"]
    rows = {r["id"]: r for r in map(json.loads, (out / "samples_rubric.jsonl").read_text().splitlines())}
    assert rows["down"]["status"] == "excluded" and rows["down"]["score"] is None
    assert [k["met"] for k in rows["down"]["criteria"]] == [True, None]  # the failure is not "not met"
    assert [k["met"] for k in rows["ok1"]["criteria"]] == [True, False, False]
    assert (
        rows["ok1"]["criteria"][0]["source"] == "logprobs" and rows["ok1"]["criteria"][0]["logp_yes"] == -0.1
    )
    assert rows["garble"]["criteria"][1]["source"] == "text"  # no log-probs offered: asked for a JSON verdict
    assert grader.counts["DOWN:logprobs"] == 2  # retried once (max_retries 1)
    assert result["judge_failed_calls"] == 2 and result["judge_calls"] == 11
    assert overall["unscorable"] == 1 and result["unscorable"][0]["id"] == "harms-only"  # graded, not scored
    assert rows["harms-only"]["status"] == "unscorable" and rows["harms-only"]["score"] is None
    assert [k["met"] for k in rows["harms-only"]["criteria"]] == [True, False]
    assert (overall["criteria_decided"], overall["criteria_met"], overall["negative_criteria_met"]) == (
        9,
        5,
        2,
    )

    before = Counter(grader.counts)
    again = evaluate_rubric(str(tiny_llama_dir), path, options, cache_path=tmp_path / "c.sqlite")
    asked = {k: grader.counts[k] - before[k] for k in grader.counts if grader.counts[k] != before[k]}
    assert asked == {"DOWN:logprobs": 2, "GARBLE:logprobs": 1, "GARBLE:text": 1}  # answers are cached
    assert again["overall"] == overall


def test_a_judge_that_fails_every_call_stops_with_one_line(tmp_path, tiny_llama_dir, grader, capsys):
    path = write_rubrics(
        tmp_path / "r.jsonl", [example("e1", ("Says A [DOWN]", 5)), example("e2", ("B [DOWN]", 3))]
    )
    code = main(["eval", "--mode", "rubric", "--rubrics", str(path), "--model", str(tiny_llama_dir),
                 "--judge", grader.base_url, "--judge-model", "fake", "--judge-retries", "0", "--max-new-tokens", "2",
                 "--output", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("hippo eval: error: rubric grading: 2 of 2 judge calls failed (HTTP 503: 2)")
    assert not (tmp_path / "out" / "rubric.json").exists()


# --------------------------------------------------------------------------- end to end, local


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["eval", "--mode", "rubric", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_hippo_eval_mode_rubric_with_tiny_models_as_answerer_and_local_judge(
    tmp_path, tiny_llama_dir, embedded_model_dir, capsys
):
    from conftest import make_tiny_llama

    judge = make_tiny_llama(
        tmp_path / "judge", embedded_model_dir, seed=1
    )  # another model: the grader loads it
    out = tmp_path / "rubric"
    args = ["--model", str(tiny_llama_dir), "--judge-model", str(judge), "--rubrics", str(DEMO),
            "--limit", "3", "--max-new-tokens", "4", "--output", str(out)]  # fmt: skip
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 0, stderr[-2000:]
    assert "overall" in stdout and f"results: {out}/rubric.json" in stdout
    result = json.loads((out / "rubric.json").read_text())
    assert result["examples"] == 3 and result["overall"]["n"] + result["overall"]["excluded"] == 3
    assert {"score", "ci_low", "ci_high", "n", "excluded", "healthbench_score"} <= set(result["overall"])
    rows = [json.loads(line) for line in (out / "samples_rubric.jsonl").read_text().splitlines()]
    demo = [json.loads(line) for line in DEMO.read_text().splitlines()][:3]
    assert [r["id"] for r in rows] == [d["prompt_id"] for d in demo]
    for row, record in zip(rows, demo, strict=True):
        assert row["prompt"] == record["prompt"] and isinstance(row["answer"], str)
        assert [k["points"] for k in row["criteria"]] == [r["points"] for r in record["rubrics"]]
        assert all(isinstance(k["met"], bool) and "logp_yes" in k for k in row["criteria"])
    manifest = read_manifest(out)
    assert manifest.stage == "rubric" and manifest.outputs == ["rubric.json", "samples_rubric.jsonl"]
    assert manifest.config["judge"]["backend"] == "local" and manifest.config["grader_version"] == "1"
    assert manifest.config["generation"]["max_new_tokens"] == 4
    assert manifest.data[0] == {"path": str(DEMO), "sha256": sha256_file(DEMO), "role": "rubrics"}
    assert manifest.data[1]["role"] == "judge" and manifest.data[1]["path"] == str(judge)
    assert result["judge"]["name"] == f"local:{judge}"

    code, _, stderr = run_cli(capsys, *args)  # the same inputs: reused, not graded again
    assert code == 0 and "is current for these inputs" in stderr
    assert read_manifest(out).fingerprint == manifest.fingerprint
    code, _, stderr = run_cli(capsys, *args[:-4], "--max-new-tokens", "3", "--output", str(out))
    assert code == 0 and "is made again: its inputs changed" in stderr
    assert read_manifest(out).fingerprint != manifest.fingerprint

    mc = tmp_path / "mc"  # a folder holding another step's output is refused
    assert main(["eval", "--model", str(tiny_llama_dir), "--tasks", "medqa", "--data", f"medqa={EVAL_DATA['medqa']}",
                 "--limit", "1", "--output", str(mc)]) == 0  # fmt: skip
    capsys.readouterr()
    code, _, stderr = run_cli(capsys, *args[:-1], str(mc))
    assert code == 2 and stderr.strip() == (
        f"hippo eval: error: {mc} holds the eval output of another step; choose another --output or pass --overwrite"
    )


def test_local_grader_log_probs_equal_a_plain_forward_pass(tiny_llama_dir):
    """The grader shares the conversation prefix across criteria; each criterion's log-probs equal a
    forward pass of its whole rendered text."""
    import torch

    from hippocrates.eval.rubric import GradeItem, make_grader
    from hippocrates.models import load_model, load_tokenizer, resolve_model

    resolved = resolve_model(str(tiny_llama_dir))
    model, tokenizer = load_model(resolved, precision="fp32").eval(), load_tokenizer(resolved)
    grader = make_grader(RubricJudgeSettings(model=str(tiny_llama_dir)), precision="fp32", batch_size=2,
                         cache_path=None, model=model, tokenizer=tokenizer)  # fmt: skip
    items = [GradeItem("User: Is 150/95 high?", "It is above normal.", text) for text in
             ("Says it is above normal.", "Recommends starting tablets without a doctor.", "Mentions rechecking.")]  # fmt: skip
    shared = grader.log_probs(items, show_progress=False)
    assert grader.stats["prefix_tokens"] > 0
    assert tokenizer.convert_ids_to_tokens([grader.token_a, grader.token_b]) == ["ĠYes", "ĠNo"]
    for item, (lp_yes, lp_no) in zip(items, shared, strict=True):
        ids = tokenizer(grader.render(item), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            logp = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
        assert lp_yes == pytest.approx(float(logp[grader.token_a]), abs=1e-4)
        assert lp_no == pytest.approx(float(logp[grader.token_b]), abs=1e-4)


# ---------------------------------------------------------------------------- pipeline and report


def rubric_recipe(tmp_path: Path, model: Path, rubric: dict) -> Path:
    off = {"enabled": False}
    return make_recipe(tmp_path, model, **{
        "stages.cpt": off, "stages.sft": off, "stages.dpo": off,
        "eval": {"enabled": True, "tasks": ["medqa"], "data": {"medqa": EVAL_DATA["medqa"]}, "limit": 2,
                 "rubric": rubric},
    })  # fmt: skip


def test_pipeline_runs_the_rubric_evaluation_and_the_report_shows_it(tmp_path, tiny_llama_dir, capsys):
    rubric = {
        "file": str(DEMO),
        "limit": 3,
        "max_new_tokens": 4,
        "judge": {"backend": "local", "model": str(tiny_llama_dir)},
    }
    recipe = rubric_recipe(tmp_path, tiny_llama_dir, rubric)
    assert main(["pipeline", str(recipe), "--report-to", "none"]) == 0, capsys.readouterr().err[-2000:]
    out = tmp_path / "out"
    rows = {r["stage"]: r for r in json.loads((out / "pipeline.json").read_text())}
    assert rows["eval"]["status"] == "ran" and "rubric score" in rows["eval"]["detail"]
    result = json.loads((out / "eval" / "rubric" / "rubric.json").read_text())
    manifest = read_manifest(out / "eval" / "rubric")
    assert manifest.recipe_name == "test" and manifest.input_model.path == str(tiny_llama_dir)
    md = (out / "report" / "report.md").read_text()
    glance = md.split("## ")[1]
    assert (
        glance.startswith("At a glance")
        and "Open-ended answers graded against physician-style rubrics" in glance
    )
    score = result["overall"]["score"]
    assert f"| eval/rubric | {100 * score:.1f} | {100 * result['overall']['ci_low']:.1f} |" in glance
    assert "### Rubric-graded answers (eval/rubric)" in md and "| theme:emergency_referrals | example |" in md
    csv = (out / "report" / "at_a_glance.csv").read_text()
    assert (
        "rubric,eval/rubric,overall,score," in csv and "rubric,eval/rubric,overall,healthbench_score," in csv
    )
    capsys.readouterr()

    assert main(["pipeline", str(recipe), "--report-to", "none"]) == 0
    rows = {r["stage"]: r for r in json.loads((out / "pipeline.json").read_text())}
    assert rows["eval"]["status"] == "skipped: unchanged" and "rubric score" in rows["eval"]["detail"]
    assert read_manifest(out / "eval" / "rubric").fingerprint == manifest.fingerprint


def test_a_bad_rubric_file_in_a_recipe_fails_before_any_work(tmp_path, tiny_llama_dir, capsys):
    bad = write_rubrics(tmp_path / "bad.jsonl", [GOOD, {"prompt_id": "x", "prompt": GOOD["prompt"]}])
    recipe = rubric_recipe(
        tmp_path, tiny_llama_dir, {"file": str(bad), "judge": {"model": str(tiny_llama_dir)}}
    )
    assert main(["pipeline", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recipe.yaml:" in err[0] and "eval.rubric.file" in err[0]
    assert f"{bad}:2: missing field 'rubrics'" in err[0]
    assert not (tmp_path / "out" / "eval").exists()


def test_http_grader_through_hippo_serve_decides_like_the_local_grader(embedded_model_dir, tmp_path):
    """The same grader conversation, continued by ``hippo serve`` (log-probabilities over HTTP) and by
    the local grader: the same decisions from the same log-probabilities."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx
    import torch

    from hippocrates.eval.rubric import GradeItem, grade, make_grader
    from hippocrates.models import load_model, load_tokenizer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "hippocrates.cli", "serve", "--model", str(embedded_model_dir),
           "--served-model-name", "judge", "--port", str(port), "--max-tokens", "8"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HIPPO_API_KEY", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        answer = "Call an ambulance now: this could be a heart attack. Chew 300 mg of aspirin if you are not allergic."
        items = [[GradeItem("User: Crushing chest pain for 20 minutes. Should I wait?", answer, criterion)
                  for criterion in ("Tells the user to call emergency services now.",
                                    "Suggests waiting to see whether the pain passes.")]]  # fmt: skip
        settings = RubricJudgeSettings(backend="http", base_url=f"http://127.0.0.1:{port}/v1", model="judge",
                                       verdict="logprobs", timeout_s=120)  # fmt: skip
        remote = grade(make_grader(settings, precision="fp32", batch_size=2, cache_path=None), items)[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = load_model(str(embedded_model_dir)), load_tokenizer(str(embedded_model_dir))
        local_grader = make_grader(RubricJudgeSettings(model=str(embedded_model_dir)), precision="fp32",
                                   batch_size=2, cache_path=None, model=model, tokenizer=tok)  # fmt: skip
        local = grade(local_grader, items)[0]
    finally:
        torch.set_num_threads(threads)
    assert all(v.source == "logprobs" and v.ok for v in remote), [v.error for v in remote]
    assert [v.verdict for v in remote] == [v.verdict for v in local]
    for r, lo in zip(remote, local, strict=True):
        assert r.scores["logp_a"] == pytest.approx(lo.scores["logp_a"], abs=1e-3)
        assert r.scores["logp_b"] == pytest.approx(lo.scores["logp_b"], abs=1e-3)


@pytest.mark.parametrize(
    "section, expected",
    [
        (
            "    limit: 3\n",
            ":5: eval.rubric: Value error, needs file: a JSONL rubric set (or enabled: false)",
        ),
        (
            "    file: r.jsonl\n    judge: {calibrate: question}\n",
            ":7: eval.rubric.judge.calibrate: invalid value",
        ),
        (
            "    file: r.jsonl\n    max_new_tokens: 0\n",
            ":7: eval.rubric.max_new_tokens: Input should be greater",
        ),
        (
            "    file: r.jsonl\n    judge: {backend: http}\n",
            "eval.rubric.judge: Value error, backend 'http' needs base_url",
        ),
    ],
)
def test_recipe_eval_rubric_section(section: str, expected: str):
    from hippocrates.config import parse_recipe
    from hippocrates.errors import HippoError

    base = "name: t\nbase_model: m\noutput_dir: o\neval:\n  rubric:\n"
    assert parse_recipe("name: t\nbase_model: m\noutput_dir: o\n").eval.rubric is None  # absent by default
    assert parse_recipe(base + "    enabled: false\n").eval.rubric.enabled is False
    good = parse_recipe(base + "    file: r.jsonl\n").eval.rubric
    assert (good.judge.calibrate, good.judge.tie_threshold, good.max_new_tokens, good.temperature) == (
        "none",
        0,
        256,
        0,
    )
    with pytest.raises(HippoError) as exc:
        parse_recipe(base + section)
    assert expected in str(exc.value)
