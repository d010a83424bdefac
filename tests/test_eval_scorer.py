"""Scoring: lm-eval tokenization, and the prefix-sharing scorer equal to the naive reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from hippocrates.eval.loaders import load_task
from hippocrates.eval.prompts import build_prompts
from hippocrates.eval.registry import resolve_tasks
from hippocrates.eval.scorer import LmEvalTokenizer, score

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "benchmarks"
TOL = 1e-4


def encoded_prompts(
    tokenizer, tasks=("medqa", "pubmedqa", "usmle_step2"), n=4, k=1, chat=False, strategy="hippocrates"
):
    enc = LmEvalTokenizer(tokenizer)
    out = []
    for name in tasks:
        data = load_task(resolve_tasks([name])[0], data_dir=str(DEMO))
        for p in build_prompts(
            data, data.items[:n], num_fewshot=k, strategy=strategy, chat_template=chat, tokenizer=tokenizer
        ):
            out.append(enc.encode_prompt(p.context, p.continuations))
    return out


def max_diff(a, b) -> float:
    return max(
        abs(x - y)
        for sa, sb in zip(a, b, strict=True)
        for x, y in zip(sa.loglikelihoods, sb.loglikelihoods, strict=True)
    )


def preds(scored) -> list[int]:
    return [max(range(len(s.loglikelihoods)), key=s.loglikelihoods.__getitem__) for s in scored]


def test_tokenization_matches_lm_eval_hflm(tiny_llama_dir):
    """Tricky contexts (trailing whitespace, a chat template's BOS text, non-ASCII) get lm-eval's
    log-likelihoods through its public request interface, so they are tokenized as lm-eval does."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = HFLM(pretrained=str(tiny_llama_dir), device="cpu", dtype="float32", batch_size=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype="float32").eval()
    ours = LmEvalTokenizer(AutoTokenizer.from_pretrained(tiny_llama_dir))
    cases = [
        ("Question: x?\nAnswer:", [" yes", " no"]),
        ("Answer: ", ["A", "B"]),  # trailing space moves into the continuation
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", ["maybe", "no"]),  # starts with BOS text
        ("Ünïcode  \t", ["ß", " 42"]),
    ]
    for context, conts in cases:
        requests = [
            Instance(request_type="loglikelihood", doc={}, arguments=(context, c), idx=i)
            for i, c in enumerate(conts)
        ]
        theirs = [ll for ll, _ in lm.loglikelihood(requests)]
        (scored,) = score(model, [ours.encode_prompt(context, conts)], scorer="naive", max_length=2048)
        assert max(abs(a - b) for a, b in zip(theirs, scored.loglikelihoods, strict=True)) <= TOL, context


class BosTokenizer:
    """A tokenizer that prepends BOS by default, like Llama's: BOS must not be doubled."""

    bos_token_id, eos_token_id = 1, 2

    def decode(self, token_id: int) -> str:
        return "<s>"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        body = [ord(c) for c in (text[3:] if text.startswith("<s>") else text)]
        return ([1] if add_special_tokens or text.startswith("<s>") else []) + body


def test_bos_added_once():
    enc = LmEvalTokenizer(BosTokenizer())
    plain = enc.encode_prompt("ab", [" c"])
    assert plain.context == [1, 97, 98] and plain.continuations == [[32, 99]]
    templated = enc.encode_prompt("<s>ab", [" c"])
    assert templated.context == [1, 97, 98]


@pytest.mark.parametrize(
    ("seed", "layers", "hidden", "chat", "batch"), [(0, 2, 64, False, 3), (1, 3, 32, True, 5)]
)
def test_fast_equals_naive_on_random_models(tmp_path, embedded_model_dir, seed, layers, hidden, chat, batch):
    from conftest import make_tiny_llama
    from hippocrates.models import load_model, load_tokenizer

    path = make_tiny_llama(tmp_path / "m", embedded_model_dir, seed=seed, layers=layers, hidden=hidden)
    model, tok = load_model(str(path)).eval(), load_tokenizer(str(path))
    encoded = encoded_prompts(tok, tasks=("medqa", "pubmedqa"), n=3, chat=chat, k=seed + 1)
    fast = score(model, encoded, scorer="fast", max_length=2048, batch_size=batch)
    naive = score(model, encoded, scorer="naive", max_length=2048, batch_size=batch)
    assert max_diff(fast, naive) <= TOL and preds(fast) == preds(naive)
    assert not any(s.truncated for s in fast)


def test_batch_size_does_not_change_scores(tiny_llama_dir):
    from hippocrates.models import load_model, load_tokenizer

    model, tok = load_model(str(tiny_llama_dir)).eval(), load_tokenizer(str(tiny_llama_dir))
    encoded = encoded_prompts(tok, strategy="letter")
    one = score(model, encoded, max_length=2048, batch_size=1)
    eight = score(model, encoded, max_length=2048, batch_size=8)
    assert max_diff(one, eight) <= TOL and preds(one) == preds(eight)


def test_left_truncation_is_flagged_and_matches_naive(tiny_llama_dir):
    from hippocrates.models import load_model, load_tokenizer

    model, tok = load_model(str(tiny_llama_dir)).eval(), load_tokenizer(str(tiny_llama_dir))
    encoded = encoded_prompts(tok, tasks=("medmcqa",), k=1)
    window = sorted(len(e.context) for e in encoded)[len(encoded) // 2]  # about half the prompts are too long
    fast = score(model, encoded, max_length=window, batch_size=4)
    naive = score(model, encoded, scorer="naive", max_length=window, batch_size=4)
    flags = [s.truncated for s in fast]
    assert any(flags) and not all(flags) and flags == [s.truncated for s in naive]
    assert max_diff(fast, naive) <= TOL


@pytest.mark.slow
def test_fast_equals_naive_on_the_embedded_model(embedded_model_dir):
    from hippocrates.models import load_model, load_tokenizer

    model, tok = load_model(str(embedded_model_dir)).eval(), load_tokenizer(str(embedded_model_dir))
    encoded = encoded_prompts(tok, tasks=("medqa",), n=3, k=0)
    fast = score(model, encoded, max_length=8192, batch_size=4)
    naive = score(model, encoded, scorer="naive", max_length=8192, batch_size=4)
    assert max_diff(fast, naive) <= TOL and preds(fast) == preds(naive)
