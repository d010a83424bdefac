"""``hippo dpo``: direct preference optimisation with LoRA, on TRL's DPOTrainer.

The reference model is the policy with its adapter disabled (``ref_model=None`` with a PEFT model),
so there is no second copy of the weights in memory. Pairs whose chosen and rejected answers are
identical teach nothing and are counted, dropped and reported. Reward accuracy and margin on a
held-out split (``eval_fraction``) are measured before and after training; before training the
policy equals the reference, so every reward is 0 and the accuracy (chosen strictly above rejected)
is 0 by construction.
"""

from __future__ import annotations

import argparse
import contextlib
import random
from collections import Counter
from pathlib import Path
from typing import Any

from hippocrates.config import Recipe, Source
from hippocrates.data.sources import describe, iter_records
from hippocrates.errors import HippoError
from hippocrates.progress import status
from hippocrates.stages import common
from hippocrates.stages.sft import ALPACA, choose_template, render

FIELDS = ("prompt", "chosen", "rejected")


def preference_sources(recipe: Recipe, out_dir: Path) -> list[Source]:
    """stages.dpo.data, or by default the annotate output beside this stage (OUTPUT/annotate/preferences.jsonl)."""
    if recipe.stages.dpo.data:
        return recipe.stages.dpo.data
    path = Path(out_dir).parent / "annotate" / "preferences.jsonl"
    if not path.is_file():
        raise HippoError(
            f"{path}: no preference data; run the annotate stage first (hippo pipeline runs it) "
            "or list files under stages.dpo.data"
        )
    return [Source(path=str(path), kind="general")]


def stage_inputs(recipe: Recipe, out_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The resolved config and data identities that make up this stage's inputs hash."""
    data = [describe(s) for s in preference_sources(recipe, out_dir)]
    return {**recipe.stages.dpo.model_dump(mode="json"), "template": recipe.stages.sft.template}, data


def load_pairs(sources: list[Source], stats: Counter) -> list[dict[str, str]]:
    """Validated (prompt, chosen, rejected) string triples; identical pairs are counted and dropped."""
    pairs = []
    for source in sources:
        for where, record in iter_records(source):
            for name in FIELDS:
                value = record.get(name)
                if not isinstance(value, str) or not value.strip():
                    have = ", ".join(sorted(record)) or "none"
                    raise HippoError(f"{where}: missing field '{name}' (a non-empty string; have: {have})")
            stats["pairs"] += 1
            if record["chosen"].strip() == record["rejected"].strip():
                stats["identical_dropped"] += 1
                continue
            pairs.append({k: record[k] for k in FIELDS})
    return pairs


def split_pairs(pairs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded train / held-out split; at least one pair each side when the fraction is positive."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(pairs) * fraction)
    if fraction > 0 and len(pairs) >= 2:
        n_eval = min(max(n_eval, 1), len(pairs) - 1)
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


def to_trl(pairs: list[dict], fmt: str):
    """A datasets.Dataset in TRL's conversational (chat template) or plain-text (Alpaca) form."""
    from datasets import Dataset

    if fmt == "chat":
        rows = [
            {
                "prompt": [{"role": "user", "content": p["prompt"]}],
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}],
            }
            for p in pairs
        ]
    else:
        rows = [{**p, "prompt": ALPACA.format(instruction=p["prompt"])} for p in pairs]
    return Dataset.from_list(rows)


def count_overlong(tokenizer, fmt: str, pairs: list[dict], max_len: int) -> int:
    """Pairs whose prompt + chosen or prompt + rejected exceed max_seq_len (TRL truncates them)."""
    over = 0
    for p in pairs:
        lengths = [
            len(
                tokenizer(
                    render(tokenizer, fmt, {"instruction": p["prompt"], "input": "", "output": p[k]})[1]
                )["input_ids"]
            )
            for k in ("chosen", "rejected")
        ]
        over += max(lengths) > max_len
    return over


@contextlib.contextmanager
def lean_fused_head():
    """Make TRL's fused LM head lean on CPU while DPO runs.

    On CPU, TRL scores every position (prompt and padding too) in 4096 x 32768-vocab tiles, which
    for a 49k vocabulary means about a gigabyte of temporaries per forward and dominates DPO's peak
    memory. Scoring only completion positions (what it already does on GPUs) in 4096-wide vocab tiles
    gives the same log-probabilities with a fraction of the memory and compute. The two knobs are
    private module attributes of trl.trainer.utils; if a TRL release renames them, nothing is changed.
    """
    import torch
    import trl.trainer.utils as tu

    names = ("_CHUNKED_LOGPROB_CHUNK_SIZE", "_use_triton")
    if torch.cuda.is_available() or not all(hasattr(tu, n) for n in names):
        yield
        return
    saved = {n: getattr(tu, n) for n in names}
    tu._CHUNKED_LOGPROB_CHUNK_SIZE = 4096
    tu._use_triton = lambda device: True  # in this module it only selects compaction of the scored positions
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(tu, n, v)


def largest_divisor(n: int, limit: int) -> int:
    """Eval batch size dividing the held-out set exactly, so TRL's per-batch means are exact means."""
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0) if n else 1


def reward_metrics(trainer, suffix: str) -> dict[str, float | None]:
    if trainer.eval_dataset is None:
        return {f"eval_reward_accuracy_{suffix}": None, f"eval_reward_margin_{suffix}": None}
    m = trainer.evaluate()
    return {
        f"eval_reward_accuracy_{suffix}": m.get("eval_rewards/accuracies"),
        f"eval_reward_margin_{suffix}": m.get("eval_rewards/margins"),
        f"eval_loss_{suffix}": m.get("eval_loss"),
    }


def run_dpo(
    recipe: Recipe,
    model_path: str,
    out_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    report_to: list[str] | None = None,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """Train a DPO LoRA on preference pairs, merge it, and write OUTPUT/dpo (see docs/CONTRACTS.md)."""
    cfg = recipe.stages.dpo
    sources = preference_sources(recipe, Path(out_dir))
    config, data = stage_inputs(recipe, Path(out_dir))
    stats: Counter = Counter()
    pairs = load_pairs(sources, stats)  # validated before anything is written
    if not pairs:
        raise HippoError(f"{sources[0].path}: empty dataset (no usable preference pairs)")
    run = common.begin_stage(
        "dpo",
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
    if stats["identical_dropped"]:
        line = f"{stats['identical_dropped']} of {stats['pairs']} pairs dropped: chosen and rejected are identical"
        status(f"dpo: {line}")
        run.notes.append(line)
    train_pairs, eval_pairs = split_pairs(pairs, cfg.eval_fraction, recipe.seed)
    model, tokenizer = common.load_for_training(run)
    fmt = choose_template(tokenizer, recipe.stages.sft.template)
    overlong = count_overlong(tokenizer, fmt, pairs, cfg.train.max_seq_len)
    if overlong:
        line = f"{overlong} pairs longer than max_seq_len={cfg.train.max_seq_len} are truncated"
        status(f"dpo: {line}")
        run.notes.append(line)
    status(f"dpo: {len(train_pairs)} training pairs, {len(eval_pairs)} held out ({fmt} template)")

    from trl import DPOConfig, DPOTrainer

    kwargs = common.trainer_kwargs(run, cfg.train)
    kwargs.pop("remove_unused_columns")  # TRL keeps only its tokenized columns
    kwargs["per_device_eval_batch_size"] = largest_divisor(len(eval_pairs), 2 * cfg.train.batch_size)
    args = DPOConfig(
        **kwargs,
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        max_length=cfg.train.max_seq_len,
        precompute_ref_log_probs=False,
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=to_trl(train_pairs, fmt),
        eval_dataset=to_trl(eval_pairs, fmt) if eval_pairs else None,
        processing_class=tokenizer,
        peft_config=common.peft_config(cfg.lora),
        callbacks=run.callbacks,
    )
    with lean_fused_head():
        before = reward_metrics(trainer, "before")
        trainer.train(resume_from_checkpoint=run.resume_from)
        after = reward_metrics(trainer, "after")
    if eval_pairs:
        status(
            f"dpo: held-out reward accuracy {before['eval_reward_accuracy_before']:.3f} -> "
            f"{after['eval_reward_accuracy_after']:.3f}, margin {after['eval_reward_margin_after']:.4f}"
        )
    summary = common.train_summary(trainer, run)
    metrics = {
        **{k: v for k, v in summary.items() if k != "log_history"},
        **before,
        **after,
        "eval_reward_margin": after["eval_reward_margin_after"],
        "template": fmt,
        "beta": cfg.beta,
        "loss_type": cfg.loss_type,
        "pairs": stats["pairs"],
        "identical_dropped": stats["identical_dropped"],
        "overlong_truncated": overlong,
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "log_history": summary["log_history"],
    }
    return common.finish_stage(run, trainer.model, tokenizer, metrics)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_stage_arguments(parser, "dpo")


def run(args: argparse.Namespace) -> int:
    return common.run_stage_command(
        args,
        "dpo",
        run_dpo,
        ["eval_reward_accuracy_before", "eval_reward_accuracy_after", "eval_reward_margin"],
    )
