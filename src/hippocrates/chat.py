"""The one chat renderer: conversations as the model sees them, for training, sampling, judging,
evaluating and serving.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}``. It is
rendered either with the tokenizer's chat template (``chat``) or, for base models without one,
in the Alpaca format (``alpaca``): the system text (or Alpaca's standard preamble), then per turn
``### Instruction:`` (and ``### Input:`` for a user turn that carries Alpaca's ``input`` field)
and ``### Response:``, each response ending with the EOS token so the model learns to stop.

:func:`encode` turns a conversation into token ids and labels with the loss on assistant turns
only. The whole text is tokenized once and each token is labelled by where its characters lie
(offsets), so a response is tokenized exactly as it continues its prompt. This matters for
SentencePiece tokenizers (Llama-2, Mistral), whose "▁" prefix space makes a response tokenized
alone differ from the same response after a prompt.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from hippocrates.errors import HippoError

Format = Literal["chat", "alpaca"]
IGNORE = -100
ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def choose_format(tokenizer: Any, template: str = "auto") -> Format:
    """``auto`` is ``chat`` when the tokenizer has a chat template, else ``alpaca``."""
    if template == "chat" and not has_template(tokenizer):
        raise HippoError("template 'chat': the model's tokenizer has no chat template; use alpaca")
    if template == "auto":
        return "chat" if has_template(tokenizer) else "alpaca"
    if template not in ("chat", "alpaca"):
        raise HippoError(f"unknown template '{template}' (choose from auto, chat, alpaca)")
    return template  # type: ignore[return-value]


def adds_special_tokens(fmt: Format) -> bool:
    """Whether to let the tokenizer add BOS: chat templates write their own special tokens."""
    return fmt == "alpaca"


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _plain(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Messages as chat templates take them: Alpaca's ``input`` joins the user content."""
    out = []
    for m in messages:
        content = m["content"] + (f"\n\n{m['input']}" if m.get("input") else "")
        out.append({"role": m["role"], "content": content})
    return out


def _apply_template(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    import jinja2

    kwargs = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except jinja2.exceptions.TemplateError as exc:
        if messages and messages[0]["role"] == "system" and len(messages) > 1:
            # templates without a system role (Gemma, Mistral's): fold it into the first user turn
            folded = [
                {
                    "role": messages[1]["role"],
                    "content": f"{messages[0]['content']}\n\n{messages[1]['content']}",
                }
            ]
            return _apply_template(tokenizer, folded + messages[2:], add_generation_prompt)
        raise HippoError(f"the conversation does not fit the model's chat template: {exc}") from None


def _alpaca(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    first_user = next((m for m in turns if m["role"] == "user"), {})
    text = (
        system
        if system is not None
        else (ALPACA_PREAMBLE_INPUT if first_user.get("input") else ALPACA_PREAMBLE)
    )
    for m in turns:
        if m["role"] == "user":
            text += f"\n\n### Instruction:\n{m['content']}"
            if m.get("input"):
                text += f"\n\n### Input:\n{m['input']}"
            text += "\n\n### Response:\n"
        elif m["role"] == "assistant":
            text += m["content"] + (tokenizer.eos_token or "")
        else:
            raise HippoError(f"alpaca format: a '{m['role']}' turn can only come first")
    if not add_generation_prompt and turns and turns[-1]["role"] == "user":
        text = text.removesuffix("\n\n### Response:\n")
    return text


def render(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    fmt: Format,
    *,
    add_generation_prompt: bool = True,
    continue_final: bool = False,
) -> str:
    """The conversation as text; with ``add_generation_prompt`` it ends where the model answers.

    ``continue_final``: the last message is the start of the assistant's answer, left open for the
    model to continue (the text is the conversation before it, ready for an answer, then its
    content). The log-prob judge and ``hippo serve`` (``continue_final_message``) use this.
    """
    if not messages:
        raise HippoError("empty conversation")
    if continue_final:
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise HippoError(
                "continuing the final message needs a conversation that ends with an assistant turn"
            )
        return render(tokenizer, messages[:-1], fmt) + messages[-1]["content"]
    if fmt == "chat":
        return _apply_template(tokenizer, _plain(messages), add_generation_prompt)
    return _alpaca(tokenizer, messages, add_generation_prompt)


def prompt(tokenizer: Any, question: str, template: str = "auto", system: str | None = None) -> str:
    """The generation prompt for one user question (sampling, serving, the dry run)."""
    fmt = choose_format(tokenizer, template)
    messages = ([{"role": "system", "content": system}] if system else []) + user(question)
    return render(tokenizer, messages, fmt)


def assistant_spans(
    tokenizer: Any, messages: list[dict[str, Any]], fmt: Format
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn in it."""
    full = render(tokenizer, messages, fmt, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], fmt, add_generation_prompt=True) if i else ""
        through = render(tokenizer, messages[: i + 1], fmt, add_generation_prompt=False)
        if not through.startswith(before) or not full.startswith(through):
            raise HippoError(
                "the chat template renders a conversation differently once a response follows, so the "
                "response cannot be located; use template: alpaca"
            )
        spans.append((len(before), len(through)))
    return full, spans


def encode(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    fmt: Format,
    *,
    max_len: int,
    stats: Counter,
    last_turn_only: bool = False,
) -> dict[str, list[int]] | None:
    """Token ids and labels (``IGNORE`` outside assistant turns); None when no labelled token survives.

    Truncation keeps the start and is counted in ``stats["truncated"]``; a sample left with no
    labelled token is counted in ``stats["dropped_no_response"]``. A token that starts before a
    response but reaches into it (merged across the boundary) is labelled and counted in
    ``stats["boundary_merged"]``.
    """
    text, spans = assistant_spans(tokenizer, messages, fmt)
    if last_turn_only:
        spans = spans[-1:]
    if not spans:
        raise HippoError("a training conversation needs at least one assistant turn")
    enc = tokenizer(text, add_special_tokens=adds_special_tokens(fmt), return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    for i, (start, end) in enumerate(offsets):
        if end <= start:  # special tokens added by the tokenizer (BOS) have empty spans
            continue
        for lo, hi in spans:
            if lo <= start < hi:
                labels[i] = ids[i]
            elif start < lo < end:
                labels[i] = ids[i]
                stats["boundary_merged"] += 1
    if len(ids) > max_len:
        stats["truncated"] += 1
        ids, labels = ids[:max_len], labels[:max_len]
    if all(t == IGNORE for t in labels[1:]):
        stats["dropped_no_response"] += 1
        return None
    return {"input_ids": ids, "labels": labels}
