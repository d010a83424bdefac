"""``hippo data``: token counts, duplicates and benchmark contamination.

``hippo data check RECIPE`` counts tokens per training source and measures, for every training
source and every evaluation set of the recipe, how many evaluation items are exact duplicates of a
training record and how many share at least one 13-gram (lower-cased word 13-grams, as in the GPT-3
contamination study) with it. Evaluation sets are small, so their n-grams are indexed in memory and
training data is streamed past them: memory does not grow with the training corpus.

``hippo data stats FILE`` describes one file: records, fields, token counts and duplicate records.

Evaluation sets are read by the one benchmark reader, exactly as ``hippo eval`` reads them, and
instruction sources as the SFT stage reads them.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hippocrates.config import Recipe, Source, load_recipe
from hippocrates.data.sources import iter_records
from hippocrates.errors import HippoError

N = 13
WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def normal(text: str) -> str:
    return " ".join(words(text))


# ------------------------------------------------------------------------------------ evaluation sets


def eval_specs(recipe: Recipe) -> dict[str, Any]:
    """The recipe's evaluation tasks by name (a task may be named by a YAML path)."""
    from hippocrates.eval.registry import resolve_tasks

    names = list(dict.fromkeys([*recipe.eval.tasks, *recipe.eval.data]))
    specs = {}
    for name in names:
        try:
            spec = resolve_tasks([name])[0]
        except HippoError:
            continue  # a data key whose task is named by a path in eval.tasks
        specs[spec.task] = spec
    return specs


def eval_items(task: Any, path: str) -> list[tuple[str, str]]:
    """(question, question + options + passage) of each item of an evaluation set, read exactly as
    ``hippo eval`` reads it (the task's reader, split and sample)."""
    from hippocrates.data.benchmarks import read_benchmark
    from hippocrates.eval.registry import resolve_tasks

    spec = resolve_tasks([task])[0] if isinstance(task, str) else task
    p = Path(path)
    if not p.is_file():
        raise HippoError(f"eval.data.{spec.task}: {p}: file not found")
    read = read_benchmark(spec, p, prefix=spec.task)
    return [(it.question, " ".join([it.question, *it.options, it.context or ""])) for it in read.items]


# ---------------------------------------------------------------------------------- training records


def training_sources(recipe: Recipe) -> list[tuple[str, Source, str]]:
    """(stage, source, how to read it) for every source the recipe trains on."""
    st = recipe.stages
    out = [("cpt", s, "text") for s in st.cpt.data] + [("sft", s, "instruction") for s in st.sft.data]
    if st.annotate.enabled and st.annotate.prompts:
        out.append(
            ("annotate", Source(path=st.annotate.prompts, text_field=st.annotate.prompt_field), "text")
        )
    out += [("dpo", s, "preference") for s in st.dpo.data]
    return out


def stem(text: str) -> str:
    """A multiple-choice question without a leading 'Question:' and without its options."""
    return re.sub(r"^\s*question:\s*", "", re.split(r"\(A\)", text)[0], flags=re.IGNORECASE)


def record_texts(record: dict[str, Any], how: str, source: Source, where: str) -> tuple[str, list[str]]:
    """(full text for n-grams and tokens, candidate strings for exact matching) of one record."""
    if how == "instruction":
        parts = [m["content"] + (f" {m['input']}" if m.get("input") else "") for m in record["messages"]]
        users = [m["content"] for m in record["messages"] if m["role"] == "user"]
        return " ".join(parts), parts + users + [stem(u) for u in users] + [_question_line(u) for u in users]
    if how == "preference":
        parts = [str(record.get(k) or "") for k in ("prompt", "chosen", "rejected")]
        return " ".join(parts), parts
    text = record.get(source.text_field)
    if not isinstance(text, str):
        raise HippoError(f"{where}: missing field '{source.text_field}'")
    return text, [text]


def _question_line(text: str) -> str:
    """The question of a rendered benchmark item ("...Question: X\n(A) ...")."""
    match = re.search(r"Question:\s*(.*?)(?:\n|$)", text)
    return match.group(1) if match else ""


def source_records(how: str, source: Source) -> Iterator[tuple[str, dict[str, Any]]]:
    """A training source's records as the checks see them (conversations for instruction sources)."""
    if how == "instruction":
        from hippocrates.data.sources import iter_conversations

        for where, messages in iter_conversations(source):
            yield where, {"messages": messages}
    else:
        yield from iter_records(source)


@dataclass
class EvalIndex:
    """The n-grams and normalised questions of one evaluation set, and what matched them."""

    name: str
    items: list[tuple[str, str]]
    grams: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    exact: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def __post_init__(self) -> None:
        for i, (question, text) in enumerate(self.items):
            self.exact[normal(question)].append(i)
            w = words(text)
            for j in range(len(w) - N + 1):
                self.grams[hash(tuple(w[j : j + N]))].append(i)

    def scan(self, text: str, candidates: list[str], hit_grams: set[int], hit_exact: set[int]) -> None:
        for c in candidates:
            hit_exact.update(self.exact.get(normal(c), ()))
        w = words(text)
        for j in range(len(w) - N + 1):
            hit_grams.update(self.grams.get(hash(tuple(w[j : j + N])), ()))


def load_tokenizer_for(spec: str | None):
    if spec is None:
        return None
    from hippocrates.models import load_tokenizer

    return load_tokenizer(spec)


def count_tokens(tokenizer, texts: list[str]) -> int:
    if tokenizer is None:
        return sum(len(t.split()) for t in texts)
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def check_recipe(recipe: Recipe, tokenizer) -> dict[str, Any]:
    """Token counts per training source and contamination of every eval set by every source."""
    specs = eval_specs(recipe)
    evals = [
        EvalIndex(task, eval_items(specs.get(task, task), path))
        for task, path in sorted(recipe.eval.data.items())
    ]
    sources, overlap = [], []
    for stage, source, how in training_sources(recipe):
        hits = {e.name: (set(), set()) for e in evals}
        records, tokens, batch = 0, 0, []
        for where, record in source_records(how, source):
            text, candidates = record_texts(record, how, source, where)
            records += 1
            batch.append(text)
            if len(batch) == 256:
                tokens, batch = tokens + count_tokens(tokenizer, batch), []
            for e in evals:
                e.scan(text, candidates, *hits[e.name])
        tokens += count_tokens(tokenizer, batch)
        if records == 0:
            raise HippoError(f"{source.path}: empty dataset (no records)")
        sources.append({"stage": stage, "source": source.path, "records": records, "tokens": tokens})
        for e in evals:
            grams, exact = hits[e.name]
            overlap.append(
                {
                    "stage": stage,
                    "source": source.path,
                    "eval": e.name,
                    "items": len(e.items),
                    "exact": len(exact),
                    f"ngram{N}": len(grams),
                    f"ngram{N}_pct": round(100 * len(grams) / len(e.items), 1) if e.items else 0.0,
                }
            )
    return {"token_unit": "tokens" if tokenizer else "words", "sources": sources, "overlap": overlap}


def file_stats(path: str, text_field: str | None, tokenizer) -> dict[str, Any]:
    """Records, fields (with how often each occurs), token counts per text field, duplicate records."""
    fields: Counter = Counter()
    tokens: Counter = Counter()
    seen: Counter = Counter()
    records = 0
    for _, record in iter_records(Source(path=path, text_field=text_field or "text")):
        records += 1
        fields.update(record.keys())
        seen[json.dumps(record, sort_keys=True, default=str)] += 1
        for key, value in record.items():
            if isinstance(value, str) and (text_field is None or key == text_field):
                tokens[key] += count_tokens(tokenizer, [value])
    if records == 0:
        raise HippoError(f"{path}: empty dataset (no records)")
    return {
        "file": path,
        "records": records,
        "fields": dict(fields),
        "tokens": dict(tokens),
        "token_unit": "tokens" if tokenizer else "words",
        "duplicate_records": sum(n - 1 for n in seen.values() if n > 1),
    }


# ----------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="token counts per source and contamination of every eval set")
    check.add_argument("recipe", help="recipe YAML")
    stats = sub.add_parser("stats", help="records, fields, token counts and duplicates of one file")
    stats.add_argument("file", help="a data file (jsonl, json, txt, parquet, csv)")
    stats.add_argument("--text-field", help="count tokens of this field only (default: every string field)")
    for p in (check, stats):
        p.add_argument(
            "--model", help="tokenizer to count with (default: the recipe's base model, or smollm2-135m)"
        )
        p.add_argument(
            "--words", action="store_true", help="count whitespace words instead of tokens (no model)"
        )
        p.add_argument("--json", action="store_true", help="print JSON")


def _table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True))]
    lines += ["  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def iter_lines(result: dict[str, Any]) -> Iterator[str]:
    unit = result["token_unit"]
    if "sources" in result:
        yield _table(result["sources"], ["stage", "source", "records", "tokens"]) + f"\n({unit})"
        if result["overlap"]:
            yield "\ncontamination (eval items that are exact duplicates / share a 13-gram with the source):"
            yield _table(
                result["overlap"], ["stage", "source", "eval", "items", "exact", f"ngram{N}", f"ngram{N}_pct"]
            )
        else:
            yield "\nno eval.data in the recipe: nothing to check for contamination"
    else:
        yield f"{result['file']}: {result['records']} records, {result['duplicate_records']} duplicate records"
        yield "fields: " + ", ".join(f"{k} ({v})" for k, v in result["fields"].items())
        yield f"{unit}: " + ", ".join(f"{k} {v}" for k, v in result["tokens"].items())


def run(args: argparse.Namespace) -> int:
    if args.action == "check":
        recipe = load_recipe(args.recipe)
        tokenizer = None if args.words else load_tokenizer_for(args.model or recipe.base_model)
        result = check_recipe(recipe, tokenizer)
    else:
        tokenizer = None if args.words else load_tokenizer_for(args.model or "smollm2-135m")
        result = file_stats(args.file, args.text_field, tokenizer)
    print(json.dumps(result, indent=2) if args.json else "\n".join(iter_lines(result)))
    return 0
