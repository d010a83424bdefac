"""RLAIF logic without a model: verdict parsing, both-order combination, kappa, cache, pairs, prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hippocrates.errors import HippoError
from hippocrates.rlaif.agreement import agreement_metrics, cohen_kappa, confusion_matrix, evaluate_agreement
from hippocrates.rlaif.annotate import make_pairs, position_stats, resolve_pairs
from hippocrates.rlaif.cache import JudgeCache, cache_key
from hippocrates.rlaif.candidates import candidate_seed, load_prompts
from hippocrates.rlaif.judges import (
    JudgeItem,
    Verdict,
    combine_orders,
    items_to_score,
    load_rubric,
    logprob_verdicts,
    order_consistency,
    parse_verdict,
)


@pytest.mark.parametrize(
    "text, label, reason",
    [
        ("Verdict: B\nReason: it sends the patient to A&E.", "B", "it sends the patient to A&E."),
        ("**Verdict:** Response A\n**Reason:** safer", "A", "safer"),
        ("verdict - TIE", "tie", ""),
        ("A", "A", ""),
        ("Response B.\nReason: clearer", "B", "clearer"),
        ("A normal resting heart rate is 60-100.", None, ""),
        ("I cannot decide.", None, ""),
        ("Verdict: a lot of things", None, ""),
        ("", None, ""),
    ],
)
def test_parse_verdict(text: str, label, reason: str):
    assert parse_verdict(text) == (label, reason)


def test_combine_orders_table():
    v = {k: Verdict(k) for k in ("A", "B", "tie")}
    failed = Verdict(None, error="timeout")
    assert combine_orders(v["A"], v["B"]) == "A"  # x first wins, then x second wins
    assert combine_orders(v["B"], v["A"]) == "B"
    assert combine_orders(v["tie"], v["tie"]) == "tie"
    assert combine_orders(v["A"], v["A"]) == "inconsistent"  # follows the position
    assert combine_orders(v["B"], v["B"]) == "inconsistent"
    assert combine_orders(v["A"], v["tie"]) == "inconsistent"
    assert combine_orders(failed, v["B"]) == "failed"
    assert combine_orders(v["A"], failed) == "failed"


def test_cohen_kappa_hand_computed():
    # 10 items. Rater 1: A A A A B B B tie tie tie; rater 2: A A A B B B A tie tie B.
    # Agree on 3 A + 2 B + 2 tie = 7 -> p_o = 0.7.
    # Marginals: A 0.4/0.4, B 0.3/0.4, tie 0.3/0.2 -> p_e = 0.16 + 0.12 + 0.06 = 0.34.
    # kappa = (0.7 - 0.34) / (1 - 0.34) = 0.36 / 0.66 = 0.545454...
    first = ["A", "A", "A", "A", "B", "B", "B", "tie", "tie", "tie"]
    second = ["A", "A", "A", "B", "B", "B", "A", "tie", "tie", "B"]
    assert cohen_kappa(first, second) == pytest.approx(0.36 / 0.66)
    from sklearn.metrics import cohen_kappa_score

    assert cohen_kappa(first, second) == pytest.approx(cohen_kappa_score(first, second))
    assert confusion_matrix(first, second) == [[3, 1, 0], [1, 2, 0], [0, 1, 2]]


def test_cohen_kappa_edge_cases():
    from sklearn.metrics import cohen_kappa_score

    assert cohen_kappa(["A", "B"], ["A", "B"]) == pytest.approx(1.0)
    worse = (["A", "B", "A", "B"], ["B", "A", "B", "A"])
    assert cohen_kappa(*worse) == pytest.approx(cohen_kappa_score(*worse)) == pytest.approx(-1.0)
    assert cohen_kappa(["A", "A"], ["A", "A"]) is None  # undefined: both raters constant
    assert cohen_kappa([], []) is None
    with pytest.raises(ValueError):
        cohen_kappa(["A"], [])


def test_agreement_metrics_fields():
    m = agreement_metrics(["A", "B", "tie", "A"], ["A", "A", "tie", "A"])
    assert m["n"] == 4 and m["accuracy"] == 0.75
    assert m["human_counts"] == {"A": 2, "B": 1, "tie": 1}
    assert m["judge_counts"] == {"A": 3, "B": 0, "tie": 1}
    assert m["confusion_matrix"]["matrix"] == [[2, 0, 0], [1, 0, 0], [0, 0, 1]]


class ScriptedJudge:
    """Answers from a table keyed by the response shown first; unknown items fail."""

    name = "scripted"

    def __init__(self, answers: dict[str, str | None]) -> None:
        self.answers, self.rubric, self.stats = answers, load_rubric(), {}

    def judge_pairs(self, items: list[JudgeItem]) -> list[Verdict]:
        out = []
        for item in items:
            label = self.answers.get(item.response_a)
            out.append(
                Verdict(label, reason=f"first={item.response_a}") if label else Verdict(None, error="x")
            )
        return out


def test_evaluate_agreement_maps_inconsistent_to_tie_and_skips_failures(tmp_path: Path):
    rows = [
        {"id": "1", "prompt": "q1", "response_a": "good", "response_b": "bad", "label": "A"},
        {"id": "2", "prompt": "q2", "response_a": "meh", "response_b": "meh2", "label": "tie"},
        {"id": "3", "prompt": "q3", "response_a": "lazy", "response_b": "fine", "label": "B"},
        {"id": "4", "prompt": "q4", "response_a": "boom", "response_b": "bad", "label": "A"},
    ]
    path = tmp_path / "human.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # "good" wins both orders; meh/meh2 always A (inconsistent -> tie); lazy/fine: judge says A for
    # lazy-first and B for fine-first -> lazy wins, disagreeing with the human; "boom" fails.
    judge = ScriptedJudge({"good": "A", "bad": "B", "meh": "A", "meh2": "A", "lazy": "A", "fine": "B"})
    metrics, details = evaluate_agreement(judge, path)
    assert [d["judge"] for d in details] == ["A", "tie", "A", None]
    assert [d["outcome"] for d in details] == ["A", "inconsistent", "A", "failed"]
    assert metrics["n"] == 3 and metrics["failed"] == 1 and metrics["inconsistent"] == 1
    assert metrics["accuracy"] == pytest.approx(2 / 3)


def test_bad_human_label_names_file_and_line(tmp_path: Path):
    path = tmp_path / "human.jsonl"
    path.write_text(json.dumps({"prompt": "q", "response_a": "a", "response_b": "b", "label": "C"}) + "\n")
    with pytest.raises(HippoError, match=r"human.jsonl:1: label must be one of A, B, tie"):
        evaluate_agreement(ScriptedJudge({}), path)


def test_resolve_pairs_both_directions_and_set_aside():
    pairs = [
        {"id": "p1", "prompt": "q", "candidates": [0, 1], "responses": ["x0", "x1"]},
        {"id": "p2", "prompt": "q", "candidates": [0, 1], "responses": ["y0", "y1"]},
        {"id": "p3", "prompt": "q", "candidates": [0, 1], "responses": ["z0", "z1"]},
        {"id": "p4", "prompt": "q", "candidates": [0, 1], "responses": ["w0", "w1"]},
    ]
    verdicts = [
        Verdict("A", reason="x0 first"), Verdict("B", reason="x1 first"),  # x0 wins
        Verdict("B", reason="y0 first"), Verdict("A", reason="y1 first"),  # y1 wins
        Verdict("A"), Verdict("A"),  # position-following
        Verdict("tie"), Verdict(None, error="timeout"),
    ]  # fmt: skip
    judge = ScriptedJudge({})
    out = resolve_pairs(pairs, verdicts, judge)
    prefs = out["preferences"]
    assert [(p["chosen"], p["rejected"]) for p in prefs] == [("x0", "x1"), ("y1", "y0")]
    assert [p["reason"] for p in prefs] == ["x0 first", "y1 first"]  # the order with chosen as "A"
    assert prefs[1]["chosen_candidate"] == 1 and prefs[0]["rubric_version"] == judge.rubric.version
    assert prefs[0]["verdicts"]["first_shown_first"]["verdict"] == "A"
    assert prefs[0]["verdicts"]["second_shown_first"]["verdict"] == "B"
    assert [s["outcome"] for s in out["set_aside"]] == ["inconsistent", "failed"]
    assert out["counts"] == {"A": 1, "B": 1, "tie": 0, "inconsistent": 1, "failed": 1}
    stats = position_stats(verdicts)
    assert stats["consistency_rate"] == pytest.approx(2 / 3)  # the failed pair is left out
    assert stats["first_position_rate"] == pytest.approx(4 / 6)
    assert stats["corrected_consistency_rate"] is None  # text verdicts: no correction


def test_consistency_is_measured_on_raw_verdicts_and_the_correction_is_reported_beside_it():
    """A judge that always prefers the first slot, by more than the answers differ: every raw pair
    is inconsistent; the per-question correction (order averaging) makes them agree by construction."""
    items = [
        JudgeItem("q1", "x", "y"),
        JudgeItem("q1", "y", "x"),
        JudgeItem("q2", "u", "v"),
        JudgeItem("q2", "v", "u"),
    ]
    scores = {items[0]: (-0.2, -1.0), items[1]: (-0.4, -0.9), items[2]: (-0.5, -1.5), items[3]: (-0.3, -1.4)}
    assert items_to_score(items, "question") == items  # the mirrors are already there
    verdicts = logprob_verdicts(items, scores, calibrate="question", tie_threshold=0.0)
    assert [v.raw_verdict for v in verdicts] == ["A", "A", "A", "A"]
    assert [v.verdict for v in verdicts] == ["A", "B", "B", "A"]  # x beats y; v beats u
    assert all(v.source == "logprobs" and v.corrected for v in verdicts)
    stats = order_consistency(verdicts)
    assert stats == {"consistency_rate": 0.0, "corrected_consistency_rate": 1.0, "first_position_rate": 1.0}
    raw = logprob_verdicts(items, scores, calibrate="none", tie_threshold=0.0)
    assert [v.verdict for v in raw] == ["A"] * 4 and order_consistency(raw)[
        "corrected_consistency_rate"
    ] is None


def test_make_pairs_sets_identical_candidates_aside():
    records = [{"id": "p", "prompt": "q", "candidates": [{"text": "a"}, {"text": " a "}, {"text": "b"}]}]
    pairs, identical = make_pairs(records)
    assert [p["candidates"] for p in pairs] == [[0, 2], [1, 2]]
    assert [p["candidates"] for p in identical] == [[0, 1]]


def test_cache_roundtrip_and_key_covers_order_judge_rubric_and_source(tmp_path: Path):
    rubric = load_rubric()
    item = JudgeItem("q", "a", "b")
    key = cache_key("http:m@u", rubric, item)
    assert key != cache_key("http:m@u", rubric, item, "logprobs")
    assert key != cache_key("http:m@u", rubric, JudgeItem("q", "b", "a"))
    assert key != cache_key("http:other@u", rubric, item)
    other_rubric = type(rubric)("2.0", rubric.text, rubric.sha256, rubric.path)
    assert key != cache_key("http:m@u", other_rubric, item)
    cache = JudgeCache(tmp_path / "c.sqlite")
    cache.put(key, "http:m@u", "1.0", Verdict(None, error="timeout"))  # failures are not stored
    assert cache.get(key) is None and len(cache) == 0
    cache.put(key, "http:m@u", "1.0", Verdict("B", reason="r", raw="Verdict: B"))
    cache.close()
    again = JudgeCache(tmp_path / "c.sqlite").get(key)
    assert again is not None and again.verdict == "B" and again.reason == "r" and again.cached
    assert again.source == "text"
    lp_key = cache_key("http:m@u", rubric, item, "logprobs")
    measured = Verdict("A", scores={"logp_a": -0.5, "logp_b": -0.9}, source="logprobs")
    JudgeCache(tmp_path / "c.sqlite").put(lp_key, "http:m@u", "1.0", measured)
    back = JudgeCache(tmp_path / "c.sqlite").get(lp_key)
    assert back is not None and back.source == "logprobs" and back.scores == {"logp_a": -0.5, "logp_b": -0.9}


def test_a_cache_written_before_logprob_verdicts_still_opens(tmp_path: Path):
    import sqlite3

    old = sqlite3.connect(tmp_path / "old.sqlite")
    old.execute("CREATE TABLE verdicts (key TEXT PRIMARY KEY, judge TEXT NOT NULL, rubric_version TEXT NOT NULL, "
                "verdict TEXT NOT NULL, reason TEXT NOT NULL, raw TEXT, created REAL NOT NULL)")  # fmt: skip
    old.execute("INSERT INTO verdicts VALUES ('k', 'j', '1.0', 'A', 'r', 'Verdict: A', 0)")
    old.commit()
    old.close()
    cache = JudgeCache(tmp_path / "old.sqlite")
    assert cache.get("k").verdict == "A" and cache.get("k").source == "text"
    cache.put("k2", "j", "1.0", Verdict("B", scores={"logp_a": -1.0, "logp_b": -0.5}, source="logprobs"))
    assert cache.get("k2").scores["logp_b"] == -0.5 and len(cache) == 2


def test_removed_and_new_judge_settings(capsys):
    from pydantic import ValidationError

    from hippocrates.config import JudgeSettings

    assert "backoff_s" not in JudgeSettings(backoff_s=1.0).model_dump()  # an old recipe still loads
    assert "backoff_s is no longer used" in capsys.readouterr().err
    with pytest.raises(ValidationError, match="max_failed_share"):
        JudgeSettings(max_failed_share=1.5)
    settings = JudgeSettings(backend="http", base_url="http://x/v1")
    assert settings.verdict == "auto" and settings.max_failed_share is None


def test_rubric_is_versioned_and_custom_rubric_needs_a_version(tmp_path: Path):
    rubric = load_rubric()
    assert rubric.version == "1.0"
    for word in ("safety", "accuracy", "complete", "relevan", "clarity", "empathy", "invented"):
        assert word in rubric.text.lower()
    bad = tmp_path / "r.md"
    bad.write_text("# no version\nbe nice\n")
    with pytest.raises(HippoError, match="rubric_version"):
        load_rubric(bad)
    good = tmp_path / "r2.md"
    good.write_text("rubric_version: 7b\nPrefer the safer answer.\n")
    assert load_rubric(good).version == "7b"


def test_load_prompts_validates(tmp_path: Path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "q1"}\n{"id": "a", "prompt": "q2"}\n')
    with pytest.raises(HippoError, match=r"p.jsonl:2: duplicate id 'a'"):
        load_prompts(path)
    path.write_text('{"id": "a", "question": "q1"}\n')
    with pytest.raises(HippoError, match=r"p.jsonl:1: missing field 'prompt'"):
        load_prompts(path)
    path.write_text('{"prompt": "q1"}\n{"prompt": "q2"}\n{"prompt": "q3"}\n')
    assert [p.id for p in load_prompts(path, limit=2)] == ["line-1", "line-2"]


def test_candidate_seeds_depend_only_on_run_seed_prompt_and_index():
    assert candidate_seed(42, "pq-1", 0) == candidate_seed(42, "pq-1", 0)
    seeds = {candidate_seed(s, p, k) for s in (1, 2) for p in ("a", "b") for k in (0, 1)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)
