"""``hippo dpo``: direct preference optimisation with LoRA, on TRL's DPOTrainer.

The reference model is the policy with its adapter disabled (``ref_model=None`` with a PEFT model),
so there is no second copy of the weights in memory. Pairs whose chosen and rejected answers are
identical teach nothing and are counted, dropped and reported.

A seeded share of the *prompts* (``eval_fraction``) is held out with all their pairs, so with
three or more candidates per question no prompt sits on both sides of the split. On those pairs
we measure, before and after training, the reward accuracy: the share of pairs whose implicit
reward ``beta * (log pi(y|x) - log pi_ref(y|x))`` is higher for the chosen answer, a tie counting
one half. Before training the policy is the reference, every reward is exactly 0 and the
accuracy is 0.5: chance, not the 0 that a strict comparison would print.
"""

from __future__ import annotations

import argparse
import contextlib
import random
from collections import Counter
from pathlib import Path
from typing import Any

from hippocrates import chat
from hippocrates.config import Recipe, Source
from hippocrates.data.sources import describe, iter_records
from hippocrates.errors import HippoError
from hippocrates.progress import status
from hippocrates.record import Step
from hippocrates.stages import run as stage_run
from hippocrates.stages.cli import add_stage_arguments, run_stage_command

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


def plan(recipe: Recipe, model: str, out_dir: Path) -> Step:
    """This stage's inputs: its config, the input model, the preference files (see hippocrates.record)."""
    data = [describe(s) for s in preference_sources(recipe, out_dir)]
    config = {**recipe.stages.dpo.model_dump(mode="json"), "template": recipe.stages.sft.template}
    return stage_run.training_step("dpo", recipe, model, config, data)


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


def split_by_prompt(pairs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded train / held-out split of whole prompts (each prompt's pairs stay on one side).

    Prompts are taken in a seeded order until the held-out side has at least ``fraction`` of the
    pairs; with a positive fraction and two or more prompts, each side gets at least one prompt.
    """
    prompts = list(dict.fromkeys(p["prompt"] for p in pairs))
    if fraction <= 0 or len(prompts) < 2:
        return list(pairs), []
    random.Random(seed).shuffle(prompts)
    per_prompt = Counter(p["prompt"] for p in pairs)
    held: set[str] = set()
    for prompt in prompts[:-1]:  # always leave one prompt for training
        if sum(per_prompt[q] for q in held) >= fraction * len(pairs):
            break
        held.add(prompt)
    return [p for p in pairs if p["prompt"] not in held], [p for p in pairs if p["prompt"] in held]


def to_trl(pairs: list[dict], tokenizer, fmt: chat.Format):
    """A datasets.Dataset in TRL's conversational (chat template) or plain-text (Alpaca) form."""
    from datasets import Dataset

    if fmt == "chat":
        rows = [
            {
                "prompt": chat.user(p["prompt"]),
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}],
            }
            for p in pairs
        ]
    else:  # TRL appends EOS to plain-text answers itself
        rows = [{**p, "prompt": chat.render(tokenizer, chat.user(p["prompt"]), "alpaca")} for p in pairs]
    return Dataset.from_list(rows)


def prompt_lengths(tokenizer, fmt: chat.Format, pairs: list[dict]) -> list[int]:
    special = chat.adds_special_tokens(fmt)
    return [
        len(
            tokenizer(chat.render(tokenizer, chat.user(p["prompt"]), fmt), add_special_tokens=special)[
                "input_ids"
            ]
        )
        for p in pairs
    ]


def count_overlong(tokenizer, fmt: chat.Format, pairs: list[dict], max_len: int) -> int:
    """Pairs whose prompt + chosen or prompt + rejected exceed max_seq_len (TRL truncates them)."""
    special = chat.adds_special_tokens(fmt)
    over = 0
    for p in pairs:
        lengths = [
            len(
                tokenizer(
                    chat.render(tokenizer, [*chat.user(p["prompt"]), {"role": "assistant", "content": p[k]}], fmt,
                                add_generation_prompt=False),
                    add_special_tokens=special,
                )["input_ids"]
            )
            for k in ("chosen", "rejected")
        ]  # fmt: skip
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


def _completion_logps(
    model, rows: list[tuple[list[int], list[int]]], max_len: int, precision: str
) -> list[float]:
    """Summed log-probability of each completion after its prompt (truncated like TRL: keep the start)."""
    import torch

    from hippocrates.stages.modeling import autocast_for

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode(), autocast_for(model, precision):
        for prompt_ids, completion_ids in rows:
            ids = (prompt_ids + completion_ids)[:max_len]
            n_prompt = len(prompt_ids)
            if len(ids) <= n_prompt:
                out.append(0.0)
                continue
            logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float()
            logp = torch.log_softmax(logits[n_prompt - 1 : len(ids) - 1], dim=-1)
            target = torch.tensor(ids[n_prompt:], device=device)
            out.append(float(logp.gather(1, target[:, None]).sum()))
    return out


def reward_accuracy(trainer, beta: float, max_len: int, precision: str) -> dict[str, float | None]:
    """Held-out reward accuracy (a tie counts 1/2) and mean margin, from TRL's own tokenized pairs."""
    data = trainer.eval_dataset
    if data is None or len(data) == 0:
        return {"accuracy": None, "margin": None, "ties": None}
    model = trainer.model
    was_training = model.training
    model.eval()
    chosen = [(r["prompt_ids"], r["chosen_ids"]) for r in data]
    rejected = [(r["prompt_ids"], r["rejected_ids"]) for r in data]
    try:
        policy_c = _completion_logps(model, chosen, max_len, precision)
        policy_r = _completion_logps(model, rejected, max_len, precision)
        with model.disable_adapter():
            ref_c = _completion_logps(model, chosen, max_len, precision)
            ref_r = _completion_logps(model, rejected, max_len, precision)
    finally:
        model.train(was_training)
    margins = [
        beta * ((pc - rc) - (pr - rr))
        for pc, rc, pr, rr in zip(policy_c, ref_c, policy_r, ref_r, strict=True)
    ]
    score = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)
    return {
        "accuracy": score / len(margins),
        "margin": sum(margins) / len(margins),
        "ties": sum(m == 0 for m in margins),
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
    step = plan(recipe, model_path, Path(out_dir))
    stats: Counter = Counter()
    pairs = load_pairs(sources, stats)  # validated before anything is written
    if not pairs:
        raise HippoError(f"{sources[0].path}: empty dataset (no usable preference pairs)")
    run = stage_run.begin_stage(
        step,
        recipe,
        Path(out_dir),
        resume=resume,
        overwrite=overwrite,
        report_to=report_to,
        callbacks=callbacks,
    )
    if stats["identical_dropped"]:
        line = f"{stats['identical_dropped']} of {stats['pairs']} pairs dropped: chosen and rejected are identical"
        status(f"dpo: {line}")
        run.notes.append(line)
    model, tokenizer = stage_run.load_for_training(run)
    fmt = chat.choose_format(tokenizer, recipe.stages.sft.template)
    max_len = cfg.train.max_seq_len
    lengths = prompt_lengths(tokenizer, fmt, pairs)
    if all(n >= max_len for n in lengths):
        stage_run.abandon(run)
        raise HippoError(
            f"{recipe.where('stages.dpo.train.max_seq_len')}: {max_len} tokens leave no room for an answer "
            f"after any prompt (the shortest prompt has {min(lengths)} tokens); raise it"
        )
    too_long = sum(n >= max_len for n in lengths)
    if too_long:
        line = f"{too_long} pairs dropped: their prompt alone fills max_seq_len={max_len}"
        status(f"dpo: {line}")
        run.notes.append(line)
        pairs = [p for p, n in zip(pairs, lengths, strict=True) if n < max_len]
    train_pairs, eval_pairs = split_by_prompt(pairs, cfg.eval_fraction, recipe.seed)
    overlong = count_overlong(tokenizer, fmt, pairs, max_len)
    if overlong:
        line = f"{overlong} pairs longer than max_seq_len={max_len} are truncated"
        status(f"dpo: {line}")
        run.notes.append(line)
    held_prompts = len({p["prompt"] for p in eval_pairs})
    status(
        f"dpo: {len(train_pairs)} training pairs, {len(eval_pairs)} held out "
        f"({held_prompts} prompts; {fmt} template)"
    )

    from trl import DPOConfig, DPOTrainer

    kwargs = stage_run.trainer_kwargs(run, cfg.train)
    kwargs.pop("remove_unused_columns")  # TRL keeps only its tokenized columns
    args = DPOConfig(
        **kwargs,
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        max_length=max_len,
        precompute_ref_log_probs=False,
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=to_trl(train_pairs, tokenizer, fmt),
        eval_dataset=to_trl(eval_pairs, tokenizer, fmt) if eval_pairs else None,
        processing_class=tokenizer,
        peft_config=stage_run.peft_config(cfg.lora),
        callbacks=run.callbacks,
    )
    with lean_fused_head():
        before = reward_accuracy(trainer, cfg.beta, max_len, run.precision)
        stage_run.train(run, trainer)
        after = reward_accuracy(trainer, cfg.beta, max_len, run.precision)
    if eval_pairs:
        status(
            f"dpo: held-out reward accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} "
            f"(ties count 1/2), mean margin {after['margin']:.4f}"
        )
    summary = stage_run.train_summary(trainer)
    metrics = {
        **{k: v for k, v in summary.items() if k != "log_history"},
        "eval_reward_accuracy_before": before["accuracy"],
        "eval_reward_accuracy_after": after["accuracy"],
        "eval_reward_margin_before": before["margin"],
        "eval_reward_margin_after": after["margin"],
        "eval_reward_ties_after": after["ties"],
        "eval_reward_margin": after["margin"],
        "reward_accuracy_definition": "share of held-out pairs with a higher implicit reward for chosen; ties count 1/2",
        "template": fmt,
        "beta": cfg.beta,
        "loss_type": cfg.loss_type,
        "pairs": stats["pairs"],
        "identical_dropped": stats["identical_dropped"],
        "prompt_too_long_dropped": too_long,
        "overlong_truncated": overlong,
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "eval_prompts": held_prompts,
        "log_history": summary["log_history"],
    }
    adapter = stage_run.save_adapter(run, trainer)
    probe_data = trainer.eval_dataset if trainer.eval_dataset is not None else trainer.train_dataset
    probe = [
        list(r["prompt_ids"]) + list(r["chosen_ids"])
        for r in probe_data.select(range(min(4, len(probe_data))))
    ]
    del trainer, model
    return stage_run.finish_stage(
        run, adapter, tokenizer, metrics, stage_run.probe_rows([{"input_ids": p} for p in probe])
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, "dpo")


def run(args: argparse.Namespace) -> int:
    return run_stage_command(
        args,
        "dpo",
        run_dpo,
        ["eval_reward_accuracy_before", "eval_reward_accuracy_after", "eval_reward_margin"],
    )
