"""Small data files and recipes for the training-stage tests (imported by test_stages_* and test_pipeline).

Everything is written into the test's tmp_path, so the tests never depend on the demo data that
other people are editing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

TOPICS = [
    "Hypertension is persistently raised blood pressure and increases the risk of stroke and heart attack.",
    "Type 2 diabetes is treated first with lifestyle change and metformin unless it is contraindicated.",
    "Asthma causes reversible airway narrowing; inhaled corticosteroids reduce exacerbations.",
    "Iron deficiency anaemia presents with fatigue and a low mean corpuscular volume.",
    "Community-acquired pneumonia is commonly caused by Streptococcus pneumoniae.",
    "Atrial fibrillation raises stroke risk, which anticoagulation reduces in eligible patients.",
    "Hypothyroidism is treated with levothyroxine titrated to the thyroid stimulating hormone.",
    "Migraine is a recurrent headache disorder, often with nausea and sensitivity to light.",
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_data(root: Path) -> dict[str, Path]:
    """CPT documents, instructions (train + held-out) and preference pairs."""
    docs = [{"text": f"{t}  Case {i}:\n\n\n  the patient   improved."} for i, t in enumerate(TOPICS * 3)]
    docs.append({"text": "   \n  "})  # empty after cleaning: dropped and counted
    instr = [
        {"instruction": f"Explain point {i} briefly.", "input": "", "output": t}
        for i, t in enumerate(TOPICS * 2)
    ]
    mcq = [
        {
            "instruction": "Answer the following multiple-choice question.",
            "input": f"Question: Which statement {i} is true?\n(A) {TOPICS[i]} (B) none",
            "output": f"(A) {TOPICS[i]}",
        }
        for i in range(4)
    ]
    prefs = [
        {"prompt": f"Question {i}: {t[:40]}?", "chosen": t, "rejected": "No idea, ask someone else."}
        for i, t in enumerate(TOPICS * 2)
    ]
    prefs.append({"prompt": "same?", "chosen": "Identical answer.", "rejected": "Identical answer."})
    return {
        "cpt": write_jsonl(root / "cpt.jsonl", docs),
        "cpt_eval": write_jsonl(root / "cpt_eval.jsonl", docs[:4]),
        "general": write_jsonl(root / "general.jsonl", instr),
        "evaluation": write_jsonl(root / "evaluation.jsonl", mcq),
        "heldout": write_jsonl(root / "heldout.jsonl", instr[:4]),
        "prefs": write_jsonl(root / "prefs.jsonl", prefs),
    }


def make_recipe(root: Path, model: Path, **overrides: Any) -> Path:
    """A fast recipe on a tiny model: CPT, SFT and DPO with a few steps each; annotate and eval off."""
    data = make_data(root / "data")
    train = {
        "batch_size": 4,
        "max_seq_len": 96,
        "max_steps": 3,
        "logging_steps": 1,
        "save_steps": 2,
        "learning_rate": 1e-3,
        "warmup_ratio": 0.0,
        "lr_scheduler": "constant",
    }
    recipe: dict[str, Any] = {
        "name": "test",
        "base_model": str(model),
        "output_dir": str(root / "out"),
        "seed": 7,
        "precision": "fp32",
        "stages": {
            "cpt": {
                "data": [{"path": str(data["cpt"])}],
                "eval_data": [{"path": str(data["cpt_eval"])}],
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                "train": train,
            },
            "sft": {
                "data": [
                    {"path": str(data["general"]), "kind": "general", "weight": 1.0},
                    {"path": str(data["evaluation"]), "kind": "evaluation", "weight": 2.0},
                ],
                "eval_data": [{"path": str(data["heldout"])}],
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                "train": train,
            },
            "annotate": {"enabled": False},
            "dpo": {
                "data": [{"path": str(data["prefs"])}],
                "eval_fraction": 0.25,
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                "train": {**train, "batch_size": 2, "gradient_checkpointing": True},
            },
        },
        "eval": {"enabled": False},
    }
    for key, value in overrides.items():
        node = recipe
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


BENCH = Path(__file__).resolve().parents[1] / "data" / "demo" / "benchmarks"
GRPO = Path(__file__).resolve().parents[1] / "data" / "demo" / "grpo"
EVAL_DATA = {
    "medqa": str(BENCH / "medqa" / "US_4_options_test.jsonl"),
    "pubmedqa": str(BENCH / "pubmedqa" / "ori_pqal.json"),
    "usmle_step1": str(BENCH / "usmle" / "step_exams.jsonl"),
}


def full_recipe(root: Path, model: Path, **overrides: Any) -> Path:
    """Every stage, the evaluation and both analyses on a tiny model: a whole run in about a minute."""
    prompts = write_jsonl(
        root / "data" / "questions.jsonl",
        [
            {"id": f"q{i}", "prompt": f"What should I know about point {i}: {t[:50]}?"}
            for i, t in enumerate(TOPICS)
        ],
    )
    everything = {
        "stages.annotate": {
            "enabled": True, "prompts": str(prompts), "n_candidates": 2, "max_new_tokens": 8, "batch_size": 8,
            "judge": {"backend": "local", "model": str(model), "tie_threshold": 0.0},
        },
        "stages.dpo.data": [],
        "stages.grpo": {
            "enabled": True, "data": [{"path": str(GRPO / "train.jsonl"), "max_samples": 4}],
            "eval_data": [{"path": str(GRPO / "heldout.jsonl"), "max_samples": 2}], "group_size": 2,
            "max_completion_length": 8, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"batch_size": 2, "max_steps": 1, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 10},
        },
        "eval": {"enabled": True, "tasks": list(EVAL_DATA), "data": EVAL_DATA, "num_fewshot": [0, 1], "limit": 4},
        "analyses": {
            "ablation": {"enabled": True, "num_fewshot": 0},
            "sweep": {"enabled": True, "tasks": ["medqa"], "prompts": ["hippocrates", "letter"],
                      "chat_template": [False, True], "num_fewshot": [0, 1], "limit": 3},
        },
    }  # fmt: skip
    return make_recipe(root, model, **{**everything, **overrides})


def killed_run_script(stage: str, kill_at_step: int) -> str:
    """``python -c`` source that runs one stage (argv: recipe, input model) and SIGKILLs itself at the
    end of optimizer step ``kill_at_step``: the checkpoints saved before it are on disk, that step is lost."""
    return f"""
import os, signal, sys
from pathlib import Path
from transformers import TrainerCallback
from hippocrates.config import load_recipe
from hippocrates.stages.{stage} import run_{stage}

class KillAfter(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == {kill_at_step}:
            os.kill(os.getpid(), signal.SIGKILL)

recipe = load_recipe(sys.argv[1])
run_{stage}(recipe, sys.argv[2], Path(recipe.output_dir) / "{stage}", report_to=[], callbacks=[KillAfter()])
"""
