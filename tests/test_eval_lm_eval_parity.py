"""lm-eval parity: the exported tasks, run by lm-eval's HF backend, give our per-sample numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hippocrates.eval.lm_eval_export import export
from hippocrates.eval.runner import evaluate

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "benchmarks"
LIMIT = 3


@pytest.mark.parametrize(
    ("tasks", "prompt", "shots", "chat", "max_length"),
    [
        (["medqa", "usmle_step1"], "hippocrates", 2, False, None),
        (["medmcqa", "pubmedqa_all"], "stepwise", 1, True, None),
        (["usmle_step2"], "letter", 1, False, 96),  # a window shorter than the prompts: left truncation
    ],
)
def test_lm_eval_gives_the_same_loglikelihoods(
    tiny_llama_dir, tmp_path, tasks, prompt, shots, chat, max_length
):
    import lm_eval
    from lm_eval.tasks import TaskManager

    common = {"data_dir": str(DEMO), "num_fewshot": shots, "prompt": prompt, "chat_template": chat}
    files = export(tmp_path / "tasks", tasks, model=str(tiny_llama_dir), max_length=max_length, **common)
    assert {f.name for f in files} >= {"utils.py", "README.md", *(f"hippo_{t}.yaml" for t in tasks)}
    ours = evaluate(str(tiny_llama_dir), tasks, limit=LIMIT, batch_size=2, output_dir=tmp_path / "ours",
                    max_length=max_length, **common)  # fmt: skip
    model_args = f"pretrained={tiny_llama_dir},dtype=float32" + (
        f",max_length={max_length}" if max_length else ""
    )
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=[f"hippo_{t}" for t in tasks], device="cpu", limit=LIMIT,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")), log_samples=True, num_fewshot=shots,
        batch_size=2, apply_chat_template=chat,
    )  # fmt: skip
    for task in tasks:
        rows = [json.loads(x) for x in (tmp_path / "ours" / f"samples_{task}.jsonl").read_text().splitlines()]
        samples = sorted(theirs["samples"][f"hippo_{task}"], key=lambda s: s["doc_id"])
        assert len(rows) == len(samples) == LIMIT
        for row, sample in zip(rows, samples, strict=True):
            assert [a[0] for a in sample["arguments"]] == [row["prompt"]] * len(row["continuations"])
            assert [a[1] for a in sample["arguments"]] == row["continuations"]
            lls = [float(r[0][0]) for r in sample["resps"]]
            assert max(abs(a - b) for a, b in zip(lls, row["loglikelihoods"], strict=True)) <= 1e-4
            assert sample["acc"] == float(row["correct"]) and sample["acc_norm"] == float(row["correct_norm"])
        metrics = theirs["results"][f"hippo_{task}"]
        assert metrics["acc,none"] == pytest.approx(ours["tasks"][task]["acc"])
        assert metrics["acc_norm,none"] == pytest.approx(ours["tasks"][task]["acc_norm"])
    if max_length:
        assert ours["tasks"]["usmle_step2"]["truncated"] > 0
