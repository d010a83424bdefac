"""A synthetic run directory that follows docs/CONTRACTS.md exactly, with made-up numbers.

Used by the report's tests and handy for previewing the report without training anything:
``python -m hippocrates.report.synthetic runs/preview && hippo report runs/preview``.
Any subset of stages can be left out to produce the partial runs a report must survive.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hippocrates import __version__
from hippocrates.ablate import VARIANTS, write_ablation
from hippocrates.data.io import write_json, write_jsonl
from hippocrates.eval import calibration as cal
from hippocrates.report.sweep import combination_dir, write_sweep
from hippocrates.report.tables import task_average

TASKS = {"medqa": 4, "medmcqa": 4, "pubmedqa": 3}
SKILL = {"base": 0.2, "cpt": 0.4, "sft_from_base": 0.9, "cpt_sft": 1.1, "cpt_sft_dpo": 1.2}
CREATED = "2024-05-01T12:00:00+00:00"


def _stage(run: Path, stage: str, source: str, rng: np.random.Generator) -> None:
    d = run / stage
    d.mkdir(parents=True, exist_ok=True)
    if stage != "annotate":
        write_json(d / "config.json", {"model_type": "llama", "note": "synthetic"})
    write_json(d / "manifest.json", {
        "stage": stage, "input_model": {"path": source, "fingerprint": "f" * 64}, "seed": 42, "git_commit": "0388910abcdef0123456789",
        "start": "2024-05-01T10:00:00+00:00", "end": "2024-05-01T10:04:10+00:00", "duration_s": 250.0,
        "config": {"name": "synthetic", "seed": 42}, "hardware": {"device": "cpu", "threads": 2},
        "data_files": [{"path": f"data/demo/{stage}/train.jsonl", "sha256": f"{stage}{'ab' * 30}"[:64]}],
        "versions": {"hippocrates": __version__, "torch": "2.13.0", "transformers": "5.1.0", "peft": "0.21.0"},
    })  # fmt: skip
    steps = np.arange(5, 105, 5)
    loss = 2.5 * np.exp(-steps / 60) + 1.2 + rng.normal(0, 0.03, steps.size)
    history: list[dict[str, Any]] = [
        {"step": int(s), "loss": float(v), "learning_rate": 1e-3} for s, v in zip(steps, loss, strict=True)
    ]
    history += [{"step": int(s), "eval_loss": float(2.4 * np.exp(-s / 70) + 1.4)} for s in (25, 50, 75, 100)]
    extra = {
        "cpt": {"eval_perplexity_before": 18.2, "eval_perplexity_after": 12.9, "train_tokens": 51200},
        "sft": {"eval_loss_before": 2.31, "eval_loss_after": 1.62, "train_tokens": 38400},
        "annotate": {"n_prompts": 48, "n_pairs": 41, "n_set_aside": 7, "agreement_with_humans": 0.68},
        "dpo": {
            "eval_reward_accuracy_before": 0.5,
            "eval_reward_accuracy_after": 0.71,
            "eval_reward_margin": 0.42,
        },
    }[stage]
    train = {"train_loss": float(loss.mean()), "log_history": history} if stage != "annotate" else {}
    write_json(d / "metrics.json", {"stage": stage, **extra, **train})
    if stage == "annotate":
        write_jsonl(d / "preferences.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "reason": "r",
                                               "judge": "smollm2-135m", "rubric_version": "1", "verdicts": []}])  # fmt: skip


def _eval(
    out: Path, model: str, shots: int, skill: float, rng: np.random.Generator, tasks: dict[str, int]
) -> dict:
    """results.json and samples_<task>.jsonl of a fake model: ``skill`` raises the gold option's logit."""
    results: dict[str, Any] = {"model": model, "model_path": model, "prompt": "hippocrates", "chat_template": False,
               "num_fewshot": shots, "created": CREATED, "hippocrates_version": __version__, "tasks": {}}  # fmt: skip
    for task, k in tasks.items():
        n = 120
        gold = rng.integers(0, k, n)
        logits = rng.normal(0, 1.0, (n, k))
        logits[np.arange(n), gold] += skill + 0.1 * shots
        logits *= 2.0  # overconfident, so calibration has something to show
        rows = []
        for i in range(n):
            p = cal.softmax(logits[i])
            pred = int(p.argmax())
            rows.append({
                "doc_id": i, "id": f"{task}-{i}", "prompt": f"Question {i}?\nAnswer:",
                "continuations": [f" {c}" for c in "ABCD"[:k]], "loglikelihoods": logits[i].tolist(),
                "option_chars": list("ABCD"[:k]), "probs": p.tolist(), "pred": pred, "pred_norm": pred,
                "gold": int(gold[i]), "correct": bool(pred == gold[i]), "correct_norm": bool(pred == gold[i]),
                "confidence": float(p.max()),
            })  # fmt: skip
        write_jsonl(out / f"samples_{task}.jsonl", rows)
        m = cal.metrics(cal.Samples(task, list(logits), gold))
        se = float(np.sqrt(m["acc"] * (1 - m["acc"]) / (n - 1)))
        results["tasks"][task] = {
            "acc": m["acc"], "acc_stderr": se, "acc_norm": m["acc"], "acc_norm_stderr": se, "n": n,
            "ece": m["ece"], "brier": m["brier"], "skipped": 0, "skipped_ids": [], "truncated": 0,
            "data": f"data/demo/benchmarks/{task}.jsonl", "data_sha256": "0" * 64, "time_s": 3.2,
            "prompt": "hippocrates", "shots": shots,
        }  # fmt: skip
    write_json(out / "results.json", results)
    return results


def make_synthetic_run(
    run: Path,
    *,
    stages: Sequence[str] = ("cpt", "sft", "annotate", "dpo"),
    shots: Sequence[int] = (0, 3),
    ablation: bool = True,
    sweep: bool = True,
    tasks: dict[str, int] | None = None,
    seed: int = 0,
) -> Path:
    """Write a run directory with the given stages, eval shot counts, ablation and sweep."""
    rng = np.random.default_rng(seed)
    tasks = tasks or TASKS
    run = Path(run)
    previous = "smollm2-135m"
    for stage in ("cpt", "sft", "annotate", "dpo"):
        if stage in stages:
            _stage(run, stage, previous, rng)
            previous = previous if stage == "annotate" else str(run / stage)
    for k in shots:
        _eval(run / "eval" / f"{k}shot", previous, k, SKILL["cpt_sft_dpo"], rng, tasks)
    if ablation:
        data: dict[str, Any] = {"recipe": "synthetic", "base_model": "smollm2-135m", "num_fewshot": 0,
                                "tasks": list(tasks), "created": CREATED, "variants": []}  # fmt: skip
        for v in VARIANTS:
            res = _eval(run / "ablation" / "eval" / v.name / "0shot", v.name, 0, SKILL[v.name], rng, tasks)
            acc = {t: res["tasks"][t]["acc"] for t in tasks}
            data["variants"].append({"name": v.name, "label": v.label, "stages": list(v.stages), "status": "ok",
                                     "acc": acc, "average": task_average(list(acc.values()))})  # fmt: skip
        write_ablation(run / "ablation", data)
    if sweep:
        out: dict[str, Any] = {
            "model": str(run / "dpo"),
            "tasks": list(tasks),
            "created": CREATED,
            "rows": [],
        }
        for prompt, chat, k in [
            ("hippocrates", False, 0),
            ("letter", False, 0),
            ("hippocrates", True, 0),
            ("hippocrates", False, 3),
        ]:
            acc = {t: float(np.clip(0.45 + rng.normal(0, 0.05), 0, 1)) for t in tasks}
            out["rows"].append({"prompt": prompt, "chat_template": chat, "num_fewshot": k, "acc": acc,
                                "results": str(combination_dir(run / "sweep", prompt, chat, k) / "results.json"),
                                "average": task_average(list(acc.values()))})  # fmt: skip
        write_sweep(run / "sweep", out)
    return run


if __name__ == "__main__":
    print(make_synthetic_run(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/synthetic")))
