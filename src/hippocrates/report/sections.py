"""The report's sections, each read from its part of the run directory (docs/CONTRACTS.md).

Every builder tolerates a partial run: whatever is absent or unreadable becomes a line of
the section's "Missing" notice instead of an exception, so a report can be written at any
point of a pipeline (or of a failed one) and says exactly what it could not show.
"""

from __future__ import annotations

import html
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from hippocrates.data.io import read_json
from hippocrates.errors import HippoError
from hippocrates.eval import calibration as cal
from hippocrates.report import plots
from hippocrates.report.tables import (
    Table,
    ablation_comparisons,
    ablation_table,
    sweep_comparisons,
    sweep_table,
)

TRAIN_STAGES = ("cpt", "sft", "grpo", "annotate", "dpo")


@dataclass
class Section:
    """A titled part of the report, accumulated as parallel HTML and Markdown fragments."""

    id: str
    title: str
    html: list[str] = field(default_factory=list)
    md: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def heading(self, text: str, markdown: bool = True) -> None:
        self.html.append(f"<h3>{html.escape(text)}</h3>")
        if markdown:
            self.md.append(f"### {text}\n")

    def note(self, text: str) -> None:
        self.html.append(f'<p class="note">{html.escape(text)}</p>')
        self.md.append(f"{text}\n")

    def table(self, table: Table) -> None:
        self.html.append(table.html())
        self.md.append(table.markdown())

    def figure(self, png: bytes | None, caption: str) -> None:
        self.figures([(png, caption)])

    def figures(self, items: list[tuple[bytes | None, str]]) -> None:
        """Embed PNGs as data URIs side by side where they fit (HTML only: the Markdown stays text)."""
        figs = [
            f'<figure><img src="{plots.data_uri(png)}" alt="{html.escape(c)}">'
            f"<figcaption>{html.escape(c)}</figcaption></figure>"
            for png, c in items
            if png is not None
        ]
        if figs:
            self.html.append(f'<div class="figrow">{"".join(figs)}</div>')

    def details(self, summary: str, text: str) -> None:
        self.html.append(
            f"<details><summary>{html.escape(summary)}</summary><pre>{html.escape(text)}</pre></details>"
        )

    def load(self, run: Path, rel: str) -> Any:
        """A JSON object file of the run, or None with a Missing line naming it (absent or unreadable)."""
        path = run / rel
        if not path.is_file():
            self.missing.append(f"{rel}: not found")
            return None
        try:
            data = read_json(path)
        except HippoError as exc:
            self.missing.append(f"{rel}: unreadable ({str(exc).split(': ', 1)[-1]})")
            return None
        if not isinstance(data, dict):
            self.missing.append(f"{rel}: unreadable (expected a JSON object, got {type(data).__name__})")
            return None
        return data


def _quiet_json(path: Path) -> dict[str, Any]:
    """A JSON object, or {} when the file is absent, unreadable or not an object."""
    try:
        data = read_json(path) if path.is_file() else {}
    except HippoError:
        return {}
    return data if isinstance(data, dict) else {}


def pick(record: dict[str, Any] | None, *keys: str) -> Any:
    """The first present, non-empty value among ``keys``."""
    for key in keys:
        if record and record.get(key) not in (None, "", [], {}):
            return record[key]
    return None


def _flat_numbers(record: Any, prefix: str = "", depth: int = 2) -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(record, dict) and depth >= 0:
        for key, value in record.items():
            name = f"{prefix}{key}"
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[name] = value
            elif isinstance(value, dict):
                out.update(_flat_numbers(value, f"{name}.", depth - 1))
    return out


def when(value: Any) -> Any:
    """An ISO-8601 timestamp as ``YYYY-MM-DD HH:MM:SS UTC`` (short enough not to wrap); else as is."""
    try:
        stamp = datetime.fromisoformat(str(value))
    except ValueError:
        return value
    return stamp.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def short_path(value: Any, run: Path) -> Any:
    """A path inside the run directory as ``RUN/<relative>``; anything else unchanged."""
    if not isinstance(value, str) or not value:
        return value
    try:
        return f"RUN/{Path(value).resolve().relative_to(run.resolve())}"
    except ValueError:
        return value


def _duration(seconds: Any) -> str | None:
    if not isinstance(seconds, int | float):
        return None
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes}m {sec:02d}s" if minutes else f"{seconds:.1f}s"


def disabled_stages(run: Path) -> set[str]:
    """Training stages the run's recipe switches off (read from any run record that holds the
    recipe): the report names them as disabled instead of listing them as missing."""
    from hippocrates.record import read_manifest

    folders = (
        [run / stage for stage in TRAIN_STAGES] + sorted((run / "eval").glob("*")) if run.is_dir() else []
    )
    for folder in folders:
        man = read_manifest(folder) if folder.is_dir() else None
        stages = ((man.recipe if man else None) or {}).get("stages")
        if isinstance(stages, dict):
            return {
                st for st in TRAIN_STAGES
                if not (stages.get(st) or {}).get("enabled", st != "grpo")
            }  # fmt: skip
    return set()


def manifest_section(run: Path) -> Section:
    """Per stage: input model, seed, timings, token counts, data files with sha256 and versions."""
    from hippocrates.record import MANIFEST, read_manifest

    s = Section("manifest", "Run manifest")
    rows, files, versions, raw = [], [], {}, []
    off = disabled_stages(run)
    if off:
        s.note(f"Disabled in the recipe: {', '.join(st for st in TRAIN_STAGES if st in off)}.")
    for stage in TRAIN_STAGES:
        if stage in off and not (run / stage).is_dir():
            continue
        if not (run / stage).is_dir():
            s.missing.append(f"{stage}/: stage output not found (not run yet, disabled, or failed)")
            continue
        man = read_manifest(run / stage)
        if man is None:
            s.missing.append(f"{stage}/{MANIFEST}: missing or not a Hippocrates manifest")
            continue
        met = _quiet_json(run / stage / "metrics.json")  # its problems are the Training section's
        tokens = {k: v for k, v in _flat_numbers(met).items() if "token" in k.lower() and "max_" not in k}
        rows.append([
            stage,
            short_path(man.input_model.path if man.input_model else None, run),
            man.seed,
            when(man.started),
            when(man.finished),
            _duration(man.duration_s),
            ", ".join(f"{k}={int(v):,}" for k, v in tokens.items()) or None,
            (man.git_commit or "")[:12] or None,
        ])  # fmt: skip
        files += [[stage, d.get("path", "?"), d.get("sha256") or d.get("fingerprint")] for d in man.data]
        for pkg, ver in man.packages.items():
            versions.setdefault(pkg, {})[stage] = ver
        raw.append((f"{stage}/{MANIFEST}", json.dumps(man.model_dump(mode="json"), indent=2, default=str)))
    if rows:
        s.table(Table(["Stage", "Input model", "Seed", "Start", "End", "Duration", "Tokens", "Git"], rows))
    if files:
        s.table(Table(["Stage", "Data file", "sha256"], files, caption="Data files"))
    if versions:
        stages = [r[0] for r in rows]
        table = Table(
            ["Package", *stages], [[p, *[v.get(st) for st in stages]] for p, v in sorted(versions.items())]
        )
        table.caption = "Package versions"
        s.table(table)
    for name, text in raw:
        s.details(f"{name} (full)", text)
    return s


def training_section(run: Path) -> Section:
    """Final metrics and the loss-vs-step curve of each training stage (from metrics.json)."""
    s = Section("training", "Training")
    off = disabled_stages(run)
    for stage in TRAIN_STAGES:
        if not (run / stage).is_dir():
            if stage not in off:
                s.missing.append(f"{stage}/: stage output not found")
            continue
        met = s.load(run, f"{stage}/metrics.json")
        if not isinstance(met, dict):
            continue
        s.heading(stage.upper())
        scalars = [[k, v] for k, v in met.items() if isinstance(v, int | float | str) and k != "stage"]
        merge = met.get("merge")
        if isinstance(merge, dict) and isinstance(merge.get("update_retained"), float):
            scalars.append(["merge", f"merged in fp32, stored as {merge.get('dtype')}: "
                            f"{100 * merge['update_retained']:.2f}% of the weight update kept, "
                            f"max |Δ logit| {merge.get('max_abs_logit_diff')}"])  # fmt: skip
        if scalars:
            s.table(Table(["Metric", "Value"], scalars))
        history = met.get("log_history") or []
        if stage != "annotate":
            png = plots.training_curve(history, f"{stage.upper()} loss")
            if png is None:
                s.missing.append(f"{stage}/metrics.json: log_history has no loss entries")
            s.figure(png, f"{stage.upper()}: loss against optimizer step")
    return s


def eval_runs(eval_dir: Path) -> list[tuple[int, Path]]:
    """(shots, dir) of every ``<K>shot`` eval run under ``eval_dir``, by shot count."""
    found = []
    for d in eval_dir.glob("*shot") if eval_dir.is_dir() else []:
        m = re.fullmatch(r"(\d+)shot", d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    return sorted(found)


def _pm(value: Any, err: Any) -> str | None:
    if not isinstance(value, int | float):
        return None
    return f"{100 * value:.1f} ± {100 * err:.1f}" if isinstance(err, int | float) else f"{100 * value:.1f}"


def _rel(path: Path, run: Path) -> str:
    """``path`` relative to the run folder when inside it (as the report names files), else as is."""
    return os.path.relpath(path, run) if path.resolve().is_relative_to(run.resolve()) else str(path)


def variant_runs(run: Path) -> list[tuple[str, str, int, Path]]:
    """(name, label, shots, folder) of each evaluated ablation variant, from ablation.json."""
    data = _quiet_json(run / "ablation" / "ablation.json")
    out = []
    for v in data.get("variants") or []:
        if isinstance(v, dict) and v.get("status") == "ok" and isinstance(v.get("results"), str):
            path = Path(v["results"])
            folder = (run / path if not path.is_absolute() else path).parent
            out.append((v["name"], v.get("label", v["name"]), int(data.get("num_fewshot") or 0), folder))
    return out


def generative(results: dict[str, Any]) -> bool:
    """Whether a results.json is of a generative evaluation (no option probabilities to calibrate)."""
    return results.get("mode") == "generate"


def _generative_rows(res: dict[str, Any]) -> tuple[str, Table]:
    """The note and table of a generative evaluation: accuracy with the unparsed rate beside it."""
    how = "greedy" if not res.get("temperature") else f"temperature {res.get('temperature')}"
    note = (
        f"generative: {res.get('template')} format, {res.get('samples')} sample(s) per item ({how}"
        f"{', majority vote' if (res.get('samples') or 1) > 1 else ''}), up to {res.get('max_new_tokens')} new "
        "tokens; unparsed answers are scored wrong"
    )
    rows = [
        [task, t.get("n"), _pm(t.get("acc"), t.get("acc_stderr")), t.get("unparsed"), t.get("unparsed_rate"),
         t.get("mean_generated_tokens"), t.get("truncated"), t.get("skipped"), t.get("time_s")]
        for task, t in (res.get("tasks") or {}).items()
    ]  # fmt: skip
    headers = ["Task", "n", "acc (%)", "Unparsed", "Unparsed (%)", "Mean generated tokens", "Hit budget",
               "Skipped", "Time (s)"]  # fmt: skip
    return note, Table(headers, rows, percent={4})


def eval_section(run: Path) -> Section:
    """Per shot count, per task accuracy (± stderr), acc_norm, n, ECE and Brier (generative: the
    unparsed rate and generated tokens instead); per stage if ablated."""
    s = Section("eval", "Evaluation")
    runs = eval_runs(run / "eval")
    if not runs:
        s.missing.append("eval/<K>shot/results.json: no evaluation of the final model yet")
    for shots, d in runs:
        res = s.load(run, f"eval/{d.name}/results.json")
        if not isinstance(res, dict):
            continue
        s.heading(f"{shots}-shot")
        model, path = short_path(res.get("model"), run), short_path(res.get("model_path"), run)
        where = f" ({path})" if path not in (None, model) else ""
        if generative(res):
            note, table = _generative_rows(res)
            s.note(
                f"model {model}{where}, {note}, {when(res.get('created', '?'))}, "
                f"hippocrates {res.get('hippocrates_version', '?')}"
            )
            s.table(table)
            continue
        s.note(
            f"model {model}{where}, prompt {res.get('prompt')}, chat template "
            f"{'on' if res.get('chat_template') else 'off'}, {when(res.get('created', '?'))}, "
            f"hippocrates {res.get('hippocrates_version', '?')}"
        )
        rows = [
            [task, t.get("n"), _pm(t.get("acc"), t.get("acc_stderr")), _pm(t.get("acc_norm"), t.get("acc_norm_stderr")),
             t.get("ece"), t.get("brier"), t.get("skipped"), t.get("time_s")]
            for task, t in (res.get("tasks") or {}).items()
        ]  # fmt: skip
        s.table(Table(["Task", "n", "acc (%)", "acc_norm (%)", "ECE", "Brier", "Skipped", "Time (s)"], rows))
    by_shots: dict[int, dict[str, dict[str, Any]]] = {}
    for _, label, shots, folder in variant_runs(run):
        res = s.load(run, _rel(folder / "results.json", run))
        if isinstance(res, dict) and isinstance(res.get("tasks"), dict):
            by_shots.setdefault(shots, {})[label] = res["tasks"]
    for shots, stages in sorted(by_shots.items()):
        tasks = list(dict.fromkeys(t for res in stages.values() for t in res))
        names = list(stages)
        rows = [[task, *[(stages[n].get(task) or {}).get("acc") for n in names]] for task in tasks]
        table = Table(["Task", *names], rows, percent=set(range(1, len(names) + 1)))
        table.caption = f"Per stage, {shots}-shot accuracy (%) (from the ablation's evaluations)"
        s.table(table)
    for path in sorted((run / "eval").glob("**/rubric.json")) if (run / "eval").is_dir() else []:
        rubric_scores(s, run, path)
    return s


def rubric_scores(s: Section, run: Path, path: Path) -> None:
    """A rubric evaluation's overall and per-tag scores, and the examples the judge failed on."""
    res = s.load(run, _rel(path, run))
    if not isinstance(res, dict) or not isinstance(res.get("overall"), dict):
        return
    o, judge = res["overall"], res.get("judge") or {}
    s.heading(f"Rubric-graded answers ({_rel(path.parent, run)})")
    s.note(
        f"Model {short_path(res.get('model'), run)}, judge {judge.get('name')} (grader prompt version "
        f"{judge.get('grader_version')}), {res.get('examples')} examples of {res.get('rubrics')}: "
        f"{o.get('excluded', 0)} excluded because the judge failed on a criterion, {o.get('unscorable', 0)} "
        "without positive points (no defined score). Score: the mean of the per-example scores clipped to "
        "[0, 1], with a bootstrap 95% CI over examples; HealthBench: the mean of the unclipped scores, clipped, "
        "as HealthBench aggregates. A rubric tag is scored over the criteria carrying it."
        + (f" The judge said met for {o['criteria_met']} of {o['criteria_decided']} criteria "
           f"({o.get('negative_criteria_met')} of the {o.get('negative_criteria_decided')} that describe "
           "harmful or wrong behaviour)." if isinstance(o.get("criteria_decided"), int) else "")
    )  # fmt: skip
    rows = [["overall", "", o.get("n"), o.get("score"), o.get("ci_low"), o.get("ci_high"),
             o.get("healthbench_score")]]  # fmt: skip
    for kind, key in (("example", "example_tags"), ("criterion", "rubric_tags")):
        for tag, t in (res.get(key) or {}).items():
            if isinstance(t, dict):
                rows.append([tag, kind, t.get("n"), t.get("score"), t.get("ci_low"), t.get("ci_high"),
                             t.get("healthbench_score")])  # fmt: skip
    s.table(Table(["Tag", "Tag of", "Examples", "Score (%)", "95% CI low", "95% CI high", "HealthBench (%)"], rows,
                  percent={3, 4, 5, 6}))  # fmt: skip
    excluded = [e for e in res.get("excluded") or [] if isinstance(e, dict)]
    if excluded:
        listed = "; ".join(f"{e.get('id')}: {e.get('reason')}" for e in excluded[:10])
        s.note(f"Excluded ({len(excluded)}): {listed}" + (" ..." if len(excluded) > 10 else ""))


def comparisons(s: Section, data: dict[str, Any], found: tuple[Table, str] | None, compared: int) -> None:
    """The per-task paired comparisons of an ablation or sweep table and their method note; a run
    whose file predates them, or whose items could not be paired, gets a Missing line saying so."""
    if found is not None:
        s.table(found[0])
        s.note(found[1])
    elif data.get("comparison_error"):
        s.missing.append(f"paired comparisons: {data['comparison_error']}")
    elif compared:
        s.missing.append(
            "paired comparisons: not in this file; run the analysis again (it reuses the evaluations)"
        )


def ablation_section(run: Path) -> Section:
    s = Section("ablation", "Stage ablation")
    data = s.load(run, "ablation/ablation.json")
    if isinstance(data, dict):
        s.note(
            f"Recipe {data.get('recipe', '?')}, base model {data.get('base_model', '?')}, {when(data.get('created', ''))}."
        )
        s.table(ablation_table(data))
        ok = [v for v in data.get("variants", []) if v.get("status", "ok") == "ok"]
        compared = len(ok) - 1 if any(v.get("name") == "base" for v in ok) else 0
        comparisons(s, data, ablation_comparisons(data), compared)
        for v in data.get("variants", []):
            if v.get("status", "ok") != "ok":
                s.missing.append(
                    f"{v.get('label', v.get('name'))}: {v.get('status')} — {v.get('reason', '')}"
                )
    else:
        s.missing.append("run `hippo ablate RECIPE` to compare base, +CPT, +SFT, +CPT+SFT and +CPT+SFT+DPO")
    return s


def sweep_section(run: Path) -> Section:
    s = Section("prompting", "Prompting strategies")
    data = s.load(run, "sweep/sweep.json")
    if isinstance(data, dict):
        s.note(f"Model {short_path(data.get('model', '?'), run)}, {when(data.get('created', ''))}.")
        s.table(sweep_table(data))
        comparisons(s, data, sweep_comparisons(data), len(data.get("rows", [])) - 1)
    else:
        s.missing.append("run `hippo eval --sweep ...` with output in RUN_DIR/sweep to compare prompts")
    return s


def _samples_of(run: Path, d: Path, s: Section) -> list[Path]:
    """The samples files of one eval run in results.json's task order; absent ones are reported."""
    try:
        res = read_json(d / "results.json") if (d / "results.json").is_file() else {}
        tasks = list(res.get("tasks") or {}) if isinstance(res, dict) else []
    except HippoError:
        tasks = []
    paths = []
    for task in tasks:
        if (d / f"samples_{task}.jsonl").is_file():
            paths.append(d / f"samples_{task}.jsonl")
        else:
            s.missing.append(f"{_rel(d, run)}/samples_{task}.jsonl: not found")
    return paths + sorted(p for p in d.glob("samples_*.jsonl") if p not in paths)


def calibration_section(run: Path, n_bins: int = cal.DEFAULT_BINS) -> Section:
    """ECE/MCE/Brier table, reliability diagrams and confidence densities per task, stage and shots."""
    s = Section("calibration", "Calibration")
    groups = [("final model", d) for _, d in eval_runs(run / "eval")]
    groups += [(label, folder) for _, label, _, folder in variant_runs(run)]
    answered = [(label, d) for label, d in groups if generative(_quiet_json(d / "results.json"))]
    groups = [g for g in groups if g not in answered]
    if answered:
        s.note(
            f"Not calibrated: {', '.join(f'{label} ({_rel(d, run)})' for label, d in answered)}, generative "
            "evaluations, which give no probability over the options; calibration applies to log-likelihood results."
        )
    if not groups:
        if not answered:
            s.missing.append("eval/<K>shot/samples_<task>.jsonl: no evaluation samples to calibrate")
        return s
    s.note(
        f"Confidence = max softmax probability over the options' summed log-likelihoods. ECE and MCE use "
        f"{n_bins} equal-width bins, ECE (mass) {n_bins} equal-mass bins; Brier is multi-class (0 to 2). "
        "Temperature scaling is fitted on a hash-based half of each task and reported on the other half."
    )
    rows, figures = [], []
    for label, d in groups:
        reliability, densities = [], []
        for path in _samples_of(run, d, s):
            try:
                (row,) = cal.calibration_table([path], n_bins=n_bins)
                samples, _ = cal.load_samples(path)
            except HippoError as exc:
                s.missing.append(f"{_rel(path, run)}: unreadable ({str(exc).split(': ', 1)[-1]})")
                continue
            rows.append([label, row["shots"], row["task"], row["n"], row["acc"], row["confidence"], row["ece"],
                         row["ece_mass"], row["mce"], row["brier"], row["nll"], row.get("ts_temperature"),
                         row.get("ts_ece_before"), row.get("ts_ece_after")])  # fmt: skip
            conf, hit = cal.outcomes(samples)
            reliability.append((row["task"], cal.reliability_bins(conf, hit, n_bins), row["ece"]))
            densities.append((row["task"], conf[hit == 1], conf[hit == 0]))
        if reliability:
            figures.append((f"{label}, {d.name}", reliability, densities))
    headers = ["Stage", "Shots", "Task", "n", "acc (%)", "mean conf", "ECE", "ECE (mass)", "MCE", "Brier", "NLL",
               "T (fit)", "ECE test", "ECE test after T"]  # fmt: skip
    s.table(Table(headers, rows, percent={4}))
    for title, reliability, densities in figures:
        s.heading(title, markdown=False)
        s.figures([
            (plots.reliability_diagram(reliability, f"Reliability: {title}"), f"Reliability diagrams, {title}"),
            (plots.confidence_density(densities, f"Confidence: {title}"), f"Confidence on correct vs incorrect, {title}"),
        ])  # fmt: skip
    return s
