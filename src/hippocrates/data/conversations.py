"""Training records of any common shape, as conversations (lists of role/content messages).

Accepted shapes, recognised by their fields (never guessed from content):

* ``messages``: OpenAI style, ``[{"role": "system"|"user"|"assistant", "content": ...}, ...]``;
* ``conversations``: ShareGPT style, ``[{"from": "system"|"human"|"gpt", "value": ...}, ...]``;
* ``prompt`` + ``completion``: TRL's prompt/completion pairs (each a string or a message list);
* ``instruction`` + ``output`` (+ ``input``): Alpaca and medalpaca;
* the benchmark schemas (MedMCQA, MedQA, PubMedQA, ...) and plain question/answer pairs
  (see :func:`hippocrates.data.sources.to_instruction`).

Any record may add a ``system`` string. Multi-turn conversations keep every turn; the loss goes
on every assistant turn (or the last only, ``stages.sft.assistant_turns: last``).
"""

from __future__ import annotations

from typing import Any

from hippocrates.errors import HippoError

SHAPES = (
    "messages [{role, content}], conversations [{from, value}], prompt + completion, "
    "instruction + output, a benchmark record, or question + answer"
)
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
}
Message = dict[str, Any]


def _content(value: Any, where: str, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise HippoError(
        f"{where}: {field} must be a string (or a list of text parts), got {type(value).__name__}"
    )


def _openai(turns: Any, where: str, field: str) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise HippoError(f"{where}: '{field}' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise HippoError(f"{where}: {field}[{i}] must be an object with 'role' and 'content'")
        role = turn["role"]
        if role not in ("system", "user", "assistant"):
            raise HippoError(f"{where}: {field}[{i}].role {role!r} is not system, user or assistant")
        out.append({"role": role, "content": _content(turn["content"], where, f"{field}[{i}].content")})
    return out


def _sharegpt(turns: Any, where: str) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise HippoError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} objects")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise HippoError(f"{where}: conversations[{i}] must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise HippoError(
                f"{where}: conversations[{i}].from {turn['from']!r} is not one of {', '.join(sorted(SHAREGPT_ROLES))}"
            )
        out.append({"role": role, "content": _content(turn["value"], where, f"conversations[{i}].value")})
    return out


def _part(value: Any, where: str, field: str, role: str) -> list[Message]:
    """A prompt or completion: a string (one turn of ``role``) or a message list."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _openai(value, where, field)


def check(messages: list[Message], where: str) -> list[Message]:
    """A trainable conversation: system only first, at least one assistant turn, no empty turn."""
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise HippoError(f"{where}: a system message can only come first (found at turn {i})")
        if m["role"] != "system" and not m["content"].strip():
            raise HippoError(f"{where}: turn {i} ({m['role']}) is empty")
    if not any(m["role"] == "assistant" for m in messages):
        raise HippoError(f"{where}: the conversation has no assistant turn to learn from")
    if messages[-1]["role"] != "assistant":
        raise HippoError(f"{where}: the conversation must end with an assistant turn")
    return messages


def to_messages(record: dict[str, Any], where: str, *, shape: str = "auto") -> list[Message]:
    """One training record as a conversation; a record of no known shape names its fields.

    ``shape`` (a source's ``format:``) says which shape to expect; ``auto`` recognises it.
    """
    from hippocrates.data.sources import to_instruction

    fields = {"messages": "messages", "sharegpt": "conversations"}
    if shape in fields and fields[shape] not in record:
        raise HippoError(
            f"{where}: format {shape} needs the field '{fields[shape]}' (have: {', '.join(sorted(record))})"
        )
    if shape == "prompt-completion" and not {"prompt", "completion"} <= set(record):
        raise HippoError(
            f"{where}: format prompt-completion needs 'prompt' and 'completion' (have: {', '.join(sorted(record))})"
        )
    if "messages" in record and shape in ("auto", "messages"):
        messages = _openai(record["messages"], where, "messages")
    elif "conversations" in record and shape in ("auto", "sharegpt"):
        messages = _sharegpt(record["conversations"], where)
    elif "prompt" in record and "completion" in record and shape in ("auto", "prompt-completion"):
        messages = _part(record["prompt"], where, "prompt", "user") + _part(
            record["completion"], where, "completion", "assistant"
        )
    else:
        try:
            ex = to_instruction(record, where)
        except HippoError as exc:
            if "not an instruction record" not in str(exc):
                raise
            have = ", ".join(sorted(record)) or "none"
            raise HippoError(
                f"{where}: not a training record (have: {have}); accepted shapes: {SHAPES}"
            ) from None
        user = {"role": "user", "content": ex["instruction"]}
        if ex.get("input"):
            user["input"] = ex["input"]
        messages = [user, {"role": "assistant", "content": ex["output"]}]
    system = record.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return check(messages, where)
