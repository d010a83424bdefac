"""Stage ablation and prompting sweep orchestration, with fake stage and eval functions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hippocrates.ablate import Runners, run_ablation
from hippocrates.cli import main
from hippocrates.config import parse_recipe, recipe_to_dict
from hippocrates.errors import HippoError
from hippocrates.report.sweep import run_sweep

# accuracy of each fake model, by the directory it lives in
SKILL = {
    "base-model": 0.25,
    "smollm2-135m": 0.25,
    "cpt": 0.30,
    "sft_from_base": 0.40,
    "sft": 0.50,
    "dpo": 0.55,
}


def _recipe(tmp_path: Path, extra: str = ""):
    text = f"""
name: t
base_model: smollm2-135m
output_dir: {tmp_path / "out"}
stages:
  cpt: {{data: [{{path: cpt.jsonl}}]}}
  sft: {{data: [{{path: sft.jsonl}}]}}
{extra}
eval: {{tasks: [medqa, pubmedqa], num_fewshot: [0, 5], prompt: letter}}
"""
    return parse_recipe(text, "recipe.yaml")


class Fakes:
    """Fake stages that write what CONTRACTS.md promises, and a fake evaluate; calls are logged."""

    def __init__(self, tmp_path: Path, fail: str | None = None) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.base = tmp_path / "base-model"
        self.fail = fail

    def stage(self, name: str):
        def run(recipe, model_path: str, out_dir: Path) -> dict:
            self.calls.append(
                (name, Path(model_path).name, str(Path(out_dir).relative_to(recipe.output_dir)))
            )
            if name == self.fail:
                raise HippoError(f"{name}: out of patience")
            out_dir.mkdir(parents=True, exist_ok=True)
            marker = "preferences.jsonl" if name == "annotate" else "config.json"
            (out_dir / marker).write_text("{}\n")
            manifest = {"stage": name, "model_path": model_path, "config": recipe_to_dict(recipe)}
            (out_dir / "manifest.json").write_text(json.dumps(manifest))
            return {"stage": name}

        return run

    def evaluate(self, model: str, tasks: list[str], **kw: Any) -> dict:
        self.calls.append(("eval", Path(model).name, str(kw["num_fewshot"])))
        acc = SKILL[Path(model).name]
        res = {"model": model, "num_fewshot": kw["num_fewshot"], "prompt": kw["prompt"],
               "chat_template": kw["chat_template"],
               "tasks": {t: {"acc": acc + 0.1 * i, "acc_norm": acc, "n": 10} for i, t in enumerate(tasks)}}  # fmt: skip
        kw["output_dir"].mkdir(parents=True, exist_ok=True)
        (kw["output_dir"] / "results.json").write_text(json.dumps(res))
        return res

    def runners(self) -> Runners:
        return Runners(
            cpt=self.stage("cpt"), sft=self.stage("sft"), annotate=self.stage("annotate"), dpo=self.stage("dpo"),
            evaluate=self.evaluate, resolve=lambda spec: str(self.base),
        )  # fmt: skip


def test_ablation_trains_each_model_once_and_builds_the_table(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    data = run_ablation(_recipe(tmp_path), runners=fakes.runners())
    trains = [c for c in fakes.calls if c[0] != "eval"]
    assert trains == [
        ("cpt", "base-model", "cpt"),
        ("sft", "base-model", "ablation/sft_from_base"),
        ("sft", "cpt", "sft"),
        ("annotate", "sft", "annotate"),
        ("dpo", "sft", "dpo"),
    ]
    assert [c[1] for c in fakes.calls if c[0] == "eval"] == [
        "smollm2-135m",
        "cpt",
        "sft_from_base",
        "sft",
        "dpo",
    ]
    assert all(c[2] == "0" for c in fakes.calls if c[0] == "eval")  # the recipe's first shot count
    assert [v["label"] for v in data["variants"]] == ["Base", "+CPT", "+SFT", "+CPT+SFT", "+CPT+SFT+DPO"]
    dpo = data["variants"][-1]
    assert dpo["acc"] == {"medqa": 0.55, "pubmedqa": pytest.approx(0.65)}
    assert dpo["average"] == pytest.approx(0.60)

    out = tmp_path / "out" / "ablation"
    assert json.loads((out / "ablation.json").read_text())["variants"][-1]["average"] == pytest.approx(0.60)
    md = (out / "ablation.md").read_text()
    assert "| Model | medqa | pubmedqa | Average | Δ avg vs base | Status |" in md
    assert "| +CPT+SFT+DPO | 55.0 | 65.0 | 60.0 | +30.0 | ok |" in md
    assert (out / "ablation.csv").read_text().splitlines()[2].startswith("+CPT,0.3,0.4,0.35,0.05")
    assert (out / "eval" / "cpt_sft_dpo" / "0shot" / "results.json").is_file()


def test_rerun_reuses_models_and_evals_and_retrains_what_changed(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    run_ablation(_recipe(tmp_path), runners=fakes.runners())
    fakes.calls.clear()
    data = run_ablation(_recipe(tmp_path), runners=fakes.runners())
    assert fakes.calls == []
    assert all(v["reused_eval"] for v in data["variants"])

    changed = _recipe(tmp_path, "  annotate: {max_prompts: 7}")
    run_ablation(changed, runners=fakes.runners())
    assert [c for c in fakes.calls if c[0] != "eval"] == [
        ("annotate", "sft", "annotate"),
        ("dpo", "sft", "dpo"),
    ]
    assert [c[1] for c in fakes.calls if c[0] == "eval"] == ["dpo"]

    fakes.calls.clear()
    data = run_ablation(changed, shots=5, variants=["base", "cpt"], runners=fakes.runners())
    assert fakes.calls == [("eval", "smollm2-135m", "5"), ("eval", "cpt", "5")]
    assert data["num_fewshot"] == 5 and len(data["variants"]) == 2


def test_disabled_stages_skip_variants_and_failures_are_recorded(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    recipe = _recipe(tmp_path, "  annotate: {enabled: false}")
    recipe.stages.cpt.enabled = False
    data = run_ablation(recipe, runners=fakes.runners())
    status = {v["name"]: (v["status"], v.get("reason")) for v in data["variants"]}
    assert status["base"] == ("ok", None) and status["sft_from_base"] == ("ok", None)
    assert status["cpt"] == ("skipped", "stages.cpt.enabled is false in the recipe")
    assert status["cpt_sft_dpo"][0] == "skipped"

    failing = Fakes(tmp_path / "again", fail="dpo")
    data = run_ablation(_recipe(tmp_path / "again"), runners=failing.runners())
    assert [v["status"] for v in data["variants"]] == ["ok", "ok", "ok", "ok", "failed"]
    assert data["variants"][-1]["reason"] == "dpo: out of patience"
    assert (
        "| +CPT+SFT+DPO | — | — | — | — | failed |"
        in (tmp_path / "again" / "out" / "ablation" / "ablation.md").read_text()
    )


def test_bad_arguments(tmp_path: Path, capsys) -> None:
    with pytest.raises(HippoError, match="unknown variant"):
        run_ablation(_recipe(tmp_path), variants=["cpt", "nope"], runners=Fakes(tmp_path).runners())
    assert main(["ablate", str(tmp_path / "missing.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_sweep_runs_every_combination(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    base = str(tmp_path / "sft")
    data = run_sweep(base, ["medqa"], None, ["hippocrates", "letter"], [False, True], [0, 3], tmp_path / "sweep",
                     evaluate=fakes.evaluate)  # fmt: skip
    assert len(fakes.calls) == 8 and len(data["rows"]) == 8
    assert [(r["prompt"], r["chat_template"], r["num_fewshot"]) for r in data["rows"]][:3] == [
        ("hippocrates", False, 0), ("hippocrates", False, 3), ("hippocrates", True, 0)
    ]  # fmt: skip
    assert (tmp_path / "sweep" / "letter-chat" / "3shot" / "results.json").is_file()
    md = (tmp_path / "sweep" / "sweep.md").read_text()
    assert (
        "| Prompt | Chat template | Shots | medqa | Average |" in md
        and "| letter | yes | 3 | 50.0 | 50.0 |" in md
    )
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"][0]["acc"] == {"medqa": 0.5}
    with pytest.raises(HippoError, match="no prompts"):
        run_sweep(base, ["medqa"], None, [], [False], [0], tmp_path / "s2", evaluate=fakes.evaluate)
