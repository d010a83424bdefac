"""``hippo serve`` generation throughput: completion tokens/s with 1 and 8 concurrent clients, at the
default torch thread count (``auto``: ``--threads`` unset, which is usable CPUs - 1) and at one
thread; ``all`` (one thread per usable CPU, torch's own default) shows what the default avoids.

Each setting starts its own ``hippo serve`` subprocess. Every client sends ``--requests`` text
completions one after another (temperature 0, ``--max-tokens`` each, a different prompt per
request) with the official ``openai`` client; concurrent requests are batched by the server.
tokens/s is the completion tokens reported in ``usage`` over the wall time of the round.

    python benchmarks/serve_throughput.py                        # embedded model, auto vs 1 thread, 1 and 8 clients
    python benchmarks/serve_throughput.py --threads auto,1,all --clients 1,4,8 --json out.json

On a shared CPU the figures move with the machine's load; the script prints the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai

PROMPTS = [
    "The most common symptoms of influenza are",
    "A normal resting heart rate for an adult is",
    "Patients with type 2 diabetes should monitor",
    "The first aid for a minor burn is to",
    "High blood pressure is a risk factor for",
    "Dehydration in children can be recognised by",
    "Antibiotics do not work against viral infections because",
    "The recommended daily amount of physical activity for adults is",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load() -> float:
    return round(os.getloadavg()[0], 2)


class Server:
    """A ``hippo serve`` subprocess for one thread setting ("auto": the server's default; "all": one
    thread per usable CPU; or a number)."""

    def __init__(self, model: str, threads: str, max_tokens: int, batch: int) -> None:
        self.port, self.log = free_port(), Path(tempfile.mkstemp(suffix=".log")[1])
        cmd = [sys.executable, "-m", "hippocrates.cli", "serve", "--model", model, "--port", str(self.port),
               "--served-model-name", "bench", "--max-tokens", str(max_tokens), "--max-batch", str(batch),
               "--max-concurrency", str(max(batch, 16))]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if threads == "auto":
            env.pop("OMP_NUM_THREADS", None)  # let the server choose
        else:
            cmd += ["--threads", str(usable_cpus()) if threads == "all" else threads]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self) -> int:
        """Block until it answers; returns the torch thread count it reports."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"hippo serve exited during startup:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    found = re.search(r"\((\d+) torch threads", self.log.read_text())
                    return int(found.group(1)) if found else -1
            except httpx.TransportError:
                time.sleep(0.5)
        raise SystemExit("hippo serve did not come up in 300 s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.unlink(missing_ok=True)


def run_round(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` threads, each sending ``requests`` completions in turn; tokens and time."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=3600)
    tokens, latencies, errors = [], [], []
    lock = threading.Lock()

    def work(k: int) -> None:
        for r in range(requests):
            start = time.perf_counter()
            try:
                reply = client.completions.create(
                    model="bench", prompt=PROMPTS[(k * requests + r) % len(PROMPTS)], temperature=0,
                    max_tokens=max_tokens,
                )  # fmt: skip
            except openai.OpenAIError as exc:
                with lock:
                    errors.append(repr(exc))
                continue
            with lock:
                tokens.append(reply.usage.completion_tokens)
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return {
        "clients": clients,
        "requests": len(tokens),
        "completion_tokens": sum(tokens),
        "wall_s": round(wall, 2),
        "tokens_per_s": round(sum(tokens) / wall, 2),
        "mean_latency_s": round(sum(latencies) / len(latencies), 2),
        "load_avg_1m": load(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="model spec (default: the embedded model)")
    parser.add_argument("--threads", default="auto,1", help="comma list of thread settings: auto, all or N")
    parser.add_argument("--clients", default="1,8", help="comma list of concurrent client counts")
    parser.add_argument("--requests", type=int, default=2, help="requests per client in each round")
    parser.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request")
    parser.add_argument("--json", help="write the rows and the machine description to this file")
    args = parser.parse_args()
    settings = [t.strip() for t in args.threads.split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    meta = {
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "model": args.model,
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(
        f"# {meta['cpu']}, {meta['usable_cpus']} usable CPUs, load {load()}, model {args.model}", flush=True
    )
    rows = []
    for setting in settings:
        server = Server(args.model, setting, args.max_tokens, max(clients))
        try:
            threads = server.wait()
            run_round(server.url, 1, 1, 4)  # warm-up
            for c in clients:
                rows.append(
                    {
                        "threads": setting,
                        "torch_threads": threads,
                        **run_round(server.url, c, args.requests, args.max_tokens),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
        finally:
            server.stop()
    print(
        "\n| threads | clients | requests | completion tokens | wall s | tokens/s | mean latency s | load |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        label = f"{r['threads']} ({r['torch_threads']})" if r["threads"] in ("auto", "all") else r["threads"]
        print(f"| {label} | {r['clients']} | {r['requests']} | {r['completion_tokens']} | {r['wall_s']} | "
              f"{r['tokens_per_s']} | {r['mean_latency_s']} | {r['load_avg_1m']} |")  # fmt: skip
    speed = {(r["threads"], r["clients"]): r["tokens_per_s"] for r in rows}
    print()
    for setting in settings:
        if len(clients) > 1:
            ratio = speed[(setting, clients[-1])] / speed[(setting, clients[0])]
            print(f"threads {setting}: {clients[-1]} clients / {clients[0]} client = {ratio:.2f}x tokens/s")
    if len(settings) > 1:
        for c in clients:
            ratio = speed[(settings[0], c)] / speed[(settings[-1], c)]
            print(f"{c} clients: threads {settings[0]} / threads {settings[-1]} = {ratio:.2f}x tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
