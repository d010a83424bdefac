"""Log-likelihood scoring: lm-eval's tokenization, a reference scorer and a prefix-sharing one.

Tokenization follows lm-eval's HFLM (``_encode_pair`` / ``tok_encode``): trailing whitespace of
the context moves to the continuation; ``context_enc = tok(context)``; ``continuation_enc =
tok(context + continuation)[len(context_enc):]``; special tokens (BOS) are added as the tokenizer
does by default, except when the text already starts with the BOS string (a chat template).

``naive`` is the straightforward computation lm-eval does: one row per (context, option),
``(ctx + cont)[-(L+1):][:-1]``, right-padded, full logits. ``fast`` runs each question once:
one row holds the shared context followed by every option's tokens, with a block attention mask
(each option sees the context and its own earlier tokens) and position ids that restart after
the context for every option, so each option is scored exactly as if it were alone. Only the
positions that predict option tokens go through the LM head. Items that need left truncation
(context + option longer than the model's window) are scored the naive way, since truncation
then differs per option; they are counted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from hippocrates.errors import HippoError
from hippocrates.models import keeps_logits_by_mask
from hippocrates.progress import progress

TOKENIZER_INFINITY = 1000000000000000019884624838656
SCORERS = ("fast", "naive")


@dataclass
class Encoded:
    """A question's shared context tokens and each option's continuation tokens."""

    context: list[int]
    continuations: list[list[int]]


@dataclass
class Scored:
    loglikelihoods: list[float]
    truncated: bool


class LmEvalTokenizer:
    """Encode (context, continuation) pairs exactly as lm-eval's HFLM does."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.bos_text = tokenizer.decode(prefix) if prefix is not None else None

    def encode(self, text: str) -> list[int]:
        starts_with_bos = self.bos_text is not None and text.startswith(self.bos_text)
        return self.tokenizer.encode(text, **({"add_special_tokens": False} if starts_with_bos else {}))

    def encode_prompt(self, context: str, continuations: Sequence[str]) -> Encoded:
        """All options of one question share ``context``, hence one context encoding."""
        if not context:
            raise HippoError("empty prompt context")
        spaces = len(context) - len(context.rstrip())
        moved = context[len(context) - spaces :] if spaces else ""
        context = context[: len(context) - spaces]
        context_enc = self.encode(context)
        if not context_enc:
            raise HippoError(f"prompt context {context[:40]!r} has no tokens")
        conts = []
        for cont in continuations:
            whole = self.encode(context + moved + cont)
            conts.append(whole[len(context_enc) :])
        return Encoded(context_enc, conts)


class V03Tokenizer:
    """Encode (context, continuation) pairs as lm-eval v0.3.0's ``BaseLM.loglikelihood`` did.

    ``context_enc = tok.encode(context, add_special_tokens=False)`` (an empty context is the EOS
    token) and, separately, ``continuation_enc = tok.encode(continuation, add_special_tokens=False)``:
    no BOS, no moving of whitespace, and for SentencePiece tokenizers a continuation such as
    ``" yes"`` gets its own prefix-space token, exactly as the paper's numbers were computed.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode_prompt(self, context: str, continuations: Sequence[str]) -> Encoded:
        tok = self.tokenizer
        context_enc = tok.encode(context, add_special_tokens=False) if context else [tok.eos_token_id]
        if not context_enc:
            raise HippoError(f"prompt context {context[:40]!r} has no tokens")
        return Encoded(context_enc, [tok.encode(c, add_special_tokens=False) for c in continuations])


def encoder_for(protocol: str, tokenizer: Any) -> LmEvalTokenizer | V03Tokenizer:
    return V03Tokenizer(tokenizer) if protocol == "v0.3" else LmEvalTokenizer(tokenizer)


def model_max_length(model: Any, tokenizer: Any, default: int = 2048, protocol: str = "v0.4") -> int:
    """The window lm-eval assumes: config n_positions / max_position_embeddings / n_ctx, then tokenizer.

    lm-eval v0.3.0 read ``n_ctx`` first, then ``max_position_embeddings``.
    """
    config = getattr(model.config, "text_config", None) or model.config
    if protocol == "v0.3":
        for attr in ("n_ctx", "max_position_embeddings"):
            value = getattr(config, attr, None)
            if value is not None:
                return int(value)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit != TOKENIZER_INFINITY:
        return int(limit)
    return default


def _sliding_window(model: Any) -> int | None:
    config = getattr(model.config, "text_config", None) or model.config
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def _log_probs(model: Any, ids, mask4d, positions, keep) -> Any:
    """Log-softmax (fp32) over the vocabulary at the ``keep`` positions, flattened row-major."""
    import torch

    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "use_cache": False}
    if mask4d is not None:
        kwargs.update(attention_mask=mask4d.to(device), position_ids=positions.to(device))
    keep = keep.to(device)
    with torch.inference_mode():
        if keeps_logits_by_mask(model):
            logits = model(**kwargs, logits_to_keep=keep).logits
            logits = logits.reshape(-1, logits.shape[-1])
        else:
            logits = model(**kwargs).logits[keep]
        return torch.log_softmax(logits.float(), dim=-1)


def _batches(order: list[int], size: int, desc: str) -> Iterator[list[int]]:
    chunks = [order[start : start + size] for start in range(0, len(order), size)]
    yield from progress(chunks, desc=desc, unit="batch")


def score_naive(
    model: Any, pairs: list[tuple[list[int], list[int]]], *, max_length: int, batch_size: int = 8
) -> list[float]:
    """lm-eval's computation: one row per pair, left-truncated to the window, longest first."""
    import torch

    results = [0.0] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: (-(len(pairs[i][0]) + len(pairs[i][1])), i))
    for batch in _batches(order, batch_size, "scoring (naive)"):
        rows = [(pairs[i][0] + pairs[i][1])[-(max_length + 1) :][:-1] for i in batch]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        keep = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, (i, row) in enumerate(zip(batch, rows, strict=True)):
            ids[b, : len(row)] = torch.tensor(row)
            keep[b, len(row) - len(pairs[i][1]) : len(row)] = True
        logprobs = _log_probs(model, ids, None, None, keep)
        offset = 0
        for i in batch:
            cont = pairs[i][1]
            rows_lp = logprobs[offset : offset + len(cont)]
            results[i] = float(
                rows_lp.gather(1, torch.tensor(cont, device=logprobs.device).unsqueeze(1)).sum()
            )
            offset += len(cont)
    return results


def needs_truncation(enc: Encoded, max_length: int) -> bool:
    """lm-eval keeps the last ``max_length + 1`` tokens of context + continuation (then drops one)."""
    return any(len(enc.context) + len(c) > max_length + 1 for c in enc.continuations)


def _packed_row(enc: Encoded) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """(tokens, position ids, segment ids, per-option row index predicting each option token)."""
    ctx = enc.context
    tokens, positions, segments = list(ctx), list(range(len(ctx))), [0] * len(ctx)
    predictors = []
    for number, cont in enumerate(enc.continuations, 1):
        start = len(tokens)
        body = cont[:-1]
        tokens += body
        positions += range(len(ctx), len(ctx) + len(body))
        segments += [number] * len(body)
        predictors.append([len(ctx) - 1] + list(range(start, start + len(body))))
    return tokens, positions, segments, predictors


def score_fast(model: Any, encoded: list[Encoded], *, max_length: int, batch_size: int = 8) -> list[Scored]:
    """Score every option of every question, running each shared context once."""
    import torch

    dtype = next(model.parameters()).dtype
    window = _sliding_window(model)
    results: list[Scored | None] = [None] * len(encoded)
    naive: list[int] = []
    packed: dict[int, tuple] = {}
    for i, enc in enumerate(encoded):
        row = _packed_row(enc)
        if needs_truncation(enc, max_length) or (window is not None and len(row[0]) > window):
            naive.append(i)
        else:
            packed[i] = row
    order = sorted(packed, key=lambda i: (-len(packed[i][0]), i))
    for batch in _batches(order, batch_size, "scoring"):
        width = max(len(packed[i][0]) for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        pos = torch.zeros((len(batch), width), dtype=torch.long)
        seg = torch.full((len(batch), width), -1, dtype=torch.long)
        keep = torch.zeros((len(batch), width), dtype=torch.bool)
        for b, i in enumerate(batch):
            tokens, positions, segments, predictors = packed[i]
            ids[b, : len(tokens)] = torch.tensor(tokens)
            pos[b, : len(tokens)] = torch.tensor(positions)
            seg[b, : len(tokens)] = torch.tensor(segments)
            for rows in predictors:
                keep[b, rows] = True
        q, k = seg[:, :, None], seg[:, None, :]
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        allowed = causal & (k >= 0) & (q >= 0) & ((k == 0) | (k == q))
        allowed |= torch.eye(width, dtype=torch.bool) & (q < 0)  # padding rows: attend to self only
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        logprobs = _log_probs(model, ids, mask[:, None], pos, keep)
        flat_index = torch.full((len(batch), width), -1, dtype=torch.long)
        flat_index[keep] = torch.arange(int(keep.sum()))
        for b, i in enumerate(batch):
            predictors = packed[i][3]
            lls = []
            for rows, cont in zip(predictors, encoded[i].continuations, strict=True):
                lp = logprobs[flat_index[b, rows]]
                lls.append(float(lp.gather(1, torch.tensor(cont, device=logprobs.device).unsqueeze(1)).sum()))
            results[i] = Scored(lls, False)
    if naive:
        pairs = [(encoded[i].context, c) for i in naive for c in encoded[i].continuations]
        flat = iter(score_naive(model, pairs, max_length=max_length, batch_size=batch_size))
        for i in naive:
            lls = [next(flat) for _ in encoded[i].continuations]
            results[i] = Scored(lls, needs_truncation(encoded[i], max_length))
    return [r for r in results if r is not None]


def score(
    model: Any, encoded: list[Encoded], *, scorer: str = "fast", max_length: int, batch_size: int = 8
) -> list[Scored]:
    """Summed log-likelihood of every option of every question (``fast`` or the ``naive`` reference)."""
    if scorer not in SCORERS:
        raise HippoError(f"unknown scorer '{scorer}' (choose from {', '.join(SCORERS)})")
    for enc in encoded:
        if any(len(c) > max_length for c in enc.continuations):
            raise HippoError(f"an option is longer than the model's window ({max_length} tokens)")
    if scorer == "fast":
        return score_fast(model, encoded, max_length=max_length, batch_size=batch_size)
    pairs = [(enc.context, c) for enc in encoded for c in enc.continuations]
    flat = iter(score_naive(model, pairs, max_length=max_length, batch_size=batch_size))
    return [
        Scored([next(flat) for _ in enc.continuations], needs_truncation(enc, max_length)) for enc in encoded
    ]
