"""SFT data path: loss masks in both prompt formats, truncation counting, mixtures, packing."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from hippocrates.errors import HippoError
from hippocrates.stages.mixture import interleave, mixture_counts, sample_mixture
from hippocrates.stages.modeling import IGNORE, PackedCollator, install_masked_head, make_rows, pack_bfd
from hippocrates.stages.sft import choose_template, encode, render

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
    {"instruction": "Spacing", "input": "", "output": "   indented answer"},  # merges at the boundary
]


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    from hippocrates.models import load_tokenizer

    return load_tokenizer(str(embedded_model_dir))


@pytest.mark.parametrize("fmt", ["chat", "alpaca"])
@pytest.mark.parametrize("example", EXAMPLES, ids=["plain", "input", "newline-merge", "space-merge"])
def test_prompt_tokens_masked_response_tokens_trained(tokenizer, fmt, example):
    stats = Counter()
    sample = encode(tokenizer, fmt, example, 4096, stats)
    prompt, full = render(tokenizer, fmt, example)
    special = fmt == "alpaca"
    prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE for label in labels[: len(prompt_ids)]), "a prompt token is trained"
    response = labels[len(prompt_ids) :]
    assert response and all(label != IGNORE for label in response), "a response token is masked"
    assert response == ids[len(prompt_ids) :]
    assert (
        tokenizer.decode(ids[len(prompt_ids) :])
        .replace(" ", "")
        .startswith(example["output"].replace(" ", "")[:5])
    )
    assert tokenizer.decode(ids).replace(" ", "") == full.replace(" ", "") or stats["boundary_retokenized"]
    if fmt == "chat":
        assert tokenizer.decode(response).rstrip().endswith("<|im_end|>")  # the model learns to stop
    else:
        assert response[-1] == tokenizer.eos_token_id


def test_boundary_merge_is_counted_not_silent(tokenizer):
    stats = Counter()
    encode(tokenizer, "alpaca", EXAMPLES[2], 4096, stats)
    assert stats["boundary_retokenized"] == 1


def test_template_that_changes_the_prompt_is_an_error(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}GENERATE\n{% endif %}"
    )
    with pytest.raises(HippoError, match="template: alpaca"):
        encode(tok, "chat", EXAMPLES[0], 4096, Counter())


def test_truncation_and_drops_are_counted(tokenizer):
    stats = Counter()
    long = {"instruction": "Explain.", "input": "", "output": "word " * 300}
    sample = encode(tokenizer, "alpaca", long, 64, stats)
    assert len(sample["input_ids"]) == 64 and stats["truncated"] == 1
    huge_prompt = {"instruction": "word " * 300, "input": "", "output": "ok"}
    assert encode(tokenizer, "alpaca", huge_prompt, 64, stats) is None
    assert stats["dropped_no_response"] == 1


def test_template_choice(tokenizer):
    assert choose_template(tokenizer, "auto") == "chat"
    assert choose_template(tokenizer, "alpaca") == "alpaca"
    import copy

    base = copy.deepcopy(tokenizer)
    base.chat_template = None
    assert choose_template(base, "auto") == "alpaca"
    with pytest.raises(HippoError, match="no chat template"):
        choose_template(base, "chat")


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
        install_masked_head(model)  # the training loss sees the same thing
        out = model(**batch, masked_lm=True)
        total = sum(
            float(model(**PackedCollator(0)([{"input_ids": s, "labels": s}]), masked_lm=True)["nll"])
            for s in samples
        )
        assert abs(float(out["nll"]) - total) < 1e-3
