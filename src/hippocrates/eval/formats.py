"""Record formats of the benchmark releases, parsed into one format-independent :class:`Item`.

A parser returns ``(question, options, gold[, context])`` or raises :class:`Skip` with the reason a
record cannot be scored; the loader turns that into a counted, listed skip (never a silent drop).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from hippocrates.eval.registry import Columns

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
USMLE_OPTION = re.compile(r"^[ \t]*\(([A-Z])\)[ \t]*(.*)$")


class Skip(Exception):
    """A record that cannot be scored; the message is the reason."""


@dataclass
class Item:
    """One question, format-independent. ``gold`` indexes ``options``."""

    id: str
    question: str
    options: list[str]
    gold: int
    context: str | None = None
    where: str = ""


# ---------------------------------------------------------------- answer helpers


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _need(record: dict[str, Any], key: str) -> Any:
    value = record.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise Skip(f"missing field '{key}'")
    return value


def _check_options(options: list[Any]) -> list[str]:
    if len(options) < 2:
        raise Skip(f"needs at least 2 options, found {len(options)}")
    if len(options) > len(LETTERS):
        raise Skip(f"has {len(options)} options; at most {len(LETTERS)} (A-Z) can be lettered")
    texts = [_text(o) if isinstance(o, str) else str(o).strip() if o is not None else "" for o in options]
    for i, text in enumerate(texts):
        if not text:
            raise Skip(f"option {LETTERS[i]} is empty")
    return texts


def answer_index(value: Any, options: list[str], fmt: str = "auto") -> int:
    """The gold index from a letter, a 0- or 1-based index, or the option text."""
    n = len(options)
    span = f"A-{LETTERS[n - 1]}"
    if value is None or (isinstance(value, str) and not value.strip()):
        raise Skip("missing answer")
    if isinstance(value, str):
        value = value.strip()
    if fmt in ("index", "index1") or (
        fmt == "auto" and isinstance(value, int) and not isinstance(value, bool)
    ):
        try:
            idx = int(value) - (1 if fmt == "index1" else 0)
        except (TypeError, ValueError):
            raise Skip(f"answer {value!r} is not an index") from None
        if not 0 <= idx < n:
            raise Skip(f"answer index {value!r} is not among the {n} options")
        return idx
    text = str(value)
    if fmt in ("letter", "auto"):
        letter = text.strip("()").upper()
        if len(letter) == 1 and letter in LETTERS:
            if LETTERS.index(letter) < n:
                return LETTERS.index(letter)
            if fmt == "letter" or text not in options:
                raise Skip(f"answer '{letter}' is not among the options {span}")
        elif fmt == "letter":
            raise Skip(f"answer {text!r} is not a letter")
    if text in options:
        return options.index(text)
    raise Skip(f"answer {text[:60]!r} is not among the options {span}")


# ---------------------------------------------------------------- record parsers


def parse_medqa(record: dict[str, Any]) -> tuple[str, list[str], int]:
    """MedQA: options {A..D|E}; answer_idx is the letter, answer the text (both must agree)."""
    question = _text(_need(record, "question"))
    raw = _need(record, "options")
    if not isinstance(raw, dict):
        raise Skip("'options' is not a {letter: text} object")
    letters = sorted(raw)
    options = _check_options([raw[k] for k in letters])
    if "answer_idx" in record and record["answer_idx"] not in (None, ""):
        letter = str(record["answer_idx"]).strip()
        if letter not in letters:
            raise Skip(f"answer_idx '{letter}' is not among the options {''.join(letters)}")
        gold = letters.index(letter)
        answer = _text(record.get("answer"))
        if answer and answer != options[gold]:
            raise Skip(f"answer text disagrees with answer_idx '{letter}'")
        return question, options, gold
    return question, options, answer_index(record.get("answer"), options, "text")


def parse_medmcqa(record: dict[str, Any]) -> tuple[str, list[str], int]:
    """MedMCQA release: opa..opd and cop 1..4 (1 = opa; not 0-based)."""
    question = _text(_need(record, "question"))
    options = _check_options([record.get(k) for k in ("opa", "opb", "opc", "opd")])
    cop = record.get("cop")
    if not isinstance(cop, int) or isinstance(cop, bool):
        raise Skip(f"'cop' must be an integer 1..4, got {cop!r}")
    return question, options, answer_index(cop, options, "index1")


def parse_usmle(record: dict[str, Any]) -> tuple[str, list[str], int]:
    """USMLE step exams: options are "(A) ..." lines of the stem (maybe indented, maybe wrapped)."""
    text = _need(record, "text")
    stem: list[str] = []
    letters: list[str] = []
    options: list[list[str]] = []
    for line in str(text).splitlines():
        match = USMLE_OPTION.match(line)
        if match and match.group(1) == LETTERS[len(letters)]:
            letters.append(match.group(1))
            options.append([match.group(2).strip()])
        elif options and line.strip():
            options[-1].append(line.strip())  # a wrapped option line
        elif not options:
            stem.append(line)
    if not options:
        raise Skip("no '(A) ...' option lines found in 'text'")
    texts = _check_options([" ".join(parts) for parts in options])
    answer = str(_need(record, "answer")).strip()
    match = re.match(r"^\(([A-Z])\)", answer)
    if not match:
        raise Skip(f"answer {answer[:40]!r} does not start with '(X)'")
    if match.group(1) not in letters:
        raise Skip(f"answer '{match.group(1)}' is not among the options {letters[0]}-{letters[-1]}")
    question = "\n".join(line.strip() for line in stem).strip()  # drop indentation, keep line breaks
    if not question:
        raise Skip("empty question stem")
    return question, texts, letters.index(match.group(1))


def parse_pubmedqa(record: dict[str, Any], choices: list[str], label: str | None = None) -> tuple:
    """PQA-L record (release or hub spelling); the label is yes/no/maybe."""
    question = _text(record.get("QUESTION") or record.get("question"))
    if not question:
        raise Skip("missing field 'QUESTION'")
    contexts = record.get("CONTEXTS")
    if contexts is None and isinstance(record.get("context"), dict):
        contexts = record["context"].get("contexts")
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts) or not contexts:
        raise Skip("'CONTEXTS' is not a non-empty list of strings")
    decision = label if label is not None else record.get("final_decision")
    if decision not in choices:
        raise Skip(f"label {decision!r} is not one of {'/'.join(choices)}")
    return question, list(choices), choices.index(decision), "\n".join(contexts)


def parse_mc(record: dict[str, Any], columns: Columns, answer_format: str) -> tuple:
    """Generic multiple choice with mapped columns; options a list, a dict or separate columns."""
    question = _text(_need(record, columns.question))
    if isinstance(columns.options, list):
        options = _check_options([record.get(c) for c in columns.options])
    else:
        raw = _need(record, columns.options)
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)  # a CSV cell holding a JSON list/object
            except json.JSONDecodeError:
                raise Skip(f"'{columns.options}' is not a list or an object") from None
        if isinstance(raw, dict):
            raw = [raw[k] for k in sorted(raw)]
        if not isinstance(raw, list):
            raise Skip(f"'{columns.options}' is not a list or an object")
        options = _check_options(raw)
    gold = answer_index(record.get(columns.answer), options, answer_format)
    context = _text(record.get(columns.context)) if columns.context else None
    if columns.context and not context:
        raise Skip(f"missing field '{columns.context}'")
    return question, options, gold, context
