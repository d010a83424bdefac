"""Merging keeps small updates: a DPO-sized LoRA update (std 1e-4 on weights ~N(0, 0.02)) survives
the merge, measured on the saved weights themselves, and the merge record says what happened."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hippocrates.stages.merge import merge_adapter


@pytest.fixture(scope="module")
def bf16_model_and_adapter(tmp_path_factory, embedded_model_dir):
    """A tiny Llama stored in bf16 and a LoRA adapter whose update has std ~1e-4 (DPO at lr 5e-6)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    root = tmp_path_factory.mktemp("merge")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.02, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[0]))
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 1e-4 / math.sqrt(param.shape[1]))
    peft.save_pretrained(root / "adapter")
    deltas = {}
    for name, module in peft.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            key = name.removeprefix("base_model.model.") + ".weight"
            deltas[key] = module.get_delta_weight("default").detach().float().clone()
    return root, deltas


def _kept(folder: Path, base: Path, deltas: dict[str, torch.Tensor]) -> float:
    """1 - relative error of the update actually present in a saved model (measured on its files)."""
    from safetensors.torch import load_file

    merged, original = load_file(folder / "model.safetensors"), load_file(base / "model.safetensors")
    err = total = 0.0
    for key, delta in deltas.items():
        realized = merged[key].float() - original[key].float()
        err += float((realized - delta).pow(2).sum())
        total += float(delta.pow(2).sum())
    return 1 - math.sqrt(err / total)


def test_dpo_sized_update_survives_the_merge(bf16_model_and_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, deltas = bf16_model_and_adapter
    rms = math.sqrt(
        sum(float(d.pow(2).sum()) for d in deltas.values()) / sum(d.numel() for d in deltas.values())
    )
    assert 3e-5 < rms < 2e-4

    # what merging into the bf16 model loses (the way stages merged before): much of the update
    naive = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16),
                                      root / "adapter").merge_and_unload()  # fmt: skip
    naive.save_pretrained(tmp_path / "naive")
    assert _kept(tmp_path / "naive", root / "base", deltas) < 0.9

    probe = [[1, 200, 300, 400, 500, 600]]
    record = merge_adapter(str(root / "base"), root / "adapter", tmp_path / "merged", probe=probe)
    kept = _kept(tmp_path / "merged", root / "base", deltas)
    assert kept >= 0.99 and record["update_retained"] >= 0.99
    assert abs(record["update_retained"] - kept) < 1e-3  # the record describes the saved weights
    assert record["dtype"] == "fp32" and record["input_dtype"] == "bf16"  # bf16 would not hold it
    assert (
        record["update_retained_by_dtype"]["bf16"] < 0.9 and record["unchanged_share_by_dtype"]["bf16"] > 0.1
    )
    assert record["max_abs_logit_diff"] < 1e-4
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "float32"

    forced = merge_adapter(
        str(root / "base"), root / "adapter", tmp_path / "forced", store="bf16", probe=probe
    )
    assert (
        forced["dtype"] == "bf16" and forced["update_retained"] < 0.9
    )  # a forced dtype is recorded honestly
    assert abs(forced["update_retained"] - _kept(tmp_path / "forced", root / "base", deltas)) < 1e-3


def test_large_update_stays_in_the_input_dtype(bf16_model_and_adapter, tmp_path):
    """An update bf16 can hold (CPT/SFT at their learning rates) keeps the smaller files."""
    from safetensors.torch import load_file, save_file

    root, _ = bf16_model_and_adapter
    adapter = tmp_path / "big"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text((root / "adapter" / "adapter_config.json").read_text())
    weights = {
        k: (v * 300 if "lora_B" in k else v)
        for k, v in load_file(root / "adapter" / "adapter_model.safetensors").items()
    }
    save_file(weights, adapter / "adapter_model.safetensors")
    record = merge_adapter(str(root / "base"), adapter, tmp_path / "merged", probe=[[1, 2, 3]])
    assert record["dtype"] == "bf16" and record["update_retained"] >= 0.99
