"""``hippo annotate``: RLAIF preference data from the SFT model and an AI judge with clinician guidelines.

For each patient question we sample n candidates, form every pair, and ask the judge about each
pair in both orders. Only pairs where both orders agree become (chosen, rejected) preferences for
DPO; ties, inconsistent (position-following) verdicts, failures and identical candidates are kept
in set_aside.jsonl with their verdicts. metrics.json reports the order consistency of the judge's
raw verdicts and, beside it, that after the position-bias correction (``judge.calibrate``), and
``judge_stats`` per phase (annotate, agreement). When more than ``judge.max_failed_share`` of a
phase's judge calls fail (by default: all of them) the stage fails with one line and writes
nothing (the answers received stay cached). The whole output directory is written atomically, so
a crash never leaves a half-finished stage.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import time
from pathlib import Path
from typing import Any

from hippocrates.config import Recipe, load_recipe
from hippocrates.data.io import atomic_dir, sha256_file, write_json, write_jsonl
from hippocrates.errors import HippoError
from hippocrates.progress import status
from hippocrates.record import Step
from hippocrates.rlaif.agreement import evaluate_agreement
from hippocrates.rlaif.candidates import load_prompts, sample_candidates
from hippocrates.rlaif.judges import (
    Judge,
    JudgeItem,
    Verdict,
    combine_orders,
    default_device,
    load_rubric,
    make_judge,
    order_consistency,
)


def make_pairs(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every unordered candidate pair per prompt: (pairs to judge, identical pairs set aside)."""
    pairs, identical = [], []
    for rec in records:
        texts = [c["text"] for c in rec["candidates"]]
        for i, j in itertools.combinations(range(len(texts)), 2):
            pair = {
                "id": rec["id"],
                "prompt": rec["prompt"],
                "candidates": [i, j],
                "responses": [texts[i], texts[j]],
            }
            (identical if texts[i].strip() == texts[j].strip() else pairs).append(pair)
    return pairs, identical


def resolve_pairs(pairs: list[dict[str, Any]], verdicts: list[Verdict], judge: Judge) -> dict[str, Any]:
    """Split judged pairs (verdicts interleaved: i-first, j-first) into preferences and set-asides."""
    preferences, set_aside, counts = [], [], {"A": 0, "B": 0, "tie": 0, "inconsistent": 0, "failed": 0}
    for k, pair in enumerate(pairs):
        first, second = verdicts[2 * k], verdicts[2 * k + 1]
        outcome = combine_orders(first, second)
        counts[outcome] += 1
        orders = {"first_shown_first": first.to_dict(), "second_shown_first": second.to_dict()}
        if outcome in ("A", "B"):
            win = 0 if outcome == "A" else 1
            shown_first = first if win == 0 else second  # its reason calls the chosen answer "A"
            preferences.append(
                {
                    "id": pair["id"],
                    "prompt": pair["prompt"],
                    "chosen": pair["responses"][win],
                    "rejected": pair["responses"][1 - win],
                    "reason": shown_first.reason,
                    "judge": judge.name,
                    "rubric_version": judge.rubric.version,
                    "candidates": pair["candidates"],
                    "chosen_candidate": pair["candidates"][win],
                    "verdicts": orders,
                }
            )
        else:
            set_aside.append(
                {
                    **pair,
                    "outcome": outcome,
                    "verdicts": orders,
                    "raw": [first.raw, second.raw] if outcome == "failed" else None,
                }
            )
    return {"preferences": preferences, "set_aside": set_aside, "counts": counts}


def position_stats(verdicts: list[Verdict]) -> dict[str, Any]:
    """Order consistency of the raw verdicts, the same after the position-bias correction, and the
    first-slot preference (:func:`~.judges.order_consistency`)."""
    return order_consistency(verdicts)


def check_failures(
    phase: str, failed: int, total: int, stats: dict[str, Any], max_share: float | None
) -> None:
    """Fail the stage with one line when too many judge calls of a phase failed (by default: all)."""
    if not failed or (failed < total and (max_share is None or failed / total <= max_share)):
        return
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(stats.get("errors", {}).items())) or "see set_aside"
    limit = "every call failed" if failed == total else f"more than judge.max_failed_share={max_share:g}"
    raise HippoError(
        f"{phase}: {failed} of {total} judge calls failed ({kinds}): {limit}; nothing was written "
        "(answers received are cached, so a rerun asks only the rest)"
    )


def check_judge(config: Any) -> None:
    """Raise a one-line HippoError for a judge that cannot work (rubric, model spec, API key)."""
    load_rubric(config.rubric)
    if config.backend == "local":
        from hippocrates.models import resolve_model

        resolve_model(config.model)
    elif config.api_key_env and not os.environ.get(config.api_key_env):
        raise HippoError(f"judge.api_key_env: environment variable {config.api_key_env} is not set")


def plan(recipe: Recipe, model: str, out_dir: Path, agreement: str | Path | None = None) -> Step:
    """This step's inputs: the annotate config, the SFT template, the policy model, the prompts file,
    the rubric, the local judge model and the human labels when agreement is measured."""
    from hippocrates.models import resolve_precision
    from hippocrates.record import model_fingerprint

    cfg = recipe.stages.annotate
    rubric = load_rubric(cfg.judge.rubric)
    data: list[dict[str, Any]] = [
        {"path": str(cfg.prompts), "sha256": sha256_file(cfg.prompts), "role": "prompts"},
        {"path": rubric.path, "sha256": rubric.sha256, "role": "rubric"},
    ]
    if cfg.judge.backend == "local":
        data.append(
            {"path": cfg.judge.model, "fingerprint": model_fingerprint(cfg.judge.model), "role": "judge"}
        )
    if agreement:
        data.append({"path": str(agreement), "sha256": sha256_file(agreement), "role": "human_labels"})
    config = {**cfg.model_dump(mode="json"), "template": recipe.stages.sft.template}
    return Step("annotate", config, model=str(model), data=data, seed=recipe.seed,
                precision=resolve_precision(recipe.precision))  # fmt: skip


def run_annotate(
    recipe: Recipe,
    model_path: str,
    out_dir: Path,
    *,
    agreement: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Sample, judge in both orders, and write OUTPUT/annotate atomically; returns metrics.json's content."""
    from hippocrates.data.io import check_writable
    from hippocrates.models import load_model, load_tokenizer, resolve_model
    from hippocrates.record import check_owner, now, write_manifest

    cfg, out_dir, t0, started = recipe.stages.annotate, Path(out_dir), time.time(), now()
    check_owner(out_dir, recipe, overwrite)
    check_writable(out_dir.parent)
    prompts = load_prompts(cfg.prompts, cfg.prompt_field, cfg.max_prompts)
    check_judge(cfg.judge)  # fail on a bad judge setting before minutes of sampling
    step = plan(recipe, model_path, out_dir, agreement)
    precision = str(step.precision)
    status(f"annotate: {len(prompts)} prompts x {cfg.n_candidates} candidates from {model_path}")
    resolved = resolve_model(model_path)
    tokenizer = load_tokenizer(resolved, trust_remote_code=recipe.trust_remote_code)
    model = load_model(
        resolved, precision=precision, trust_remote_code=recipe.trust_remote_code, device=default_device()
    )
    t_load = time.time()
    records = sample_candidates(
        model,
        tokenizer,
        prompts,
        n=cfg.n_candidates,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        seed=recipe.seed,
        template=recipe.stages.sft.template,
    )
    t_sample = time.time()
    same = cfg.judge.backend == "local" and resolve_model(cfg.judge.model).path == resolved.path
    if not same:
        model = None  # free the policy before loading a judge
    judge = make_judge(
        cfg.judge,
        precision=precision,
        batch_size=cfg.batch_size,
        trust_remote_code=recipe.trust_remote_code,
        cache_path=Path(cfg.judge.cache) if cfg.judge.cache else out_dir.parent / "judge_cache.sqlite",
        model=model,
        tokenizer=tokenizer if same else None,
    )
    pairs, identical = make_pairs(records)
    items = [
        JudgeItem(p["prompt"], *order) for p in pairs for order in (p["responses"], p["responses"][::-1])
    ]
    status(f"annotate: judging {len(pairs)} pairs in both orders with {judge.name}")
    t_judge0 = time.time()
    judge.reset_stats()
    verdicts = judge.judge_pairs(items)
    t_judge = time.time() - t_judge0
    judge_stats = {"annotate": copy.deepcopy(judge.stats)}
    failed_items = sum(not v.ok for v in verdicts)
    _report_failures("annotate", failed_items, len(verdicts), judge_stats["annotate"])
    check_failures(
        "annotate", failed_items, len(verdicts), judge_stats["annotate"], cfg.judge.max_failed_share
    )
    result = resolve_pairs(pairs, verdicts, judge)
    set_aside = [{**p, "outcome": "identical"} for p in identical] + result["set_aside"]
    metrics: dict[str, Any] = {
        "stage": "annotate",
        "prompts": len(prompts),
        "candidates": len(prompts) * cfg.n_candidates,
        "pairs": len(pairs) + len(identical),
        "judged_pairs": len(pairs),
        "identical_pairs": len(identical),
        "preference_pairs": len(result["preferences"]),
        "ties": result["counts"]["tie"],
        "inconsistent": result["counts"]["inconsistent"],
        "failed": result["counts"]["failed"],
        "failed_items": failed_items,
        "set_aside": len(set_aside),
        **position_stats(verdicts),
        "calibrate": cfg.judge.calibrate if any(v.corrected for v in verdicts) else None,
        "judge": judge.name,
        "judge_backend": cfg.judge.backend,
        "rubric_version": judge.rubric.version,
        "judge_stats": judge_stats,
        "candidate_tokens_mean": _mean_tokens(records),
        "time_s": {
            "load": round(t_load - t0, 2),
            "sample": round(t_sample - t_load, 2),
            "judge": round(t_judge, 2),
        },
        "judge_items_per_s": round(len(items) / t_judge, 3) if t_judge > 0 and items else None,
    }
    agreement_rows = None
    if agreement:
        status(f"annotate: agreement with human labels in {agreement}")
        judge.reset_stats()
        metrics["agreement"], agreement_rows = evaluate_agreement(judge, agreement)
        judge_stats["agreement"] = copy.deepcopy(judge.stats)
        failed, total = metrics["agreement"]["failed_items"], metrics["agreement"]["items"]
        _report_failures("agreement", failed, total, judge_stats["agreement"])
        check_failures("agreement", failed, total, judge_stats["agreement"], cfg.judge.max_failed_share)
    metrics["time_s"]["total"] = round(time.time() - t0, 2)
    if not result["preferences"]:
        status("annotate: warning: no preference pairs; DPO will have nothing to train on")
    outputs = ["candidates.jsonl", "preferences.jsonl", "set_aside.jsonl", "metrics.json"]
    extra = {
        "judge": judge.name,
        "rubric": {"version": judge.rubric.version, "sha256": judge.rubric.sha256, "path": judge.rubric.path},
    }
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "candidates.jsonl", records)
        write_jsonl(tmp / "preferences.jsonl", result["preferences"])
        write_jsonl(tmp / "set_aside.jsonl", set_aside)
        if agreement_rows is not None:
            write_jsonl(tmp / "agreement.jsonl", agreement_rows)
            outputs.append("agreement.jsonl")
        write_json(tmp / "metrics.json", metrics)
        write_manifest(
            tmp, step.manifest(outputs=outputs, started=started, t0=t0, recipe=recipe, extra=extra)
        )
    return metrics


def _report_failures(phase: str, failed: int, total: int, stats: dict[str, Any]) -> None:
    if failed:
        status(
            f"{phase}: {failed} of {total} judge calls failed ({stats.get('errors', {})}); "
            "a rerun retries only those (answers are cached)"
        )


def _mean_tokens(records: list[dict[str, Any]]) -> float:
    counts = [c["n_tokens"] for r in records for c in r["candidates"]]
    return round(sum(counts) / len(counts), 2) if counts else 0.0


def _consistency_line(m: dict[str, Any]) -> str:
    """Raw order consistency, and the corrected one named as a correction."""

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    line = f"order consistency {fmt(m['consistency_rate'])} (raw verdicts)"
    if m.get("corrected_consistency_rate") is not None:
        line += f", {fmt(m['corrected_consistency_rate'])} after the position-bias correction"
    return line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (its stages.annotate section)")
    parser.add_argument(
        "--model",
        help="model that writes the candidates (default: the latest earlier stage's output, as the pipeline "
        "chains them, else base_model)",
    )
    parser.add_argument("--output", help="output folder (default: OUTPUT/annotate)")
    parser.add_argument(
        "--agreement",
        metavar="FILE",
        help="also measure agreement with human labels "
        "(JSONL: prompt, response_a, response_b, label A|B|tie)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an output folder written by another recipe"
    )


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    out = Path(recipe.output_dir)
    from hippocrates.stages.cli import default_input_model

    model = args.model or default_input_model(recipe, "annotate")
    if args.agreement and not Path(args.agreement).is_file():
        raise HippoError(f"{args.agreement}: file not found")
    out_dir = Path(args.output) if args.output else out / "annotate"
    from hippocrates.lock import hold
    from hippocrates.preflight import preflight

    preflight(recipe, ["annotate"], model=model, outputs=[out_dir])
    with hold(recipe.output_dir), hold(out_dir.parent):
        m = run_annotate(recipe, model, out_dir, agreement=args.agreement, overwrite=args.overwrite)
    print(
        f"annotate: {m['preference_pairs']} preference pairs from {m['judged_pairs']} judged pairs "
        f"(ties {m['ties']}, inconsistent {m['inconsistent']}, failed {m['failed']}, "
        f"identical {m['identical_pairs']}); {_consistency_line(m)}"
    )
    if "agreement" in m:
        a = m["agreement"]
        kappa = "n/a" if a["cohen_kappa"] is None else f"{a['cohen_kappa']:.3f}"
        acc = "n/a" if a["accuracy"] is None else f"{a['accuracy']:.3f}"
        print(
            f"agreement with {args.agreement}: accuracy {acc}, Cohen's kappa {kappa} over {a['n']} pairs "
            f"({a['failed']} failed); {_consistency_line(a)}"
        )
    print(f"annotate: preferences.jsonl, set_aside.jsonl, candidates.jsonl, metrics.json in {out_dir}")
    return 0
