"""The loss, the packing collator and the Trainer shared by CPT and SFT.

Why not the stock causal-LM loss: it projects *every* position through the LM head, and for a
49k-token vocabulary those full-vocabulary logits dominate time and memory. Here only positions
with a label (the response in SFT) are projected: the model's own forward is called with
``logits_to_keep`` set to a boolean mask of those positions, so whatever the architecture does
after its LM head (Gemma-2's final-logit softcapping, Granite's ``logits_scaling``, Cohere's
``logit_scale``) still applies, and the loss is the one the model itself would compute.

Why packing with position ids: several samples share a row, and ``position_ids`` restart at 0 at
each sample. With no attention mask, transformers turns those restarts into a block-diagonal
causal mask (sdpa/eager) or variable-length kernels (flash attention), so packed samples never
attend to each other and each one sees exactly the positions it would see alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from hippocrates.models import keeps_logits_by_mask
from hippocrates.stages.packing import IGNORE


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP/FSDP and PEFT wrappers (to ask what its forward accepts)."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def labelled_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL, count) over the labelled tokens of a batch, through the model's own forward."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    mask = F.pad(keep, (0, 1), value=False)  # position t predicts token t + 1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if keeps_logits_by_mask(_inner(model)):
        logits = model(**inputs, use_cache=False, logits_to_keep=mask).logits
        logits = logits.reshape(-1, logits.shape[-1])
    else:  # an architecture whose forward cannot slice: all logits, then the labelled ones
        logits = model(**inputs, use_cache=False).logits[mask]
    nll = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return nll, keep.sum()


@dataclass
class PackedCollator:
    """Right-pads rows into a batch and restarts ``position_ids`` at every sample (and at the padding).

    No attention mask is returned on purpose: transformers derives the block-diagonal mask from the
    position restarts. The first label of every segment is ignored, so no token is ever trained to
    predict the start of the next packed sample.
    """

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[b, :n] = torch.tensor(row["input_ids"])
            labels[b, :n] = torch.tensor(row["labels"])
            segments = list(row.get("seq_lengths") or [n]) + ([width - n] if width > n else [])
            positions[b] = torch.cat([torch.arange(s) for s in segments])
        labels[positions == 0] = IGNORE
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


def autocast_for(model: torch.nn.Module, precision: str):
    """The autocast context matching a stage's precision (none for fp32)."""
    if precision not in ("bf16", "fp16"):
        return nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def nll_by_row(
    model: torch.nn.Module, rows: Sequence[dict[str, Any]], collator: PackedCollator, precision: str
) -> list[tuple[float, int]]:
    """(summed NLL, labelled tokens) of each row on its own: the units a held-out interval resamples."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for row in rows:
            batch = {k: v.to(device) for k, v in collator([row]).items()}
            with autocast_for(model, precision):
                nll, tokens = labelled_nll(model, batch)
            out.append((float(nll), int(tokens)))
    finally:
        model.train(was_training)
    return out


def held_out_change(before: list[tuple[float, int]], after: list[tuple[float, int]]) -> dict[str, Any]:
    """The change of the held-out token-weighted mean NLL, with a paired bootstrap 95% CI over rows."""
    from hippocrates.analyses.stats import paired_ratio_interval

    pairs = [(b, a) for b, a in zip(before, after, strict=True) if b[1] > 0]
    if len(pairs) < 2:
        return {}
    nll_b, tok_b = zip(*(p[0] for p in pairs), strict=True)
    nll_a, tok_a = zip(*(p[1] for p in pairs), strict=True)
    low, high = paired_ratio_interval(nll_b, tok_b, nll_a, tok_a)
    change = sum(nll_a) / sum(tok_a) - sum(nll_b) / sum(tok_b)
    return {"nll_change": change, "nll_change_ci_low": low, "nll_change_ci_high": high, "rows": len(pairs),
            "significant": low > 0 or high < 0}  # fmt: skip


@torch.no_grad()
def mean_nll(
    model: torch.nn.Module,
    rows: Sequence[dict[str, Any]],
    collator: PackedCollator,
    batch_size: int,
    precision: str,
) -> tuple[float, int]:
    """Token-weighted mean NLL of the labelled tokens of ``rows`` (exact, not a mean of batch means)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collator(list(rows[start : start + batch_size])).items()}
            with autocast_for(model, precision):
                nll, tokens = labelled_nll(model, batch)
            total += float(nll)
            count += int(tokens)
    finally:
        model.train(was_training)
    return (total / count if count else float("nan")), count


class SupervisedTokenTrainer(Trainer):
    """A transformers Trainer whose loss covers the labelled tokens only (see :func:`labelled_nll`).

    The training loss of an optimizer step is the summed NLL of its labelled tokens divided by
    their count over the whole step: every micro-batch of the gradient accumulation and, under
    DDP, every process (``average_tokens_across_devices``, on by default, has the Trainer gather
    that count). DDP averages gradients over the processes, so each process scales its share by
    the number of processes, as the stock ``Trainer.compute_loss`` does. The loss and gradients are
    then exactly those of one process running the global batch, however unevenly the labelled
    tokens fall on the ranks.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # our loss divides by num_items_in_batch itself
        self.supervised_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        nll, tokens = labelled_nll(model, inputs)
        if model.training:
            self.supervised_tokens += int(tokens)
        if num_items_in_batch is None:
            loss = nll / tokens.clamp(min=1)
        else:
            loss = nll / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        out = {"nll": nll, "tokens": tokens}
        return (loss, out) if return_outputs else loss

    def train(self, *args: Any, **kwargs: Any):
        output = super().train(*args, **kwargs)
        if self.args.world_size > 1:  # labelled tokens seen by all processes, for throughput
            count = torch.tensor(self.supervised_tokens, device=self.args.device)
            self.supervised_tokens = int(self.accelerator.reduce(count, reduction="sum"))
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


class GeneratorDataset(torch.utils.data.IterableDataset):
    """An iterable dataset over a fresh generator per epoch (streamed CPT blocks: nothing is held)."""

    def __init__(self, make: Callable[[], Iterator[dict[str, Any]]]):
        self.make = make

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.make()
