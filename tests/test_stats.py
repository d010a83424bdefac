"""Paired comparisons: the bootstrap CI's coverage, McNemar and Holm against hand examples and scipy,
pairing by id, and ``hippo compare`` on evaluation folders made by the real ``evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest, bootstrap

from hippocrates.analyses.stats import (
    compare,
    compare_folders,
    compare_to_baseline,
    holm,
    load_outcomes,
    mcnemar_p,
    outcomes_from_rows,
    pair,
)
from hippocrates.cli import main
from hippocrates.errors import HippoError

# per task: items, P(both right), P(only A right), P(only B right), P(both wrong)
JOINT = {"small": (80, (0.45, 0.10, 0.20, 0.25)), "large": (200, (0.30, 0.15, 0.10, 0.45))}


def synthetic(rng: np.random.Generator, joint=JOINT) -> tuple[dict, dict]:
    """One paired experiment: A's and B's outcomes per task, drawn from known joint probabilities."""
    a, b = {}, {}
    for task, (n, p) in joint.items():
        kind = rng.choice(4, size=n, p=p)
        ids = [f"{task}-{i}" for i in range(n)]
        a[task] = dict(zip(ids, (kind <= 1).tolist(), strict=True))
        b[task] = dict(zip(ids, ((kind == 0) | (kind == 2)).tolist(), strict=True))
    return a, b


def outcomes(only_a: int, only_b: int, both: int = 3, neither: int = 2) -> tuple[dict, dict]:
    """One task whose items split into the four (A, B) outcome pairs with the given counts."""
    pairs = (
        [(True, False)] * only_a
        + [(False, True)] * only_b
        + [(True, True)] * both
        + [(False, False)] * neither
    )
    return (
        {"t": {f"q{i}": x for i, (x, _) in enumerate(pairs)}},
        {"t": {f"q{i}": y for i, (_, y) in enumerate(pairs)}},
    )


def test_bootstrap_ci_covers_the_true_difference() -> None:
    """1,000 synthetic paired experiments with a known difference per task (+10 and −5 points) and on
    the average: the nominal 95% interval must cover the truth in at least 93% of them. The
    simulation uses 2,000 resamples per interval instead of the default 10,000 to stay fast (the
    2.5% and 97.5% quantiles still rest on 50 resamples each)."""
    rng = np.random.default_rng(7)
    truth = {task: p[2] - p[1] for task, (_, p) in JOINT.items()}
    truth["Average"] = sum(truth.values()) / len(JOINT)
    covered = dict.fromkeys(truth, 0)
    for experiment in range(1000):
        a, b = synthetic(rng)
        result = compare(a, b, resamples=2000, seed=experiment)
        for key, row in [*result["tasks"].items(), ("Average", result["average"])]:
            covered[key] += row["ci_low"] <= truth[key] <= row["ci_high"]
    assert all(hits >= 930 for hits in covered.values()), covered


def test_bootstrap_agrees_with_scipy_paired_percentile_bootstrap() -> None:
    rng = np.random.default_rng(3)
    a, b = synthetic(rng, {"t": (300, (0.4, 0.1, 0.15, 0.35))})
    row = compare(a, b)["tasks"]["t"]
    x, y = (np.array(list(d["t"].values()), dtype=float) for d in (a, b))
    ref = bootstrap((x, y), lambda x, y, axis: y.mean(axis) - x.mean(axis), paired=True, vectorized=True,
                    method="percentile", n_resamples=10_000, rng=0).confidence_interval  # fmt: skip
    assert row["difference"] == pytest.approx(y.mean() - x.mean())
    assert row["ci_low"] == pytest.approx(ref.low, abs=0.01)
    assert row["ci_high"] == pytest.approx(ref.high, abs=0.01)


@pytest.mark.parametrize(
    ("only_a", "only_b", "hand"),
    [(1, 9, 22 / 1024), (0, 6, 2 / 64), (5, 5, 1.0), (0, 0, 1.0), (7, 2, 2 * (1 + 9 + 36) / 512)],
)
def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_pairs(only_a, only_b, hand) -> None:
    assert mcnemar_p(only_a, only_b) == pytest.approx(hand)
    if only_a + only_b:
        assert mcnemar_p(only_a, only_b) == binomtest(only_b, only_a + only_b, 0.5).pvalue
    row = compare(*outcomes(only_a, only_b))["tasks"]["t"]
    assert (row["only_a_correct"], row["only_b_correct"]) == (only_a, only_b)
    assert row["p_mcnemar"] == pytest.approx(hand)


def test_identical_outcomes_are_no_difference() -> None:
    row = compare(*outcomes(0, 0))["average"]
    assert (row["difference"], row["ci_low"], row["ci_high"], row["p_mcnemar"]) == (0, 0, 0, 1)
    assert row["ci_excludes_zero"] is False


def test_a_clear_difference_is_significant() -> None:
    row = compare(*outcomes(2, 30, both=40, neither=28))["tasks"]["t"]
    assert row["difference"] == pytest.approx(28 / 100)
    assert row["ci_excludes_zero"] and row["ci_low"] > 0 and row["p_mcnemar"] < 1e-5


def test_holm_on_a_hand_example() -> None:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0] and holm([0.2]) == [0.2] and holm([]) == []


def test_holm_runs_across_the_comparisons_of_each_row() -> None:
    items = range(20)
    base = {"t": {f"q{i}": i < 10 for i in items}}
    first = {"t": {f"q{i}": True for i in items}}  # 10 discordant, all for B
    second = {"t": {f"q{i}": i % 2 == 0 for i in items}}  # 5 and 5
    third = {"t": {f"q{i}": i < 15 for i in items}}  # 5, all for B
    found = compare_to_baseline(base, {"x": first, "y": second, "z": third}, baseline_name="base")
    p = [found[k]["tasks"]["t"]["p_mcnemar"] for k in "xyz"]
    assert [found[k]["tasks"]["t"]["p_holm"] for k in "xyz"] == pytest.approx(holm(p))
    assert [found[k]["average"]["p_holm"] for k in "xyz"] == pytest.approx(holm(p))  # one task: same family
    assert [found[k]["average"]["significant_holm"] for k in "xyz"] == [h < 0.05 for h in holm(p)]
    assert found["x"]["a"] == "base" and found["y"]["b"] == "y"
    assert p == [2 / 1024, 1.0, 2 / 32] and holm(p) == pytest.approx([6 / 1024, 1.0, 4 / 32])


def test_average_is_stratified_and_each_task_keeps_its_interval() -> None:
    a, b = synthetic(np.random.default_rng(1))
    both = compare(a, b)
    alone = compare({"small": a["small"]}, {"small": b["small"]})
    assert both["tasks"]["small"] == alone["tasks"]["small"]  # seeded per task, not per call
    avg = both["average"]
    assert avg["difference"] == pytest.approx(np.mean([r["difference"] for r in both["tasks"].values()]))
    assert avg["n"] == 280 and avg["only_a_correct"] == sum(
        r["only_a_correct"] for r in both["tasks"].values()
    )
    assert avg["p_mcnemar"] == mcnemar_p(avg["only_a_correct"], avg["only_b_correct"])
    assert compare(a, b, seed=5) != both and compare(a, b, seed=5) == compare(a, b, seed=5)


def test_pairing_matches_ids_and_names_what_is_missing() -> None:
    a = {"t": {f"q{i}": True for i in range(9)}, "u": {"x": False}}
    b = {"t": {f"q{i}": bool(i % 2) for i in reversed(range(9))}, "u": {"x": True}}
    ya, yb = pair(a, b)["t"]
    assert ya.all() and list(yb) == [bool(i % 2) for i in range(9)]  # B reordered to A's items
    with pytest.raises(HippoError, match=r"^the task sets differ: u only in A$"):
        pair(a, {"t": b["t"]})
    short = {"t": {f"q{i}": True for i in range(2)}, "u": {"x": True, "y": True}}
    with pytest.raises(HippoError, match=r"^task t: the item sets differ, item ids 7 only in A "
                                         r"\(q2, q3, q4, q5, q6, \.\.\.\)$"):  # fmt: skip
        pair(a, short, ("A", "B"))
    with pytest.raises(HippoError, match=r"^task u: .* 1 only in new \(y\)$"):
        pair({"t": short["t"], "u": {"x": True}}, short, ("old", "new"))
    with pytest.raises(HippoError, match="task t: no items"):
        pair({"t": {}}, {"t": {}})


def test_outcomes_from_rows_checks_each_row() -> None:
    rows = [
        {"id": "a", "correct": True, "correct_norm": False},
        {"id": 7, "correct": False, "correct_norm": True},
    ]
    assert outcomes_from_rows(rows) == {"a": True, "7": False}
    assert outcomes_from_rows(rows, "acc_norm") == {"a": False, "7": True}
    with pytest.raises(HippoError, match="row 1: item id 'a' appears twice"):
        outcomes_from_rows([rows[0], rows[0]])
    with pytest.raises(HippoError, match="row 0: 'correct' must be true or false"):
        outcomes_from_rows([{"id": "a", "correct": 1}])
    with pytest.raises(HippoError, match="unknown metric 'f1'"):
        outcomes_from_rows(rows, "f1")


# ------------------------------------------------------------------ evaluation folders and the CLI


def test_folders_of_a_real_run(tiny_run: Path) -> None:
    zero, one = tiny_run / "eval" / "0shot", tiny_run / "eval" / "1shot"
    result = compare_folders(zero, one)
    for which, folder in (("a", zero), ("b", one)):
        tasks = json.loads((folder / "results.json").read_text())["tasks"]
        assert list(result["tasks"]) == list(tasks)
        for task, row in result["tasks"].items():
            assert (
                row[f"accuracy_{which}"] == pytest.approx(tasks[task]["acc"]) and row["n"] == tasks[task]["n"]
            )
    norm = load_outcomes(zero, "acc_norm", ["medqa"])["medqa"]
    assert sum(norm.values()) / len(norm) == pytest.approx(
        json.loads((zero / "results.json").read_text())["tasks"]["medqa"]["acc_norm"]
    )


def test_cli_compares_two_evaluation_folders(tiny_run: Path, tmp_path: Path, capsys) -> None:
    zero, one = tiny_run / "eval" / "0shot", tiny_run / "eval" / "1shot"
    assert main(["compare", str(zero), str(one), "--output", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["a_folder"] == str(zero) and saved["metric"] == "acc" and saved["resamples"] == 10_000
    expected = compare_folders(zero, one)
    assert {k: saved[k] for k in expected} == json.loads(json.dumps(expected))
    row = expected["tasks"]["medqa"]
    assert f"| medqa | {row['n']} | {100 * row['accuracy_a']:.1f} | {100 * row['accuracy_b']:.1f} | " in out
    assert "| Average |" in out and "McNemar" in out and "Holm" not in out
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md.startswith(f"**{one} (B) against {zero} (A), acc**")
    header = (tmp_path / "cmp" / "compare.csv").read_text().splitlines()[0]
    assert header == ("Task,n,A (%),B (%),Δ B − A,95% CI low,95% CI high,CI excludes 0,only A right,"
                      "only B right,McNemar p")  # fmt: skip
    assert main(["compare", str(zero), str(one), "--metric", "acc_norm", "--tasks", "pubmedqa"]) == 0
    assert "| pubmedqa |" in capsys.readouterr().out


def test_cli_errors_are_one_line(tiny_run: Path, tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    from hippocrates.eval.runner import evaluate
    from test_stages_helpers import EVAL_DATA

    zero = tiny_run / "eval" / "0shot"
    evaluate(
        str(tiny_llama_dir),
        ["medqa"],
        data={"medqa": EVAL_DATA["medqa"]},
        limit=3,
        output_dir=tmp_path / "m3",
    )
    capsys.readouterr()  # the evaluation's progress lines
    missing_id = list(load_outcomes(zero, tasks=["medqa"])["medqa"])[3]
    cases = [
        (["compare", str(tmp_path / "nope"), str(zero)], f"{tmp_path / 'nope'}: evaluation folder not found"),
        (["compare", str(zero), str(zero), "--metric", "f1"], "unknown metric 'f1' (choose from acc, acc_norm)"),
        (["compare", str(zero)], "give two evaluation folders A B (or --models A B)"),
        (["compare", str(zero), str(tmp_path / "m3")], "the task sets differ: pubmedqa, usmle_step1 only in"),
        (["compare", str(zero), str(tmp_path / "m3"), "--tasks", "medqa"],
         f"task medqa: the item sets differ, item ids 1 only in {zero} ({missing_id})"),
        (["compare", str(zero), str(zero), "--resamples", "50"], "--resamples must be >= 1,000, got 50"),
        (["compare", "--models", "a", "b"], "--models needs --tasks"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("hippo compare: error: ") and message in err, err


def test_cli_evaluates_two_models_and_compares_them(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    from test_stages_helpers import EVAL_DATA

    argv = ["compare", "--models", str(tiny_llama_dir), str(tiny_llama_dir), "--tasks", "medqa", "--limit", "3",
            "--data", f"medqa={EVAL_DATA['medqa']}", "--output", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert saved["b"] == str(tiny_llama_dir) and saved["tasks"]["medqa"]["n"] == 3
    assert saved["average"]["difference"] == 0 and saved["average"]["p_mcnemar"] == 1  # same model twice
    assert (tmp_path / "out" / "eval_a" / "samples_medqa.jsonl").is_file()
    assert (tmp_path / "out" / "eval_b" / "results.json").is_file()


def test_sweep_baseline_must_name_a_combination(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    from test_stages_helpers import EVAL_DATA

    argv = ["eval", "--sweep", "--model", str(tiny_llama_dir), "--tasks", "medqa", "--data",
            f"medqa={EVAL_DATA['medqa']}", "--prompts", "letter", "--chat-options", "off", "--shots", "0",
            "--baseline", "letter-chat-0shot", "--output", str(tmp_path / "sweep")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith(
        "error: sweep: baseline 'letter-chat-0shot' is not a combination (choose from letter-plain-0shot)\n"
    )
