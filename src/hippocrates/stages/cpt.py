"""``hippo cpt``: continued pre-training on medical text with LoRA.

Documents are cleaned (whitespace normalised; empty ones dropped and counted), tokenized with EOS
after each, concatenated and cut into ``max_seq_len`` blocks. A streamed corpus
(``streaming: true``) is read, tokenized and packed lazily, so memory does not grow with its size.
Held-out perplexity is measured on the same kind of blocks before and after training.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from hippocrates.config import Recipe, Source
from hippocrates.data.sources import clean_text, describe, iter_records, text_of
from hippocrates.errors import HippoError
from hippocrates.progress import status
from hippocrates.record import Step
from hippocrates.stages import run as stage_run
from hippocrates.stages.cli import add_stage_arguments, run_stage_command
from hippocrates.stages.mixture import interleave, sample_mixture


def iter_texts(source: Source, stats: Counter) -> Iterator[str]:
    """Cleaned, non-empty documents of one source (empty ones are counted in ``stats``)."""
    for where, record in iter_records(source):
        text = clean_text(text_of(record, source.text_field, where))
        stats["documents"] += 1
        if not text:
            stats["empty_dropped"] += 1
            continue
        yield text


def iter_corpus(sources: list[Source], seed: int, stats: Counter) -> Iterator[str]:
    """The weighted mixture of sources: resampled in memory, or interleaved lazily when streaming."""
    weights = [s.weight for s in sources]
    if any(s.streaming for s in sources):
        yield from interleave([iter_texts(s, stats) for s in sources], weights, seed)
    else:
        yield from sample_mixture([list(iter_texts(s, stats)) for s in sources], weights, seed)


def iter_blocks(texts: Iterator[str], tokenizer, block: int) -> Iterator[list[int]]:
    """Tokenize documents with EOS after each and cut the stream into ``block``-token pieces."""
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    while batch := list(islice(texts, 64)):
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            buffer.extend(ids)
            buffer.append(eos)
            while len(buffer) >= block:
                yield buffer[:block]
                buffer = buffer[block:]
    if len(buffer) > 1:
        yield buffer


def as_row(ids: list[int]) -> dict[str, Any]:
    return {"input_ids": ids, "labels": list(ids)}


def streamed_rows(sources: list[Source], tokenizer, block: int, seed: int, stats: Counter) -> Iterator[dict]:
    """Training rows produced on the fly from streamed sources (nothing is held in memory)."""
    for ids in iter_blocks(iter_corpus(sources, seed, stats), tokenizer, block):
        stats["train_blocks"] += 1
        stats["train_tokens"] += len(ids)
        yield as_row(ids)


def perplexity(by_row: list[tuple[float, int]]) -> float | None:
    """exp of the token-weighted mean NLL over held-out blocks (None without any)."""
    tokens = sum(n for _, n in by_row)
    return math.exp(sum(nll for nll, _ in by_row) / tokens) if tokens else None


def plan(recipe: Recipe, model: str, out_dir: Path) -> Step:
    """This stage's inputs: its config, the input model, every data file (see hippocrates.record)."""
    cfg = recipe.stages.cpt
    data = [describe(s) for s in cfg.data] + [{**describe(s), "role": "eval"} for s in cfg.eval_data]
    return stage_run.training_step("cpt", recipe, model, cfg.model_dump(mode="json"), data)


def run_cpt(
    recipe: Recipe,
    model_path: str,
    out_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    report_to: list[str] | None = None,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """Train a LoRA on the recipe's CPT corpus, merge it, and write OUTPUT/cpt (see docs/CONTRACTS.md)."""
    cfg = recipe.stages.cpt
    if not cfg.data:
        raise HippoError(f"{recipe.where('stages.cpt.data')}: no training corpus given")
    streaming = any(s.streaming for s in cfg.data)
    if streaming and cfg.train.max_steps <= 0:
        raise HippoError(
            f"{recipe.where('stages.cpt.train.max_steps')}: a streamed corpus has no known length; set max_steps > 0"
        )
    step = plan(recipe, model_path, Path(out_dir))
    stats: Counter = Counter()
    texts = None if streaming else list(iter_corpus(cfg.data, recipe.seed, stats))  # validated before writing
    if texts is not None and not texts:
        raise HippoError(f"stages.cpt.data: no training text ({stats['documents']} documents, all empty)")
    eval_stats: Counter = Counter()
    eval_texts = [t for s in cfg.eval_data for t in iter_texts(s, eval_stats)]
    run = stage_run.begin_stage(
        step,
        recipe,
        Path(out_dir),
        resume=resume,
        overwrite=overwrite,
        report_to=report_to,
        callbacks=callbacks,
    )
    from hippocrates.stages.modeling import (
        GeneratorDataset,
        PackedCollator,
        SupervisedTokenTrainer,
        held_out_change,
        nll_by_row,
    )

    model, tokenizer = stage_run.load_for_training(run)
    block = cfg.train.max_seq_len
    if texts is None:
        train_data: Any = GeneratorDataset(
            lambda: streamed_rows(cfg.data, tokenizer, block, recipe.seed, stats)
        )
    else:
        train_data = [as_row(ids) for ids in iter_blocks(iter(texts), tokenizer, block)]
        stats["train_blocks"] = len(train_data)
        stats["train_tokens"] = sum(len(r["input_ids"]) for r in train_data)
        status(f"cpt: {stats['documents']} documents -> {len(train_data)} blocks of <= {block} tokens")
    if stats["empty_dropped"]:
        status(f"cpt: dropped {stats['empty_dropped']} empty documents")
    eval_rows = [as_row(ids) for ids in iter_blocks(iter(eval_texts), tokenizer, block)]
    if not cfg.eval_data:
        run.notes.append("no stages.cpt.eval_data: held-out perplexity not measured")

    from transformers import TrainingArguments

    model = stage_run.wrap_lora(model, cfg.lora, cfg.train, recipe.seed)
    collator = PackedCollator(tokenizer.pad_token_id)
    trainer = SupervisedTokenTrainer(
        model=model,
        args=TrainingArguments(**stage_run.trainer_kwargs(run, cfg.train)),
        train_dataset=train_data,
        data_collator=collator,
        callbacks=run.callbacks,
    )
    rows_before = nll_by_row(trainer.model, eval_rows, collator, run.precision)
    ppl_before = perplexity(rows_before)
    if ppl_before is not None:
        status(f"cpt: held-out perplexity before training {ppl_before:.3f}")
    stage_run.train(run, trainer)
    rows_after = nll_by_row(trainer.model, eval_rows, collator, run.precision)
    ppl_after = perplexity(rows_after)
    change = held_out_change(rows_before, rows_after)
    if ppl_after is not None:
        interval = (
            f" (NLL change {change['nll_change']:+.4f} [{change['nll_change_ci_low']:+.4f}, "
            f"{change['nll_change_ci_high']:+.4f}] over {change['rows']} blocks)"
            if change
            else ""
        )
        status(f"cpt: held-out perplexity after training {ppl_after:.3f}{interval}")
    summary = stage_run.train_summary(trainer)
    metrics = {
        **{k: v for k, v in summary.items() if k != "log_history"},
        "eval_perplexity_before": ppl_before,
        "eval_perplexity_after": ppl_after,
        "eval_change": change or None,
        "eval_blocks": len(eval_rows),
        "documents": stats["documents"],
        "empty_documents_dropped": stats["empty_dropped"] + eval_stats["empty_dropped"],
        "train_blocks": stats["train_blocks"],
        "train_tokens": stats["train_tokens"],
        "tokens_per_s": _rate(trainer.supervised_tokens, summary["train_runtime_s"]),
        "streaming": streaming,
        "log_history": summary["log_history"],
    }
    adapter = stage_run.save_adapter(run, trainer)
    probe = stage_run.probe_rows(eval_rows or (train_data if isinstance(train_data, list) else []))
    del trainer, model
    return stage_run.finish_stage(run, adapter, tokenizer, metrics, probe)


def _rate(tokens: int, seconds: float | None) -> float | None:
    return round(tokens / seconds, 1) if seconds else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, "cpt")


def run(args: argparse.Namespace) -> int:
    return run_stage_command(
        args, "cpt", run_cpt, ["eval_perplexity_before", "eval_perplexity_after", "train_loss"]
    )
