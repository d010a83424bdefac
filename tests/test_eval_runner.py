"""``evaluate`` and ``hippo eval``: the results.json / samples contract, determinism, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hippocrates.cli import main
from hippocrates.eval.runner import evaluate

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "benchmarks"
TASK_KEYS = {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "ece", "brier", "skipped", "skipped_ids",
             "truncated", "data", "data_sha256", "time_s", "prompt", "shots"}  # fmt: skip
SAMPLE_KEYS = {"doc_id", "id", "prompt", "continuations", "loglikelihoods", "option_chars", "probs", "pred",
               "pred_norm", "gold", "correct", "correct_norm", "confidence"}  # fmt: skip


@pytest.fixture(scope="module")
def run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    results = evaluate(
        str(tiny_llama_dir), "medqa,pubmedqa,usmle_step3", data_dir=str(DEMO), num_fewshot=2, limit=4,
        batch_size=3, output_dir=out,
    )  # fmt: skip
    return results, out


def test_results_and_samples_follow_the_contract(run, tiny_llama_dir):
    results, out = run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    for key in (
        "model",
        "model_path",
        "prompt",
        "chat_template",
        "num_fewshot",
        "created",
        "hippocrates_version",
    ):
        assert key in results
    assert results["num_fewshot"] == 2 and results["prompt"] == "hippocrates"
    for name in ("medqa", "pubmedqa", "usmle_step3"):
        task = results["tasks"][name]
        assert TASK_KEYS <= set(task) and task["n"] == 4 and task["shots"] == 2
        rows = [json.loads(line) for line in (out / f"samples_{name}.jsonl").read_text().splitlines()]
        assert [r["doc_id"] for r in rows] == [0, 1, 2, 3]
        for r in rows:
            assert set(r) == SAMPLE_KEYS
            assert math.isclose(sum(r["probs"]), 1.0, rel_tol=1e-6) and r["confidence"] == max(r["probs"])
            assert r["option_chars"] == [len(c.lstrip(" ")) for c in r["continuations"]]
            assert r["pred"] == r["loglikelihoods"].index(max(r["loglikelihoods"]))
            assert r["correct"] == (r["pred"] == r["gold"])
        assert task["acc"] == sum(r["correct"] for r in rows) / 4
        assert task["acc_norm"] == sum(r["correct_norm"] for r in rows) / 4


def test_same_results_twice_and_across_batch_sizes(run, tiny_llama_dir, tmp_path):
    _, out = run
    again = evaluate(str(tiny_llama_dir), ["medqa"], data_dir=str(DEMO), num_fewshot=2, limit=4, batch_size=1,
                     output_dir=tmp_path, scorer="naive")  # fmt: skip
    first = [json.loads(x) for x in (out / "samples_medqa.jsonl").read_text().splitlines()]
    second = [json.loads(x) for x in (tmp_path / "samples_medqa.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in first] == [r["prompt"] for r in second]
    for a, b in zip(first, second, strict=True):
        assert max(abs(x - y) for x, y in zip(a["loglikelihoods"], b["loglikelihoods"], strict=True)) <= 1e-4
        assert a["pred"] == b["pred"]
    assert again["tasks"]["medqa"]["acc"] == run[0]["tasks"]["medqa"]["acc"]


def test_cli_prints_table_and_counts_skipped_and_truncated(tiny_llama_dir, tmp_path, capsys):
    rows = [json.loads(x) for x in (DEMO / "medqa" / "US_4_options_test.jsonl").read_text().splitlines()[:4]]
    rows[1]["answer_idx"] = "E"  # answer not among the options
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["eval", "--model", str(tiny_llama_dir), "--tasks", "medqa", "--data", f"medqa={tmp_path / 'test.jsonl'}",
                 "--output", str(tmp_path / "out"), "--max-length", "40"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0 and "medqa" in captured.out and "acc_norm" in captured.out
    assert "skipped 1 unusable record(s): medqa-2" in captured.err and "left-truncated" in captured.err
    task = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]["medqa"]
    assert (task["n"], task["skipped"], task["skipped_ids"], task["truncated"]) == (3, 1, ["medqa-2"], 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "nope"], "unknown task 'nope'"),
        (["--tasks", "medqa", "--data", "medqa=/no/such.jsonl"], "/no/such.jsonl: file not found"),
        (
            ["--tasks", "medqa", "--data-dir", str(DEMO), "--num-fewshot", "13"],
            "larger than its few-shot pool (12",
        ),
        (["--tasks", "medqa", "--data", "pubmedqa=x"], "names task 'pubmedqa', which is not in --tasks"),
        (["--tasks", "medqa", "--data", "medqa"], "expects TASK=PATH"),
        (["--sweep", "--tasks", "medqa"], "--sweep needs --output DIR"),
        (["--sweep", "--output", "x", "--prompts", "hippocrates,fancy"], "unknown prompt 'fancy'"),
        (["--sweep", "--output", "x", "--chat-options", "maybe"], "--chat-options expects off, on"),
        (["--sweep", "--output", "x", "--shots", "0,-1"], "--shots expects integers >= 0"),
        (["--sweep", "--output", "x", "--shots", "zero"], "--shots expects comma-separated integers"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, capsys):
    assert main(["eval", "--model", "/no/model/needed", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_malformed_row_names_file_and_line(tmp_path, capsys):
    (tmp_path / "dev.jsonl").write_text(
        (DEMO / "medmcqa" / "dev.jsonl").read_text().splitlines()[0] + "\n{oops\n"
    )
    assert main(["eval", "--tasks", "medmcqa", "--data", f"medmcqa={tmp_path / 'dev.jsonl'}"]) == 2
    assert "dev.jsonl:2: malformed JSON" in capsys.readouterr().err


def test_list_tasks(capsys):
    assert main(["eval", "--list-tasks"]) == 0
    out = capsys.readouterr().out
    assert all(
        t in out for t in ("medqa", "medmcqa", "pubmedqa", "usmle_step1", "usmle_step2", "usmle_step3", "mc")
    )


def test_cli_export_lm_eval(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "lm"
    args = ["eval", "--model", str(tiny_llama_dir), "--tasks", "medqa,usmle_step1", "--data-dir", str(DEMO),
            "--num-fewshot", "3", "--prompt", "letter", "--chat-template", "--export-lm-eval", str(out)]  # fmt: skip
    assert main(args) == 0
    yaml_text = (out / "hippo_medqa.yaml").read_text()
    assert (
        "num_fewshot: 3" in yaml_text
        and 'prompt: "letter"' in yaml_text
        and "fewshot_split: fewshot" in yaml_text
    )
    assert "fewshot_split: test" in (out / "hippo_usmle_step1.yaml").read_text()  # pool = the other items
    readme = (out / "README.md").read_text()
    assert "--apply_chat_template" in readme and "--tasks hippo_medqa,hippo_usmle_step1" in readme


def test_cli_sweep_writes_one_row_per_combination(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["eval", "--sweep", "--model", str(tiny_llama_dir), "--tasks", "medqa,usmle_step1",
                 "--data-dir", str(DEMO), "--limit", "3", "--prompts", "hippocrates,letter",
                 "--chat-options", "off", "--shots", "0,1", "--output", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err[-2000:]
    sweep = json.loads((out / "sweep.json").read_text())
    combos = [(r["prompt"], r["chat_template"], r["num_fewshot"]) for r in sweep["rows"]]
    assert combos == [
        ("hippocrates", False, 0),
        ("hippocrates", False, 1),
        ("letter", False, 0),
        ("letter", False, 1),
    ]
    for row in sweep["rows"]:
        results = json.loads(Path(row["results"]).read_text())
        assert (results["prompt"], results["num_fewshot"]) == (row["prompt"], row["num_fewshot"])
        assert row["acc"]["medqa"] == results["tasks"]["medqa"]["acc"] and row["n"]["usmle_step1"] == 3
    letter_prompt = json.loads(
        (out / "letter-plain" / "1shot" / "samples_medqa.jsonl").read_text().splitlines()[0]
    )
    assert "\nA. " in letter_prompt["prompt"]
    printed = capsys.readouterr().out
    assert "| letter | no | 1 |" in printed and "(4 combinations)" in printed


def test_auto_precision_is_recorded_as_the_dtype_used(tiny_llama_dir, tmp_path):
    """--precision auto runs in fp32 on a CPU; results.json and the run record say fp32, not auto,
    so a CPU run and a GPU run are not taken for the same inputs."""
    import torch

    from hippocrates.record import read_manifest

    out = tmp_path / "auto"
    assert main(["eval", "--model", str(tiny_llama_dir), "--tasks", "medqa", "--data-dir", str(DEMO),
                 "--limit", "2", "--precision", "auto", "--output", str(out)]) == 0  # fmt: skip
    used = "bf16" if torch.cuda.is_available() else "fp32"
    assert json.loads((out / "results.json").read_text())["precision"] == used
    assert read_manifest(out).precision == used
