"""The GPU throughput benchmark's code path, run on CPU with the tiny Mistral (about 20 s)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_throughput.py"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[str, dict]:
    """Run the benchmark once as a user would: a subprocess, printed table plus --json."""
    out = tmp_path_factory.mktemp("bench") / "results.json"
    cmd = [sys.executable, str(SCRIPT), "--model-size", "tiny", "--device", "cpu", "--steps", "2"]
    cmd += ["--seq-lens", "128", "--json", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_table_has_sft_dpo_eval_rows_with_positive_throughput(tiny_run):
    stdout, _ = tiny_run
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in ("sft", "dpo", "eval"):
            rows[cells[0]] = cells
    assert set(rows) == {"sft", "dpo", "eval"}
    for cells in rows.values():
        assert cells[1] == "128"
        assert float(cells[5].replace(",", "")) > 0  # tokens/s
        assert cells[7].endswith("%")  # MFU
    assert re.search(r"peak \(measured\): [\d.e+-]+ TFLOP/s", stdout)
    assert "4N + 6n + 3A" in stdout  # the FLOP formula is stated with the numbers


def test_mfu_is_achieved_flops_over_the_measured_peak(tiny_run):
    _, data = tiny_run
    meta, rows = data["meta"], data["rows"]
    assert meta["peak_flops"] > 0 and "timed in this run" in meta["peak_matmul"]
    assert [r["phase"] for r in rows] == ["sft", "dpo", "eval"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0
        expected = r["tokens_per_s"] * r["flops_per_token"] / meta["peak_flops"]
        assert math.isclose(r["mfu"], expected, rel_tol=1e-9)
    sft, dpo, ev = (r["flops_per_token"] for r in rows)
    n = meta["n_base"]
    assert ev > 2 * n and sft > 4 * n and dpo > sft  # attention and the reference pass add to 2N/4N
    assert meta["hardware"]["gpu_count"] == 0 and meta["hardware"]["world_size"] == 1


@pytest.fixture(scope="module")
def bench():
    """The benchmark script imported as a module, for its helpers."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_throughput
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return gpu_throughput


def test_packed_documents_do_not_attend_to_each_other(bench):
    """The benchmark's premise: reset position_ids isolate documents exactly as separate inputs."""
    import torch

    model = bench.build_base("tiny", "cpu", torch.float32, "sdpa").eval()
    batch = bench.pack(64, 4, model.config.vocab_size, "cpu")
    start, length = batch.doc_lens[0], batch.doc_lens[1]
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
        alone = model(input_ids=batch.input_ids[:, start : start + length]).logits
    torch.testing.assert_close(packed[:, start : start + length], alone, rtol=1e-4, atol=1e-4)


def test_flop_helpers_on_a_known_packing(bench):
    batch = bench.pack(64, 4, vocab=100, device="cpu")
    assert sum(batch.doc_lens) == 64 and len(batch.doc_lens) == 4
    starts = (batch.position_ids[0] == 0).nonzero().flatten().tolist()
    assert len(starts) == 4 and all(batch.labels[0, s] == -100 for s in starts)  # no cross-document loss

    class Cfg:
        hidden_size, num_attention_heads, num_hidden_layers, head_dim = 8, 2, 3, 4

    pairs = sum(n * (n + 1) / 2 for n in batch.doc_lens)
    assert bench.attention_flops_per_token(Cfg, batch) == 4 * 3 * 2 * 4 * pairs / 64
