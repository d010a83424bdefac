"""``hippo cpt|sft|dpo|grpo RECIPE``: the command-line side shared by the training stages."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hippocrates.accel import is_main_process
from hippocrates.config import Recipe
from hippocrates.errors import HippoError
from hippocrates.record import read_manifest
from hippocrates.stages.run import stage_dir


def add_stage_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument(
        "--model",
        help="input model (default: the previous enabled stage's output when it exists, else base_model)",
    )
    parser.add_argument("--output", help=f"output folder (default: OUTPUT/{stage})")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint of an interrupted run",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an output folder written by another run"
    )
    parser.add_argument(
        "--report-to",
        help="comma-separated loggers (tensorboard, wandb, none; default tensorboard if installed)",
    )


def report_to_arg(value: str | None) -> list[str] | None:
    """``--report-to a,b`` as the Trainer's list; a logger that is not installed is a usage error."""
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if names == ["none"]:
        return []
    for name in names:
        module = {"comet_ml": "comet_ml", "tensorboard": "tensorboard"}.get(name, name)
        if name != "all" and importlib.util.find_spec(module) is None:
            raise HippoError(
                f"--report-to {name}: the '{module}' package is not installed (pip install {module})"
            )
    return names


def default_input_model(recipe: Recipe, stage: str) -> str:
    """The model a standalone stage trains (or annotate samples from): the latest earlier training
    stage's output, else the base, as the pipeline chains them."""
    order = recipe.stage_order()
    for previous in reversed(order[: order.index(stage)]):
        if previous == "annotate":
            continue
        if getattr(recipe.stages, previous).enabled and read_manifest(stage_dir(recipe, previous)):
            return str(stage_dir(recipe, previous))
    return recipe.base_model


def print_result(stage: str, out_dir: Path, metrics: dict[str, Any], keys: list[str]) -> None:
    if not is_main_process():  # one summary per job, not one per process
        return
    shown = ", ".join(
        f"{k}={metrics[k]:.4g}" if isinstance(metrics.get(k), float) else f"{k}={metrics.get(k)}"
        for k in keys
    )
    print(f"{stage}: {shown}")
    merge = metrics.get("merge") or {}
    if merge:
        print(
            f"{stage}: merged in {merge['dtype']}, {100 * merge['update_retained']:.2f}% of the update kept"
        )
    print(f"{stage}: model, adapter/, metrics.json, manifest.json, README.md in {out_dir}")


def run_stage_command(
    args: argparse.Namespace, stage: str, train: Callable[..., dict], keys: list[str]
) -> int:
    """``hippo STAGE RECIPE``: check everything the stage needs, train it, print its headline metrics."""
    from hippocrates.config import load_recipe
    from hippocrates.lock import hold
    from hippocrates.preflight import preflight

    recipe = load_recipe(args.recipe)
    model = args.model or default_input_model(recipe, stage)
    out = Path(args.output) if args.output else stage_dir(recipe, stage)
    report_to = report_to_arg(args.report_to)
    preflight(recipe, [stage], model=model, outputs=[out])
    with hold(recipe.output_dir), hold(out.parent):
        metrics = train(recipe, model, out, resume=args.resume, overwrite=args.overwrite, report_to=report_to)
    print_result(stage, out, metrics, keys)
    return 0
