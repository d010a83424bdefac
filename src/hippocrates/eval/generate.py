"""Generative evaluation: the model answers each item in its own words and the answer is read back.

The question is :func:`hippocrates.eval.extract.ask` (reason, then end with ``Answer: X``), the
same text the GRPO stage trains on, rendered by :func:`hippocrates.chat.render`: the model's chat
template by default when it has one, else the Alpaca format (``chat_template`` True/False forces
one). Few-shot exemplars (drawn as for log-likelihood evaluation) are earlier user/assistant turns
whose assistant turn is only the gold :func:`~hippocrates.eval.extract.answer_line`.

Generation (``backend="hf"``) is batched: prompts are sorted by length, left-padded and decoded
together with a key/value cache; a row leaves the batch as soon as it emits an end-of-sequence
token or reaches ``max_new_tokens`` (the thinking budget), and the next waiting prompt is
prefilled and joins the batch (continuous batching), so short answers never wait for long ones
and the batch stays full. Greedy decoding takes the argmax; with ``temperature > 0`` every sample draws from its own
generator seeded by (seed, item id, sample number), so a sample does not depend on which other
rows share its batch. Each sample's log-probability is the sum of the model's own (temperature 1)
log-probabilities of its tokens, the end-of-sequence token included when it stopped.

Self-consistency (``samples > 1``): every sample is extracted, the parsed answers vote, and the
majority wins. A tie is broken by log-probability: among the tied answers, the one whose best
sample (highest summed log-probability) is highest wins; should those be equal too, the earlier
option. The item's ``response`` is that best sample of the winning answer (of all samples, when
none parsed). An item with no parsed answer is *unparsed*: scored wrong, counted and listed.
"""

from __future__ import annotations

import functools
import inspect
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from hippocrates import chat
from hippocrates.data.benchmarks import LETTERS, Item
from hippocrates.errors import HippoError
from hippocrates.eval.extract import Extraction, answer_line, ask, extract, is_lettered
from hippocrates.eval.loaders import TaskData
from hippocrates.eval.metrics import mean_stderr
from hippocrates.progress import progress, status

MODES = ("loglik", "generate")
BACKENDS = ("hf", "vllm")
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class GenerationSettings:
    """How a generative evaluation generates: recorded in its run record and results.json."""

    samples: int = 1
    temperature: float = 0.0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    backend: str = "hf"

    def check(self) -> None:
        """One-line errors for settings that cannot work (before any model is loaded)."""
        if self.samples < 1:
            raise HippoError(f"--samples must be >= 1, got {self.samples}")
        if self.temperature < 0:
            raise HippoError(f"--temperature must be >= 0, got {self.temperature}")
        if self.samples > 1 and self.temperature == 0:
            raise HippoError(
                f"--samples {self.samples} needs --temperature > 0 (greedy samples would all be the same)"
            )
        if self.max_new_tokens < 1:
            raise HippoError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.backend not in BACKENDS:
            raise HippoError(f"unknown backend '{self.backend}' (choose from {', '.join(BACKENDS)})")
        if self.backend == "vllm":
            try:
                import vllm  # noqa: F401
            except ImportError:
                raise HippoError(
                    "--backend vllm: vllm is not installed (pip install 'hippocrates[vllm]', on a GPU machine)"
                ) from None

    def record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Sample:
    """One generated continuation."""

    text: str
    tokens: int  # generated tokens, without the end-of-sequence token
    finish: str  # "stop" (end-of-sequence token) or "length" (the budget)
    logprob: float  # summed log-probability of its tokens (end-of-sequence token included)


def template_format(tokenizer: Any, chat_template: bool | None) -> chat.Format:
    """``None``: the chat template when the tokenizer has one, else Alpaca; True/False force one."""
    if chat_template is None:
        return chat.choose_format(tokenizer, "auto")
    if chat_template and not chat.has_template(tokenizer):
        raise HippoError("--chat-template: this model's tokenizer has no chat template")
    return "chat" if chat_template else "alpaca"


def conversation(item: Item, shots: list[Item]) -> list[dict[str, str]]:
    """The item asked after its exemplars, each answered with just its gold answer line."""
    messages: list[dict[str, str]] = []
    for shot in shots:
        messages += [
            {"role": "user", "content": ask(shot)},
            {"role": "assistant", "content": answer_line(shot)},
        ]
    return [*messages, {"role": "user", "content": ask(item)}]


def sample_seed(seed: int, item_id: str, number: int) -> int:
    """A sample's own seed: stable across runs, batch sizes and item order."""
    return zlib.crc32(f"{seed}:{item_id}:{number}".encode())


# ---------------------------------------------------------------- batched generation (hf)


@functools.cache
def _takes(model_class: type, name: str) -> bool:
    try:
        return name in inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):
        return False


def stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """The end-of-sequence ids: the generation config's (one or a list) and the tokenizer's."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _joinable(cache: Any) -> bool:
    """Whether rows can join ``cache`` mid-generation: a cache of plain per-layer key/value tensors."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    return isinstance(cache, DynamicCache) and bool(layers) and all(type(x) is DynamicLayer for x in layers)


def _pad_left(tensor: Any, width: int, dim: int) -> Any:
    """``tensor`` with zeros in front along ``dim`` up to ``width`` (the masked padding of a row)."""
    import torch

    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class _Decoder:
    """Continuous batching: up to ``batch_size`` rows decode together; a finished row leaves at once
    and the next waiting prompt is prefilled and joins the batch, left-padded to the same width."""

    def __init__(self, model: Any, rows: list[list[int]], seeds: list[int], *, max_new_tokens: int,
                 temperature: float, stop: set[int], pad_id: int) -> None:  # fmt: skip
        import torch

        self.model, self.rows, self.stop, self.pad_id = model, rows, stop, pad_id
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.device = next(model.parameters()).device
        self.generators = [torch.Generator().manual_seed(s) for s in seeds] if temperature > 0 else []
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.finish = ["length"] * len(rows)
        self.logprob = [0.0] * len(rows)
        cls = type(model)
        self.cache_arg = "cache" if _takes(cls, "cache") else "past_key_values"  # renamed in transformers 5
        self.keep_last = {"logits_to_keep": 1} if _takes(cls, "logits_to_keep") else {}
        self.alive: list[int] = []  # row numbers in the batch, in batch order
        self.cache: Any = None
        self.mask = self.positions = self.logits = (
            None  # per batch row: attention mask, last position, next logits
        )

    def forward(self, ids: Any, mask: Any, positions: Any, cache: Any) -> tuple[Any, Any]:
        """Next-token logits (fp32) of every row, and the cache."""
        out = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device), use_cache=True, **{self.cache_arg: cache}, **self.keep_last,
        )  # fmt: skip
        found = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        return out.logits[:, -1, :].float(), found

    def admit(self, new: list[int]) -> None:
        """Prefill ``new`` rows (left-padded together) and add them to the batch."""
        import torch

        width = max(len(self.rows[i]) for i in new)
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for b, i in enumerate(new):
            ids[b, width - len(self.rows[i]) :] = torch.tensor(self.rows[i], dtype=torch.long)
            mask[b, width - len(self.rows[i]) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self.forward(ids, mask, positions, None)
        if not self.alive:
            self.cache, self.mask, self.positions, self.logits = cache, mask, positions[:, -1], logits
        else:
            total = max(self.mask.shape[1], width)
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([_pad_left(mine.keys, total, 2), _pad_left(theirs.keys, total, 2)])
                mine.values = torch.cat(
                    [_pad_left(mine.values, total, 2), _pad_left(theirs.values, total, 2)]
                )
            self.mask = torch.cat([_pad_left(self.mask, total, 1), _pad_left(mask, total, 1)])
            self.positions = torch.cat([self.positions, positions[:, -1]])
            self.logits = torch.cat([self.logits, logits])
        self.alive += new

    def choose(self) -> Any:
        """Each row's next token: the argmax, or a draw from the row's own generator."""
        import torch

        if self.temperature == 0:
            return self.logits.argmax(dim=-1).cpu()
        probs = torch.softmax(self.logits.cpu() / self.temperature, dim=-1)
        draws = [
            torch.multinomial(probs[b], 1, generator=self.generators[i])[0] for b, i in enumerate(self.alive)
        ]
        return torch.stack(draws)

    def step(self) -> None:
        """Take one token for every row, drop the finished ones, run the others one position on."""
        import torch

        chosen = self.choose()
        picked = torch.log_softmax(self.logits, dim=-1).gather(1, chosen.to(self.logits.device)[:, None])[
            :, 0
        ]
        keep = []
        for b, (i, lp) in enumerate(zip(self.alive, picked.tolist(), strict=True)):
            token = int(chosen[b])
            self.logprob[i] += lp
            if token in self.stop:
                self.finish[i] = "stop"
                continue
            self.tokens[i].append(token)
            if len(self.tokens[i]) < self.max_new_tokens:
                keep.append(b)
        if len(keep) < len(self.alive):
            self.alive = [self.alive[b] for b in keep]
            if not keep:
                self.cache = None
                return
            index = torch.tensor(keep, dtype=torch.long)
            self.cache.reorder_cache(index.to(self.device))
            self.mask, self.positions, chosen = self.mask[index], self.positions[index], chosen[index]
            self.trim()
        self.positions = self.positions + 1
        self.mask = torch.cat([self.mask, torch.ones((len(keep), 1), dtype=torch.long)], dim=1)
        self.logits, self.cache = self.forward(
            chosen[:, None], self.mask, self.positions[:, None], self.cache
        )

    def trim(self) -> None:
        """Drop leading columns that are padding in every remaining row (a long row has left)."""
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start and _joinable(self.cache):
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def run(self, order: list[int], batch_size: int) -> Iterator[int]:
        """Generate every row of ``order``, yielding each row as it finishes; rows join whenever the
        batch has room (only once it is empty for caches whose rows cannot join mid-way)."""
        waiting = list(order)
        while waiting or self.alive:
            room = batch_size - len(self.alive)
            if waiting and room and (not self.alive or _joinable(self.cache)):
                joining, waiting = waiting[:room], waiting[room:]
                self.admit(joining)
            before = list(self.alive)
            self.step()
            yield from (i for i in before if i not in self.alive)


def generate_hf(
    model: Any,
    tokenizer: Any,
    rows: list[list[int]],
    seeds: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 8,
) -> list[Sample]:
    """Continue every token row (longest prompts first, up to ``batch_size`` at a time); in input order."""
    import torch

    stop = stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop, default=0)
    decoder = _Decoder(model, rows, seeds, max_new_tokens=max_new_tokens, temperature=temperature, stop=stop,
                       pad_id=pad_id)  # fmt: skip
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
    with torch.inference_mode():
        for _ in progress(decoder.run(order, batch_size), desc="generating", total=len(rows), unit="answer"):
            pass
    return [
        Sample(tokenizer.decode(tokens, skip_special_tokens=True).strip(), len(tokens), finish, logprob)
        for tokens, finish, logprob in zip(decoder.tokens, decoder.finish, decoder.logprob, strict=True)
    ]


def _config_only(path: str) -> Any:
    """A stand-in for a model that is not loaded: its generation config (for the end-of-sequence ids)."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    try:
        return SimpleNamespace(generation_config=GenerationConfig.from_pretrained(path))
    except OSError:
        return None


@functools.cache
def _vllm_engine(path: str, precision: str) -> Any:
    """One vLLM engine per model and precision for the whole process (every task and sweep row),
    sized to the GPU memory still free (a model loaded by the loglik rows of a sweep keeps its share)."""
    import torch
    from vllm import LLM

    free, total = torch.cuda.mem_get_info()
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(precision, "auto")
    return LLM(model=path, dtype=dtype, gpu_memory_utilization=round(min(0.9, 0.9 * free / total), 3))


def generate_vllm(
    lm: Any, rows: list[list[int]], seeds: list[int], *, max_new_tokens: int, temperature: float
) -> list[Sample]:
    """The same rows through vLLM (GPU): our token ids, per-row seeds, summed log-probabilities."""
    from vllm import SamplingParams

    llm = _vllm_engine(lm.path, lm.precision)
    stop = stop_ids(lm.model if lm.model is not None else _config_only(lm.path), lm.tokenizer)
    params = [
        SamplingParams(
            temperature=temperature,
            max_tokens=max_new_tokens,
            seed=seed,
            logprobs=0,
            stop_token_ids=sorted(stop),
        )  # fmt: skip
        for seed in seeds
    ]
    found = []
    for out in llm.generate([{"prompt_token_ids": row} for row in rows], params):
        best = out.outputs[0]
        tokens = list(best.token_ids)
        stopped = bool(tokens) and tokens[-1] in stop
        finish = "stop" if stopped or best.finish_reason == "stop" else "length"
        found.append(
            Sample(best.text.strip(), len(tokens) - stopped, finish, float(best.cumulative_logprob or 0.0))
        )
    return found


# ---------------------------------------------------------------- answers, votes and metrics


def label(item: Item, index: int) -> str:
    """How an answer is named: its letter, or the answer word (yes/no/maybe)."""
    return LETTERS[index] if is_lettered(item) else item.options[index]


def vote(
    item: Item, samples: list[Sample], found: list[Extraction]
) -> tuple[int | None, int, dict[str, Any]]:
    """(answer index or None, index of the item's representative sample, votes and tie-break)."""
    counts = Counter(e.index for e in found if e.index is not None)
    best = {i: max((s.logprob, -n) for n, (s, e) in enumerate(zip(samples, found, strict=True)) if e.index == i)
            for i in counts}  # fmt: skip
    info: dict[str, Any] = {
        "votes": {label(item, i): c for i, c in sorted(counts.items())},
        "tie_break": None,
    }
    if not counts:
        return None, max(range(len(samples)), key=lambda n: (samples[n].logprob, -n)), info
    top = max(counts.values())
    tied = sorted(i for i, c in counts.items() if c == top)
    winner = max(tied, key=lambda i: (best[i][0], -i))
    if len(tied) > 1:
        info["tie_break"] = {
            "tied": [label(item, i) for i in tied],
            "best_logprob": {label(item, i): best[i][0] for i in tied},
            "chosen": label(item, winner),
        }
    return winner, -best[winner][1], info


def _extraction(e: Extraction) -> dict[str, Any]:
    return {"index": e.index, "rule": e.rule, "reason": e.reason}


def _sample_record(s: Sample, e: Extraction) -> dict[str, Any]:
    return {"response": s.text, "generated_tokens": s.tokens, "finish_reason": s.finish,
            "logprob": s.logprob, "extraction": _extraction(e)}  # fmt: skip


def item_row(
    doc_id: int, item: Item, prompt: str, samples: list[Sample], shot_ids: list[str]
) -> dict[str, Any]:
    """One samples_<task>.jsonl row of a generative evaluation."""
    lettered = is_lettered(item)
    found = [extract(s.text, item.options, lettered=lettered) for s in samples]
    pred, chosen, info = vote(item, samples, found)
    row: dict[str, Any] = {
        "doc_id": doc_id, "id": item.id, "prompt": prompt, "options": item.options, "shot_ids": shot_ids,
        **_sample_record(samples[chosen], found[chosen]),
        "pred": pred, "pred_label": None if pred is None else label(item, pred), "gold": item.gold,
        "gold_label": label(item, item.gold), "correct": pred == item.gold,
    }  # fmt: skip
    if len(samples) > 1:
        if pred is None:
            row["extraction"] = _extraction(
                Extraction(None, None, f"none of the {len(samples)} samples names an option")
            )
        row.update(info, samples=[_sample_record(s, e) for s, e in zip(samples, found, strict=True)])
    return row


def generative_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """acc (unparsed counts as wrong), its stderr, n, the unparsed items, generated tokens, budget hits."""
    n = len(rows)
    correct = [float(r["correct"]) for r in rows]
    unparsed = [r["id"] for r in rows if r["pred"] is None]
    every = [s for r in rows for s in (r.get("samples") or [r])]
    hit = [r["id"] for r in rows if any(s["finish_reason"] == "length" for s in (r.get("samples") or [r]))]
    return {
        "acc": sum(correct) / n if n else None,
        "acc_stderr": mean_stderr(correct),
        "n": n,
        "unparsed": len(unparsed),
        "unparsed_rate": len(unparsed) / n if n else None,
        "unparsed_ids": unparsed,
        "mean_generated_tokens": sum(s["generated_tokens"] for s in every) / len(every) if every else None,
        "truncated": len(hit),
        "truncated_ids": hit,
    }


# ---------------------------------------------------------------- one task


def generate_task(
    lm: Any,
    task: TaskData,
    items: list[Item],
    shots: list[list[Item]],
    settings: GenerationSettings,
    *,
    fmt: chat.Format,
    window: int,
    batch_size: int,
    seed: int,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate for every item (``samples`` each), extract, vote; returns (metrics, samples rows)."""
    tokenizer = lm.tokenizer
    room = window - settings.max_new_tokens
    if room < 1:
        raise HippoError(
            f"--max-new-tokens {settings.max_new_tokens} leaves no room for the prompt in the model's "
            f"{window}-token window"
        )
    prompts = [
        chat.render(tokenizer, conversation(item, s), fmt) for item, s in zip(items, shots, strict=True)
    ]
    special = chat.adds_special_tokens(fmt)
    encoded = [tokenizer(p, add_special_tokens=special)["input_ids"] for p in prompts]
    cut = [item.id for item, ids in zip(items, encoded, strict=True) if len(ids) > room]
    if cut:
        status(
            f"warning: {task.spec.task}: {len(cut)} prompt(s) longer than the {room} tokens the window leaves "
            f"beside the budget were left-truncated (ids: {', '.join(cut[:5])}{' ...' if len(cut) > 5 else ''})"
        )
    k = settings.samples
    rows = [ids[-room:] for ids in encoded for _ in range(k)]
    seeds = [sample_seed(seed, item.id, n) for item in items for n in range(k)]
    if settings.backend == "vllm":
        generated = generate_vllm(lm, rows, seeds, max_new_tokens=settings.max_new_tokens,
                                  temperature=settings.temperature)  # fmt: skip
    else:
        generated = generate_hf(lm.model, tokenizer, rows, seeds, max_new_tokens=settings.max_new_tokens,
                                temperature=settings.temperature, batch_size=batch_size)  # fmt: skip
    out = [
        item_row(doc_id, item, prompt, generated[doc_id * k : (doc_id + 1) * k], [s.id for s in item_shots])
        for doc_id, (item, prompt, item_shots) in enumerate(zip(items, prompts, shots, strict=True))
    ]
    metrics = generative_metrics(out)
    metrics.update(prompt_truncated=len(cut), prompt_truncated_ids=cut)
    return metrics, out
