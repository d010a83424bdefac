"""The prompting-strategy sweep: one evaluation per (prompt, chat template, shots) combination.

The paper compares prompt formats and few-shot counts; this runs every combination with the same
model and tasks and writes ``sweep.{json,md,csv}`` for the report's "Prompting strategies"
section (it reads ``RUN_DIR/sweep/sweep.json``). The model is loaded once for all combinations,
and a combination whose folder is current for its inputs (hippocrates.record) is not evaluated
again. The table is rewritten after each combination, so a crash keeps the finished rows.
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
from hippocrates.report.tables import sweep_table, task_average


def combination_dir(output_dir: Path, prompt: str, chat_template: bool, shots: int) -> Path:
    """Where one combination's results.json and samples go: ``<prompt>-<chat|plain>/<K>shot``."""
    return Path(output_dir) / f"{prompt}-{'chat' if chat_template else 'plain'}" / f"{shots}shot"


def write_sweep(output_dir: Path, data: dict[str, Any]) -> None:
    """sweep.json (everything), .md and .csv (the table), each written atomically."""
    table = sweep_table(data)
    write_json(Path(output_dir) / "sweep.json", data)
    write_text(Path(output_dir) / "sweep.md", table.markdown())
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
    **eval_kwargs: Any,
) -> dict[str, Any]:
    """Evaluate ``model`` for every prompt x chat option x shot count; write and return the sweep.

    ``eval_kwargs`` (data_dir, fewshot_data, seed, protocol, ...) pass through to every evaluation.
    """
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
    specs = resolve_tasks(list(tasks), eval_kwargs.get("task_dirs", ()))
    lm: LoadedModel | None = model if isinstance(model, LoadedModel) else None
    spec = lm.spec if lm else str(model)
    path = lm.path if lm else resolve_model(str(model)).path
    out: dict[str, Any] = {"model": spec, "tasks": list(tasks), "rows": [], "evaluated": 0}
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
