"""Every demo data file parses in its real format and meets the counts the data cards promise."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hippocrates.data.io import read_json, read_jsonl

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
INLINE_OPTION = re.compile(r"^\s*\(([A-Z])\)\s+(.+?)\s*$", re.MULTILINE)


def unique_ids(rows: list[dict], key: str = "id") -> bool:
    ids = [r[key] for r in rows]
    return len(ids) == len(set(ids))


def test_cpt_corpus_has_train_and_heldout():
    train = read_jsonl(DEMO / "cpt" / "train.jsonl")
    heldout = read_jsonl(DEMO / "cpt" / "heldout.jsonl")
    assert len(train) + len(heldout) >= 150 and len(heldout) >= 20
    rows = train + heldout
    assert unique_ids(rows)
    assert {r["kind"] for r in rows} == {"guideline", "case_report", "abstract"}
    assert all(len(r["text"].split()) >= 30 for r in rows)
    assert not {r["text"] for r in train} & {r["text"] for r in heldout}


def test_instruction_mixture_counts_and_kinds():
    general = read_jsonl(DEMO / "instructions" / "general.jsonl")
    evaluation = read_jsonl(DEMO / "instructions" / "evaluation.jsonl")
    heldout = read_jsonl(DEMO / "instructions" / "heldout.jsonl")
    assert len(general) + len(evaluation) >= 300
    assert {"flashcard", "dialogue", "wiki", "relation", "medication"} <= {r["source"] for r in general}
    assert {"mcq", "pubmedqa"} <= {r["source"] for r in evaluation}
    for row in general + evaluation + heldout:
        assert row["instruction"].strip() and row["output"].strip()
    assert unique_ids(general + evaluation + heldout)


def test_exam_instructions_answer_an_existing_option():
    for row in read_jsonl(DEMO / "instructions" / "evaluation.jsonl"):
        if row["source"] != "mcq":
            continue
        letter = re.match(r"\(([A-E])\)", row["output"]).group(1)
        assert f"({letter})" in row["input"], row["id"]


def test_preference_prompts_and_human_labels():
    prompts = read_jsonl(DEMO / "preferences" / "patient_questions.jsonl")
    assert len(prompts) >= 100 and unique_ids(prompts)
    labels = read_jsonl(DEMO / "preferences" / "human_labels.jsonl")
    assert len(labels) >= 30 and {r["label"] for r in labels} == {"A", "B", "tie"}
    assert all(r["response_a"] != r["response_b"] for r in labels)


def test_medqa_format():
    rows = read_jsonl(DEMO / "benchmarks" / "medqa" / "US_4_options_test.jsonl")
    assert len(rows) >= 30
    for r in rows:
        assert sorted(r["options"]) == ["A", "B", "C", "D"]
        assert r["options"][r["answer_idx"]] == r["answer"]
        assert r["meta_info"] in {"step1", "step2&3"}


def test_medmcqa_format_uses_one_based_cop():
    rows = read_jsonl(DEMO / "benchmarks" / "medmcqa" / "dev.jsonl")
    assert len(rows) >= 30 and unique_ids(rows)
    assert {r["cop"] for r in rows} == {1, 2, 3, 4}
    for r in rows:
        assert all(r[k].strip() for k in ("question", "opa", "opb", "opc", "opd"))
        assert r["choice_type"] in {"single", "multi"}


def test_pubmedqa_format_and_ground_truth():
    pqal = read_json(DEMO / "benchmarks" / "pubmedqa" / "ori_pqal.json")
    truth = read_json(DEMO / "benchmarks" / "pubmedqa" / "test_ground_truth.json")
    assert len(truth) >= 30 and set(truth) <= set(pqal)
    for pmid, r in pqal.items():
        assert pmid.isdigit()
        assert r["final_decision"] in {"yes", "no", "maybe"}
        assert isinstance(r["CONTEXTS"], list) and r["CONTEXTS"] and r["QUESTION"].strip()
    assert all(pqal[p]["final_decision"] == label for p, label in truth.items())


def test_usmle_format_inline_options_by_step():
    rows = read_jsonl(DEMO / "benchmarks" / "usmle" / "step_exams.jsonl")
    by_step = {step: [r for r in rows if r["category"] == step] for step in ("one", "two", "three")}
    assert all(len(items) >= 10 for items in by_step.values()) and len(rows) >= 30
    assert any(re.search(r"^\s+\(A\)", r["text"], re.MULTILINE) for r in rows), "some options are indented"
    for r in rows:
        options = dict(INLINE_OPTION.findall(r["text"]))
        letter, text = re.match(r"\(([A-Z])\)\s+(.*)", r["answer"]).groups()
        assert options.get(letter) == text.strip(), r["question_id"]


@pytest.mark.parametrize("folder", ["cpt", "instructions", "preferences", "benchmarks"])
def test_each_folder_has_a_data_card(folder: str):
    card = (DEMO / folder / "README.md").read_text()
    text = card.lower()
    assert "apache-2.0" in text and ("clinical use" in text or "clinical decisions" in text)


def test_no_file_is_copied_from_the_real_benchmarks(shared_data: Path):
    """Demo benchmark text must be ours: no question string may appear in the real releases."""
    shared = shared_data / "medqa" / "US_4_options_test.jsonl"
    real = {json.loads(line)["question"] for line in shared.open()}
    ours = {r["question"] for r in read_jsonl(DEMO / "benchmarks" / "medqa" / "US_4_options_test.jsonl")}
    assert not ours & real
