"""Prompt strategies and few-shot contexts, assembled exactly as lm-eval assembles them.

Strategies:
  * ``hippocrates`` - the paper's protocol (lm-eval v0.3 era): ``Question: ...\\n(A) opt (B) opt\\nAnswer:``
    scored on ``" " + option text``; PubMedQA: ``Abstract: ...\\nQuestion: ...\\nAnswer:`` on yes/no/maybe.
  * ``letter`` - today's lm-eval: ``A. opt`` lines, then ``Answer:``, scored on ``" A"``.
  * ``cot`` - the hippocrates format after a step-by-step preamble; still scored by log-likelihood.

The assembly mirrors lm-eval 0.4's ``fewshot_context`` so that an exported lm-eval task gives
the identical strings: ``description + (shot_q + " " + shot_answer + "\\n\\n") * k + question``,
continuations ``" " + choice``. With a chat template each shot is a user turn (its question)
and an assistant turn (its answer), as lm-eval's default ``fewshot_as_multiturn``; the
description, if any, is the system turn; a generation prompt is added and the continuation is the
bare choice. Exemplars are drawn like lm-eval's default sampler (``random.Random(seed)``
shared across the task's items in order; ``k + 1`` drawn and the item itself removed when the
pool is the evaluation set), so the same seed picks the same shots in both.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from hippocrates.errors import HippoError
from hippocrates.eval.formats import LETTERS, Item
from hippocrates.eval.loaders import TaskData
from hippocrates.eval.registry import TaskSpec

STRATEGIES = ("hippocrates", "letter", "cot")
COT_PREAMBLE = (
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
    return COT_PREAMBLE if strategy == "cot" else ""


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


def sample_shots(
    items: list[Item], pool: list[Item], pool_is_eval: bool, k: int, seed: int
) -> list[list[Item]]:
    """Exemplars per item, drawn like lm-eval's ContextSampler (never the item itself)."""
    if k == 0:
        return [[] for _ in items]
    room = len(pool) - (1 if pool_is_eval else 0)
    if k > room:
        raise HippoError(f"--num-fewshot {k} is larger than the few-shot pool ({room} exemplars)")
    rnd = random.Random(seed)
    shots: list[list[Item]] = []
    for item in items:
        if pool_is_eval:
            drawn = [pool[i] for i in rnd.sample(range(len(pool)), k + 1)]
            shots.append([s for s in drawn if s.id != item.id][:k])
        else:
            shots.append([pool[i] for i in rnd.sample(range(len(pool)), k)])
    return shots


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """Apply the model's chat template with a generation prompt (system turn dropped if refused)."""
    import jinja2

    if getattr(tokenizer, "chat_template", None) is None:
        raise HippoError("--chat-template: this model's tokenizer has no chat template")
    kwargs = {"tokenize": False, "add_generation_prompt": True, "continue_final_message": False}
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except jinja2.exceptions.TemplateError:
        return tokenizer.apply_chat_template([m for m in messages if m["role"] != "system"], **kwargs)


def build_prompts(
    data: TaskData,
    items: list[Item],
    *,
    num_fewshot: int = 0,
    strategy: str = "hippocrates",
    chat_template: bool = False,
    tokenizer: Any = None,
    seed: int = DEFAULT_SEED,
) -> list[Prompt]:
    """Contexts and continuations for ``items`` (already limited), with seeded exemplars."""
    if strategy not in STRATEGIES:
        raise HippoError(f"unknown prompt strategy '{strategy}' (choose from {', '.join(STRATEGIES)})")
    spec = data.spec
    desc = description(strategy)
    prompts = []
    for item, shots in zip(
        items, sample_shots(items, data.pool, data.pool_is_eval, num_fewshot, seed), strict=True
    ):
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
            context, conts = render_chat(tokenizer, messages), list(opts)
        else:
            context, conts = desc + shot_text + question, [TARGET_DELIMITER + o for o in opts]
        prompts.append(Prompt(item, context, conts, opts, [s.id for s in shots]))
    return prompts
