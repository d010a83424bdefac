"""Launcher-agnostic helpers (hippocrates.accel) and the shipped accelerate configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

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


def launch_args(config: Path):
    """Parse a config exactly as `accelerate launch --config_file` does (no processes started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "hippocrates.cli", "sft"])
    return _validate_launch_command(args)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_accelerate_configs_are_accepted_by_accelerate_launch(name, monkeypatch):
    import torch
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    monkeypatch.chdir(REPO)  # the DeepSpeed JSON paths are relative to the repo root
    args, defaults, _ = launch_args(CONFIGS / name)
    if args.use_fsdp:
        # the plugin wants a GPU only to place synced weights: pretend there is one
        with (
            mock.patch.dict(os.environ, prepare_multi_gpu_env(args)),
            mock.patch("accelerate.utils.dataclasses.is_cuda_available", return_value=True),
            mock.patch.object(torch.cuda, "current_device", return_value=0),
        ):
            plugin = FullyShardedDataParallelPlugin()
        assert plugin.use_orig_params and plugin.cpu_ram_efficient_loading and plugin.sync_module_states
        assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
        assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    elif args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        with mock.patch.dict(os.environ, env):
            plugin = DeepSpeedPlugin()  # raises if the accelerate yaml and the JSON disagree
        assert plugin.zero_stage == (3 if "zero3" in name else 2)
        assert plugin.zero3_init_flag == (plugin.zero_stage == 3)
    else:
        assert args.mixed_precision == "bf16"


def test_slurm_script_is_valid_bash():
    script = CONFIGS / "multi_node_slurm.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for flag in ("--num_machines", "--machine_rank", "--main_process_ip", "-m hippocrates.cli"):
        assert flag in text
