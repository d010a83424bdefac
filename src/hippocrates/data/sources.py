"""Training data sources: one reader for local files and Hugging Face datasets, plus record adapters.

A recipe ``Source`` names either a local file (``.jsonl``, ``.json``, ``.txt``/``.md``, ``.parquet``,
``.csv``/``.tsv``) or a hub dataset id. Every reader is a generator, so a streamed corpus is never held
in memory, and every record comes with a location (``file:line`` or ``id[split]#row``) so a bad
record is reported where the user can find it.

The paper's SFT mixture mixes datasets of different shapes (Alpaca-style, chat conversations, the
benchmarks' own release files, plain question/answer pairs). :func:`iter_conversations` turns any of
them into conversations: benchmark files through the one benchmark reader
(:mod:`hippocrates.data.benchmarks`), the rest through :mod:`hippocrates.data.conversations`. Shapes are
recognised from the fields (or named with ``format:``), never guessed from content.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hippocrates.config import Source
from hippocrates.data.benchmarks import (
    Item,
    Read,
    Reader,
    Sample,
    Skip,
    detect_format,
    parser_for,
    read_benchmark,
)
from hippocrates.data.io import iter_csv, iter_jsonl, iter_lines, read_json, sha256_file
from hippocrates.errors import HippoError
from hippocrates.progress import status

BENCHMARKS = ("medqa", "medqa_hf", "medmcqa", "pubmedqa", "usmle", "mc")

LOCAL_SUFFIXES = {".jsonl", ".json", ".txt", ".md", ".parquet", ".csv", ".tsv"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
Record = dict[str, Any]


def is_local(source: Source) -> bool:
    """A source is local when its path exists, or looks like a file; otherwise it is a hub dataset id."""
    path = Path(source.path).expanduser()
    if path.exists():
        return True
    return not HUB_ID.match(source.path) or path.suffix.lower() in LOCAL_SUFFIXES


def iter_records(source: Source) -> Iterator[tuple[str, Record]]:
    """Yield ``(location, record)`` for each record of a source, honouring ``max_samples``."""
    records = _iter_local(source) if is_local(source) else _iter_hub(source)
    for count, item in enumerate(records):
        if source.max_samples is not None and count >= source.max_samples:
            return
        yield item


def _iter_local(source: Source) -> Iterator[tuple[str, Record]]:
    path = Path(source.path).expanduser()
    if not path.is_file():
        raise HippoError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for line, record in iter_jsonl(path):
            yield f"{path}:{line}", record
    elif suffix == ".json":
        data = read_json(path)
        items = data.items() if isinstance(data, dict) else enumerate(data if isinstance(data, list) else [])
        if not isinstance(data, (dict, list)):
            raise HippoError(f"{path}: expected a JSON list or object of records")
        for key, record in items:
            if not isinstance(record, dict):
                raise HippoError(f"{path}: record {key!r} is a {type(record).__name__}, expected an object")
            yield f"{path}#{key}", {"id": str(key), **record} if isinstance(data, dict) else record
    elif suffix in {".txt", ".md"}:
        yield from _iter_text(path, source.text_field)
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    elif suffix in {".csv", ".tsv"}:
        for number, row in iter_csv(path, delimiter="\t" if suffix == ".tsv" else ","):
            yield f"{path}:{number}", row
    else:
        raise HippoError(
            f"{path}: unsupported file type '{suffix}' (use {', '.join(sorted(LOCAL_SUFFIXES))})"
        )


def _iter_text(path: Path, field: str) -> Iterator[tuple[str, Record]]:
    """Plain text: documents are separated by blank lines (a paragraph per document)."""
    lines: list[str] = []
    start = 1
    for number, line in iter_lines(path):
        if line.strip():
            if not lines:
                start = number
            lines.append(line)
        elif lines:
            yield f"{path}:{start}", {field: "".join(lines)}
            lines = []
    if lines:
        yield f"{path}:{start}", {field: "".join(lines)}


def _iter_parquet(path: Path) -> Iterator[tuple[str, Record]]:
    """Parquet in record batches, so large files stream."""
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as exc:
        raise HippoError(f"{path}: not a readable parquet file ({exc})") from None
    row = 0
    for batch in reader.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield f"{path}#{row}", record
            row += 1


def _iter_hub(source: Source) -> Iterator[tuple[str, Record]]:
    import datasets

    try:
        data = datasets.load_dataset(
            source.path, source.subset, split=source.split, streaming=source.streaming
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HippoError(
            f"{source.path}: could not load dataset from the Hugging Face hub "
            f"(split {source.split!r}, subset {source.subset!r}): {first}"
        ) from None
    for row, record in enumerate(data):
        yield f"{source.path}[{source.split}]#{row}", dict(record)


def describe(source: Source) -> dict[str, Any]:
    """Identity of a source for manifests and change detection: sha256 for files, id/split for hub data."""
    entry: dict[str, Any] = {"path": source.path, "weight": source.weight, "kind": source.kind}
    if is_local(source):
        path = Path(source.path).expanduser()
        if not path.is_file():
            raise HippoError(f"{path}: data file not found")
        entry["sha256"] = sha256_file(path)
    else:
        entry.update(hub=True, split=source.split, subset=source.subset, streaming=source.streaming)
    if source.max_samples is not None:
        entry["max_samples"] = source.max_samples
    return entry


# ---------------------------------------------------------------------------------------------- text


_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_BLANKS = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Normalise whitespace (runs of spaces, trailing spaces, >2 newlines); keep paragraph breaks."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip()


def text_of(record: Record, field: str, where: str) -> str:
    """The text field of a record. ``a.b`` reaches into nested objects and a list of strings is joined
    with newlines (e.g. PubMedQA's ``context.contexts``). A missing field names the location."""
    value: Any = record
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            have = ", ".join(sorted(value)) if isinstance(value, dict) else type(value).__name__
            raise HippoError(f"{where}: missing field '{field}' (have: {have or 'none'})")
        value = value[part]
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    if not isinstance(value, str):
        raise HippoError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------- instruction schemas

INSTRUCTION = {
    "options": "Answer the following multiple-choice question.",
    "abstract": "Answer the research question with yes, no or maybe, based on the abstract.",
}


def benchmark_messages(item: Item, prompt: str = "instruction") -> list[dict[str, str]]:
    """A benchmark item as a training conversation, with its answer (and explanation when it has one).

    ``instruction``: an instruction, the question with lettered options, answered ``(B) text.``;
    ``hippocrates`` / ``letter``: the evaluation's own question text, answered as it is scored.
    """
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    abstract = item.context is not None and [o.lower() for o in item.options] == ["yes", "no", "maybe"]
    if prompt == "instruction":
        if abstract:
            user = f"{INSTRUCTION['abstract']}\n\nAbstract: {item.context}\nQuestion: {item.question}"
            answer = item.options[item.gold]
        else:
            listed = " ".join(f"({letters[i]}) {o}" for i, o in enumerate(item.options))
            context = f"{item.context}\n" if item.context else ""
            user = f"{INSTRUCTION['options']}\n\n{context}Question: {item.question}\n{listed}"
            answer = f"({letters[item.gold]}) {item.options[item.gold]}"
        answer += "." + (f" {item.explanation.strip()}" if item.explanation else "")
    else:
        if abstract:
            user = f"Abstract: {item.context}\nQuestion: {item.question}\nAnswer:"
        elif prompt == "letter":
            lines = "".join(f"{letters[i]}. {o}\n" for i, o in enumerate(item.options))
            user = f"Question: {item.question}\n{lines}Answer:"
        else:
            listed = " ".join(f"({letters[i]}) {o}" for i, o in enumerate(item.options))
            user = f"Question: {item.question}\n{listed}\nAnswer:"
        answer = letters[item.gold] if prompt == "letter" and not abstract else item.options[item.gold]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def benchmark_reader(source: Source, fmt: str, *, hub: bool = False) -> Reader:
    """The one benchmark reader, set up for a training source (never its test split)."""
    from hippocrates.data.benchmarks import Columns

    columns = Columns(**source.columns) if fmt == "mc" and source.columns else Columns()
    if fmt == "medmcqa" and hub:  # the hub's cop is 0-based, the release's 1-based
        return Reader(format="mc", columns=Columns(id="id", question="question", options=["opa", "opb", "opc", "opd"],
                                                   answer="cop"), answer_format="index")  # fmt: skip
    split = source.split if source.split in ("train", "test", "all") else "train"
    sample = Sample(**source.sample) if source.sample else None
    return Reader(format=fmt, columns=columns, answer_format=source.answer_format, split=split, sample=sample)  # type: ignore[arg-type]


def iter_conversations(
    source: Source, stats: Counter | None = None
) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """``(location, conversation)`` of every training record of a source, in any accepted shape.

    Benchmark files (named by ``format:``, or recognised by their fields) go through the one benchmark
    reader, so training reads them exactly as evaluation does; unusable records are counted in
    ``stats`` and reported, the rest become conversations with their answers.
    """
    from hippocrates.data.conversations import to_messages

    stats = stats if stats is not None else Counter()
    fmt = source.format
    hub = not is_local(source)
    if fmt == "auto":
        first = next(iter_records(source), None)
        fmt = (detect_format(first[1]) or "auto") if first else "auto"
    if fmt in BENCHMARKS:
        reader = benchmark_reader(source, "medqa" if fmt == "medqa_hf" else fmt, hub=hub)
        if hub:
            read = _read_rows(source, reader, fmt)
        else:
            parser_fmt = "medqa_hf" if fmt == "medqa_hf" else None
            read = read_benchmark(
                reader, Path(source.path).expanduser(), prefix=Path(source.path).stem, fmt=parser_fmt
            )
        for what, entries in (("unusable", read.skipped), ("repeated", read.duplicates)):
            if entries:
                stats[f"{what}_records"] += len(entries)
                status(f"{source.path}: left out {len(entries)} {what} record(s), e.g. {entries[0][1]}")
        if read.other and reader.format == "pubmedqa" and reader.split == "train":
            stats["test_items_left_out"] += len(read.other)
            status(
                f"{source.path}: left out the {len(read.other)} official test PMIDs ({reader.ground_truth} beside it)"
            )
        if not read.items:
            raise HippoError(
                f"{source.path}: no usable {fmt} records"
                + (f" ({read.skipped[0][1]})" if read.skipped else "")
            )
        items = read.items[: source.max_samples] if source.max_samples else read.items
        for item in items:
            yield item.where, benchmark_messages(item, source.prompt)
        return
    for where, record in iter_records(source):
        yield where, to_messages(_renamed(record, source.columns), where, shape=fmt)


def _read_rows(source: Source, reader: Reader, fmt: str) -> Read:
    """A hub dataset's rows through the benchmark parsers (unusable ones counted, not raised)."""
    parse = parser_for(reader, "medqa_hf" if fmt == "medqa_hf" else None)
    read = Read([])
    for where, record in iter_records(source):
        try:
            question, options, gold, *rest = parse(record)
        except Skip as exc:
            read.skipped.append((where, f"{where}: {exc}"))
            continue
        read.items.append(Item(where, question, options, gold, rest[0] if rest else None, where))
    return read


def _renamed(record: dict[str, Any], columns: dict[str, Any] | None) -> dict[str, Any]:
    """A record with its fields under our names ({our field: your field})."""
    if not columns:
        return record
    out = dict(record)
    for ours, theirs in columns.items():
        if isinstance(theirs, str) and theirs in record:
            out[ours] = record[theirs]
    return out


def to_instruction(record: Record, where: str) -> dict[str, str]:
    """An Alpaca/medalpaca record (instruction, input, output) or a plain question/answer pair.

    Benchmark records never come here: :func:`iter_conversations` reads them with the benchmark reader.
    """
    keys = set(record)
    if {"instruction", "output"} <= keys:
        out = {
            "instruction": str(record["instruction"] or ""),
            "input": str(record.get("input") or ""),
            "output": str(record["output"] or ""),
        }
    else:
        lower = {k.lower(): k for k in keys}
        q = next((lower[k] for k in ("question", "prompt", "input") if k in lower), None)
        a = next((lower[k] for k in ("answer", "response", "output", "completion") if k in lower), None)
        if q is None or a is None:
            raise HippoError(
                f"{where}: not an instruction record (have: {', '.join(sorted(keys)) or 'none'})"
            )
        out = {"instruction": str(record[q] or ""), "input": "", "output": str(record[a] or "")}
    if not out["instruction"].strip():
        raise HippoError(f"{where}: missing field 'instruction' (empty)")
    if not out["output"].strip():
        raise HippoError(f"{where}: missing field 'output' (empty)")
    return out
