"""One table type rendered three ways (HTML, Markdown, CSV), so the report, ``hippo ablate``,
the prompting sweep and ``hippo compare`` print the same numbers; plus their table builders.
"""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

DASH = "—"


@dataclass
class Table:
    """Rows of raw values; columns in ``percent`` show fractions as percentages (like the paper)."""

    headers: list[str]
    rows: list[list[Any]]
    caption: str = ""
    percent: set[int] = field(default_factory=set)
    notes: dict[int, str] = field(default_factory=dict)  # row index -> tooltip (HTML title)
    signed: set[int] = field(default_factory=set)  # columns of differences: always show the sign
    pvalues: set[int] = field(default_factory=set)  # p-value columns: 3 decimals, "<0.001" below that

    def cell(self, value: Any, col: int) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return DASH
        if isinstance(value, bool):
            return "yes" if value else "no"
        if col in self.pvalues and isinstance(value, int | float):
            return "<0.001" if value < 0.001 else f"{value:.3f}"
        if isinstance(value, float):
            sign = "+" if col in self.signed else ""
            return f"{100 * value:{sign}.1f}" if col in self.percent else f"{value:{sign}.3f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
        body = []
        for i, row in enumerate(self.rows):
            cells = "".join(
                f'<td class="{"num" if isinstance(v, int | float) and not isinstance(v, bool) else "txt"}">'
                f"{html.escape(self.cell(v, c))}</td>"
                for c, v in enumerate(row)
            )
            title = f' title="{html.escape(self.notes[i])}"' if i in self.notes else ""
            body.append(f"<tr{title}>{cells}</tr>")
        caption = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"

    def markdown(self) -> str:
        def esc(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        lines = [f"**{esc(self.caption)}**", ""] if self.caption else []
        lines.append("| " + " | ".join(esc(h) for h in self.headers) + " |")
        lines.append("|" + "|".join("---" for _ in self.headers) + "|")
        lines += ["| " + " | ".join(esc(self.cell(v, c)) for c, v in enumerate(r)) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.headers)
        writer.writerows(
            [
                ["" if v is None else round(v, 6) if isinstance(v, float) else v for v in row]
                for row in self.rows
            ]
        )
        return buf.getvalue()


def task_average(values: Sequence[float | None]) -> float | None:
    """Mean over tasks; None unless every task has a value (a partial average would mislead)."""
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]


# the columns the ablation and sweep tables add for each row's average against the baseline
VERDICT_HEADERS = ["95% CI low", "95% CI high", "CI excludes 0", "McNemar p", "Holm p", "Holm p < 0.05"]


def _verdict(comparison: dict[str, Any] | None) -> list[Any]:
    """The average's CI, significance and p-values of a row's comparison (dashes when it has none)."""
    avg = (comparison or {}).get("average") or {}
    keys = ("ci_low", "ci_high", "ci_excludes_zero", "p_mcnemar", "p_holm", "significant_holm")
    return [avg.get(k) for k in keys]


def ablation_table(data: dict[str, Any]) -> Table:
    """Variants x tasks accuracy (%), the average, and its paired comparison with the base model."""
    tasks = list(data.get("tasks", []))
    base_avg = next((v.get("average") for v in data.get("variants", []) if v.get("name") == "base"), None)
    rows, notes = [], {}
    for i, v in enumerate(data.get("variants", [])):
        acc = v.get("acc") or {}
        avg = v.get("average")
        delta = avg - base_avg if avg is not None and base_avg is not None else None
        status = v.get("status", "ok") + (" (reused)" if v.get("reused_eval") else "")
        verdict = _verdict(v.get("comparison"))
        rows.append(
            [v.get("label", v.get("name")), *[acc.get(t) for t in tasks], avg, delta, *verdict, status]
        )
        if v.get("reason"):
            notes[i] = v["reason"]
    shots = data.get("num_fewshot")
    delta = len(tasks) + 2
    return Table(
        ["Model", *tasks, "Average", "Δ avg vs base", *VERDICT_HEADERS, "Status"],
        rows,
        caption=f"Stage ablation: accuracy (%), {shots}-shot" if shots is not None else "Stage ablation",
        percent=set(range(1, delta + 3)),
        notes=notes,
        signed={delta, delta + 1, delta + 2},
        pvalues={delta + 4, delta + 5},
    )


def sweep_table(data: dict[str, Any]) -> Table:
    """Prompt strategy x chat template x shots against per-task accuracy (%), the average, and its
    paired comparison with the baseline combination. A sweep with generative rows adds the mode,
    the thinking budget and, beside the average, the unparsed rate (mean over tasks)."""
    tasks = list(data.get("tasks", []))
    found = [r.get("average") for r in data.get("rows", []) if r.get("name") == data.get("baseline")]
    base_avg = found[0] if found else None
    generative = any(r.get("mode") == "generate" for r in data.get("rows", []))
    rows = []
    for r in data.get("rows", []):
        acc = r.get("acc") or {}
        avg = r.get("average")
        unparsed = r.get("unparsed_rate") or {}
        lead = [r.get("mode", "loglik"), r.get("prompt")] if generative else [r.get("prompt")]
        budget = [r.get("max_new_tokens")] if generative else []
        rate = [task_average([unparsed.get(t) for t in tasks]) if unparsed else None] if generative else []
        rows.append(
            [
                *lead,
                bool(r.get("chat_template")),
                r.get("num_fewshot"),
                *budget,
                *[acc.get(t) for t in tasks],
                avg,
                *rate,
                avg - base_avg if avg is not None and base_avg is not None else None,
                *_verdict(r.get("comparison")),
            ]
        )
    first = 5 if generative else 3  # the first accuracy column
    delta = first + len(tasks) + 1 + (1 if generative else 0)
    baseline = f", Δ against {data['baseline']}" if data.get("baseline") else ""
    headers = ["Prompt", "Chat template", "Shots", *tasks, "Average"]
    if generative:
        headers = ["Mode", "Prompt", "Chat template", "Shots", "Budget", *tasks, "Average", "Unparsed (%)"]
    return Table(
        [*headers, "Δ avg vs baseline", *VERDICT_HEADERS],
        rows,
        caption=f"Prompting strategies: accuracy (%){baseline}"
        + ("; generate: budget = max new tokens, unparsed answers scored wrong" if generative else ""),
        percent=set(range(first, delta + 3)),
        signed={delta, delta + 1, delta + 2},
        pvalues={delta + 4, delta + 5},
    )


def comparison_table(
    comparisons: Sequence[tuple[str, dict[str, Any]]],
    *,
    label: str | None = None,
    a_name: str = "A",
    b_name: str = "B",
    caption: str = "",
) -> Table:
    """Per task and on the average: both accuracies, B − A, its CI, discordant counts and p-values.

    ``comparisons``: (row label, :func:`hippocrates.analyses.stats.compare` result); the label
    column (headed ``label``) is left out when None. Holm columns appear when the results have them.
    """
    holm = any("p_holm" in c.get("average", {}) for _, c in comparisons)
    headers = ["Task", "n", f"{a_name} (%)", f"{b_name} (%)", f"Δ {b_name} − {a_name}", "95% CI low",
               "95% CI high", "CI excludes 0", f"only {a_name} right", f"only {b_name} right", "McNemar p"]  # fmt: skip
    keys = ["n", "accuracy_a", "accuracy_b", "difference", "ci_low", "ci_high", "ci_excludes_zero",
            "only_a_correct", "only_b_correct", "p_mcnemar"]  # fmt: skip
    if holm:
        headers += ["Holm p", "Holm p < 0.05"]
        keys += ["p_holm", "significant_holm"]
    lead = [] if label is None else [label]
    rows = [
        [*([] if label is None else [name]), task, *[row.get(k) for k in keys]]
        for name, comparison in comparisons
        for task, row in [*comparison["tasks"].items(), ("Average", comparison["average"])]
    ]
    first = len(lead) + 2  # the first percentage column
    return Table(
        lead + headers,
        rows,
        caption=caption,
        percent=set(range(first, first + 5)),
        signed={first + 2, first + 3, first + 4},
        pvalues={first + 8} | ({first + 9} if holm else set()),
    )


def baseline_comparisons(
    comparisons: Sequence[tuple[str, dict[str, Any]]], label: str, a_name: str, caption: str
) -> tuple[Table, str] | None:
    """The per-task table and the method note of a table's comparisons against one baseline."""
    if not comparisons:
        return None
    from hippocrates.analyses.stats import describe

    first = comparisons[0][1]
    table = comparison_table(comparisons, label=label, a_name=a_name, b_name=label, caption=caption)
    return table, describe(first, family=len(comparisons))


def ablation_comparisons(data: dict[str, Any]) -> tuple[Table, str] | None:
    """Each ablation variant against the base model, per task (from ablation.json)."""
    found = [
        (v.get("label", v.get("name")), v["comparison"])
        for v in data.get("variants", [])
        if v.get("comparison")
    ]
    caption = "Stage ablation: each model against the base model, per task"
    return baseline_comparisons(found, "Model", "Base", caption)


def sweep_comparisons(data: dict[str, Any]) -> tuple[Table, str] | None:
    """Each sweep combination against the baseline combination, per task (from sweep.json)."""
    found = [(r.get("name", "?"), r["comparison"]) for r in data.get("rows", []) if r.get("comparison")]
    caption = f"Prompting strategies: each combination against the baseline, {data.get('baseline')}, per task"
    return baseline_comparisons(found, "Combination", "baseline", caption)


def with_comparisons(table: Table, comparisons: tuple[Table, str] | None) -> str:
    """Markdown of a table followed by its per-task comparisons and their method note."""
    if comparisons is None:
        return table.markdown()
    return f"{table.markdown()}\n{comparisons[0].markdown()}\n{comparisons[1]}\n"


__all__ = [
    "Table",
    "ablation_comparisons",
    "ablation_table",
    "comparison_table",
    "sweep_comparisons",
    "sweep_table",
    "task_average",
    "with_comparisons",
]
