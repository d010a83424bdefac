"""Reading the answer out of a generated response: one set of rules for evaluation and for the
GRPO reward, so a model is trained towards exactly what it is scored on.

Models are asked to reason and then end with ``Answer: X`` (:data:`ANSWER_INSTRUCTION`). The rules,
tried in order, on a response to a question with lettered options:

1. **answer line**: the last line that states the answer (``Answer: C``, ``answer: (c)``,
   ``**Final answer:** C.``, ``The answer is C because ...``, ``The correct answer is: C.``). The
   letter must name one of the options; two different letters there (``Answer: B or C``) is
   ambiguous. A stated answer that is the text of exactly one option (``Answer: Vitamin C
   deficiency``) counts as that option. A line that only introduces the answer (``The correct
   answer is:``, ``Answer:``) states the next non-empty line (``C. Choledocholithiasis``); with
   nothing after it, it states nothing and the rules below apply.
2. **lone letter**: the whole response is one letter, maybe bracketed or followed by a dot.
3. **option line**: exactly one option letter starts a line the way options are listed
   (``C. Adenocarcinoma of the colon``, ``(C) ...``, ``C) ...``); a response that lists several
   options (``A. ...`` then ``B. ...``) names none.

A letter followed by the text of *another* option (``C. Pyruvate kinase`` when pyruvate kinase is
option D), on an answer line or an option line, contradicts itself and is unparsed.
4. **option text**: the response names exactly one option's text (whole words, any case).

For fixed answer words (PubMedQA's yes/no/maybe) the answer line and the lone word are matched
against the words instead of letters. Anything else is *unparsed*: scored wrong, counted and listed,
never dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hippocrates.data.benchmarks import Item

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ANSWER_INSTRUCTION = (
    "Think through the question step by step, then give your final answer on its own last line "
    'in the form "Answer: X", where X is the letter of the correct option.'
)
WORDS_INSTRUCTION = (
    "Think through the question step by step, then give your final answer on its own last line "
    'in the form "Answer: X", where X is one of: {choices}.'
)
_ANSWER = re.compile(
    r"(?:final\s+answer|correct\s+answer|the\s+answer|answer)\s*(?:(?:is|would\s+be)\s*[:=-]?|[:=-])\s*(.+)",
    re.IGNORECASE,
)
_OPTION_LINE = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])[.)])\s+(\S.*)$", re.MULTILINE)
_MARKUP = re.compile(r"[*_`#>]+")
_LEAD_IN = re.compile(
    r"^\W*(?:(?:the\s+)?(?:final\s+|correct\s+)?answer)\s*(?:is|would\s+be)?\s*[:\-=]?\W*$", re.IGNORECASE
)


@dataclass(frozen=True)
class Extraction:
    """The option a response chose (``index``), by which rule, or why none (``index is None``)."""

    index: int | None
    rule: str | None
    reason: str = ""

    @property
    def parsed(self) -> bool:
        return self.index is not None


def instruction_for(options: list[str], lettered: bool) -> str:
    """What the model is asked, for lettered options or fixed answer words."""
    return ANSWER_INSTRUCTION if lettered else WORDS_INSTRUCTION.format(choices=", ".join(options))


def is_lettered(item: Item) -> bool:
    """Lettered options, unless the item's answers are fixed words read with a passage (PubMedQA)."""
    return not (item.context is not None and [o.lower() for o in item.options] == ["yes", "no", "maybe"])


def ask(item: Item) -> str:
    """The user message that asks a model to reason about ``item`` and end with ``Answer: X``.

    Generative evaluation and GRPO training ask with exactly this text (rendered by the chat
    template, or the Alpaca format for base models), so training and evaluation agree.
    """
    lettered = is_lettered(item)
    if not lettered:
        return (
            f"Abstract: {item.context}\nQuestion: {item.question}\n\n{instruction_for(item.options, False)}"
        )
    context = f"{item.context}\n" if item.context else ""
    listed = "".join(f"{LETTERS[i]}. {option}\n" for i, option in enumerate(item.options))
    return f"{context}Question: {item.question}\n{listed}\n{ANSWER_INSTRUCTION}"


def answer_line(item: Item) -> str:
    """The gold answer as a model is asked to end with it (``Answer: C``, ``Answer: yes``): the
    assistant turn of a generative few-shot exemplar. :func:`extract` reads it back as the gold."""
    return f"Answer: {LETTERS[item.gold] if is_lettered(item) else item.options[item.gold]}"


def _norm(text: str) -> str:
    return " ".join(_MARKUP.sub(" ", text).lower().split())


def _option_text(text: str, options: list[str]) -> int | None | str:
    """The one option whose text the passage names (index), None if none, "ambiguous" if several."""
    passage = f" {re.sub(r'[^a-z0-9]+', ' ', _norm(text))} "
    hits = [
        i
        for i, option in enumerate(options)
        if (words := re.sub(r"[^a-z0-9]+", " ", option.lower()).strip()) and f" {words} " in passage
    ]
    # an option whose text is inside another named option's text ("Iron" in "Iron deficiency") is not a second answer
    hits = [i for i in hits if not any(j != i and options[i].lower() in options[j].lower() for j in hits)]
    if len(hits) == 1:
        return hits[0]
    return "ambiguous" if hits else None


def _letter_with_text(index: int, text: str, options: list[str], rule: str) -> Extraction:
    """A letter and the text written after it (``C. Pyruvate kinase``): the letter, unless that text
    is another option's, when the response contradicts itself."""
    named = _option_text(text, options)
    if isinstance(named, int) and named != index:
        return Extraction(None, None, f"letter {LETTERS[index]} with the text of option {LETTERS[named]}")
    return Extraction(index, rule)


def _stated(answer: str, options: list[str], lettered: bool) -> Extraction | None:
    """What an answer line states: a letter, an answer word, or an option's text."""
    cleaned = _MARKUP.sub("", answer).strip()
    if lettered:
        head = re.split(r"[,;]|\s+(?:because|since|as|which)\s+", cleaned, maxsplit=1, flags=re.IGNORECASE)[0]
        first = re.match(r"^(?:option\s+)?\(?([A-Za-z])\)?(?:[.):]|\s|$)", head, re.IGNORECASE)
        if first and (
            len(head.split()) == 1 or not head[: first.end()].strip().isalpha() or first.group(1).isupper()
        ):
            letter = first.group(1).upper()
            rest = head[first.end() :]
            second = re.search(r"\b(?:or|and|/)\s*\(?([A-Za-z])\)?(?![A-Za-z])", rest, re.IGNORECASE)
            if second and second.group(1).upper() != letter:
                return Extraction(
                    None, None, f"two letters in the answer ({letter} and {second.group(1).upper()})"
                )
            index = LETTERS.index(letter)
            if index >= len(options):
                return Extraction(
                    None, None, f"letter {letter} is not one of the options A-{LETTERS[len(options) - 1]}"
                )
            return _letter_with_text(index, rest, options, "answer-line")
    else:
        word = re.match(r"^\W*([A-Za-z]+)", cleaned)
        folded = [o.lower() for o in options]
        if word and word.group(1).lower() in folded:
            return Extraction(folded.index(word.group(1).lower()), "answer-line")
    by_text = _option_text(cleaned, options)
    if isinstance(by_text, int):
        return Extraction(by_text, "answer-line")
    return None


def extract(response: str, options: list[str], *, lettered: bool = True) -> Extraction:
    """The option ``response`` chose among ``options`` (see the module docstring for the rules)."""
    text = (response or "").strip()
    if not text:
        return Extraction(None, None, "empty response")
    lines = text.splitlines()
    for number in range(len(lines) - 1, -1, -1):
        line = _MARKUP.sub("", lines[number])
        matches = list(_ANSWER.finditer(line))
        if matches or _LEAD_IN.match(line):
            statement = matches[-1].group(1) if matches else ""
            if not re.sub(r"\W+", "", statement):  # a lead-in: the answer is on the next non-empty line
                after = [x for x in lines[number + 1 :] if x.strip()]
                if not after:
                    continue  # it states nothing
                statement = after[0]
            stated = _stated(statement, options, lettered)
            if stated is not None:
                return stated
            return Extraction(None, None, f"the answer line names no option: {lines[number].strip()[:80]!r}")
    bare = _MARKUP.sub("", text).strip().rstrip(".")
    if lettered:
        lone = re.fullmatch(r"\(?([A-Za-z])\)?", bare)
        if lone:
            index = LETTERS.index(lone.group(1).upper())
            if index < len(options):
                return Extraction(index, "lone-letter")
            return Extraction(None, None, f"letter {lone.group(1).upper()} is not one of the options")
        listed = [(a or b, rest) for a, b, rest in _OPTION_LINE.findall(_MARKUP.sub("", text))]
        letters = {letter for letter, _ in listed}
        if len(letters) > 1:
            return Extraction(None, None, "the response names several options")
        if letters and LETTERS.index(listed[0][0]) < len(options):
            return _letter_with_text(
                LETTERS.index(listed[0][0]), " ".join(r for _, r in listed), options, "option-line"
            )
    else:
        folded = [o.lower() for o in options]
        if bare.lower() in folded:
            return Extraction(folded.index(bare.lower()), "lone-word")
    by_text = _option_text(text, options)
    if isinstance(by_text, int):
        return Extraction(by_text, "option-text")
    if by_text == "ambiguous":
        return Extraction(None, None, "the response names several options")
    return Extraction(None, None, "no answer line, letter or option text found")
