"""The prompting-strategy sweep: one evaluation per (mode, prompt, chat template, shots, budget) combination.

The paper compares prompt formats and few-shot counts; this runs every combination with the same
model and tasks, by log-likelihood (one row per prompt strategy) and/or generatively (one row per
thinking budget, ``max_new_tokens``), and writes ``sweep.{json,md,csv}`` for the report's "Prompting strategies"
section (it reads ``RUN_DIR/sweep/sweep.json``). The model is loaded once for all combinations,
and a combination whose folder is current for its inputs (hippocrates.record) is not evaluated
again. Each combination is compared with a baseline combination (the first, unless named) on the
same items (hippocrates.analyses.stats: bootstrap CI, McNemar p, Holm across the combinations).
The table is rewritten after each combination, so a crash keeps the finished rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hippocrates.data.io import read_json_object, write_json, write_text
from hippocrates.errors import HippoError
from hippocrates.eval.generate import DEFAULT_MAX_NEW_TOKENS, MODES
from hippocrates.progress import status
from hippocrates.record import current
from hippocrates.report.tables import sweep_comparisons, sweep_table, task_average, with_comparisons


@dataclass(frozen=True)
class Combination:
    """One evaluation of the sweep: a log-likelihood prompt, or generation with a thinking budget."""

    mode: str
    prompt: str | None  # loglik only: generation asks every item the same way
    chat_template: bool
    shots: int
    max_new_tokens: int | None = None  # generate only

    @property
    def group(self) -> str:
        """``<prompt>-<chat|plain>`` or ``generate-<N>tok-<chat|plain>``: the folder of its shot counts."""
        head = self.prompt if self.mode == "loglik" else f"generate-{self.max_new_tokens}tok"
        return f"{head}-{'chat' if self.chat_template else 'plain'}"

    @property
    def name(self) -> str:
        """As ``--baseline`` takes it: ``<prompt>-<chat|plain>-<K>shot``, ``generate-<N>tok-<chat|plain>-<K>shot``."""
        return f"{self.group}-{self.shots}shot"

    def folder(self, output_dir: Path) -> Path:
        return Path(output_dir) / self.group / f"{self.shots}shot"

    def label(self) -> str:
        how = (
            f"prompt {self.prompt}"
            if self.mode == "loglik"
            else f"generate, {self.max_new_tokens} new tokens"
        )
        return f"{how}, chat template {'on' if self.chat_template else 'off'}, {self.shots}-shot"


def combinations(
    modes: Sequence[str],
    prompts: Sequence[str],
    chat_options: Sequence[bool],
    shots: Sequence[int],
    budgets: Sequence[int],
) -> list[Combination]:
    """Every combination, mode by mode: loglik prompt x chat x shots; generate budget x chat x shots."""
    found = []
    for mode in modes:
        if mode == "loglik":
            found += [Combination(mode, p, c, k) for p in prompts for c in chat_options for k in shots]
        else:
            found += [Combination(mode, None, c, k, b) for b in budgets for c in chat_options for k in shots]
    return found


def combination_dir(output_dir: Path, prompt: str, chat_template: bool, shots: int) -> Path:
    """Where one loglik combination's results.json and samples go: ``<prompt>-<chat|plain>/<K>shot``."""
    return Combination("loglik", prompt, chat_template, shots).folder(output_dir)


def combination_name(prompt: str, chat_template: bool, shots: int) -> str:
    """A loglik combination's name, as ``--baseline`` takes it: ``<prompt>-<chat|plain>-<K>shot``."""
    return Combination("loglik", prompt, chat_template, shots).name


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
    modes: Sequence[str] = ("loglik",),
    budgets: Sequence[int] = (DEFAULT_MAX_NEW_TOKENS,),
    **eval_kwargs: Any,
) -> dict[str, Any]:
    """Evaluate ``model`` for every combination (:func:`combinations`); write and return the sweep.

    ``modes``: loglik (every prompt x chat option x shot count) and/or generate (every budget, the
    ``max_new_tokens`` values, x chat option x shot count). ``baseline``: the combination the others
    are compared with (:attr:`Combination.name`; default the first). ``eval_kwargs`` (data_dir,
    fewshot_data, seed, protocol, samples, temperature, backend, ...) pass through to every evaluation.
    """
    from hippocrates.analyses.stats import load_outcomes
    from hippocrates.eval.registry import resolve_tasks
    from hippocrates.eval.runner import LoadedModel, evaluate, options_step
    from hippocrates.models import resolve_model

    for name, values in (
        ("tasks", tasks),
        ("modes", modes),
        ("chat options", chat_options),
        ("shots", shots),
    ):
        if not values:
            raise HippoError(f"sweep: no {name} given")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise HippoError(f"sweep: unknown mode '{unknown[0]}' (choose from {', '.join(MODES)})")
    if "loglik" in modes and not prompts:
        raise HippoError("sweep: no prompts given")
    if "generate" in modes and (not budgets or any(b < 1 for b in budgets)):
        raise HippoError(f"sweep: budgets (max new tokens) must be >= 1, got {list(budgets)}")
    if any(k < 0 for k in shots):
        raise HippoError(f"sweep: shots must be >= 0, got {list(shots)}")
    combos = combinations(modes, prompts, chat_options, shots, budgets)
    names = [c.name for c in combos]
    if baseline is not None and baseline not in names:
        raise HippoError(
            f"sweep: baseline '{baseline}' is not a combination (choose from {', '.join(names)})"
        )
    specs = resolve_tasks(list(tasks), eval_kwargs.get("task_dirs", ()))
    task_keys = [s.task for s in specs]  # a task given as a YAML path is reported by its name
    lm: LoadedModel | None = model if isinstance(model, LoadedModel) else None
    spec = lm.spec if lm else str(model)
    path = lm.path if lm else resolve_model(str(model)).path
    out: dict[str, Any] = {
        "model": spec, "tasks": task_keys, "baseline": baseline or names[0], "rows": [], "evaluated": 0,
    }  # fmt: skip
    outcomes: dict[str, dict[str, dict[str, bool]]] = {}
    for combo in combos:
        where = combo.folder(output_dir)
        options = dict(
            eval_kwargs, data=data, num_fewshot=combo.shots, chat_template=combo.chat_template, limit=limit,
            batch_size=batch_size, precision=lm.precision if lm else precision, mode=combo.mode,
        )  # fmt: skip
        if combo.mode == "loglik":
            options["prompt"] = combo.prompt
        else:
            options["max_new_tokens"] = combo.max_new_tokens
        step = options_step(path, specs, options)
        if not force and current(where, step):
            status(f"sweep: {combo.label()}: unchanged, reusing {where}")
            res = read_json_object(where / "results.json")
        else:
            status(f"sweep: {combo.label()}")
            weights = not (combo.mode == "generate" and eval_kwargs.get("backend") == "vllm")
            lm = lm or LoadedModel.load(model, precision, trust_remote_code, weights)
            res = evaluate(lm, list(tasks), output_dir=where, **options)
            out["evaluated"] += 1
        per = res.get("tasks") or {}

        def each(key: str) -> dict[str, Any]:
            return {t: (per.get(t) or {}).get(key) for t in task_keys}  # noqa: B023 (used at once)

        acc = each("acc")
        outcomes[combo.name] = load_outcomes(where)
        generated = combo.mode == "generate"
        out["rows"].append({
            "name": combo.name, "mode": combo.mode, "prompt": combo.prompt, "chat_template": combo.chat_template,
            "num_fewshot": combo.shots, "max_new_tokens": combo.max_new_tokens,
            "results": str(where / "results.json"), "acc": acc, "acc_norm": each("acc_norm"), "ece": each("ece"),
            "n": each("n"), "average": task_average(list(acc.values())),
            "unparsed_rate": each("unparsed_rate") if generated else None,
            "mean_generated_tokens": each("mean_generated_tokens") if generated else None,
        })  # fmt: skip
        compare_rows(out, outcomes)
        out["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_sweep(output_dir, out)
    return out
