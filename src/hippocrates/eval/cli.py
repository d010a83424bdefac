"""``hippo eval``: log-likelihood or generative evaluation on MedQA, MedMCQA, PubMedQA and USMLE (or any MC file)."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any

from hippocrates.config import renamed_prompt
from hippocrates.errors import HippoError
from hippocrates.eval.generate import BACKENDS, DEFAULT_MAX_NEW_TOKENS, MODES
from hippocrates.eval.prompts import DEFAULT_SEED, PROTOCOLS, STRATEGIES

EXAMPLES = """examples:
  hippo eval --model smollm2-135m --tasks medqa --data medqa=data/demo/benchmarks/medqa/US_4_options_test.jsonl
  hippo eval --model smollm2-135m --tasks medqa,medmcqa,pubmedqa,usmle_step1 --data-dir ../shared/data --num-fewshot 5
  hippo eval --model M --tasks my_task.yaml --data my_task=quiz.csv    # a task YAML of your own
  hippo eval --model smollm2-135m --tasks medqa --data-dir ../shared/data --mode generate --max-new-tokens 256
  hippo eval ... --mode generate --samples 5 --temperature 0.7          # self-consistency (majority vote)
  hippo eval --list-tasks
  hippo eval --sweep --tasks medqa --data-dir ../shared/data --limit 50 --output runs/sweep   # prompts x chat x shots
  hippo eval --sweep --modes loglik,generate --budgets 64,256 --shots 0 --tasks medqa --data-dir ../shared/data --output runs/sweep
  hippo eval --tasks medqa --data-dir ../shared/data --export-lm-eval lm_eval_tasks/   # same protocol in lm-eval
  hippo eval --mode rubric --rubrics data/demo/rubrics/healthbench_style.jsonl --output runs/rubric   # open-ended
"""


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values or []:
        task, sep, path = value.partition("=")
        if not sep or not task.strip() or not path.strip():
            raise HippoError(f"{flag} expects TASK=PATH, got '{value}'")
        out[task.strip()] = path.strip()
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hippocrates.eval import rubric

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("--model", default="smollm2-135m", help="alias, HF directory, .gguf or org/name")
    parser.add_argument(
        "--tasks", default="medqa,medmcqa,pubmedqa", help="comma-separated task names or YAML paths"
    )
    parser.add_argument(
        "--task-dir", action="append", default=[], metavar="DIR", help="extra task YAMLs (repeatable)"
    )
    parser.add_argument(
        "--data", action="append", metavar="TASK=PATH", help="local file (or folder) for a task"
    )
    parser.add_argument(
        "--data-dir", metavar="DIR", help="folder laid out like the releases (medqa/, medmcqa/, ...)"
    )
    parser.add_argument(
        "--fewshot-data", action="append", metavar="TASK=PATH", help="few-shot pool file for a task"
    )
    parser.add_argument(
        "--num-fewshot", type=int, default=0, metavar="K", help="exemplars per prompt (default 0)"
    )
    parser.add_argument(
        "--mode",
        choices=[*MODES, "rubric"],
        default="loglik",
        help="loglik: score every option by log-likelihood (default); generate: the model answers in its own "
        "words, ending with 'Answer: X', which is read back; rubric: open-ended answers to --rubrics, graded "
        "per criterion by a judge (docs/evaluation.md)",
    )
    parser.add_argument(
        "--prompt",
        type=renamed_prompt,
        choices=STRATEGIES,
        default=None,
        help="loglik prompt strategy: hippocrates (the paper's, default), letter (today's lm-eval), stepwise "
        "(adds a step-by-step instruction; still scored by log-likelihood)",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="v0.4",
        help="v0.4: lm-eval 0.4's prompt assembly and encoding (default); v0.3: the paper's harness exactly "
        "(documents shuffled with seed 42, shots drawn from that generator, separate encoding, no BOS)",
    )
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap the prompt in the model's chat template (default: off for loglik; for generate, on when "
        "the model has one, else the Alpaca format)",
    )
    parser.add_argument("--limit", type=int, help="first N items of each task, in file order")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="questions per forward pass; generate: answers decoded together",
    )
    parser.add_argument("--output", metavar="DIR", help="write DIR/results.json and DIR/samples_TASK.jsonl")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16", "auto"], default="fp32")
    parser.add_argument(
        "--scorer", choices=["fast", "naive"], default="fast", help="fast (shared prefix) or naive"
    )
    parser.add_argument(
        "--max-length", type=int, help="model window in tokens (default: from the model config)"
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="few-shot sampling seed (lm-eval's default)"
    )
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument(
        "--report-to",
        help="also send the figures to loggers: tensorboard (into --output), wandb, none (default)",
    )
    parser.add_argument("--json", action="store_true", help="print results.json instead of the table")
    parser.add_argument("--list-tasks", action="store_true", help="list the registered tasks and exit")
    parser.add_argument(
        "--export-lm-eval", metavar="DIR", help="write lm-eval task YAMLs for this protocol and exit"
    )
    gen = parser.add_argument_group(
        "generated answers (--mode generate; --mode rubric uses the budget and temperature too)"
    )
    gen.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        metavar="N",
        help=f"thinking budget: new tokens per answer (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    gen.add_argument(
        "--samples",
        type=int,
        default=1,
        metavar="K",
        help="answers per item; K > 1: majority vote (default 1)",
    )
    gen.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="0: greedy (default); > 0 for --samples K > 1",
    )
    gen.add_argument(
        "--backend",
        choices=BACKENDS,
        default="hf",
        help="hf (batched, default) or vllm (GPU, when installed)",
    )
    sweep = parser.add_argument_group(
        "prompting sweep",
        "--sweep evaluates every mode x prompt x chat option x shot count (x budget) into one table",
    )
    sweep.add_argument("--sweep", action="store_true", help="run the sweep (needs --output)")
    sweep.add_argument(
        "--prompts", default=",".join(STRATEGIES), help=f"sweep prompts (default {','.join(STRATEGIES)})"
    )
    sweep.add_argument(
        "--chat-options", default="off,on", help="sweep chat template settings: off, on or off,on"
    )
    sweep.add_argument("--shots", default="0,5", help="sweep shot counts (default 0,5)")
    sweep.add_argument(
        "--modes", default="loglik", help="sweep modes: loglik, generate or loglik,generate (default loglik)"
    )
    sweep.add_argument(
        "--budgets", metavar="N,N", help="generate rows: --max-new-tokens values (default: --max-new-tokens)"
    )
    sweep.add_argument(
        "--baseline",
        metavar="NAME",
        help="the combination the others are compared with, as <prompt>-<chat|plain>-<K>shot "
        "or generate-<N>tok-<chat|plain>-<K>shot (default: the first)",
    )
    rubric.add_arguments(parser)


def _integers(value: str, flag: str, least: int) -> list[int]:
    try:
        found = [int(k) for k in value.split(",") if k.strip()]
    except ValueError:
        raise HippoError(f"{flag} expects comma-separated integers, got '{value}'") from None
    if not found or any(k < least for k in found):
        raise HippoError(f"{flag} expects integers >= {least}, got '{value}'")
    return found


def _sweep_modes(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """Parse --modes/--budgets, with one-line errors."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise HippoError(f"--modes expects loglik, generate or loglik,generate, got '{args.modes}'")
    budgets = _integers(args.budgets, "--budgets", 1) if args.budgets else [args.max_new_tokens]
    return modes, budgets


def _sweep_axes(args: argparse.Namespace) -> tuple[list[str], list[bool], list[int]]:
    """Parse --prompts/--chat-options/--shots into lists, with one-line errors."""
    prompts = [renamed_prompt(p.strip()) for p in args.prompts.split(",") if p.strip()]
    bad = [p for p in prompts if p not in STRATEGIES]
    if bad or not prompts:
        raise HippoError(
            f"--prompts: unknown prompt {bad[0] if bad else '(none)'!r} (choose from {', '.join(STRATEGIES)})"
        )
    flags = {"off": False, "on": True}
    chats = [c.strip() for c in args.chat_options.split(",") if c.strip()]
    if not chats or any(c not in flags for c in chats):
        raise HippoError(f"--chat-options expects off, on or off,on, got '{args.chat_options}'")
    return prompts, [flags[c] for c in chats], _integers(args.shots, "--shots", 0)


def _eval_options(args: argparse.Namespace, fewshot_data: dict[str, str]) -> dict[str, Any]:
    """The evaluate() options shared by a single evaluation and every combination of a sweep."""
    return {
        "limit": args.limit,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "scorer": args.scorer,
        "data_dir": args.data_dir,
        "fewshot_data": fewshot_data,
        "task_dirs": args.task_dir,
        "seed": args.seed,
        "max_length": args.max_length,
        "trust_remote_code": args.trust_remote_code,
        "protocol": args.protocol,
        "samples": args.samples,
        "temperature": args.temperature,
        "backend": args.backend,
    }


def run(args: argparse.Namespace) -> int:
    from hippocrates.eval.registry import task_table

    if args.list_tasks:
        for row in task_table(args.task_dir):
            print(f"{row['task']:<14} {row['format']:<9} {row['file']:<34} {row['title']}")
        return 0
    if args.mode == "rubric":
        from hippocrates.eval.rubric import run_command

        return run_command(args)
    if args.rubrics:
        raise HippoError("--rubrics needs --mode rubric")
    data = _pairs(args.data, "--data")
    fewshot_data = _pairs(args.fewshot_data, "--fewshot-data")
    if args.report_to:
        from hippocrates.stages.cli import report_to_arg

        report_to_arg(args.report_to)  # a logger that is not installed is refused before any work
        if not args.output:
            raise HippoError("--report-to needs --output DIR (the TensorBoard files go there)")
    if args.max_length is not None and args.max_length < 2:
        raise HippoError(f"--max-length must be >= 2, got {args.max_length}")
    if args.prompt is not None and args.mode == "generate" and not args.sweep:
        raise HippoError(
            "--prompt applies to --mode loglik; generate asks every item the same way (docs/evaluation.md)"
        )
    prompt = args.prompt or "hippocrates"
    if args.export_lm_eval:
        from hippocrates.eval.lm_eval_export import export

        if args.protocol == "v0.3":
            raise HippoError(
                "--export-lm-eval writes lm-eval 0.4 tasks, which cannot encode as v0.3 did; use --protocol v0.4"
            )
        if args.mode == "generate":
            raise HippoError("--export-lm-eval writes log-likelihood tasks; drop --mode generate")

        written = export(
            args.export_lm_eval,
            args.tasks,
            data=data,
            data_dir=args.data_dir,
            fewshot_data=fewshot_data,
            task_dirs=args.task_dir,
            num_fewshot=args.num_fewshot,
            prompt=prompt,
            chat_template=bool(args.chat_template),
            limit=args.limit,
            seed=args.seed,
            model=args.model,
            batch_size=args.batch_size,
            precision=args.precision,
            max_length=args.max_length,
        )
        print(
            f"wrote {len(written)} files to {args.export_lm_eval}; run: see {args.export_lm_eval}/README.md"
        )
        return 0
    if args.sweep:
        return run_sweep_command(args, data, fewshot_data)
    from hippocrates.eval.runner import evaluate, format_table
    from hippocrates.lock import hold

    with hold(args.output) if args.output else contextlib.nullcontext():
        results = evaluate(
            args.model,
            args.tasks,
            data=data,
            num_fewshot=args.num_fewshot,
            prompt=prompt,
            chat_template=args.chat_template,
            output_dir=args.output,
            mode=args.mode,
            max_new_tokens=args.max_new_tokens,
            **_eval_options(args, fewshot_data),
        )
    if args.output and args.report_to:
        from hippocrates.loggers import report_figures, scalars_of
        from hippocrates.stages.cli import report_to_arg

        report_figures(Path(args.output), report_to_arg(args.report_to), scalars_of(results))
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    if args.output:
        print(f"results: {args.output}/results.json")
    return 0


def run_sweep_command(args: argparse.Namespace, data: dict[str, str], fewshot_data: dict[str, str]) -> int:
    """``hippo eval --sweep``: the prompting-strategies table (also read by ``hippo report``)."""
    if not args.output:
        raise HippoError("--sweep needs --output DIR (it writes DIR/sweep.{json,md,csv})")
    prompts, chats, shots = _sweep_axes(args)
    modes, budgets = _sweep_modes(args)
    from hippocrates.analyses.sweep import run_sweep
    from hippocrates.data.io import check_writable
    from hippocrates.lock import hold

    check_writable(args.output)
    with hold(args.output):
        result = run_sweep(
            args.model,
            [t.strip() for t in args.tasks.split(",") if t.strip()],
            data or None,
            prompts,
            chats,
            shots,
            args.output,
            baseline=args.baseline,
            modes=modes,
            budgets=budgets,
            **_eval_options(args, fewshot_data),
        )
    print(json.dumps(result, indent=2) if args.json else (Path(args.output) / "sweep.md").read_text())
    print(f"sweep: {args.output}/sweep.json ({len(result['rows'])} combinations)")
    return 0
