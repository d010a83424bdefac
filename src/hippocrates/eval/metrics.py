"""Per-item predictions and task metrics, defined as lm-eval defines them.

``acc``: argmax of the summed log-likelihoods. ``acc_norm``: argmax after dividing each by the
character length of the choice string (lm-eval divides by ``len(choice)``, the scored text
without the leading target delimiter). Standard errors are lm-eval's ``mean_stderr``: the
sample standard deviation (n - 1) over sqrt(n). ``ece`` and ``brier`` come from
:mod:`hippocrates.eval.calibration`, which holds the whole calibration analysis.
"""

from __future__ import annotations

import math
from typing import Any

from hippocrates.eval import calibration as cal


def argmax(values: list[float]) -> int:
    """First index of the maximum (numpy's tie rule, as lm-eval uses np.argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def sample_row(
    doc_id: int,
    item_id: str,
    prompt: str,
    continuations: list[str],
    choices: list[str],
    loglikelihoods: list[float],
    gold: int,
) -> dict[str, Any]:
    """One samples_<task>.jsonl row (the contract the report and calibration build on)."""
    chars = [len(c) for c in choices]
    probs = [float(p) for p in cal.softmax(loglikelihoods)]
    pred = argmax(loglikelihoods)
    pred_norm = argmax([ll / max(n, 1) for ll, n in zip(loglikelihoods, chars, strict=True)])
    return {
        "doc_id": doc_id,
        "id": item_id,
        "prompt": prompt,
        "continuations": continuations,
        "loglikelihoods": loglikelihoods,
        "option_chars": chars,
        "probs": probs,
        "pred": pred,
        "pred_norm": pred_norm,
        "gold": gold,
        "correct": pred == gold,
        "correct_norm": pred_norm == gold,
        "confidence": max(probs),
    }


def mean_stderr(values: list[float]) -> float | None:
    """lm-eval's stderr of a mean; None when fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def task_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """acc, acc_norm (with stderrs), n, ece and brier over a task's sample rows."""
    acc = [float(r["correct"]) for r in rows]
    acc_norm = [float(r["correct_norm"]) for r in rows]
    n = len(rows)
    return {
        "acc": sum(acc) / n if n else None,
        "acc_stderr": mean_stderr(acc),
        "acc_norm": sum(acc_norm) / n if n else None,
        "acc_norm_stderr": mean_stderr(acc_norm),
        "n": n,
        "ece": cal.ece([r["confidence"] for r in rows], [float(r["correct"]) for r in rows]) if n else None,
        "brier": cal.brier([r["probs"] for r in rows], [r["gold"] for r in rows]) if n else None,
    }
