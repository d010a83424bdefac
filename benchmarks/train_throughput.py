#!/usr/bin/env python
"""SFT training throughput: Hippocrates' SFT vs TRL's SFTTrainer, and peak memory of DPO vs SFT.

Same model, same samples (the demo instruction mixture in the chat template), same LoRA
(r16 all-linear), same precision and learning rate. Each configuration runs in its own process
(so peak RSS is its own) for ``--steps`` optimizer steps; the first step is warm-up and not timed.

* ``ours``         hippocrates.stages: best-fit-decreasing packing with position-id resets, loss
                   projected through the LM head on response positions only;
* ``trl_default``  SFTTrainer with its defaults (no packing; gradient checkpointing on, as TRL
                   defaults it), prompt-completion data so the loss is on completions only;
* ``trl_bfd``      SFTTrainer packing="bfd" (padding-free), gradient checkpointing off;
* ``trl_wrapped``  SFTTrainer packing="wrapped", gradient checkpointing off (fastest TRL option,
                   but its rows cut samples and let them attend to each other).

Packed configurations get ``round(batch * mean sample length / max_len)`` rows per step so every
configuration sees about ``--batch`` samples per step. Throughput is supervised (response)
tokens per second, plus non-pad tokens per second, and supervised tokens per CPU-second (the
process's CPU time), which is the fairer ratio when other jobs share the cores. Then ``dpo`` (TRL DPOTrainer as ``hippo dpo``
runs it: adapter-disabled reference) and ``sft_mem`` (ours, unpacked) run ``--batch`` pairs /
samples per step built from the same instructions, for the peak-RSS ratio.

    python benchmarks/train_throughput.py --steps 4
    python benchmarks/train_throughput.py --steps 3 --samples 96 --precision fp32 --json out.json
    python benchmarks/train_throughput.py --threads 1      # on a shared machine: compare per CPU-second
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
DATA = [REPO / "data/demo/instructions/general.jsonl", REPO / "data/demo/instructions/evaluation.jsonl"]
CONFIGS = ("ours", "trl_default", "trl_bfd", "trl_wrapped", "dpo", "sft_mem")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Counter:
    """Wraps a collator: counts real and supervised tokens of every batch it builds."""

    def __init__(self, collate):
        self.collate, self.tokens, self.supervised = collate, [], []

    def __call__(self, rows):
        batch = self.collate(rows)
        real = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        self.tokens.append(int(real))
        if "labels" in batch:
            self.supervised.append(int((batch["labels"][:, 1:] != -100).sum()))
        else:  # TRL's preference collator marks completions instead
            self.supervised.append(int(batch["completion_mask"].sum()))
        return batch


def timing_callback():
    from transformers import TrainerCallback

    class Times(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.cpu: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())

    return Times()


def examples(n: int) -> list[dict[str, str]]:
    from hippocrates.config import Source
    from hippocrates.stages.sft import load_examples

    pool = [ex for path in DATA for ex in load_examples(Source(path=str(path)))]
    return pool[:: max(1, len(pool) // n)][:n]


def load(args):
    from hippocrates.config import LoRASettings
    from hippocrates.models import load_model, load_tokenizer
    from hippocrates.stages.run import peft_config

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, precision=args.precision)
    model.config.use_cache = False
    return model, tokenizer, peft_config(LoRASettings(r=16, alpha=32, dropout=0.0))


def common_args(args, batch: int) -> dict[str, Any]:
    return dict(
        output_dir=str(Path(args.workdir) / args.one),
        per_device_train_batch_size=batch,
        max_steps=args.steps,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        bf16=args.precision == "bf16",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )


def run_one(args) -> dict[str, Any]:
    """One configuration in this process; returns its figures."""
    import torch
    from transformers import Trainer, TrainingArguments

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer, lora = load(args)
    exs = examples(args.samples)
    from collections import Counter as Count

    from hippocrates import chat
    from hippocrates.stages.modeling import PackedCollator, SupervisedTokenTrainer
    from hippocrates.stages.packing import make_rows

    def user_message(conversation):
        return next(
            m["content"] + (f"\n\n{m['input']}" if m.get("input") else "")
            for m in conversation
            if m["role"] == "user"
        )

    def answer(conversation):
        return conversation[-1]["content"]

    encoded = (chat.encode(tokenizer, ex, "chat", max_len=args.max_len, stats=Count()) for ex in exs)
    samples = [s for s in encoded if s]
    mean_len = sum(len(s["input_ids"]) for s in samples) / len(samples)
    packed_batch = max(1, round(args.batch * mean_len / args.max_len))
    times = timing_callback()
    if args.one in ("ours", "sft_mem"):
        from peft import get_peft_model

        model = get_peft_model(model, lora)
        packing = args.one == "ours"
        rows = make_rows(samples, args.max_len, packing)
        trainer: Trainer = SupervisedTokenTrainer(
            model=model,
            args=TrainingArguments(**common_args(args, packed_batch if packing else args.batch)),
            train_dataset=rows,
            data_collator=PackedCollator(tokenizer.pad_token_id),
            callbacks=[times],
        )
    elif args.one.startswith("trl"):
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list(
            [
                {
                    "prompt": [{"role": "user", "content": user_message(ex)}],
                    "completion": [{"role": "assistant", "content": answer(ex)}],
                }
                for ex in exs
            ]
        )
        extra: dict[str, Any] = {}
        if args.one != "trl_default":
            extra = dict(packing=True, packing_strategy=args.one[4:], activation_checkpointing=False)
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(
                **common_args(args, args.batch if args.one == "trl_default" else packed_batch),
                max_length=args.max_len,
                **extra,
            ),
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[times],
        )
    else:  # dpo
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        pairs = [
            {
                "prompt": [{"role": "user", "content": user_message(ex)}],
                "chosen": [{"role": "assistant", "content": answer(ex)}],
                "rejected": [{"role": "assistant", "content": answer(exs[(i + 1) % len(exs)])}],
            }
            for i, ex in enumerate(exs)
        ]
        trainer = DPOTrainer(
            model=model,
            ref_model=None,
            args=DPOConfig(
                **common_args(args, args.batch),
                max_length=args.max_len,
                activation_checkpointing=args.dpo_checkpointing,
            ),
            train_dataset=Dataset.from_list(pairs),
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[times],
        )
    counter = Counter(trainer.data_collator)
    trainer.data_collator = counter
    from hippocrates.stages.dpo import lean_fused_head

    with lean_fused_head() if args.one == "dpo" else contextlib.nullcontext():
        trainer.train()
    timed = slice(1, len(times.ends))
    seconds = times.ends[-1] - times.ends[0]
    cpu_seconds = times.cpu[-1] - times.cpu[0]
    per_step = counter.tokens[: len(times.ends)]  # accelerate collates one batch ahead
    return {
        "config": args.one,
        "steps_timed": len(times.ends) - 1,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(sum(per_step[timed]) / seconds, 1) if seconds else None,
        "supervised_tokens_per_s": round(sum(counter.supervised[timed]) / seconds, 1) if seconds else None,
        "supervised_tokens_per_cpu_s": round(sum(counter.supervised[timed]) / cpu_seconds, 1),
        "cpu_utilisation": round(cpu_seconds / seconds, 2) if seconds else None,
        "rows_per_step": packed_batch if args.one in ("ours", "trl_bfd", "trl_wrapped") else args.batch,
        "mean_sample_tokens": round(mean_len, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--steps", type=int, default=4, help="optimizer steps per configuration (first is warm-up)"
    )
    parser.add_argument("--batch", type=int, default=8, help="samples (or pairs) per step")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument(
        "--samples", type=int, default=128, help="instruction samples to draw from the demo data"
    )
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {', '.join(CONFIGS)}")
    parser.add_argument(
        "--threads", type=int, help="torch threads per run (1 makes CPU-time ratios robust on a busy host)"
    )
    parser.add_argument("--dpo-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--workdir", default="/tmp/hippo-train-throughput")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0
    results: dict[str, dict[str, Any]] = {}
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"{name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[name] = json.loads(line[7:])
        r = results[name]
        print(
            f"{name:<12} supervised {r['supervised_tokens_per_s']:>7} tok/s  non-pad {r['tokens_per_s']:>7} tok/s"
            f"  per CPU-s {r['supervised_tokens_per_cpu_s']:>7}  CPU use {r['cpu_utilisation']:>4}"
            f"  rows/step {r['rows_per_step']:>2}  peak RSS {r['peak_rss_mb']:>7} MB",
            flush=True,
        )
    summary = summarize(results)
    for key, value in summary.items():
        print(f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "results": results, "summary": summary}, indent=2)
        )
    return 0


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for unit, key in (("tok/s", "supervised_tokens_per_s"), ("tok per CPU-s", "supervised_tokens_per_cpu_s")):
        sup = {k: v[key] for k, v in results.items()}
        if "ours" in sup and "trl_default" in sup:
            out[f"ours / trl_default (supervised {unit})"] = round(sup["ours"] / sup["trl_default"], 2)
        packed = [k for k in ("trl_bfd", "trl_wrapped") if k in sup]
        if "ours" in sup and packed:
            best = max(packed, key=lambda k: sup[k])
            out[f"ours / TRL best packing, {best} (supervised {unit})"] = round(sup["ours"] / sup[best], 2)
    if "dpo" in results and "sft_mem" in results:
        out["DPO peak RSS / SFT peak RSS (same batch)"] = round(
            results["dpo"]["peak_rss_mb"] / results["sft_mem"]["peak_rss_mb"], 2
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
