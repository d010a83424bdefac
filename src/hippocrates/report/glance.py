"""The report's first section, "At a glance": the results a reader came for, with their uncertainty.

1. The paper-style table: every model of the stage ablation (base, +CPT, +SFT, ...) against every
   benchmark, accuracy with its exact 95% confidence interval (Clopper-Pearson, from
   ``scipy.stats.binomtest``), the average, and the paired comparison with the base model (the
   difference of the averages with its bootstrap 95% CI and Holm-corrected McNemar p; ``*`` marks a
   task or average where the Holm-corrected p stays below 0.05).
2. The final model at each evaluation the run made (every shot count, log-likelihood or generative;
   generative rows show the share of unparsed answers beside the accuracy), and rubric-graded
   open-ended scores when the run has them.
3. What each training stage changed on its own held-out data.

Everything comes from the run's own files (the ablation's comparisons are computed by the ablation);
the same numbers go to ``at_a_glance.csv`` beside the report, one row per number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hippocrates.report.sections import Section, _quiet_json, eval_runs
from hippocrates.report.tables import Table

HEADLINES = {
    "cpt": ("held-out perplexity", "eval_perplexity_before", "eval_perplexity_after"),
    "sft": ("held-out response loss", "eval_loss_before", "eval_loss_after"),
    "grpo": ("held-out generative accuracy", "eval_accuracy_before", "eval_accuracy_after"),
    "dpo": (
        "held-out reward accuracy (ties 1/2)",
        "eval_reward_accuracy_before",
        "eval_reward_accuracy_after",
    ),
}


def accuracy_ci(correct: int, n: int) -> tuple[float | None, float | None]:
    """Exact (Clopper-Pearson) 95% interval of an accuracy."""
    if n <= 0:
        return None, None
    from scipy.stats import binomtest

    interval = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="exact")
    return float(interval.low), float(interval.high)


def _cell(acc: float | None, n: int | None, star: bool = False) -> str | None:
    if not isinstance(acc, float) or not n:
        return None
    lo, hi = accuracy_ci(round(acc * n), n)
    return f"{100 * acc:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" + (" *" if star else "")


class Collector:
    """The at-a-glance numbers, as table cells and as long CSV rows."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, table: str, row: str, task: str, metric: str, value: Any, **extra: Any) -> None:
        if value is not None:
            self.rows.append(
                {"table": table, "row": row, "task": task, "metric": metric, "value": value, **extra}
            )

    def csv(self) -> str:
        columns = ["table", "row", "task", "metric", "value", "ci_low", "ci_high", "n", "difference_vs_base",
                   "difference_ci_low", "difference_ci_high", "p_mcnemar", "p_holm", "significant_holm"]  # fmt: skip
        return Table(columns, [[r.get(c) for c in columns] for r in self.rows]).csv()


def ablation_table(data: dict[str, Any], numbers: Collector) -> Table | None:
    tasks = list(data.get("tasks") or [])
    variants = [v for v in data.get("variants") or [] if v.get("status") == "ok"]
    if not tasks or not variants:
        return None
    rows = []
    for v in variants:
        comparison = v.get("comparison") or {}
        per_task = comparison.get("tasks") or {}
        cells = []
        for task in tasks + ["average"]:
            n = (v.get("n") or {}).get(task) if task != "average" else sum((v.get("n") or {}).values())
            acc = (v.get("acc") or {}).get(task) if task != "average" else v.get("average")
            c = per_task.get(task, {}) if task != "average" else comparison.get("average") or {}
            cells.append(_cell(acc, n, bool(c.get("significant_holm"))))
            lo, hi = (
                accuracy_ci(round(acc * n), n)
                if isinstance(acc, float) and n and task != "average"
                else (None, None)
            )
            numbers.add("ablation", v.get("label"), task, "accuracy", acc, ci_low=lo, ci_high=hi, n=n,
                        difference_vs_base=c.get("difference"), difference_ci_low=c.get("ci_low"),
                        difference_ci_high=c.get("ci_high"), p_mcnemar=c.get("p_mcnemar"), p_holm=c.get("p_holm"),
                        significant_holm=c.get("significant_holm"))  # fmt: skip
        avg = comparison.get("average") or {}
        delta = None
        if isinstance(avg.get("difference"), float):
            delta = (
                f"{100 * avg['difference']:+.1f} [{100 * avg['ci_low']:+.1f}, {100 * avg['ci_high']:+.1f}]"
            )
        rows.append([v.get("label"), *cells, delta, avg.get("p_holm")])
    shots = data.get("num_fewshot")
    return Table(
        ["Model", *tasks, "Average", "Δ average vs base [95% CI]", "Holm p"],
        rows,
        caption=f"Accuracy (%) [exact 95% CI], {shots}-shot, prompt {data.get('prompt')}, protocol "
        f"{data.get('protocol', 'v0.4')}; * the paired difference with the base model stays significant "
        "after Holm's correction (p < 0.05)",
        pvalues={len(tasks) + 3},
    )


def evaluations_table(run: Path, numbers: Collector) -> Table | None:
    rows, tasks = [], []
    for shots, folder in eval_runs(run / "eval"):
        results = _quiet_json(folder / "results.json")
        per_task = results.get("tasks") or {}
        if not per_task:
            continue
        tasks += [t for t in per_task if t not in tasks]
        mode = results.get("mode", "loglik")
        label = f"{shots}-shot, {mode}" + (f", {results.get('prompt')} prompt" if mode == "loglik" else "")
        rows.append((label, per_task, mode))
    if not rows:
        return None
    out = []
    for label, per_task, mode in rows:
        cells, accs = [], []
        for task in tasks:
            m = per_task.get(task) or {}
            acc, n = m.get("acc"), m.get("n")
            cell = _cell(acc, n)
            if cell and mode == "generate" and n:
                cell += f"; unparsed {100 * (m.get('unparsed') or 0) / n:.0f}%"
            cells.append(cell)
            if isinstance(acc, float):
                accs.append(acc)
                lo, hi = accuracy_ci(round(acc * n), n) if n else (None, None)
                numbers.add("final model", label, task, "accuracy", acc, ci_low=lo, ci_high=hi, n=n)
                if mode == "generate":
                    numbers.add("final model", label, task, "unparsed", m.get("unparsed"), n=n)
        average = sum(accs) / len(accs) if len(accs) == len(tasks) else None
        out.append([label, *cells, None if average is None else f"{100 * average:.1f}"])
    return Table(["Evaluation", *tasks, "Average"], out,
                 caption="The final model: accuracy (%) [exact 95% CI] per evaluation of this run")  # fmt: skip


def rubric_table(run: Path, numbers: Collector) -> Table | None:
    rows = []
    for folder in sorted(run.glob("**/rubric.json")):
        data = _quiet_json(folder)
        overall = data.get("overall") or {}
        if not isinstance(overall.get("score"), float):
            continue
        rows.append([str(folder.parent.relative_to(run)), overall.get("score"), overall.get("ci_low"),
                     overall.get("ci_high"), overall.get("healthbench_score"), overall.get("n"),
                     overall.get("excluded")])  # fmt: skip
        numbers.add("rubric", str(folder.parent.relative_to(run)), "overall", "score", overall.get("score"),
                    ci_low=overall.get("ci_low"), ci_high=overall.get("ci_high"), n=overall.get("n"))  # fmt: skip
        numbers.add("rubric", str(folder.parent.relative_to(run)), "overall", "healthbench_score",
                    overall.get("healthbench_score"), ci_low=overall.get("healthbench_ci_low"),
                    ci_high=overall.get("healthbench_ci_high"), n=overall.get("n"))  # fmt: skip
    if not rows:
        return None
    return Table(["Rubric evaluation", "Score", "95% CI low", "95% CI high", "HealthBench aggregation", "Examples",
                  "Excluded (judge failed)"], rows, percent={1, 2, 3, 4},
                 caption="Open-ended answers graded against physician-style rubrics (%): Score is the mean of the "
                 "per-example scores clipped to [0, 1], with a bootstrap 95% CI; HealthBench aggregation clips the "
                 "mean of the unclipped scores instead, as published HealthBench numbers do")  # fmt: skip


def training_table(run: Path, numbers: Collector) -> Table | None:
    rows = []
    for stage, (what, before_key, after_key) in HEADLINES.items():
        metrics = _quiet_json(run / stage / "metrics.json")
        before, after = metrics.get(before_key), metrics.get(after_key)
        if isinstance(before, float) and isinstance(after, float):
            change = metrics.get("eval_change") or {}
            interval = "—"
            if change.get("nll_change") is not None:
                interval = (f"{change['nll_change']:+.3f} [{change['nll_change_ci_low']:+.3f}, "
                            f"{change['nll_change_ci_high']:+.3f}] over {change['rows']} rows")  # fmt: skip
                numbers.add("training", stage, "held-out NLL per token", "change", change["nll_change"],
                            ci_low=change["nll_change_ci_low"], ci_high=change["nll_change_ci_high"],
                            n=change["rows"])  # fmt: skip
            rows.append([stage.upper(), what, before, after, after - before, interval])
            numbers.add("training", stage, what, "before", before)
            numbers.add("training", stage, what, "after", after)
    if not rows:
        return None
    return Table(["Stage", "Held-out measure", "Before", "After", "Change",
                  "NLL per token: change [paired 95% CI]"], rows, signed={4},
                 caption="What each training stage changed on its own held-out data (the interval: paired "
                 "bootstrap over the held-out rows, on the mean log-loss per token)")  # fmt: skip


def glance_section(run: Path) -> tuple[Section, str]:
    """The section, and the CSV of its numbers."""
    s = Section("glance", "At a glance")
    numbers = Collector()
    ablation = _quiet_json(run / "ablation" / "ablation.json")
    tables = [
        ablation_table(ablation, numbers) if ablation else None,
        evaluations_table(run, numbers),
        rubric_table(run, numbers),
        training_table(run, numbers),
    ]
    if not any(tables):
        s.missing.append("no evaluation, ablation or training results in this run yet")
    for table in tables:
        if table is not None:
            s.table(table)
    if ablation and not tables[0]:
        s.missing.append("ablation/ablation.json: no evaluated model")
    elif not ablation:
        s.missing.append(
            "ablation/ablation.json: not found (run `hippo ablate RECIPE` for the per-stage table)"
        )
    s.note("The same numbers, one per row, are in at_a_glance.csv beside this report. Details follow below.")
    return s, numbers.csv()
