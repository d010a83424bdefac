"""The stage ablation on a real tiny run: which models it reuses, what a changed recipe retrains,
and the prompting sweep's one load and reuse. Every model and result is made by the real code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from hippocrates.analyses.ablation import run_ablation
from hippocrates.analyses.sweep import run_sweep
from hippocrates.cli import main
from hippocrates.config import load_recipe
from hippocrates.errors import HippoError
from hippocrates.record import read_manifest

TRAINED = ("cpt", "sft", "annotate", "dpo", "ablation/sft_from_base")


def fingerprints(out: Path) -> dict[str, str]:
    return {s: read_manifest(out / s).fingerprint for s in TRAINED}


def test_the_pipeline_ablation_has_every_variant(tiny_run):
    data = json.loads((tiny_run / "ablation" / "ablation.json").read_text())
    assert [v["name"] for v in data["variants"]] == ["base", "cpt", "sft_from_base", "cpt_sft", "cpt_sft_dpo"]
    assert all(v["status"] == "ok" and v["n"]["medqa"] == 4 for v in data["variants"])
    final = data["variants"][-1]
    assert (
        final["reused_eval"] and final["results"] == "eval/0shot/results.json"
    )  # relative: the run can move
    assert read_manifest(tiny_run / "ablation" / "sft_from_base").input_model.path.endswith("tiny-llama0")
    assert "| +CPT+SFT+DPO |" in (tiny_run / "ablation" / "ablation.md").read_text()


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
    for stage in ("cpt", "sft", "annotate", "dpo", "ablation/sft_from_base"):
        assert after[stage] != before[stage], f"{stage} was reused although its inputs changed"
    assert read_manifest(out / "cpt").config["lora"]["r"] == 8
    reused = {v["name"]: v["reused_eval"] for v in data["variants"]}
    assert reused == {
        "base": True,
        "cpt": False,
        "sft_from_base": False,
        "cpt_sft": False,
        "cpt_sft_dpo": False,
    }
    again = run_ablation(load_recipe(copied_run))
    assert fingerprints(out) == after and all(v["reused_eval"] for v in again["variants"])


def test_only_what_changed_is_retrained(copied_run):
    out = copied_run.parent / "out"
    before = fingerprints(out)
    recipe = yaml.safe_load(copied_run.read_text())
    recipe["stages"]["dpo"]["beta"] = 0.2
    copied_run.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_ablation(load_recipe(copied_run), variants=["cpt_sft_dpo"])
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
    again = run_sweep(str(tiny_llama_dir), ["medqa"], data, ["hippocrates", "letter"], [False, True], [0, 1],
                      tmp_path / "sweep", limit=2)  # fmt: skip
    assert again["evaluated"] == 0 and len(loads) == 1 and again["rows"] == first["rows"]
    with pytest.raises(HippoError, match="no prompts"):
        run_sweep(str(tiny_llama_dir), ["medqa"], None, [], [False], [0], tmp_path / "s2")
