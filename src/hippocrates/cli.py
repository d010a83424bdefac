"""The ``hippo`` command line.

Each subcommand lives in the module that implements it, as two functions:
``add_arguments(parser)`` and ``run(args) -> int``. This file only routes, imports the
chosen module lazily (so ``hippo --help`` is instant), and turns a :class:`HippoError`
into one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from hippocrates import __version__
from hippocrates.errors import EXIT_USAGE, HippoError

# name -> (module providing add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pipeline": (
        "hippocrates.pipeline",
        "run every enabled stage of a recipe in order (CPT -> SFT -> annotate -> DPO -> eval -> analyses -> report; GRPO after SFT or DPO)",
    ),
    "cpt": ("hippocrates.stages.cpt", "continued pre-training on medical text, with LoRA"),
    "sft": ("hippocrates.stages.sft", "medical instruction tuning on a weighted mixture, with LoRA"),
    "annotate": (
        "hippocrates.rlaif.annotate",
        "RLAIF: sample answers and let an AI judge pick the better one",
    ),
    "dpo": ("hippocrates.stages.dpo", "direct preference optimisation on judged pairs, with LoRA"),
    "grpo": (
        "hippocrates.stages.grpo",
        "reinforcement learning with verifiable rewards (GRPO) on questions with known answers",
    ),
    "eval": (
        "hippocrates.eval.cli",
        "evaluate on MedQA, MedMCQA, PubMedQA, USMLE or your files (log-likelihood or generative)",
    ),
    "ablate": (
        "hippocrates.analyses.ablation",
        "stage ablation: base, +CPT, +SFT, +CPT+SFT, +CPT+SFT+DPO (+GRPO), paired against the base",
    ),
    "compare": ("hippocrates.analyses.compare", "paired comparison of two evaluations (difference, CI, p)"),
    "report": ("hippocrates.report.cli", "write the HTML + Markdown report of a run directory"),
    "export": ("hippocrates.export", "a stage output as a Hugging Face Hub model folder (and upload it)"),
    "serve": ("hippocrates.serve", "serve a model over an OpenAI-compatible HTTP API"),
    "data": ("hippocrates.data.check", "inspect data: token counts, duplicates and benchmark contamination"),
    "models": ("hippocrates.models", "list model aliases and show where a model spec resolves"),
}

EPILOG = """examples:
  hippo pipeline recipes/demo.yaml          # the whole pipeline on the embedded SmolLM2-135M
  hippo eval --model smollm2-135m --tasks medqa --data medqa=data/demo/benchmarks/medqa/US_4_options_test.jsonl
  hippo models smollm2-135m                 # where the embedded model is cached

Each subcommand has its own --help. Errors in your input exit with code 2 and one line naming
the file, line or config key. Set HIPPO_CACHE to move the model cache (default ~/.cache/hippocrates).
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the command and the problem (exit 2)."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; ``only`` configures just that subcommand's arguments (lazy import)."""
    parser = OneLineParser(
        prog="hippo",
        description="Hippocrates: continued pre-training, instruction tuning, RLAIF + DPO and "
        "standardized evaluation of medical LLMs (Acikgoz et al., 2024).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hippocrates {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    module, _ = COMMANDS[args.command]
    try:
        return int(importlib.import_module(module).run(args) or 0)
    except HippoError as exc:
        print(f"hippo {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a full or read-only disk, a missing permission, a path through a file
        if isinstance(exc, BrokenPipeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        from hippocrates.data.io import os_error

        print(f"hippo {args.command}: error: {os_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"hippo {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # libraries report a full disk in their own exception types
        from hippocrates.data.io import full_disk

        if not full_disk(exc):
            raise
        print(f"hippo {args.command}: error: no space left on device ({type(exc).__name__})", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
