"""The prompting-strategy sweep: one evaluation per (prompt, chat template, shots) combination.

The paper compares prompt formats and few-shot counts; this runs every combination with the same
model and tasks and writes ``sweep.{json,md,csv}`` for the report's "Prompting strategies"
section (it reads ``RUN_DIR/sweep/sweep.json``). The model is loaded once for all combinations,
and a combination whose folder is current for its inputs (hippocrates.record) is not evaluated
again. Each combination is compared with a baseline combination (the first, unless named) on the
same items (hippocrates.analyses.stats: bootstrap CI, McNemar p, Holm across the combinations).
The table is rewritten after each combination, so a crash keeps the finished rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hippocrates.data.io import read_json_object, write_json, write_text
from hippocrates.errors import HippoError
from hippocrates.progress import status
from hippocrates.record import current
from hippocrates.report.tables import sweep_comparisons, sweep_table, task_average, with_comparisons


def combination_dir(output_dir: Path, prompt: str, chat_template: bool, shots: int) -> Path:
    """Where one combination's results.json and samples go: ``<prompt>-<chat|plain>/<K>shot``."""
    return Path(output_dir) / f"{prompt}-{'chat' if chat_template else 'plain'}" / f"{shots}shot"


def combination_name(prompt: str, chat_template: bool, shots: int) -> str:
    """A combination's name, as ``--baseline`` takes it: ``<prompt>-<chat|plain>-<K>shot``."""
    return f"{prompt}-{'chat' if chat_template else 'plain'}-{shots}shot"


def compare_rows(data: dict[str, Any], outcomes: dict[str, dict[str, dict[str, bool]]]) -> None:
    """Each finished combination against the baseline on the same items, Holm across them; stored in
    the rows (``comparison``), or ``comparison_error`` when they cannot be paired."""
    from hippocrates.analyses.stats import compare_to_baseline

    baseline = data["baseline"]
    if baseline not in outcomes:
        return
    try:
        others = {name: found for name, found in outcomes.items() if name != baseline}
        found = compare_to_baseline(outcomes[baseline], others, baseline_name=baseline)
    except HippoError as exc:
        data["comparison_error"] = str(exc)
        status(f"sweep: no paired comparisons: {exc}")
        found = {}
    else:
        data.pop("comparison_error", None)
    for row in data["rows"]:
        row["comparison"] = found.get(row["name"])


def write_sweep(output_dir: Path, data: dict[str, Any]) -> None:
    """sweep.json (everything), .md (the table and the per-task comparisons) and .csv (the table),
    each written atomically."""
    table = sweep_table(data)
    write_json(Path(output_dir) / "sweep.json", data)
    write_text(Path(output_dir) / "sweep.md", with_comparisons(table, sweep_comparisons(data)))
    write_text(Path(output_dir) / "sweep.csv", table.csv())


def run_sweep(
    model: Any,
    tasks: Sequence[str],
    data: dict[str, str] | None,
    prompts: Sequence[str],
    chat_options: Sequence[bool],
    shots: Sequence[int],
    output_dir: Path,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    precision: str = "fp32",
    trust_remote_code: bool = False,
    force: bool = False,
    baseline: str | None = None,
    **eval_kwargs: Any,
) -> dict[str, Any]:
    """Evaluate ``model`` for every prompt x chat option x shot count; write and return the sweep.

    ``baseline``: the combination the others are compared with (:func:`combination_name`; default
    the first). ``eval_kwargs`` (data_dir, fewshot_data, seed, protocol, ...) pass through to every
    evaluation.
    """
    from hippocrates.analyses.stats import load_outcomes
    from hippocrates.eval.registry import resolve_tasks
    from hippocrates.eval.runner import LoadedModel, eval_step, evaluate
    from hippocrates.models import resolve_model

    for name, values in (
        ("tasks", tasks),
        ("prompts", prompts),
        ("chat options", chat_options),
        ("shots", shots),
    ):
        if not values:
            raise HippoError(f"sweep: no {name} given")
    if any(k < 0 for k in shots):
        raise HippoError(f"sweep: shots must be >= 0, got {list(shots)}")
    names = [combination_name(p, c, k) for p in prompts for c in chat_options for k in shots]
    if baseline is not None and baseline not in names:
        raise HippoError(
            f"sweep: baseline '{baseline}' is not a combination (choose from {', '.join(names)})"
        )
    specs = resolve_tasks(list(tasks), eval_kwargs.get("task_dirs", ()))
    lm: LoadedModel | None = model if isinstance(model, LoadedModel) else None
    spec = lm.spec if lm else str(model)
    path = lm.path if lm else resolve_model(str(model)).path
    out: dict[str, Any] = {
        "model": spec, "tasks": list(tasks), "baseline": baseline or names[0], "rows": [], "evaluated": 0,
    }  # fmt: skip
    outcomes: dict[str, dict[str, dict[str, bool]]] = {}
    for prompt in prompts:
        for chat in chat_options:
            for k in shots:
                where = combination_dir(output_dir, prompt, chat, k)
                options = dict(
                    data=data, num_fewshot=k, prompt=prompt, chat_template=chat, limit=limit,
                    batch_size=batch_size, precision=precision, **eval_kwargs,
                )  # fmt: skip
                step = eval_step(
                    path, specs, data=data, data_dir=eval_kwargs.get("data_dir"),
                    fewshot_data=eval_kwargs.get("fewshot_data"), num_fewshot=k, prompt=prompt, chat_template=chat,
                    limit=limit, protocol=eval_kwargs.get("protocol", "v0.4"), scorer=eval_kwargs.get("scorer", "fast"),
                    seed=eval_kwargs.get("seed", 1234), max_length=eval_kwargs.get("max_length"), precision=lm.precision if lm else precision,
                )  # fmt: skip
                label = f"prompt {prompt}, chat template {'on' if chat else 'off'}, {k}-shot"
                if not force and current(where, step):
                    status(f"sweep: {label}: unchanged, reusing {where}")
                    res = read_json_object(where / "results.json")
                else:
                    status(f"sweep: {label}")
                    lm = lm or LoadedModel.load(model, precision, trust_remote_code)
                    res = evaluate(lm, list(tasks), output_dir=where, **options)
                    out["evaluated"] += 1
                per = res.get("tasks") or {}
                acc = {t: (per.get(t) or {}).get("acc") for t in tasks}
                name = combination_name(prompt, chat, k)
                outcomes[name] = load_outcomes(where)
                out["rows"].append({
                    "name": name, "prompt": prompt, "chat_template": bool(chat), "num_fewshot": k,
                    "results": str(where / "results.json"), "acc": acc,
                    "acc_norm": {t: (per.get(t) or {}).get("acc_norm") for t in tasks},
                    "ece": {t: (per.get(t) or {}).get("ece") for t in tasks},
                    "n": {t: (per.get(t) or {}).get("n") for t in tasks},
                    "average": task_average(list(acc.values())),
                })  # fmt: skip
                compare_rows(out, outcomes)
                out["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
                write_sweep(output_dir, out)
    return out
