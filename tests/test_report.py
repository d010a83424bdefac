"""The run report of a real (tiny) run, and of partial, empty and corrupted copies of it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from hippocrates.cli import main
from hippocrates.eval.calibration import calibration_table
from hippocrates.report.build import build_report
from hippocrates.report.tables import Table, ablation_table

SECTIONS = ["glance", "manifest", "training", "eval", "ablation", "prompting", "calibration"]


def _missing(html: str, section: str) -> str:
    """The text of one section's Missing notice ('' when it has none)."""
    body = re.search(rf'<section id="{section}">(.*?)</section>', html, re.S).group(1)
    notice = re.search(r'<div class="missing">(.*?)</div>', body, re.S)
    return notice.group(1) if notice else ""


@pytest.fixture(scope="module")
def full_report(tiny_run) -> tuple[Path, str, str]:
    """The report the pipeline wrote at the end of the tiny run."""
    path = tiny_run / "report" / "report.html"
    return tiny_run, path.read_text(encoding="utf-8"), (path.parent / "report.md").read_text(encoding="utf-8")


def partial(tiny_run: Path, where: Path, keep: tuple[str, ...]) -> Path:
    """A copy of the real run with only some of its folders (what a report must survive)."""
    where.mkdir(parents=True)
    for name in keep:
        shutil.copytree(tiny_run / name, where / name)
    return where


def test_full_run_report_is_self_contained_and_complete(full_report) -> None:
    run, html, md = full_report
    assert re.findall(r'<section id="(\w+)">', html) == SECTIONS
    assert 'class="missing"' not in html and "Missing" not in md
    # 4 training curves + (2 final-model shot counts + 6 ablation variants) x (reliability + density)
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == 4 + 8 * 2
    assert not re.search(r'(src|href)="(?!data:|#)', html)  # no file or network assets
    assert "<script" not in html and "default-src 'none'" in html
    assert sorted(p.name for p in (run / "report").iterdir()) == [
        "at_a_glance.csv",
        "report.html",
        "report.md",
    ]
    for text in (
        "| +CPT+SFT+GRPO+DPO |",
        "## Calibration",
        "| Package | cpt | sft | grpo | annotate | dpo |",
        "of the weight update kept",
    ):
        assert text in md
    manifest_rows = [line for line in md.splitlines() if line.startswith("| sft | ")]
    assert "| RUN/cpt |" in manifest_rows[0]  # the input model's path, not its fingerprint
    assert "Prompting strategies: accuracy (%)" in md and "| letter | no | 0 |" in md
    assert "Stage ablation: each model against the base model, per task" in md
    assert "Prompting strategies: each combination against the baseline, hippocrates-plain-0shot" in md
    assert md.count("Holm p: p adjusted across the table's") == 2


def test_report_numbers_match_the_sources(full_report) -> None:
    run, html, md = full_report
    ablation = json.loads((run / "ablation" / "ablation.json").read_text())
    base = ablation["variants"][0]
    assert f"| Base | {100 * base['acc']['medqa']:.1f} |" in md
    for v in ablation["variants"][1:]:
        avg = v["comparison"]["average"]
        section = md.split("## Stage ablation", 1)[1]
        row = next(x for x in section.splitlines() if x.startswith(f"| {v['label']} |"))
        assert f"| {100 * avg['ci_low']:+.1f} | {100 * avg['ci_high']:+.1f} | " in row
        medqa = v["comparison"]["tasks"]["medqa"]
        assert (f"| {v['label']} | medqa | 4 | {100 * medqa['accuracy_a']:.1f} | {100 * medqa['accuracy_b']:.1f} | "
                f"{100 * medqa['difference']:+.1f} |") in md  # fmt: skip
    results = json.loads((run / "eval" / "0shot" / "results.json").read_text())
    medqa = results["tasks"]["medqa"]
    assert f"| medqa | 4 | {100 * medqa['acc']:.1f} ± {100 * medqa['acc_stderr']:.1f} |" in md
    (row,) = calibration_table([run / "eval" / "0shot" / "samples_medqa.jsonl"])
    line = next(x for x in md.splitlines() if x.startswith("| final model | 0 | medqa |"))
    assert f"| {row['ece']:.3f} | {row['ece_mass']:.3f} | {row['mce']:.3f} | {row['brier']:.3f} |" in line


def test_partial_run_says_what_is_missing(tiny_run, tmp_path: Path) -> None:
    run = partial(tiny_run, tmp_path / "run", ("cpt", "sft"))
    html = build_report(run).read_text(encoding="utf-8")
    md = (run / "report" / "report.md").read_text(encoding="utf-8")
    assert "annotate/: stage output not found" in _missing(html, "manifest")
    assert "dpo/" in _missing(html, "training") and "cpt/" not in _missing(html, "training")
    assert "no evaluation of the final model yet" in _missing(html, "eval")
    assert "ablation/ablation.json: not found" in _missing(html, "ablation")
    assert "sweep/sweep.json: not found" in _missing(html, "prompting")
    assert "no evaluation samples" in _missing(html, "calibration")
    assert md.count("> **Missing:**") == 7  # every section, the at-a-glance one included
    assert html.count("<img") == 2  # the two training curves that exist


def test_empty_dir_and_corrupt_files_degrade_to_notices(tiny_run, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    html = build_report(empty).read_text(encoding="utf-8")
    assert all(_missing(html, s) for s in SECTIONS)

    run = partial(tiny_run, tmp_path / "run", ("cpt", "eval"))
    (run / "cpt" / "metrics.json").write_text('{"stage": "cpt", "log_history": [')  # a torn write
    (run / "eval" / "0shot" / "samples_pubmedqa.jsonl").unlink()
    with open(run / "eval" / "0shot" / "samples_usmle_step1.jsonl", "a") as fh:
        fh.write("{not json\n")
    (run / "sweep").mkdir()
    (run / "sweep" / "sweep.json").write_text("[1, 2]")  # valid JSON, wrong shape
    (run / "eval" / "1shot" / "results.json").write_bytes(b"\xff\xfe not utf-8")
    html = build_report(run).read_text(encoding="utf-8")
    md = (run / "report" / "report.md").read_text()
    assert "cpt/metrics.json: unreadable" in _missing(html, "training")
    assert "could not build" not in html and "| cpt | " in md
    calib = _missing(html, "calibration")
    assert "eval/0shot/samples_pubmedqa.jsonl: not found" in calib
    assert "samples_usmle_step1.jsonl: unreadable" in calib and "malformed JSON" in calib
    assert "sweep/sweep.json" in _missing(html, "prompting")
    assert "eval/1shot/results.json: unreadable" in _missing(html, "eval") and "not UTF-8" in _missing(
        html, "eval"
    )
    assert "| final model | 0 | medqa |" in md


def test_an_ablation_without_comparisons_says_so(tiny_run, tmp_path: Path) -> None:
    """An ablation.json written before the comparisons existed (the same file without them)."""
    run = partial(tiny_run, tmp_path / "run", ("ablation", "eval"))
    data = json.loads((run / "ablation" / "ablation.json").read_text())
    for v in data["variants"]:
        v.pop("comparison", None)
    (run / "ablation" / "ablation.json").write_text(json.dumps(data))
    html = build_report(run).read_text(encoding="utf-8")
    assert "paired comparisons: not in this file; run the analysis again" in _missing(html, "ablation")
    assert "| +CPT |" in (run / "report" / "report.md").read_text()


def test_cli(tiny_run, tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"hippo report: error: {tmp_path / 'nope'}: run directory not found"
    run = partial(tiny_run, tmp_path / "run", ("eval",))
    assert main(["report", str(run), "--output", str(tmp_path / "out"), "--bins", "5"]) == 0
    assert capsys.readouterr().out.split() == [
        str(tmp_path / "out" / "report.html"),
        str(tmp_path / "out" / "report.md"),
    ]
    assert "5 equal-width bins" in (tmp_path / "out" / "report.md").read_text()
    assert main(["report", str(run), "--bins", "0"]) == 2


def test_table_formatting() -> None:
    data = {
        "tasks": ["a", "b"],
        "num_fewshot": 0,
        "variants": [
            {"name": "base", "label": "Base", "status": "ok", "acc": {"a": 0.25, "b": 0.5}, "average": 0.375},
            {"name": "cpt", "label": "+CPT", "status": "ok", "acc": {"a": 0.3, "b": None}, "average": None},
            {"name": "x|y", "label": "x|y", "status": "skipped", "reason": "stages.dpo.enabled is false"},
        ],
    }
    table = ablation_table(data)
    md = table.markdown()
    assert "| Base | 25.0 | 50.0 | 37.5 | +0.0 | — | — | — | — | — | — | ok |" in md
    assert "| +CPT | 30.0 | — | — | — | — | — | — | — | — | — | ok |" in md
    assert "| x\\|y | — | — | — | — | — | — | — | — | — | — | skipped |" in md
    assert 'title="stages.dpo.enabled is false"' in table.html()
    assert table.csv().splitlines()[1] == "Base,0.25,0.5,0.375,0.0,,,,,,,ok"
    assert Table(["x"], [["<b>"]]).html().count("&lt;b&gt;") == 1


def test_at_a_glance_comes_first_with_intervals_and_significance(full_report) -> None:
    import csv
    import io

    from hippocrates.report.glance import accuracy_ci

    run, html, md = full_report
    first = md.split("## ")[1]
    assert first.startswith("At a glance") and "Accuracy (%) [exact 95% CI]" in first
    ablation = json.loads((run / "ablation" / "ablation.json").read_text())
    base = ablation["variants"][0]
    lo, hi = accuracy_ci(round(base["acc"]["pubmedqa"] * 4), 4)
    assert f"| Base | {100 * base['acc']['medqa']:.1f} [" in first
    assert f"{100 * base['acc']['pubmedqa']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" in first
    last = ablation["variants"][-1]
    diff = last["comparison"]["average"]
    assert f"| {last['label']} |" in first and f"{100 * diff['difference']:+.1f} [" in first
    assert (
        "| 0-shot, loglik, hippocrates prompt |" in first
        and "| GRPO | held-out generative accuracy |" in first
    )
    cpt = json.loads((run / "cpt" / "metrics.json").read_text())["eval_change"]
    assert (
        f"{cpt['nll_change']:+.3f} [{cpt['nll_change_ci_low']:+.3f}, {cpt['nll_change_ci_high']:+.3f}] over "
        f"{cpt['rows']} rows" in first.split("| CPT | held-out perplexity |")[1].splitlines()[0]
    )
    rows = list(csv.DictReader(io.StringIO((run / "report" / "at_a_glance.csv").read_text())))
    assert any(
        r["row"] == "cpt"
        and r["metric"] == "change"
        and abs(float(r["ci_low"]) - cpt["nll_change_ci_low"]) < 1e-4
        for r in rows
    )
    ablation_rows = [r for r in rows if r["table"] == "ablation"]
    assert len(ablation_rows) == len(ablation["variants"]) * (len(ablation["tasks"]) + 1)
    assert (
        float(next(r for r in ablation_rows if r["row"] == "Base" and r["task"] == "medqa")["value"])
        == base["acc"]["medqa"]
    )
    assert html.index('<section id="glance">') < html.index('<section id="manifest">')


def test_stages_the_recipe_disables_are_named_not_missing(tiny_llama_dir, tmp_path: Path) -> None:
    """A recipe that only evaluates: its report says which stages are off, and lists none as missing."""
    demo = Path(__file__).resolve().parents[1] / "data" / "demo" / "benchmarks"
    recipe = tmp_path / "eval-only.yaml"
    recipe.write_text(
        f"name: eval-only\nbase_model: {tiny_llama_dir}\noutput_dir: {tmp_path / 'out'}\n"
        "stages:\n  cpt: {enabled: false}\n  sft: {enabled: false}\n  annotate: {enabled: false}\n"
        "  dpo: {enabled: false}\n"
        f"eval:\n  tasks: [medqa]\n  data: {{medqa: {demo / 'medqa' / 'US_4_options_test.jsonl'}}}\n  limit: 2\n"
        "analyses:\n  ablation: {enabled: false}\n  sweep: {enabled: false}\n"
    )
    assert main(["pipeline", str(recipe), "--report-to", "none"]) == 0
    html = (tmp_path / "out" / "report" / "report.html").read_text(encoding="utf-8")
    assert "Disabled in the recipe: cpt, sft, grpo, annotate, dpo." in html
    assert "stage output not found" not in _missing(html, "manifest") + _missing(html, "training")
