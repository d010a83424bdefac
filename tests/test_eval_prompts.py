"""Prompt strategies, few-shot assembly and exemplar sampling."""

from __future__ import annotations

from pathlib import Path

import pytest

from hippocrates.errors import HippoError
from hippocrates.eval.loaders import Item, TaskData, load_task
from hippocrates.eval.prompts import build_prompts, sample_shots
from hippocrates.eval.registry import resolve_tasks

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "benchmarks"


def toy(name: str = "medmcqa", n: int = 6, pool_is_eval: bool = True) -> TaskData:
    items = [Item(f"i{k}", f"Q{k}?", [f"a{k}", f"b{k}", f"c{k}"], k % 3) for k in range(n)]
    return TaskData(resolve_tasks([name])[0], items, items, pool_is_eval, "toy", None, "toy")


def test_hippocrates_prompt_is_the_papers():
    (p,) = build_prompts(toy("medqa"), toy("medqa").items[:1])
    assert p.context == "Question: Q0?\n(A) a0 (B) b0 (C) c0\nAnswer:"
    assert p.continuations == [" a0", " b0", " c0"] and p.choices == ["a0", "b0", "c0"]


def test_letter_prompt_is_todays_lm_eval():
    (p,) = build_prompts(toy("medmcqa"), toy().items[:1], strategy="letter")
    assert p.context == "Question: Q0?\nChoices:\nA. a0\nB. b0\nC. c0\nAnswer:"  # medmcqa's header
    assert p.continuations == [" A", " B", " C"]
    (q,) = build_prompts(toy("medqa"), toy().items[:1], strategy="letter")
    assert q.context == "Question: Q0?\nA. a0\nB. b0\nC. c0\nAnswer:"


def test_pubmedqa_prompt_and_stepwise_preamble():
    data = load_task(resolve_tasks(["pubmedqa"])[0], data_dir=str(DEMO))
    item = data.items[0]
    (p,) = build_prompts(data, [item])
    assert p.context == f"Abstract: {item.context}\nQuestion: {item.question}\nAnswer:"
    assert p.continuations == [" yes", " no", " maybe"]
    (c,) = build_prompts(data, [item], strategy="stepwise")
    assert c.context.endswith(p.context) and "step by step" in c.context.split("\n\n")[0]


def test_k_shot_never_uses_the_item_and_is_seeded():
    data = toy(n=5)
    prompts = build_prompts(data, data.items, num_fewshot=4)
    for p in prompts:
        assert len(p.shot_ids) == 4 and p.item.id not in p.shot_ids
        assert p.context.count("\n\n") == 4 and p.context.rsplit("\n\n", 1)[1].startswith(
            f"Question: {p.item.question}\n"
        )
    again = build_prompts(data, data.items, num_fewshot=4)
    assert [p.context for p in prompts] == [p.context for p in again]
    other = build_prompts(data, data.items, num_fewshot=2, seed=7)
    assert [p.shot_ids for p in other] != [p.shot_ids[:2] for p in prompts]


def test_shot_answer_is_the_gold_choice():
    data = toy(n=3)
    p = build_prompts(data, data.items[:1], num_fewshot=1)[0]
    shot = next(it for it in data.items if it.id == p.shot_ids[0])
    assert (
        p.context.startswith(f"Question: {shot.question}\n")
        and f"Answer: {shot.options[shot.gold]}\n\n" in p.context
    )


def test_train_pool_is_used_when_present():
    data = load_task(resolve_tasks(["medqa"])[0], data_dir=str(DEMO))
    pool_ids = {it.id for it in data.pool}
    for p in build_prompts(data, data.items[:5], num_fewshot=3):
        assert set(p.shot_ids) <= pool_ids


def test_k_larger_than_pool_is_an_error():
    with pytest.raises(HippoError, match="larger than the few-shot pool"):
        sample_shots(toy(n=3).items, toy(n=3).items, True, 3, 1234)


def test_chat_template_multiturn(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    data = toy(n=3)
    p = build_prompts(data, data.items[:1], num_fewshot=1, chat_template=True, tokenizer=tok)[0]
    assert p.context.startswith("<|im_start|>") and p.context.endswith("<|im_start|>assistant\n")
    assert p.context.count("<|im_start|>user") == 2 and p.continuations == ["a0", "b0", "c0"]
