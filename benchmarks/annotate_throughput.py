"""RLAIF judging throughput: pairs/s with the local judge (batched, rubric prefix shared) and through
``hippo serve`` with the HTTP judge (log-prob and text verdicts); optionally the whole demo
annotate stage, timed. It then compares the judges on the same items: how often the HTTP judge's
verdict equals the local judge's, their order consistency, and each one's agreement with the
human labels (accuracy and Cohen's kappa, as ``hippo annotate --agreement`` computes them).

A "pair" is one question with two answers judged in both orders (two judge calls). The pairs are
the human-labelled ones in data/demo/preferences/human_labels.jsonl (answers of 30-60 words).

    python benchmarks/annotate_throughput.py                    # local + serve, embedded model
    python benchmarks/annotate_throughput.py --pairs 40 --batch-sizes 8 --concurrency 4   # all 40 pairs
    python benchmarks/annotate_throughput.py --demo             # also time `annotate` on recipes/demo.yaml
    python benchmarks/annotate_throughput.py --json out.json

On a shared CPU the figures move with the load of the machine; the script prints the load average
next to each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from hippocrates.data.io import read_jsonl
from hippocrates.rlaif.agreement import agreement_metrics
from hippocrates.rlaif.judges import JudgeItem, Verdict, combine_orders, load_rubric, order_consistency

REPO = Path(__file__).resolve().parents[1]
LABELS = REPO / "data" / "demo" / "preferences" / "human_labels.jsonl"


def pair_items(n: int) -> list[JudgeItem]:
    rows = read_jsonl(LABELS)[:n]
    return [
        JudgeItem(r["prompt"], *o)
        for r in rows
        for o in ((r["response_a"], r["response_b"]), (r["response_b"], r["response_a"]))
    ]


def load() -> float:
    return round(os.getloadavg()[0], 2)


def bench_local(
    model_spec: str,
    items: list[JudgeItem],
    batch_sizes: list[int],
    verdicts: dict[str, list[Verdict]],
    unshared: bool = True,
) -> list[dict]:
    from hippocrates.models import load_model, load_tokenizer
    from hippocrates.rlaif.local_judge import LocalJudge

    model, tokenizer = load_model(model_spec), load_tokenizer(model_spec)
    rows = []
    for share in (True, False) if unshared else (True,):
        for bs in batch_sizes:
            judge = LocalJudge(model, tokenizer, rubric=load_rubric(), batch_size=bs, share_prefix=share)
            judge.log_probs(items[:2], show_progress=False)  # warm-up
            start = time.perf_counter()
            verdicts.setdefault("local", judge.judge_pairs(items))
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "backend": "local",
                    "batch_size": bs,
                    "shared_prefix": share,
                    "pairs": len(items) // 2,
                    "seconds": round(seconds, 2),
                    "pairs_per_s": round(len(items) / 2 / seconds, 3),
                    "load_avg_1m": load(),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            if not share:
                break  # one no-prefix point is enough to show the gain
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_serve(
    model_spec: str,
    items: list[JudgeItem],
    concurrency: list[int],
    max_tokens: int,
    modes: list[str],
    verdicts: dict[str, list[Verdict]],
) -> list[dict]:
    from hippocrates.rlaif.http_judge import HTTPJudge

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "hippocrates.cli",
        "serve",
        "--model",
        model_spec,
        "--port",
        str(port),
        "--served-model-name",
        "judge",
        "--max-batch",
        str(max(concurrency)),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit("hippo serve exited during startup")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        for mode in modes:
            for c in concurrency:
                judge = HTTPJudge(
                    f"{url}/v1",
                    "judge",
                    rubric=load_rubric(),
                    concurrency=c,
                    max_tokens=max_tokens,
                    timeout_s=600,
                    max_retries=0,
                    verdict=mode,  # type: ignore[arg-type]
                )  # no cache: every item is a request
                before = httpx.get(f"{url}/v1/stats").json()
                start = time.perf_counter()
                verdicts.setdefault(f"http {mode}", judge.judge_pairs(items))
                seconds = time.perf_counter() - start
                after = httpx.get(f"{url}/v1/stats").json()
                rows.append(
                    {
                        "backend": f"http (hippo serve), {mode} verdicts",
                        "concurrency": c,
                        "max_tokens": 1 if mode == "logprobs" else max_tokens,
                        "pairs": len(items) // 2,
                        "seconds": round(seconds, 2),
                        "pairs_per_s": round(len(items) / 2 / seconds, 3),
                        "requests": after["requests"] - before["requests"],
                        "answered": judge.stats["answered"],
                        "mean_batch": round(
                            (after["completions"] - before["completions"])
                            / max(after["batches"] - before["batches"], 1),
                            2,
                        ),
                        "load_avg_1m": load(),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


def bench_demo(recipe_path: str) -> dict:
    """The demo annotate stage from the base model (the pipeline would use OUTPUT/sft)."""
    from hippocrates.config import load_recipe
    from hippocrates.rlaif.annotate import run_annotate

    os.chdir(REPO)  # the recipe's data paths are relative to the repository
    recipe = load_recipe(recipe_path)
    with tempfile.TemporaryDirectory() as tmp:
        recipe.output_dir = tmp
        start = time.perf_counter()
        metrics = run_annotate(recipe, recipe.base_model, Path(tmp) / "annotate")
        seconds = time.perf_counter() - start
    keys = (
        "prompts",
        "judged_pairs",
        "preference_pairs",
        "ties",
        "inconsistent",
        "consistency_rate",
        "corrected_consistency_rate",
        "time_s",
    )
    row = {
        "backend": "demo annotate",
        "seconds": round(seconds, 2),
        **{k: metrics[k] for k in keys},
        "load_avg_1m": load(),
    }
    print(json.dumps(row), flush=True)
    return row


def compare(items: list[JudgeItem], verdicts: dict[str, list[Verdict]], n_pairs: int) -> dict:
    """Each judge against the human labels, and every HTTP judge against the local one, item by item."""
    human = [r["label"] for r in read_jsonl(LABELS)[:n_pairs]]
    out: dict = {}
    for name, vs in verdicts.items():
        labels = []
        for k in range(len(human)):
            outcome = combine_orders(vs[2 * k], vs[2 * k + 1])
            labels.append(None if outcome == "failed" else "tie" if outcome == "inconsistent" else outcome)
        kept = [(h, j) for h, j in zip(human, labels, strict=True) if j is not None]
        metrics = agreement_metrics([h for h, _ in kept], [j for _, j in kept])
        out[name] = {
            "failed_pairs": len(human) - len(kept),
            "accuracy": metrics["accuracy"],
            "cohen_kappa": metrics["cohen_kappa"],
            "judge_counts": metrics["judge_counts"],
            **order_consistency(vs),
        }
        if name != "local" and "local" in verdicts:
            local = verdicts["local"]
            out[name]["same_verdict_as_local"] = sum(
                a.verdict == b.verdict for a, b in zip(vs, local, strict=True)
            )
            out[name]["same_raw_verdict_as_local"] = sum(
                a.raw_verdict == b.raw_verdict for a, b in zip(vs, local, strict=True)
            )
            out[name]["items"] = len(items)
        print(json.dumps({"judge": name, **out[name]}), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", type=int, default=16, help="pairs to judge (each in both orders)")
    parser.add_argument("--batch-sizes", default="8,16")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--max-tokens", type=int, default=8, help="HTTP judge reply length (text verdicts)")
    parser.add_argument("--verdicts", default="logprobs,text", help="HTTP judge verdict modes to run")
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument(
        "--skip-unshared", action="store_true", help="skip the local judge without prefix sharing"
    )
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--demo", action="store_true", help="also time annotate on --recipe")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "demo.yaml"))
    parser.add_argument("--json", help="write all rows to this file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    items = pair_items(args.pairs)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}, load {load()}",
        flush=True,
    )
    rows: list = []
    verdicts: dict[str, list[Verdict]] = {}
    if not args.skip_local:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        rows += bench_local(args.model, items, batch_sizes, verdicts, unshared=not args.skip_unshared)
    if not args.skip_http:
        concurrency, modes = [int(c) for c in args.concurrency.split(",")], args.verdicts.split(",")
        rows += bench_serve(args.model, items, concurrency, args.max_tokens, modes, verdicts)
    comparison = compare(items, verdicts, len(items) // 2)
    if args.demo:
        rows.append(bench_demo(args.recipe))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "judges": comparison}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
