"""``evaluate``: load tasks, build prompts, score every option (``mode="loglik"``) or let the
model answer (``mode="generate"``, :mod:`hippocrates.eval.generate`), write results.json + samples.

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
from hippocrates.eval.generate import DEFAULT_MAX_NEW_TOKENS, MODES, GenerationSettings
from hippocrates.eval.loaders import TaskData, load_task
from hippocrates.eval.metrics import sample_row, task_metrics
from hippocrates.eval.prompts import DEFAULT_SEED, PROTOCOLS, STRATEGIES, build_prompts, select
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
    num_fewshot: int, prompt: str, limit: int | None, batch_size: int, scorer: str, precision: str, mode: str
) -> None:
    if mode not in MODES:
        raise HippoError(f"unknown mode '{mode}' (choose from {', '.join(MODES)})")
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
    def load(
        cls, spec: Any, precision: str = "fp32", trust_remote_code: bool = False, weights: bool = True
    ) -> LoadedModel:
        """``weights=False`` loads the tokenizer only (another engine, vLLM, loads the weights).
        ``precision: auto`` becomes the dtype actually used (bf16 on a GPU, fp32 on CPU, fp32 for a
        model whose 16-bit weights lose what its last stage trained), and that is what is recorded."""
        from hippocrates.models import (
            ResolvedModel,
            load_model,
            load_tokenizer,
            precision_for,
            resolve_model,
            resolve_precision,
        )

        resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(str(spec))
        if precision == "auto":
            precision, why = precision_for(str(resolved.path), "auto")
            if why:
                status(f"eval: {why}")
        else:
            precision = resolve_precision(precision)
        status(f"loading {resolved.spec} ({precision}{'' if weights else ', tokenizer only'})")
        tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
        lm = None
        if weights:
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
    chat_template: bool | None,
    limit: int | None,
    protocol: str,
    scorer: str,
    seed: int,
    max_length: int | None,
    precision: str,
    mode: str = "loglik",
    generation: GenerationSettings | None = None,
) -> Step:
    """An evaluation's inputs (hippocrates.record): protocol, model, and every file each task reads.

    A generative evaluation's record holds the mode and every generation setting (a changed budget
    is a new evaluation) instead of the log-likelihood prompt and scorer; a log-likelihood record is
    the same as before generation existed, so earlier evaluations stay current.
    """
    from hippocrates.eval.loaders import task_files

    files = [
        task_files(spec, (data or {}).get(spec.task), data_dir, (fewshot_data or {}).get(spec.task))
        for spec in specs
    ]
    common = {"tasks": [s.task for s in specs], "task_specs": [s.model_dump(mode="json") for s in specs],
              "num_fewshot": num_fewshot}  # fmt: skip
    if mode == "generate":
        config = {
            **common, "mode": mode, "chat_template": chat_template, "limit": limit, "seed": seed,
            "max_length": max_length, **(generation or GenerationSettings()).record(),
        }  # fmt: skip
    else:
        config = {
            **common, "prompt": prompt, "chat_template": bool(chat_template), "limit": limit,
            "protocol": protocol, "scorer": scorer, "fewshot_seed": seed, "max_length": max_length,
        }  # fmt: skip
    return Step("eval", config, model=str(model), data=files, precision=precision)


def options_step(model_path: str, specs: list[Any], options: dict[str, Any]) -> Step:
    """The run record of ``evaluate(model, tasks, **options)``, before the model is loaded (the
    pipeline, the ablation and the sweep reuse an evaluation whose record is current)."""
    return eval_step(
        model_path, specs, data=options.get("data"), data_dir=options.get("data_dir"),
        fewshot_data=options.get("fewshot_data"), num_fewshot=options.get("num_fewshot", 0),
        prompt=options.get("prompt", "hippocrates"), chat_template=options.get("chat_template"),
        limit=options.get("limit"), protocol=options.get("protocol", "v0.4"), scorer=options.get("scorer", "fast"),
        seed=options.get("seed", DEFAULT_SEED), max_length=options.get("max_length"),
        precision=options.get("precision", "fp32"), mode=options.get("mode", "loglik"),
        generation=generation_settings(options),
    )  # fmt: skip


def generation_settings(options: dict[str, Any]) -> GenerationSettings:
    """The generation settings among evaluate() options (defaults for those not given)."""
    return GenerationSettings(
        samples=options.get("samples", 1), temperature=options.get("temperature", 0.0),
        max_new_tokens=options.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS), backend=options.get("backend", "hf"),
    )  # fmt: skip


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
        "mode": ev.mode,
        "samples": ev.samples,
        "temperature": ev.temperature,
        "max_new_tokens": ev.max_new_tokens,
        "backend": ev.backend,
    }


def recipe_eval_step(recipe: Any, model: str, options: dict[str, Any]):
    """The inputs of evaluating ``model`` with ``options`` (what decides whether results are reusable)."""
    from hippocrates.eval.registry import resolve_tasks
    from hippocrates.models import resolve_model

    return options_step(resolve_model(model).path, resolve_tasks(recipe.eval.tasks), options)


def evaluate(
    model: Any,
    tasks: str | Iterable[str],
    *,
    data: dict[str, str] | None = None,
    num_fewshot: int = 0,
    prompt: str = "hippocrates",
    chat_template: bool | None = None,
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
    mode: str = "loglik",
    samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    backend: str = "hf",
) -> dict[str, Any]:
    """Evaluate a model (a spec, or a :class:`LoadedModel`) on tasks; returns (and writes, with
    ``output_dir``) the results.json content, with a manifest.json of its inputs beside it.

    ``mode="loglik"`` scores every option (``prompt``, ``scorer``, ``protocol``); ``mode="generate"``
    lets the model answer (``samples``, ``temperature``, ``max_new_tokens``, ``backend``; ``seed``
    also seeds the samples). ``chat_template``: None is off for loglik and, for generate, the
    model's chat template when it has one (else the Alpaca format); True/False force it.
    """
    from hippocrates.record import now, write_manifest

    t0, started = time.time(), now()
    _check_args(num_fewshot, prompt, limit, batch_size, scorer, precision, mode)
    if protocol not in PROTOCOLS:
        raise HippoError(f"unknown protocol '{protocol}' (choose from {', '.join(PROTOCOLS)})")
    generating = mode == "generate"
    generation = GenerationSettings(samples, temperature, max_new_tokens, backend)
    if generating:
        generation.check()
        if protocol == "v0.3":
            raise HippoError(
                "protocol v0.3 (the paper's harness) is log-likelihood only; use --protocol v0.4"
            )
    else:
        chat_template = bool(chat_template)
        if chat_template and protocol == "v0.3":
            raise HippoError(
                "protocol v0.3 (the paper's harness) has no chat templates; drop --chat-template"
            )
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
    weights = not (generating and backend == "vllm")  # vLLM loads its own copy of the weights
    lm = (
        model
        if isinstance(model, LoadedModel)
        else LoadedModel.load(model, precision, trust_remote_code, weights)
    )
    precision = lm.precision
    step = eval_step(
        lm.path, [t.spec for t in loaded], data=data, data_dir=data_dir, fewshot_data=fewshot_data,
        num_fewshot=num_fewshot, prompt=prompt, chat_template=chat_template, limit=limit, protocol=protocol,
        scorer=scorer, seed=seed, max_length=max_length, precision=precision, mode=mode, generation=generation,
    )  # fmt: skip
    window = max_length or _model_window(lm, protocol)
    results: dict[str, Any] = {
        "model": lm.spec,
        "model_path": lm.path,
        "prompt": None if generating else prompt,
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
    if generating:
        from hippocrates.eval.generate import template_format

        fmt = template_format(lm.tokenizer, chat_template)
        results.update(mode=mode, chat_template=fmt == "chat", template=fmt, **generation.record())
        del results["scorer"]
    samples_rows: dict[str, list[dict[str, Any]]] = {}
    for task in loaded:
        started_task = time.perf_counter()
        name = task.spec.task
        skipped = list(task.skipped)
        if generating:
            items, shots = select(task, limit=limit, protocol="v0.4", num_fewshot=num_fewshot, seed=seed)
            status(
                f"{name}: {len(items)} items, {num_fewshot}-shot, generate ({fmt} format, "
                f"{_describe_generation(generation)}), data {task.source}"
            )
            from hippocrates.eval.generate import generate_task

            if num_fewshot and task.pool_is_eval:
                status(f"{name}: few-shot exemplars come from {task.pool_source}")
            metrics, rows = generate_task(
                lm, task, items, shots, generation, fmt=fmt, window=window, batch_size=batch_size, seed=seed
            )
            truncation = {}  # the generative metrics say which answers reached the budget
        else:
            metrics, rows = _score_task(
                lm, task, skipped, num_fewshot=num_fewshot, prompt=prompt, chat_template=bool(chat_template),
                limit=limit, seed=seed, protocol=protocol, scorer=scorer, window=window, batch_size=batch_size,
            )  # fmt: skip
            truncation = {key: metrics.pop(key) for key in ("truncated", "truncated_ids")}
        results["tasks"][name] = {
            **metrics,
            "skipped": len(skipped),
            "skipped_ids": [i for i, _ in skipped],
            "skipped_reasons": dict(skipped),
            "duplicates": len(task.duplicates),
            "duplicate_ids": [i for i, _ in task.duplicates],
            **truncation,
            "data": task.source,
            "data_sha256": task.sha256,
            "fewshot_pool": task.pool_source if num_fewshot else None,
            "fewshot_pool_is_eval_set": bool(num_fewshot and task.pool_is_eval),
            "fewshot_pool_overlap_removed": task.pool_overlap,
            "time_s": round(time.perf_counter() - started_task, 3),
            "prompt": None if generating else prompt,
            "shots": num_fewshot,
        }
        if generating and metrics["unparsed"]:
            ids = metrics["unparsed_ids"]
            status(f"{name}: {len(ids)} of {metrics['n']} answers unparsed, scored wrong "
                   f"(ids: {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''})")  # fmt: skip
        samples_rows[name] = rows
    if out is not None:
        for stale in ("manifest.json", "results.json"):  # the completion markers go first, come back last
            (out / stale).unlink(missing_ok=True)
        for name, rows in samples_rows.items():
            write_jsonl(out / f"samples_{name}.jsonl", rows)
        write_json(out / "results.json", results)
        outputs = ["results.json", *(f"samples_{n}.jsonl" for n in samples_rows)]
        write_manifest(out, step.manifest(outputs=outputs, started=started, t0=t0, recipe=recipe))
    return results


def _model_window(lm: LoadedModel, protocol: str) -> int:
    """The model's window in tokens (from its config when only the tokenizer is loaded)."""
    if lm.model is not None:
        return model_max_length(lm.model, lm.tokenizer, protocol=protocol)
    from types import SimpleNamespace

    from transformers import AutoConfig

    return model_max_length(SimpleNamespace(config=AutoConfig.from_pretrained(lm.path)), lm.tokenizer)


def _describe_generation(g: GenerationSettings) -> str:
    how = "greedy" if g.temperature == 0 else f"temperature {g.temperature:g}"
    return f"{g.samples} sample{'s' if g.samples > 1 else ''}, {how}, up to {g.max_new_tokens} new tokens"


def _score_task(
    lm: LoadedModel, task: TaskData, skipped: list[tuple[str, str]], *, num_fewshot: int, prompt: str,
    chat_template: bool, limit: int | None, seed: int, protocol: str, scorer: str, window: int, batch_size: int,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
    """Log-likelihood evaluation of one task: (metrics, samples rows); unusable prompts join ``skipped``."""
    name = task.spec.task
    tokenizer = lm.tokenizer
    encoder = encoder_for(protocol, tokenizer)
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
        sample_row(doc_id, p.item.id, p.context, p.continuations, p.choices, s.loglikelihoods, p.item.gold)
        for doc_id, (p, s) in enumerate(zip(kept, scored, strict=True))
    ]
    truncated = [p.item.id for p, s in zip(kept, scored, strict=True) if s.truncated]
    if truncated:
        status(
            f"warning: {name}: {len(truncated)} prompt(s) longer than the model's {window}-token window "
            f"were left-truncated (ids: {', '.join(truncated[:5])}{' ...' if len(truncated) > 5 else ''})"
        )
    return {**task_metrics(rows), "truncated": len(truncated), "truncated_ids": truncated}, rows


def _pct(value: float | None, err: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:5.1f}" + (f" ± {100 * err:4.1f}" if err is not None else "")


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of the task metrics, for the terminal."""
    if results.get("mode") == "generate":
        return _format_generative(results)
    header = f"{'task':<16} {'n':>5} {'acc':>12} {'acc_norm':>12} {'ece':>6} {'brier':>6} {'skip':>5} {'trunc':>5} {'time_s':>7}"
    lines = [
        f"model {results['model']}, prompt {results['prompt']}, {results['num_fewshot']}-shot"
        + (", chat template" if results["chat_template"] else ""),
        header,
        "-" * len(header),
    ]
    for name, m in results["tasks"].items():
        lines.append(
            f"{name:<16} {m['n']:>5} {_pct(m['acc'], m['acc_stderr']):>12} "
            f"{_pct(m['acc_norm'], m['acc_norm_stderr']):>12} "
            f"{m['ece'] if m['ece'] is None else round(m['ece'], 3):>6} "
            f"{m['brier'] if m['brier'] is None else round(m['brier'], 3):>6} "
            f"{m['skipped']:>5} {m['truncated']:>5} {m['time_s']:>7.1f}"
        )
    return "\n".join(lines)


def _format_generative(results: dict[str, Any]) -> str:
    """The generative table: accuracy with the unparsed answers beside it."""
    header = (f"{'task':<16} {'n':>5} {'acc':>12} {'unparsed':>14} {'mean tokens':>11} {'budget':>6} "
              f"{'skip':>5} {'time_s':>7}")  # fmt: skip
    settings = GenerationSettings(
        results["samples"], results["temperature"], results["max_new_tokens"], results["backend"]
    )
    lines = [
        f"model {results['model']}, generate ({results['template']} format, {_describe_generation(settings)}), "
        f"{results['num_fewshot']}-shot",
        header,
        "-" * len(header),
    ]
    for name, m in results["tasks"].items():
        unparsed = f"{m['unparsed']} ({_pct(m['unparsed_rate']).strip()}%)" if m["n"] else "-"
        tokens = "-" if m["mean_generated_tokens"] is None else f"{m['mean_generated_tokens']:.1f}"
        lines.append(
            f"{name:<16} {m['n']:>5} {_pct(m['acc'], m['acc_stderr']):>12} {unparsed:>14} {tokens:>11} "
            f"{m['truncated']:>6} {m['skipped']:>5} {m['time_s']:>7.1f}"
        )
    lines.append("unparsed answers are scored wrong; budget: answers that reached --max-new-tokens")
    return "\n".join(lines)
