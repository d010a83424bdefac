"""The stage ablation on a real tiny run: which models it reuses, what a changed recipe retrains,
and the prompting sweep's one load and reuse. Every model and result is made by the real code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from hippocrates.analyses.ablation import run_ablation
from hippocrates.analyses.stats import compare_to_baseline, load_outcomes
from hippocrates.analyses.sweep import run_sweep
from hippocrates.cli import main
from hippocrates.config import load_recipe
from hippocrates.errors import HippoError
from hippocrates.record import read_manifest

TRAINED = ("cpt", "sft", "grpo", "annotate", "dpo", "ablation/sft_from_base")


def fingerprints(out: Path) -> dict[str, str]:
    return {s: read_manifest(out / s).fingerprint for s in TRAINED}


def test_the_pipeline_ablation_has_every_variant(tiny_run):
    data = json.loads((tiny_run / "ablation" / "ablation.json").read_text())
    assert [v["name"] for v in data["variants"]] == [
        "base", "cpt", "sft_from_base", "cpt_sft", "cpt_sft_grpo", "cpt_sft_grpo_dpo"
    ]  # fmt: skip
    assert all(v["status"] == "ok" and v["n"]["medqa"] == 4 for v in data["variants"])
    final = data["variants"][-1]
    assert (
        final["reused_eval"] and final["results"] == "eval/0shot/results.json"
    )  # relative: the run can move
    assert read_manifest(tiny_run / "ablation" / "sft_from_base").input_model.path.endswith("tiny-llama0")
    assert "| +CPT+SFT+GRPO+DPO |" in (tiny_run / "ablation" / "ablation.md").read_text()


def test_the_ablation_compares_each_variant_with_the_base_model(tiny_run):
    data = json.loads((tiny_run / "ablation" / "ablation.json").read_text())
    base, *others = data["variants"]
    assert "comparison" not in base and "comparison_error" not in data
    found = {v["label"]: load_outcomes((tiny_run / v["results"]).parent) for v in data["variants"]}
    expected = compare_to_baseline(found.pop("Base"), found, baseline_name="Base")  # Holm across the 4
    assert [v["comparison"] for v in others] == json.loads(json.dumps(list(expected.values())))
    for v in others:
        avg = v["comparison"]["average"]
        assert avg["difference"] == pytest.approx(v["average"] - base["average"])
        assert avg["ci_low"] <= avg["difference"] <= avg["ci_high"] and avg["p_holm"] >= avg["p_mcnemar"]
        assert list(v["comparison"]["tasks"]) == data["tasks"] and v["comparison"]["resamples"] == 10_000
    csv_header = (tiny_run / "ablation" / "ablation.csv").read_text().splitlines()[0]
    assert csv_header.endswith(
        "Average,Δ avg vs base,95% CI low,95% CI high,CI excludes 0,McNemar p,Holm p,Holm p < 0.05,Status"
    )
    md = (tiny_run / "ablation" / "ablation.md").read_text()
    assert "**Stage ablation: each model against the base model, per task**" in md
    assert (
        "| +CPT | medqa | 4 |" in md
        and "Holm p: p adjusted across the table's 5 comparisons against Base" in md
    )


@pytest.fixture
def copied_run(tiny_run, tmp_path) -> Path:
    """The tiny run in a folder of its own, with its recipe pointing there."""
    shutil.copytree(tiny_run, tmp_path / "out")
    recipe = yaml.safe_load((tiny_run.parent / "recipe.yaml").read_text())
    recipe["output_dir"] = str(tmp_path / "out")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return tmp_path / "recipe.yaml"


def test_unchanged_rerun_trains_and_evaluates_nothing(copied_run):
    out = copied_run.parent / "out"
    before = fingerprints(out)
    data = run_ablation(load_recipe(copied_run))
    assert fingerprints(out) == before
    assert all(v["reused_eval"] and v["train_s"] == 0 for v in data["variants"])


def test_changed_lora_rank_and_learning_rate_retrain(copied_run):
    out = copied_run.parent / "out"
    before = fingerprints(out)
    recipe = yaml.safe_load(copied_run.read_text())
    recipe["stages"]["cpt"]["lora"]["r"] = 8
    recipe["stages"]["sft"]["train"]["learning_rate"] = 5e-4
    copied_run.write_text(yaml.safe_dump(recipe, sort_keys=False))
    data = run_ablation(load_recipe(copied_run))
    after = fingerprints(out)
    for stage in TRAINED:
        assert after[stage] != before[stage], f"{stage} was reused although its inputs changed"
    assert read_manifest(out / "cpt").config["lora"]["r"] == 8
    reused = {v["name"]: v["reused_eval"] for v in data["variants"]}
    assert reused == {
        "base": True,
        "cpt": False,
        "sft_from_base": False,
        "cpt_sft": False,
        "cpt_sft_grpo": False,
        "cpt_sft_grpo_dpo": False,
    }
    again = run_ablation(load_recipe(copied_run))
    assert fingerprints(out) == after and all(v["reused_eval"] for v in again["variants"])


def test_only_what_changed_is_retrained(copied_run):
    out = copied_run.parent / "out"
    before = fingerprints(out)
    recipe = yaml.safe_load(copied_run.read_text())
    recipe["stages"]["dpo"]["beta"] = 0.2
    copied_run.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_ablation(load_recipe(copied_run), variants=["cpt_sft_grpo_dpo"])
    after = fingerprints(out)
    assert [s for s in TRAINED if after[s] != before[s]] == ["dpo"]


def test_bad_arguments(tiny_run, tmp_path, capsys):
    with pytest.raises(HippoError, match="unknown variant"):
        run_ablation(load_recipe(tiny_run.parent / "recipe.yaml"), variants=["cpt", "nope"])
    assert main(["ablate", str(tmp_path / "missing.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_sweep_loads_the_model_once_and_reuses_combinations(tiny_llama_dir, tmp_path, monkeypatch):
    from conftest import DEMO
    from hippocrates.eval import runner

    loads = []
    real = runner.LoadedModel.load.__func__
    monkeypatch.setattr(
        runner.LoadedModel, "load", classmethod(lambda cls, *a, **k: loads.append(a) or real(cls, *a, **k))
    )
    data = {"medqa": str(DEMO / "benchmarks" / "medqa" / "US_4_options_test.jsonl")}
    first = run_sweep(str(tiny_llama_dir), ["medqa"], data, ["hippocrates", "letter"], [False, True], [0, 1],
                      tmp_path / "sweep", limit=2)  # fmt: skip
    assert len(first["rows"]) == 8 and first["evaluated"] == 8 and len(loads) == 1
    assert [(r["prompt"], r["chat_template"], r["num_fewshot"]) for r in first["rows"]][:3] == [
        ("hippocrates", False, 0), ("hippocrates", False, 1), ("hippocrates", True, 0)
    ]  # fmt: skip
    assert "| letter | yes | 1 |" in (tmp_path / "sweep" / "sweep.md").read_text()
    assert first["baseline"] == "hippocrates-plain-0shot" and first["rows"][0]["comparison"] is None
    found = {r["name"]: load_outcomes(tmp_path / "sweep" / f"{r['prompt']}-{'chat' if r['chat_template'] else 'plain'}"
                                      / f"{r['num_fewshot']}shot") for r in first["rows"]}  # fmt: skip
    expected = compare_to_baseline(
        found.pop("hippocrates-plain-0shot"), found, baseline_name="hippocrates-plain-0shot"
    )
    assert [r["comparison"] for r in first["rows"][1:]] == list(expected.values())
    assert (
        "each combination against the baseline, hippocrates-plain-0shot"
        in (tmp_path / "sweep" / "sweep.md").read_text()
    )
    again = run_sweep(str(tiny_llama_dir), ["medqa"], data, ["hippocrates", "letter"], [False, True], [0, 1],
                      tmp_path / "sweep", limit=2)  # fmt: skip
    assert again["evaluated"] == 0 and len(loads) == 1 and again["rows"] == first["rows"]
    named = run_sweep(str(tiny_llama_dir), ["medqa"], data, ["hippocrates", "letter"], [False, True], [0, 1],
                      tmp_path / "sweep", limit=2, baseline="letter-chat-1shot")  # fmt: skip
    assert named["evaluated"] == 0 and named["rows"][-1]["comparison"] is None
    assert named["rows"][0]["comparison"]["a"] == "letter-chat-1shot"
    with pytest.raises(HippoError, match="baseline 'letter-1shot' is not a combination"):
        run_sweep(
            str(tiny_llama_dir),
            ["medqa"],
            data,
            ["letter"],
            [False],
            [1],
            tmp_path / "s3",
            baseline="letter-1shot",
        )
    with pytest.raises(HippoError, match="no prompts"):
        run_sweep(str(tiny_llama_dir), ["medqa"], None, [], [False], [0], tmp_path / "s2")


def test_variants_are_evaluated_in_one_precision(copied_run):
    """eval.precision auto sends a model whose 16-bit weights lose its stage's effect to fp32; the
    ablation then runs every variant in fp32, so base and trained models differ only by training."""
    from hippocrates.models import precision_for

    recipe = yaml.safe_load(copied_run.read_text())
    recipe["precision"] = "bf16"
    recipe.setdefault("eval", {})["precision"] = "auto"
    copied_run.write_text(yaml.safe_dump(recipe, sort_keys=False))
    data = run_ablation(load_recipe(copied_run))
    ok = [v for v in data["variants"] if v["status"] == "ok"]
    alone = {v["name"]: precision_for(v["model_path"], "bf16")[0] for v in ok}
    assert set(alone.values()) == {"bf16", "fp32"}, alone  # on their own, the variants would mix
    assert {v["precision"] for v in ok} == {"fp32"}
    assert all(
        json.loads((copied_run.parent / "out" / v["results"]).read_text())["precision"] == "fp32" for v in ok
    )


def test_a_task_named_by_its_yaml_path_is_reported_by_its_name(tiny_llama_dir, tmp_path):
    """Recipes may name a task by a YAML file; the sweep's rows and table use the task's own name."""
    from conftest import DEMO

    task = tmp_path / "quiz.yaml"
    task.write_text("task: quiz\nformat: medqa\nfile: medqa/US_4_options_test.jsonl\n")
    data = {"quiz": str(DEMO / "benchmarks" / "medqa" / "US_4_options_test.jsonl")}
    out = run_sweep(str(tiny_llama_dir), [str(task)], data, ["hippocrates", "letter"], [False], [0],
                    tmp_path / "sweep", limit=3)  # fmt: skip
    assert out["tasks"] == ["quiz"]
    assert all(r["n"] == {"quiz": 3} and isinstance(r["acc"]["quiz"], float) for r in out["rows"])
    assert (
        "| Prompt | Chat template | Shots | quiz | Average |" in (tmp_path / "sweep" / "sweep.md").read_text()
    )


def test_standalone_stages_take_the_model_the_pipeline_chains(copied_run):
    """hippo annotate / dpo on their own start from the latest earlier stage, as the pipeline does
    (here GRPO after SFT); with GRPO off, from SFT."""
    from hippocrates.stages.cli import default_input_model

    out = copied_run.parent / "out"
    recipe = load_recipe(copied_run)
    assert recipe.stages.grpo.after == "sft"
    assert default_input_model(recipe, "annotate") == str(out / "grpo")
    assert default_input_model(recipe, "dpo") == str(out / "grpo")
    assert default_input_model(recipe, "sft") == str(out / "cpt")
    raw = yaml.safe_load(copied_run.read_text())
    raw["stages"]["grpo"]["enabled"] = False
    copied_run.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert default_input_model(load_recipe(copied_run), "annotate") == str(out / "sft")


def test_every_stage_the_pipeline_trains_has_its_row(copied_run):
    """Later stages sit on the stages the recipe enables: without CPT and SFT, GRPO trains from the base
    and is compared with it as "+GRPO"; without CPT, "+SFT+GRPO"; a disabled DPO keeps a skipped row."""
    from hippocrates.analyses.ablation import variants_of

    raw = yaml.safe_load(copied_run.read_text())
    raw["stages"]["cpt"]["enabled"] = False
    copied_run.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert [v.label for v in variants_of(load_recipe(copied_run))][4:] == ["+SFT+GRPO", "+SFT+GRPO+DPO"]
    raw["stages"]["sft"]["enabled"] = False
    raw["stages"]["dpo"]["enabled"] = False
    raw["stages"]["annotate"]["enabled"] = False
    copied_run.write_text(yaml.safe_dump(raw, sort_keys=False))
    data = run_ablation(load_recipe(copied_run))
    rows = {v["label"]: v for v in data["variants"]}
    assert list(rows)[4:] == ["+GRPO", "+GRPO+DPO"]
    assert rows["+GRPO"]["status"] == "ok" and rows["+GRPO+DPO"]["status"] == "skipped"
    grpo = read_manifest(copied_run.parent / "out" / "grpo")
    assert grpo.input_model.path == raw["base_model"]
    assert "| +GRPO | medqa |" in (copied_run.parent / "out" / "ablation" / "ablation.md").read_text()
