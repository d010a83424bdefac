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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hippocrates import __version__
from hippocrates.data.io import check_writable, write_json, write_jsonl
from hippocrates.errors import HippoError
from hippocrates.eval.loaders import TaskData, load_task
from hippocrates.eval.metrics import sample_row, task_metrics
from hippocrates.eval.prompts import DEFAULT_SEED, PROTOCOLS, STRATEGIES, build_prompts
from hippocrates.eval.registry import resolve_tasks
from hippocrates.eval.scorer import SCORERS, encoder_for, model_max_length, score
from hippocrates.progress import status
from hippocrates.record import Step

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


@dataclass
class LoadedModel:
    """A model and tokenizer in memory, so the sweep and the ablation load each model once."""

    spec: str
    path: str
    model: Any
    tokenizer: Any
    precision: str

    @classmethod
    def load(cls, spec: Any, precision: str = "fp32", trust_remote_code: bool = False) -> LoadedModel:
        from hippocrates.models import ResolvedModel, load_model, load_tokenizer, resolve_model

        resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(str(spec))
        status(f"loading {resolved.spec} ({precision})")
        tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
        lm = load_model(
            resolved, precision=precision, trust_remote_code=trust_remote_code, device=_device()
        ).eval()
        return cls(resolved.spec, resolved.path, lm, tokenizer, precision)


def eval_step(
    model: str,
    specs: list[Any],
    *,
    data: dict[str, str] | None,
    data_dir: str | None,
    fewshot_data: dict[str, str] | None,
    num_fewshot: int,
    prompt: str,
    chat_template: bool,
    limit: int | None,
    protocol: str,
    scorer: str,
    seed: int,
    max_length: int | None,
    precision: str,
) -> Step:
    """An evaluation's inputs (hippocrates.record): protocol, model, and every file each task reads."""
    from hippocrates.eval.loaders import task_files

    files = [
        task_files(spec, (data or {}).get(spec.task), data_dir, (fewshot_data or {}).get(spec.task))
        for spec in specs
    ]
    config = {
        "tasks": [s.task for s in specs],
        "task_specs": [s.model_dump(mode="json") for s in specs],
        "num_fewshot": num_fewshot,
        "prompt": prompt,
        "chat_template": chat_template,
        "limit": limit,
        "protocol": protocol,
        "scorer": scorer,
        "fewshot_seed": seed,
        "max_length": max_length,
    }
    return Step("eval", config, model=str(model), data=files, precision=precision)


def recipe_eval_options(
    recipe: Any, shots: int, limit: int | None, model: str | None = None
) -> dict[str, Any]:
    """The evaluate() protocol of the recipe's eval section at ``shots`` (shared by the pipeline, the
    ablation and the sweep). ``eval.precision: auto`` runs ``model`` in fp32 when its 16-bit weights
    would not show what its last stage trained (see hippocrates.models.precision_for)."""
    from hippocrates.models import precision_for, resolve_precision

    ev = recipe.eval
    wanted = recipe.precision if ev.precision == "auto" else ev.precision
    precision, why = (
        precision_for(model, wanted)
        if model and ev.precision == "auto"
        else (resolve_precision(wanted), None)
    )
    if why:
        status(f"eval: {why}")
    return {
        "data": dict(ev.data) or None,
        "num_fewshot": shots,
        "prompt": ev.prompt,
        "chat_template": ev.chat_template,
        "limit": limit,
        "protocol": ev.protocol,
        "batch_size": ev.batch_size,
        "precision": precision,
    }


def recipe_eval_step(recipe: Any, model: str, options: dict[str, Any]):
    """The inputs of evaluating ``model`` with ``options`` (what decides whether results are reusable)."""
    from hippocrates.eval.registry import resolve_tasks
    from hippocrates.models import resolve_model

    return eval_step(
        resolve_model(model).path, resolve_tasks(recipe.eval.tasks), data=options["data"], data_dir=None,
        fewshot_data=None, num_fewshot=options["num_fewshot"], prompt=options["prompt"],
        chat_template=options["chat_template"], limit=options["limit"], protocol=options["protocol"],
        scorer="fast", seed=1234, max_length=None, precision=options["precision"],
    )  # fmt: skip


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
    protocol: str = "v0.4",
    recipe: Any = None,
) -> dict[str, Any]:
    """Evaluate a model (a spec, or a :class:`LoadedModel`) on tasks; returns (and writes, with
    ``output_dir``) the results.json content, with a manifest.json of its inputs beside it."""
    from hippocrates.record import now, write_manifest

    t0, started = time.time(), now()
    _check_args(num_fewshot, prompt, limit, batch_size, scorer, precision)
    if protocol not in PROTOCOLS:
        raise HippoError(f"unknown protocol '{protocol}' (choose from {', '.join(PROTOCOLS)})")
    if chat_template and protocol == "v0.3":
        raise HippoError("protocol v0.3 (the paper's harness) has no chat templates; drop --chat-template")
    loaded = load_tasks(
        tasks,
        data=data,
        data_dir=data_dir,
        fewshot_data=fewshot_data,
        task_dirs=task_dirs,
        num_fewshot=num_fewshot,
    )
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        check_writable(out)  # before the scoring, not after it
    lm = model if isinstance(model, LoadedModel) else LoadedModel.load(model, precision, trust_remote_code)
    precision = lm.precision
    step = eval_step(
        lm.path, [t.spec for t in loaded], data=data, data_dir=data_dir, fewshot_data=fewshot_data,
        num_fewshot=num_fewshot, prompt=prompt, chat_template=chat_template, limit=limit, protocol=protocol,
        scorer=scorer, seed=seed, max_length=max_length, precision=precision,
    )  # fmt: skip
    tokenizer = lm.tokenizer
    window = max_length or model_max_length(lm.model, tokenizer, protocol=protocol)
    encoder = encoder_for(protocol, tokenizer)
    results: dict[str, Any] = {
        "model": lm.spec,
        "model_path": lm.path,
        "prompt": prompt,
        "chat_template": chat_template,
        "num_fewshot": num_fewshot,
        "protocol": protocol,
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
        started_task = time.perf_counter()
        name = task.spec.task
        prompts = build_prompts(
            task,
            limit=limit,
            num_fewshot=num_fewshot,
            strategy=prompt,
            chat_template=chat_template,
            tokenizer=tokenizer,
            seed=seed,
            protocol=protocol,
        )
        status(
            f"{name}: {len(prompts)} items, {num_fewshot}-shot, prompt {prompt}, protocol {protocol}, data {task.source}"
        )
        if num_fewshot and task.pool_is_eval:
            status(f"{name}: few-shot exemplars come from {task.pool_source}")
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
        scored = score(lm.model, encoded, scorer=scorer, max_length=window, batch_size=batch_size)
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
            "duplicates": len(task.duplicates),
            "duplicate_ids": [i for i, _ in task.duplicates],
            "truncated": len(truncated),
            "truncated_ids": truncated,
            "data": task.source,
            "data_sha256": task.sha256,
            "fewshot_pool": task.pool_source if num_fewshot else None,
            "fewshot_pool_is_eval_set": bool(num_fewshot and task.pool_is_eval),
            "fewshot_pool_overlap_removed": task.pool_overlap,
            "time_s": round(time.perf_counter() - started_task, 3),
            "prompt": prompt,
            "shots": num_fewshot,
        }
        samples[name] = rows
    if out is not None:
        for stale in ("manifest.json", "results.json"):  # the completion markers go first, come back last
            (out / stale).unlink(missing_ok=True)
        for name, rows in samples.items():
            write_jsonl(out / f"samples_{name}.jsonl", rows)
        write_json(out / "results.json", results)
        outputs = ["results.json", *(f"samples_{n}.jsonl" for n in samples)]
        write_manifest(out, step.manifest(outputs=outputs, started=started, t0=t0, recipe=recipe))
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
