"""Generative evaluation throughput: our batched decoder against one ``model.generate`` per item.

Both continue the same prompts (the generative question of the first N MedQA items, rendered as
``hippo eval --mode generate`` renders them: chat template, 0-shot) with the same model, greedy, up
to --max-new-tokens new tokens, and must say the same tokens:
  * ours       - ``hippocrates.eval.generate.generate_hf``: prompts sorted by length, left-padded,
                 decoded together (up to --batch-size at a time); a finished answer leaves the batch
                 and the next prompt joins it;
  * reference  - ``model.generate`` once per item (no padding, no batching).
Both add up each answer's token log-probabilities (ours while decoding, the reference from
``output_logits``). The items go in chunks of --chunk, the two alternating who runs first, so load
from other processes on a shared machine hits both. Reported: wall and CPU seconds of each, the
ratio, identical outputs, the largest log-probability difference, mean prompt and answer lengths,
and the share of our time spent on the prompts' forward passes (prefill: the same work in both,
which bounds the ratio when answers are short).

    python benchmarks/generate_throughput.py --n 64                # ../shared/data/medqa/US_4_options_test.jsonl
    python benchmarks/generate_throughput.py --n 8 --max-new-tokens 64 --precision bf16 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "medqa" / "US_4_options_test.jsonl"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def prompts_of(lm, data: Path, n: int, chat_template: bool | None) -> tuple[list[list[int]], str]:
    """The token rows ``hippo eval --mode generate`` would decode for the first ``n`` items, and their format."""
    from hippocrates import chat
    from hippocrates.eval.generate import conversation, template_format
    from hippocrates.eval.runner import load_tasks

    items = load_tasks("medqa", data={"medqa": str(data)})[0].items[:n]
    fmt = template_format(lm.tokenizer, chat_template)
    special = chat.adds_special_tokens(fmt)
    rows = [
        lm.tokenizer(chat.render(lm.tokenizer, conversation(item, []), fmt), add_special_tokens=special)[
            "input_ids"
        ]
        for item in items
    ]
    return rows, fmt


def reference(lm, rows: list[list[int]], max_new_tokens: int) -> list[tuple[list[int], float]]:
    """One ``model.generate`` per row: (tokens without the end-of-sequence token, summed log-probability)."""
    import torch
    from transformers import GenerationConfig

    from hippocrates.eval.generate import stop_ids

    stop = stop_ids(lm.model, lm.tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(stop),
                              pad_token_id=lm.tokenizer.pad_token_id)  # fmt: skip
    found = []
    for row in rows:
        with torch.inference_mode():
            out = lm.model.generate(
                torch.tensor([row], device=lm.model.device), attention_mask=torch.ones(1, len(row), dtype=torch.long,
                device=lm.model.device), generation_config=config, output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
            new = out.sequences[0, len(row) :].tolist()
            logprob = sum(
                float(torch.log_softmax(step[0].float(), dim=-1)[token])
                for step, token in zip(out.logits, new, strict=True)
            )
        found.append((new[:-1] if new and new[-1] in stop else new, logprob))
    return found


def ours(lm, rows: list[list[int]], max_new_tokens: int, batch_size: int, prefill: list[float]) -> list:
    """Our decoder on the same rows (its Samples); the time spent prefilling prompts is added to ``prefill``."""
    from hippocrates.eval import generate

    decoder_cls = generate._Decoder
    admit = decoder_cls.admit

    def timed_admit(self, new):
        start = time.perf_counter()
        admit(self, new)
        prefill[0] += time.perf_counter() - start

    decoder_cls.admit = timed_admit
    try:
        samples = generate.generate_hf(lm.model, lm.tokenizer, rows, [0] * len(rows), max_new_tokens=max_new_tokens,
                                       batch_size=batch_size)  # fmt: skip
    finally:
        decoder_cls.admit = admit
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MedQA test file (release format)")
    parser.add_argument("--n", type=int, default=64, help="first N questions")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16, help="our rows decoded together")
    parser.add_argument("--chunk", type=int, default=32, help="items per interleaved chunk")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="as hippo eval --mode generate: default the model's chat template when it has one, else Alpaca",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        print(f"{args.data}: not found (pass --data)", file=sys.stderr)
        return 2
    import torch

    from hippocrates.eval.runner import LoadedModel

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = LoadedModel.load(args.model, args.precision)
    rows, fmt = prompts_of(lm, args.data, args.n, args.chat_template)
    ours(lm, rows[:1], 2, 1, [0.0])  # warm-up, untimed
    reference(lm, rows[:1], 2)
    totals = {"ours_s": 0.0, "ours_cpu_s": 0.0, "reference_s": 0.0, "reference_cpu_s": 0.0}
    prefill = [0.0]
    mine: list = []
    theirs: list = []
    for number, start in enumerate(range(0, len(rows), args.chunk)):
        chunk = rows[start : start + args.chunk]
        runs = [
            ("ours", lambda c=chunk: mine.extend(ours(lm, c, args.max_new_tokens, args.batch_size, prefill))),
            ("reference", lambda c=chunk: theirs.extend(reference(lm, c, args.max_new_tokens))),
        ]
        for name, run in runs if number % 2 == 0 else runs[::-1]:  # alternate who goes first
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            totals[f"{name}_s"] += time.perf_counter() - wall
            totals[f"{name}_cpu_s"] += time.process_time() - cpu
        print(f"{min(start + args.chunk, len(rows))}/{len(rows)} items: "
              + ", ".join(f"{k} {v:.1f}" for k, v in totals.items()), file=sys.stderr, flush=True)  # fmt: skip
    same = [
        lm.tokenizer.decode(tokens, skip_special_tokens=True).strip() == sample.text
        and len(tokens) == sample.tokens
        for (tokens, _), sample in zip(theirs, mine, strict=True)
    ]
    report = {
        "date": datetime.date.today().isoformat(),
        "model": args.model,
        "data": str(args.data),
        "n": len(rows),
        "precision": args.precision,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "format": fmt,
        "mean_prompt_tokens": round(sum(map(len, rows)) / len(rows), 1),
        "mean_generated_tokens": round(sum(s.tokens for s in mine) / len(mine), 1),
        "hit_budget": sum(s.finish == "length" for s in mine),
        **{k: round(v, 2) for k, v in totals.items()},
        "ours_prefill_s": round(prefill[0], 2),
        "ratio_wall": round(totals["reference_s"] / totals["ours_s"], 2),
        "ratio_cpu": round(totals["reference_cpu_s"] / totals["ours_cpu_s"], 2),
        "identical_outputs": f"{sum(same)}/{len(same)}",
        "max_abs_logprob_diff": max(
            abs(logprob - s.logprob) for (_, logprob), s in zip(theirs, mine, strict=True)
        ),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
