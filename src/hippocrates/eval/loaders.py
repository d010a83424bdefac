"""Read benchmark items from the original release files or, online, from the Hugging Face hub.

Every format is parsed into the same :class:`Item` (question, options, gold index, optional
abstract). A record that cannot be used (missing field, answer not among the options, no
options found) is never dropped silently: it is kept as a ``(id, reason)`` pair that ends up
in results.json (``skipped`` / ``skipped_ids``) and in a warning on stderr. A file that is not
valid JSON at all is an error naming ``file:line`` (exit 2): nothing sensible can be scored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hippocrates.data.io import iter_csv, iter_jsonl, read_json, read_text, sha256_file
from hippocrates.errors import HippoError
from hippocrates.eval.formats import (
    Item,
    Skip,
    parse_mc,
    parse_medmcqa,
    parse_medqa,
    parse_pubmedqa,
    parse_usmle,
)
from hippocrates.eval.registry import Columns, HFSource, TaskSpec
from hippocrates.progress import status


@dataclass
class TaskData:
    """A task's evaluation items, its few-shot pool and what could not be parsed."""

    spec: TaskSpec
    items: list[Item]
    pool: list[Item]
    pool_is_eval: bool
    source: str
    sha256: str | None
    pool_source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    pool_overlap: int = 0  # pool items that repeat an evaluation item, removed from the pool


# ---------------------------------------------------------------- reading files


def iter_records(path: Path) -> Iterator[tuple[int | str, dict[str, Any]]]:
    """(line or key, record) for JSONL, CSV, a JSON list, or a JSON {key: record} object."""
    if not path.is_file():
        raise HippoError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        yield from iter_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
        return
    if suffix == ".json":
        text = read_text(path)
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            if "Extra data" not in exc.msg:
                raise HippoError(
                    f"{path}:{exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno})"
                ) from None
            document = None  # JSON lines in a file named .json (MedMCQA's release does this)
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


def _parse_all(
    records: Iterator[tuple[int | str, dict[str, Any]]],
    parse: Callable[[dict[str, Any]], tuple],
    make_id: Callable[[int | str, dict[str, Any]], str],
    where: Callable[[int | str], str],
    keep: Callable[[dict[str, Any]], bool] = lambda r: True,
    duplicates: list[tuple[str, str]] | None = None,
) -> tuple[list[Item], list[tuple[str, str]]]:
    """Parsed items and skipped ``(id, reason)`` pairs.

    A record repeating an earlier one (same id, or same question, options and passage) is scored
    once: the repeat goes to ``duplicates`` (``(id, reason)``), never silently counted twice.
    """
    items: list[Item] = []
    skipped: list[tuple[str, str]] = []
    by_id: dict[str, str] = {}
    by_key: dict[str, str] = {}
    for key, record in records:
        if not keep(record):
            continue
        ident = make_id(key, record)
        if ident in by_id:
            if duplicates is not None:
                duplicates.append((ident, f"{where(key)}: id {ident} repeats the record at {by_id[ident]}"))
            continue
        by_id[ident] = where(key)
        try:
            parsed = parse(record)
        except Skip as exc:
            skipped.append((ident, f"{where(key)}: {exc}"))
            continue
        question, options, gold, *rest = parsed
        context = rest[0] if rest else None
        item = Item(ident, question, options, gold, context, where(key))
        content = item_key(item)
        if content in by_key:
            if duplicates is not None:
                duplicates.append((ident, f"{where(key)}: same question and options as id {by_key[content]}"))
            continue
        by_key[content] = ident
        items.append(item)
    return items, skipped


def _parser(spec: TaskSpec, fmt: str, columns: Columns, answer_format: str) -> Callable:
    if fmt == "medqa":
        return parse_medqa
    if fmt == "medmcqa":
        return parse_medmcqa
    if fmt == "usmle":
        return parse_usmle
    if fmt == "mc":
        return lambda r: parse_mc(r, columns, answer_format)
    raise AssertionError(fmt)


def _id_maker(fmt: str, columns: Columns, task: str) -> Callable[[int | str, dict[str, Any]], str]:
    def make(key: int | str, record: dict[str, Any]) -> str:
        column = {"medmcqa": "id", "usmle": "question_id", "pubmedqa": "pubid"}.get(fmt)
        if fmt == "mc":
            column = columns.id
        value = record.get(column) if column else None
        if value not in (None, ""):
            return str(value)
        return str(key) if fmt == "pubmedqa" or isinstance(key, str) else f"{task}-{key}"

    return make


def load_file(
    spec: TaskSpec, path: Path, duplicates: list[tuple[str, str]] | None = None
) -> tuple[list[Item], list[tuple[str, str]]]:
    """Parse one local file in the task's format (pubmedqa: every record, labels from the file)."""
    fmt = spec.format
    if fmt == "pubmedqa":
        choices = spec.choices
        return _parse_all(
            iter_records(path),
            lambda r: parse_pubmedqa(r, choices),
            _id_maker(fmt, spec.columns, spec.task),
            lambda k: f"{path}:{k}",
            duplicates=duplicates,
        )
    keep = (lambda r: r.get("category") == spec.category) if fmt == "usmle" and spec.category else None
    items, skipped = _parse_all(
        iter_records(path),
        _parser(spec, fmt, spec.columns, spec.answer_format),
        _id_maker(fmt, spec.columns, spec.task),
        lambda k: f"{path}:{k}",
        keep or (lambda r: True),
        duplicates,
    )
    if fmt == "usmle" and spec.category:  # records with no category belong to no step: say so
        for key, record in iter_records(path):
            if record.get("category") in (None, ""):
                ident = _id_maker(fmt, spec.columns, spec.task)(key, record)
                skipped.append((ident, f"{path}:{key}: no category, so it belongs to no step"))
    return items, skipped


def _load_pubmedqa(
    spec: TaskSpec, path: Path, duplicates: list[tuple[str, str]]
) -> tuple[list[Item], list[Item], bool, list]:
    """PQA-L: the test split is the ground-truth PMIDs (labels from that file), the pool the rest."""
    items, skipped = load_file(spec, path, duplicates)
    if spec.split == "all":
        return items, items, True, skipped
    truth_path = path.with_name(spec.ground_truth)
    if not truth_path.is_file():
        raise HippoError(
            f"{truth_path}: not found; task {spec.task} needs the official test PMIDs beside "
            f"{path.name} (or use task pubmedqa_all for all {len(items)} items)"
        )
    truth = read_json(truth_path)
    if not isinstance(truth, dict):
        raise HippoError(f"{truth_path}: expected an object PMID -> label")
    by_id = {item.id: item for item in items}
    bad = {ident for ident, _ in skipped}
    test: list[Item] = []
    test_skipped = [(i, r) for i, r in skipped if i in truth]
    for pmid, label in truth.items():
        if pmid in bad:
            continue
        item = by_id.get(pmid)
        if item is None:
            test_skipped.append((pmid, f"{truth_path}: PMID {pmid} is not in {path.name}"))
        elif label not in spec.choices:
            test_skipped.append((pmid, f"{truth_path}: label {label!r} is not one of {spec.choices}"))
        else:
            test.append(
                Item(
                    item.id, item.question, item.options, spec.choices.index(label), item.context, item.where
                )
            )
    order = {item.id: i for i, item in enumerate(items)}
    test.sort(key=lambda it: order[it.id])  # file order of ori_pqal.json
    pool = [item for item in items if item.id not in truth]
    return test, pool, False, test_skipped


def _fewshot_file(spec: TaskSpec, path: Path, explicit: str | None) -> Path | None:
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise HippoError(f"{p}: few-shot file not found (--fewshot-data {spec.task}=PATH)")
        return p
    for name in spec.fewshot_files:
        candidate = path.with_name(name)
        if candidate.is_file() and candidate.resolve() != path.resolve():
            return candidate
    return None


def local_path(spec: TaskSpec, data: str | None, data_dir: str | None) -> Path | None:
    """The local file for a task: ``--data TASK=PATH`` (file or folder), else under --data-dir."""
    if data:
        p = Path(data).expanduser()
        if p.is_dir():
            if not spec.file:
                raise HippoError(f"{p}: task {spec.task} has no default file name; give the file itself")
            for candidate in (p / spec.file, p / Path(spec.file).name):
                if candidate.is_file():
                    return candidate
            raise HippoError(f"{p}: no {Path(spec.file).name} in this folder (--data {spec.task}=PATH)")
        if not p.is_file():
            raise HippoError(f"{p}: file not found (--data {spec.task}=PATH)")
        return p
    if data_dir:
        if not spec.file:
            raise HippoError(f"task {spec.task} has no default file; pass --data {spec.task}=PATH")
        p = Path(data_dir).expanduser() / spec.file
        if not p.is_file():
            raise HippoError(f"{p}: file not found (task {spec.task} under --data-dir {data_dir})")
        return p
    return None


def _warn(task: str, skipped: list[tuple[str, str]], what: str = "record(s)") -> None:
    if skipped:
        shown = "; ".join(f"{i} ({reason})" for i, reason in skipped[:5])
        more = f"; ... {len(skipped) - 5} more in results.json" if len(skipped) > 5 else ""
        status(f"warning: {task}: skipped {len(skipped)} unusable {what}: {shown}{more}")


def task_files(
    spec: TaskSpec, data: str | None = None, data_dir: str | None = None, fewshot_data: str | None = None
) -> dict[str, Any]:
    """The files a task reads, by sha256 (or its hub dataset when no local file is given): its identity."""
    path = local_path(spec, data, data_dir)
    if path is None:
        hf = spec.hf
        return {"task": spec.task, "hub": hf.model_dump(mode="json") if hf else None}
    out: dict[str, Any] = {"task": spec.task, "path": str(path), "sha256": sha256_file(path)}
    if spec.format == "pubmedqa" and spec.split != "all":
        truth = path.with_name(spec.ground_truth)
        if truth.is_file():
            out["ground_truth_sha256"] = sha256_file(truth)
    elif spec.format not in ("pubmedqa", "usmle"):
        pool = _fewshot_file(spec, path, fewshot_data)
        if pool is not None:
            out.update(fewshot_path=str(pool), fewshot_sha256=sha256_file(pool))
    return out


def load_task(
    spec: TaskSpec, data: str | None = None, data_dir: str | None = None, fewshot_data: str | None = None
) -> TaskData:
    """Load a task's items and few-shot pool from a local file, or from the hub when none is given."""
    path = local_path(spec, data, data_dir)
    if path is None:
        return load_hf(spec)
    duplicates: list[tuple[str, str]] = []
    if spec.format == "pubmedqa":
        items, pool, pool_is_eval, skipped = _load_pubmedqa(spec, path, duplicates)
        pool_source = (
            f"{path} (PMIDs not in {spec.ground_truth})"
            if not pool_is_eval
            else f"{path} (the other evaluation items)"
        )
    elif spec.format == "usmle":
        items, skipped = load_file(spec, path, duplicates)
        pool, pool_is_eval, pool_source = items, True, f"{path} (the other {spec.category} evaluation items)"
    else:
        items, skipped = load_file(spec, path, duplicates)
        pool_path = _fewshot_file(spec, path, fewshot_data)
        if pool_path is None:
            pool, pool_is_eval, pool_source = (
                items,
                True,
                f"{path} (the other evaluation items: no training file beside it)",
            )
        else:
            pool, pool_skipped = load_file(spec, pool_path)
            _warn(spec.task, pool_skipped, f"few-shot record(s) in {pool_path.name}")
            pool_is_eval, pool_source = False, str(pool_path)
    _warn(spec.task, skipped)
    if duplicates:
        _warn(spec.task, duplicates, "repeated record(s) (scored once)")
    if not items:
        raise HippoError(f"{path}: no usable items for task {spec.task}")
    overlap = 0
    if not pool_is_eval:  # an exemplar must never be a copy of an evaluation item (it would give the answer)
        keys = {item_key(i) for i in items}
        kept = [p for p in pool if item_key(p) not in keys]
        overlap = len(pool) - len(kept)
        if overlap:
            status(
                f"warning: {spec.task}: {overlap} few-shot pool item(s) repeat evaluation items; left out of the pool"
            )
        pool = kept
    return TaskData(
        spec,
        items,
        pool,
        pool_is_eval,
        str(path),
        sha256_file(path),
        pool_source,
        skipped,
        duplicates,
        overlap,
    )


def load_hf(spec: TaskSpec) -> TaskData:
    """Online: the task's Hugging Face dataset (the one the paper's harness / lm-eval use)."""
    hf: HFSource | None = spec.hf
    hint = f"--data {spec.task}=PATH" + (f" or --data-dir DIR holding {spec.file}" if spec.file else "")
    if hf is None:
        raise HippoError(f"task {spec.task}: no local file given ({hint}) and no Hugging Face source")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline:
        raise HippoError(
            f"task {spec.task}: no local file given ({hint}), and HF_HUB_OFFLINE is set, "
            f"so the hub dataset {hf.path} cannot be downloaded"
        )
    fmt = hf.format or spec.format
    columns = hf.columns or spec.columns
    splits = {"eval": hf.split, **({"pool": hf.fewshot_split} if hf.fewshot_split else {})}
    loaded: dict[str, tuple[list[Item], list]] = {}
    for role, split in splits.items():
        try:
            import datasets

            rows = datasets.load_dataset(hf.path, hf.name, data_files=hf.data_files, split=split)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise HippoError(
                f"task {spec.task}: no local file given ({hint}) and the hub dataset {hf.path} "
                f"could not be loaded: {first}"
            ) from None
        records = ((i + 1, dict(row)) for i, row in enumerate(rows))
        where = lambda k, s=split: f"{hf.path}[{s}]:{k}"  # noqa: E731
        if fmt == "pubmedqa":
            parse = lambda r: parse_pubmedqa(r, spec.choices)  # noqa: E731
        else:
            parse = _parser(spec, fmt, columns, hf.answer_format)
        loaded[role] = _parse_all(records, parse, _id_maker(fmt, columns, spec.task), where)
    items, skipped = loaded["eval"]
    _warn(spec.task, skipped)
    if "pool" in loaded:
        pool, pool_is_eval = loaded["pool"][0], False
    else:
        pool, pool_is_eval = items, True
    source = f"hf:{hf.path}" + (f"/{hf.name}" if hf.name else "") + f"[{hf.split}]"
    return TaskData(
        spec,
        items,
        pool,
        pool_is_eval,
        source,
        None,
        f"hf:{hf.path}[{splits.get('pool', hf.split)}]",
        skipped,
    )
