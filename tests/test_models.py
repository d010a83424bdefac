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


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_cache_dir_is_a_plain_model(embedded_model_dir: Path, precision: str):
    """No GGUF quantization settings: transformers attaches no quantizer, in any precision."""
    assert "quantization_config" not in json.loads((embedded_model_dir / "config.json").read_text())
    model = models.load_model(str(embedded_model_dir), precision=precision)
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert next(model.parameters()).dtype == models.torch_dtype(precision)


def test_an_older_cache_is_migrated_on_first_use(embedded_model_dir: Path, tmp_path: Path, monkeypatch):
    import shutil

    monkeypatch.setenv("HIPPO_CACHE", str(tmp_path))
    target = tmp_path / "models" / embedded_model_dir.name
    shutil.copytree(embedded_model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    (target / "config.json").write_text(json.dumps(config))
    assert models.resolve_model("smollm2-135m").path == str(target)
    assert "quantization_config" not in json.loads((target / "config.json").read_text())


def test_alias_resolution_hashes_the_gguf_once(tmp_path: Path, monkeypatch, embedded_model_dir: Path):
    """The GGUF's sha256 is remembered by (path, size, mtime): later resolutions read no 98 MB file."""
    import shutil

    monkeypatch.setenv("HIPPO_CACHE", str(tmp_path))
    shutil.copytree(embedded_model_dir, tmp_path / "models" / embedded_model_dir.name)
    hashed = []
    real = models.sha256_file
    monkeypatch.setattr(models, "sha256_file", lambda p: hashed.append(p) or real(p))
    models.resolve_model("smollm2-135m")
    models.resolve_model("smollm2-135m")
    assert len(hashed) == 1 and (tmp_path / "models" / "gguf_index.json").is_file()


def test_lm_eval_runs_on_the_cache_dir(embedded_model_dir: Path, tmp_path: Path):
    """What a user compares against: the converted base model opens in lm-eval's HF backend as it is."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from hippocrates.eval.lm_eval_export import export

    bench = Path(__file__).resolve().parents[1] / "data" / "demo" / "benchmarks"
    export(tmp_path / "tasks", ["medqa"], data_dir=str(bench), model="smollm2-135m")
    readme = (tmp_path / "tasks" / "README.md").read_text()
    assert f"pretrained={embedded_model_dir}" in readme
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={embedded_model_dir},dtype=float32", tasks=["hippo_medqa"],
        device="cpu", limit=2, task_manager=TaskManager(include_path=str(tmp_path / "tasks")), batch_size=2,
    )  # fmt: skip
    assert 0.0 <= out["results"]["hippo_medqa"]["acc,none"] <= 1.0
