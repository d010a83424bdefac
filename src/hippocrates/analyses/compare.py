"""``hippo compare A B``: is B better than A on the same items, or is the difference noise?

A and B are evaluation output folders (``hippo eval --output``), or, with ``--models``, two models
that are evaluated here first. The statistics are :mod:`hippocrates.analyses.stats`'s.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from hippocrates.analyses.stats import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    METRICS,
    check_metric,
    compare_folders,
    describe,
)
from hippocrates.config import renamed_prompt
from hippocrates.errors import HippoError

MIN_RESAMPLES = 1_000

EXAMPLES = """examples:
  hippo compare runs/base-eval runs/sft-eval                    # two `hippo eval --output` folders
  hippo compare runs/a runs/b --metric acc_norm --tasks medqa --output runs/a-vs-b
  hippo compare --models smollm2-135m runs/demo/dpo --tasks medqa,pubmedqa --data-dir ../shared/data
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("a", nargs="?", help="evaluation folder of A, the reference (has results.json)")
    parser.add_argument("b", nargs="?", help="evaluation folder of B; differences are B − A")
    parser.add_argument(
        "--models", nargs=2, metavar=("A", "B"), help="evaluate two models (with --tasks) and compare them"
    )
    parser.add_argument(
        "--metric", default="acc", help=f"which correctness is compared: {' or '.join(METRICS)} (default acc)"
    )
    parser.add_argument(
        "--tasks", help="comma-separated tasks (default: every task of A; required with --models)"
    )
    parser.add_argument(
        "--resamples",
        type=int,
        default=DEFAULT_RESAMPLES,
        help=f"bootstrap resamples (default {DEFAULT_RESAMPLES:,}, at least {MIN_RESAMPLES:,})",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"bootstrap seed (default {DEFAULT_SEED})"
    )
    parser.add_argument(
        "--output",
        metavar="DIR",
        help="write DIR/compare.{json,md,csv} (with --models also the evaluations, DIR/eval_a and DIR/eval_b)",
    )
    ev = parser.add_argument_group("evaluating two models (--models)", "the options of `hippo eval`")
    ev.add_argument("--data", action="append", metavar="TASK=PATH", help="local file (or folder) for a task")
    ev.add_argument("--data-dir", metavar="DIR", help="folder laid out like the releases (medqa/, ...)")
    ev.add_argument(
        "--num-fewshot", type=int, default=0, metavar="K", help="exemplars per prompt (default 0)"
    )
    ev.add_argument(
        "--prompt", type=renamed_prompt, default="hippocrates", help="prompt strategy (default hippocrates)"
    )
    ev.add_argument("--chat-template", action="store_true", help="wrap the prompt in the chat template")
    ev.add_argument("--limit", type=int, help="first N items of each task, in file order")
    ev.add_argument("--batch-size", type=int, default=8, help="questions per forward pass (default 8)")
    ev.add_argument("--precision", default="fp32", help="fp32 (default), bf16, fp16 or auto")


def _tasks(value: str | None) -> list[str] | None:
    return [t.strip() for t in value.split(",") if t.strip()] if value else None


def _evaluate_both(args: argparse.Namespace, where: Path) -> tuple[Path, Path]:
    """Evaluate the two models (each loaded once) with the same protocol into where/eval_a, eval_b."""
    from hippocrates.eval.cli import _pairs
    from hippocrates.eval.runner import evaluate
    from hippocrates.models import resolve_model

    tasks = _tasks(args.tasks)
    if not tasks:
        raise HippoError("--models needs --tasks (and --data TASK=PATH or --data-dir for their files)")
    data = _pairs(args.data, "--data")
    for model in args.models:  # a wrong second spec fails now, not after the first evaluation
        resolve_model(model)
    folders = (where / "eval_a", where / "eval_b")
    for model, folder in zip(args.models, folders, strict=True):
        evaluate(
            model, tasks, data=data or None, data_dir=args.data_dir, num_fewshot=args.num_fewshot,
            prompt=args.prompt, chat_template=args.chat_template, limit=args.limit,
            batch_size=args.batch_size, precision=args.precision, output_dir=folder,
        )  # fmt: skip
    return folders


def _check(args: argparse.Namespace) -> None:
    check_metric(args.metric)
    if args.resamples < MIN_RESAMPLES:
        raise HippoError(f"--resamples must be >= {MIN_RESAMPLES:,}, got {args.resamples}")
    if args.seed < 0:
        raise HippoError(f"--seed must be >= 0, got {args.seed}")
    if args.models and (args.a or args.b):
        raise HippoError("give two evaluation folders or --models A B, not both")
    if not args.models and not (args.a and args.b):
        raise HippoError("give two evaluation folders A B (or --models A B)")


def run(args: argparse.Namespace) -> int:
    from hippocrates.data.io import check_writable, write_json, write_text
    from hippocrates.report.tables import comparison_table

    _check(args)
    out = Path(args.output) if args.output else None
    if out is not None:
        check_writable(out)
    options: dict[str, Any] = {"metric": args.metric, "resamples": args.resamples, "seed": args.seed}
    if args.models:
        with tempfile.TemporaryDirectory(prefix="hippo-compare-") as tmp:
            a, b = _evaluate_both(args, out or Path(tmp))
            result = compare_folders(a, b, names=tuple(args.models), **options)
    else:
        a, b = Path(args.a), Path(args.b)
        result = compare_folders(a, b, tasks=_tasks(args.tasks), **options)
    caption = f"{result['b']} (B) against {result['a']} (A), {args.metric}"
    table = comparison_table([("", result)], caption=caption)
    note = describe(result)
    print(table.markdown())
    print(note)
    if out is not None:
        write_json(out / "compare.json", {**result, "a_folder": str(a), "b_folder": str(b)})
        write_text(out / "compare.md", f"{table.markdown()}\n{note}\n")
        write_text(out / "compare.csv", table.csv())
        print(f"written: {out}/compare.{{json,md,csv}}")
    return 0
