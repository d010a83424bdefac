#!/usr/bin/env python
"""GRPO step time and how much of it is generation: ``hippo grpo`` as the demo recipe runs it.

The stage runs through ``run_grpo`` (TRL's GRPOTrainer, our rewards, LoRA) on the demo questions
with the demo recipe's GRPO settings, for ``--steps`` optimizer steps and without the held-out
generations before and after (they are not part of a step). Two clocks: the wall time of each
optimizer step (a trainer callback) and the wall time spent inside TRL's completion sampling
(``GRPOTrainer._generate_single_turn``); the first step is warm-up and not counted. Printed:
seconds per step, generation seconds per step and their share, completions and sampled tokens per
second, and the process's CPU seconds per step (the fairer figure when other jobs share the cores).

    python benchmarks/grpo_step.py --steps 4
    python benchmarks/grpo_step.py --steps 3 --batch 8 --group 4 --max-completion 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Clock:
    """Wall time per optimizer step, and generation time and sampled tokens inside each step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.current: dict[str, float] = {}

    def begin(self) -> None:
        self.current = {"start": time.perf_counter(), "cpu": time.process_time(), "gen": 0.0,
                        "completions": 0, "tokens": 0}  # fmt: skip

    def end(self) -> None:
        c = self.current
        self.steps.append({"wall": time.perf_counter() - c["start"], "cpu": time.process_time() - c["cpu"],
                           "gen": c["gen"], "completions": c["completions"], "tokens": c["tokens"]})  # fmt: skip


def timed_generation(clock: Clock):
    """Wrap TRL's completion sampling so each call adds its wall time and output size to the step."""
    from trl import GRPOTrainer

    original = GRPOTrainer._generate_single_turn

    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        out = original(self, *args, **kwargs)
        if clock.current:
            clock.current["gen"] += time.perf_counter() - start
            completions = out[0] if isinstance(out, tuple) else None
            if isinstance(completions, list):
                clock.current["completions"] += len(completions)
                clock.current["tokens"] += sum(len(c) for c in completions)
        return out

    GRPOTrainer._generate_single_turn = wrapper


def recipe_for(args: argparse.Namespace, out: Path):
    import yaml

    from hippocrates.config import parse_recipe

    raw = yaml.safe_load((REPO / "recipes/demo.yaml").read_text())
    grpo = raw["stages"]["grpo"]
    grpo.update(eval_data=[], group_size=args.group, max_completion_length=args.max_completion)
    grpo["data"][0]["max_samples"] = args.steps * args.batch // args.group
    grpo["train"].update(batch_size=args.batch, max_steps=args.steps, save_steps=10_000)
    raw.update(output_dir=str(out), precision=args.precision)
    return parse_recipe(yaml.safe_dump(raw), "benchmarks/grpo_step.py")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (the first is warm-up)")
    parser.add_argument("--batch", type=int, default=8, help="completions per step")
    parser.add_argument("--group", type=int, default=4, help="completions per question")
    parser.add_argument("--max-completion", type=int, default=64)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps: at least 2 (the first is warm-up)")

    import torch
    from transformers import TrainerCallback

    from hippocrates.models import resolve_model
    from hippocrates.stages.grpo import run_grpo

    clock = Clock()
    timed_generation(clock)

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            clock.begin()

        def on_step_end(self, *_, **__):
            clock.end()

    os.chdir(REPO)  # the demo recipe's data paths are relative to the repository
    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_for(args, Path(tmp) / "run")
        model = str(resolve_model(args.model).path)
        run_grpo(recipe, model, Path(tmp) / "run" / "grpo", report_to=[], callbacks=[StepClock()])

    timed = clock.steps[1:]
    n = len(timed)
    wall = sum(s["wall"] for s in timed) / n
    gen = sum(s["gen"] for s in timed) / n
    figures: dict[str, Any] = {
        "model": args.model, "precision": args.precision, "threads": torch.get_num_threads(),
        "steps_timed": n, "completions_per_step": args.batch, "group_size": args.group,
        "max_completion_length": args.max_completion,
        "seconds_per_step": round(wall, 2), "generation_seconds_per_step": round(gen, 2),
        "generation_share": round(gen / wall, 3),
        "cpu_seconds_per_step": round(sum(s["cpu"] for s in timed) / n, 2),
        "sampled_tokens_per_step": sum(s["tokens"] for s in timed) / n,
        "sampled_tokens_per_generation_second": round(sum(s["tokens"] for s in timed) / max(1e-9, sum(s["gen"] for s in timed)), 1),
    }  # fmt: skip
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
