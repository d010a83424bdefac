"""Task registry and loaders: the release formats (demo and real files), the generic MC task, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hippocrates.errors import HippoError
from hippocrates.eval.loaders import load_task
from hippocrates.eval.registry import load_registry, resolve_tasks

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "benchmarks"
SIX = ["medmcqa", "medqa", "pubmedqa", "usmle_step1", "usmle_step2", "usmle_step3"]


def task(name: str, **kw):
    return load_task(resolve_tasks([name])[0], **kw)


def test_registry_has_the_six_benchmarks_and_the_generic_task():
    assert set(SIX) | {"mc", "pubmedqa_all"} <= set(load_registry())


@pytest.mark.parametrize(
    ("name", "n", "pool", "pool_is_eval"),
    [
        ("medqa", 40, 12, False),
        ("medmcqa", 40, 12, False),
        ("pubmedqa", 35, 25, False),
        ("pubmedqa_all", 60, 60, True),
        ("usmle_step1", 15, 15, True),
        ("usmle_step2", 15, 15, True),
        ("usmle_step3", 15, 15, True),
    ],
)
def test_demo_files_load(name, n, pool, pool_is_eval):
    data = task(name, data_dir=str(DEMO))
    assert (len(data.items), len(data.pool), data.pool_is_eval, data.skipped) == (n, pool, pool_is_eval, [])
    assert data.sha256 and len({it.id for it in data.items}) == n
    for item in data.items:
        assert item.question and all(item.options) and 0 <= item.gold < len(item.options)
    if name.startswith("pubmedqa"):
        assert data.items[0].options == ["yes", "no", "maybe"] and data.items[0].context
        if name == "pubmedqa":  # the pool is exactly the PMIDs not in the ground truth
            truth = json.loads((DEMO / "pubmedqa" / "test_ground_truth.json").read_text())
            assert {it.id for it in data.items} == set(truth)
            assert not {it.id for it in data.pool} & set(truth)
            assert all(it.options[it.gold] == truth[it.id] for it in data.items)


def test_medmcqa_cop_is_one_based():
    record = json.loads((DEMO / "medmcqa" / "dev.jsonl").read_text().splitlines()[0])
    item = task("medmcqa", data=str(DEMO / "medmcqa" / "dev.jsonl")).items[0]
    assert item.options[item.gold] == record[["opa", "opb", "opc", "opd"][record["cop"] - 1]]


def test_usmle_indented_and_wrapped_options(tmp_path):
    rows = [
        {"question_id": 1, "category": "one", "answer": "(B) Beta blocker therapy",
         "text": "A stem\n wrapped here?\n\n (A) Alpha\n (B) Beta blocker\n therapy\n (C) Gamma"},
        {"question_id": 2, "category": "one", "answer": "(A) x", "text": "Q?\n(A) x\n(B) y"},
        {"question_id": 3, "category": "one", "answer": "(E) z", "text": "Q?\n(A) x\n(B) y"},
        {"question_id": 4, "category": None, "answer": "(A) x", "text": "Q?\n(A) x\n(B) y"},
        {"question_id": 5, "category": "two", "answer": "(A) x", "text": "Q?\n(A) x\n(B) y"},
    ]  # fmt: skip
    path = tmp_path / "step_exams.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = task("usmle_step1", data=str(path))
    first = data.items[0]
    assert first.question == "A stem\nwrapped here?"
    assert first.options == ["Alpha", "Beta blocker therapy", "Gamma"] and first.gold == 1
    assert [it.id for it in data.items] == ["1", "2"]
    reasons = dict(data.skipped)
    assert "not among the options" in reasons["3"] and "step_exams.jsonl:3" in reasons["3"]
    assert "no category" in reasons["4"]


def test_medqa_five_option_file_and_bad_answers(tmp_path):
    good = {
        "question": "Q?",
        "options": {k: f"opt {k}" for k in "ABCDE"},
        "answer": "opt E",
        "answer_idx": "E",
    }
    bad = {**good, "answer_idx": "F", "answer": "nope"}
    missing = {"options": good["options"], "answer_idx": "A"}
    path = tmp_path / "US_5_options_test.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, bad, missing)) + "\n")
    data = task("medqa", data=str(path))
    assert len(data.items) == 1 and len(data.items[0].options) == 5 and data.items[0].gold == 4
    assert [i for i, _ in data.skipped] == ["medqa-2", "medqa-3"]
    assert "not among the options" in data.skipped[0][1] and "missing field 'question'" in data.skipped[1][1]
    assert data.pool_is_eval  # no train file beside it: the other items are the pool


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_text('{"question": "q"}\n{not json\n')
    with pytest.raises(HippoError, match=r"dev.jsonl:2: malformed JSON"):
        task("medmcqa", data=str(path))


def test_missing_file_and_missing_ground_truth(tmp_path):
    with pytest.raises(HippoError, match="file not found"):
        task("medqa", data=str(tmp_path / "nope.jsonl"))
    (tmp_path / "ori_pqal.json").write_text((DEMO / "pubmedqa" / "ori_pqal.json").read_text())
    with pytest.raises(HippoError, match="test_ground_truth.json: not found.*pubmedqa_all"):
        task("pubmedqa", data=str(tmp_path / "ori_pqal.json"))
    assert len(task("pubmedqa_all", data=str(tmp_path)).items) == 60  # a folder works too


def test_hub_fallback_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HippoError, match=r"no local file given \(--data medqa=PATH.*GBaker/MedQA"):
        task("medqa")


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(HippoError, match="unknown task 'medqa5'.*medmcqa"):
        resolve_tasks(["medqa5"])


@pytest.mark.parametrize(
    ("columns", "record", "gold"),
    [
        ("", {"question": "q", "options": ["a", "b", "c"], "answer": "B"}, 1),
        ("", {"question": "q", "options": {"A": "a", "B": "b"}, "answer": 0}, 0),
        ("", {"question": "q", "options": ["a", "b"], "answer": "b"}, 1),
        (
            "  options: [o1, o2, o3]\n  answer: key\n",
            {"question": "q", "o1": "x", "o2": "y", "o3": "z", "key": 3},
            2,
        ),
    ],
)
def test_generic_mc_task_from_yaml(tmp_path, columns, record, gold):
    fmt = "index1" if "key" in columns else "auto"
    (tmp_path / "quiz.yaml").write_text(
        f"task: quiz\nformat: mc\nanswer_format: {fmt}\n" + (f"columns:\n{columns}" if columns else "")
    )
    second = {**record, "question": "another q"}
    (tmp_path / "quiz.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(second) + "\n")
    spec = resolve_tasks(["quiz"], task_dirs=[tmp_path])[0]
    data = load_task(spec, data=str(tmp_path / "quiz.jsonl"))
    assert [it.gold for it in data.items] == [gold, gold] and [it.id for it in data.items] == [
        "quiz-1",
        "quiz-2",
    ]
    assert resolve_tasks([str(tmp_path / "quiz.yaml")])[0].task == "quiz"  # a YAML path works as well


def test_generic_mc_csv_and_bad_yaml(tmp_path):
    (tmp_path / "q.csv").write_text(
        'id,question,options,answer\nq1,Why?,"[""x"", ""y""]",y\nq2,How?,"[""x""]",x\n'
    )
    data = task("mc", data=str(tmp_path / "q.csv"))
    assert [(it.id, it.gold) for it in data.items] == [("mc-2", 1)]  # the generic task names no id column
    assert data.skipped[0][0] == "mc-3" and "at least 2 options" in data.skipped[0][1]
    (tmp_path / "bad.yaml").write_text("task: bad\nformat: mc\ncolums: {}\n")
    with pytest.raises(HippoError, match=r"bad.yaml:3: colums: unknown key"):
        resolve_tasks([str(tmp_path / "bad.yaml")])


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("name", "n", "pool"),
    [("medqa", 1273, 1273), ("medmcqa", 4183, 4183), ("pubmedqa", 500, 500), ("pubmedqa_all", 1000, 1000),
     ("usmle_step1", 94, 94), ("usmle_step2", 109, 109), ("usmle_step3", 121, 121)],
)  # fmt: skip
def test_real_release_files(shared_data, name, n, pool):
    data = task(name, data_dir=str(shared_data))
    assert (len(data.items), len(data.pool)) == (n, pool)
    assert len(data.skipped) == (1 if name.startswith("usmle") else 0)  # the record with no category


def _task_yaml(tmp_path, body: str):
    (tmp_path / "t.yaml").write_text("task: t\nformat: mc\n" + body)
    return resolve_tasks([str(tmp_path / "t.yaml")])[0]


def test_a_csv_without_header_and_with_a_bom(tmp_path):
    (tmp_path / "mmlu.csv").write_bytes(
        "\ufeffWhich nerve?,Vagus,Phrenic,Optic,Ulnar,B\nWhich bone?,Femur,Tibia,Ulna,Radius,A\n".encode()
    )
    spec = _task_yaml(tmp_path, "header: false\ncolumns: {question: 0, options: [1, 2, 3, 4], answer: 5}\n")
    data = load_task(spec, data=str(tmp_path / "mmlu.csv"))
    assert [(it.question, it.gold) for it in data.items] == [("Which nerve?", 1), ("Which bone?", 0)]
    (tmp_path / "bom.csv").write_bytes('\ufeffquestion,options,answer\nQ?,"[""a"", ""b""]",b\n'.encode())
    assert load_task(resolve_tasks(["mc"])[0], data=str(tmp_path / "bom.csv")).items[0].gold == 1


def test_nested_records_fixed_choices_filter_and_filler_options(tmp_path, capsys):
    doc = {"meta": {"v": 1}, "data": {"questions": [
        {"q": "Is it?", "a": "Yes", "subject": "cardio", "opts": ["Yes", "No", "n/a"]},
        {"q": "Is it not?", "a": "no", "subject": "cardio", "opts": ["yes", "no", "None"]},
        {"q": "Other?", "a": "yes", "subject": "derm", "opts": ["yes", "no", "n/a"]},
        {"q": "Filler?", "a": "n/a", "subject": "cardio", "opts": ["yes", "no", "n/a"]},
    ]}}  # fmt: skip
    (tmp_path / "nested.json").write_text(json.dumps(doc))
    spec = _task_yaml(tmp_path, "records: data.questions\ncolumns: {question: q, options: opts, answer: a}\n"
                      "filter: {subject: cardio}\ndrop_options: [n/a, none]\n")  # fmt: skip
    data = load_task(spec, data=str(tmp_path / "nested.json"))
    assert [(it.question, it.options, it.gold) for it in data.items] == [
        ("Is it?", ["Yes", "No"], 0), ("Is it not?", ["yes", "no"], 1)]  # fmt: skip
    assert data.dropped_options == 2 and data.filtered_out == 1
    assert len(data.skipped) == 1 and "filler option" in data.skipped[0][1]
    err = capsys.readouterr().err
    assert "left out 2 filler option(s)" in err and "1 record(s) left out by the task's filter" in err
    (tmp_path / "yn.jsonl").write_text(json.dumps({"question": "Q?", "answer": "YES"}) + "\n")
    spec = _task_yaml(tmp_path, "choices: [yes, no]\n")  # a fixed answer set, no options column
    assert [(it.options, it.gold) for it in load_task(spec, data=str(tmp_path / "yn.jsonl")).items] == [
        (["yes", "no"], 0)
    ]
    with pytest.raises(
        HippoError, match=r"records: 'data.items': no 'items' under 'data' \(it has: questions\)"
    ):
        load_task(_task_yaml(tmp_path, "records: data.items\n"), data=str(tmp_path / "nested.json"))


def test_every_named_column_is_checked_before_scoring(tmp_path):
    (tmp_path / "f.jsonl").write_text(
        json.dumps({"question": "Q?", "options": ["a", "b"], "answer": "a"}) + "\n"
    )
    for body, column in (("columns: {answer: correct}\n", "correct"), ("columns: {id: qid}\n", "qid"),
                         ("filter: {topic: x}\n", "topic")):  # fmt: skip
        with pytest.raises(
            HippoError,
            match=rf"column '{column}' \(\w+\) is not in the file \(its columns: question, options, answer\)",
        ):
            load_task(_task_yaml(tmp_path, body), data=str(tmp_path / "f.jsonl"))


def test_a_seeded_sample_splits_one_file_into_disjoint_parts(tmp_path):
    from hippocrates.config import Source
    from hippocrates.data.sources import iter_conversations

    dev = DEMO / "medmcqa" / "dev.jsonl"
    (tmp_path / "held.yaml").write_text(
        "task: held\nformat: medmcqa\nsample: {seed: 3, start: 10, count: 20}\n"
    )
    held = load_task(resolve_tasks([str(tmp_path / "held.yaml")])[0], data=str(dev))
    train = [
        m for _, m in iter_conversations(Source(path=str(dev), sample={"seed": 3, "start": 0, "count": 10}))
    ]
    assert len(held.items) == 20 and len(train) == 10 and held.outside_sample == 20 and held.filtered_out == 0
    held_questions = {i.question for i in held.items}
    assert not any(q in m[0]["content"] for m in train for q in held_questions)
