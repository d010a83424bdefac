"""GRPO with verifiable rewards on a tiny model: the rewards, TRL's group advantages computed from
them, the adapter that moves, the chained stage output, resume, and refusals before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import DEMO
from hippocrates.cli import main
from hippocrates.config import load_recipe
from hippocrates.errors import HippoError
from test_stages_helpers import killed_run_script, make_recipe

GRPO_DATA = DEMO / "grpo"


def grpo_recipe(root: Path, model: Path, **grpo) -> Path:
    settings = {
        "enabled": True,
        "data": [{"path": str(GRPO_DATA / "train.jsonl"), "max_samples": 8}],
        "eval_data": [{"path": str(GRPO_DATA / "heldout.jsonl"), "max_samples": 4}],
        "group_size": 4,
        "max_completion_length": 12,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {
            "batch_size": 4,
            "max_steps": 2,
            "learning_rate": 5e-3,
            "logging_steps": 1,
            "save_steps": 1,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
        },  # fmt: skip
        **grpo,
    }
    return make_recipe(root, model, **{"stages.grpo": settings})


def test_rewards_read_answers_with_the_evaluation_rules():
    from hippocrates.stages.grpo import answer_format, correct, length_penalty_for

    options = [["a", "b", "c", "d"]] * 4
    completions = ["think\nAnswer: B", "Answer: C", "b", "I do not know"]
    kwargs = {"gold": [1, 1, 1, 1], "options": options, "lettered": [True] * 4}
    assert correct(completions, **kwargs) == [1.0, 0.0, 1.0, 0.0]
    assert answer_format(completions, **kwargs) == [1.0, 1.0, 0.0, 0.0]
    chat = [[{"role": "assistant", "content": c}] for c in completions]  # conversational completions
    assert correct(chat, **kwargs) == [1.0, 0.0, 1.0, 0.0]
    assert length_penalty_for(10)([[1] * 5, [1] * 20]) == [-0.5, -1.0]


def test_trl_group_advantages_come_from_our_rewards(tmp_path, tiny_llama_dir):
    """One GRPO step: TRL's logged rewards are ours on its completions; its advantages are the group-
    normalised weighted sums (r - mean_group) / (std_group + 1e-4)."""
    import torch

    from hippocrates import chat as chat_mod
    from hippocrates.stages import grpo
    from hippocrates.stages import run as stage_run

    recipe = load_recipe(
        grpo_recipe(tmp_path, tiny_llama_dir, **{"train": {"batch_size": 8, "max_steps": 1}})
    )
    step = grpo.plan(recipe, str(tiny_llama_dir), tmp_path / "out" / "grpo")
    run = stage_run.begin_stage(step, recipe, tmp_path / "out" / "grpo", report_to=[])
    model, tokenizer = stage_run.load_for_training(run)
    tokenizer.padding_side = "left"
    items = grpo.load_items(recipe.stages.grpo.data[0])
    trainer = grpo.make_trainer(run, model, tokenizer, items, chat_mod.choose_format(tokenizer, "auto"))
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_B" in k}
    trainer.train()
    logs = trainer._logs
    completions = list(logs["completion"])
    assert len(completions) == 8  # 2 questions x 4 answers
    by_id = {i.id: i for i in items}
    prompts = [grpo.ask(i) for i in items]
    rows = []
    for prompt in logs["prompt"]:
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        rows.append(by_id[items[prompts.index(text)].id])
    kwargs = {"gold": [i.gold for i in rows], "options": [i.options for i in rows], "lettered": [True] * 8}
    assert list(logs["rewards"]["correct"]) == grpo.correct(completions, **kwargs)
    assert list(logs["rewards"]["answer_format"]) == grpo.answer_format(completions, **kwargs)
    weights = recipe.stages.grpo.rewards
    total = torch.tensor([weights.correct * c + weights.format * f for c, f in
                          zip(logs["rewards"]["correct"], logs["rewards"]["answer_format"], strict=True)])  # fmt: skip
    groups = total.view(-1, 4)
    expected = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
    assert torch.allclose(torch.tensor(list(logs["advantages"])), expected.flatten(), atol=1e-5)
    after = {k: v for k, v in trainer.model.named_parameters() if "lora_B" in k}
    moved = any(not torch.equal(before[k], after[k]) for k in before)
    assert moved or bool((expected == 0).all()), "the adapter moves unless every group had equal rewards"


def test_grpo_stage_end_to_end_and_in_the_chain(tmp_path, tiny_llama_dir, capsys):
    recipe = grpo_recipe(tmp_path, tiny_llama_dir)
    assert main(["grpo", str(recipe), "--model", str(tiny_llama_dir), "--report-to", "none"]) == 0
    out = tmp_path / "out" / "grpo"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "eval_accuracy_before",
        "eval_accuracy_after",
        "eval_unparsed_before",
        "eval_mean_reward_after",
    ):
        assert metrics[key] is not None, key
    assert (
        metrics["train_steps"] == 2
        and metrics["questions"] == 8
        and metrics["merge"]["update_retained"] > 0.99
    )
    assert metrics["rewards"] == {"correct": 1.0, "answer_format": 0.2}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "grpo" and manifest["input_model"]["path"] == str(tiny_llama_dir)
    capsys.readouterr()
    from hippocrates.analyses.ablation import variants_of
    from hippocrates.stages.cli import default_input_model

    loaded = load_recipe(recipe)
    assert [v.label for v in variants_of(loaded)][-2:] == ["+CPT+SFT+GRPO", "+CPT+SFT+GRPO+DPO"]
    assert default_input_model(loaded, "dpo") == str(out), "DPO builds on GRPO when GRPO comes after SFT"


KILLED = killed_run_script("grpo", 2)  # checkpoint-1 is on disk, step 2 is lost


def test_grpo_resumes_after_a_kill(tmp_path, tiny_llama_dir):
    recipe = grpo_recipe(tmp_path, tiny_llama_dir, **{"train": {"batch_size": 4, "max_steps": 3, "save_steps": 1,
                                                              "learning_rate": 5e-3}})  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", KILLED, str(recipe), str(tiny_llama_dir)], capture_output=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert (tmp_path / "out" / ".grpo.work" / "checkpoint-1").is_dir()
    assert main(["grpo", str(recipe), "--model", str(tiny_llama_dir), "--resume", "--report-to", "none"]) == 0
    manifest = json.loads((tmp_path / "out" / "grpo" / "manifest.json").read_text())
    assert manifest["resumed_from"].endswith("checkpoint-1")
    assert json.loads((tmp_path / "out" / "grpo" / "metrics.json").read_text())["train_steps"] == 3


def test_refusals_before_any_work(tmp_path, tiny_llama_dir, capsys):
    test_file = DEMO / "benchmarks" / "medqa" / "US_4_options_test.jsonl"
    leak = grpo_recipe(tmp_path / "a", tiny_llama_dir, data=[{"path": str(test_file)}])
    data = yaml.safe_load(leak.read_text())
    data["eval"] = {"enabled": True, "tasks": ["medqa"], "data": {"medqa": str(test_file)}}
    leak.write_text(yaml.safe_dump(data))
    assert main(["grpo", str(leak), "--model", str(tiny_llama_dir)]) == 2
    err = capsys.readouterr().err
    assert "stages.grpo.data.0: 40 question(s) are also in the evaluation set eval.data.medqa" in err
    assert len(err.strip().splitlines()) == 1
    for settings, fragment in (
        ({"rewards": {"custom": {"no_such_module:reward": 1.0}}}, "cannot import no_such_module"),
        ({"rewards": {"correct": 0, "format": 0}}, "every reward weight is 0"),
        ({"group_size": 3}, "a multiple of group_size 3"),
        (
            {"data": [{"path": str(DEMO / "instructions" / "general.jsonl")}]},
            "GRPO needs multiple-choice questions",
        ),
        ({"data": []}, "stages.grpo.data: no training questions given"),
    ):
        bad = grpo_recipe(tmp_path / str(len(list(tmp_path.iterdir()))), tiny_llama_dir, **settings)
        assert main(["grpo", str(bad), "--model", str(tiny_llama_dir)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], lines


def test_custom_reward_by_import_path(tmp_path):
    from hippocrates.stages.grpo import import_reward

    assert import_reward("hippocrates.stages.grpo:correct").__name__ == "correct"
    with pytest.raises(HippoError, match="has no function nope"):
        import_reward("hippocrates.stages.grpo:nope")
    with pytest.raises(HippoError, match="package.module:function"):
        import_reward("just_a_name")
