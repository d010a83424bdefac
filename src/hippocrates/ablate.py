"""``hippo ablate RECIPE``: how much does each stage contribute? (the paper's ablation table)

Evaluates five models on the recipe's eval tasks: base, +CPT, +SFT (from base), +CPT+SFT
and +CPT+SFT+DPO. Models come from the main pipeline's directories (OUTPUT/cpt, sft,
annotate, dpo) when those are up to date and are trained otherwise; the one extra model,
SFT from base, goes to OUTPUT/ablation/sft_from_base. Evaluations go to
OUTPUT/ablation/eval/<variant>/<K>shot/ and are reused while newer than their model.
The table is rewritten after every variant, so an interrupted ablation keeps its rows
and a rerun picks up where it stopped.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hippocrates.config import Recipe, load_recipe, recipe_to_dict
from hippocrates.data.io import atomic_file, read_json, sha256_file, write_json
from hippocrates.errors import HippoError
from hippocrates.progress import status
from hippocrates.report.tables import ablation_table, task_average


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    stages: tuple[str, ...]


VARIANTS = (
    Variant("base", "Base", ()),
    Variant("cpt", "+CPT", ("cpt",)),
    Variant("sft_from_base", "+SFT", ("sft",)),
    Variant("cpt_sft", "+CPT+SFT", ("cpt", "sft")),
    Variant("cpt_sft_dpo", "+CPT+SFT+DPO", ("cpt", "sft", "dpo")),
)

# the trained model each variant evaluates (keys of Ablation.ensure)
MODEL_OF = {
    "base": "base",
    "cpt": "cpt",
    "sft_from_base": "sft_from_base",
    "cpt_sft": "sft",
    "cpt_sft_dpo": "dpo",
}


def _lazy(module: str, name: str) -> Callable[..., Any]:
    """A function imported on first call, so ``hippo ablate --help`` loads no ML stack."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            target = getattr(importlib.import_module(module), name)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):  # the stage itself, not one of its deps
                raise HippoError(f"{module} is not available in this install") from None
            raise
        return target(*args, **kwargs)

    return call


def _resolve(spec: str) -> str:
    from hippocrates.models import resolve_model

    return str(resolve_model(spec).path)


@dataclass
class Runners:
    """The stage, eval and freshness functions the ablation calls (swapped for fakes in tests)."""

    cpt: Callable[..., dict] = field(default_factory=lambda: _lazy("hippocrates.stages.cpt", "run_cpt"))
    sft: Callable[..., dict] = field(default_factory=lambda: _lazy("hippocrates.stages.sft", "run_sft"))
    annotate: Callable[..., dict] = field(
        default_factory=lambda: _lazy("hippocrates.rlaif.annotate", "run_annotate")
    )
    dpo: Callable[..., dict] = field(default_factory=lambda: _lazy("hippocrates.stages.dpo", "run_dpo"))
    evaluate: Callable[..., dict] = field(
        default_factory=lambda: _lazy("hippocrates.eval.runner", "evaluate")
    )
    resolve: Callable[[str], str] = field(default_factory=lambda: _resolve)
    up_to_date: Callable[..., str | None] = field(default_factory=lambda: stage_staleness)


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


def stage_staleness(recipe: Recipe, stage: str, model_path: str, out_dir: Path) -> str | None:
    """Why ``out_dir`` must be (re)trained, or None if it can be reused (a make-like rule).

    Complete (atomic_dir) output with a manifest; recorded stage config, input model and data
    sha256 equal to the current ones where the manifest records them; and newer than the
    manifest of the model it was trained from.
    """
    manifest_path = out_dir / "manifest.json"
    done = out_dir / ("preferences.jsonl" if stage == "annotate" else "config.json")
    if not manifest_path.is_file() or not done.is_file():
        return "not trained yet"
    try:
        man = read_json(manifest_path)
    except HippoError as exc:
        return f"unreadable manifest ({exc})"
    config = man.get("config") or man.get("recipe")
    recorded = (config.get("stages") or {}).get(stage) if isinstance(config, dict) else None
    if recorded is not None and recorded != recipe_to_dict(recipe)["stages"][stage]:
        return f"stages.{stage} changed since it was trained"
    source = man.get("model_path") or man.get("input_model")
    if isinstance(source, str) and Path(source).resolve() != Path(model_path).resolve():
        return f"trained from {source}, not {model_path}"
    files = man.get("data_files") or {}
    pairs = (
        files.items()
        if isinstance(files, dict)
        else [(f.get("path"), f.get("sha256")) for f in files if isinstance(f, dict)]
    )
    for path, sha in pairs:
        if isinstance(sha, str) and path and Path(path).is_file() and sha256_file(path) != sha:
            return f"{path} changed since it was trained"
    if _mtime(Path(model_path) / "manifest.json") > _mtime(manifest_path):
        return f"{model_path} was retrained after it"
    return None


class Ablation:
    """Trains (or reuses) the models the variants need, evaluates them and keeps the table."""

    def __init__(self, recipe: Recipe, runners: Runners, shots: int, limit: int | None, force: bool) -> None:
        self.recipe, self.runners, self.shots = recipe, runners, shots
        self.limit, self.force_eval = limit, force
        self.out = Path(recipe.output_dir)
        self.models: dict[str, str] = {}
        self.retrained: set[str] = set()
        self.train_s = 0.0

    def skip_reason(self, variant: Variant) -> str | None:
        stages = self.recipe.stages
        for stage in variant.stages:
            if not getattr(stages, stage).enabled:
                return f"stages.{stage}.enabled is false in the recipe"
        if "dpo" in variant.stages and not stages.dpo.data and not stages.annotate.enabled:
            return "DPO needs stages.dpo.data or the annotate stage"
        return None

    def ensure(self, key: str) -> str:
        """Path of a trained model (or annotate dir) by key, training it and its inputs if stale.

        A step is retrained when its own output is stale or when one of its inputs was
        retrained in this run (the make rule, without trusting file times alone).
        """
        if key in self.models:
            return self.models[key]
        if key == "base":
            self.models[key] = self.runners.resolve(self.recipe.base_model)
            return self.models[key]
        stage, source, out_dir = {
            "cpt": ("cpt", "base", self.out / "cpt"),
            "sft": ("sft", "cpt", self.out / "sft"),
            "sft_from_base": ("sft", "base", self.out / "ablation" / "sft_from_base"),
            "annotate": ("annotate", "sft", self.out / "annotate"),
            "dpo": ("dpo", "sft", self.out / "dpo"),
        }[key]
        inputs = [source] + (["annotate"] if key == "dpo" and not self.recipe.stages.dpo.data else [])
        model_path = self.ensure(source)
        for extra in inputs[1:]:
            self.ensure(extra)
        reason = self.runners.up_to_date(self.recipe, stage, model_path, out_dir)
        if reason is None and any(i in self.retrained for i in inputs):
            reason = "an input was retrained in this run"
        if reason is None:
            status(f"ablate: reusing {out_dir}")
        else:
            status(f"ablate: training {stage} -> {out_dir} ({reason})")
            start = time.perf_counter()
            getattr(self.runners, stage)(self.recipe, model_path, out_dir)
            self.train_s += time.perf_counter() - start
            self.retrained.add(key)
        self.models[key] = str(out_dir)
        return self.models[key]

    def eval_dir(self, variant: Variant) -> Path:
        return self.out / "ablation" / "eval" / variant.name / f"{self.shots}shot"

    def cached_results(self, variant: Variant, model: str) -> dict[str, Any] | None:
        """Earlier results of this variant, if newer than its model and made with this protocol and tasks."""
        path = self.eval_dir(variant) / "results.json"
        if self.force_eval or MODEL_OF[variant.name] in self.retrained or not path.is_file():
            return None
        if _mtime(path) < _mtime(Path(model) / "manifest.json"):
            return None
        try:
            res = read_json(path)
        except HippoError:
            return None
        ev = self.recipe.eval
        protocol = (res.get("num_fewshot"), res.get("prompt"), bool(res.get("chat_template")))
        same = protocol == (self.shots, ev.prompt, ev.chat_template)
        tasks = res.get("tasks") or {}
        return res if same and all(t in tasks for t in ev.tasks) else None

    def run_variant(self, variant: Variant) -> dict[str, Any]:
        row: dict[str, Any] = {"name": variant.name, "label": variant.label, "stages": list(variant.stages)}
        reason = self.skip_reason(variant)
        if reason:
            return {**row, "status": "skipped", "reason": reason}
        key = MODEL_OF[variant.name]
        self.train_s = 0.0
        ev = self.recipe.eval
        try:
            model = self.ensure(key)
            if key == "base":
                model = self.recipe.base_model  # evaluate by spec: results.json then names the model
            start = time.perf_counter()
            results = self.cached_results(variant, model)
            reused = results is not None
            if results is None:
                status(
                    f"ablate: evaluating {variant.label} ({model}) on {', '.join(ev.tasks)}, {self.shots}-shot"
                )
                results = self.runners.evaluate(
                    model, list(ev.tasks), data=dict(ev.data) or None, num_fewshot=self.shots, prompt=ev.prompt,
                    chat_template=ev.chat_template, limit=self.limit or ev.limit, batch_size=ev.batch_size,
                    output_dir=self.eval_dir(variant), precision=self.recipe.precision,
                )  # fmt: skip
        except HippoError as exc:
            return {**row, "status": "failed", "reason": str(exc)}
        tasks = results.get("tasks") or {}
        acc = {t: (tasks.get(t) or {}).get("acc") for t in ev.tasks}
        return {
            **row, "status": "ok", "model_path": model, "results": str(self.eval_dir(variant) / "results.json"),
            "acc": acc, "acc_norm": {t: (tasks.get(t) or {}).get("acc_norm") for t in ev.tasks},
            "n": {t: (tasks.get(t) or {}).get("n") for t in ev.tasks}, "average": task_average(list(acc.values())),
            "reused_eval": reused, "train_s": round(self.train_s, 2), "eval_s": round(time.perf_counter() - start, 2),
        }  # fmt: skip


def write_ablation(out_dir: Path, data: dict[str, Any]) -> None:
    """ablation.json (everything), .md and .csv (the table), each written atomically."""
    table = ablation_table(data)
    write_json(out_dir / "ablation.json", data)
    for name, text in (("ablation.md", table.markdown()), ("ablation.csv", table.csv())):
        with atomic_file(out_dir / name) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")


def run_ablation(
    recipe: Recipe,
    *,
    shots: int | None = None,
    variants: list[str] | None = None,
    limit: int | None = None,
    force_eval: bool = False,
    runners: Runners | None = None,
) -> dict[str, Any]:
    """Run the ablation of ``recipe``; return (and write to OUTPUT/ablation/) its table data."""
    names = [v.name for v in VARIANTS]
    unknown = sorted(set(variants or []) - set(names))
    if unknown:
        raise HippoError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    if not recipe.eval.tasks:
        raise HippoError(
            f"{recipe.source_path or 'recipe'}: eval.tasks is empty; the ablation has nothing to measure"
        )
    k = recipe.eval.num_fewshot[0] if shots is None else shots
    ablation = Ablation(recipe, runners or Runners(), k, limit, force_eval)
    data: dict[str, Any] = {
        "recipe": recipe.name, "base_model": recipe.base_model, "num_fewshot": k, "tasks": list(recipe.eval.tasks),
        "prompt": recipe.eval.prompt, "chat_template": recipe.eval.chat_template, "variants": [],
    }  # fmt: skip
    for variant in VARIANTS:
        if variants and variant.name not in variants:
            continue
        data["variants"].append(ablation.run_variant(variant))
        data["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_ablation(ablation.out / "ablation", data)
    return data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument(
        "--shots", type=int, default=None, help="few-shot count (default: the recipe's first)"
    )
    parser.add_argument(
        "--variants", default=None, help=f"comma-separated subset of: {', '.join(v.name for v in VARIANTS)}"
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N items per task")
    parser.add_argument(
        "--force-eval", action="store_true", help="re-evaluate even when results are up to date"
    )


def run(args: argparse.Namespace) -> int:
    if args.shots is not None and args.shots < 0:
        raise HippoError(f"--shots must be >= 0, got {args.shots}")
    if args.limit is not None and args.limit < 1:
        raise HippoError(f"--limit must be >= 1, got {args.limit}")
    recipe = load_recipe(args.recipe)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    data = run_ablation(
        recipe, shots=args.shots, variants=variants, limit=args.limit, force_eval=args.force_eval
    )
    for v in data["variants"]:
        if v["status"] != "ok":
            status(f"ablate: {v['label']} {v['status']}: {v.get('reason', '')}")
    print(ablation_table(data).markdown())
    print(f"written: {Path(recipe.output_dir) / 'ablation'}/ablation.{{json,md,csv}}")
    return 1 if any(v["status"] == "failed" for v in data["variants"]) else 0
