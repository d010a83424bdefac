"""A local Hugging Face model as judge: the verdict is read from next-token log-probabilities.

The conversation of :func:`~.judges.verdict_messages` (the judge prompt, then the assistant's
open ``Better response: Response``) is rendered by :func:`hippocrates.chat.render` and we compare
log P(" A") with log P(" B") for the next token. No text is generated, so one forward pass per
item suffices, and because every prompt starts with the same rubric we run that shared prefix
once and reuse its KV cache for every batch: on 2 CPU cores this is ~3x faster than feeding the
rubric again with each pair. ``hippo serve`` renders the same messages to the same tokens, so the
HTTP judge with log-prob verdicts decides exactly like this one (:func:`~.judges.logprob_verdicts`).

Small models prefer a position, by an amount that depends on the question (on the 40
human-labelled demo pairs SmolLM2-135M's decisive raw verdicts say "A" 70% of the time, and the
raw verdict survives swapping the answers in 14 of the 40 pairs). ``calibrate`` subtracts that preference before
deciding (see :func:`~.judges.position_biases`); the raw verdict is kept beside the corrected one,
and order consistency is measured on the raw verdicts.

* ``question`` (default): the mean margin over all items of the same question, in both orders.
  With two candidates per question this is the order-averaged margin of Wang et al. (2023),
  "Large Language Models are not Fair Evaluators", so both corrected orders agree unless the
  margin is within ``tie_threshold``.
* ``mean``: one bias for the whole call (the mean margin over every item in both orders).
* ``content-free``: the margin on a pair of "N/A" answers, as in "Calibrate Before Use"
  (Zhao et al., 2021).  ``none``: raw log-probabilities.
"""

from __future__ import annotations

import copy
from typing import Any

from hippocrates import chat
from hippocrates.progress import progress
from hippocrates.rlaif.judges import (
    VERDICT_LEAD,
    JudgeItem,
    Rubric,
    Verdict,
    items_to_score,
    logprob_verdicts,
    verdict_messages,
)


class LocalJudge:
    """Judge pairs with a causal LM already in memory, batched, with the rubric prefix computed once.

    ``lead``, ``words`` and :meth:`messages` say what is asked and which two next tokens are compared
    (a subclass asks something else the same way: the rubric grader of ``hippo eval --mode rubric``).
    """

    lead = VERDICT_LEAD
    words = (" A", " B")

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        rubric: Rubric,
        name: str = "local",
        batch_size: int = 8,
        tie_threshold: float = 0.02,
        calibrate: str = "question",
        share_prefix: bool = True,
    ) -> None:
        self.model, self.tokenizer, self.rubric = model.eval(), tokenizer, rubric
        self.name, self.batch_size, self.tie_threshold = name, batch_size, tie_threshold
        self.calibrate, self.share_prefix = calibrate, share_prefix
        self.fmt = chat.choose_format(tokenizer, "auto")
        self.token_a, self.token_b = self._verdict_token(self.words[0]), self._verdict_token(self.words[1])
        self.stats: dict[str, Any] = {}
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stats = {"items": 0, "scored": 0, "forward_tokens": 0, "prefix_tokens": 0}

    def _verdict_token(self, word: str) -> int:
        """The single token that continues the verdict lead with ``word`` (tokenizer-agnostic)."""
        base = self.tokenizer(self.lead, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(self.lead + word, add_special_tokens=False)["input_ids"]
        if full[: len(base)] == base and len(full) == len(base) + 1:
            return full[-1]
        return self.tokenizer(word, add_special_tokens=False)["input_ids"][-1]

    def messages(self, item: Any) -> list[dict[str, str]]:
        """The conversation whose open last (assistant) message the verdict word continues."""
        return verdict_messages(self.rubric, item)

    def render(self, item: Any) -> str:
        """The full text whose next token is the verdict letter."""
        return chat.render(self.tokenizer, self.messages(item), self.fmt, continue_final=True)

    def _encode(self, items: list[Any]) -> list[list[int]]:
        special = chat.adds_special_tokens(self.fmt)
        return [self.tokenizer(self.render(i), add_special_tokens=special)["input_ids"] for i in items]

    def log_probs(self, items: list[Any], *, show_progress: bool = True) -> list[tuple[float, float]]:
        """``(log P(A), log P(B))`` for each item, in order (the two ``words``)."""
        import torch

        if not items:
            return []
        ids = self._encode(items)
        shared = _common_prefix_len(ids) if self.share_prefix else 0
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[tuple[float, float]] = [(0.0, 0.0)] * len(ids)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        with torch.inference_mode():
            prefix_cache = None
            if shared:
                prefix = torch.tensor([ids[0][:shared]], device=self.model.device)
                prefix_cache = self.model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
            bar = progress(batches, desc="judging (local)", unit="batch") if show_progress else batches
            for batch in bar:
                rows = [ids[i][shared:] for i in batch]
                logits = self._forward_suffixes(rows, shared, prefix_cache)
                logp = torch.log_softmax(logits.float(), dim=-1)
                for row, i in enumerate(batch):
                    out[i] = (float(logp[row, self.token_a]), float(logp[row, self.token_b]))
                self.stats["forward_tokens"] += sum(len(r) for r in rows)
        self.stats["prefix_tokens"] = shared
        return out

    def _forward_suffixes(self, rows: list[list[int]], shared: int, prefix_cache: Any):
        """Last-position logits for left-padded suffixes that continue the cached shared prefix."""
        import torch

        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        device = self.model.device
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        positions = (shared + mask.cumsum(-1) - 1).clamp(min=shared)
        cache = None
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(rows))
            mask = torch.cat([torch.ones(len(rows), shared, dtype=mask.dtype, device=device), mask], dim=1)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=cache is not None,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def judge_pairs(self, items: list[JudgeItem]) -> list[Verdict]:
        """Verdicts from the log-prob margin (:func:`~.judges.logprob_verdicts`).

        ``question`` and ``mean`` calibration also score each item's mirror (B shown first) and
        ``content-free`` an "N/A" pair, when the caller did not ask for them.
        """
        if not items:
            return []
        wanted = items_to_score(items, self.calibrate)
        scores = dict(zip(wanted, self.log_probs(wanted), strict=True))
        verdicts = logprob_verdicts(items, scores, calibrate=self.calibrate, tie_threshold=self.tie_threshold)
        self.stats["items"] += len(items)
        self.stats["scored"] += len(wanted)
        margins = [v.scores["margin"] for v in verdicts]
        raw = [v.scores["logp_a"] - v.scores["logp_b"] for v in verdicts]
        self.stats["position_bias_mean"] = round((sum(raw) - sum(margins)) / len(verdicts), 5)
        return verdicts


def _common_prefix_len(ids: list[list[int]]) -> int:
    """Tokens every sequence shares at the start, leaving at least one token of each as suffix."""
    first = ids[0]
    n = min(len(s) for s in ids) - 1
    for seq in ids[1:]:
        k = 0
        while k < n and seq[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)
