"""Model resolution: every spec kind, the GGUF cache, and one-line errors for bad specs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hippocrates import models
from hippocrates.cli import main
from hippocrates.errors import HippoError


def test_alias_resolves_to_cached_safetensors(embedded_model_dir: Path):
    assert (embedded_model_dir / "model.safetensors").is_file()
    assert (embedded_model_dir / "config.json").is_file()
    source = json.loads((embedded_model_dir / models.SOURCE_FILE).read_text())
    assert source["gguf"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_second_alias_resolution_does_not_reconvert(embedded_model_dir: Path, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "convert_gguf", boom)
    assert models.resolve_model("smollm2-135m").path == str(embedded_model_dir)


def test_converted_model_loads_and_matches_gguf_config(embedded_model_dir: Path):
    model = models.load_model("smollm2-135m")
    tokenizer = models.load_tokenizer("smollm2-135m")
    assert model.config.model_type == "llama"
    assert tokenizer.chat_template
    assert tokenizer.pad_token is not None


def test_local_dir_resolves_without_network(tiny_llama_dir: Path):
    resolved = models.resolve_model(str(tiny_llama_dir))
    assert resolved.kind == "dir" and resolved.is_local
    assert models.load_model(resolved).config.num_hidden_layers == 2


def test_hub_id_is_passed_through():
    resolved = models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert resolved.kind == "hub" and resolved.path == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_gguf_file_resolves_to_same_cache_as_alias(embedded_model_dir: Path):
    gguf = models.alias_gguf_path("smollm2-135m")
    assert models.resolve_model(str(gguf)).path == str(embedded_model_dir)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("/nonexistent/model", "no such model"),
        ("./missing.gguf", "no such model"),
        ("smollm3-999m", "unknown model alias"),
    ],
)
def test_bad_specs_fail_with_one_line(spec: str, message: str):
    with pytest.raises(HippoError, match=message):
        models.resolve_model(spec)


def test_dir_without_config_is_rejected(tmp_path: Path):
    with pytest.raises(HippoError, match="no config.json"):
        models.resolve_model(str(tmp_path))


def test_corrupt_and_truncated_gguf(tmp_path: Path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(HippoError, match="bad magic"):
        models.resolve_model(str(bad))
    real = models.alias_gguf_path("smollm2-135m").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(real[: len(real) // 3])
    with pytest.raises(HippoError, match="truncated"):
        models.resolve_model(str(cut))


@pytest.mark.parametrize("spec", ["/nonexistent/model", "no-such-alias", "tests"])
def test_cli_bad_model_exits_2_with_one_line(spec: str, capsys):
    assert main(["models", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error" in err and "Traceback" not in err


def test_conversion_is_atomic(tmp_path: Path, monkeypatch):
    """A crash mid-conversion leaves no cache entry that looks complete."""
    monkeypatch.setenv("HIPPO_CACHE", str(tmp_path))

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_config", crash)
    with pytest.raises(RuntimeError):
        models.resolve_model("smollm2-135m")
    leftovers = [p.name for p in (tmp_path / "models").iterdir()]
    assert leftovers == ["gguf_index.json"]  # only the remembered hash of the GGUF, no model folder
