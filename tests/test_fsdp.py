"""Sharded training and the save path: every rank gathers, rank 0 merges from the saved adapter.

accelerate's FSDP plugin (which the Trainer uses under ``accelerate launch --config_file
configs/accelerate/fsdp_lora.yaml``) only engages on accelerators: on CPU its state falls back to
MULTI_CPU (plain DDP), so the Trainer-based stages cannot be run sharded here. torch's FSDP2
``fully_shard`` does run on CPU with gloo, so this test shards a LoRA model over 2 processes,
trains it with our loss, gathers the full state dict on every rank (what ``Trainer.save_model``
does under FSDP with FULL_STATE_DICT), saves the adapter on rank 0 and merges it into a fresh
full-precision copy of the input model with :func:`hippocrates.stages.merge.merge_adapter`, the
function the stages call. The merged, reloaded model must give the sharded model's loss.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

from test_distributed import free_port

SCRIPT = r"""
import json, sys, torch, torch.distributed as dist
from pathlib import Path
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM
from peft import get_peft_model
from hippocrates.config import LoRASettings
from hippocrates.stages.run import peft_config
from hippocrates.stages.modeling import PackedCollator, labelled_nll
from hippocrates.stages.merge import merge_adapter

tiny, out = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
model.config.use_cache = False
model = get_peft_model(model, peft_config(LoRASettings(r=4, alpha=8, dropout=0.0)))
for layer in model.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(model)
sharded = sum(isinstance(p, DTensor) for p in model.parameters())
gen = torch.Generator().manual_seed(1)
rows = [{"input_ids": (ids := torch.randint(10, 4000, (24,), generator=gen).tolist()), "labels": ids} for _ in range(4)]
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
batch = PackedCollator(0)(rows[2 * rank : 2 * rank + 2])
first = None
for _ in range(3):
    nll, n = labelled_nll(model, batch)
    first = first if first is not None else float(nll / n)
    (nll / n).backward()
    opt.step()
    opt.zero_grad()
with torch.no_grad():
    nll, n = labelled_nll(model, PackedCollator(0)(rows))
final = float(nll / n)
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # all ranks
if rank == 0:
    model.save_pretrained(out / "adapter", state_dict={k: v for k, v in state.items() if "lora_" in k})
    record = merge_adapter(tiny, out / "adapter", out / "merged", probe=[rows[0]["input_ids"]])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    with torch.no_grad():
        m_nll, m_n = labelled_nll(merged, PackedCollator(0)(rows))
    print("RESULT " + json.dumps({"sharded": sharded, "params": len(list(model.parameters())), "first": first,
                                  "final": final, "reloaded": float(m_nll / m_n), "merge": record}), flush=True)
dist.barrier()
dist.destroy_process_group()
"""


def test_fsdp2_sharded_lora_saves_and_merges(tmp_path, tiny_llama_dir):
    script = tmp_path / "fsdp2.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(script), str(tiny_llama_dir), str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["sharded"] == result["params"] > 0, "every parameter is a DTensor shard"
    assert result["final"] < result["first"], "the sharded model learned"
    assert abs(result["reloaded"] - result["final"]) < 1e-4, "the merged model is the trained sharded model"
    assert result["merge"]["update_retained"] > 0.99


def test_the_stage_save_path_merges_from_the_saved_adapter_only():
    """finish_stage gets the adapter's folder, never a (possibly sharded) module, and merges from disk."""
    from hippocrates.stages.run import finish_stage

    params = list(inspect.signature(finish_stage).parameters)
    assert params[:2] == ["run", "adapter"] and "model" not in params
