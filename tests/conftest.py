"""Shared fixtures: the embedded model (converted once into the user cache) and tiny random Llamas."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import HTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HIPPO_SHARED_DATA", REPO.parent / "shared" / "data"))
DEMO = REPO / "data" / "demo"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    """A command run in-process (hippo serve sets torch's thread count) must not slow later tests."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@contextmanager
def served(server: HTTPServer) -> Iterator[HTTPServer]:
    """A fake HTTP server (something outside us) serving from a thread for the duration of a test."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


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


LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = none %}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' }}{% if loop.first and system %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{{ m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def make_sentencepiece_tokenizer(path: Path, *, legacy: bool = False, chat_template: str | None = None):
    """A small Llama-2-style SentencePiece tokenizer, built offline from the demo text.

    Like Llama-2's and Mistral's: BPE over "▁"-prefixed words, 256 byte-fallback tokens, <s> added in
    front, a "▁" prefix space before the text and none after a newline. ``legacy=False`` saves it as a
    ``LlamaTokenizer``, which is how transformers 5 loads Llama-2 and Mistral (Metaspace, prefix on
    the first word only); ``legacy=True`` keeps the tokenizer.json pipeline those models shipped with
    (a "▁" prepended to any text, so " yes" alone becomes "▁ ▁y es").
    """
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (DEMO / "cpt" / "train.jsonl").read_text().splitlines()]
    texts += [
        json.loads(line)["output"]
        for line in (DEMO / "instructions" / "general.jsonl").read_text().splitlines()
    ]
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    learner.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False),
    )
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    cls = PreTrainedTokenizerFast if legacy else LlamaTokenizerFast
    tokenizer = cls(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    return tokenizer


@pytest.fixture(scope="session", params=["llama", "legacy"])
def tiny_sp_llama_dir(request, tmp_path_factory) -> Path:
    """A random tiny Llama with a Llama-2-style SentencePiece tokenizer and no chat template (a base model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp(f"tiny-sp-{request.param}")
    tokenizer = make_sentencepiece_tokenizer(path, legacy=request.param == "legacy")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_llama_dir) -> Path:
    """A whole run made by ``hippo pipeline`` on a tiny model: every stage, eval, ablation, sweep, report.

    Tests that read a run (report, ablation reuse, record) read this one: made by the real code,
    never a hand-written copy of our own output formats.
    """
    from hippocrates.cli import main
    from test_stages_helpers import full_recipe

    recipe = full_recipe(tmp_path_factory.mktemp("tiny-run"), tiny_llama_dir)
    assert main(["pipeline", str(recipe), "--report-to", "none"]) == 0
    return recipe.parent / "out"
