"""One table type rendered three ways (HTML, Markdown, CSV), so the report, ``hippo ablate``
and the prompting sweep print the same numbers; plus the ablation and sweep table builders.
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

    def cell(self, value: Any, col: int) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return DASH
        if isinstance(value, bool):
            return "yes" if value else "no"
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


def ablation_table(data: dict[str, Any]) -> Table:
    """Variants x tasks accuracy (%), the average and its change against the base model."""
    tasks = list(data.get("tasks", []))
    base_avg = next((v.get("average") for v in data.get("variants", []) if v.get("name") == "base"), None)
    rows, notes = [], {}
    for i, v in enumerate(data.get("variants", [])):
        acc = v.get("acc") or {}
        avg = v.get("average")
        delta = avg - base_avg if avg is not None and base_avg is not None else None
        status = v.get("status", "ok") + (" (reused)" if v.get("reused_eval") else "")
        rows.append([v.get("label", v.get("name")), *[acc.get(t) for t in tasks], avg, delta, status])
        if v.get("reason"):
            notes[i] = v["reason"]
    shots = data.get("num_fewshot")
    return Table(
        ["Model", *tasks, "Average", "Δ avg vs base", "Status"],
        rows,
        caption=f"Stage ablation: accuracy (%), {shots}-shot" if shots is not None else "Stage ablation",
        percent=set(range(1, len(tasks) + 3)),
        notes=notes,
        signed={len(tasks) + 2},
    )


def sweep_table(data: dict[str, Any]) -> Table:
    """Prompt strategy x chat template x shots against per-task accuracy (%) and the average."""
    tasks = list(data.get("tasks", []))
    rows = []
    for r in data.get("rows", []):
        acc = r.get("acc") or {}
        rows.append(
            [
                r.get("prompt"),
                bool(r.get("chat_template")),
                r.get("num_fewshot"),
                *[acc.get(t) for t in tasks],
                r.get("average"),
            ]
        )
    return Table(
        ["Prompt", "Chat template", "Shots", *tasks, "Average"],
        rows,
        caption="Prompting strategies: accuracy (%)",
        percent=set(range(3, len(tasks) + 4)),
    )


__all__ = ["Table", "ablation_table", "sweep_table", "task_average"]
