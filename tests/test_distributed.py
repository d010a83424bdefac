"""SFT under 2-process DDP on CPU (gloo, ``torchrun``) against one process with the same global batch.

One process with a per-device batch of 4 and two processes with 2 each see the same 4 packed rows
per optimizer step (the sampler's permutation is seeded, and accelerate hands rank r the r-th
slice of every global batch). The rows carry different numbers of supervised tokens, so the two
ranks of a step see different counts: the loss is still the same only because it is normalised by
the step's global token count and scaled back by the number of processes (see
``MaskedLMTrainer``). The stage folder must be written once, by rank 0, and exist before any rank
exits.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_stages_helpers import TOPICS, make_recipe, write_jsonl

LAYOUT = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "metrics.json",
    "manifest.json",
    "README.md",
]
STEPS = 4
SAVED = "sft: merging the adapter into"


def instructions(n: int = 32) -> list[dict[str, str]]:
    """Short answers of varied lengths: packed two to a 96-token row, 16 rows (one epoch of 4 steps)."""
    return [
        {
            "instruction": f"Explain point {i}.",
            "input": "",
            "output": " ".join(TOPICS[i % 8].split()[: 3 + (5 * i) % 11]),
        }
        for i in range(n)
    ]


def recipe_for(root: Path, model: Path, batch_size: int) -> Path:
    data = write_jsonl(root / "instructions.jsonl", instructions())
    heldout = write_jsonl(root / "heldout.jsonl", instructions(40)[32:])
    train = {
        "batch_size": batch_size,
        "max_seq_len": 96,
        "max_steps": STEPS,
        "logging_steps": 1,
        "save_steps": 2,  # checkpoints are written mid-run too (by the Trainer, on rank 0)
        "learning_rate": 5e-3,
        "warmup_ratio": 0.0,
        "lr_scheduler": "constant",
    }
    return make_recipe(
        root,
        model,
        **{
            "stages.sft.data": [{"path": str(data)}],
            "stages.sft.eval_data": [{"path": str(heldout)}],
            "stages.sft.template": "alpaca",
            "stages.sft.packing": True,
            "stages.sft.train": train,
        },
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sft(root: Path, model: Path, *, processes: int) -> tuple[dict, str]:
    recipe = recipe_for(root, model, batch_size=4 // processes)
    out = root / "out" / "sft"
    hippo = ["-m", "hippocrates.cli", "sft", str(recipe), "--model", str(model), "--output", str(out)]
    if processes == 1:
        command = [sys.executable, *hippo]
    else:
        launcher = ["-m", "torch.distributed.run", "--nnodes", "1", f"--nproc_per_node={processes}"]
        launcher += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        command = [sys.executable, *launcher, *hippo]
    launch = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launch}
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HIPPO_ATTN_IMPLEMENTATION="sdpa",
        CUDA_VISIBLE_DEVICES="",
    )
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{processes} process(es) failed:\n{done.stdout}\n{done.stderr[-6000:]}"
    for name in LAYOUT:
        assert (out / name).is_file(), f"sft/{name} missing after {processes} process(es)"
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics, done.stdout + done.stderr


def losses(metrics: dict) -> list[float]:
    return [h["loss"] for h in metrics["log_history"] if "loss" in h]


def test_ddp_matches_one_process_and_writes_once(tmp_path, tiny_llama_dir):
    t0 = time.time()
    single, _ = run_sft(tmp_path / "single", tiny_llama_dir, processes=1)
    t1 = time.time()
    ddp, log = run_sft(tmp_path / "ddp", tiny_llama_dir, processes=2)
    t2 = time.time()

    # (a) the same per-step loss curve as one process with the same global batch
    curve, ddp_curve = losses(single), losses(ddp)
    assert len(curve) == len(ddp_curve) == STEPS
    diff = max(abs(a - b) for a, b in zip(curve, ddp_curve, strict=True))
    print(f"\nloss 1 process: {curve}\nloss 2 processes: {ddp_curve}\nmax abs diff {diff:.2e}")
    print(f"wall: 1 process {t1 - t0:.1f}s, 2 processes {t2 - t1:.1f}s")
    assert diff <= 1e-5, (curve, ddp_curve)
    assert curve[-1] < curve[0], "the loss should fall over the steps"
    # every supervised token counted once, by whichever rank saw it
    assert ddp["supervised_tokens"] == single["supervised_tokens"]
    assert ddp["supervised_tokens_per_s"] is not None
    assert abs(ddp["eval_loss_after"] - single["eval_loss_after"]) <= 1e-5
    assert ddp["train_steps"] == single["train_steps"] == STEPS

    # (b) one writer: rank 0 saved the stage once, recorded the world size, and left nothing behind
    out = tmp_path / "ddp" / "out"
    assert log.count(SAVED) == 1, log
    assert log.count("sft: model, adapter/, metrics.json") == 1, "one result summary per job"
    manifest = json.loads((out / "sft" / "manifest.json").read_text())
    assert manifest["hardware"]["world_size"] == 2
    assert (
        json.loads((tmp_path / "single" / "out" / "sft" / "manifest.json").read_text())["hardware"][
            "world_size"
        ]
        == 1
    )
    assert sorted(p.name for p in out.iterdir()) == ["sft"], "no temp, old or checkpoint dirs, no lock left"


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
