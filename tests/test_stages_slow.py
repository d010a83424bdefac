"""Realism on the embedded SmolLM2-135M (slow): each stage improves its own held-out measure.

Fixed seeds, a handful of steps each, bf16 on CPU. CPT lowers held-out perplexity on the demo
corpus, SFT lowers held-out response loss on the demo instructions, and DPO lifts held-out reward
accuracy above 0.5 on a sensible synthetic preference set: careful answers (the human-labelled
better answers, and the demo doctor-dialogue answers) against clearly bad ones (the labelled worse
answers, and dismissive replies).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hippocrates.config import load_recipe
from test_stages_helpers import write_jsonl

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
DISMISSIVE = [
    "Don't worry about it, it's nothing.",
    "That's normal, just ignore it.",
    "No need to see anyone, it will pass.",
    "Just wait and see, doctors can't help with that.",
]


def preference_pairs() -> list[dict[str, str]]:
    pairs = []
    labels = DEMO / "preferences" / "human_labels.jsonl"
    if labels.is_file():
        for line in labels.read_text().splitlines():
            r = json.loads(line)
            if r["label"] in ("A", "B"):
                better, worse = (
                    ("response_a", "response_b") if r["label"] == "A" else ("response_b", "response_a")
                )
                pairs.append({"prompt": r["prompt"], "chosen": r[better], "rejected": r[worse]})
    general = DEMO / "instructions" / "general.jsonl"
    dialogues = [json.loads(x) for x in general.read_text().splitlines() if '"dialogue"' in x]
    for i, d in enumerate(dialogues):
        pairs.append(
            {"prompt": d["input"], "chosen": d["output"], "rejected": DISMISSIVE[i % len(DISMISSIVE)]}
        )
    return pairs[::2] + pairs[1::2]  # both kinds within any prefix


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, embedded_model_dir):
    if (
        not (DEMO / "cpt" / "train.jsonl").is_file()
        or not (DEMO / "instructions" / "general.jsonl").is_file()
    ):
        pytest.skip("demo data not present")
    root = tmp_path_factory.mktemp("slow")
    prefs = write_jsonl(root / "prefs.jsonl", preference_pairs())
    lora = {"r": 16, "alpha": 32, "dropout": 0.0}
    train = {
        "batch_size": 4,
        "warmup_ratio": 0.0,
        "lr_scheduler": "constant",
        "logging_steps": 2,
        "save_steps": 100,
    }
    data = {
        "name": "slow",
        "base_model": str(embedded_model_dir),
        "output_dir": str(root / "out"),
        "seed": 0,
        "precision": "bf16",
        "stages": {
            "cpt": {
                "data": [{"path": str(DEMO / "cpt/train.jsonl")}],
                "eval_data": [{"path": str(DEMO / "cpt/heldout.jsonl"), "max_samples": 8}],
                "lora": lora,
                "train": {**train, "learning_rate": 1e-3, "max_seq_len": 128, "max_steps": 3},
            },
            "sft": {
                "data": [
                    {"path": str(DEMO / "instructions/general.jsonl"), "kind": "general", "max_samples": 24},
                    {
                        "path": str(DEMO / "instructions/evaluation.jsonl"),
                        "kind": "evaluation",
                        "max_samples": 24,
                    },
                ],
                "eval_data": [{"path": str(DEMO / "instructions/heldout.jsonl"), "max_samples": 8}],
                "lora": lora,
                "train": {
                    **train,
                    "learning_rate": 5e-4,
                    "max_seq_len": 256,
                    "max_steps": 4,
                    "batch_size": 2,
                },
            },
            "annotate": {"enabled": False},
            "dpo": {
                "data": [{"path": str(prefs), "max_samples": 48}],
                "eval_fraction": 0.25,
                "beta": 0.1,
                "lora": lora,
                "train": {**train, "learning_rate": 5e-4, "max_seq_len": 160, "max_steps": 3},
            },
        },
        "eval": {"enabled": False},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)


def test_cpt_lowers_heldout_perplexity(recipe, embedded_model_dir):
    from hippocrates.stages.cpt import run_cpt

    m = run_cpt(recipe, str(embedded_model_dir), Path(recipe.output_dir) / "cpt", report_to=[])
    assert m["eval_perplexity_after"] < m["eval_perplexity_before"], m


def test_sft_lowers_heldout_response_loss(recipe, embedded_model_dir):
    from hippocrates.stages.sft import run_sft

    m = run_sft(recipe, str(embedded_model_dir), Path(recipe.output_dir) / "sft", report_to=[])
    assert m["eval_loss_after"] < m["eval_loss_before"], m


def test_dpo_raises_heldout_reward_accuracy(recipe, embedded_model_dir):
    from hippocrates.stages.dpo import run_dpo

    m = run_dpo(recipe, str(embedded_model_dir), Path(recipe.output_dir) / "dpo", report_to=[])
    assert m["eval_pairs"] >= 12 and m["eval_prompts"] >= 1
    assert m["eval_reward_accuracy_before"] == 0.5  # policy == reference: all ties, each counting 1/2
    assert m["eval_reward_accuracy_after"] > 0.5, m
    assert m["eval_reward_margin_after"] > 0, m
