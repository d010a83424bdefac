"""Launcher-agnostic helpers (hippocrates.accel) and the shipped accelerate configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hippocrates import accel

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "accelerate"
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", accel.ATTN_ENV)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Each test starts as a plain single process, whatever launched pytest."""
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)


def test_single_process_is_main():
    assert accel.is_main_process() and accel.is_local_main_process()
    assert (accel.rank(), accel.world_size()) == (0, 1)


def test_rank_from_launcher_env(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert not accel.is_main_process() and not accel.is_local_main_process()
    assert accel.world_size() == 4
    monkeypatch.setenv("RANK", "4")  # second node's first worker: local main, not global main
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert accel.is_local_main_process() and not accel.is_main_process()


def test_local_rank_alone_decides_when_rank_is_unset(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not accel.is_main_process()


def test_main_process_first_single_process_runs_body():
    ran = []
    with accel.main_process_first():
        ran.append(1)
    with accel.main_process_first(local=True):
        ran.append(2)
    assert ran == [1, 2]


WORKER = """
import os, sys, time, torch.distributed as dist
from hippocrates import accel
rank, marker = int(sys.argv[1]), sys.argv[2]
os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
dist.init_process_group("gloo", init_method="file://" + sys.argv[3], rank=rank, world_size=2)
with accel.main_process_first():
    if rank == 0:
        time.sleep(1.0)
        open(marker, "w").write("built by rank 0")
    else:
        assert open(marker).read() == "built by rank 0"
dist.destroy_process_group()
"""


def test_main_process_first_orders_two_real_processes(tmp_path):
    """Rank 1 only enters after rank 0 has left the block (gloo group, no GPU)."""
    marker, store = tmp_path / "cache.txt", tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(marker), str(store)], env=env)
        for r in (1, 0)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]


def test_hardware_summary_keys():
    info = accel.hardware_summary()
    for key in ("cpu_count", "ram_gb", "torch", "cuda", "gpu_count", "gpus", "world_size", "rank"):
        assert key in info
    assert info["cpu_count"] >= 1 and info["world_size"] == 1 and info["gpu_count"] == len(info["gpus"])
    json.dumps(info)  # goes into manifest.json as is


def test_attn_implementation_on_cpu_is_sdpa(monkeypatch):
    assert accel.attn_implementation("bf16") == "sdpa"
    assert accel.attn_implementation("fp32") == "sdpa"
    monkeypatch.setenv(accel.ATTN_ENV, "eager")
    assert accel.attn_implementation("bf16") == "eager"


def test_maybe_liger_is_a_noop_off_cuda():
    import torch

    model = torch.nn.Linear(2, 2)
    assert accel.maybe_liger(model) is False
    assert type(model).forward is torch.nn.Linear.forward


def load_config(config: Path):
    """A config as ``accelerate launch --config_file`` reads it (accelerate's own loader and schema)."""
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(config))


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_accelerate_configs_are_accepted_by_accelerate(name, monkeypatch):
    """Each shipped config loads through accelerate's loader, and builds accelerate's plugin for it."""
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    monkeypatch.chdir(REPO)  # the DeepSpeed JSON paths are relative to the repo root
    config = load_config(CONFIGS / name)
    assert config.compute_environment.value == "LOCAL_MACHINE" and config.use_cpu is False
    if config.distributed_type == DistributedType.FSDP:
        fsdp = config.fsdp_config
        assert fsdp["fsdp_use_orig_params"] and fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        # rank 0 reads the weights and broadcasts them: accelerate allows that only on an accelerator,
        # so here the plugin is built with the CPU-possible loading and every other setting as written
        assert fsdp["fsdp_cpu_ram_efficient_loading"] and fsdp["fsdp_sync_module_states"]
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=fsdp["fsdp_version"],
            reshard_after_forward=fsdp["fsdp_reshard_after_forward"],
            auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"],
            backward_prefetch=fsdp["fsdp_backward_prefetch"],
            forward_prefetch=fsdp["fsdp_forward_prefetch"],
            use_orig_params=fsdp["fsdp_use_orig_params"],
            state_dict_type=fsdp["fsdp_state_dict_type"],
            cpu_offload=fsdp["fsdp_offload_params"],
            activation_checkpointing=fsdp["fsdp_activation_checkpointing"],
            cpu_ram_efficient_loading=False,
            sync_module_states=False,
        )
        assert plugin.use_orig_params and plugin.state_dict_type.name == "SHARDED_STATE_DICT"
        assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
        assert config.mixed_precision == "bf16"
    elif config.distributed_type == DistributedType.DEEPSPEED:
        ds = config.deepspeed_config
        json_path = REPO / ds["deepspeed_config_file"]
        assert json_path.is_file(), f"{name}: {json_path} not found"
        plugin = DeepSpeedPlugin(hf_ds_config=str(json_path), zero3_init_flag=ds["zero3_init_flag"])
        assert plugin.zero_stage == (3 if "zero3" in name else 2)
        assert plugin.zero3_init_flag == (plugin.zero_stage == 3)
    else:
        assert config.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU)
        assert config.mixed_precision == "bf16"


def test_slurm_script_is_valid_bash():
    script = CONFIGS / "multi_node_slurm.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for flag in ("--num_machines", "--machine_rank", "--main_process_ip", "-m hippocrates.cli"):
        assert flag in text
