"""A stage killed with SIGKILL mid-run resumes from its last checkpoint and ends with the same adapter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hippocrates.config import load_recipe
from hippocrates.errors import HippoError
from test_stages_helpers import killed_run_script, make_recipe

KILLED_RUN = killed_run_script("sft", 3)  # checkpoint-2 is on disk, step 3 is lost


def adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "adapter" / "adapter_model.safetensors")


def test_killed_stage_resumes_to_the_same_adapter(tmp_path, tiny_llama_dir):
    import torch

    from hippocrates.stages.sft import run_sft

    overrides = {
        "stages.sft.train.max_steps": 5,
        "stages.sft.lora.dropout": 0.1,
    }  # dropout: RNG must resume too
    straight = load_recipe(make_recipe(tmp_path / "a", tiny_llama_dir, **overrides))
    run_sft(straight, str(tiny_llama_dir), Path(straight.output_dir) / "sft", report_to=[])

    path = make_recipe(tmp_path / "b", tiny_llama_dir, **overrides)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(path), str(tiny_llama_dir)], capture_output=True
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    recipe = load_recipe(path)
    out = Path(recipe.output_dir)
    assert (out / ".sft.work" / "checkpoint-2").is_dir() and not (out / "sft").exists()

    changed = make_recipe(
        tmp_path / "c", tiny_llama_dir, **overrides, **{"stages.sft.train.learning_rate": 0.5}
    )
    changed_recipe = load_recipe(changed)
    with pytest.raises(HippoError, match="different inputs"):
        run_sft(changed_recipe, str(tiny_llama_dir), out / "sft", resume=True, report_to=[])

    metrics = run_sft(load_recipe(path), str(tiny_llama_dir), out / "sft", resume=True, report_to=[])
    assert metrics["train_steps"] == 5
    manifest = (out / "sft" / "manifest.json").read_text()
    assert "checkpoint-2" in manifest  # resumed_from is recorded
    a, b = adapter(Path(straight.output_dir) / "sft"), adapter(out / "sft")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
