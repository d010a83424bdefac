"""Recipes: the shipped ones validate; bad ones fail with one line naming file, line and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hippocrates.config import load_recipe, parse_recipe
from hippocrates.errors import HippoError

REPO = Path(__file__).resolve().parents[1]
GOOD = """\
name: t
base_model: smollm2-135m
output_dir: runs/t
stages:
  sft:
    lora: {r: 8}
    train: {learning_rate: 1.0e-4}
"""


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_shipped_recipes_validate(name: str):
    recipe = load_recipe(REPO / "recipes" / name)
    assert recipe.enabled_stages()[0] in {"cpt", "sft", "grpo"}


def test_defaults_are_filled():
    recipe = parse_recipe(GOOD)
    assert recipe.stages.sft.lora.r == 8
    assert recipe.stages.cpt.lora.target_modules == "all-linear"
    assert recipe.stages.dpo.beta == 0.1


BAD = [
    ("name: t\nbase_model: m\noutput_dir: o\nbogus: 1\n", ":4: bogus: unknown key"),
    ("name: t\nbase_model: m\n", "output_dir: required key is missing"),
    (
        "name: t\nbase_model: m\noutput_dir: o\nstages:\n  sft:\n    lora:\n      r: -1\n",
        ":7: stages.sft.lora.r",
    ),
    (
        "name: t\nbase_model: m\noutput_dir: o\nprecision: fp8\n",
        ":4: precision: invalid value 'fp8'; choose from",
    ),
    (
        "name: t\nbase_model: m\noutput_dir: o\nstages:\n  sft:\n    template: weird\n",
        "stages.sft.template: invalid value",
    ),
    (
        "name: t\nbase_model: m\noutput_dir: o\nstages:\n  cpt:\n    train:\n      batch_size: many\n",
        "stages.cpt.train.batch_size",
    ),
    (
        "name: t\nbase_model: m\noutput_dir: o\nstages:\n  dpo:\n    loss_type: magic\n",
        "stages.dpo.loss_type: invalid value",
    ),
    ("name: t\nbase_model: m\noutput_dir: o\neval:\n  prompt: fancy\n", "eval.prompt: invalid value 'fancy'"),
    ("name: t\nbase_model: m\noutput_dir: o\neval:\n  num_fewshot: [0, -5]\n", "eval.num_fewshot"),
    (
        "name: t\nbase_model: m\noutput_dir: o\nstages:\n  annotate:\n    judge: {backend: http}\n",
        "needs base_url",
    ),
    (
        "name: t\nbase_model: m\noutput_dir: o\nstages:\n  sft:\n    data:\n      - {path: a.jsonl, wieght: 2}\n",
        "stages.sft.data.0.wieght: unknown key",
    ),
    ("name: [unclosed\n", "invalid YAML"),
    ("- just\n- a list\n", "must be a YAML mapping"),
]


@pytest.mark.parametrize(("text", "expected"), BAD)
def test_bad_recipes_fail_with_key_path(text: str, expected: str):
    with pytest.raises(HippoError) as info:
        parse_recipe(text, "bad.yaml")
    message = str(info.value)
    assert message.startswith("bad.yaml")
    assert expected in message
    assert "\n" not in message


def test_choices_are_listed():
    with pytest.raises(HippoError, match="'auto'.*'fp32'.*'bf16'.*'fp16'"):
        parse_recipe("name: t\nbase_model: m\noutput_dir: o\nprecision: fp8\n")


@pytest.mark.parametrize(("text", "expected"), BAD[:8])
def test_bad_recipe_cli_exit_2_no_traceback(tmp_path: Path, text: str, expected: str):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "hippocrates.cli", "pipeline", str(recipe)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and str(recipe) in lines[0]
