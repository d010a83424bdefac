"""One reader per benchmark format: the original release files (and hub rows) as :class:`Item` s.

Evaluation (``hippo eval``), training (``kind: evaluation`` sources become instruction
conversations) and ``hippo data check`` all read benchmarks here, so a file means the same thing
everywhere. Formats: ``medqa`` (jsonl, 4 or 5 options), ``medmcqa`` (release jsonl, ``cop``
1-based), ``pubmedqa`` (``ori_pqal.json`` and the hub's spelling), ``usmle`` (``step_exams.jsonl``)
and ``mc``, any multiple-choice file described by a :class:`Reader` (column mapping, header-less
CSV, nested JSON records, fixed answer sets, row filters, filler options).

A parser returns ``(question, options, gold[, context])`` or raises :class:`Skip` with the reason a
record cannot be used; the caller counts and lists it (never a silent drop). A record repeating an
earlier one (same id, or same question, options and passage) is read once and listed as a duplicate.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hippocrates.data.io import iter_csv, iter_jsonl, read_json, read_text
from hippocrates.errors import HippoError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
USMLE_OPTION = re.compile(r"^[ \t]*\(([A-Z])\)[ \t]*(.*)$")
PUBMEDQA_CHOICES = ["yes", "no", "maybe"]
Format = Literal["medqa", "medmcqa", "pubmedqa", "usmle", "mc"]
FORMATS: tuple[str, ...] = ("medqa", "medmcqa", "pubmedqa", "usmle", "mc")
AnswerFormat = Literal["auto", "letter", "index", "index1", "text"]
Column = str | int


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Columns(Strict):
    """Where the generic ``mc`` format finds each field of a record (names, or 0-based indices for a
    CSV without a header row)."""

    id: Column | None = Field(None, description="id column; default: the line number")
    question: Column = "question"
    options: Column | list[Column] | None = Field(
        "options",
        description="one column holding a list or {letter: text} dict, a list of columns, or none with choices:",
    )
    answer: Column = "answer"
    context: Column | None = Field(None, description="optional passage shown before the question")


class Sample(Strict):
    """Items ``start .. start + count`` after shuffling the file's items with ``Random(seed)``.

    Two readers with the same seed and disjoint ranges never share an item, so one release file can
    give a training split and an evaluation split (the split is recorded in every manifest)."""

    seed: int = 0
    start: int = Field(0, ge=0)
    count: int | None = Field(None, gt=0)


class Reader(Strict):
    """How to read one benchmark file: its format and, for ``mc``, its shape."""

    format: Format
    columns: Columns = Columns()
    answer_format: AnswerFormat = "auto"
    choices: list[str] | None = Field(
        None, description="a fixed answer set (pubmedqa: yes/no/maybe); text answers match case-insensitively"
    )
    category: str | None = Field(None, description="keep records whose 'category' is this (usmle steps)")
    filter: dict[str, str | list[str]] = Field(
        default_factory=dict, description="keep records whose column equals the value (or one of the values)"
    )
    split: Literal["test", "all", "train"] = Field(
        "test", description="pubmedqa: the official test PMIDs, all items, or the other (train) half"
    )
    ground_truth: str = "test_ground_truth.json"
    header: bool = Field(True, description="CSV: the first row names the columns (else columns are indices)")
    records: str | None = Field(
        None, description="JSON: dotted path to the list of records, e.g. data.questions"
    )
    drop_options: list[str] = Field(
        default_factory=list, description="filler options left out before scoring (case-insensitive), counted"
    )
    sample: Sample | None = Field(
        None, description="a seeded slice of the items: train on one slice of a file, evaluate on another"
    )


class Skip(Exception):
    """A record that cannot be used; the message is the reason."""


@dataclass
class Item:
    """One question, format-independent. ``gold`` indexes ``options``."""

    id: str
    question: str
    options: list[str]
    gold: int
    context: str | None = None
    where: str = ""
    explanation: str | None = None  # MedMCQA's exp, PubMedQA's long answer: used when training on it


EXPLANATION_FIELDS = ("exp", "LONG_ANSWER", "long_answer")


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
    """The gold index from a letter, a 0- or 1-based index, or the option text (any case)."""
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
    folded = [o.casefold() for o in options]
    if folded.count(text.casefold()) == 1:
        return folded.index(text.casefold())
    raise Skip(f"answer {text[:60]!r} is neither a letter {span} nor one of the options")


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
    if isinstance(cop, str) and cop.strip().isdigit():
        cop = int(cop)
    if not isinstance(cop, int) or isinstance(cop, bool) or not 1 <= cop <= 4:
        raise Skip(f"'cop' must be an integer 1..4 (1 = opa), got {cop!r}")
    return question, options, cop - 1


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


def parse_medqa_hf(record: dict[str, Any]) -> tuple[str, list[str], int]:
    """MedQA on the hub (GBaker/MedQA-USMLE-4-options-hf): sent1, ending0..3, label 0-based."""
    question = _text(_need(record, "sent1"))
    options = _check_options([record.get(f"ending{i}") for i in range(26) if f"ending{i}" in record])
    label = record.get("label")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(options):
        raise Skip(f"'label' must be an option index 0..{len(options) - 1}, got {label!r}")
    return question, options, label


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
    folded = [c.casefold() for c in choices]
    if not isinstance(decision, str) or decision.strip().casefold() not in folded:
        raise Skip(f"label {decision!r} is not one of {'/'.join(choices)}")
    return question, list(choices), folded.index(decision.strip().casefold()), "\n".join(contexts)


def _get(record: dict[str, Any], column: Column | None) -> Any:
    return record.get(str(column)) if column is not None else None


def parse_mc(record: dict[str, Any], reader: Reader) -> tuple:
    """Generic multiple choice with mapped columns; options a list, a dict, columns, or a fixed set."""
    columns = reader.columns
    question = _text(_get(record, columns.question))
    if not question:
        raise Skip(f"missing field '{columns.question}'")
    if reader.choices and columns.options in (None, "options") and "options" not in record:
        raw: Any = list(reader.choices)
    elif isinstance(columns.options, list):
        raw = [_get(record, c) for c in columns.options]
    else:
        raw = _get(record, columns.options)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raise Skip(f"missing field '{columns.options}'")
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
    gold = answer_index(_get(record, columns.answer), options, reader.answer_format)
    context = _text(_get(record, columns.context)) if columns.context is not None else None
    if columns.context is not None and not context:
        raise Skip(f"missing field '{columns.context}'")
    return question, options, gold, context


# ---------------------------------------------------------------- reading files


def iter_records(path: Path, reader: Reader | None = None) -> Iterator[tuple[int | str, dict[str, Any]]]:
    """(line or key, record) for JSONL, CSV/TSV, a JSON list, or a JSON {key: record} object.

    ``reader.header: false`` reads a CSV without a header row (keys "0", "1", ...);
    ``reader.records`` reaches a list nested in a JSON document (``data.questions``).
    """
    path = Path(path)
    if not path.is_file():
        raise HippoError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        header = reader.header if reader else True
        yield from iter_csv(path, delimiter="\t" if suffix == ".tsv" else ",", header=header)
        return
    if suffix == ".json" or (reader and reader.records):
        text = read_text(path)
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            if "Extra data" not in exc.msg or (reader and reader.records):
                raise HippoError(
                    f"{path}:{exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno})"
                ) from None
            document = None  # JSON lines in a file named .json (MedMCQA's release does this)
        if reader and reader.records:
            walked: list[str] = []
            for part in reader.records.split("."):
                if not isinstance(document, dict) or part not in document:
                    have = (
                        ", ".join(sorted(document)) if isinstance(document, dict) else type(document).__name__
                    )
                    where = f"under '{'.'.join(walked)}'" if walked else "at the top"
                    raise HippoError(
                        f"{path}: records: '{reader.records}': no '{part}' {where} (it has: {have})"
                    )
                document = document[part]
                walked.append(part)
            if not isinstance(document, list):
                raise HippoError(
                    f"{path}: records: '{reader.records}' is a {type(document).__name__}, not a list"
                )
        if isinstance(document, list):
            for i, record in enumerate(document):
                if not isinstance(record, dict):
                    raise HippoError(f"{path}: item {i} is not a JSON object")
                yield i + 1, record
            return
        if isinstance(document, dict):
            for key, record in document.items():
                if not isinstance(record, dict):
                    raise HippoError(f"{path}: '{key}' is not a JSON object")
                yield key, record
            return
    yield from iter_jsonl(path)


def _norm(text: str | None) -> str:
    return " ".join((text or "").lower().split())


def item_key(item: Item) -> str:
    """What makes two items the same question: normalised question, options and passage."""
    return "\x1f".join([_norm(item.question), *(_norm(o) for o in item.options), _norm(item.context)])


def detect_format(record: dict[str, Any]) -> str | None:
    """The benchmark format a record's fields belong to, if any (for sources that do not say)."""
    keys = set(record)
    if {"question", "opa", "opb", "opc", "opd", "cop"} <= keys:
        return "medmcqa"
    if {"sent1", "ending0", "label"} <= keys:
        return "medqa_hf"
    if (
        {"question", "options"} <= keys
        and ("answer_idx" in keys or "answer" in keys)
        and isinstance(record["options"], dict)
    ):
        return "medqa"
    if ({"QUESTION", "CONTEXTS"} <= keys or {"question", "context"} <= keys) and "final_decision" in keys:
        return "pubmedqa"
    if {"text", "answer"} <= keys and "question_id" in keys:
        return "usmle"
    return None


def parser_for(reader: Reader, fmt: str | None = None) -> Callable[[dict[str, Any]], tuple]:
    fmt = fmt or reader.format
    if fmt == "medqa":
        return parse_medqa
    if fmt == "medqa_hf":
        return parse_medqa_hf
    if fmt == "medmcqa":
        return parse_medmcqa
    if fmt == "usmle":
        return parse_usmle
    if fmt == "pubmedqa":
        choices = reader.choices or PUBMEDQA_CHOICES
        return lambda r: parse_pubmedqa(r, choices)
    if fmt == "mc":
        return lambda r: parse_mc(r, reader)
    raise HippoError(f"unknown benchmark format '{fmt}' (choose from {', '.join(FORMATS)})")


def id_maker(reader: Reader, prefix: str) -> Callable[[int | str, dict[str, Any]], str]:
    column = {"medmcqa": "id", "usmle": "question_id", "pubmedqa": "pubid", "medqa_hf": "id"}.get(
        reader.format
    )
    if reader.format == "mc":
        column = None if reader.columns.id is None else str(reader.columns.id)

    def make(key: int | str, record: dict[str, Any]) -> str:
        value = record.get(column) if column else None
        if value not in (None, ""):
            return str(value)
        return str(key) if reader.format == "pubmedqa" or isinstance(key, str) else f"{prefix}-{key}"

    return make


def check_columns(reader: Reader, path: Path, record: dict[str, Any]) -> None:
    """Every column a reader names must be in the file's first record: one line naming it otherwise."""
    if reader.format != "mc":
        return
    c = reader.columns
    named = [("question", c.question), ("answer", c.answer), ("id", c.id), ("context", c.context)]
    if isinstance(c.options, list):
        named += [("options", o) for o in c.options]
    elif c.options is not None and not (
        reader.choices and c.options == "options" and "options" not in record
    ):
        named.append(("options", c.options))
    named += [("filter", k) for k in reader.filter]
    if reader.category is not None:
        named.append(("category", "category"))
    have = ", ".join(map(str, record)) or "none"
    for role, column in named:
        if column is not None and str(column) not in record:
            raise HippoError(f"{path}: column '{column}' ({role}) is not in the file (its columns: {have})")


def _keep(reader: Reader) -> Callable[[dict[str, Any]], bool]:
    wanted = dict(reader.filter)
    if reader.category is not None:
        wanted["category"] = reader.category
    if not wanted:
        return lambda r: True

    def keep(record: dict[str, Any]) -> bool:
        for column, value in wanted.items():
            allowed = value if isinstance(value, list) else [value]
            if str(record.get(column)) not in {str(v) for v in allowed}:
                return False
        return True

    return keep


@dataclass
class Read:
    """What a benchmark file held: usable items, and every record that was not used, with why."""

    items: list[Item]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    other: list[Item] = field(default_factory=list)  # pubmedqa test split: the items of the other half
    filtered_out: int = 0
    outside_sample: int = 0  # usable items the reader's sample does not take
    dropped_options: int = 0


def _drop_filler(item: Item, fillers: set[str]) -> tuple[Item, int]:
    keep = [i for i, o in enumerate(item.options) if o.strip().casefold() not in fillers]
    if len(keep) == len(item.options):
        return item, 0
    if item.gold not in keep:
        raise Skip(f"its answer {item.options[item.gold]!r} is a filler option (drop_options)")
    options = [item.options[i] for i in keep]
    if len(options) < 2:
        raise Skip("fewer than 2 options left after dropping filler options")
    kept = Item(
        item.id, item.question, options, keep.index(item.gold), item.context, item.where, item.explanation
    )
    return kept, len(item.options) - len(keep)


def read_benchmark(reader: Reader, path: str | Path, *, prefix: str = "item", fmt: str | None = None) -> Read:
    """Every record of ``path`` in ``reader``'s format: items, skips, duplicates (see :class:`Read`)."""
    path = Path(path)
    records = iter_records(path, reader)
    first = next(records, None)
    if first is None:
        return Read([])
    check_columns(reader, path, first[1])
    parse = parser_for(reader, fmt)
    make_id = id_maker(reader, prefix)
    keep = _keep(reader)
    fillers = {f.strip().casefold() for f in reader.drop_options}
    out = Read([])
    by_id: dict[str, str] = {}
    by_key: dict[str, str] = {}

    def all_records() -> Iterator[tuple[int | str, dict[str, Any]]]:
        yield first
        yield from records

    for key, record in all_records():
        where = f"{path}:{key}"
        if reader.format == "usmle" and reader.category is not None and record.get("category") in (None, ""):
            out.skipped.append((make_id(key, record), f"{where}: no category, so it belongs to no step"))
            continue
        if not keep(record):
            out.filtered_out += 1
            continue
        ident = make_id(key, record)
        if ident in by_id:
            out.duplicates.append((ident, f"{where}: id {ident} repeats the record at {by_id[ident]}"))
            continue
        by_id[ident] = where
        try:
            question, options, gold, *rest = parse(record)
            explanation = next(
                (
                    str(record[f])
                    for f in EXPLANATION_FIELDS
                    if isinstance(record.get(f), str) and record[f].strip()
                ),
                None,
            )
            item = Item(ident, question, options, gold, rest[0] if rest else None, where, explanation)
            if fillers:
                item, dropped = _drop_filler(item, fillers)
                out.dropped_options += dropped
        except Skip as exc:
            out.skipped.append((ident, f"{where}: {exc}"))
            continue
        content = item_key(item)
        if content in by_key:
            out.duplicates.append((ident, f"{where}: same question and options as id {by_key[content]}"))
            continue
        by_key[content] = ident
        out.items.append(item)
    if reader.format == "pubmedqa" and reader.split != "all":
        _split_pubmedqa(reader, path, out)
    if reader.sample is not None:
        order = list(out.items)
        random.Random(reader.sample.seed).shuffle(order)
        end = None if reader.sample.count is None else reader.sample.start + reader.sample.count
        kept = {id(item) for item in order[reader.sample.start : end]}
        out.outside_sample = len(out.items) - len(kept)
        out.items = [item for item in out.items if id(item) in kept]  # file order, as without a sample
    return out


def _split_pubmedqa(reader: Reader, path: Path, out: Read) -> None:
    """PQA-L: the test split is the ground-truth PMIDs (labels from that file), the rest the train half."""
    truth_path = path.with_name(reader.ground_truth)
    if not truth_path.is_file():
        if reader.split == "train":
            return  # a file holding only the train half has no ground truth beside it
        raise HippoError(
            f"{truth_path}: not found; the PubMedQA test split needs the official test PMIDs beside "
            f"{path.name} (or use split: all / task pubmedqa_all for all {len(out.items)} items)"
        )
    truth = read_json(truth_path)
    if not isinstance(truth, dict):
        raise HippoError(f"{truth_path}: expected an object PMID -> label")
    choices = reader.choices or PUBMEDQA_CHOICES
    by_id = {item.id: item for item in out.items}
    bad = {ident for ident, _ in out.skipped}
    if reader.split == "train":
        out.other = [item for item in out.items if item.id in truth]
        out.items = [item for item in out.items if item.id not in truth]
        out.skipped = [(i, r) for i, r in out.skipped if i not in truth]
        return
    test: list[Item] = []
    skipped = [(i, r) for i, r in out.skipped if i in truth]
    for pmid, label in truth.items():
        if pmid in bad:
            continue
        item = by_id.get(pmid)
        if item is None:
            skipped.append((pmid, f"{truth_path}: PMID {pmid} is not in {path.name}"))
        elif label not in choices:
            skipped.append((pmid, f"{truth_path}: label {label!r} is not one of {choices}"))
        else:
            test.append(Item(item.id, item.question, item.options, choices.index(label), item.context, item.where,
                             item.explanation))  # fmt: skip
    order = {item.id: i for i, item in enumerate(out.items)}
    test.sort(key=lambda it: order[it.id])  # file order of ori_pqal.json
    out.other = [item for item in out.items if item.id not in truth]
    out.items, out.skipped = test, skipped
