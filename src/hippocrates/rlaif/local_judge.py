"""A local Hugging Face model as judge: the verdict is read from next-token log-probabilities.

After the judge prompt (through the chat template when there is one) the assistant turn starts
with ``Better response:``; we compare log P(" A") with log P(" B") at that point. No text is
generated, so one forward pass per item suffices, and because every prompt starts with the same
rubric we run that shared prefix once and reuse its KV cache for every batch: on 2 CPU cores this
is ~3x faster than feeding the rubric again with each pair.

Small models prefer whichever letter comes first, by an amount that depends on the question:
SmolLM2-135M puts 0.5-2.5 nats more on "A" whatever the answers, while swapping the answers moves
the margin by only ~0.01-0.5. We subtract that preference before deciding. ``calibrate``:

* ``question`` (default): the mean margin over all items of the same question, in both orders.
  With two candidates per question this is the order-averaged margin of Wang et al. (2023),
  "Large Language Models are not Fair Evaluators", so both orders agree unless the margin is
  within ``tie_threshold``; with three or more candidates the check stays informative.
* ``mean``: one bias for the whole call (the mean margin over every item in both orders); keeps
  the both-orders check strict but leaves question-specific bias in place.
* ``content-free``: the margin on a pair of "N/A" answers, as in "Calibrate Before Use"
  (Zhao et al., 2021).  ``none``: raw log-probabilities.
"""

from __future__ import annotations

import copy
from typing import Any

from hippocrates import chat
from hippocrates.progress import progress
from hippocrates.rlaif.judges import ASK_LOCAL, JudgeItem, Rubric, Verdict, judge_prompt

LEAD = "Better response:"
CONTENT_FREE = JudgeItem("N/A", "N/A", "N/A")


class LocalJudge:
    """Judge pairs with a causal LM already in memory, batched, with the rubric prefix computed once."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        rubric: Rubric,
        name: str = "local",
        batch_size: int = 8,
        tie_threshold: float = 0.0,
        calibrate: str = "question",
        share_prefix: bool = True,
    ) -> None:
        self.model, self.tokenizer, self.rubric = model.eval(), tokenizer, rubric
        self.name, self.batch_size, self.tie_threshold = name, batch_size, tie_threshold
        self.calibrate, self.share_prefix = calibrate, share_prefix
        self.fmt = chat.choose_format(tokenizer, "auto")
        self.token_a, self.token_b = self._verdict_token(" A"), self._verdict_token(" B")
        self.bias: float | None = None
        self.stats: dict[str, Any] = {"items": 0, "forward_tokens": 0, "prefix_tokens": 0}

    def _verdict_token(self, word: str) -> int:
        """The single token that continues ``Better response:`` with `` A`` (tokenizer-agnostic)."""
        base = self.tokenizer(LEAD, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(LEAD + word, add_special_tokens=False)["input_ids"]
        if full[: len(base)] == base and len(full) == len(base) + 1:
            return full[-1]
        return self.tokenizer(word, add_special_tokens=False)["input_ids"][-1]

    def render(self, item: JudgeItem) -> str:
        """The full text whose next token is the verdict letter."""
        messages = chat.user(judge_prompt(self.rubric, item, ask=ASK_LOCAL))
        return chat.render(self.tokenizer, messages, self.fmt) + LEAD

    def _encode(self, items: list[JudgeItem]) -> list[list[int]]:
        special = chat.adds_special_tokens(self.fmt)
        return [self.tokenizer(self.render(i), add_special_tokens=special)["input_ids"] for i in items]

    def log_probs(self, items: list[JudgeItem], *, show_progress: bool = True) -> list[tuple[float, float]]:
        """``(log P(A), log P(B))`` for each item, in order."""
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

    def position_bias(self) -> float:
        """log P(A) - log P(B) on a content-free pair: the judge's preference for the first slot."""
        if self.bias is None:
            ((lp_a, lp_b),) = self.log_probs([CONTENT_FREE], show_progress=False)
            self.bias = lp_a - lp_b
        return self.bias

    def judge_pairs(self, items: list[JudgeItem]) -> list[Verdict]:
        """Verdicts from the calibrated log-prob margin; a tie when it is within ``tie_threshold``.

        ``question`` and ``mean`` calibration score every distinct item and its mirror (B shown
        first), adding mirrors the caller did not ask for, and take the mean margin over that
        order-balanced set, per question or over all items, as the position bias: a judge
        without one would average exactly zero there.
        """
        if not items:
            return []
        distinct = list(dict.fromkeys(items))
        balanced = self.calibrate in ("question", "mean")
        if balanced:
            distinct = list(dict.fromkeys(distinct + [_mirror(i) for i in distinct]))
        scores = dict(zip(distinct, self.log_probs(distinct), strict=True))
        biases = self._biases(scores)
        verdicts = []
        for item in items:
            lp_a, lp_b = scores[item]
            bias = biases.get(item.prompt, 0.0)
            margin = lp_a - lp_b - bias
            label = "tie" if abs(margin) <= self.tie_threshold else ("A" if margin > 0 else "B")
            reason = f"log P(A)={lp_a:.3f}, log P(B)={lp_b:.3f}, position bias {bias:+.3f}"
            numbers = {"logp_a": round(lp_a, 5), "logp_b": round(lp_b, 5), "margin": round(margin, 5)}
            verdicts.append(Verdict(label, reason=reason, scores=numbers))
        self.stats["items"] += len(items)
        if biases:
            self.stats["position_bias_mean"] = round(sum(biases.values()) / len(biases), 5)
        return verdicts

    def _biases(self, scores: dict[JudgeItem, tuple[float, float]]) -> dict[str, float]:
        """The position bias to subtract, per question (prompt text)."""
        prompts = {item.prompt for item in scores}
        if self.calibrate == "none":
            return {}
        if self.calibrate == "content-free":
            return dict.fromkeys(prompts, self.position_bias())
        groups: dict[str, list[float]] = {}
        for item, (lp_a, lp_b) in scores.items():
            groups.setdefault(item.prompt if self.calibrate == "question" else "", []).append(lp_a - lp_b)
        if self.calibrate == "mean":
            overall = sum(groups[""]) / len(groups[""])
            return dict.fromkeys(prompts, overall)
        return {prompt: sum(m) / len(m) for prompt, m in groups.items()}


def _mirror(item: JudgeItem) -> JudgeItem:
    return JudgeItem(item.prompt, item.response_b, item.response_a)


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
