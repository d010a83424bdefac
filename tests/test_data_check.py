"""``hippo data``: benchmark readers, contamination (exact + 13-gram), file stats, data sources."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from hippocrates.cli import main
from hippocrates.config import Source, parse_recipe
from hippocrates.data.check import check_recipe, eval_items
from hippocrates.data.sources import clean_text, iter_conversations, iter_records, to_instruction
from hippocrates.errors import HippoError
from test_stages_helpers import write_jsonl

STEM = (
    "A 45-year-old man has crushing chest pain radiating to his left arm with sweating and nausea for an hour"
)


def benchmarks(root: Path) -> dict[str, Path]:
    """One tiny file per benchmark, in each release's native format."""
    medqa = write_jsonl(
        root / "medqa.jsonl",
        [
            {"question": STEM + ". Next step?", "options": {"A": "ECG", "B": "Discharge"}, "answer_idx": "A"},
            {
                "question": "Which vitamin deficiency causes scurvy?",
                "options": {"A": "C", "B": "D"},
                "answer_idx": "A",
            },
        ],
    )
    medmcqa = write_jsonl(
        root / "medmcqa.jsonl",
        [
            {
                "question": "Nerve of the diaphragm?",
                "opa": "Phrenic",
                "opb": "Vagus",
                "opc": "a",
                "opd": "b",
                "cop": 1,
            }
        ],
    )
    pubmedqa = root / "ori_pqal.json"
    pubmedqa.write_text(
        json.dumps(
            {
                "91234567": {
                    "QUESTION": "Does exercise reduce falls?",
                    "CONTEXTS": ["A trial.", "It did."],
                    "final_decision": "yes",
                    "LONG_ANSWER": "Exercise reduced falls.",
                }
            }  # fmt: skip
        )
    )
    (root / "test_ground_truth.json").write_text(json.dumps({"91234567": "yes"}))  # the official test PMIDs
    usmle = write_jsonl(
        root / "step_exams.jsonl",
        [
            {
                "question_id": 0,
                "text": "Which enzyme?\n (A) ADH\n (B) ALDH",
                "answer": "(B) ALDH",
                "category": "one",
            }
        ],
    )
    return {"medqa": medqa, "medmcqa": medmcqa, "pubmedqa": pubmedqa, "usmle_step1": usmle}


def test_eval_sets_are_read_as_hippo_eval_reads_them(tmp_path):
    files = benchmarks(tmp_path)
    assert eval_items("medqa", str(files["medqa"]))[0][1].startswith(STEM + ". Next step? ECG Discharge")
    assert eval_items("medmcqa", str(files["medmcqa"])) == [
        ("Nerve of the diaphragm?", "Nerve of the diaphragm? Phrenic Vagus a b ")
    ]
    assert eval_items("pubmedqa", str(files["pubmedqa"]))[0][0] == "Does exercise reduce falls?"
    (tmp_path / "test_ground_truth.json").write_text("{}")  # the test split is what eval scores: nothing here
    assert eval_items("pubmedqa", str(files["pubmedqa"])) == []
    assert len(eval_items("pubmedqa_all", str(files["pubmedqa"]))) == 1
    assert eval_items("usmle_step1", str(files["usmle_step1"]))[0][0] == "Which enzyme?"


def test_contamination_exact_and_13gram(tmp_path):
    files = benchmarks(tmp_path)
    instr = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {
                "instruction": "Which vitamin deficiency causes scurvy?",
                "input": "",
                "output": "Vitamin C.",
            },  # exact
            {
                "instruction": "Summarise.",
                "input": f"Case: {STEM}. He was treated.",
                "output": "MI.",
            },  # 13-gram
            {"instruction": "Unrelated question?", "input": "", "output": "Unrelated answer."},
        ],
    )
    cpt = write_jsonl(tmp_path / "cpt.jsonl", [{"text": "Nothing shared with any benchmark at all."}])
    recipe = parse_recipe(
        f"name: t\nbase_model: m\noutput_dir: {tmp_path}/out\n"
        f"stages:\n  cpt: {{data: [{{path: {cpt}}}]}}\n  sft: {{data: [{{path: {instr}}}]}}\n"
        f"  annotate: {{enabled: false}}\n"
        f"eval:\n  data: {json.dumps({k: str(v) for k, v in files.items()})}\n"
    )
    result = check_recipe(recipe, tokenizer=None)
    rows = {(r["stage"], r["eval"]): r for r in result["overlap"]}
    assert rows[("sft", "medqa")]["exact"] == 1 and rows[("sft", "medqa")]["ngram13"] == 1
    assert rows[("sft", "medqa")]["ngram13_pct"] == 50.0
    assert rows[("cpt", "medqa")]["exact"] == 0 and rows[("cpt", "medqa")]["ngram13"] == 0
    assert {r["source"]: r["records"] for r in result["sources"]} == {str(cpt): 1, str(instr): 3}


def test_cli_check_and_stats(tmp_path, capsys):
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"text": "a b c", "id": 1}, {"text": "a b c", "id": 1}, {"text": "x"}]
    )
    assert main(["data", "stats", str(data), "--words"]) == 0
    out = capsys.readouterr().out
    assert "3 records, 1 duplicate records" in out and "text 7" in out
    assert main(["data", "stats", str(data), "--words", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fields"] == {"text": 3, "id": 2}
    assert main(["data", "stats", str(tmp_path / "missing.jsonl"), "--words"]) == 2
    assert "file not found" in capsys.readouterr().err


def test_demo_recipe_check_runs(capsys):
    repo = Path(__file__).resolve().parents[1]
    if not (repo / "data" / "demo" / "benchmarks" / "medqa").is_dir():
        pytest.skip("demo data not present")
    assert main(["data", "check", str(repo / "recipes" / "demo.yaml"), "--words"]) == 0
    assert "contamination" in capsys.readouterr().out


def test_sources_read_every_local_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first doc\nline two\n\n\nsecond doc\n")
    assert [r["text"] for _, r in iter_records(Source(path=str(tmp_path / "a.txt")))] == [
        "first doc\nline two\n",
        "second doc\n",
    ]
    pq.write_table(pa.table({"text": ["p1", "p2", "p3"]}), tmp_path / "b.parquet")
    assert len(list(iter_records(Source(path=str(tmp_path / "b.parquet"), max_samples=2)))) == 2
    (tmp_path / "c.csv").write_text("instruction,output\nq,a\n")
    where, record = next(iter_records(Source(path=str(tmp_path / "c.csv"))))
    assert where.endswith("c.csv:2") and record == {"instruction": "q", "output": "a"}
    (tmp_path / "a.xml").write_text("<x/>")
    with pytest.raises(HippoError, match="unsupported file type"):
        list(iter_records(Source(path=str(tmp_path / "a.xml"))))


def test_cleaning_and_benchmark_records_as_training_data(tmp_path):
    assert clean_text("  a \t b  \r\n\n\n\nc  ") == "a b\n\nc"
    assert clean_text(" \n\t ") == ""

    def answers(rows, **source) -> list[str]:
        path = write_jsonl(tmp_path / f"{len(list(tmp_path.iterdir()))}.jsonl", rows)
        return [m[-1]["content"] for _, m in iter_conversations(Source(path=str(path), **source))]

    mcq = {"question": "Q?", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 2, "exp": "Why."}
    assert answers([mcq]) == ["(B) x. Why."]  # release files: 1-based, explanation kept
    medqa_hf = {"sent1": "Q?", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d", "label": 3}
    assert answers([medqa_hf]) == ["(D) d."]
    assert answers([mcq], prompt="letter") == ["B"] and answers([mcq], prompt="hippocrates") == ["x"]
    with pytest.raises(
        HippoError, match=r"no usable medqa_hf records .*jsonl:1: 'label' must be an option index 0..3, got 7"
    ):
        answers([{**medqa_hf, "label": 7}])
    assert answers([{**medqa_hf, "label": 7}, medqa_hf]) == ["(D) d."]  # counted and reported, not a crash
    assert answers([{**mcq, "cop": "B"}, mcq]) == ["(B) x. Why."]  # the unusable one is counted, not a crash
    assert to_instruction({"Question": "q", "Answer": "a"}, "x")["instruction"] == "q"
    with pytest.raises(HippoError, match="f:3: not an instruction record"):
        to_instruction({"foo": 1}, "f:3")


def test_pubmedqa_release_file_trains_on_its_non_test_half(tmp_path):
    truth = {"1": "yes"}
    records = {pmid: {"QUESTION": f"Q{pmid}?", "CONTEXTS": ["c"], "final_decision": d, "LONG_ANSWER": "L."}
               for pmid, d in (("1", "yes"), ("2", "no"), ("3", "maybe"))}  # fmt: skip
    (tmp_path / "ori_pqal.json").write_text(json.dumps(records))
    (tmp_path / "test_ground_truth.json").write_text(json.dumps(truth))
    rows = list(iter_conversations(Source(path=str(tmp_path / "ori_pqal.json"))))
    assert [m[-1]["content"] for _, m in rows] == ["no. L.", "maybe. L."]  # PMID 1 is a test item
    assert "Abstract: c\nQuestion: Q2?" in rows[0][1][0]["content"]
    every = list(iter_conversations(Source(path=str(tmp_path / "ori_pqal.json"), split="all")))
    assert len(every) == 3


def test_streamed_cpt_corpus_memory_does_not_grow(tmp_path):
    """Streaming reads, cleans and packs lazily: peak Python memory is independent of corpus size."""
    from collections import Counter

    from hippocrates.stages.cpt import iter_blocks, iter_corpus

    class Tok:
        eos_token_id = 0

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[len(w) for w in t.split()] for t in texts]}

    def peak(n_docs: int) -> int:
        path = write_jsonl(
            tmp_path / f"{n_docs}.jsonl", [{"text": f"document {i} " + "word " * 50} for i in range(n_docs)]
        )
        stats: Counter = Counter()
        tracemalloc.start()
        blocks = sum(
            1 for _ in iter_blocks(iter_corpus([Source(path=str(path), streaming=True)], 0, stats), Tok(), 64)
        )
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert stats["documents"] == n_docs and blocks > n_docs * 52 // 64 - 1
        return size

    small, large = peak(500), peak(5000)
    assert large < 2 * small + 200_000, (small, large)
