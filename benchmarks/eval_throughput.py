"""Evaluation throughput: hippocrates' prefix-sharing scorer vs lm-eval's HF backend vs the floor.

Runs the first N MedQA questions (hippocrates prompt, 0-shot by default) with the embedded model:
  * ours      - ``hippocrates.eval.runner.evaluate`` (fast scorer), end to end incl. model load;
  * lm-eval   - ``lm_eval.simple_evaluate`` on the exported task (same prompts, same batch size);
  * floor     - one forward pass over each question's unique tokens only (the context followed
                by every option's tokens, concatenated once; plain causal attention, logits for
                the last position only; same batch size): the work no scorer can avoid.
Reports wall and CPU times (CPU time is the steadier figure on a shared machine), the speed-up,
prediction agreement, the largest log-likelihood difference, and our scoring time relative to the
floor, measured interleaved chunk by chunk (both without model load and tokenization).

    python benchmarks/eval_throughput.py --n 100            # ../shared/data/medqa/US_4_options_test.jsonl
    python benchmarks/eval_throughput.py --n 20 --data FILE --precision bf16 --skip-lm-eval
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "medqa" / "US_4_options_test.jsonl"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_ours(args: argparse.Namespace, out: Path) -> tuple[float, dict, list[dict]]:
    from hippocrates.eval.runner import evaluate

    start = time.perf_counter()
    results = evaluate(
        args.model,
        ["medqa"],
        data={"medqa": str(args.data)},
        limit=args.n,
        batch_size=args.batch_size,
        num_fewshot=args.num_fewshot,
        precision=args.precision,
        output_dir=out,
        scorer=args.scorer,
    )
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "samples_medqa.jsonl").read_text().splitlines()]
    return wall, results, rows


def run_lm_eval(args: argparse.Namespace, tmp: Path, model_path: str) -> tuple[float, list[dict]]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from hippocrates.eval.lm_eval_export import export

    export(
        tmp / "tasks",
        ["medqa"],
        data={"medqa": str(args.data)},
        num_fewshot=args.num_fewshot,
        model=args.model,
    )
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.precision]
    start = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_path},dtype={dtype}",
        tasks=["hippo_medqa"],
        device="cpu",
        task_manager=TaskManager(include_path=str(tmp / "tasks")),
        log_samples=True,
        limit=args.n,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
    )
    wall = time.perf_counter() - start
    return wall, sorted(res["samples"]["hippo_medqa"], key=lambda s: s["doc_id"])


def run_floor(args: argparse.Namespace, rows: list[dict], model_path: str) -> dict[str, float]:
    """Our scoring vs the floor, interleaved chunk by chunk so that load from other processes hits both.

    Floor: one causal forward over each question's context + all option tokens (unique tokens
    only), batched like ours (the same questions per forward, right-padded), logits for the last
    position only. Ours: ``score_fast`` on the same encoded questions.
    """
    import torch

    from hippocrates.eval.scorer import LmEvalTokenizer, score_fast
    from hippocrates.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, precision=args.precision).eval()
    encoder = LmEvalTokenizer(tokenizer)
    encoded = [encoder.encode_prompt(row["prompt"], row["continuations"]) for row in rows]
    totals = {"floor_wall": 0.0, "floor_cpu": 0.0, "ours_wall": 0.0, "ours_cpu": 0.0}

    def floor(chunk) -> None:
        seqs = [enc.context + [t for cont in enc.continuations for t in cont] for enc in chunk]
        ids = torch.zeros((len(seqs), max(map(len, seqs))), dtype=torch.long)  # right-padded, causal
        for b, seq in enumerate(seqs):
            ids[b, : len(seq)] = torch.tensor(seq)
        with torch.inference_mode():
            model(ids, logits_to_keep=1, use_cache=False)

    def ours(chunk) -> None:
        score_fast(model, chunk, max_length=1 << 30, batch_size=args.batch_size)

    floor(encoded[:1])  # warm-up
    ours(encoded[:1])
    for number, start in enumerate(range(0, len(encoded), args.batch_size)):
        chunk = encoded[start : start + args.batch_size]
        order = (("floor", floor), ("ours", ours))
        for name, fn in order if number % 2 == 0 else order[::-1]:  # alternate who goes first
            wall, cpu = time.perf_counter(), time.process_time()
            fn(chunk)
            totals[f"{name}_wall"] += time.perf_counter() - wall
            totals[f"{name}_cpu"] += time.process_time() - cpu
    return totals


def clean_model_dir(model_path: str, tmp: Path) -> str:
    """A view of the model dir whose config.json has no leftover ``quantization_config``.

    The embedded model's converted directory keeps the GGUF ``quantization_config`` in its
    config.json; lm-eval's HFLM turns it into a GgufConfig that transformers then refuses. The
    weights are plain safetensors, so a copy of the config without it (other files linked) is the
    same model for both harnesses.
    """
    config = json.loads((Path(model_path) / "config.json").read_text())
    if "quantization_config" not in config:
        return model_path
    view = tmp / "model"
    view.mkdir()
    for item in Path(model_path).iterdir():
        if item.name != "config.json":
            (view / item.name).symlink_to(item.resolve())
    config.pop("quantization_config")
    (view / "config.json").write_text(json.dumps(config, indent=2))
    return str(view)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MedQA test file (release format)")
    parser.add_argument("--n", type=int, default=100, help="first N questions")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--scorer", choices=["fast", "naive"], default="fast")
    parser.add_argument("--skip-lm-eval", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        print(f"{args.data}: not found (pass --data)", file=sys.stderr)
        return 2
    import torch

    from hippocrates.models import resolve_model

    report: dict = {
        "n": args.n,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "num_fewshot": args.num_fewshot,
        "threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_path = clean_model_dir(resolve_model(args.model).path, tmp)
        args.model = model_path
        cpu = time.process_time()
        ours_wall, results, rows = run_ours(args, tmp / "ours")
        report["ours_s"] = round(ours_wall, 2)
        report["ours_cpu_s"] = round(time.process_time() - cpu, 2)
        report["acc"] = results["tasks"]["medqa"]["acc"]
        floor = run_floor(args, rows, model_path)
        report.update({f"interleaved_{k}_s": round(v, 2) for k, v in floor.items()})
        report["ours_vs_floor_wall"] = round(floor["ours_wall"] / floor["floor_wall"], 3)
        report["ours_vs_floor_cpu"] = round(floor["ours_cpu"] / floor["floor_cpu"], 3)
        print(json.dumps(report), file=sys.stderr, flush=True)  # partial figures, in case lm-eval fails
        if not args.skip_lm_eval:
            cpu = time.process_time()
            lm_wall, samples = run_lm_eval(args, tmp, model_path)
            report["lm_eval_cpu_s"] = round(time.process_time() - cpu, 2)
            theirs = [[float(r[0][0]) for r in s["resps"]] for s in samples]
            ours_ll = [r["loglikelihoods"] for r in rows]
            report["lm_eval_s"] = round(lm_wall, 2)
            report["speedup_wall"] = round(lm_wall / ours_wall, 2)
            report["speedup_cpu"] = round(report["lm_eval_cpu_s"] / report["ours_cpu_s"], 2)
            agree = [
                max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__)
                for a, b in zip(ours_ll, theirs, strict=True)
            ]
            report["prediction_agreement"] = f"{sum(agree)}/{len(agree)}"
            report["max_abs_loglik_diff"] = max(
                abs(x - y) for a, b in zip(ours_ll, theirs, strict=True) for x, y in zip(a, b, strict=True)
            )
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
