"""``hippo sft``: medical instruction tuning on a weighted mixture, with LoRA.

Prompts use the model's chat template (``template: chat``, or ``auto`` when the tokenizer has one)
or an Alpaca-style template for base models. The loss covers response tokens only. Labels come from
tokenizing the prompt and the full text and checking that the prompt ids are a prefix of the full
ids; when a template or tokenizer breaks that (tokens merging across the boundary), the example is
rebuilt from separately tokenized prompt and response and counted, never silently masked.
Samples longer than ``max_seq_len`` are truncated and counted; samples left with no response token
are dropped and counted. Both are reported on stderr and in metrics.json.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

from hippocrates.config import Recipe, Source
from hippocrates.data.sources import is_local, iter_records, to_instruction
from hippocrates.errors import HippoError
from hippocrates.progress import status
from hippocrates.stages import common
from hippocrates.stages.mixture import sample_mixture
from hippocrates.stages.packing import IGNORE, count_tokens, make_rows

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def choose_template(tokenizer, template: str) -> str:
    """Resolve ``auto`` to ``chat`` when the tokenizer has a chat template, else ``alpaca``."""
    if template == "chat" and not tokenizer.chat_template:
        raise HippoError(
            "stages.sft.template: 'chat' but the model's tokenizer has no chat template; use alpaca"
        )
    if template == "auto":
        return "chat" if tokenizer.chat_template else "alpaca"
    return template


def user_message(example: dict[str, str]) -> str:
    return example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")


def render(tokenizer, fmt: str, example: dict[str, str]) -> tuple[str, str]:
    """(prompt text, prompt + response text) in the chosen format."""
    if fmt == "chat":
        messages = [{"role": "user", "content": user_message(example)}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": example["output"]}], tokenize=False
        )
        return prompt, full
    prompt = (ALPACA_INPUT if example.get("input") else ALPACA).format(**example)
    return prompt, prompt + example["output"] + tokenizer.eos_token


def prompt_text(tokenizer, fmt: str, question: str) -> str:
    """The generation prompt for a bare question (used by DPO and the dry run)."""
    return render(tokenizer, fmt, {"instruction": question, "input": "", "output": ""})[0]


def encode(
    tokenizer, fmt: str, example: dict[str, str], max_len: int, stats: Counter
) -> dict[str, list[int]] | None:
    """Token ids and labels (-100 on every prompt token); None when no response token survives."""
    prompt, full = render(tokenizer, fmt, example)
    special = fmt == "alpaca"  # chat templates write their own special tokens
    prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=special)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        if not full.startswith(prompt):
            raise HippoError(
                "the chat template renders the prompt differently when a response follows, so the "
                "response cannot be located; use stages.sft.template: alpaca"
            )
        stats["boundary_retokenized"] += 1
        full_ids = prompt_ids + tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    labels = [IGNORE] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    if len(full_ids) > max_len:
        stats["truncated"] += 1
        full_ids, labels = full_ids[:max_len], labels[:max_len]
    if all(t == IGNORE for t in labels[1:]):
        stats["dropped_no_response"] += 1
        return None
    return {"input_ids": full_ids, "labels": labels}


def load_examples(source: Source) -> list[dict[str, str]]:
    hub = not is_local(source)
    return [to_instruction(record, where, hub=hub) for where, record in iter_records(source)]


def encode_all(
    tokenizer, fmt: str, examples: list[dict[str, str]], max_len: int, stats: Counter
) -> list[dict]:
    encoded = (encode(tokenizer, fmt, ex, max_len, stats) for ex in examples)
    return [e for e in encoded if e is not None]


def report_counts(split: str, stats: Counter, total: int, max_len: int) -> list[str]:
    """Human-readable lines for truncated / dropped / re-tokenized samples (stderr + notes)."""
    lines = []
    if stats["truncated"]:
        lines.append(
            f"{split}: {stats['truncated']} of {total} samples longer than max_seq_len={max_len} were truncated"
        )
    if stats["dropped_no_response"]:
        lines.append(
            f"{split}: {stats['dropped_no_response']} samples dropped: the prompt alone fills max_seq_len"
        )
    if stats["boundary_retokenized"]:
        lines.append(
            f"{split}: {stats['boundary_retokenized']} samples re-tokenized at the prompt/response boundary "
            "(tokens merged across it)"
        )
    for line in lines:
        status(f"sft: {line}")
    return lines


def load_mixture(recipe: Recipe) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Read and validate every source (before anything is written), then draw the weighted mixture."""
    cfg = recipe.stages.sft
    pools = [load_examples(s) for s in cfg.data]
    for source, pool in zip(cfg.data, pools, strict=True):
        if not pool:
            raise HippoError(f"{source.path}: empty dataset (no records)")
    held_out = [ex for s in cfg.eval_data for ex in load_examples(s)]
    return sample_mixture(pools, [s.weight for s in cfg.data], recipe.seed), held_out


def build_datasets(
    recipe: Recipe, tokenizer, fmt: str, mixture: list[dict], held_out: list[dict]
) -> tuple[list[dict], list[dict], Counter, Counter]:
    """Encoded samples -> rows (packed or not), for training and held-out evaluation."""
    cfg = recipe.stages.sft
    max_len = cfg.train.max_seq_len
    train_stats, eval_stats = Counter(), Counter()
    train = encode_all(tokenizer, fmt, mixture, max_len, train_stats)
    if not train:
        raise HippoError("stages.sft.data: no usable training samples (all dropped)")
    evals = encode_all(tokenizer, fmt, held_out, max_len, eval_stats)
    train_stats["samples"], eval_stats["samples"] = len(train), len(evals)
    train_stats["mixture"] = len(mixture)
    return make_rows(train, max_len, cfg.packing), make_rows(evals, max_len, True), train_stats, eval_stats


def stage_inputs(recipe: Recipe, out_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The resolved config and data identities that make up this stage's inputs hash."""
    return common.source_inputs(recipe.stages.sft)


def run_sft(
    recipe: Recipe,
    model_path: str,
    out_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    report_to: list[str] | None = None,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """Instruction-tune a LoRA, merge it, and write OUTPUT/sft (see docs/CONTRACTS.md)."""
    cfg = recipe.stages.sft
    if not cfg.data:
        raise HippoError("stages.sft.data: no instruction data given")
    config, data = stage_inputs(recipe, Path(out_dir))
    mixture, held_out = load_mixture(recipe)
    run = common.begin_stage(
        "sft",
        recipe,
        model_path,
        Path(out_dir),
        config,
        data,
        resume=resume,
        overwrite=overwrite,
        report_to=report_to,
        callbacks=callbacks,
    )
    from hippocrates.stages.modeling import MaskedLMTrainer, PackedCollator, install_masked_head, mean_nll

    model, tokenizer = common.load_for_training(run)
    fmt = choose_template(tokenizer, cfg.template)
    rows, eval_rows, train_stats, eval_stats = build_datasets(recipe, tokenizer, fmt, mixture, held_out)
    run.notes += report_counts("train", train_stats, train_stats["mixture"], cfg.train.max_seq_len)
    run.notes += report_counts("held-out", eval_stats, eval_stats["samples"], cfg.train.max_seq_len)
    total_tokens, supervised = count_tokens(rows)
    status(
        f"sft: {train_stats['samples']} samples ({fmt} template) in {len(rows)} rows"
        f"{' (packed)' if cfg.packing else ''}; {supervised} of {total_tokens} tokens supervised"
    )

    from transformers import TrainingArguments

    install_masked_head(model)
    model = common.wrap_lora(model, cfg.lora, cfg.train, recipe.seed)
    collator = PackedCollator(tokenizer.pad_token_id)
    kwargs = common.trainer_kwargs(run, cfg.train)
    if not cfg.packing:
        kwargs["train_sampling_strategy"] = "group_by_length"  # similar lengths per batch: little padding
    trainer = MaskedLMTrainer(
        model=model,
        args=TrainingArguments(**kwargs),
        train_dataset=rows,
        data_collator=collator,
        callbacks=run.callbacks,
    )
    batch = cfg.train.batch_size
    before = mean_nll(trainer.model, eval_rows, collator, batch, run.precision)[0] if eval_rows else None
    trainer.train(resume_from_checkpoint=run.resume_from)
    after = mean_nll(trainer.model, eval_rows, collator, batch, run.precision)[0] if eval_rows else None
    if before is not None:
        status(f"sft: held-out response loss {before:.4f} -> {after:.4f}")
    else:
        run.notes.append("no stages.sft.eval_data: held-out response loss not measured")
    summary = common.train_summary(trainer, run)
    runtime = summary["train_runtime_s"]
    metrics = {
        **{k: v for k, v in summary.items() if k != "log_history"},
        "eval_loss_before": before,
        "eval_loss_after": after,
        "template": fmt,
        "packing": cfg.packing,
        "train_samples": train_stats["samples"],
        "train_rows": len(rows),
        "train_tokens": total_tokens,
        "supervised_tokens": supervised,
        "truncated": train_stats["truncated"],
        "dropped_no_response": train_stats["dropped_no_response"],
        "boundary_retokenized": train_stats["boundary_retokenized"],
        "eval_samples": eval_stats["samples"],
        "eval_truncated": eval_stats["truncated"],
        "supervised_tokens_per_s": round(trainer.supervised_tokens / runtime, 1) if runtime else None,
        "log_history": summary["log_history"],
    }
    return common.finish_stage(run, trainer.model, tokenizer, metrics)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_stage_arguments(parser, "sft")


def run(args: argparse.Namespace) -> int:
    return common.run_stage_command(
        args, "sft", run_sft, ["eval_loss_before", "eval_loss_after", "truncated", "train_loss"]
    )
