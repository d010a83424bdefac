"""``hippo pipeline`` on a tiny model, all real code: stage order, skip-when-unchanged, --from,
--stages, the analyses before the report, checks before any work, and another run's output."""

from __future__ import annotations

import json
from pathlib import Path

from hippocrates.cli import main
from hippocrates.record import read_manifest
from test_stages_helpers import full_recipe, make_recipe


def run_pipeline(capsys, recipe: Path, *args: str) -> dict[str, str]:
    """Run ``hippo pipeline`` and return each stage's status from OUTPUT/pipeline.json."""
    code = main(["pipeline", str(recipe), *args, "--report-to", "none"])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    assert "pipeline test: output in" in out.out
    rows = json.loads((recipe.parent / "out" / "pipeline.json").read_text())
    return {r["stage"]: r["status"] for r in rows} | {"_stdout": out.out, "_stderr": out.err}


def test_whole_run_layout_and_chain(tiny_run):
    out = tiny_run
    rows = {r["stage"]: r for r in json.loads((out / "pipeline.json").read_text())}
    steps = ("cpt", "sft", "grpo", "annotate", "dpo", "eval", "ablate", "sweep", "report")
    assert [rows[s]["status"] for s in steps] == ["ran"] * 9
    assert list(rows) == list(steps), "GRPO runs after SFT, before annotation and DPO"
    assert read_manifest(out / "sft").input_model.path == str(out / "cpt"), "SFT trains the merged CPT model"
    assert read_manifest(out / "grpo").input_model.path == str(out / "sft")
    assert read_manifest(out / "annotate").input_model.path == str(out / "grpo")
    assert read_manifest(out / "dpo").input_model.path == str(out / "grpo")
    assert read_manifest(out / "dpo").data[0]["path"] == str(out / "annotate" / "preferences.jsonl")
    for shots in (0, 1):
        manifest = read_manifest(out / "eval" / f"{shots}shot")
        assert manifest.stage == "eval" and manifest.input_model.path == str(out / "dpo"), (
            "eval runs the final model"
        )
        assert manifest.config["num_fewshot"] == shots
    assert (out / "report" / "report.html").is_file() and (out / "ablation" / "ablation.json").is_file()
    assert not (out / ".hippo.lock").exists(), "a finished run leaves no lock behind"
    assert not list(out.glob(".*.work")), "checkpoint folders are removed after success"


def test_unchanged_rerun_skips_everything_and_from_reruns(tmp_path, tiny_llama_dir, capsys):
    recipe = make_recipe(tmp_path, tiny_llama_dir, **{"eval": {"enabled": True, "tasks": ["medqa"], "num_fewshot": [0],
                                                             "limit": 2, "data": {"medqa": full_data("medqa")}}})  # fmt: skip
    first = run_pipeline(capsys, recipe)
    assert [first[s] for s in ("cpt", "sft", "dpo", "eval")] == ["ran"] * 4
    second = run_pipeline(capsys, recipe)
    assert [second[s] for s in ("cpt", "sft", "dpo", "eval")] == ["skipped: unchanged"] * 4
    fingerprints = {s: read_manifest(tmp_path / "out" / s).fingerprint for s in ("cpt", "sft", "dpo")}
    third = run_pipeline(capsys, recipe, "--from", "sft")
    assert third["cpt"] == "skipped: unchanged" and third["sft"] == "ran" and third["dpo"] == "ran"
    assert read_manifest(tmp_path / "out" / "cpt").fingerprint == fingerprints["cpt"]
    assert read_manifest(tmp_path / "out" / "dpo").fingerprint != fingerprints["dpo"]
    assert third["eval"] == "ran" and read_manifest(
        tmp_path / "out" / "eval" / "0shot"
    ).input_model.fingerprint == (read_manifest(tmp_path / "out" / "dpo").fingerprint)
    only = run_pipeline(capsys, recipe, "--stages", "eval")
    assert only["cpt"].startswith("not selected") and only["eval"] == "skipped: unchanged"


def full_data(task: str) -> str:
    from test_stages_helpers import EVAL_DATA

    return EVAL_DATA[task]


def test_a_missing_eval_file_fails_before_any_training(tmp_path, tiny_llama_dir, capsys):
    recipe = make_recipe(tmp_path, tiny_llama_dir, **{"eval": {"enabled": True, "tasks": ["medqa"],
                                                             "data": {"medqa": str(tmp_path / "gone.jsonl")}}})  # fmt: skip
    for args in ([], ["--dry-run"]):
        assert main(["pipeline", str(recipe), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            len(err) == 1
            and "recipe.yaml:" in err[0]
            and "eval.data.medqa" in err[0]
            and "gone.jsonl: file not found" in err[0]
        )
    assert not (tmp_path / "out").exists()


def test_pipeline_refuses_another_runs_output(tmp_path, tiny_llama_dir, capsys):
    first = make_recipe(tmp_path / "a", tiny_llama_dir, output_dir=str(tmp_path / "shared"),
                        **{"stages.sft.enabled": False, "stages.dpo.enabled": False})  # fmt: skip
    assert main(["pipeline", str(first), "--report-to", "none"]) == 0
    capsys.readouterr()
    other = make_recipe(tmp_path / "b", tiny_llama_dir, name="other", output_dir=str(tmp_path / "shared"))
    before = read_manifest(tmp_path / "shared" / "cpt").fingerprint
    assert main(["pipeline", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another run (recipe 'test')" in err[0] and "--overwrite" in err[0]
    assert read_manifest(tmp_path / "shared" / "cpt").fingerprint == before


def test_bad_stage_names(tmp_path, tiny_llama_dir, capsys):
    recipe = make_recipe(tmp_path, tiny_llama_dir)
    assert main(["pipeline", str(recipe), "--stages", "cpt,bogus"]) == 2
    assert "unknown stage 'bogus'" in capsys.readouterr().err
    assert main(["pipeline", str(recipe), "--stages", "annotate"]) == 2
    assert "annotate is disabled" in capsys.readouterr().err


def test_dry_run_checks_answers_and_plans(tmp_path, tiny_llama_dir, capsys):
    recipe = full_recipe(tmp_path, tiny_llama_dir)
    assert main(["pipeline", str(recipe), "--dry-run", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "Q: " in out and "1. cpt" in out and "9. report" in out and "checked" in out
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
