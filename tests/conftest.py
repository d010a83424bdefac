"""Shared fixtures: the embedded model (converted once into the user cache) and tiny random Llamas."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HIPPO_SHARED_DATA", REPO.parent / "shared" / "data"))
DEMO = REPO / "data" / "demo"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real benchmark files beside the repo; tests that need them skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real benchmark files not found at {SHARED_DATA} (set HIPPO_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M as a safetensors dir (converted once, then cached)."""
    from hippocrates.models import resolve_model

    return Path(resolve_model("smollm2-135m").path)


def make_tiny_llama(
    path: Path, tokenizer_dir: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64
) -> Path:
    """Save a random tiny Llama with the embedded model's tokenizer (and chat template) to ``path``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, embedded_model_dir) -> Path:
    """A random 2-layer Llama (hidden 64) saved as an HF dir: fast model for mechanics tests."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), embedded_model_dir)
