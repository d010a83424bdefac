"""``protocol: v0.3`` reproduces the paper's harness, lm-eval v0.3.0, read from its source:

* evaluator.evaluate: ``rnd = random.Random(); rnd.seed(42); rnd.shuffle(task_docs)``, then
  ``islice(task_docs, 0, limit)``, and the same ``rnd`` is passed to ``fewshot_context``;
* Task.fewshot_context: with training docs ``rnd.sample(training_docs, k)``; without,
  ``rnd.sample(test_docs, k + 1)`` minus the doc itself, first k; shots joined as
  ``doc_to_text + " " + answer`` with "\\n\\n", then "\\n\\n", then the doc's text;
* BaseLM.loglikelihood: context and continuation each ``tokenizer.encode(..., add_special_tokens=False)``.

The expected orders below were computed by hand from Python's ``random.Random(42)`` as v0.3 calls
it (see the comments) and are written out literally.
"""

from __future__ import annotations

import pytest

from hippocrates.data.benchmarks import Item
from hippocrates.errors import HippoError
from hippocrates.eval.loaders import TaskData
from hippocrates.eval.prompts import build_prompts
from hippocrates.eval.registry import resolve_tasks


def _items(prefix: str, n: int) -> list[Item]:
    return [Item(f"{prefix}{k}", f"Q{prefix}{k}?", [f"yes{k}", f"no{k}"], k % 2) for k in range(n)]


def _text(item: Item) -> str:
    return f"Question: {item.question}\n(A) {item.options[0]} (B) {item.options[1]}\nAnswer:"


def _shot(item: Item) -> str:
    return _text(item) + " " + item.options[item.gold] + "\n\n"


def test_documents_are_shuffled_then_limited_and_shots_come_from_the_same_generator():
    items = _items("t", 6)
    data = TaskData(resolve_tasks(["usmle_step1"])[0], items, items, True, "toy", None, "toy")
    # Random(42).shuffle([0..5]) -> [3, 1, 2, 4, 0, 5]; limit 3 keeps docs 3, 1, 2. Then, in that order,
    # sample(range(6), 3): [1, 5, 4] -> shots 1, 5 for doc 3; [5, 0, 4] -> 5, 0 for doc 1; [4, 3, 0] -> 4, 3 for doc 2.
    prompts = build_prompts(data, limit=3, num_fewshot=2, protocol="v0.3")
    assert [p.item.id for p in prompts] == ["t3", "t1", "t2"]
    assert [p.shot_ids for p in prompts] == [["t1", "t5"], ["t5", "t0"], ["t4", "t3"]]
    expected = _shot(items[1]) + _shot(items[5]) + _text(items[3])
    assert prompts[0].context == expected
    assert prompts[0].continuations == [" yes3", " no3"]


def test_a_separate_training_pool_is_sampled_k_at_a_time():
    items, train = _items("t", 6), _items("x", 4)
    data = TaskData(resolve_tasks(["medqa"])[0], items, train, False, "toy", None, "toy")
    # after the shuffle, sample(range(4), 2) per doc: [1, 0], [1, 2], [0, 2]
    prompts = build_prompts(data, limit=3, num_fewshot=2, protocol="v0.3")
    assert [p.shot_ids for p in prompts] == [["x1", "x0"], ["x1", "x2"], ["x0", "x2"]]


def test_zero_shot_order_and_v04_difference():
    items = _items("t", 6)
    data = TaskData(resolve_tasks(["medqa"])[0], items, items, True, "toy", None, "toy")
    assert [p.item.id for p in build_prompts(data, protocol="v0.3")] == ["t3", "t1", "t2", "t4", "t0", "t5"]
    assert [p.item.id for p in build_prompts(data, protocol="v0.4")] == [f"t{k}" for k in range(6)]


def test_v03_has_no_chat_template():
    items = _items("t", 3)
    data = TaskData(resolve_tasks(["medqa"])[0], items, items, True, "toy", None, "toy")
    with pytest.raises(HippoError, match="no chat templates"):
        build_prompts(data, protocol="v0.3", chat_template=True)


def test_v03_encoding_is_separate_and_without_special_tokens(embedded_model_dir):
    from hippocrates.eval.scorer import V03Tokenizer
    from hippocrates.models import load_tokenizer

    tok = load_tokenizer(str(embedded_model_dir))
    enc = V03Tokenizer(tok).encode_prompt("Question: Q?\nAnswer:", [" yes", " no"])
    assert enc.context == tok.encode("Question: Q?\nAnswer:", add_special_tokens=False)
    assert enc.continuations == [
        tok.encode(" yes", add_special_tokens=False),
        tok.encode(" no", add_special_tokens=False),
    ]
    assert V03Tokenizer(tok).encode_prompt("", [" yes"]).context == [
        tok.eos_token_id
    ]  # v0.3: empty context is EOT


def test_fallback_pool_is_stated(tiny_llama_dir, tmp_path, capsys):
    """A task with no training file beside its test file draws shots from the test set, and says so."""
    from conftest import DEMO
    from hippocrates.eval.runner import evaluate

    src = DEMO / "benchmarks" / "medqa" / "US_4_options_test.jsonl"
    (tmp_path / "test.jsonl").write_text(src.read_text())
    res = evaluate(str(tiny_llama_dir), ["medqa"], data={"medqa": str(tmp_path / "test.jsonl")}, num_fewshot=1,
                   limit=2, protocol="v0.3")  # fmt: skip
    task = res["tasks"]["medqa"]
    assert task["fewshot_pool_is_eval_set"] is True and "no training file beside it" in task["fewshot_pool"]
    assert "few-shot exemplars come from" in capsys.readouterr().err
    assert res["protocol"] == "v0.3"
