"""Paired comparisons of two evaluations on the same items: is B better than A, or is it noise?

Both models answered the same items, so the comparison is paired: items are matched by id and the
statistics use the per-item outcomes, not only the two accuracies.

- **difference**: B's accuracy minus A's, per task; the average is the mean over tasks (the
  "Average" of the ablation and sweep tables).
- **95% CI**: percentile interval of a paired bootstrap that resamples items with replacement
  (10,000 resamples by default, seeded per task); for the average, items are resampled within each
  task (stratified), so every resample keeps each task's size and its equal weight.
- **p**: exact McNemar test, the two-sided binomial test (``scipy.stats.binomtest``, p = 1/2) of
  the items where exactly one model is right; 1 when there are none. For the average the
  discordant items of all tasks are pooled: an exact test of "neither model is favoured on any item".
- **Holm**: when one table compares several models with one baseline, each row (a task, or the
  average) has its p-values adjusted across those comparisons; ``significant_holm`` says whether
  the adjusted p stays below 1 − confidence (0.05).

The functions take per-item outcomes, ``{task: {item id: correct}}``, so any evaluation that scores
items right or wrong can use them; :func:`load_outcomes` reads them from an evaluation folder.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hippocrates.data.io import iter_jsonl, read_json_object
from hippocrates.errors import HippoError

# metric name -> the samples_<task>.jsonl field that says whether the item was answered right
METRICS = {"acc": "correct", "acc_norm": "correct_norm"}
DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0
CONFIDENCE = 0.95

Outcomes = Mapping[str, Mapping[str, bool]]  # task -> item id -> correct


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise HippoError(f"unknown metric '{metric}' (choose from {', '.join(METRICS)})")
    return metric


def _outcomes(numbered: Iterable[tuple[str, Mapping[str, Any]]], metric: str) -> dict[str, bool]:
    field = METRICS[check_metric(metric)]
    out: dict[str, bool] = {}
    seen: dict[str, str] = {}
    for where, row in numbered:
        item, value = row.get("id"), row.get(field)
        if item is None or isinstance(item, bool | dict | list):
            raise HippoError(f"{where}: missing or invalid item 'id'")
        if not isinstance(value, bool):
            raise HippoError(f"{where}: '{field}' must be true or false, got {value!r}")
        key = str(item)
        if key in out:
            raise HippoError(f"{where}: item id '{key}' appears twice (first at {seen[key]})")
        out[key], seen[key] = value, where
    return out


def outcomes_from_rows(rows: Iterable[Mapping[str, Any]], metric: str = "acc") -> dict[str, bool]:
    """``{id: correct}`` of one task from samples rows in memory (the samples_<task>.jsonl rows)."""
    return _outcomes(((f"row {i}", row) for i, row in enumerate(rows)), metric)


def load_outcomes(
    folder: str | Path, metric: str = "acc", tasks: Sequence[str] | None = None
) -> dict[str, dict[str, bool]]:
    """``{task: {id: correct}}`` of an evaluation folder (results.json + samples_<task>.jsonl).

    ``tasks``: the tasks to read (default: every task in results.json, in its order).
    """
    check_metric(metric)
    folder = Path(folder)
    if not folder.is_dir():
        raise HippoError(f"{folder}: evaluation folder not found")
    if not (folder / "results.json").is_file():
        raise HippoError(f"{folder}: no results.json (not an evaluation output, or an unfinished one)")
    found = read_json_object(folder / "results.json").get("tasks")
    if not isinstance(found, dict):
        raise HippoError(f"{folder / 'results.json'}: no 'tasks' object")
    wanted = list(found) if tasks is None else list(tasks)
    absent = [t for t in wanted if t not in found]
    if absent:
        raise HippoError(
            f"{folder / 'results.json'}: no task {', '.join(absent)} (has: {', '.join(found) or 'none'})"
        )
    out = {}
    for task in wanted:
        path = folder / f"samples_{task}.jsonl"
        out[task] = _outcomes(((f"{path}:{n}", row) for n, row in iter_jsonl(path)), metric)
    return out


def _only_in(ids: list[str], name: str) -> str:
    """``3 only in NAME (a, b, c)``: the count and the first few ids."""
    return f"{len(ids)} only in {name} ({', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})"


def pair(
    a: Outcomes, b: Outcomes, names: tuple[str, str] = ("A", "B")
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task, A's and B's outcomes on the same items in the same order (matched by id).

    A task or item present on one side only is an error naming it: a paired comparison on
    different items would compare the items, not the models.
    """
    only_a, only_b = [t for t in a if t not in b], [t for t in b if t not in a]
    if only_a or only_b:
        sides = [f"{', '.join(ts)} only in {n}" for ts, n in ((only_a, names[0]), (only_b, names[1])) if ts]
        raise HippoError(f"the task sets differ: {'; '.join(sides)}")
    pairs = {}
    for task, items in a.items():
        other = b[task]
        missing_b, missing_a = [i for i in items if i not in other], [i for i in other if i not in items]
        if missing_a or missing_b:
            sides = [_only_in(ids, n) for ids, n in ((missing_b, names[0]), (missing_a, names[1])) if ids]
            raise HippoError(f"task {task}: the item sets differ, item ids {'; '.join(sides)}")
        if not items:
            raise HippoError(f"task {task}: no items to compare")
        keys = list(items)
        pairs[task] = (
            np.array([items[k] for k in keys], dtype=bool),
            np.array([other[k] for k in keys], dtype=bool),
        )
    return pairs


def bootstrap_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``resamples`` bootstrap resamples of ``values`` (n items drawn with replacement).

    A resample's mean depends only on how many times each distinct value was drawn, and those
    counts are multinomial(n, share of each value): drawing the counts is the same resampling
    without the resamples x n index array (per-item differences take 3 values, -1, 0 and 1).
    """
    levels, counts = np.unique(values, return_counts=True)
    draws = rng.multinomial(len(values), counts / len(values), size=resamples)
    return draws @ levels / len(values)


def paired_ratio_interval(
    num_a: Sequence[float],
    den_a: Sequence[float],
    num_b: Sequence[float],
    den_b: Sequence[float],
    *,
    resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum(num_b)/sum(den_b) - sum(num_a)/sum(den_a)`` over paired
    units (held-out blocks before and after a stage: summed NLL and token counts), units resampled."""
    a_num, a_den, b_num, b_den = (np.asarray(x, dtype=np.float64) for x in (num_a, den_a, num_b, den_b))
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(a_num), np.full(len(a_num), 1 / len(a_num)), size=resamples)
    diff = (draws @ b_num) / (draws @ b_den) - (draws @ a_num) / (draws @ a_den)
    tail = (1 - confidence) / 2
    return float(np.quantile(diff, tail)), float(np.quantile(diff, 1 - tail))


def task_rng(seed: int, task: str) -> np.random.Generator:
    """One generator per (seed, task): a task's interval is the same whichever tasks come with it."""
    return np.random.default_rng([seed, zlib.crc32(task.encode())])


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact McNemar test: two-sided binomial test of the discordant pairs against 1/2 (1 if none)."""
    from scipy.stats import binomtest

    n = only_a + only_b
    return 1.0 if n == 0 else float(binomtest(only_b, n, 0.5).pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (controls the family-wise error rate), in the input order."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p, kind="stable")
    scaled = (len(p) - np.arange(len(p))) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return [float(x) for x in adjusted]


def _row(
    a: np.ndarray, b: np.ndarray, resampled: np.ndarray, only_a: int, only_b: int, confidence: float
) -> dict[str, Any]:
    tail = (1 - confidence) / 2
    low, high = (float(x) for x in np.quantile(resampled, [tail, 1 - tail]))
    acc_a, acc_b = float(np.mean(a)), float(np.mean(b))
    return {
        "n": int(len(a)),
        "accuracy_a": acc_a,
        "accuracy_b": acc_b,
        "difference": acc_b - acc_a,
        "ci_low": low,
        "ci_high": high,
        "ci_excludes_zero": low > 0 or high < 0,
        "only_a_correct": only_a,
        "only_b_correct": only_b,
        "p_mcnemar": mcnemar_p(only_a, only_b),
    }


def compare(
    a: Outcomes,
    b: Outcomes,
    *,
    names: tuple[str, str] = ("A", "B"),
    metric: str = "acc",
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """B against A, per task and on the average over tasks (JSON-ready; ``metric`` is recorded)."""
    if resamples < 1:
        raise HippoError(f"resamples must be >= 1, got {resamples}")
    if seed < 0:
        raise HippoError(f"seed must be >= 0, got {seed}")
    pairs = pair(a, b, names)
    rows, resampled = {}, []
    for task, (ya, yb) in pairs.items():
        diffs = yb.astype(float) - ya.astype(float)
        resampled.append(bootstrap_means(diffs, resamples, task_rng(seed, task)))
        rows[task] = _row(ya, yb, resampled[-1], int(np.sum(ya & ~yb)), int(np.sum(yb & ~ya)), confidence)
    per_task = list(rows.values())
    macro_a = np.array([r["accuracy_a"] for r in per_task])  # one value per task: their mean is the average
    macro_b = np.array([r["accuracy_b"] for r in per_task])
    only_a, only_b = sum(r["only_a_correct"] for r in per_task), sum(r["only_b_correct"] for r in per_task)
    average = _row(macro_a, macro_b, np.mean(resampled, axis=0), only_a, only_b, confidence)
    average["n"] = sum(r["n"] for r in per_task)
    return {
        "a": names[0], "b": names[1], "metric": metric, "resamples": resamples, "seed": seed,
        "confidence": confidence, "tasks": rows, "average": average,
    }  # fmt: skip


def compare_to_baseline(
    baseline: Outcomes, others: Mapping[str, Outcomes], *, baseline_name: str = "baseline", **options: Any
) -> dict[str, dict[str, Any]]:
    """Each of ``others`` against ``baseline`` (see :func:`compare`), with Holm-adjusted p-values.

    The Holm family of a row (a task, or the average) is that row across the comparisons.
    """
    found = {
        name: compare(baseline, out, names=(baseline_name, name), **options) for name, out in others.items()
    }
    if not found:
        return found
    alpha = 1 - next(iter(found.values()))["confidence"]
    keys = [*next(iter(found.values()))["tasks"], None]  # None: the average
    for key in keys:
        family = [c["average"] if key is None else c["tasks"][key] for c in found.values()]
        for row, adjusted in zip(family, holm([r["p_mcnemar"] for r in family]), strict=True):
            row["p_holm"], row["significant_holm"] = adjusted, adjusted < alpha
    return found


def compare_folders(
    a: str | Path,
    b: str | Path,
    *,
    metric: str = "acc",
    tasks: Sequence[str] | None = None,
    names: tuple[str, str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Two evaluation folders (results.json + samples_<task>.jsonl) compared on ``metric``.

    ``tasks``: default every task of ``a`` (``b`` must have the same ones). A task whose data file
    differs between the two (``data_sha256`` in results.json) is compared by item id with a warning.
    """
    from hippocrates.progress import status

    found_a = load_outcomes(a, metric, tasks)
    found_b = load_outcomes(b, metric, tasks)
    names = names or (str(a), str(b))
    result = compare(found_a, found_b, names=names, metric=metric, **options)
    data = [read_json_object(Path(f) / "results.json")["tasks"] for f in (a, b)]
    for task in found_a:
        shas = [(d.get(task) or {}).get("data_sha256") for d in data]
        if None not in shas and shas[0] != shas[1]:
            status(
                f"warning: task {task}: the two evaluations read different data files; items matched by id"
            )
    return result


def describe(comparison: Mapping[str, Any], family: int = 1) -> str:
    """One paragraph saying what the comparison's numbers are (for tables and the report)."""
    level = f"{100 * comparison['confidence']:g}%"
    b = comparison["b"] if family == 1 else "each row"
    text = (
        f"Δ = {b} − {comparison['a']}, {comparison['metric']} in points, on the same items (matched by id). "
        f"{level} CI: paired bootstrap over items, {comparison['resamples']:,} resamples, seed "
        f"{comparison['seed']}; the average resamples items within each task. CI excludes 0: the whole "
        "interval is on one side of zero; when it is not, the difference may be noise from which items the "
        "test set holds. p: exact McNemar test on the items only one model got right (pooled over tasks "
        "for the average)."
    )
    if family > 1:
        text += (
            f" Holm p: p adjusted across the table's {family} comparisons against {comparison['a']}; "
            f"Holm p < {1 - comparison['confidence']:.2g} is the verdict that holds for all of them together."
        )
    return text
