"""Batched generation where every row has its own seed, temperature, top_p, token budget and stop.

``model.generate`` samples a whole batch from one global RNG, so a row's text would depend on
which other prompts share its batch. We instead run generate greedily with a logits processor
that draws each row's token from that row's own ``torch.Generator`` (after temperature and
nucleus filtering) and leaves only that token possible. A prompt's candidates are then fixed by
its seed, whatever the batch size or prompt order (up to float round-off from padding).

:func:`generate_rows` hands each new token of each row to a :class:`RowSink` (with its
log-probability and the most likely alternatives when the row asks for them) through a
stopping criterion, which is called once per step after the token is appended: the sink can end
its row there (a stop string appeared, the client went away), and generation ends when every
row has. transformers' own ``stop_strings`` and streamers apply to a whole batch (and
``TextStreamer`` to batch size 1), so rows that differ need this. Used by candidate sampling
(:func:`generate`) and by ``hippo serve``, which batches concurrent requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class RowSpec:
    """How to continue one prompt: temperature 0 means greedy.

    ``top_logprobs``: None for no log-probabilities, else report the chosen token's and the
    ``top_logprobs`` most likely tokens' log-probabilities under the model (before temperature and
    top_p) at every step.
    """

    seed: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    top_logprobs: int | None = None


@dataclass(frozen=True)
class StepLogprobs:
    """The chosen token's log-probability and the ``k`` most likely ``(token, log-probability)``."""

    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Generated:
    text: str
    n_tokens: int
    finish_reason: str  # "stop" (end-of-sequence token) or "length"
    prompt_tokens: int


class RowSink(Protocol):
    """Receives each row's tokens as they are generated."""

    def token(self, row: int, token: int, logprobs: StepLogprobs | None, eos: bool) -> bool:
        """Take the row's next token (``eos``: the end-of-sequence token, after which the row ends);
        True ends the row here (finish reason "stop")."""
        ...

    def finish(self, row: int, reason: str) -> None:
        """The row is done: "stop" (end of sequence, or ``token`` said so) or "length"."""
        ...


TOP_K_FAST = 256  # nucleus sampling looks at the top 256 tokens first and sorts the vocabulary only if needed


def _make_row_sampler(rows: list[RowSpec]) -> Any:
    import torch
    from transformers import LogitsProcessor

    temps = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in rows])
    reporting = [i for i, r in enumerate(rows) if r.top_logprobs is not None]

    class RowSampler(LogitsProcessor):
        """Replace the scores with a one-hot choice per row, so greedy search keeps that choice;
        ``steps`` holds this step's log-probabilities for the rows that asked for them."""

        def __init__(self) -> None:
            self.generators = [torch.Generator().manual_seed(r.seed) for r in rows]
            self.steps: dict[int, StepLogprobs] = {}

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            choice = scores.argmax(dim=-1).cpu()
            sampled = [i for i, r in enumerate(rows) if r.temperature > 0]
            if sampled:
                # CPU tensors and generators: the same draws on any device
                probs = torch.softmax(scores[sampled].float().cpu() / temps[sampled, None], dim=-1)
                for row, i in enumerate(sampled):
                    choice[i] = _draw(probs[row], rows[i].top_p, self.generators[i])
            if reporting:
                self.steps = _step_logprobs(scores[reporting], choice[reporting], rows, reporting)
            out = torch.full_like(scores, float("-inf"))
            out[torch.arange(len(rows)), choice.to(scores.device)] = 0.0
            return out

    return RowSampler()


def _step_logprobs(
    scores: Any, chosen: Any, rows: list[RowSpec], index: list[int]
) -> dict[int, StepLogprobs]:
    import torch

    logp = torch.log_softmax(scores.float(), dim=-1).cpu()
    k = max(rows[i].top_logprobs or 0 for i in index)
    values, ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    out = {}
    for row, i in enumerate(index):
        n = rows[i].top_logprobs or 0
        top = tuple(zip(ids[row, :n].tolist(), values[row, :n].tolist(), strict=True))
        out[i] = StepLogprobs(float(logp[row, int(chosen[row])]), top)
    return out


def _draw(probs: Any, top_p: float, generator: Any) -> int:
    """Sample one token id from the smallest top set whose mass reaches ``top_p`` (at least one token)."""
    import torch

    if top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator))
    values, index = probs.topk(min(TOP_K_FAST, probs.numel()))
    if float(values.sum()) < top_p:  # a flat distribution: the nucleus is larger than the fast path
        values, index = probs.sort(descending=True)
    values = torch.where(values.cumsum(-1) - values < top_p, values, torch.zeros_like(values))
    return int(index[torch.multinomial(values, 1, generator=generator)])


def _row_feed(specs: list[RowSpec], eos_ids: set[int], sampler: Any, sink: RowSink) -> Any:
    import torch
    from transformers import StoppingCriteria

    class RowFeed(StoppingCriteria):
        """Hand each row's newest token to the sink; a row is done at end of sequence, when the sink
        says so, or at its own token budget."""

        def __init__(self) -> None:
            self.done = [False] * len(specs)
            self.counts = [0] * len(specs)

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            newest = input_ids[:, -1].tolist()
            for row, token in enumerate(newest):
                if self.done[row]:
                    continue
                if token in eos_ids:
                    sink.token(row, token, sampler.steps.get(row), True)
                    self.end(row, "stop")
                    continue
                self.counts[row] += 1
                if sink.token(row, token, sampler.steps.get(row), False):
                    self.end(row, "stop")
                elif self.counts[row] >= specs[row].max_new_tokens:
                    self.end(row, "length")
            return torch.tensor(self.done, device=input_ids.device)

        def end(self, row: int, reason: str) -> None:
            self.done[row] = True
            sink.finish(row, reason)

    return RowFeed()


def generate_rows(
    model: Any,
    prompts: list[list[int]],
    specs: list[RowSpec],
    *,
    pad_token_id: int,
    sink: RowSink,
    eos_token_id: int | None = None,
) -> None:
    """Continue token-id prompts in one left-padded batch, feeding every new token to ``sink``.

    The end-of-sequence tokens are the model's generation config's, else ``eos_token_id``.
    """
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    if not prompts:
        return
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    config = GenerationConfig(
        max_new_tokens=max(s.max_new_tokens for s in specs),
        do_sample=False,
        pad_token_id=pad_token_id,
        eos_token_id=eos,
    )
    sampler = _make_row_sampler(specs)
    feed = _row_feed(specs, eos_ids, sampler, sink)
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=config,
            logits_processor=[sampler],
            stopping_criteria=StoppingCriteriaList([feed]),
        )
    for row, done in enumerate(feed.done):  # generation ended for another reason (the model's length)
        if not done:
            feed.end(row, "length")


class _Collect:
    """A sink that keeps every row's tokens (end-of-sequence tokens left out) and finish reason."""

    def __init__(self, n: int) -> None:
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.reasons = ["length"] * n

    def token(self, row: int, token: int, logprobs: StepLogprobs | None, eos: bool) -> bool:
        if not eos:
            self.tokens[row].append(token)
        return False

    def finish(self, row: int, reason: str) -> None:
        self.reasons[row] = reason


def pad_id(tokenizer: Any) -> int:
    """The id to left-pad prompts with (pad, else end-of-sequence, else 0; masked out anyway)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def generate(
    model: Any, tokenizer: Any, prompts: list[str], specs: list[RowSpec], *, add_special_tokens: bool = False
) -> list[Generated]:
    """Continue each prompt text in one left-padded batch; returns texts without the prompt."""
    if not prompts:
        return []
    ids = tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]
    sink = _Collect(len(prompts))
    generate_rows(
        model, ids, specs, pad_token_id=pad_id(tokenizer), sink=sink, eos_token_id=tokenizer.eos_token_id
    )
    return [
        Generated(
            tokenizer.decode(tokens, skip_special_tokens=True).strip(), len(tokens), reason, len(prompt)
        )
        for tokens, reason, prompt in zip(sink.tokens, sink.reasons, ids, strict=True)
    ]
