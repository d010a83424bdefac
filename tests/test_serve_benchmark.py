"""The serving benchmark runs end to end in a tiny configuration (tiny model, one thread setting,
4-token requests), so it cannot rot; its figures say nothing about speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_serve_benchmark_prints_a_table_and_json(tiny_llama_dir: Path, tmp_path: Path):
    out = tmp_path / "serve.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "serve_throughput.py"), "--model", str(tiny_llama_dir),
           "--threads", "1", "--clients", "1,2", "--requests", "1", "--max-tokens", "4", "--json", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["threads"], r["clients"], r["requests"]) for r in rows] == [("1", 1, 1), ("1", 2, 2)]
    assert all(r["completion_tokens"] > 0 and r["tokens_per_s"] > 0 and r["torch_threads"] == 1 for r in rows)
    assert "| 1 | 2 | 2 |" in proc.stdout and "threads 1: 2 clients / 1 client =" in proc.stdout
