"""``evaluate``: load tasks, build prompts, score every option, write results.json + samples.

Everything the user can get wrong (unknown task, missing file, k larger than the few-shot pool)
is checked before the model is loaded, so a bad command fails in a second with one line.
Outputs are written atomically, samples first and results.json last, so a results.json on disk
always belongs to a finished run.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hippocrates import __version__
from hippocrates.data.io import write_json, write_jsonl
from hippocrates.errors import HippoError
from hippocrates.eval.loaders import TaskData, load_task
from hippocrates.eval.metrics import sample_row, task_metrics
from hippocrates.eval.prompts import DEFAULT_SEED, STRATEGIES, build_prompts
from hippocrates.eval.registry import resolve_tasks
from hippocrates.eval.scorer import SCORERS, LmEvalTokenizer, model_max_length, score
from hippocrates.progress import status

PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def _device() -> str:
    """The first GPU when there is one (scoring is all forward passes), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _task_names(tasks: str | Iterable[str]) -> list[str]:
    if isinstance(tasks, str):
        return [t for t in tasks.split(",") if t.strip()]
    return [t for t in tasks if t.strip()]


def _check_args(
    num_fewshot: int, prompt: str, limit: int | None, batch_size: int, scorer: str, precision: str
) -> None:
    if num_fewshot < 0:
        raise HippoError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if prompt not in STRATEGIES:
        raise HippoError(f"unknown prompt strategy '{prompt}' (choose from {', '.join(STRATEGIES)})")
    if limit is not None and limit <= 0:
        raise HippoError(f"--limit must be > 0, got {limit}")
    if batch_size <= 0:
        raise HippoError(f"--batch-size must be > 0, got {batch_size}")
    if scorer not in SCORERS:
        raise HippoError(f"unknown scorer '{scorer}' (choose from {', '.join(SCORERS)})")
    if precision not in PRECISIONS:
        raise HippoError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")


def load_tasks(
    tasks: str | Iterable[str],
    *,
    data: dict[str, str] | None = None,
    data_dir: str | None = None,
    fewshot_data: dict[str, str] | None = None,
    task_dirs: Iterable[str] = (),
    num_fewshot: int = 0,
) -> list[TaskData]:
    """Resolve and load every task (items + few-shot pool); checks k against each pool."""
    specs = resolve_tasks(_task_names(tasks), task_dirs)
    names = {s.task for s in specs}
    for option, mapping in (("--data", data or {}), ("--fewshot-data", fewshot_data or {})):
        for key in mapping:
            if key not in names:
                raise HippoError(f"{option} names task '{key}', which is not in --tasks ({', '.join(names)})")
    loaded = []
    for spec in specs:
        task = load_task(spec, (data or {}).get(spec.task), data_dir, (fewshot_data or {}).get(spec.task))
        room = len(task.pool) - (1 if task.pool_is_eval else 0)
        if num_fewshot > room:
            raise HippoError(
                f"task {spec.task}: --num-fewshot {num_fewshot} is larger than its few-shot pool "
                f"({room} exemplars in {task.pool_source})"
            )
        loaded.append(task)
    return loaded


def evaluate(
    model: Any,
    tasks: str | Iterable[str],
    *,
    data: dict[str, str] | None = None,
    num_fewshot: int = 0,
    prompt: str = "hippocrates",
    chat_template: bool = False,
    limit: int | None = None,
    batch_size: int = 8,
    output_dir: str | Path | None = None,
    precision: str = "fp32",
    scorer: str = "fast",
    data_dir: str | None = None,
    fewshot_data: dict[str, str] | None = None,
    task_dirs: Iterable[str] = (),
    seed: int = DEFAULT_SEED,
    max_length: int | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Evaluate a model spec on tasks; returns (and writes, with ``output_dir``) the results.json content."""
    from hippocrates.models import ResolvedModel, load_model, load_tokenizer, resolve_model

    _check_args(num_fewshot, prompt, limit, batch_size, scorer, precision)
    loaded = load_tasks(
        tasks,
        data=data,
        data_dir=data_dir,
        fewshot_data=fewshot_data,
        task_dirs=task_dirs,
        num_fewshot=num_fewshot,
    )
    resolved = model if isinstance(model, ResolvedModel) else resolve_model(str(model))
    status(f"loading {resolved.spec} ({precision})")
    tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
    lm = load_model(
        resolved, precision=precision, trust_remote_code=trust_remote_code, device=_device()
    ).eval()
    window = max_length or model_max_length(lm, tokenizer)
    encoder = LmEvalTokenizer(tokenizer)
    results: dict[str, Any] = {
        "model": resolved.spec,
        "model_path": resolved.path,
        "prompt": prompt,
        "chat_template": chat_template,
        "num_fewshot": num_fewshot,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hippocrates_version": __version__,
        "precision": precision,
        "scorer": scorer,
        "batch_size": batch_size,
        "limit": limit,
        "seed": seed,
        "max_length": window,
        "tasks": {},
    }
    samples: dict[str, list[dict[str, Any]]] = {}
    for task in loaded:
        started = time.perf_counter()
        name = task.spec.task
        items = task.items[:limit] if limit else task.items
        status(f"{name}: {len(items)} items, {num_fewshot}-shot, prompt {prompt}, data {task.source}")
        prompts = build_prompts(
            task,
            items,
            num_fewshot=num_fewshot,
            strategy=prompt,
            chat_template=chat_template,
            tokenizer=tokenizer,
            seed=seed,
        )
        skipped = list(task.skipped)
        kept, encoded = [], []
        for p in prompts:
            enc = encoder.encode_prompt(p.context, p.continuations)
            empty = [i for i, c in enumerate(enc.continuations) if not c]
            if empty:
                skipped.append(
                    (p.item.id, f"{p.item.where}: option {empty[0] + 1} has no tokens after the prompt")
                )
                continue
            kept.append(p)
            encoded.append(enc)
        scored = score(lm, encoded, scorer=scorer, max_length=window, batch_size=batch_size)
        rows = [
            sample_row(
                doc_id, p.item.id, p.context, p.continuations, p.choices, s.loglikelihoods, p.item.gold
            )
            for doc_id, (p, s) in enumerate(zip(kept, scored, strict=True))
        ]
        truncated = [p.item.id for p, s in zip(kept, scored, strict=True) if s.truncated]
        if truncated:
            status(
                f"warning: {name}: {len(truncated)} prompt(s) longer than the model's {window}-token window "
                f"were left-truncated (ids: {', '.join(truncated[:5])}{' ...' if len(truncated) > 5 else ''})"
            )
        results["tasks"][name] = {
            **task_metrics(rows),
            "skipped": len(skipped),
            "skipped_ids": [i for i, _ in skipped],
            "skipped_reasons": dict(skipped),
            "truncated": len(truncated),
            "truncated_ids": truncated,
            "data": task.source,
            "data_sha256": task.sha256,
            "fewshot_pool": task.pool_source if num_fewshot else None,
            "time_s": round(time.perf_counter() - started, 3),
            "prompt": prompt,
            "shots": num_fewshot,
        }
        samples[name] = rows
    if output_dir is not None:
        out = Path(output_dir)
        for name, rows in samples.items():
            write_jsonl(out / f"samples_{name}.jsonl", rows)
        write_json(out / "results.json", results)
    return results


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of the task metrics, for the terminal."""

    def pct(value: float | None, err: float | None = None) -> str:
        if value is None:
            return "-"
        return f"{100 * value:5.1f}" + (f" ± {100 * err:4.1f}" if err is not None else "")

    header = f"{'task':<16} {'n':>5} {'acc':>12} {'acc_norm':>12} {'ece':>6} {'brier':>6} {'skip':>5} {'trunc':>5} {'time_s':>7}"
    lines = [
        f"model {results['model']}, prompt {results['prompt']}, {results['num_fewshot']}-shot"
        + (", chat template" if results["chat_template"] else ""),
        header,
        "-" * len(header),
    ]
    for name, m in results["tasks"].items():
        lines.append(
            f"{name:<16} {m['n']:>5} {pct(m['acc'], m['acc_stderr']):>12} "
            f"{pct(m['acc_norm'], m['acc_norm_stderr']):>12} "
            f"{m['ece'] if m['ece'] is None else round(m['ece'], 3):>6} "
            f"{m['brier'] if m['brier'] is None else round(m['brier'], 3):>6} "
            f"{m['skipped']:>5} {m['truncated']:>5} {m['time_s']:>7.1f}"
        )
    return "\n".join(lines)
