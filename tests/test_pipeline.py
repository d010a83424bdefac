"""``hippo pipeline``: stage order, skip-when-unchanged, --from, --stages, stages that have not landed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hippocrates import pipeline
from hippocrates.cli import main
from hippocrates.data.io import read_jsonl
from test_stages_helpers import make_recipe, write_jsonl


def run_pipeline(capsys, recipe: Path, *args: str) -> dict[str, str]:
    """Run ``hippo pipeline`` and return each stage's status from OUTPUT/pipeline.json."""
    code = main(["pipeline", str(recipe), *args, "--report-to", "none"])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    assert "pipeline test: output in" in out.out
    rows = json.loads((recipe.parent / "out" / "pipeline.json").read_text())
    return {r["stage"]: r["status"] for r in rows} | {"_stdout": out.out}


@pytest.fixture
def fake_eval(monkeypatch):
    """Stand-in for hippocrates.eval.runner.evaluate: records its calls and writes results.json."""
    calls = []

    def evaluate(model, tasks, *, output_dir=None, num_fewshot=0, **kwargs):
        calls.append({"model": model, "num_fewshot": num_fewshot, "output_dir": Path(output_dir)})
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        results = {"tasks": {t: {"acc": 0.25} for t in tasks}, "num_fewshot": num_fewshot}
        (Path(output_dir) / "results.json").write_text(json.dumps(results))
        return results

    real = pipeline.load_entry
    monkeypatch.setattr(pipeline, "load_entry", lambda stage: evaluate if stage == "eval" else real(stage))
    return calls


def test_pipeline_runs_in_order_skips_unchanged_and_reruns_from(tmp_path, tiny_llama_dir, capsys, fake_eval):
    recipe = make_recipe(
        tmp_path,
        tiny_llama_dir,
        **{"eval": {"enabled": True, "tasks": ["medqa"], "num_fewshot": [0, 2]}},
    )
    out = tmp_path / "out"
    first = run_pipeline(capsys, recipe)
    assert [first[s] for s in ("cpt", "sft", "dpo", "eval")] == ["ran"] * 4
    assert first["annotate"].startswith("disabled")
    assert [c["output_dir"] for c in fake_eval] == [out / "eval" / "0shot", out / "eval" / "2shot"]
    assert all(c["model"] == str(out / "dpo") for c in fake_eval), "eval runs on the final model"
    sft_manifest = json.loads((out / "sft" / "manifest.json").read_text())
    assert sft_manifest["input_model"]["path"] == str(out / "cpt"), "SFT trains the merged CPT model"
    assert json.loads((out / "dpo" / "manifest.json").read_text())["input_model"]["path"] == str(out / "sft")

    second = run_pipeline(capsys, recipe)
    assert [second[s] for s in ("cpt", "sft", "dpo", "eval")] == ["skipped: unchanged"] * 4
    assert len(fake_eval) == 2

    # new SFT data: SFT reruns, and so does everything downstream of it; CPT does not
    general = tmp_path / "data" / "general.jsonl"
    write_jsonl(general, [*read_jsonl(general), {"instruction": "New?", "input": "", "output": "Yes."}])
    third = run_pipeline(capsys, recipe)
    assert (third["cpt"], third["sft"], third["dpo"], third["eval"]) == (
        "skipped: unchanged",
        "ran",
        "ran",
        "ran",
    )

    fourth = run_pipeline(capsys, recipe, "--from", "dpo")
    assert (fourth["cpt"], fourth["sft"], fourth["dpo"]) == (
        "skipped: unchanged",
        "skipped: unchanged",
        "ran",
    )

    only = run_pipeline(capsys, recipe, "--stages", "eval")
    assert only["cpt"].startswith("not selected") and only["eval"] == "skipped: unchanged"


def test_unlanded_stage_is_skipped_and_counted(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    monkeypatch.setitem(pipeline.EXTERNAL, "report", ("hippocrates.report.not_landed_yet", "build_report"))
    recipe = make_recipe(
        tmp_path, tiny_llama_dir, **{"stages.cpt.enabled": False, "stages.sft.enabled": False}
    )
    rows = run_pipeline(capsys, recipe, "--stages", "report")
    assert rows["report"] == "skipped: not landed"
    assert rows["dpo"].startswith("not selected")
    assert "1 skipped because not landed: report" in rows["_stdout"]


def test_missing_annotate_fails_clearly_before_dpo(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    monkeypatch.setitem(pipeline.EXTERNAL, "annotate", ("hippocrates.rlaif.not_landed_yet", "run_annotate"))
    recipe = make_recipe(
        tmp_path,
        tiny_llama_dir,
        **{
            "stages.cpt.enabled": False,
            "stages.sft.enabled": False,
            "stages.annotate": {},
            "stages.dpo.data": [],
        },
    )
    assert main(["pipeline", str(recipe), "--report-to", "none"]) == 2
    err = capsys.readouterr().err
    assert "annotate skipped: hippocrates.rlaif.not_landed_yet has not landed" in err
    assert "preferences.jsonl: no preference data; run the annotate stage first" in err
    assert "Traceback" not in err


def test_pipeline_refuses_another_runs_output(tmp_path, tiny_llama_dir, capsys):
    first = make_recipe(tmp_path / "a", tiny_llama_dir, output_dir=str(tmp_path / "shared"))
    (tmp_path / "shared" / "sft").mkdir(parents=True)
    (tmp_path / "shared" / "sft" / "manifest.json").write_text(
        json.dumps({"stage": "sft", "recipe_name": "other"})
    )
    assert main(["pipeline", str(first)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "another run (recipe 'other')" in err[-1]
    assert not (tmp_path / "shared" / "cpt").exists()


def test_bad_stage_names(tmp_path, tiny_llama_dir, capsys):
    recipe = make_recipe(tmp_path, tiny_llama_dir)
    assert main(["pipeline", str(recipe), "--stages", "cpt,bogus"]) == 2
    assert "unknown stage 'bogus'" in capsys.readouterr().err
    assert main(["pipeline", str(recipe), "--stages", "annotate"]) == 2
    assert "annotate is disabled" in capsys.readouterr().err


def test_dry_run_answers_and_plans(tmp_path, tiny_llama_dir, capsys):
    recipe = make_recipe(tmp_path, tiny_llama_dir)
    assert main(["pipeline", str(recipe), "--dry-run", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "Q: " in out and "1. cpt" in out and "4. report" in out
    assert not (tmp_path / "out").exists()


def test_pipeline_runs_the_analyses_before_the_report(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    """analyses.ablation / analyses.sweep slot in after eval; the sweep gets only its tasks' files."""
    calls: dict[str, list] = {"ablate": [], "sweep": []}

    def ablate(recipe, *, shots, limit, force_eval):
        calls["ablate"].append({"shots": shots, "limit": limit, "force": force_eval})
        row = {"name": "base", "label": "Base", "status": "ok", "average": 0.5, "reused_eval": False}
        return {"variants": [row]}

    def sweep(model, tasks, data, prompts, chats, shots, out_dir, **kwargs):
        calls["sweep"].append({"model": model, "tasks": tasks, "data": data, "shots": shots, **kwargs})
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        row = {"prompt": "letter", "chat_template": False, "num_fewshot": 0, "average": 0.5}
        (Path(out_dir) / "sweep.json").write_text(json.dumps({"rows": [row]}))

    real = pipeline.load_entry
    monkeypatch.setattr(
        pipeline, "load_entry", lambda stage: {"ablate": ablate, "sweep": sweep}.get(stage) or real(stage)
    )
    medqa, pubmedqa = tmp_path / "medqa.jsonl", tmp_path / "pubmedqa.json"
    medqa.write_text("{}\n")
    pubmedqa.write_text("{}")
    recipe = make_recipe(
        tmp_path,
        tiny_llama_dir,
        **{
            "stages.cpt.enabled": False,
            "stages.sft.enabled": False,
            "stages.dpo.enabled": False,
            "eval": {
                "enabled": False,
                "tasks": ["medqa", "pubmedqa"],
                "limit": 7,
                "data": {"medqa": str(medqa), "pubmedqa": str(pubmedqa)},
            },
            "analyses": {
                "ablation": {"enabled": True, "num_fewshot": 3},
                "sweep": {"enabled": True, "tasks": ["medqa"], "num_fewshot": [0, 1]},
            },
        },  # fmt: skip
    )
    first = run_pipeline(capsys, recipe)
    assert (first["ablate"], first["sweep"], first["report"]) == ("ran", "ran", "ran")
    assert calls["ablate"] == [{"shots": 3, "limit": None, "force": False}]
    (call,) = calls["sweep"]
    assert call["model"] == str(tiny_llama_dir) and call["tasks"] == ["medqa"] and call["shots"] == [0, 1]
    assert call["data"] == {"medqa": str(medqa)} and call["limit"] == 7
    assert "best letter-plain 0-shot 0.500" in first["_stdout"]
    assert "## Prompting strategies" in (tmp_path / "out" / "report" / "report.md").read_text()
    assert f"report: {tmp_path / 'out' / 'report' / 'report.html'} (open it" in first["_stdout"]

    second = run_pipeline(capsys, recipe)
    assert second["sweep"] == "skipped: unchanged" and len(calls["sweep"]) == 1
    again = run_pipeline(capsys, recipe, "--from", "ablate")
    assert again["sweep"] == "ran" and calls["ablate"][-1]["force"] is True
