"""``hippo export``: a stage of a real run as a Hub-ready folder that transformers and the Hub read."""

from __future__ import annotations

import json

from hippocrates.cli import main


def test_export_writes_a_hub_ready_folder(tiny_run, tmp_path, capsys):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "dpo-export"
    assert main(["export", str(tiny_run / "dpo"), "--to", str(out), "--license", "apache-2.0"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and "dpo" in card.data.tags
    results = card.data.eval_results
    assert results and {r.dataset_name for r in results} >= {"MedQA (USMLE-style, 4 options), test split"}
    ours = json.loads((tiny_run / "eval" / "0shot" / "results.json").read_text())["tasks"]["medqa"]["acc"]
    assert any(r.metric_value == round(ours, 4) and "0-shot" in r.metric_name for r in results)
    assert "CPT → SFT → GRPO → DPO" in card.text and "weight update kept" in card.text


def test_base_model_is_the_hub_id_when_known():
    from hippocrates.export import base_hub_id

    assert base_hub_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_hub_id("mistralai/Mistral-7B-v0.1") == "mistralai/Mistral-7B-v0.1"
    assert base_hub_id("/some/local/dir") is None


def test_upload_offline_is_one_line_and_the_folder_is_written(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "exp"
    assert main(["export", str(tiny_run / "sft"), "--to", str(out), "--hub", "someone/model"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "HF_HUB_OFFLINE is set" in err[0] and str(out) in err[0]
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


def test_export_of_something_else_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "not a model folder" in capsys.readouterr().err


def test_eval_figures_reach_tensorboard(tiny_llama_dir, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import DEMO

    out = tmp_path / "ev"
    assert main(["eval", "--model", str(tiny_llama_dir), "--tasks", "medqa", "--data-dir", str(DEMO / "benchmarks"),
                 "--limit", "3", "--output", str(out), "--report-to", "tensorboard"]) == 0  # fmt: skip
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    acc = json.loads((out / "results.json").read_text())["tasks"]["medqa"]["acc"]
    assert abs(events.Scalars("medqa/acc")[0].value - acc) < 1e-6
    assert main(["eval", "--model", "x", "--tasks", "medqa", "--report-to", "tensorboard"]) == 2
    assert "--report-to needs --output" in capsys.readouterr().err


def test_the_pipeline_sends_analysis_figures(tiny_run):
    """The tiny run was made with --report-to none: nothing written; the loggers are opt-out."""
    assert not (tiny_run / "eval" / "0shot" / "tensorboard").exists()
