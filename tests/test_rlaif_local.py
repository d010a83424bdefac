"""Local mechanics with the tiny random Llama: seeded batched sampling, the prefix-cached local
judge, and ``hippo annotate`` end to end (files, counts, reproducible candidates)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from hippocrates.cli import main
from hippocrates.data.io import read_json, read_jsonl
from hippocrates.rlaif.judges import JudgeItem, load_rubric
from hippocrates.rlaif.local_judge import LocalJudge
from hippocrates.rlaif.sampling import RowSpec, _draw, generate

DEMO_PROMPTS = (
    Path(__file__).resolve().parents[1] / "data" / "demo" / "preferences" / "patient_questions.jsonl"
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: on a shared 2-core machine two OpenMP threads stall each other (4-6x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path):
    from hippocrates.models import load_model, load_tokenizer

    return load_model(str(tiny_llama_dir)), load_tokenizer(str(tiny_llama_dir))


def test_rows_are_reproducible_whatever_the_batch(tiny):
    model, tok = tiny
    prompts = ["What is a normal heart rate?", "Can I take ibuprofen with paracetamol for a headache?"]
    specs = [RowSpec(seed=7, temperature=1.0, top_p=0.9, max_new_tokens=4), RowSpec(seed=8, max_new_tokens=4)]
    both = generate(model, tok, prompts, specs)
    swapped = generate(model, tok, prompts[::-1], specs[::-1])
    alone = generate(model, tok, prompts[:1], specs[:1])
    assert [g.text for g in both] == [g.text for g in swapped[::-1]]
    assert both[0].text == alone[0].text and both[0].n_tokens == 4 and both[0].finish_reason == "length"
    reseeded = generate(model, tok, prompts[:1], [RowSpec(seed=9, temperature=1.0, max_new_tokens=4)])
    assert reseeded[0].text != both[0].text


def test_temperature_zero_is_greedy(tiny):
    import torch

    model, tok = tiny
    ours = generate(model, tok, ["Hello doctor"], [RowSpec(seed=1, temperature=0.0, max_new_tokens=5)])[0]
    ids = tok("Hello doctor", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ref = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert ours.text == tok.decode(ref[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_nucleus_keeps_only_the_top_mass():
    import torch

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    gen = torch.Generator().manual_seed(0)
    draws = {_draw(probs, 0.7, gen) for _ in range(200)}
    assert draws == {0, 1}
    assert {_draw(probs, 0.4, gen) for _ in range(20)} == {0}


def test_prefix_cached_judge_matches_full_forward(tiny):
    import torch

    model, tok = tiny
    judge = LocalJudge(model, tok, rubric=load_rubric(), batch_size=2, calibrate="none")
    items = [
        JudgeItem("Is a fever of 39 dangerous?", "See a doctor if it lasts.", "No."),
        JudgeItem(
            "Is a fever of 39 dangerous?", "No.", "See a doctor if it lasts, or now if a rash appears."
        ),
        JudgeItem("How do I treat a minor burn?", "Cool it under running water for 20 minutes.", "Butter."),
    ]
    cached = judge.log_probs(items, show_progress=False)
    assert judge.stats["prefix_tokens"] > 100  # the rubric is shared and computed once
    with torch.no_grad():
        for item, (lp_a, lp_b) in zip(items, cached, strict=True):
            ids = torch.tensor([judge._encode([item])[0]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1)
            assert lp_a == pytest.approx(float(logp[judge.token_a]), abs=1e-4)
            assert lp_b == pytest.approx(float(logp[judge.token_b]), abs=1e-4)


def test_mean_calibration_removes_position_bias(tiny):
    model, tok = tiny
    judge = LocalJudge(model, tok, rubric=load_rubric(), batch_size=4, calibrate="mean", tie_threshold=0.0)
    items = [JudgeItem("q?", "first answer", "second answer")]  # its mirror is scored too
    (verdict,) = judge.judge_pairs(items)
    (mirror,) = judge.judge_pairs([JudgeItem("q?", "second answer", "first answer")])
    assert verdict.scores["margin"] == pytest.approx(-mirror.scores["margin"], abs=1e-4)
    assert {verdict.verdict, mirror.verdict} == {"A", "B"}


def write_recipe(tmp_path: Path, model: Path, **annotate) -> Path:
    settings = {
        "prompts": str(DEMO_PROMPTS),
        "max_prompts": 6,
        "n_candidates": 2,
        "max_new_tokens": 8,
        "top_p": 1.0,
        "batch_size": 4,
        "judge": {"backend": "local", "model": str(model), "tie_threshold": 0.0},
        **annotate,
    }
    recipe = {
        "name": "rlaif-test",
        "base_model": str(model),
        "output_dir": str(tmp_path / "run"),
        "seed": 3,
        "precision": "fp32",
        "stages": {"annotate": settings},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def agreement_rows(tmp_path: Path) -> int:
    return len(read_jsonl(tmp_path / "human.jsonl"))


def test_hippo_annotate_end_to_end(tmp_path: Path, tiny_llama_dir: Path, capsys):
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    demo_labels = Path(__file__).resolve().parents[1] / "data" / "demo" / "preferences" / "human_labels.jsonl"
    human = tmp_path / "human.jsonl"
    human.write_text("".join(demo_labels.read_text().splitlines(keepends=True)[:6]))
    assert main(["annotate", str(recipe), "--agreement", str(human)]) == 0
    assert "preference pairs" in capsys.readouterr().out
    out = tmp_path / "run" / "annotate"
    metrics, manifest = read_json(out / "metrics.json"), read_json(out / "manifest.json")
    prefs, aside = read_jsonl(out / "preferences.jsonl"), read_jsonl(out / "set_aside.jsonl")
    candidates = read_jsonl(out / "candidates.jsonl")
    assert len(candidates) == 6 and all(len(c["candidates"]) == 2 for c in candidates)
    assert (
        candidates[0]["settings"]["template"] == "chat" and candidates[0]["settings"]["max_new_tokens"] == 8
    )
    assert metrics["pairs"] == 6 and len(prefs) + len(aside) == 6
    assert metrics["preference_pairs"] == len(prefs) > 0
    assert 0.0 <= metrics["consistency_rate"] <= 1.0  # on the raw verdicts
    assert metrics["corrected_consistency_rate"] is not None and metrics["calibrate"] == "question"
    assert set(metrics["judge_stats"]) == {"annotate", "agreement"}
    assert metrics["judge_stats"]["agreement"]["items"] == 2 * agreement_rows(tmp_path)
    assert metrics["ties"] + metrics["inconsistent"] + metrics["failed"] + metrics["identical_pairs"] == len(
        aside
    )
    for p in prefs:
        assert {"prompt", "chosen", "rejected", "reason", "judge", "rubric_version", "verdicts"} <= set(p)
        assert p["chosen"] != p["rejected"] and p["rubric_version"] == "1.0"
        orders = p["verdicts"]
        assert {orders["first_shown_first"]["verdict"], orders["second_shown_first"]["verdict"]} == {"A", "B"}
        assert (
            orders["first_shown_first"]["source"] == "logprobs"
            and "raw_verdict" in orders["first_shown_first"]
        )
    agreement = metrics["agreement"]
    assert (
        agreement["pairs"] == len(read_jsonl(human))
        and agreement["n"] + agreement["failed"] == agreement["pairs"]
    )
    assert (out / "agreement.jsonl").is_file()
    assert manifest["stage"] == "annotate" and manifest["extra"]["rubric"]["version"] == "1.0"
    assert manifest["data"][0]["sha256"] and manifest["inputs_hash"]
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".annotate")]  # no temp dirs left

    # a rerun with more prompts and another batch size draws the same candidates for the same questions
    recipe2 = write_recipe(tmp_path, tiny_llama_dir, max_prompts=7, batch_size=3)
    assert main(["annotate", str(recipe2), "--output", str(tmp_path / "again")]) == 0
    again = read_jsonl(tmp_path / "again" / "candidates.jsonl")
    assert [c["candidates"] for c in again[:6]] == [c["candidates"] for c in candidates]


def test_annotate_bad_input_is_one_line(tmp_path: Path, tiny_llama_dir: Path, capsys):
    recipe = write_recipe(tmp_path, tiny_llama_dir, prompts=str(tmp_path / "missing.jsonl"))
    assert main(["annotate", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.jsonl: file not found" in err and "\n" not in err
    assert main(["annotate", str(recipe), "--agreement", str(tmp_path / "nope.jsonl")]) == 2


def test_embedded_judge_produces_preference_pairs(tmp_path: Path, embedded_model_dir: Path):
    """The demo setup in small: the embedded model writes the candidates and judges them."""
    recipe = write_recipe(
        tmp_path,
        embedded_model_dir,
        max_prompts=3,
        n_candidates=2,
        max_new_tokens=10,
        top_p=0.95,
        temperature=1.0,
        judge={"backend": "local", "model": "smollm2-135m"},
    )
    assert main(["annotate", str(recipe)]) == 0
    out = tmp_path / "run" / "annotate"
    metrics, prefs = read_json(out / "metrics.json"), read_jsonl(out / "preferences.jsonl")
    assert metrics["pairs"] == 3 and metrics["failed"] == 0 and metrics["inconsistent"] == 0
    assert len(prefs) >= 1, metrics
    assert all(p["judge"] == "local:smollm2-135m" for p in prefs)
    assert metrics["judge_stats"]["annotate"]["prefix_tokens"] > 300  # chat template + rubric computed once


def fake_scores(table: dict[tuple[str, str], float]):
    """A log_probs stand-in: margin log P(A) - log P(B) looked up by (question, first response)."""

    def log_probs(items, show_progress=True):
        return [(table[(i.prompt, i.response_a)], 0.0) for i in items]

    return log_probs


@pytest.mark.parametrize(
    "calibrate, expected",
    [
        ("none", ["inconsistent", "inconsistent"]),  # always "A": pure position bias
        ("mean", ["A", "inconsistent"]),  # one bias (1.5) for all: q2's own bias of 2.0 remains
        ("question", ["A", "B"]),  # per-question bias removed: the content signal decides
    ],
)
def test_calibration_modes(tiny, calibrate: str, expected: list[str]):
    from hippocrates.rlaif.judges import combine_orders

    model, tok = tiny
    judge = LocalJudge(model, tok, rubric=load_rubric(), calibrate=calibrate, tie_threshold=0.0)
    # q1: bias 1.0, x better by 0.8 per order; q2: bias 2.0, v better by 0.1 per order
    table = {("q1", "x"): 1.8, ("q1", "y"): 0.2, ("q2", "u"): 1.9, ("q2", "v"): 2.1}
    judge.log_probs = fake_scores(table)
    items = [
        JudgeItem("q1", "x", "y"),
        JudgeItem("q1", "y", "x"),
        JudgeItem("q2", "u", "v"),
        JudgeItem("q2", "v", "u"),
    ]
    v = judge.judge_pairs(items)
    assert [combine_orders(v[0], v[1]), combine_orders(v[2], v[3])] == expected


def test_bad_judge_settings_fail_before_sampling(tmp_path: Path, tiny_llama_dir: Path, capsys, monkeypatch):
    monkeypatch.delenv("HIPPO_NOPE_KEY", raising=False)
    judge = {
        "backend": "http",
        "base_url": "http://127.0.0.1:9/v1",
        "model": "m",
        "api_key_env": "HIPPO_NOPE_KEY",
    }
    assert main(["annotate", str(write_recipe(tmp_path, tiny_llama_dir, judge=judge))]) == 2
    assert "HIPPO_NOPE_KEY is not set" in capsys.readouterr().err
    judge = {"backend": "local", "model": str(tmp_path / "no-such-model")}
    assert main(["annotate", str(write_recipe(tmp_path, tiny_llama_dir, judge=judge))]) == 2
    assert "no such model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
