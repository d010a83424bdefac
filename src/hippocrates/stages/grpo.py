"""``hippo grpo``: reinforcement learning with verifiable rewards, on TRL's GRPOTrainer with LoRA.

For each multiple-choice question with a known answer the model samples ``group_size`` answers,
each is rewarded, and the policy moves towards the better-than-average answers of its group
(GRPO; Med-RLVR and AlphaMed train medical models this way with a plain correct/incorrect reward).
Questions are asked exactly as generative evaluation asks them (:func:`hippocrates.eval.extract.ask`,
"reason, then end with Answer: X"), and answers are read back with the same rules
(:func:`hippocrates.eval.extract.extract`), so training and evaluation agree.

Rewards, weighted by ``stages.grpo.rewards``: ``correct`` (1 when the extracted answer is the gold
option), ``format`` (1 when the last line is a parseable ``Answer: X``), ``length`` (minus the share
of the budget used) and your own functions by import path. Questions come from the sources' train
splits; a question that is also in one of the recipe's evaluation sets is refused, not trained on.
Held-out generative accuracy, the unparsed rate and the mean reward are measured before and after.
"""

from __future__ import annotations

import argparse
import importlib
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hippocrates import chat
from hippocrates.config import Recipe, Source
from hippocrates.data.benchmarks import Item, item_key
from hippocrates.data.sources import benchmark_reader, describe, is_local, iter_records
from hippocrates.errors import HippoError
from hippocrates.eval.extract import ask, extract, is_lettered
from hippocrates.progress import status
from hippocrates.record import Step
from hippocrates.stages import run as stage_run
from hippocrates.stages.cli import add_stage_arguments, run_stage_command

Reward = Callable[..., list[float]]


# ------------------------------------------------------------------------------------------ questions


def load_items(source: Source, stats: Counter | None = None) -> list[Item]:
    """The questions of one source, read by the one benchmark reader (train split: never test PMIDs)."""
    from hippocrates.data.benchmarks import detect_format, read_benchmark

    fmt = source.format
    if fmt == "auto":
        first = next(iter_records(source), None)
        fmt = (detect_format(first[1]) if first else None) or "auto"
    if fmt not in ("medqa", "medmcqa", "pubmedqa", "usmle", "mc"):
        raise HippoError(
            f"{source.path}: GRPO needs multiple-choice questions with known answers "
            f"(format: medqa, medmcqa, pubmedqa, usmle or mc; this file is {fmt})"
        )
    if not is_local(source):
        raise HippoError(
            f"{source.path}: GRPO reads local benchmark files (save the hub split to a file first)"
        )
    read = read_benchmark(
        benchmark_reader(source, fmt), Path(source.path).expanduser(), prefix=Path(source.path).stem
    )
    if stats is not None:
        stats["unusable_records"] += len(read.skipped)
        stats["repeated_records"] += len(read.duplicates)
        if read.skipped or read.duplicates:
            status(
                f"grpo: {source.path}: left out {len(read.skipped)} unusable and {len(read.duplicates)} repeated record(s)"
            )
    items = read.items[: source.max_samples] if source.max_samples else read.items
    if not items:
        raise HippoError(f"{source.path}: no usable questions")
    return items


def refuse_evaluation_items(recipe: Recipe, items: list[Item], key: str) -> None:
    """GRPO never trains on evaluation items: any question of the recipe's eval sets is refused."""
    from hippocrates.data.check import eval_items, eval_specs, normal

    train = {normal(item.question): item.id for item in items}
    specs = eval_specs(recipe)
    for task, path in sorted(recipe.eval.data.items()):
        if not Path(path).is_file():
            continue
        read = eval_items(specs.get(task, task), path)
        clashes = [train[normal(question)] for question, _ in read if normal(question) in train]
        if clashes:
            raise HippoError(
                f"{recipe.where(key)}: {len(clashes)} question(s) are also in the evaluation set eval.data.{task} "
                f"(e.g. {clashes[0]}); GRPO never trains on evaluation items: use the train split"
            )


def prompt_of(item: Item, system: str | None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + chat.user(ask(item))


def to_trl(items: list[Item], tokenizer, fmt: chat.Format, system: str | None):
    """A datasets.Dataset: the prompt (conversational, or rendered text for base models) and the key."""
    from datasets import Dataset

    rows = []
    for item in items:
        messages = prompt_of(item, system)
        prompt: Any = messages if fmt == "chat" else chat.render(tokenizer, messages, "alpaca")
        rows.append({"prompt": prompt, "gold": item.gold, "options": item.options, "lettered": is_lettered(item),
                     "item_id": item.id})  # fmt: skip
    return Dataset.from_list(rows)


# -------------------------------------------------------------------------------------------- rewards


def _text(completion: Any) -> str:
    return completion if isinstance(completion, str) else (completion[-1]["content"] if completion else "")


def correct(completions, gold, options, lettered, **_) -> list[float]:
    """1 when the answer read from the completion is the gold option, else 0."""
    return [
        1.0 if extract(_text(c), opts, lettered=letters).index == g else 0.0
        for c, g, opts, letters in zip(completions, gold, options, lettered, strict=True)
    ]


def answer_format(completions, options, lettered, **_) -> list[float]:
    """1 when the completion's last line is an ``Answer: X`` that names an option, else 0."""
    out = []
    for c, opts, letters in zip(completions, options, lettered, strict=True):
        lines = [line for line in _text(c).splitlines() if line.strip()]
        got = extract(lines[-1], opts, lettered=letters) if lines else None
        out.append(1.0 if got is not None and got.rule == "answer-line" else 0.0)
    return out


def length_penalty_for(budget: int) -> Reward:
    def length(completion_ids, **_) -> list[float]:
        """Minus the share of the thinking budget a completion used."""
        return [-min(len(ids), budget) / budget for ids in completion_ids]

    return length


def import_reward(path: str) -> Reward:
    """A reward function named ``package.module:function``; a wrong name is one line."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise HippoError(f"reward '{path}': give it as package.module:function")
    try:
        function = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise HippoError(f"reward '{path}': cannot import {module} ({exc})") from None
    except AttributeError:
        raise HippoError(f"reward '{path}': {module} has no function {name}") from None
    if not callable(function):
        raise HippoError(f"reward '{path}': {name} is not a function")
    return function


def reward_functions(recipe: Recipe) -> tuple[list[Reward], list[float]]:
    """The weighted rewards of the recipe (zero weights left out)."""
    cfg = recipe.stages.grpo
    table: list[tuple[Reward, float]] = [
        (correct, cfg.rewards.correct),
        (answer_format, cfg.rewards.format),
        (length_penalty_for(cfg.max_completion_length), cfg.rewards.length),
    ]
    table += [(import_reward(path), weight) for path, weight in cfg.rewards.custom.items()]
    kept = [(f, w) for f, w in table if w > 0]
    if not kept:
        raise HippoError(f"{recipe.where('stages.grpo.rewards')}: every reward weight is 0")
    return [f for f, _ in kept], [w for _, w in kept]


# ----------------------------------------------------------------------------------- held-out check


def held_out(model, tokenizer, items: list[Item], fmt: chat.Format, recipe: Recipe) -> dict[str, Any]:
    """Greedy answers to held-out questions: accuracy, unparsed share and mean weighted reward."""
    import torch

    from hippocrates.rlaif.sampling import RowSpec, generate

    if not items:
        return {"accuracy": None, "unparsed": None, "mean_reward": None, "n": 0}
    cfg = recipe.stages.grpo
    functions, weights = reward_functions(recipe)
    was_training = model.training
    model.eval()
    texts: list[str] = []
    prompts_all: list[str] = []
    try:
        with torch.no_grad():
            for start in range(0, len(items), 8):
                batch = items[start : start + 8]
                prompts = [chat.render(tokenizer, prompt_of(i, cfg.system_prompt), fmt) for i in batch]
                specs = [RowSpec(0, 0.0, 1.0, cfg.max_completion_length) for _ in batch]
                outs = generate(
                    model, tokenizer, prompts, specs, add_special_tokens=chat.adds_special_tokens(fmt)
                )
                texts += [o.text for o in outs]
                prompts_all += prompts
    finally:
        model.train(was_training)
    extra = {"gold": [i.gold for i in items], "options": [i.options for i in items],
             "lettered": [is_lettered(i) for i in items],
             "completion_ids": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]}  # fmt: skip
    per_function = [f(completions=texts, prompts=prompts_all, **extra) for f in functions]
    rewards = [sum(w * r[k] for w, r in zip(weights, per_function, strict=True)) for k in range(len(texts))]
    got = [extract(t, i.options, lettered=is_lettered(i)) for t, i in zip(texts, items, strict=True)]
    return {
        "accuracy": sum(g.index == i.gold for g, i in zip(got, items, strict=True)) / len(items),
        "unparsed": sum(not g.parsed for g in got) / len(items),
        "mean_reward": sum(rewards) / len(rewards),
        "n": len(items),
    }


# ------------------------------------------------------------------------------------------- stage


def plan(recipe: Recipe, model: str, out_dir: Path) -> Step:
    """This stage's inputs: its config, the input model, every question file (see hippocrates.record)."""
    cfg = recipe.stages.grpo
    data = [describe(s) for s in cfg.data] + [{**describe(s), "role": "eval"} for s in cfg.eval_data]
    return stage_run.training_step("grpo", recipe, model, cfg.model_dump(mode="json"), data)


def check_grpo(recipe: Recipe) -> None:
    """Everything GRPO will need, before any work (preflight): questions, no evaluation items, rewards."""
    cfg = recipe.stages.grpo
    if not cfg.data:
        raise HippoError(f"{recipe.where('stages.grpo.data')}: no training questions given")
    if cfg.train.batch_size % cfg.group_size:
        raise HippoError(
            f"{recipe.where('stages.grpo.train.batch_size')}: {cfg.train.batch_size} completions per step must be a "
            f"multiple of group_size {cfg.group_size}"
        )
    for i, source in enumerate(cfg.data):
        refuse_evaluation_items(recipe, load_items(source), f"stages.grpo.data.{i}")
    for source in cfg.eval_data:
        load_items(source)
    reward_functions(recipe)


def make_trainer(run: stage_run.StageRun, model, tokenizer, items: list[Item], fmt: chat.Format):
    """TRL's GRPOTrainer for this stage: our rewards and their weights, LoRA, the stage's settings."""
    from trl import GRPOConfig, GRPOTrainer

    cfg = run.recipe.stages.grpo
    functions, weights = reward_functions(run.recipe)
    args = GRPOConfig(
        **stage_run.trainer_kwargs(run, cfg.train),
        num_generations=cfg.group_size,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        beta=cfg.beta,
        reward_weights=weights,
        log_completions=False,
    )
    return GRPOTrainer(
        model=model,
        reward_funcs=functions,
        args=args,
        train_dataset=to_trl(items, tokenizer, fmt, cfg.system_prompt),
        processing_class=tokenizer,
        peft_config=stage_run.peft_config(cfg.lora),
        callbacks=run.callbacks,
    )


def run_grpo(
    recipe: Recipe,
    model_path: str,
    out_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    report_to: list[str] | None = None,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """Train a GRPO LoRA on the recipe's questions, merge it, and write OUTPUT/grpo."""
    cfg = recipe.stages.grpo
    check_grpo(recipe)
    stats: Counter = Counter()
    items = [item for s in cfg.data for item in load_items(s, stats)]
    held = [item for s in cfg.eval_data for item in load_items(s)]
    overlap = {item_key(i) for i in items} & {item_key(i) for i in held}
    if overlap:
        raise HippoError(
            f"{recipe.where('stages.grpo.eval_data')}: {len(overlap)} held-out question(s) are also training questions"
        )
    step = plan(recipe, model_path, Path(out_dir))
    run = stage_run.begin_stage(
        step,
        recipe,
        Path(out_dir),
        resume=resume,
        overwrite=overwrite,
        report_to=report_to,
        callbacks=callbacks,
    )
    model, tokenizer = stage_run.load_for_training(run)
    tokenizer.padding_side = "left"  # TRL generates the completions in left-padded batches
    fmt = chat.choose_format(tokenizer, recipe.stages.sft.template)
    functions, weights = reward_functions(recipe)
    status(f"grpo: {len(items)} questions, {cfg.group_size} answers each, rewards "
           f"{', '.join(f'{f.__name__}x{w:g}' for f, w in zip(functions, weights, strict=True))} ({fmt} template)")  # fmt: skip

    trainer = make_trainer(run, model, tokenizer, items, fmt)
    before = held_out(trainer.model, tokenizer, held, fmt, recipe)
    stage_run.train(run, trainer)
    after = held_out(trainer.model, tokenizer, held, fmt, recipe)
    if held:
        status(
            f"grpo: held-out generative accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, unparsed "
            f"{before['unparsed']:.3f} -> {after['unparsed']:.3f}, mean reward {before['mean_reward']:.3f} -> "
            f"{after['mean_reward']:.3f} ({len(held)} questions)"
        )
    else:
        run.notes.append("no stages.grpo.eval_data: held-out accuracy and reward not measured")
    summary = stage_run.train_summary(trainer)
    history = summary["log_history"]
    rewards = [
        h["reward"] for h in history if isinstance(h.get("reward"), float) and not math.isnan(h["reward"])
    ]
    metrics = {
        **{k: v for k, v in summary.items() if k != "log_history"},
        **{f"eval_{k}_before": v for k, v in before.items() if k != "n"},
        **{f"eval_{k}_after": v for k, v in after.items() if k != "n"},
        "eval_questions": len(held),
        "train_reward_first": rewards[0] if rewards else None,
        "train_reward_last": rewards[-1] if rewards else None,
        "questions": len(items),
        "records_left_out": dict(stats),
        "group_size": cfg.group_size,
        "template": fmt,
        "rewards": {f.__name__: w for f, w in zip(functions, weights, strict=True)},
        "log_history": history,
    }
    adapter = stage_run.save_adapter(run, trainer)
    probe = [
        tokenizer(chat.render(tokenizer, prompt_of(i, cfg.system_prompt), fmt))["input_ids"][:128]
        for i in (held or items)[:4]
    ]
    del trainer, model
    return stage_run.finish_stage(run, adapter, tokenizer, metrics, probe)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, "grpo")


def run(args: argparse.Namespace) -> int:
    return run_stage_command(
        args, "grpo", run_grpo, ["eval_accuracy_before", "eval_accuracy_after", "eval_mean_reward_after"]
    )
