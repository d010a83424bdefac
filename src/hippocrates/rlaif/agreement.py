"""How well the AI judge agrees with clinicians: accuracy and Cohen's kappa over {A, B, tie}.

The judge sees every human-labelled pair in both orders, like in annotate. Its label for a pair
is the consistent verdict (after the position-bias correction, as annotate uses it); a pair it
judges inconsistently (it followed the position) counts as ``tie``, since the judge then has no
preference. Pairs where the judge failed are left out and counted. The order consistency of the
raw verdicts is reported beside the accuracy. Kappa is ours (a few lines) so the definition is explicit, and the tests check it
against a hand-computed example and scikit-learn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hippocrates.data.io import iter_jsonl, require_fields
from hippocrates.errors import HippoError
from hippocrates.rlaif.judges import LABELS, Judge, JudgeItem, combine_orders, order_consistency

FIELDS = ["prompt", "response_a", "response_b", "label"]


def cohen_kappa(
    first: list[str], second: list[str], labels: list[str] | tuple[str, ...] = LABELS
) -> float | None:
    """Cohen's kappa ``(p_o - p_e) / (1 - p_e)``; ``None`` when undefined (both raters constant and equal)."""
    if len(first) != len(second):
        raise ValueError("both raters must label the same items")
    n = len(first)
    if n == 0:
        return None
    observed = sum(a == b for a, b in zip(first, second, strict=True)) / n
    expected = sum((first.count(k) / n) * (second.count(k) / n) for k in labels)
    if expected == 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def confusion_matrix(
    truth: list[str], predicted: list[str], labels: tuple[str, ...] = LABELS
) -> list[list[int]]:
    """Counts with rows = truth (human) and columns = predicted (judge), in ``labels`` order."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(truth, predicted, strict=True):
        matrix[index[t]][index[p]] += 1
    return matrix


def agreement_metrics(human: list[str], judge: list[str]) -> dict[str, Any]:
    """Accuracy, kappa, label counts and the confusion matrix of two label lists."""
    kappa = cohen_kappa(human, judge)
    return {
        "n": len(human),
        "accuracy": sum(h == j for h, j in zip(human, judge, strict=True)) / len(human) if human else None,
        "cohen_kappa": None if kappa is None else round(kappa, 6),
        "labels": list(LABELS),
        "human_counts": {k: human.count(k) for k in LABELS},
        "judge_counts": {k: judge.count(k) for k in LABELS},
        "confusion_matrix": {"rows": "human", "columns": "judge", "matrix": confusion_matrix(human, judge)},
    }


def load_human_labels(path: str | Path) -> list[dict[str, Any]]:
    """Rows ``{"id", "prompt", "response_a", "response_b", "label": A|B|tie}``, validated."""
    rows = []
    for line, record in iter_jsonl(path):
        require_fields(record, FIELDS, path, line)
        if record["label"] not in LABELS:
            raise HippoError(
                f"{path}:{line}: label must be one of {', '.join(LABELS)} (got {record['label']!r})"
            )
        rows.append({"id": str(record.get("id", f"line-{line}")), **{f: record[f] for f in FIELDS}})
    if not rows:
        raise HippoError(f"{path}: no labelled pairs")
    return rows


def evaluate_agreement(judge: Judge, path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Judge every human-labelled pair in both orders; returns (metrics, one row per pair)."""
    rows = load_human_labels(path)
    items = []
    for r in rows:
        items += [
            JudgeItem(r["prompt"], r["response_a"], r["response_b"]),
            JudgeItem(r["prompt"], r["response_b"], r["response_a"]),
        ]
    verdicts = judge.judge_pairs(items)
    details, human, predicted = [], [], []
    for k, r in enumerate(rows):
        outcome = combine_orders(verdicts[2 * k], verdicts[2 * k + 1])
        label = "tie" if outcome == "inconsistent" else outcome
        details.append(
            {
                "id": r["id"],
                "human": r["label"],
                "judge": None if outcome == "failed" else label,
                "outcome": outcome,
                "verdicts": [verdicts[2 * k].to_dict(), verdicts[2 * k + 1].to_dict()],
            }
        )
        if outcome != "failed":
            human.append(r["label"])
            predicted.append(label)
    metrics = agreement_metrics(human, predicted)
    metrics.update(
        file=str(path),
        pairs=len(rows),
        failed=sum(d["outcome"] == "failed" for d in details),
        inconsistent=sum(d["outcome"] == "inconsistent" for d in details),
        items=len(verdicts),
        failed_items=sum(not v.ok for v in verdicts),
        **order_consistency(verdicts),
        judge=judge.name,
        rubric_version=judge.rubric.version,
    )
    return metrics, details
