"""The response-only loss goes through the model's own forward, so architectures that change their
logits after the LM head (Gemma-2's final-logit softcapping, Granite's ``logits_scaling``, Cohere's
``logit_scale``) train on the loss they define. Checked against each model's own ``labels=`` loss."""

from __future__ import annotations

import pytest
import torch

from hippocrates.chat import IGNORE
from hippocrates.stages.modeling import PackedCollator, labelled_nll
from hippocrates.stages.packing import make_rows

VOCAB = 300


def _model(kind: str):
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
    )

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    if kind == "gemma2":
        config = Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0, attn_logit_softcapping=50.0,
                              query_pre_attn_scalar=8, sliding_window=128)  # fmt: skip
        cls = Gemma2ForCausalLM
    elif kind == "granite":
        config, cls = GraniteConfig(**common, logits_scaling=4.0), GraniteForCausalLM
    else:
        config, cls = CohereConfig(**common, logit_scale=0.25), CohereForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # make the post-head transform matter: large logits
        model.get_output_embeddings().weight.mul_(40.0)
    return model


def _samples(n_samples: int = 3) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for n in (12, 9, 15)[:n_samples]:
        ids = torch.randint(3, VOCAB, (n,), generator=gen).tolist()
        labels = [IGNORE] * (n // 2) + ids[n // 2 :]  # the first half is the "prompt"
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.mark.parametrize("kind", ["gemma2", "granite", "cohere"])
def test_loss_equals_the_models_own_loss_unpacked_and_packed(kind):
    model = _model(kind)
    samples = _samples()
    with torch.no_grad():
        for sample in samples:  # unpacked: one sample per row
            batch = PackedCollator(0)([sample])
            ours, count = labelled_nll(model, batch)
            theirs = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            assert abs(float(ours / count) - float(theirs)) < 1e-5, kind
        rows = make_rows(samples, capacity=64, packing=True)  # packed: one row, positions restart
        batch = PackedCollator(0)(rows)
        assert batch["input_ids"].shape[0] == 1
        ours, count = labelled_nll(model, batch)
        theirs = model(**batch, use_cache=False).loss  # no cache: packed samples stay apart
        assert abs(float(ours / count) - float(theirs)) < 1e-5, kind


def test_the_head_transform_is_not_skipped():
    """The check above would pass trivially if the transform did nothing: it changes the loss here."""
    model = _model("gemma2")
    batch = PackedCollator(0)(_samples(1))
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state
        raw = model.lm_head(hidden)[0, :-1]
        targets = batch["labels"][0, 1:]
        keep = targets != IGNORE
        bare = torch.nn.functional.cross_entropy(raw[keep], targets[keep])
        ours, count = labelled_nll(model, batch)
    assert abs(float(bare) - float(ours / count)) > 0.1
