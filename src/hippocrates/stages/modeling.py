"""The loss, the packing and the Trainer shared by CPT and SFT.

Why not the stock causal-LM loss: it projects *every* position through the LM head, and for a
49k-token vocabulary those full-vocabulary logits dominate time and memory. Here only positions
with a label (the response in SFT) go through the head, so prompt tokens cost a backbone pass only.

Why packing with position ids: several samples share a row, and ``position_ids`` restart at 0 at
each sample. With no attention mask, transformers turns those restarts into a block-diagonal
causal mask (sdpa/eager) or variable-length kernels (flash attention), so packed samples never
attend to each other and each one sees exactly the positions it would see alone.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from hippocrates.stages.packing import IGNORE, count_tokens, make_rows, pack_bfd  # noqa: F401 (re-exported)


def install_masked_head(model: torch.nn.Module) -> None:
    """Let ``model(..., labels=..., masked_lm=True)`` return the summed NLL of labelled positions only.

    The patch is an instance attribute over the class forward, so generation and ordinary calls
    are unchanged, and PEFT/accelerate wrappers pass the extra keyword through to it.
    """
    if "forward" in vars(model):
        return
    original = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args: Any, masked_lm: bool = False, labels: torch.Tensor | None = None, **kwargs: Any):
        if not masked_lm:
            return (
                original(*args, labels=labels, **kwargs) if labels is not None else original(*args, **kwargs)
            )
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k != "return_dict"}
        kwargs["use_cache"] = False  # a cache would also turn off packed-sequence masking
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        keep = targets != IGNORE
        head = self.get_output_embeddings()
        logits = head(hidden[keep]).float()
        nll = F.cross_entropy(logits, targets[keep], reduction="sum")
        return {"nll": nll, "tokens": keep.sum()}

    model.forward = types.MethodType(forward, model)


def remove_masked_head(model: torch.nn.Module) -> None:
    """Undo :func:`install_masked_head` (before saving or handing the model on)."""
    vars(model).pop("forward", None)


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
                out = model(**batch, masked_lm=True)
            total += float(out["nll"])
            count += int(out["tokens"])
    finally:
        model.train(was_training)
    return (total / count if count else float("nan")), count


class MaskedLMTrainer(Trainer):
    """A transformers Trainer whose loss is the masked-head NLL (see :func:`install_masked_head`).

    The training loss of an optimizer step is the summed NLL of its supervised tokens divided by
    their count over the whole step: every micro-batch of the gradient accumulation and, under
    DDP, every process (``average_tokens_across_devices``, on by default, has the Trainer gather
    that count). DDP averages gradients over the processes, so each process scales its share by
    the number of processes, as the stock ``Trainer.compute_loss`` does. The loss and gradients are
    then exactly those of one process running the global batch, however unevenly the supervised
    tokens fall on the ranks.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # our loss divides by num_items_in_batch itself
        self.supervised_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs, masked_lm=True)
        tokens = out["tokens"]
        if model.training:
            self.supervised_tokens += int(tokens)
        if num_items_in_batch is None:
            loss = out["nll"] / tokens.clamp(min=1)
        else:
            loss = out["nll"] / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, out) if return_outputs else loss

    def train(self, *args: Any, **kwargs: Any):
        output = super().train(*args, **kwargs)
        if self.args.world_size > 1:  # supervised tokens seen by all processes, for throughput
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
