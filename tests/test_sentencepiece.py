"""The paper's models (Llama-2, Mistral) use SentencePiece tokenizers with a "▁" prefix space and
byte fallback. On such a tokenizer (built offline, see conftest): SFT's loss mask at the
prompt/response boundary, the scorer's context/continuation split against lm-eval's, v0.3's
separate encoding, and the local judge's verdict tokens."""

from __future__ import annotations

from collections import Counter

import pytest

from conftest import DEMO, LLAMA2_CHAT_TEMPLATE
from hippocrates import chat
from hippocrates.chat import IGNORE
from hippocrates.data.conversations import to_messages
from hippocrates.models import load_tokenizer

RESPONSES = ["Paris is the capital.", " Rest and fluids.", "\n\nFever, cough", "yes"]


@pytest.fixture(scope="module")
def sp(tiny_sp_llama_dir):
    return load_tokenizer(str(tiny_sp_llama_dir))


def test_the_tokenizer_behaves_like_llama2(sp):
    assert sp.convert_ids_to_tokens(sp("yes", add_special_tokens=False)["input_ids"])[0].startswith(
        "▁"
    )  # prefix space
    assert sp("x")["input_ids"][0] == sp.bos_token_id
    after_newline = sp.convert_ids_to_tokens(sp("Answer:\nParis")["input_ids"])
    assert not after_newline[-1].startswith("▁") or after_newline[-2] == "<0x0A>"
    assert sp.decode(sp("é✓")["input_ids"], skip_special_tokens=True) == "é✓"  # byte fallback


@pytest.mark.parametrize("template", [None, LLAMA2_CHAT_TEMPLATE], ids=["alpaca", "llama2-chat"])
@pytest.mark.parametrize("response", RESPONSES)
def test_sft_labels_are_exactly_the_response(sp, template, response):
    import copy

    tok = copy.deepcopy(sp)
    tok.chat_template = template
    fmt = chat.choose_format(tok, "auto")
    messages = to_messages({"instruction": "Name the capital of France.", "output": response}, "x")
    stats = Counter()
    sample = chat.encode(tok, messages, fmt, max_len=4096, stats=stats)
    ids, labels = sample["input_ids"], sample["labels"]
    whole = tok(
        chat.render(tok, messages, fmt, add_generation_prompt=False),
        add_special_tokens=chat.adds_special_tokens(fmt),
    )
    assert ids == whole["input_ids"]  # tokenized as one text: the response continues its prompt
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert all(lab != IGNORE for lab in labels[first:])
    trained = tok.decode(ids[first:], skip_special_tokens=True)
    assert trained.strip() == response.strip()
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id  # the model learns to stop
    prompt_ids = tok(chat.render(tok, messages[:1], fmt), add_special_tokens=chat.adds_special_tokens(fmt))[
        "input_ids"
    ]
    assert (
        ids[: len(prompt_ids) - stats["boundary_merged"]]
        == prompt_ids[: len(prompt_ids) - stats["boundary_merged"]]
    )
    assert first == len(prompt_ids) - stats["boundary_merged"]


def test_scorer_split_matches_lm_eval(tiny_sp_llama_dir, tmp_path):
    """Our continuation tokens and log-likelihoods equal lm-eval's HF backend on a SentencePiece model."""
    import json

    import lm_eval
    from lm_eval.tasks import TaskManager

    from hippocrates.eval.lm_eval_export import export
    from hippocrates.eval.runner import evaluate

    tasks = ["medqa", "pubmedqa"]
    common = {"data_dir": str(DEMO / "benchmarks"), "num_fewshot": 1, "prompt": "hippocrates"}
    export(tmp_path / "tasks", tasks, model=str(tiny_sp_llama_dir), **common)
    evaluate(str(tiny_sp_llama_dir), tasks, limit=3, batch_size=2, output_dir=tmp_path / "ours", **common)
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tiny_sp_llama_dir},dtype=float32", tasks=[f"hippo_{t}" for t in tasks],
        device="cpu", limit=3, task_manager=TaskManager(include_path=str(tmp_path / "tasks")), log_samples=True,
        num_fewshot=1, batch_size=2,
    )  # fmt: skip
    for task in tasks:
        rows = [json.loads(x) for x in (tmp_path / "ours" / f"samples_{task}.jsonl").read_text().splitlines()]
        samples = sorted(theirs["samples"][f"hippo_{task}"], key=lambda s: s["doc_id"])
        for row, sample in zip(rows, samples, strict=True):
            lls = [float(r[0][0]) for r in sample["resps"]]
            assert max(abs(a - b) for a, b in zip(lls, row["loglikelihoods"], strict=True)) <= 1e-4


def test_v03_encodes_continuations_on_their_own(sp):
    from hippocrates.eval.scorer import LmEvalTokenizer, V03Tokenizer

    context = "Question: Is it?\nAnswer:"
    v04 = LmEvalTokenizer(sp).encode_prompt(context, [" yes", " no"])
    v03 = V03Tokenizer(sp).encode_prompt(context, [" yes", " no"])
    assert v04.context[0] == sp.bos_token_id and v03.context[0] != sp.bos_token_id  # v0.3 added no BOS
    assert v03.continuations[0] == sp.encode(" yes", add_special_tokens=False)  # on its own
    assert sp.decode(v04.continuations[0]).strip() == "yes"
    if sp.convert_ids_to_tokens(v03.continuations[0])[0] == "▁":  # the shipped pipeline: a prefix-space token
        assert v04.continuations[0] != v03.continuations[0]


def test_judge_reads_the_verdict_letter_tokens(tiny_sp_llama_dir, sp):
    from hippocrates.models import load_model
    from hippocrates.rlaif.judges import VERDICT_LEAD, JudgeItem, load_rubric
    from hippocrates.rlaif.local_judge import LocalJudge

    judge = LocalJudge(load_model(str(tiny_sp_llama_dir)), sp, rubric=load_rubric(), tie_threshold=0.0)
    text = judge.render(JudgeItem("q", "a", "b"))
    assert text.endswith(VERDICT_LEAD)
    full_a = sp(text + " A", add_special_tokens=True)["input_ids"]
    full_b = sp(text + " B", add_special_tokens=True)["input_ids"]
    assert full_a[-1] == judge.token_a and full_b[-1] == judge.token_b  # what follows the prompt as one text
    assert sp.convert_ids_to_tokens([judge.token_a, judge.token_b]) == ["▁A", "▁B"]
    verdicts = judge.judge_pairs(
        [JudgeItem("q", "short", "a longer answer"), JudgeItem("q", "a longer answer", "short")]
    )
    assert all(v.verdict in ("A", "B", "tie") for v in verdicts)
