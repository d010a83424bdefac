"""``hippo ablate RECIPE``: how much does each stage contribute? (the paper's ablation table)

Evaluates the recipe's models on its eval tasks: base, +CPT, +SFT (from base), +CPT+SFT, then each
later stage in the recipe's order on top of the enabled stages before it (+CPT+SFT+DPO; with GRPO,
+CPT+SFT+GRPO(+DPO) or +CPT+SFT+DPO+GRPO; without CPT, +SFT+DPO; GRPO from the base, +GRPO).
Models come from the pipeline's folders (OUTPUT/cpt, sft, grpo, annotate, dpo) when they are
current for the recipe (:func:`hippocrates.record.current`: same config, input model and data) and
are trained otherwise; the one extra model, SFT from the base, goes to
OUTPUT/ablation/sft_from_base. Each variant's evaluation goes to
OUTPUT/ablation/eval/<variant>/<K>shot/ and is reused while current, as is the pipeline's own
evaluation of the same model under the same protocol. A retrained model has a new fingerprint,
so everything trained or evaluated from it is redone: no file times are trusted. Each variant is
compared with the base model on the same items (hippocrates.analyses.stats: bootstrap CI, McNemar
p, Holm across the variants). The table is rewritten after every variant, so an interrupted
ablation keeps its rows.
"""

from __future__ import annotations

import argparse
import importlib
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hippocrates.config import Recipe, load_recipe
from hippocrates.data.io import write_json, write_text
from hippocrates.errors import HippoError
from hippocrates.progress import status
from hippocrates.record import current, staleness
from hippocrates.report.tables import ablation_comparisons, ablation_table, task_average, with_comparisons


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    stages: tuple[str, ...]
    model: str  # the key of the trained model it evaluates (see Ablation.ensure)


BASIC = (
    Variant("base", "Base", (), "base"),
    Variant("cpt", "+CPT", ("cpt",), "cpt"),
    Variant("sft_from_base", "+SFT", ("sft",), "sft_from_base"),
    Variant("cpt_sft", "+CPT+SFT", ("cpt", "sft"), "sft"),
)
MODULES = {
    "cpt": "hippocrates.stages.cpt",
    "sft": "hippocrates.stages.sft",
    "dpo": "hippocrates.stages.dpo",
    "grpo": "hippocrates.stages.grpo",
    "annotate": "hippocrates.rlaif.annotate",
}


def training_chain(recipe: Recipe) -> list[str]:
    """The training stages in the pipeline's order (GRPO, when enabled, after SFT or after DPO)."""
    return [
        s
        for s in recipe.stage_order()
        if s in ("cpt", "sft", "grpo", "dpo") and (s != "grpo" or recipe.stages.grpo.enabled)
    ]


def variants_of(recipe: Recipe) -> list[Variant]:
    """The rows of the recipe's ablation: base, +CPT, +SFT, +CPT+SFT, then each later stage in order on
    top of the stages before it that the recipe enables, as the pipeline chains them (GRPO straight
    from the base is "+GRPO", DPO without CPT "+SFT+DPO"), so every stage the pipeline trains has a row."""
    out = list(BASIC)
    chain = [s for s in ("cpt", "sft") if getattr(recipe.stages, s).enabled]
    for stage in training_chain(recipe)[2:]:
        row = (*chain, stage)
        out.append(Variant("_".join(row), "+" + "+".join(s.upper() for s in row), row, stage))
        if getattr(recipe.stages, stage).enabled:
            chain.append(stage)  # a disabled stage keeps its (skipped) row but is not built upon
    return out


def trained_of(recipe: Recipe) -> dict[str, tuple[str, str, str]]:
    """key -> (stage, key of its input model, output folder below OUTPUT), chained as the pipeline chains
    them: each stage trains the latest enabled stage's model; annotate samples the model DPO starts from."""
    out = {"sft_from_base": ("sft", "base", "ablation/sft_from_base")}
    previous = "base"
    for stage in training_chain(recipe):
        out[stage] = (stage, previous, stage)
        if stage == "dpo":
            out["annotate"] = ("annotate", previous, "annotate")
        if getattr(recipe.stages, stage).enabled:
            previous = stage
    return out


class Ablation:
    """Trains (or reuses) the models the variants need, evaluates them and keeps the table."""

    def __init__(self, recipe: Recipe, shots: int, limit: int | None, force: bool) -> None:
        self.recipe, self.shots, self.limit, self.force_eval = recipe, shots, limit, force
        self.out = Path(recipe.output_dir)
        self.models: dict[str, str] = {}
        self.outcomes: dict[str, dict[str, dict[str, bool]]] = {}  # variant name -> per-item outcomes
        self.train_s = 0.0
        self.prepared: dict[str, tuple[str | None, float, str | None]] = {}  # name -> model, train s, error
        self.precision: str | None = None  # one precision for every variant (None: the recipe's own rule)
        self.tasks = task_names(recipe.eval.tasks)

    def prepare(self, variant: Variant) -> None:
        """Train (or reuse) the variant's model before any evaluation, so the precision can be chosen
        once for all of them."""
        self.train_s = 0.0
        try:
            self.prepared[variant.name] = (self.ensure(variant.model), self.train_s, None)
        except HippoError as exc:
            self.prepared[variant.name] = (None, self.train_s, str(exc))

    def choose_precision(self) -> None:
        """Variants compared with each other run in one precision: when ``eval.precision: auto`` sends
        one trained model to fp32 (its 16-bit weights lose what it learned), every variant runs in fp32,
        so a difference is the training's, not the arithmetic's."""
        from hippocrates.models import precision_for

        models = [m for m, _, error in self.prepared.values() if m and not error]
        if self.recipe.eval.precision != "auto" or not models:
            return
        chosen = {precision_for(m, self.recipe.precision)[0] for m in models}  # the rule eval applies
        if len(chosen) > 1:
            self.precision = "fp32"
            status("ablate: every variant is evaluated in fp32, so that they compare on equal terms")

    def skip_reason(self, variant: Variant) -> str | None:
        stages = self.recipe.stages
        for stage in variant.stages:
            if not getattr(stages, stage).enabled:
                return f"stages.{stage}.enabled is false in the recipe"
        if "dpo" in variant.stages and not stages.dpo.data and not stages.annotate.enabled:
            return "DPO needs stages.dpo.data or the annotate stage"
        return None

    def ensure(self, key: str) -> str:
        """The path of a trained model (or the annotate folder) by key, training what is not current."""
        if key in self.models:
            return self.models[key]
        if key == "base":
            self.models[key] = self.recipe.base_model
            return self.models[key]
        trained = trained_of(self.recipe)
        if key == "sft_from_base" and trained["sft"][1] == "base":
            self.models[key] = self.ensure(
                "sft"
            )  # without CPT the pipeline's SFT is already SFT from the base
            return self.models[key]
        stage, source, folder = trained[key]
        model = self.ensure(source)
        if key == "dpo" and not self.recipe.stages.dpo.data:
            self.ensure("annotate")
        out_dir = self.out / folder
        module = importlib.import_module(MODULES[stage])
        step = module.plan(self.recipe, model, out_dir)
        reason = staleness(out_dir, step)
        if reason is None:
            status(f"ablate: reusing {out_dir}")
        else:
            status(f"ablate: training {stage} -> {out_dir} ({reason})")
            start = time.perf_counter()
            getattr(module, f"run_{stage}")(self.recipe, model, out_dir)
            self.train_s += time.perf_counter() - start
        self.models[key] = str(out_dir)
        return self.models[key]

    def eval_dir(self, variant: Variant) -> Path:
        return self.out / "ablation" / "eval" / variant.name / f"{self.shots}shot"

    def run_variant(self, variant: Variant) -> dict[str, Any]:
        from hippocrates.data.io import read_json_object
        from hippocrates.eval.runner import evaluate, recipe_eval_options, recipe_eval_step

        row: dict[str, Any] = {"name": variant.name, "label": variant.label, "stages": list(variant.stages)}
        reason = self.skip_reason(variant)
        if reason:
            return {**row, "status": "skipped", "reason": reason}
        if variant.name not in self.prepared:
            self.prepare(variant)
        model, train_s, error = self.prepared[variant.name]
        ev = self.recipe.eval
        try:
            if error or model is None:
                raise HippoError(error or "no model")
            options = recipe_eval_options(self.recipe, self.shots, self.limit, model)
            if self.precision:
                options["precision"] = self.precision
            step = recipe_eval_step(self.recipe, model, options)
            start = time.perf_counter()
            target = self.eval_dir(variant)
            pipeline_eval = self.out / "eval" / f"{self.shots}shot"
            reusable = [] if self.force_eval else [d for d in (target, pipeline_eval) if current(d, step)]
            if reusable:
                results, where = read_json_object(reusable[0] / "results.json"), reusable[0]
            else:
                status(
                    f"ablate: evaluating {variant.label} ({model}) on {', '.join(ev.tasks)}, {self.shots}-shot"
                )
                results, where = (
                    evaluate(model, list(ev.tasks), output_dir=target, recipe=self.recipe, **options),
                    target,
                )
        except HippoError as exc:
            return {**row, "status": "failed", "reason": str(exc)}
        tasks = results.get("tasks") or {}
        acc = {t: (tasks.get(t) or {}).get("acc") for t in self.tasks}
        return {
            **row, "status": "ok", "model_path": model, "results": _relative(where / "results.json", self.out),
            "acc": acc, "acc_norm": {t: (tasks.get(t) or {}).get("acc_norm") for t in self.tasks},
            "n": {t: (tasks.get(t) or {}).get("n") for t in self.tasks}, "average": task_average(list(acc.values())),
            "precision": options["precision"], "reused_eval": bool(reusable), "train_s": round(train_s, 2),
            "eval_s": round(time.perf_counter() - start, 2),
        }  # fmt: skip

    def compare(self, data: dict[str, Any]) -> None:
        """Each evaluated variant against the base model on the same items, Holm across the variants;
        stored in the variants (``comparison``), or ``comparison_error`` when they cannot be paired."""
        from hippocrates.analyses.stats import compare_to_baseline, load_outcomes

        ok = [v for v in data["variants"] if v["status"] == "ok"]
        base = next((v for v in ok if v["name"] == "base"), None)
        others = [v for v in ok if v is not base]
        if base is None or not others:
            return
        try:
            for v in ok:
                if v["name"] not in self.outcomes:
                    folder = (self.out / v["results"]).parent
                    self.outcomes[v["name"]] = load_outcomes(folder)
            found = compare_to_baseline(
                self.outcomes["base"],
                {v["label"]: self.outcomes[v["name"]] for v in others},
                baseline_name=base["label"],
            )
        except HippoError as exc:
            data["comparison_error"] = str(exc)
            for v in others:
                v.pop("comparison", None)
            status(f"ablate: no paired comparisons: {exc}")
            return
        data.pop("comparison_error", None)
        for v in others:
            v["comparison"] = found[v["label"]]


def task_names(tasks: list[str]) -> list[str]:
    """The recipe's tasks by name (a task given as a YAML path is named by its ``task`` key)."""
    from hippocrates.eval.registry import resolve_tasks

    try:
        return [spec.task for spec in resolve_tasks(list(tasks))]
    except HippoError:
        return list(tasks)  # evaluate() reports the problem where it matters


def _relative(path: Path, root: Path) -> str:
    """A path inside the run folder relative to it, so a moved or copied run still finds its files."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def write_ablation(out_dir: Path, data: dict[str, Any]) -> None:
    """ablation.json (everything), .md (the table and the per-task comparisons) and .csv (the table),
    each written atomically."""
    table = ablation_table(data)
    write_json(out_dir / "ablation.json", data)
    write_text(out_dir / "ablation.md", with_comparisons(table, ablation_comparisons(data)))
    write_text(out_dir / "ablation.csv", table.csv())


def run_ablation(
    recipe: Recipe,
    *,
    shots: int | None = None,
    variants: list[str] | None = None,
    limit: int | None = None,
    force_eval: bool = False,
) -> dict[str, Any]:
    """Run the ablation of ``recipe``; return (and write to OUTPUT/ablation/) its table data."""
    rows = variants_of(recipe)
    names = [v.name for v in rows]
    unknown = sorted(set(variants or []) - set(names))
    if unknown:
        raise HippoError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    if not recipe.eval.tasks:
        raise HippoError(f"{recipe.where('eval.tasks')}: empty; the ablation has nothing to measure")
    k = recipe.eval.num_fewshot[0] if shots is None else shots
    ablation = Ablation(recipe, k, limit or recipe.eval.limit, force_eval)
    data: dict[str, Any] = {
        "recipe": recipe.name, "base_model": recipe.base_model, "num_fewshot": k, "tasks": ablation.tasks,
        "prompt": recipe.eval.prompt, "protocol": recipe.eval.protocol, "mode": recipe.eval.mode,
        "chat_template": recipe.eval.chat_template if recipe.eval.mode == "generate" else bool(recipe.eval.chat_template),
        "limit": ablation.limit, "variants": [],
    }  # fmt: skip
    selected = [v for v in rows if not variants or v.name in variants]
    for variant in selected:
        if not ablation.skip_reason(variant):
            ablation.prepare(variant)
    ablation.choose_precision()
    for variant in selected:
        data["variants"].append(ablation.run_variant(variant))
        ablation.compare(data)
        data["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_ablation(ablation.out / "ablation", data)
    return data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument(
        "--shots", type=int, default=None, help="few-shot count (default: the recipe's first)"
    )
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated subset of the recipe's variants, named by their stages: base, cpt, "
        "sft_from_base, cpt_sft, then e.g. cpt_sft_dpo, cpt_sft_grpo_dpo, sft_dpo, grpo (an unknown name "
        "lists the recipe's)",
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N items per task")
    parser.add_argument("--force-eval", action="store_true", help="re-evaluate even when results are current")


def run(args: argparse.Namespace) -> int:
    from hippocrates.lock import hold
    from hippocrates.preflight import preflight

    if args.shots is not None and args.shots < 0:
        raise HippoError(f"--shots must be >= 0, got {args.shots}")
    if args.limit is not None and args.limit < 1:
        raise HippoError(f"--limit must be >= 1, got {args.limit}")
    recipe = load_recipe(args.recipe)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    names = {v.name for v in variants_of(recipe)}
    if variants and not set(variants) <= names:
        bad = sorted(set(variants) - names)
        raise HippoError(
            f"--variants: unknown variant(s) {', '.join(bad)}; choose from {', '.join(sorted(names))}"
        )
    preflight(recipe, ["ablate"], outputs=[Path(recipe.output_dir) / "ablation"])
    with hold(recipe.output_dir):
        data = run_ablation(
            recipe, shots=args.shots, variants=variants, limit=args.limit, force_eval=args.force_eval
        )
    for v in data["variants"]:
        if v["status"] != "ok":
            status(f"ablate: {v['label']} {v['status']}: {v.get('reason', '')}")
    print(with_comparisons(ablation_table(data), ablation_comparisons(data)))
    print(f"written: {Path(recipe.output_dir) / 'ablation'}/ablation.{{json,md,csv}}")
    return 1 if any(v["status"] == "failed" for v in data["variants"]) else 0
