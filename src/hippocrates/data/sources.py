"""Training data sources: one reader for local files and Hugging Face datasets, plus record adapters.

A recipe ``Source`` names either a local file (``.jsonl``, ``.json``, ``.txt``/``.md``, ``.parquet``,
``.csv``/``.tsv``) or a hub dataset id. Every reader is a generator, so a streamed corpus is never held
in memory, and every record comes with a location (``file:line`` or ``id[split]#row``) so a bad
record is reported where the user can find it.

The paper's SFT mixture mixes datasets with different schemas (Alpaca-style, MedMCQA, MedQA, PubMedQA,
plain question/answer). :func:`to_instruction` recognises those schemas explicitly and fails with the
fields it saw when it does not, rather than guessing.
"""

from __future__ import annotations

import csv
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hippocrates.config import Source
from hippocrates.data.io import iter_jsonl, read_json, sha256_file
from hippocrates.errors import HippoError

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
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            for number, row in enumerate(reader, 2):
                yield f"{path}:{number}", dict(row)
    else:
        raise HippoError(
            f"{path}: unsupported file type '{suffix}' (use {', '.join(sorted(LOCAL_SUFFIXES))})"
        )


def _iter_text(path: Path, field: str) -> Iterator[tuple[str, Record]]:
    """Plain text: documents are separated by blank lines (a paragraph per document)."""
    lines: list[str] = []
    start = 1
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
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

LETTERS = "ABCDE"


def _options_line(options: list[str]) -> str:
    return " ".join(f"({LETTERS[i]}) {text}" for i, text in enumerate(options))


def to_instruction(record: Record, where: str, *, hub: bool = False) -> dict[str, str]:
    """Map one record of a known schema to ``{"instruction", "input", "output"}``.

    Known schemas: Alpaca/medalpaca (instruction, input, output), MedMCQA (question, opa..opd, cop),
    MedQA-hf (sent1, ending0..3, label), MedQA jsonl (question, options, answer_idx), PubMedQA
    (question, context, long_answer, final_decision) and plain question/answer pairs. MedMCQA's ``cop``
    is 1-based in the original release files and 0-based on the hub, hence ``hub``.
    """
    keys = set(record)
    if {"instruction", "output"} <= keys:
        out = {
            "instruction": str(record["instruction"] or ""),
            "input": str(record.get("input") or ""),
            "output": str(record["output"] or ""),
        }
    elif {"question", "opa", "opb", "opc", "opd", "cop"} <= keys:
        options = [str(record[k]) for k in ("opa", "opb", "opc", "opd")]
        answer = int(record["cop"]) - (0 if hub else 1)
        if not 0 <= answer < 4:
            raise HippoError(f"{where}: field 'cop' out of range ({record['cop']!r})")
        explanation = f" {record['exp']}" if record.get("exp") else ""
        out = {
            "instruction": "Answer the following multiple-choice question.",
            "input": f"Question: {record['question']}\n{_options_line(options)}",
            "output": f"({LETTERS[answer]}) {options[answer]}.{explanation}",
        }
    elif {"sent1", "ending0", "label"} <= keys:
        options = [str(record[f"ending{i}"]) for i in range(4) if f"ending{i}" in record]
        answer = int(record["label"])
        out = {
            "instruction": "Answer the following multiple-choice question.",
            "input": f"Question: {record['sent1']}\n{_options_line(options)}",
            "output": f"({LETTERS[answer]}) {options[answer]}.",
        }
    elif {"question", "options", "answer_idx"} <= keys and isinstance(record["options"], dict):
        options = [str(v) for _, v in sorted(record["options"].items())]
        letter = str(record["answer_idx"])
        out = {
            "instruction": "Answer the following multiple-choice question.",
            "input": f"Question: {record['question']}\n{_options_line(options)}",
            "output": f"({letter}) {record['options'].get(letter, '')}.",
        }
    elif {"question", "final_decision"} <= keys:
        context = record.get("context") or record.get("CONTEXTS") or ""
        if isinstance(context, dict):
            context = " ".join(context.get("contexts") or [])
        elif isinstance(context, list):
            context = " ".join(context)
        reason = record.get("long_answer") or record.get("LONG_ANSWER") or ""
        out = {
            "instruction": "Answer the research question with yes, no or maybe, based on the abstract.",
            "input": f"Abstract: {context}\nQuestion: {record['question']}",
            "output": f"{record['final_decision']}. {reason}".strip(),
        }
    else:
        lower = {k.lower(): k for k in keys}
        q = next((lower[k] for k in ("question", "prompt", "input") if k in lower), None)
        a = next((lower[k] for k in ("answer", "response", "output", "completion") if k in lower), None)
        if q is None or a is None:
            raise HippoError(
                f"{where}: not an instruction record: need instruction+output, a known benchmark schema, "
                f"or question+answer (have: {', '.join(sorted(keys)) or 'none'})"
            )
        out = {"instruction": str(record[q] or ""), "input": "", "output": str(record[a] or "")}
    if not out["instruction"].strip():
        raise HippoError(f"{where}: missing field 'instruction' (empty)")
    if not out["output"].strip():
        raise HippoError(f"{where}: missing field 'output' (empty)")
    return out
