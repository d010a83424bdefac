"""CPT -> SFT -> DPO end to end on a tiny Llama: the output layout, merged models, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hippocrates.cli import main
from hippocrates.config import load_recipe
from hippocrates.errors import HippoError
from test_stages_helpers import make_recipe, write_jsonl

LAYOUT = ["config.json", "model.safetensors", "tokenizer.json", "metrics.json", "manifest.json", "README.md"]
ADAPTER = ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_llama_dir):
    """Run the three training stages once; the tests below inspect what they wrote."""
    from hippocrates.stages.cpt import run_cpt
    from hippocrates.stages.dpo import run_dpo
    from hippocrates.stages.sft import run_sft

    root = tmp_path_factory.mktemp("chain")
    recipe = load_recipe(make_recipe(root, tiny_llama_dir))
    out = Path(recipe.output_dir)
    metrics = {
        "cpt": run_cpt(recipe, str(tiny_llama_dir), out / "cpt", report_to=["tensorboard"]),
        "sft": run_sft(recipe, str(out / "cpt"), out / "sft", report_to=[]),
        "dpo": run_dpo(recipe, str(out / "sft"), out / "dpo", report_to=[]),
    }
    return recipe, out, metrics


@pytest.mark.parametrize("stage", ["cpt", "sft", "dpo"])
def test_stage_writes_the_contract_layout(chain, stage):
    recipe, out, _ = chain
    for name in LAYOUT + ADAPTER:
        assert (out / stage / name).is_file(), f"{stage}/{name} missing"
    manifest = json.loads((out / stage / "manifest.json").read_text())
    for key in (
        "inputs_hash",
        "fingerprint",
        "config",
        "data",
        "packages",
        "git_commit",
        "seed",
        "started",
        "finished",
        "hardware",
        "recipe_name",
        "input_model",
    ):
        assert key in manifest, key
    assert manifest["recipe_name"] == "test" and manifest["seed"] == 7
    assert all(len(d["sha256"]) == 64 for d in manifest["data"])
    assert {"torch", "transformers", "peft", "trl"} <= set(manifest["packages"])
    config = json.loads((out / stage / "config.json").read_text())
    assert "quantization_config" not in config
    assert "LoRA" in (out / stage / "README.md").read_text()
    assert not (out / f".{stage}.work").exists(), "checkpoints are removed after success"
    assert not list(out.glob(f".{stage}.tmp-*")), "no temp dirs left behind"


def test_merged_models_load_and_differ_from_their_input(chain, tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    _, out, _ = chain
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = torch.tensor([[1, 200, 300, 400]])
    previous = base(ids).logits
    for stage in ("cpt", "sft", "dpo"):
        model = AutoModelForCausalLM.from_pretrained(out / stage)
        logits = model(ids).logits
        assert not torch.allclose(logits, previous), f"{stage} did not change the model"
        previous = logits


def test_metrics(chain):
    _, out, metrics = chain
    cpt, sft, dpo = metrics["cpt"], metrics["sft"], metrics["dpo"]
    assert cpt["eval_perplexity_before"] > 0 and cpt["eval_perplexity_after"] > 0
    assert cpt["empty_documents_dropped"] == 1 and cpt["train_steps"] == 3
    assert (out / "cpt" / "tensorboard").is_dir()
    assert sft["eval_loss_before"] > 0 and sft["eval_loss_after"] > 0
    assert sft["template"] == "chat" and sft["packing"] is True
    # weights 1 : 2 over 16 + 4 records: 7 general (sub-sampled) + 13 evaluation (up-sampled) = 20
    assert sft["train_samples"] + sft["dropped_no_response"] == 20
    assert dpo["identical_dropped"] == 1 and dpo["pairs"] == 17
    assert (
        dpo["eval_reward_accuracy_before"] == 0.5
    )  # policy == reference: every reward is 0, a tie counts 1/2
    assert dpo["eval_reward_accuracy_after"] is not None and "eval_reward_margin" in dpo
    assert json.loads((out / "dpo" / "metrics.json").read_text())["stage"] == "dpo"


def test_another_runs_output_is_refused(chain, tmp_path, capsys):
    recipe, out, _ = chain
    other = make_recipe(tmp_path, Path(recipe.base_model), name="other", output_dir=str(out))
    assert main(["cpt", str(other), "--report-to", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another run (recipe 'test')" in err[0] and "--overwrite" in err[0]


def _expect_error(args: list[str], capsys, *fragments: str) -> str:
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, tiny_llama_dir, capsys):
    recipe = make_recipe(tmp_path, tiny_llama_dir)
    data = tmp_path / "data"
    out = tmp_path / "out"
    # malformed JSONL line, named file:line
    bad = data / "general.jsonl"
    bad.write_text(bad.read_text() + '{"instruction": "x", "output": \n')
    _expect_error(["sft", str(recipe), "--model", str(tiny_llama_dir)], capsys, f"{bad}:17", "malformed JSON")
    # missing field
    write_jsonl(bad, [{"instruction": "x"}])
    _expect_error(
        ["sft", str(recipe), "--model", str(tiny_llama_dir)], capsys, f"{bad}:1", "not a training record"
    )
    # empty dataset
    bad.write_text("")
    _expect_error(["sft", str(recipe), "--model", str(tiny_llama_dir)], capsys, "empty dataset")
    # preference pair without 'rejected'
    write_jsonl(data / "prefs.jsonl", [{"prompt": "p", "chosen": "c"}])
    _expect_error(["dpo", str(recipe), "--model", str(tiny_llama_dir)], capsys, "prefs.jsonl:1", "'rejected'")
    # only identical pairs: all dropped -> empty
    write_jsonl(data / "prefs.jsonl", [{"prompt": "p", "chosen": "same", "rejected": "same"}])
    _expect_error(["dpo", str(recipe), "--model", str(tiny_llama_dir)], capsys, "empty dataset")
    # CPT text field missing
    write_jsonl(data / "cpt.jsonl", [{"body": "text"}])
    _expect_error(["cpt", str(recipe)], capsys, "cpt.jsonl:1", "missing field 'text'")
    assert not any((out / s).exists() for s in ("cpt", "sft", "dpo")), "nothing half-written"


def test_dpo_without_preferences_names_the_annotate_stage(tmp_path, tiny_llama_dir, capsys):
    recipe = make_recipe(tmp_path, tiny_llama_dir, **{"stages.dpo.data": []})
    _expect_error(
        ["dpo", str(recipe), "--model", str(tiny_llama_dir)], capsys, "preferences.jsonl", "annotate"
    )


def test_streaming_needs_max_steps(tmp_path, tiny_llama_dir):
    from hippocrates.stages.cpt import run_cpt

    recipe = load_recipe(make_recipe(tmp_path, tiny_llama_dir, **{"stages.cpt.train.max_steps": -1}))
    recipe.stages.cpt.data[0].streaming = True
    with pytest.raises(HippoError, match="max_steps"):
        run_cpt(recipe, str(tiny_llama_dir), tmp_path / "out" / "cpt")


def test_streamed_cpt_trains_end_to_end(tmp_path, tiny_llama_dir):
    from hippocrates.stages.cpt import run_cpt

    recipe = load_recipe(make_recipe(tmp_path, tiny_llama_dir, **{"stages.cpt.train.max_steps": 2}))
    recipe.stages.cpt.data[0].streaming = True
    metrics = run_cpt(recipe, str(tiny_llama_dir), tmp_path / "out" / "cpt", report_to=[])
    assert metrics["streaming"] is True and metrics["train_steps"] == 2
    assert metrics["train_blocks"] >= 5 and metrics["documents"] > 0  # counted as they stream past
    assert (tmp_path / "out" / "cpt" / "model.safetensors").is_file()


def test_report_to_a_missing_logger_is_a_usage_error(tmp_path, tiny_llama_dir, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    recipe = make_recipe(tmp_path, tiny_llama_dir)
    _expect_error(["sft", str(recipe), "--report-to", "wandb"], capsys, "wandb", "not installed")
