"""Prompt strategies and few-shot contexts, assembled exactly as lm-eval assembles them.

Strategies:
  * ``hippocrates`` - the paper's protocol (lm-eval v0.3 era): ``Question: ...\\n(A) opt (B) opt\\nAnswer:``
    scored on ``" " + option text``; PubMedQA: ``Abstract: ...\\nQuestion: ...\\nAnswer:`` on yes/no/maybe.
  * ``letter`` - today's lm-eval: ``A. opt`` lines, then ``Answer:``, scored on ``" A"``.
  * ``stepwise`` - the hippocrates format after an instruction to think step by step; nothing is
    generated, it is still scored by log-likelihood (formerly ``cot``; ``hippo eval --mode generate``
    lets a model actually reason before answering).

Two protocols assemble the prompts:

``v0.4`` (default) mirrors lm-eval 0.4's ``fewshot_context`` so that an exported lm-eval task gives
the identical strings: ``description + (shot_q + " " + shot_answer + "\\n\\n") * k + question``,
continuations ``" " + choice``. With a chat template each shot is a user turn (its question)
and an assistant turn (its answer), as lm-eval's default ``fewshot_as_multiturn``; the
description, if any, is the system turn; a generation prompt is added and the continuation is the
bare choice. Exemplars are drawn like lm-eval's default sampler (``random.Random(seed)``
shared across the task's items in order; ``k + 1`` drawn and the item itself removed when the
pool is the evaluation set), so the same seed picks the same shots in both.

``v0.3`` is the paper's harness (lm-eval v0.3.0, ``evaluator.evaluate`` and
``Task.fewshot_context``): the task's documents are shuffled with ``random.Random(42)`` before
``limit`` applies, and that same generator then draws every item's exemplars in the shuffled
order (``rnd.sample(pool, k)`` from a separate pool; ``rnd.sample(pool, k + 1)`` minus the item when
the pool is the evaluation set). Context and continuation are encoded separately and without
special tokens (see :class:`hippocrates.eval.scorer.V03Tokenizer`). It has no chat templates.

Either way an exemplar is never a duplicate of the item it precedes: items repeated in the
evaluation file are scored once (:mod:`hippocrates.eval.loaders`), and pool items that repeat an
evaluation item are removed from the pool and counted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from hippocrates.data.benchmarks import LETTERS, Item
from hippocrates.errors import HippoError
from hippocrates.eval.loaders import TaskData
from hippocrates.eval.registry import TaskSpec

STRATEGIES = ("hippocrates", "letter", "stepwise")
PROTOCOLS = ("v0.4", "v0.3")
V03_SHUFFLE_SEED = 42  # lm-eval v0.3.0's evaluator: rnd.seed(42); rnd.shuffle(task_docs)
STEPWISE_PREAMBLE = (
    "The following are questions about medicine, each followed by its answer. "
    "Think through each question step by step before answering.\n\n"
)
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
DEFAULT_SEED = 1234  # lm-eval's default fewshot_random_seed


@dataclass
class Prompt:
    """What the scorer sees for one item: one context, one continuation per option."""

    item: Item
    context: str
    continuations: list[str]
    choices: list[str]
    shot_ids: list[str]


def description(strategy: str) -> str:
    """Text before the shots (lm-eval's task ``description``)."""
    return STEPWISE_PREAMBLE if strategy == "stepwise" else ""


def question_turn(spec: TaskSpec, item: Item, strategy: str) -> str:
    """The item's own text, ending in ``Answer:`` (lm-eval's ``doc_to_text``)."""
    if spec.template == "abstract":
        return f"Abstract: {item.context}\nQuestion: {item.question}\nAnswer:"
    if strategy == "letter":
        lines = "".join(f"{LETTERS[i]}. {opt}\n" for i, opt in enumerate(item.options))
        return f"Question: {item.question}\n{spec.letter_header}{lines}Answer:"
    listed = " ".join(f"({LETTERS[i]}) {opt}" for i, opt in enumerate(item.options))
    return f"Question: {item.question}\n{listed}\nAnswer:"


def choices(spec: TaskSpec, item: Item, strategy: str) -> list[str]:
    """The scored strings without the delimiter (lm-eval's ``doc_to_choice``)."""
    if strategy == "letter" and spec.template == "options":
        return [LETTERS[i] for i in range(len(item.options))]
    return list(item.options)


def _room(pool: list[Item], pool_is_eval: bool, k: int) -> None:
    room = len(pool) - (1 if pool_is_eval else 0)
    if k > room:
        raise HippoError(f"--num-fewshot {k} is larger than the few-shot pool ({room} exemplars)")


def _draw(rnd: random.Random, item: Item, pool: list[Item], pool_is_eval: bool, k: int) -> list[Item]:
    if pool_is_eval:
        drawn = [pool[i] for i in rnd.sample(range(len(pool)), k + 1)]
        return [s for s in drawn if s.id != item.id][:k]
    return [pool[i] for i in rnd.sample(range(len(pool)), k)]


def sample_shots(
    items: list[Item], pool: list[Item], pool_is_eval: bool, k: int, seed: int
) -> list[list[Item]]:
    """Exemplars per item, drawn like lm-eval 0.4's ContextSampler (never the item itself)."""
    if k == 0:
        return [[] for _ in items]
    _room(pool, pool_is_eval, k)
    rnd = random.Random(seed)
    return [_draw(rnd, item, pool, pool_is_eval, k) for item in items]


def order_v03(items: list[Item], limit: int | None) -> tuple[list[Item], random.Random]:
    """lm-eval v0.3's document order: all documents shuffled with Random(42), then the first ``limit``.

    Returns the generator too: v0.3 draws the exemplars from it, after the shuffle.
    """
    rnd = random.Random()
    rnd.seed(V03_SHUFFLE_SEED)
    docs = list(items)
    rnd.shuffle(docs)
    return docs[:limit] if limit else docs, rnd


def select(data: TaskData, *, limit: int | None, protocol: str, num_fewshot: int, seed: int):
    """The items to score, in order, and each one's exemplars, under ``protocol``."""
    if protocol == "v0.3":
        items, rnd = order_v03(data.items, limit)
        if num_fewshot == 0:
            return items, [[] for _ in items]
        _room(data.pool, data.pool_is_eval, num_fewshot)
        return items, [_draw(rnd, item, data.pool, data.pool_is_eval, num_fewshot) for item in items]
    if protocol != "v0.4":
        raise HippoError(f"unknown protocol '{protocol}' (choose from {', '.join(PROTOCOLS)})")
    items = data.items[:limit] if limit else list(data.items)
    return items, sample_shots(items, data.pool, data.pool_is_eval, num_fewshot, seed)


def build_prompts(
    data: TaskData,
    items: list[Item] | None = None,
    *,
    limit: int | None = None,
    num_fewshot: int = 0,
    strategy: str = "hippocrates",
    chat_template: bool = False,
    tokenizer: Any = None,
    seed: int = DEFAULT_SEED,
    protocol: str = "v0.4",
) -> list[Prompt]:
    """Contexts and continuations for the task's items (or ``items``), with seeded exemplars."""
    from hippocrates import chat

    if strategy not in STRATEGIES:
        raise HippoError(f"unknown prompt strategy '{strategy}' (choose from {', '.join(STRATEGIES)})")
    if chat_template and protocol == "v0.3":
        raise HippoError("protocol v0.3 (the paper's harness) has no chat templates; drop --chat-template")
    if chat_template and not chat.has_template(tokenizer):
        raise HippoError("--chat-template: this model's tokenizer has no chat template")
    spec = data.spec
    if items is not None:
        data = TaskData(spec, items, data.pool, data.pool_is_eval, data.source, data.sha256, data.pool_source)
    chosen, all_shots = select(data, limit=limit, protocol=protocol, num_fewshot=num_fewshot, seed=seed)
    desc = description(strategy)
    prompts = []
    for item, shots in zip(chosen, all_shots, strict=True):
        shot_text = "".join(
            question_turn(spec, s, strategy)
            + TARGET_DELIMITER
            + choices(spec, s, strategy)[s.gold]
            + FEWSHOT_DELIMITER
            for s in shots
        )
        question = question_turn(spec, item, strategy)
        opts = choices(spec, item, strategy)
        if chat_template:  # shots as user/assistant turns (lm-eval's fewshot_as_multiturn default)
            messages = [{"role": "system", "content": desc}] if desc else []
            for s in shots:
                messages.append({"role": "user", "content": question_turn(spec, s, strategy)})
                messages.append({"role": "assistant", "content": choices(spec, s, strategy)[s.gold]})
            messages.append({"role": "user", "content": question})
            context, conts = chat.render(tokenizer, messages, "chat"), list(opts)
        else:
            context, conts = desc + shot_text + question, [TARGET_DELIMITER + o for o in opts]
        prompts.append(Prompt(item, context, conts, opts, [s.id for s in shots]))
    return prompts
