"""Candidate answers: n sampled responses per patient question from the model being aligned.

Each (prompt, candidate k) gets its own seed derived from the recipe seed and the prompt id, so
a rerun, or a run with more prompts or another batch size, draws the same candidates for the
same question. The prompt is rendered the way SFT trained the model (:mod:`hippocrates.chat`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hippocrates import chat
from hippocrates.data.io import iter_jsonl, require_fields
from hippocrates.errors import HippoError
from hippocrates.progress import progress
from hippocrates.rlaif.sampling import RowSpec, generate


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


def load_prompts(path: str | Path, field: str = "prompt", limit: int | None = None) -> list[Prompt]:
    """Questions from a JSONL file (``id`` optional: the line number stands in); ids must be unique."""
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for line, record in iter_jsonl(path):
        require_fields(record, [field], path, line)
        if not isinstance(record[field], str):
            raise HippoError(f"{path}:{line}: field '{field}' must be a string")
        pid = str(record.get("id", f"line-{line}"))
        if pid in seen:
            raise HippoError(f"{path}:{line}: duplicate id '{pid}'")
        seen.add(pid)
        prompts.append(Prompt(pid, record[field]))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise HippoError(f"{path}: no prompts")
    return prompts


def candidate_seed(seed: int, prompt_id: str, k: int) -> int:
    """A 63-bit seed that depends only on the run seed, the prompt id and the candidate index."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}:{k}".encode()).digest()[:8], "big") >> 1


def sample_candidates(
    model: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    template: str = "auto",
) -> list[dict[str, Any]]:
    """One record per prompt: ``{"id", "prompt", "candidates": [{"text", "seed", ...}], "settings"}``.

    ``batch_size`` counts prompts, so a generate call holds ``batch_size * n`` rows; prompts of
    similar length share a batch to keep left padding small.
    """
    fmt = chat.choose_format(tokenizer, template)
    rendered = [chat.render(tokenizer, chat.user(p.text), fmt) for p in prompts]
    special = chat.adds_special_tokens(fmt)
    lengths = [len(tokenizer(r, add_special_tokens=special)["input_ids"]) for r in rendered]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    settings = {
        "n": n,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "template": fmt,
        "seed": seed,
    }
    results: dict[int, list[dict[str, Any]]] = {}
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in progress(batches, desc="sampling candidates", unit="batch"):
        rows = [(i, k) for i in batch for k in range(n)]
        specs = [
            RowSpec(candidate_seed(seed, prompts[i].id, k), temperature, top_p, max_new_tokens)
            for i, k in rows
        ]
        outs = generate(model, tokenizer, [rendered[i] for i, _ in rows], specs, add_special_tokens=special)
        for (i, _), spec, out in zip(rows, specs, outs, strict=True):
            results.setdefault(i, []).append(
                {
                    "text": out.text,
                    "seed": spec.seed,
                    "n_tokens": out.n_tokens,
                    "finish_reason": out.finish_reason,
                }
            )
    return [
        {"id": p.id, "prompt": p.text, "candidates": results[i], "settings": settings}
        for i, p in enumerate(prompts)
    ]
