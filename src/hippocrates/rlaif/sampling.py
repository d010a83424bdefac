"""Batched generation where every row has its own seed, temperature, top_p and token budget.

``model.generate`` samples a whole batch from one global RNG, so a row's text would depend on
which other prompts share its batch. We instead run generate greedily with a logits processor
that draws each row's token from that row's own ``torch.Generator`` (after temperature and
nucleus filtering) and leaves only that token possible. A prompt's candidates are then fixed by
its seed, whatever the batch size or prompt order (up to float round-off from padding).
Used by candidate sampling and by ``hippo serve``, which batches concurrent requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RowSpec:
    """How to continue one prompt: temperature 0 means greedy."""

    seed: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64


@dataclass(frozen=True)
class Generated:
    text: str
    n_tokens: int
    finish_reason: str  # "stop" (end-of-sequence token) or "length"
    prompt_tokens: int


TOP_K_FAST = 256  # nucleus sampling looks at the top 256 tokens first and sorts the vocabulary only if needed


def _make_row_sampler(rows: list[RowSpec]) -> Any:
    import torch
    from transformers import LogitsProcessor

    temps = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in rows])

    class RowSampler(LogitsProcessor):
        """Replace the scores with a one-hot choice per row, so greedy search keeps that choice."""

        def __init__(self) -> None:
            self.generators = [torch.Generator().manual_seed(r.seed) for r in rows]

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            choice = scores.argmax(dim=-1).cpu()
            sampled = [i for i, r in enumerate(rows) if r.temperature > 0]
            if sampled:
                # CPU tensors and generators: the same draws on any device
                probs = torch.softmax(scores[sampled].float().cpu() / temps[sampled, None], dim=-1)
                for row, i in enumerate(sampled):
                    choice[i] = _draw(probs[row], rows[i].top_p, self.generators[i])
            out = torch.full_like(scores, float("-inf"))
            out[torch.arange(len(rows)), choice.to(scores.device)] = 0.0
            return out

    return RowSampler()


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


def generate(
    model: Any, tokenizer: Any, prompts: list[str], specs: list[RowSpec], *, add_special_tokens: bool = False
) -> list[Generated]:
    """Continue each prompt text in one left-padded batch; returns texts without the prompt."""
    import torch
    from transformers import GenerationConfig

    if not prompts:
        return []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    finally:
        tokenizer.padding_side = side
    enc = {k: v.to(model.device) for k, v in enc.items()}
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    config = GenerationConfig(
        max_new_tokens=max(s.max_new_tokens for s in specs),
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
    )
    with torch.inference_mode():
        out = model.generate(**enc, generation_config=config, logits_processor=[_make_row_sampler(specs)])
    width = enc["input_ids"].shape[1]
    results = []
    for i, spec in enumerate(specs):
        tokens = out[i, width:].tolist()[: spec.max_new_tokens]
        stop = next((k for k, t in enumerate(tokens) if t in eos_ids), None)
        kept = tokens if stop is None else tokens[:stop]
        text = tokenizer.decode(kept, skip_special_tokens=True).strip()
        reason = "length" if stop is None else "stop"
        results.append(Generated(text, len(kept), reason, int(enc["attention_mask"][i].sum())))
    return results
