"""SFT data path: every record shape, loss masks in both prompt formats, multi-turn, truncation
counting, mixtures, packing."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from hippocrates import chat
from hippocrates.chat import IGNORE
from hippocrates.data.conversations import to_messages
from hippocrates.errors import HippoError
from hippocrates.stages.mixture import interleave, mixture_counts, sample_mixture
from hippocrates.stages.modeling import PackedCollator, labelled_nll
from hippocrates.stages.packing import make_rows, pack_bfd

EXAMPLES = [
    {
        "instruction": "What does the abducens nerve supply?",
        "input": "",
        "output": "The lateral rectus muscle.",
    },
    {
        "instruction": "Answer as a doctor.",
        "input": "I have a cough for 3 days.",
        "output": " Rest and fluids.",
    },
    {
        "instruction": "List two symptoms.",
        "input": "",
        "output": "\n\nFever\n- cough",
    },  # merges at the boundary
    {"instruction": "Spacing", "input": "", "output": "   indented answer"},
]
MULTI_TURN = [
    {"role": "system", "content": "You are a careful clinician."},
    {"role": "user", "content": "What is a normal resting heart rate?"},
    {"role": "assistant", "content": "About 60 to 100 beats per minute in adults."},
    {"role": "user", "content": "And in a newborn?"},
    {"role": "assistant", "content": "Roughly 100 to 160 beats per minute."},
]
# one conversation in every accepted record shape
SHAPES = {
    "messages": {"messages": MULTI_TURN[1:3]},
    "sharegpt": {
        "conversations": [
            {"from": "human", "value": MULTI_TURN[1]["content"]},
            {"from": "gpt", "value": MULTI_TURN[2]["content"]},
        ]
    },  # fmt: skip
    "prompt-completion": {"prompt": MULTI_TURN[1]["content"], "completion": MULTI_TURN[2]["content"]},
    "alpaca": {"instruction": MULTI_TURN[1]["content"], "input": "", "output": MULTI_TURN[2]["content"]},
    "qa": {"question": MULTI_TURN[1]["content"], "answer": MULTI_TURN[2]["content"]},
}


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    from hippocrates.models import load_tokenizer

    return load_tokenizer(str(embedded_model_dir))


def labelled_text(tokenizer, sample) -> str:
    return tokenizer.decode(
        [t for t, lab in zip(sample["input_ids"], sample["labels"], strict=True) if lab != IGNORE]
    )


@pytest.mark.parametrize("fmt", ["chat", "alpaca"])
@pytest.mark.parametrize("example", EXAMPLES, ids=["plain", "input", "newline-merge", "space-merge"])
def test_prompt_tokens_masked_response_tokens_trained(tokenizer, fmt, example):
    stats = Counter()
    messages = to_messages(example, "x")
    sample = chat.encode(tokenizer, messages, fmt, max_len=4096, stats=stats)
    prompt = chat.render(tokenizer, messages[:-1], fmt)
    prompt_ids = tokenizer(prompt, add_special_tokens=chat.adds_special_tokens(fmt))["input_ids"]
    ids, labels = sample["input_ids"], sample["labels"]
    n = len(prompt_ids) - (1 if stats["boundary_merged"] else 0)
    assert all(label == IGNORE for label in labels[:n]), "a prompt token is trained"
    response = labels[n:]
    assert response and all(label != IGNORE for label in response), "a response token is masked"
    assert response == ids[n:]
    assert example["output"].strip() in labelled_text(tokenizer, sample)
    if fmt == "chat":
        assert labelled_text(tokenizer, sample).rstrip().endswith("<|im_end|>")  # the model learns to stop
    else:
        assert response[-1] == tokenizer.eos_token_id
    # one tokenization of the whole text: exactly what the model reads at inference after the prompt
    whole = tokenizer(chat.render(tokenizer, messages, fmt, add_generation_prompt=False),
                      add_special_tokens=chat.adds_special_tokens(fmt))["input_ids"]  # fmt: skip
    assert ids == whole


def test_alpaca_input_field_and_system_prompt(tokenizer):
    text = chat.render(tokenizer, to_messages(EXAMPLES[1], "x"), "alpaca", add_generation_prompt=False)
    assert "### Input:\nI have a cough for 3 days." in text and text.startswith(chat.ALPACA_PREAMBLE_INPUT)
    custom = chat.render(tokenizer, to_messages({**EXAMPLES[0], "system": "Be brief."}, "x"), "alpaca")
    assert custom.startswith("Be brief.\n\n### Instruction:")


@pytest.mark.parametrize("fmt", ["chat", "alpaca"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_record_shape_trains_the_same_conversation(tokenizer, fmt, shape):
    messages = to_messages(SHAPES[shape], f"{shape}.jsonl:1")
    assert [m["role"] for m in messages] == ["user", "assistant"]
    sample = chat.encode(tokenizer, messages, fmt, max_len=4096, stats=Counter())
    assert MULTI_TURN[2]["content"] in labelled_text(tokenizer, sample)
    assert MULTI_TURN[1]["content"] not in labelled_text(tokenizer, sample)


@pytest.mark.parametrize("fmt", ["chat", "alpaca"])
def test_multi_turn_trains_every_assistant_turn_or_the_last(tokenizer, fmt):
    stats = Counter()
    every = labelled_text(tokenizer, chat.encode(tokenizer, MULTI_TURN, fmt, max_len=4096, stats=stats))
    last = labelled_text(tokenizer, chat.encode(tokenizer, MULTI_TURN, fmt, max_len=4096, stats=stats,
                                                last_turn_only=True))  # fmt: skip
    for turn in MULTI_TURN:
        if turn["role"] == "assistant":
            assert turn["content"] in every
        else:
            assert turn["content"] not in every  # system and user turns are never trained
    assert MULTI_TURN[4]["content"] in last and MULTI_TURN[2]["content"] not in last
    text = chat.render(tokenizer, MULTI_TURN, fmt, add_generation_prompt=False)
    assert MULTI_TURN[0]["content"] in text  # the system prompt is shown


def test_sharegpt_roles_and_bad_shapes():
    msgs = to_messages({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                          {"from": "gpt", "value": "A"}]}, "f:1")  # fmt: skip
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    with pytest.raises(
        HippoError, match=r"f:2: not a training record \(have: foo, text\); accepted shapes: messages"
    ):
        to_messages({"text": "hi", "foo": 1}, "f:2")
    with pytest.raises(HippoError, match="f:3: conversations\\[0\\].from 'robot'"):
        to_messages({"conversations": [{"from": "robot", "value": "x"}]}, "f:3")
    with pytest.raises(HippoError, match="no assistant turn"):
        to_messages({"messages": [{"role": "user", "content": "hi"}]}, "f:4")
    with pytest.raises(HippoError, match="must end with an assistant turn"):
        to_messages({"messages": [*MULTI_TURN[1:3], {"role": "user", "content": "more?"}]}, "f:5")


def test_template_that_changes_the_prompt_is_an_error(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}GENERATE\n{% endif %}"
    )
    with pytest.raises(HippoError, match="template: alpaca"):
        chat.encode(tok, to_messages(EXAMPLES[0], "x"), "chat", max_len=4096, stats=Counter())


def test_truncation_and_drops_are_counted(tokenizer):
    stats = Counter()
    long = to_messages({"instruction": "Explain.", "input": "", "output": "word " * 300}, "x")
    sample = chat.encode(tokenizer, long, "alpaca", max_len=64, stats=stats)
    assert len(sample["input_ids"]) == 64 and stats["truncated"] == 1
    huge_prompt = to_messages({"instruction": "word " * 300, "input": "", "output": "ok"}, "x")
    assert chat.encode(tokenizer, huge_prompt, "alpaca", max_len=64, stats=stats) is None
    assert stats["dropped_no_response"] == 1


def test_template_choice(tokenizer):
    assert chat.choose_format(tokenizer, "auto") == "chat"
    assert chat.choose_format(tokenizer, "alpaca") == "alpaca"
    base = copy.deepcopy(tokenizer)
    base.chat_template = None
    assert chat.choose_format(base, "auto") == "alpaca"
    with pytest.raises(HippoError, match="no chat template"):
        chat.choose_format(base, "chat")


def test_mixture_weights():
    assert mixture_counts([100, 100], [1, 1]) == [100, 100]
    assert mixture_counts([100, 100], [1, 3]) == [50, 150]
    mixed = sample_mixture([["a"] * 10, ["b"] * 10], [1, 3], seed=0)
    assert Counter(mixed) == {"a": 5, "b": 15}
    assert mixed == sample_mixture([["a"] * 10, ["b"] * 10], [1, 3], seed=0)  # seeded
    streamed = list(interleave([iter("aaaa"), iter("bb")], [1, 1], seed=0))
    assert sorted(streamed) == list("aaaabb")


def test_pack_bfd_fits_capacity_and_keeps_every_sample():
    lengths = [70, 50, 40, 30, 30, 20, 10, 90]
    bins = pack_bfd(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) == 4  # 350 tokens in bins of 100: optimal


def test_collator_restarts_positions_and_masks_segment_starts():
    samples = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
        {"input_ids": [8, 9], "labels": [8, 9]},
        {"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]},
    ]
    rows = make_rows(samples, capacity=6, packing=True)
    batch = PackedCollator(pad_id=0)(rows)
    assert "attention_mask" not in batch
    for pos, lab in zip(batch["position_ids"], batch["labels"], strict=True):
        starts = (pos == 0).nonzero().flatten().tolist()
        assert all(lab[s] == IGNORE for s in starts)  # no token predicts the next packed sample's start
        assert pos[0] == 0


def test_packed_logits_equal_single_sample_logits(tiny_llama_dir):
    """No cross-contamination: each packed sample's logits equal those of the sample alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randint(10, 5000, (n,), generator=gen).tolist() for n in (11, 7, 5, 9)]
    rows = make_rows([{"input_ids": s, "labels": s} for s in samples], capacity=20, packing=True)
    assert any(len(r["seq_lengths"]) > 1 for r in rows)
    batch = PackedCollator(pad_id=0)(rows)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        for b, row in enumerate(rows):
            start = 0
            for n in row["seq_lengths"]:
                alone = model(input_ids=torch.tensor([row["input_ids"][start : start + n]])).logits[0]
                assert torch.allclose(packed[b, start : start + n], alone, atol=1e-4)
                start += n
        nll, _ = labelled_nll(model, batch)  # the training loss sees the same thing
        total = sum(
            float(labelled_nll(model, PackedCollator(0)([{"input_ids": s, "labels": s}]))[0]) for s in samples
        )
        assert abs(float(nll) - total) < 1e-3
