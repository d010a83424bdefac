#!/usr/bin/env python
"""Throughput, MFU and peak memory of Hippocrates' GPU hot paths on a Mistral-7B-shaped model.

Three phases per sequence length, each on one packed sequence per micro-batch (documents of
random length, position_ids reset at every boundary, so attention never crosses documents):

* ``sft``  LoRA r16 on all linear layers, activation checkpointing, AdamW on the adapter only;
* ``dpo``  padding-free DPO: chosen and rejected answers packed in the same sequence, reference
           log-probs from the adapter-disabled model under no_grad, then the policy step;
* ``eval`` forward only, summing each document's token log-probs (how ``hippo eval`` scores).

Weights are random (built from the config, never downloaded). MFU divides the model FLOPs the
step needs by a bf16 matmul peak measured in the same run, so the number is honest for
whatever GPU, clocks and power cap the run had. ``--model-size tiny --device cpu`` runs the same
code in seconds, which is how the tests cover it.

    python benchmarks/gpu_throughput.py                       # 7B on cuda, seq 2048 and 4096
    python benchmarks/gpu_throughput.py --json results.json --steps 20
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

MODEL_SIZES: dict[str, dict[str, Any]] = {
    # Mistral-7B-v0.1 shapes (no sliding window: every length here fits in one window anyway).
    "7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=32000,
    ),
    # Same architecture, small enough for a CPU test in seconds.
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=4096,
    ),
}
FORMULA = (
    "FLOPs/token: N = matmul weights of the base (all nn.Linear incl. lm_head, no embeddings), "
    "n = LoRA weights, A = attention FLOPs/token = 4 * layers * heads * head_dim * sum_i l_i(l_i+1)/2 / seq "
    "(causal, within each packed document of length l_i). "
    "sft = 4N + 6n + 3A (forward 2N+2n+A; backward input-grads 2N+2n+2A, LoRA weight-grads 2n); "
    "dpo = sft + reference forward (2N + A); eval = 2N + A. "
    "Activation-checkpoint recompute is not counted (MFU, not HFU). MFU = tokens/s * FLOPs/token / measured peak."
)


@dataclass
class Packed:
    """One packed micro-batch (batch size 1) and the bookkeeping to score its documents."""

    input_ids: torch.Tensor  # [1, S]
    position_ids: torch.Tensor  # [1, S], restarting at 0 for every document
    labels: torch.Tensor  # [1, S], -100 on each document's first (prompt) tokens
    doc_ids: torch.Tensor  # [S], which document each token belongs to
    doc_lens: list[int]

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]


def doc_lengths(seq_len: int, n_docs: int, gen: torch.Generator) -> list[int]:
    """Split seq_len into n_docs random lengths (each >= 4 tokens) that sum to seq_len exactly."""
    n_docs = max(1, min(n_docs, seq_len // 4))
    weights = torch.rand(n_docs, generator=gen) + 0.5
    lens = [4 + int(w) for w in (weights / weights.sum() * (seq_len - 4 * n_docs)).floor()]
    lens[-1] += seq_len - sum(lens)
    return lens


def pack(seq_len: int, n_docs: int, vocab: int, device: str, seed: int = 0) -> Packed:
    """Random tokens for n_docs documents; the first third of each is a prompt (no loss)."""
    gen = torch.Generator().manual_seed(seed)
    lens = doc_lengths(seq_len, n_docs, gen)
    ids = torch.randint(0, vocab, (1, seq_len), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])
    prompt_len = torch.tensor([max(1, n // 3) for n in lens]).repeat_interleave(torch.tensor(lens))
    labels = ids.masked_fill(positions < prompt_len, -100)
    return Packed(ids.to(device), positions.to(device), labels.to(device), doc_ids.to(device), lens)


def doc_logps(logits: torch.Tensor, batch: Packed) -> torch.Tensor:
    """Sum of each document's answer-token log-probs (the quantity DPO and eval scoring need)."""
    targets = batch.labels[0, 1:]
    token_logp = -F.cross_entropy(logits[0, :-1].float(), targets, ignore_index=-100, reduction="none")
    sums = torch.zeros(len(batch.doc_lens), device=logits.device, dtype=token_logp.dtype)
    return sums.index_add(0, batch.doc_ids[1:], token_logp)


def attention_flops_per_token(config: Any, batch: Packed) -> float:
    """Causal attention FLOPs (QK^T and AV) per token, counting only pairs inside one document."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    pairs = sum(n * (n + 1) / 2 for n in batch.doc_lens)
    return 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * pairs / batch.tokens


def linear_params(model: torch.nn.Module) -> int:
    """Weights that take part in matmuls: every nn.Linear (lm_head included; embeddings are lookups)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_peak_flops(device: str, dtype: torch.dtype, size: int, iters: int) -> float:
    """Best sustained matmul FLOP/s over three timed bursts of size^3 matmuls: the MFU denominator."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync(device)
        best = max(best, 2 * size**3 * iters / (time.perf_counter() - start))
    return best


def peak_memory_gib(device: str) -> float:
    """Peak allocated GPU memory of the phase; on CPU the process's max RSS (whole run)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


def timed(step: Callable[[], None], device: str, warmup: int, steps: int) -> tuple[float, float]:
    """Mean seconds per step after warmup, and the phase's peak memory in GiB."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps, peak_memory_gib(device)


def build_base(size: str, device: str, dtype: torch.dtype, attn: str):
    """Random-weight Mistral built directly on the device: no CPU copy, no download."""
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(**MODEL_SIZES[size], sliding_window=None, max_position_embeddings=32768)
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    # With a KV cache transformers skips the packed-sequence check and lets documents attend to
    # each other; the HF Trainer turns the cache off too, so this matches training.
    base.config.use_cache = False
    return base


def build_model(size: str, device: str, dtype: torch.dtype, attn: str, liger: bool):
    """The base with activation checkpointing (+ Liger if asked) and a LoRA r16 all-linear adapter."""
    from peft import LoraConfig, get_peft_model

    from hippocrates.accel import maybe_liger

    base = build_base(size, device, dtype, attn)
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    n_base = linear_params(base)
    liger_on = maybe_liger(base) if liger else False
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, lora)  # adapters kept in fp32 (PEFT autocasts them), base in dtype
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, base.config, n_base, n_lora, liger_on


def make_optimizer(model: torch.nn.Module, device: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, fused=device.startswith("cuda"))


def run_phases(args, model, config, n_base: int, n_lora: int, autocast) -> list[dict[str, Any]]:
    """Time sft, dpo and eval at every sequence length; OOM becomes a row, not a crash."""
    rows = []
    for seq_len in args.seq_lens:
        batch = pack(seq_len, args.docs_per_seq, config.vocab_size, args.device)
        attn = attention_flops_per_token(config, batch)
        phases = {
            "sft": (sft_step, 4 * n_base + 6 * n_lora + 3 * attn),
            "dpo": (dpo_step, 6 * n_base + 6 * n_lora + 4 * attn),
            "eval": (eval_step, 2 * n_base + attn),
        }
        for name, (factory, flops_per_token) in phases.items():
            row: dict[str, Any] = {"phase": name, "seq_len": seq_len, "tokens_per_step": batch.tokens}
            try:
                step = factory(model, batch, autocast, args)
                step_s, mem = timed(step, args.device, args.warmup, args.steps)
                del step
            except torch.cuda.OutOfMemoryError:
                row.update(error="out of memory")
                rows.append(row)
                continue
            tokens_per_s = batch.tokens / step_s
            achieved = tokens_per_s * flops_per_token
            row.update(
                steps=args.steps,
                step_s=step_s,
                tokens_per_s=tokens_per_s,
                flops_per_token=flops_per_token,
                achieved_tflops=achieved / 1e12,
                mfu=achieved / args.peak_flops,
                peak_mem_gib=mem,
            )
            rows.append(row)
    return rows


def sft_step(model, batch: Packed, autocast, args) -> Callable[[], None]:
    """One LoRA SFT optimizer step on the packed sequence (loss on answer tokens only)."""
    model.train()
    optimizer = make_optimizer(model, args.device)

    def step() -> None:
        with autocast():
            loss = model(input_ids=batch.input_ids, position_ids=batch.position_ids, labels=batch.labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def dpo_step(model, batch: Packed, autocast, args, beta: float = 0.1) -> Callable[[], None]:
    """One DPO step: documents 0,2,4.. are chosen, 1,3,5.. rejected; reference = adapter disabled."""
    model.train()
    optimizer = make_optimizer(model, args.device)
    chosen = torch.arange(0, len(batch.doc_lens) - 1, 2, device=args.device)
    kwargs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids}

    def step() -> None:
        with torch.no_grad(), model.disable_adapter(), autocast():
            ref = doc_logps(model(**kwargs).logits, batch)
        with autocast():
            pol = doc_logps(model(**kwargs).logits, batch)
        margin = (pol - ref)[chosen] - (pol - ref)[chosen + 1]
        loss = -F.logsigmoid(beta * margin).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def eval_step(model, batch: Packed, autocast, args) -> Callable[[], None]:
    """Forward-only log-likelihood scoring with the adapter disabled (the cost of a merged model)."""
    model.eval()

    def step() -> None:
        with torch.inference_mode(), model.disable_adapter(), autocast():
            doc_logps(model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits, batch)

    return step


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table, preceded by what ran and followed by the FLOP formula."""
    mem = (
        "peak mem GiB (max allocated)"
        if meta["device"].startswith("cuda")
        else "peak mem GiB (process max RSS)"
    )
    lines = [
        f"model: Mistral {meta['model_size']} (random weights), {meta['n_base'] / 1e6:,.1f}M matmul params, "
        f"LoRA r16 all-linear {meta['n_lora'] / 1e6:,.2f}M trainable",
        f"device: {meta['device_name']} | dtype {meta['dtype']} | attention {meta['attn_implementation']} "
        f"({meta['packing']}) | activation checkpointing on | liger {meta['liger']}",
        f"peak (measured): {meta['peak_tflops']:.4g} TFLOP/s from {meta['peak_matmul']}",
        "",
        f"| phase | seq len | tokens/step | steps | step s | tokens/s | TFLOP/s | MFU | {mem} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['phase']} | {r['seq_len']} | {r['tokens_per_step']} | {r['error']} | | | | | |"
            )
            continue
        lines.append(
            f"| {r['phase']} | {r['seq_len']} | {r['tokens_per_step']} | {r['steps']} | {fmt(r['step_s'], '.3f')} "
            f"| {fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['achieved_tflops'], '.4g')} | {fmt(r['mfu'], '.1%')} "
            f"| {fmt(r['peak_mem_gib'], '.2f')} |"
        )
    lines += ["", FORMULA]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), help="default: 7b on cuda, tiny on cpu")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--steps", type=int, default=10, help="timed steps per phase")
    p.add_argument("--warmup", type=int, help="untimed steps per phase (default 2 cuda, 1 cpu)")
    p.add_argument(
        "--docs-per-seq", type=int, default=4, help="documents packed per sequence (even: DPO pairs)"
    )
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--attn", default="auto", help="auto (FA2 if installed, else sdpa), sdpa, eager, ...")
    p.add_argument("--liger", action="store_true", help="apply Liger kernels (needs liger-kernel, cuda)")
    p.add_argument("--peak-size", type=int, help="matmul size for the peak (default 8192 cuda, 512 cpu)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    args.model_size = args.model_size or ("7b" if on_cuda else "tiny")
    args.dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    args.peak_size = args.peak_size or (8192 if on_cuda else 512)
    args.warmup = (2 if on_cuda else 1) if args.warmup is None else args.warmup
    if on_cuda and not cuda:
        p.error("--device cuda but torch sees no GPU; use --device cpu --model-size tiny")
    if args.model_size == "7b" and not on_cuda:
        p.error("the 7b model needs a GPU; on CPU use --model-size tiny")
    if args.docs_per_seq < 2 or min(args.seq_lens) < 4 * args.docs_per_seq or args.steps < 1:
        p.error("need --docs-per-seq >= 2, every --seq-lens >= 4 * docs-per-seq, --steps >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from hippocrates.accel import attn_implementation, hardware_summary

    args = parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    attn = attn_implementation(args.dtype) if args.attn == "auto" else args.attn
    device_type = torch.device(args.device).type
    args.peak_flops = measure_peak_flops(
        args.device, dtype, args.peak_size, iters=20 if device_type == "cuda" else 3
    )
    model, config, n_base, n_lora, liger_on = build_model(
        args.model_size, args.device, dtype, attn, args.liger
    )

    def autocast():
        use = dtype != torch.float32
        return torch.autocast(device_type, dtype=dtype) if use else nullcontext()

    rows = run_phases(args, model, config, n_base, n_lora, autocast)
    meta = {
        "model_size": args.model_size,
        "n_base": n_base,
        "n_lora": n_lora,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device) if device_type == "cuda" else "cpu",
        "dtype": args.dtype,
        "attn_implementation": attn,
        "packing": "varlen kernels from position_ids"
        if attn.startswith("flash")
        else "block-diagonal causal mask from position_ids",
        "liger": liger_on,
        "peak_tflops": args.peak_flops / 1e12,
        "peak_flops": args.peak_flops,
        "peak_matmul": f"{args.peak_size}^3 {args.dtype} matmul, timed in this run",
        "docs_per_seq": args.docs_per_seq,
        "warmup": args.warmup,
        "formula": FORMULA,
        "hardware": hardware_summary(),
    }
    print(markdown(meta, rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
