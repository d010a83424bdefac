"""A task's evaluation items and few-shot pool, from local release files or, online, the hub.

Files are read by the one benchmark reader (:mod:`hippocrates.data.benchmarks`). A record that
cannot be used (missing field, answer not among the options, no options found) is never dropped
silently: it is kept as an ``(id, reason)`` pair that ends up in results.json (``skipped`` /
``skipped_ids``) and in a warning on stderr; repeated records are scored once and listed
(``duplicates``). A file that is not valid JSON at all is an error naming ``file:line`` (exit 2).
Where the few-shot exemplars come from is always stated; pool items that repeat an evaluation
item are left out of the pool and counted.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hippocrates.data.benchmarks import Item, Read, Skip, id_maker, item_key, parser_for, read_benchmark
from hippocrates.data.io import sha256_file
from hippocrates.errors import HippoError
from hippocrates.eval.registry import TaskSpec
from hippocrates.progress import status

__all__ = ["Item", "TaskData", "load_task", "local_path", "task_files"]


@dataclass
class TaskData:
    """A task's evaluation items, its few-shot pool and what could not be used."""

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
    dropped_options: int = 0
    filtered_out: int = 0
    outside_sample: int = 0


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


def _warn(task: str, entries: list[tuple[str, str]], what: str = "unusable record(s)") -> None:
    if entries:
        shown = "; ".join(f"{i} ({reason})" for i, reason in entries[:5])
        more = f"; ... {len(entries) - 5} more in results.json" if len(entries) > 5 else ""
        status(f"warning: {task}: skipped {len(entries)} {what}: {shown}{more}")


def _report(spec: TaskSpec, read: Read) -> None:
    _warn(spec.task, read.skipped)
    _warn(spec.task, read.duplicates, "repeated record(s) (scored once)")
    if read.dropped_options:
        status(
            f"{spec.task}: left out {read.dropped_options} filler option(s) ({', '.join(spec.drop_options)})"
        )
    if read.filtered_out:
        status(f"{spec.task}: {read.filtered_out} record(s) left out by the task's filter")
    if read.outside_sample and spec.sample is not None:
        status(
            f"{spec.task}: {len(read.items)} item(s) of the sample (seed {spec.sample.seed}, from item "
            f"{spec.sample.start}); {read.outside_sample} other usable item(s) of the file not scored"
        )


def load_task(
    spec: TaskSpec, data: str | None = None, data_dir: str | None = None, fewshot_data: str | None = None
) -> TaskData:
    """Load a task's items and few-shot pool from a local file, or from the hub when none is given."""
    path = local_path(spec, data, data_dir)
    if path is None:
        return load_hf(spec)
    read = read_benchmark(spec, path, prefix=spec.task)
    _report(spec, read)
    if not read.items:
        raise HippoError(f"{path}: no usable items for task {spec.task}")
    if spec.format == "pubmedqa" and spec.split == "test":
        pool, pool_is_eval = read.other, False
        pool_source = f"{path} (PMIDs not in {spec.ground_truth})"
    elif spec.format == "pubmedqa" or spec.format == "usmle":
        pool, pool_is_eval = read.items, True
        pool_source = f"{path} (the other evaluation items)"
    else:
        pool_path = _fewshot_file(spec, path, fewshot_data)
        if pool_path is None:
            pool, pool_is_eval = read.items, True
            pool_source = f"{path} (the other evaluation items: no training file beside it)"
        else:
            pool_read = read_benchmark(
                spec.model_copy(update={"sample": None}), pool_path, prefix=f"{spec.task}-pool"
            )
            _warn(spec.task, pool_read.skipped, f"few-shot record(s) in {pool_path.name}")
            pool, pool_is_eval, pool_source = pool_read.items, False, str(pool_path)
            _compare_option_counts(spec, read.items, pool, pool_path)
    overlap = 0
    if not pool_is_eval:  # an exemplar must never be a copy of an evaluation item (it would give the answer)
        keys = {item_key(i) for i in read.items}
        kept = [p for p in pool if item_key(p) not in keys]
        overlap = len(pool) - len(kept)
        if overlap:
            status(
                f"warning: {spec.task}: {overlap} few-shot pool item(s) repeat evaluation items; left out of the pool"
            )
        pool = kept
    return TaskData(
        spec, read.items, pool, pool_is_eval, str(path), sha256_file(path), pool_source, read.skipped,
        read.duplicates, overlap, read.dropped_options, read.filtered_out, read.outside_sample,
    )  # fmt: skip


def _compare_option_counts(spec: TaskSpec, items: list[Item], pool: list[Item], pool_path: Path) -> None:
    """A pool whose questions have other option counts (a 10-option file for a 4-option set) is worth a word."""
    ours, theirs = Counter(len(i.options) for i in items), Counter(len(i.options) for i in pool)
    if pool and set(theirs) - set(ours):
        status(
            f"warning: {spec.task}: the few-shot pool {pool_path.name} has questions with "
            f"{'/'.join(map(str, sorted(theirs)))} options, the evaluation set {'/'.join(map(str, sorted(ours)))}"
        )


def load_hf(spec: TaskSpec) -> TaskData:
    """Online: the task's Hugging Face dataset (the one the paper's harness / lm-eval use)."""
    hf = spec.hf
    hint = f"--data {spec.task}=PATH" + (f" or --data-dir DIR holding {spec.file}" if spec.file else "")
    if hf is None:
        raise HippoError(f"task {spec.task}: no local file given ({hint}) and no Hugging Face source")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise HippoError(
            f"task {spec.task}: no local file given ({hint}), and HF_HUB_OFFLINE is set, "
            f"so the hub dataset {hf.path} cannot be downloaded"
        )
    reader = spec.model_copy(update={"format": hf.format or spec.format, "columns": hf.columns or spec.columns,
                                     "answer_format": hf.answer_format})  # fmt: skip
    parse = parser_for(reader)
    make_id = id_maker(reader, spec.task)
    splits = {"eval": hf.split, **({"pool": hf.fewshot_split} if hf.fewshot_split else {})}
    loaded: dict[str, Read] = {}
    for role, split in splits.items():
        try:
            import datasets

            rows = datasets.load_dataset(hf.path, hf.name, data_files=hf.data_files, split=split)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise HippoError(
                f"task {spec.task}: no local file given ({hint}) and the hub dataset {hf.path} could not be loaded: {first}"
            ) from None
        read = Read([])
        seen: set[str] = set()
        for i, row in enumerate(rows, 1):
            record, where = dict(row), f"{hf.path}[{split}]:{i}"
            ident = make_id(i, record)
            if ident in seen:
                read.duplicates.append((ident, f"{where}: id {ident} repeated"))
                continue
            seen.add(ident)
            try:
                question, options, gold, *rest = parse(record)
            except Skip as exc:
                read.skipped.append((ident, f"{where}: {exc}"))
                continue
            read.items.append(Item(ident, question, options, gold, rest[0] if rest else None, where))
        loaded[role] = read
    _report(spec, loaded["eval"])
    items = loaded["eval"].items
    pool, pool_is_eval = (loaded["pool"].items, False) if "pool" in loaded else (items, True)
    source = f"hf:{hf.path}" + (f"/{hf.name}" if hf.name else "") + f"[{hf.split}]"
    return TaskData(
        spec, items, pool, pool_is_eval, source, None, f"hf:{hf.path}[{splits.get('pool', hf.split)}]",
        loaded["eval"].skipped, loaded["eval"].duplicates,
    )  # fmt: skip
