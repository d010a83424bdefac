"""Assemble the run report: one self-contained HTML page and a Markdown summary.

The HTML embeds its PNG figures as data URIs and its CSS inline, carries a
Content-Security-Policy that forbids any network fetch or script, and so opens the same
offline, attached to an email, or years later. Both files are written atomically.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from string import Template

from hippocrates import __version__
from hippocrates.data.io import atomic_file
from hippocrates.errors import HippoError
from hippocrates.eval.calibration import DEFAULT_BINS
from hippocrates.progress import status
from hippocrates.report import sections as sec
from hippocrates.report.glance import glance_section

SECTIONS: list[tuple[str, str, Callable[..., sec.Section]]] = [
    ("manifest", "Run manifest", sec.manifest_section),
    ("training", "Training", sec.training_section),
    ("eval", "Evaluation", sec.eval_section),
    ("ablation", "Stage ablation", sec.ablation_section),
    ("prompting", "Prompting strategies", sec.sweep_section),
    ("calibration", "Calibration", sec.calibration_section),
]


def _safe(sid: str, title: str, builder: Callable[..., sec.Section], *args: object) -> sec.Section:
    """Run one section builder; a file with an unexpected shape costs that section, not the report."""
    try:
        return builder(*args)
    except (HippoError, KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        broken = sec.Section(sid, title)
        broken.missing.append(f"could not build this section: {type(exc).__name__}: {exc}")
        return broken


def _missing_html(items: list[str]) -> str:
    if not items:
        return ""
    lis = "".join(f"<li>{html.escape(m)}</li>" for m in items)
    return f'<div class="missing"><strong>Missing</strong><ul>{lis}</ul></div>'


def render_html(run: Path, sections: list[sec.Section], generated: str) -> str:
    template = Template((resources.files("hippocrates.report") / "template.html").read_text(encoding="utf-8"))
    nav = "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    body = "\n".join(
        f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>{_missing_html(s.missing)}{"".join(s.html)}</section>'
        for s in sections
    )
    return template.substitute(
        title=html.escape(f"Hippocrates report: {run.name}"),
        heading=html.escape(f"Hippocrates report: {run.name}"),
        subtitle=html.escape(f"{run.resolve()} · generated {generated}"),
        nav=nav,
        body=body,
        version=__version__,
        generated=generated,
        run_dir=html.escape(str(run)),
    )


def render_markdown(run: Path, sections: list[sec.Section], generated: str) -> str:
    lines = [f"# Hippocrates report: {run.name}", "", f"Run directory `{run}`, generated {generated} "
             f"by hippocrates {__version__}. Figures are in report.html.", ""]  # fmt: skip
    for s in sections:
        lines += [f"## {s.title}", ""]
        if s.missing:
            lines += ["> **Missing:**"] + [f"> - {m}" for m in s.missing] + [""]
        lines += s.md
    return "\n".join(lines).rstrip() + "\n"


def build_report(run_dir: Path, output_dir: Path | None = None, *, n_bins: int = DEFAULT_BINS) -> Path:
    """Write ``report.html`` and ``report.md`` (default: ``RUN_DIR/report/``); return the HTML path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise HippoError(f"{run}: run directory not found")
    out = Path(output_dir) if output_dir is not None else run / "report"
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    status("report: at a glance")
    try:
        glance, glance_csv = glance_section(run)
    except (HippoError, KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        glance, glance_csv = sec.Section("glance", "At a glance"), ""
        glance.missing.append(f"could not build this section: {type(exc).__name__}: {exc}")
    built = [glance]
    for sid, title, builder in SECTIONS:
        status(f"report: {title.lower()}")
        args = (run, n_bins) if sid == "calibration" else (run,)
        built.append(_safe(sid, title, builder, *args))
    html_path, md_path = out / "report.html", out / "report.md"
    for path, text in (
        (html_path, render_html(run, built, generated)),
        (md_path, render_markdown(run, built, generated)),
        (out / "at_a_glance.csv", glance_csv),
    ):
        with atomic_file(path) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report is meant to be shared
    return html_path
