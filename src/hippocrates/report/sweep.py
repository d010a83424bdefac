"""The prompting-strategy sweep: one evaluation per (prompt, chat template, shots) combination.

The paper compares prompt formats and few-shot counts; this runs every combination with
the same model and tasks and writes ``sweep.{json,md,csv}`` for the report's "Prompting
strategies" section (it reads ``RUN_DIR/sweep/sweep.json``). ``hippo eval --sweep`` calls
:func:`run_sweep`. The table is rewritten after each combination, so a crash keeps the
finished rows.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hippocrates.data.io import atomic_file, write_json
from hippocrates.errors import HippoError
from hippocrates.progress import status
from hippocrates.report.tables import sweep_table, task_average


def _evaluate(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return importlib.import_module("hippocrates.eval.runner").evaluate(*args, **kwargs)


def combination_dir(output_dir: Path, prompt: str, chat_template: bool, shots: int) -> Path:
    """Where one combination's results.json and samples go: ``<prompt>-<chat|plain>/<K>shot``."""
    return Path(output_dir) / f"{prompt}-{'chat' if chat_template else 'plain'}" / f"{shots}shot"


def write_sweep(output_dir: Path, data: dict[str, Any]) -> None:
    """sweep.json (everything), .md and .csv (the table), each written atomically."""
    table = sweep_table(data)
    write_json(Path(output_dir) / "sweep.json", data)
    for name, text in (("sweep.md", table.markdown()), ("sweep.csv", table.csv())):
        with atomic_file(Path(output_dir) / name) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")


def run_sweep(
    model: str,
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
    evaluate: Callable[..., dict[str, Any]] | None = None,
    **eval_kwargs: Any,
) -> dict[str, Any]:
    """Evaluate ``model`` for every prompt x chat option x shot count; write and return the sweep.

    ``eval_kwargs`` (data_dir, fewshot_data, seed, ...) pass through to every evaluation.
    """
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
    evaluate = evaluate or _evaluate
    out: dict[str, Any] = {"model": model, "tasks": list(tasks), "rows": []}
    for prompt in prompts:
        for chat in chat_options:
            for k in shots:
                where = combination_dir(output_dir, prompt, chat, k)
                status(f"sweep: prompt {prompt}, chat template {'on' if chat else 'off'}, {k}-shot")
                res = evaluate(
                    model, list(tasks), data=data, num_fewshot=k, prompt=prompt, chat_template=chat,
                    limit=limit, batch_size=batch_size, output_dir=where, precision=precision,
                    **eval_kwargs,
                )  # fmt: skip
                per = res.get("tasks") or {}
                acc = {t: (per.get(t) or {}).get("acc") for t in tasks}
                out["rows"].append({
                    "prompt": prompt, "chat_template": bool(chat), "num_fewshot": k,
                    "results": str(where / "results.json"), "acc": acc,
                    "acc_norm": {t: (per.get(t) or {}).get("acc_norm") for t in tasks},
                    "ece": {t: (per.get(t) or {}).get("ece") for t in tasks},
                    "n": {t: (per.get(t) or {}).get("n") for t in tasks},
                    "average": task_average(list(acc.values())),
                })  # fmt: skip
                out["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
                write_sweep(output_dir, out)
    return out
