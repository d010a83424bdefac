"""Generative evaluation: a scripted model against a hand-computed expectation, the batched decoder
against one ``model.generate`` per item, self-consistency, the run record, the sweep's generative
rows, the report, and bad input (one line, exit 2)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from hippocrates import chat
from hippocrates.cli import main
from hippocrates.data.benchmarks import Item
from hippocrates.eval.extract import ANSWER_INSTRUCTION, Extraction, answer_line, ask
from hippocrates.eval.generate import Sample, conversation, generate_hf, stop_ids, vote
from hippocrates.eval.runner import LoadedModel, evaluate, load_tasks, options_step

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "benchmarks"
TASK_KEYS = {"acc", "acc_stderr", "n", "unparsed", "unparsed_rate", "unparsed_ids", "mean_generated_tokens",
             "truncated", "truncated_ids", "skipped", "skipped_ids", "duplicates", "data", "data_sha256",
             "time_s", "shots"}  # fmt: skip
ROW_KEYS = {"doc_id", "id", "prompt", "options", "shot_ids", "response", "generated_tokens", "finish_reason",
            "logprob", "extraction", "pred", "pred_label", "gold", "gold_label", "correct"}  # fmt: skip


# ---------------------------------------------------------------- a model that says what it is told


class ScriptCache:
    """Per row: the tokens still to say. Rows leave the batch through ``reorder_cache`` as in a real cache."""

    def __init__(self, rows: list[list[int]]) -> None:
        self.rows = rows

    def reorder_cache(self, index) -> None:
        self.rows = [self.rows[int(i)] for i in index]


class ScriptedLM:
    """Answers each question with a fixed response (found by its question text in the prompt), one
    token per step, then the end-of-sequence token: its outputs are known before it runs."""

    def __init__(self, tokenizer, script: dict[str, str]) -> None:
        import torch

        self.tokenizer, self.script = tokenizer, script
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=4096)
        self.generation_config = SimpleNamespace(eos_token_id=tokenizer.eos_token_id)
        self.prompts: list[str] = []

    def parameters(self):
        yield self.weight

    def _say(self, rows: list[list[int]]):
        import torch

        logits = torch.zeros((len(rows), 1, len(self.tokenizer)))
        for b, row in enumerate(rows):
            logits[b, 0, row.pop(0) if row else self.tokenizer.eos_token_id] = 100.0
        return logits

    def forward(self, input_ids, attention_mask, position_ids, cache=None, use_cache=True, logits_to_keep=0):
        if cache is None:  # prefill: find each prompt's question
            rows = []
            for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
                text = self.tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
                self.prompts.append(text)
                (response,) = [r for q, r in self.script.items() if q in text.rsplit("Question: ", 1)[-1]]
                rows.append(self.tokenizer.encode(response, add_special_tokens=False))
            cache = ScriptCache(rows)
        return SimpleNamespace(logits=self._say(cache.rows), cache=cache)

    __call__ = forward


@pytest.fixture(scope="module")
def medqa_items():
    return load_tasks("medqa", data_dir=str(DEMO))[0].items


def test_scripted_answers_give_the_hand_computed_metrics(tiny_llama_dir, medqa_items, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    a, b, c, d, e = medqa_items[:5]
    wrong = "ABCD"[(b.gold + 1) % 4]
    script = {
        a.question: f"Thinking it through.\nAnswer: {'ABCD'[a.gold]}",  # right, by the answer line
        b.question: wrong,  # wrong, a lone letter
        c.question: "I am not sure.",  # unparsed
        d.question: "word " * 30 + f"Answer: {'ABCD'[d.gold]}",  # cut by the budget before its answer
        e.question: f"It is {e.options[e.gold]}.",  # right, by the option text
    }
    lm = LoadedModel("scripted", str(tiny_llama_dir), ScriptedLM(tok, script), tok, "fp32")
    results = evaluate(lm, "medqa", data_dir=str(DEMO), limit=5, mode="generate", max_new_tokens=20,
                       batch_size=2, output_dir=tmp_path)  # fmt: skip
    task = results["tasks"]["medqa"]
    tokens = [len(tok.encode(script[i.question], add_special_tokens=False)) for i in (a, b, c, e)]
    assert (task["n"], task["acc"], task["unparsed"], task["unparsed_ids"]) == (5, 2 / 5, 2, [c.id, d.id])
    assert (task["truncated"], task["truncated_ids"], task["unparsed_rate"]) == (1, [d.id], 2 / 5)
    assert task["mean_generated_tokens"] == pytest.approx((sum(tokens) + 20) / 5)
    assert task["acc_stderr"] == pytest.approx(math.sqrt(0.3 / 5))  # sample std of [1, 0, 0, 0, 1] / sqrt(5)
    assert TASK_KEYS <= set(task) and "acc_norm" not in task and "ece" not in task
    rows = [json.loads(x) for x in (tmp_path / "samples_medqa.jsonl").read_text().splitlines()]
    assert [set(r) for r in rows] == [ROW_KEYS] * 5
    assert [(r["id"], r["pred"], r["correct"]) for r in rows] == [
        (a.id, a.gold, True), (b.id, (b.gold + 1) % 4, False), (c.id, None, False), (d.id, None, False),
        (e.id, e.gold, True),
    ]  # fmt: skip
    assert [r["extraction"]["rule"] for r in rows] == [
        "answer-line",
        "lone-letter",
        None,
        None,
        "option-text",
    ]
    assert rows[2]["extraction"]["reason"] == "no answer line, letter or option text found"
    assert rows[3]["finish_reason"] == "length" and rows[0]["finish_reason"] == "stop"
    assert rows[0]["response"] == script[a.question] and rows[0]["gold_label"] == "ABCD"[a.gold]
    # the prompt: the one question, in the chat template, ending where the model answers
    assert rows[0]["prompt"] == chat.render(tok, chat.user(ask(a)), "chat")
    assert rows[0]["prompt"].endswith("<|im_start|>assistant\n") and ANSWER_INSTRUCTION in rows[0]["prompt"]
    assert (
        results["mode"] == "generate" and results["template"] == "chat" and results["chat_template"] is True
    )
    assert (results["samples"], results["temperature"], results["max_new_tokens"]) == (1, 0.0, 20)

    from hippocrates.analyses.stats import load_outcomes

    assert load_outcomes(tmp_path) == {"medqa": {r["id"]: r["correct"] for r in rows}}


def test_few_shot_exemplars_are_answered_with_the_answer_line_only(tiny_llama_dir, medqa_items, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    item = medqa_items[0]
    lm = LoadedModel(
        "scripted", str(tiny_llama_dir), ScriptedLM(tok, {item.question: "Answer: A"}), tok, "fp32"
    )
    evaluate(lm, "medqa", data_dir=str(DEMO), limit=1, num_fewshot=2, mode="generate", max_new_tokens=8,
             chat_template=False, output_dir=tmp_path)  # fmt: skip
    (row,) = [json.loads(x) for x in (tmp_path / "samples_medqa.jsonl").read_text().splitlines()]
    pool = {p.id: p for p in load_tasks("medqa", data_dir=str(DEMO), num_fewshot=2)[0].pool}
    shots = [pool[i] for i in row["shot_ids"]]
    assert len(shots) == 2 and item.id not in row["shot_ids"]
    assert conversation(item, shots) == [
        {"role": "user", "content": ask(shots[0])}, {"role": "assistant", "content": answer_line(shots[0])},
        {"role": "user", "content": ask(shots[1])}, {"role": "assistant", "content": answer_line(shots[1])},
        {"role": "user", "content": ask(item)},
    ]  # fmt: skip
    assert row["prompt"] == chat.render(tok, conversation(item, shots), "alpaca")  # chat_template=False
    assert row["prompt"].startswith(chat.ALPACA_PREAMBLE) and row["prompt"].endswith("### Response:\n")


# ---------------------------------------------------------------- the batched decoder on a real model


@pytest.fixture(scope="module")
def chatty_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama with untied, larger random weights: its greedy text varies with the prompt
    (the tied tiny model repeats the prompt's last token)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("chatty-llama")
    config = LlamaConfig.from_pretrained(tiny_llama_dir)
    config.tie_word_embeddings, config.initializer_range = False, 0.3
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(path)
    return path


def _varied_stops(model, tokenizer, rows: list[list[int]], config) -> None:
    """Make the random model's rows end at different steps: a token each row says at step 2..8 becomes
    an end-of-sequence token, so rows leave the batch and waiting rows join it mid-way."""
    import torch

    ends = set()
    for i, row in enumerate(rows):
        with torch.inference_mode():
            said = model.generate(torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                                  generation_config=config)[0, len(row) :].tolist()  # fmt: skip
        ends.add(said[1 + i % 7])
    model.generation_config.eos_token_id = sorted(ends | {tokenizer.eos_token_id})


def test_batched_generation_equals_generate_per_item(chatty_llama_dir, medqa_items):
    import torch
    from transformers import GenerationConfig

    lm = LoadedModel.load(str(chatty_llama_dir))
    fmt = chat.choose_format(lm.tokenizer)
    rows = [lm.tokenizer(chat.render(lm.tokenizer, conversation(i, []), fmt), add_special_tokens=False)["input_ids"]
            for i in medqa_items[:7]]  # fmt: skip
    free = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    _varied_stops(lm.model, lm.tokenizer, rows, free)
    stop = stop_ids(lm.model, lm.tokenizer)
    ours = generate_hf(lm.model, lm.tokenizer, rows, [0] * len(rows), max_new_tokens=12, batch_size=3)
    assert len({s.tokens for s in ours}) > 2  # rows did finish at different steps
    config = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=sorted(stop),
                              pad_token_id=lm.tokenizer.pad_token_id)  # fmt: skip
    for row, sample in zip(rows, ours, strict=True):
        with torch.inference_mode():
            out = lm.model.generate(torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                                    generation_config=config, output_logits=True, return_dict_in_generate=True)  # fmt: skip
        new = out.sequences[0, len(row) :].tolist()
        logprob = sum(
            float(torch.log_softmax(lg[0].float(), -1)[t]) for lg, t in zip(out.logits, new, strict=True)
        )
        kept = new[:-1] if new[-1] in stop else new
        assert sample.text == lm.tokenizer.decode(kept, skip_special_tokens=True).strip()
        assert sample.tokens == len(kept) and sample.finish == ("stop" if new[-1] in stop else "length")
        assert sample.logprob == pytest.approx(logprob, abs=1e-3)


def test_sampling_is_seeded_per_sample_whatever_the_batch(tiny_llama_dir, tmp_path):
    runs = []
    for batch in (1, 4):
        out = tmp_path / f"b{batch}"
        evaluate(str(tiny_llama_dir), "pubmedqa", data_dir=str(DEMO), limit=3, mode="generate", samples=3,
                 temperature=1.0, max_new_tokens=6, batch_size=batch, output_dir=out)  # fmt: skip
        runs.append([json.loads(x) for x in (out / "samples_pubmedqa.jsonl").read_text().splitlines()])
    assert [[s["response"] for s in r["samples"]] for r in runs[0]] == [
        [s["response"] for s in r["samples"]] for r in runs[1]
    ]
    for row in runs[0]:
        assert len(row["samples"]) == 3 and len({s["response"] for s in row["samples"]}) > 1
        parsed = [s["extraction"]["index"] for s in row["samples"] if s["extraction"]["index"] is not None]
        assert sum(row["votes"].values()) == len(parsed)
        assert row["correct"] == (row["pred"] == row["gold"])


def test_the_vote_and_its_tie_break():
    item = Item("q1", "Which?", ["w", "x", "y", "z"], 2)

    def sample(logprob: float) -> Sample:
        return Sample("...", 3, "stop", logprob)

    found = [Extraction(1, "answer-line"), Extraction(2, "answer-line"), Extraction(None, None, "no"),
             Extraction(2, "lone-letter"), Extraction(1, "answer-line")]  # fmt: skip
    logprobs = [-9.0, -7.5, -1.0, -8.0, -7.0]  # B's best sample (-7.0) beats C's (-7.5)
    pred, chosen, info = vote(item, [sample(x) for x in logprobs], found)
    assert (pred, chosen) == (1, 4) and info["votes"] == {"B": 2, "C": 2}
    assert info["tie_break"] == {"tied": ["B", "C"], "best_logprob": {"B": -7.0, "C": -7.5}, "chosen": "B"}
    pred, chosen, info = vote(item, [sample(x) for x in logprobs[:4]], found[:4])  # C has the majority
    assert (pred, chosen, info["tie_break"]) == (2, 1, None)
    pred, chosen, info = vote(item, [sample(-3.0), sample(-2.0)], [Extraction(None, None, "")] * 2)
    assert (pred, chosen, info["votes"]) == (None, 1, {})  # unparsed; the likeliest sample is shown


# ---------------------------------------------------------------- the run record, the sweep, the report


def test_the_run_record_holds_the_mode_and_every_generation_option(tiny_llama_dir):
    from hippocrates.eval.registry import resolve_tasks

    specs = resolve_tasks(["medqa"])
    base = {"data": {"medqa": str(DEMO / "medqa" / "US_4_options_test.jsonl")}, "limit": 2}
    loglik = options_step(str(tiny_llama_dir), specs, base)
    assert set(loglik.config) == {"tasks", "task_specs", "num_fewshot", "prompt", "chat_template", "limit",
                                  "protocol", "scorer", "fewshot_seed", "max_length"}  # fmt: skip
    generate = options_step(str(tiny_llama_dir), specs, {**base, "mode": "generate"})
    assert generate.config["mode"] == "generate" and generate.inputs_hash != loglik.inputs_hash
    changed = {
        "max_new_tokens": 64,
        "samples": 3,
        "temperature": 0.5,
        "backend": "vllm",
        "chat_template": False,
    }
    hashes = {options_step(str(tiny_llama_dir), specs, {**base, "mode": "generate", k: v}).inputs_hash
              for k, v in changed.items()}  # fmt: skip
    assert len(hashes) == len(changed) and generate.inputs_hash not in hashes
    # the loglik prompt strategy is no input of a generative evaluation
    same = options_step(str(tiny_llama_dir), specs, {**base, "mode": "generate", "prompt": "letter"})
    assert same.inputs_hash == generate.inputs_hash


def test_a_recipe_evaluates_generatively(tmp_path):
    from hippocrates.config import parse_recipe
    from hippocrates.eval.runner import recipe_eval_options

    text = (f"name: t\nbase_model: {DEMO}\noutput_dir: o\neval:\n  mode: generate\n  max_new_tokens: 64\n"
            "  samples: 3\n  temperature: 0.7\n  tasks: [medqa]\n")  # fmt: skip
    recipe = parse_recipe(text)
    options = recipe_eval_options(recipe, 0, 5)
    assert {k: options[k] for k in ("mode", "max_new_tokens", "samples", "temperature", "backend")} == {
        "mode": "generate", "max_new_tokens": 64, "samples": 3, "temperature": 0.7, "backend": "hf"
    }  # fmt: skip
    assert options["chat_template"] is None  # generate: the model's template when it has one
    assert parse_recipe(text.replace("  samples: 3\n  temperature: 0.7\n", "")).eval.samples == 1


def test_sweep_rows_by_mode_and_budget(tiny_llama_dir, tmp_path):
    from hippocrates.analyses.stats import load_outcomes
    from hippocrates.analyses.sweep import run_sweep

    data = {"medqa": str(DEMO / "medqa" / "US_4_options_test.jsonl")}

    def sweep(budgets):
        return run_sweep(str(tiny_llama_dir), ["medqa"], data, ["letter"], [False], [0], tmp_path / "sweep",
                         limit=3, modes=["loglik", "generate"], budgets=budgets)  # fmt: skip

    first = sweep([4, 6])
    assert [r["name"] for r in first["rows"]] == [
        "letter-plain-0shot", "generate-4tok-plain-0shot", "generate-6tok-plain-0shot"
    ]  # fmt: skip
    gen = first["rows"][1]
    folder = tmp_path / "sweep" / "generate-4tok-plain" / "0shot"
    results = json.loads((folder / "results.json").read_text())
    assert (gen["mode"], gen["max_new_tokens"], gen["prompt"]) == ("generate", 4, None)
    assert gen["unparsed_rate"] == {"medqa": results["tasks"]["medqa"]["unparsed_rate"]}
    assert results["max_new_tokens"] == 4 and results["template"] == "alpaca"  # chat option off
    assert gen["comparison"]["b"] == "generate-4tok-plain-0shot"  # paired with the loglik baseline
    assert gen["comparison"]["tasks"]["medqa"]["accuracy_b"] == gen["acc"]["medqa"]
    assert (
        load_outcomes(folder)["medqa"].keys()
        == load_outcomes(tmp_path / "sweep" / "letter-plain" / "0shot")["medqa"].keys()
    )
    md = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| Mode | Prompt | Chat template | Shots | Budget | medqa | Average | Unparsed (%) |" in md
    rate = 100 * results["tasks"]["medqa"]["unparsed_rate"]
    assert (
        f"| generate | — | no | 0 | 4 | {100 * gen['acc']['medqa']:.1f} | {100 * gen['average']:.1f} | {rate:.1f} |"
        in md
    )
    assert "| loglik | letter | no | 0 | — |" in md
    again = sweep([4, 8])  # a new budget is evaluated, the others are reused
    assert again["evaluated"] == 1 and again["rows"][1] == {
        **first["rows"][1],
        "comparison": again["rows"][1]["comparison"],
    }


def test_the_report_shows_generative_accuracy_with_the_unparsed_rate(tiny_llama_dir, tmp_path):
    from hippocrates.report.build import build_report

    run = tmp_path / "run"
    evaluate(str(tiny_llama_dir), "medqa,pubmedqa", data_dir=str(DEMO), limit=3, mode="generate",
             max_new_tokens=4, output_dir=run / "eval" / "0shot")  # fmt: skip
    evaluate(str(tiny_llama_dir), "medqa", data_dir=str(DEMO), limit=3, output_dir=run / "eval" / "1shot",
             num_fewshot=1)  # fmt: skip
    build_report(run)
    md = (run / "report" / "report.md").read_text()
    results = json.loads((run / "eval" / "0shot" / "results.json").read_text())
    medqa = results["tasks"]["medqa"]
    assert "| Task | n | acc (%) | Unparsed | Unparsed (%) | Mean generated tokens | Hit budget |" in md
    assert f"| medqa | 3 | {100 * medqa['acc']:.1f} ± {100 * medqa['acc_stderr']:.1f} | {medqa['unparsed']} | " \
           f"{100 * medqa['unparsed_rate']:.1f} |" in md  # fmt: skip
    assert "generative: chat format, 1 sample(s) per item (greedy), up to 4 new tokens" in md
    assert "Not calibrated: final model (eval/0shot), generative evaluations" in md
    assert "| final model | 1 | medqa |" in md and "could not build" not in md  # the loglik run is calibrated


# ---------------------------------------------------------------- bad input


def _no_gold(tmp_path: Path) -> str:
    rows = [json.loads(x) for x in (DEMO / "medmcqa" / "dev.jsonl").read_text().splitlines()[:3]]
    for r in rows:
        del r["cop"]  # a test split without answers
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"medmcqa={tmp_path / 'test.jsonl'}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--samples", "0"], "--samples must be >= 1, got 0"),
        (["--samples", "5"], "--samples 5 needs --temperature > 0"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--backend", "vllm"], "--backend vllm: vllm is not installed"),
        (["--prompt", "letter"], "--prompt applies to --mode loglik"),
        (["--protocol", "v0.3"], "protocol v0.3 (the paper's harness) is log-likelihood only"),
        (["--export-lm-eval", "x"], "--export-lm-eval writes log-likelihood tasks"),
        (["--tasks", "nope"], "unknown task 'nope'"),
        (["--sweep", "--output", "x", "--modes", "loglik,sample"], "--modes expects loglik, generate"),
        (
            ["--sweep", "--output", "x", "--modes", "generate", "--budgets", "0"],
            "--budgets expects integers >= 1",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, capsys):
    assert main(["eval", "--model", "/no/model/needed", "--tasks", "medqa", "--mode", "generate", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_task_without_gold_answers_is_one_line(tmp_path, capsys):
    args = ["eval", "--mode", "generate", "--tasks", "medmcqa", "--data", _no_gold(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("test.jsonl: no usable items for task medmcqa") and "hippo eval: error" in err[-1]
    assert "skipped 3 unusable record(s)" in err[0]  # the reason, per record, before the error line


def test_a_budget_larger_than_the_window_and_a_missing_template(tiny_llama_dir, tiny_sp_llama_dir, capsys):
    code = main(["eval", "--model", str(tiny_llama_dir), "--tasks", "medqa", "--data-dir", str(DEMO),
                 "--mode", "generate", "--max-new-tokens", "64", "--max-length", "64", "--limit", "1"])  # fmt: skip
    assert (
        code == 2
        and "--max-new-tokens 64 leaves no room for the prompt in the model's 64-token window"
        in (capsys.readouterr().err)
    )
    code = main(["eval", "--model", str(tiny_sp_llama_dir), "--tasks", "medqa", "--data-dir", str(DEMO),
                 "--mode", "generate", "--chat-template", "--limit", "1"])  # fmt: skip
    assert code == 2 and "this model's tokenizer has no chat template" in capsys.readouterr().err


def test_a_base_model_is_asked_in_the_alpaca_format(tiny_sp_llama_dir, tmp_path, capsys):
    code = main(["eval", "--model", str(tiny_sp_llama_dir), "--tasks", "medqa", "--data-dir", str(DEMO), "--mode",
                 "generate", "--max-new-tokens", "3", "--limit", "2", "--output", str(tmp_path)])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "generate (alpaca format, 1 sample, greedy, up to 3 new tokens)" in out and "unparsed" in out
    row = json.loads((tmp_path / "samples_medqa.jsonl").read_text().splitlines()[0])
    assert row["prompt"].startswith(chat.ALPACA_PREAMBLE) and row["generated_tokens"] <= 3


def test_the_throughput_benchmark_runs(chatty_llama_dir, tmp_path, capsys):
    """benchmarks/generate_throughput.py in a tiny configuration, so that it cannot rot."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "generate_throughput.py"
    spec = importlib.util.spec_from_file_location("generate_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--model", str(chatty_llama_dir), "--data", str(DEMO / "medqa" / "US_4_options_test.jsonl"), "--n", "5",
            "--max-new-tokens", "6", "--batch-size", "2", "--chunk", "3", "--json", str(tmp_path / "out.json")]  # fmt: skip
    assert bench.main(args) == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["identical_outputs"] == "5/5" and report["max_abs_logprob_diff"] < 1e-3
    assert report["n"] == 5 and report["ratio_wall"] > 0 and 0 < report["ours_prefill_s"] <= report["ours_s"]
