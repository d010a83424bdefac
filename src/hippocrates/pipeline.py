"""``hippo pipeline``: run a recipe's enabled stages in order, as in the paper.

CPT adapter merged -> domain-adapted model -> SFT -> merged -> annotate (RLAIF) -> DPO -> merged ->
evaluation (once per shot count, then the rubric-graded answers of ``eval.rubric``) -> stage
ablation and prompting sweep (when the recipe's ``analyses`` enable them) -> report. Before anything runs, every file and model the selected
steps need is checked (:mod:`hippocrates.preflight`) and the output folder is locked
(:mod:`hippocrates.lock`). A step whose output is current for its inputs (hippocrates.record:
config, input model, data) is skipped; ``--from STAGE`` reruns from there. ``--dry-run`` runs the
checks, answers one question with the base model and prints the plan without training.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hippocrates import accel
from hippocrates.config import Recipe, load_recipe
from hippocrates.data.io import read_json_object, write_json
from hippocrates.errors import HippoError
from hippocrates.loggers import scalars_of
from hippocrates.progress import status
from hippocrates.record import check_owner, current, read_manifest

ORDER = (
    "cpt",
    "sft",
    "grpo",
    "annotate",
    "dpo",
    "eval",
    "ablate",
    "sweep",
    "report",
)  # for --stages and --from
TRAINING = ("cpt", "sft", "dpo", "grpo")
PREVIEW_QUESTION = "What are the warning signs of a stroke, and what should someone do if they notice them?"


@dataclass
class Row:
    stage: str
    status: str
    seconds: float = 0.0
    detail: str = ""
    output: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument(
        "--from", dest="from_stage", choices=ORDER, help="rerun this stage and every later one"
    )
    parser.add_argument("--stages", help=f"comma-separated subset to run (of {', '.join(ORDER)})")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue interrupted training stages from their newest complete checkpoint",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace stage outputs written by another run"
    )
    parser.add_argument("--report-to", help="loggers (tensorboard, wandb, none; default tensorboard)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check every file and model, answer one question, print the plan",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="length of the dry-run answer")


def generate_answer(model, tokenizer, question: str, max_new_tokens: int) -> str:
    """Greedy answer to one question, rendered as every stage renders prompts (hippocrates.chat)."""
    import torch

    from hippocrates import chat

    fmt = chat.choose_format(tokenizer, "auto")
    text = chat.prompt(tokenizer, question)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=chat.adds_special_tokens(fmt))
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def order(recipe: Recipe) -> list[str]:
    """Every step in the order this recipe runs them (GRPO after SFT or after DPO)."""
    return [*recipe.stage_order(), "eval", "ablate", "sweep", "report"]


def selected_stages(recipe: Recipe, stages: str | None) -> list[str]:
    enabled = [*recipe.enabled_stages(), "report"]
    if not stages:
        return enabled
    names = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        raise HippoError(f"--stages: unknown stage {unknown[0]!r} (choose from {', '.join(ORDER)})")
    disabled = [n for n in names if n not in enabled]
    if disabled:
        raise HippoError(f"--stages: {disabled[0]} is disabled in the recipe")
    return [s for s in order(recipe) if s in names]


class Pipeline:
    """Runs the stages, threading the current model from one training stage to the next."""

    def __init__(self, recipe: Recipe, args: argparse.Namespace):
        from hippocrates.stages.cli import report_to_arg

        self.recipe, self.args = recipe, args
        self.out = Path(recipe.output_dir)
        self.selected = selected_stages(recipe, args.stages)
        steps = order(recipe)
        self.forced = set(steps[steps.index(args.from_stage) :]) if args.from_stage else set()
        self.report_to = report_to_arg(args.report_to)
        self.model = recipe.base_model
        self.rows: list[Row] = []

    def log(self, folder: Path, scalars: dict[str, float], tables: dict[str, str] | None = None) -> None:
        """Evaluation, annotation and analysis figures to the loggers of --report-to (the Trainer's default)."""
        from hippocrates.loggers import report_figures
        from hippocrates.stages.run import default_report_to

        loggers = default_report_to() if self.report_to is None else self.report_to
        report_figures(folder, loggers, scalars, tables=tables, run_name=self.recipe.name)

    def check_outputs(self) -> None:
        """Fail before writing anything if an output folder belongs to another run."""
        for stage in (*TRAINING, "annotate"):
            check_owner(self.out / stage, self.recipe, self.args.overwrite)

    # ---------------------------------------------------------------------------------- the stages

    def run_step(self, stage: str) -> Row:
        """cpt, sft, annotate, dpo: plan, skip when current, else run; the model moves on."""
        module = importlib.import_module(
            "hippocrates.rlaif.annotate" if stage == "annotate" else f"hippocrates.stages.{stage}"
        )
        out_dir = self.out / stage
        if stage not in self.selected:
            if read_manifest(out_dir) and stage != "annotate":
                self.model = str(out_dir)
                return Row(stage, "not selected: using existing output", output=str(out_dir))
            return Row(stage, "not selected")
        step = module.plan(self.recipe, self.model, out_dir)
        if stage not in self.forced and current(out_dir, step):
            if stage != "annotate":
                self.model = str(out_dir)
            return Row(
                stage, "skipped: unchanged", detail=_headline(stage, _metrics(out_dir)), output=str(out_dir)
            )
        if stage == "annotate":
            metrics = module.run_annotate(self.recipe, self.model, out_dir, overwrite=self.args.overwrite)
            numbers = {
                f"annotate/{k}": float(v)
                for k, v in metrics.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
            self.log(out_dir, numbers)
        else:
            metrics = getattr(module, f"run_{stage}")(
                self.recipe, self.model, out_dir, resume=self.args.resume, overwrite=self.args.overwrite,
                report_to=self.report_to,
            )  # fmt: skip
            self.model = str(out_dir)
        return Row(stage, "ran", detail=_headline(stage, metrics), output=str(out_dir))

    def run_eval(self) -> Row:
        from hippocrates.eval.runner import LoadedModel, evaluate, recipe_eval_options, recipe_eval_step

        cfg = self.recipe.eval
        ran, details, loaded = 0, [], None
        for shots in cfg.num_fewshot:
            out_dir = self.out / "eval" / f"{shots}shot"
            options = recipe_eval_options(self.recipe, shots, cfg.limit, self.model)
            step = recipe_eval_step(self.recipe, self.model, options)
            if "eval" in self.forced or not current(out_dir, step):
                loaded = loaded or LoadedModel.load(
                    self.model, options["precision"], self.recipe.trust_remote_code
                )
                results = evaluate(loaded, cfg.tasks, output_dir=out_dir, recipe=self.recipe, **options)
                self.log(out_dir, scalars_of(results, f"eval/{shots}shot/"))
                ran += 1
            details.append(f"{shots}-shot mean acc={_mean_acc(out_dir / 'results.json')}")
        if cfg.rubric is not None and cfg.rubric.enabled:  # open-ended answers graded against rubrics
            from hippocrates.eval.rubric import run_recipe

            precision = recipe_eval_options(self.recipe, 0, None, self.model)["precision"]
            model = loaded if loaded is not None and loaded.precision == precision else self.model
            folder = self.out / "eval" / "rubric"
            graded, detail, scalars = run_recipe(
                self.recipe, model, folder, precision=precision, force="eval" in self.forced
            )
            if graded:
                self.log(folder, scalars)
            ran += graded
            details.append(detail)
        state = "ran" if ran else "skipped: unchanged"
        return Row("eval", state, detail="; ".join(details), output=str(self.out / "eval"))

    def run_ablate(self) -> Row:
        """The paper's stage-contribution table; reuses this run's stage outputs and evaluations."""
        from hippocrates.analyses.ablation import run_ablation

        cfg = self.recipe.analyses.ablation
        data = run_ablation(
            self.recipe, shots=cfg.num_fewshot, limit=cfg.limit, force_eval="ablate" in self.forced
        )
        rows = data.get("variants", [])
        ok = [v for v in rows if v.get("status") == "ok"]
        reused = sum(bool(v.get("reused_eval")) for v in ok)
        detail = ", ".join(
            f"{v['label']} {v['average']:.3f}" for v in ok if isinstance(v.get("average"), float)
        )
        not_ok = [f"{v['label']} {v['status']}" for v in rows if v.get("status") != "ok"]
        if not_ok:
            detail += f"; {'; '.join(not_ok)}"
        state = "skipped: unchanged" if ok and reused == len(rows) else "ran"
        if state == "ran":
            self.log_analysis("ablation", ok, "label")
        return Row("ablate", state, detail=detail, output=str(self.out / "ablation"))

    def log_analysis(self, name: str, rows: list[dict[str, Any]], key: str) -> None:
        """Each row's average and the analysis's Markdown table (OUTPUT/<name>/<name>.md) to the loggers."""
        averages = {
            f"{name}/{r[key]}/average": r["average"] for r in rows if isinstance(r.get("average"), float)
        }
        table = (self.out / name / f"{name}.md").read_text(encoding="utf-8")
        self.log(self.out / name, averages, {f"{name}/table": table})

    def run_sweep(self) -> Row:
        """Mode x prompt (loglik) or budget (generate) x chat template x shots on the final model, into OUTPUT/sweep/."""
        from hippocrates.analyses.sweep import run_sweep
        from hippocrates.eval.registry import resolve_tasks
        from hippocrates.eval.runner import recipe_eval_options

        cfg, ev = self.recipe.analyses.sweep, self.recipe.eval

        tasks = cfg.tasks or ev.tasks
        names = {spec.task for spec in resolve_tasks(tasks)}  # a task may be given as a YAML path
        files = {t: p for t, p in ev.data.items() if t in names}
        precision = recipe_eval_options(self.recipe, 0, None, self.model)["precision"]
        data = run_sweep(
            self.model, tasks, files or None, cfg.prompts, cfg.chat_template, cfg.num_fewshot, self.out / "sweep",
            limit=cfg.limit or ev.limit, batch_size=ev.batch_size, precision=precision,
            protocol=ev.protocol, trust_remote_code=self.recipe.trust_remote_code, force="sweep" in self.forced,
            modes=cfg.modes, budgets=cfg.max_new_tokens or [ev.max_new_tokens], samples=ev.samples,
            temperature=ev.temperature, backend=ev.backend,
        )  # fmt: skip
        rows = data.get("rows", [])
        best = max(
            (r for r in rows if isinstance(r.get("average"), float)), key=lambda r: r["average"], default=None
        )
        detail = f"{len(rows)} combinations"
        if best:
            detail += f"; best {best['name']} {best['average']:.3f}"
        state = "ran" if data.get("evaluated") else "skipped: unchanged"
        if state == "ran":
            self.log_analysis("sweep", rows, "name")
        return Row("sweep", state, detail=detail, output=str(self.out / "sweep"))

    def run_report(self) -> Row:
        from hippocrates.report.build import build_report

        return Row("report", "ran", output=str(build_report(self.out)))

    def run(self) -> list[Row]:
        enabled = [*self.recipe.enabled_stages(), "report"]
        for stage in order(self.recipe):
            if stage not in enabled:
                self.rows.append(Row(stage, "disabled in recipe"))
                continue
            t0 = time.time()
            status(f"pipeline: {stage}")
            if stage in TRAINING:
                row = self.run_step(stage)
            elif stage not in self.selected:
                row = Row(stage, "not selected")
            elif stage == "ablate" and accel.world_size() > 1:
                # it trains one more model (all ranks) and evaluates (one rank): run it on its own
                status("pipeline: ablate skipped under a distributed launch; run `hippo ablate RECIPE` after")
                row = Row(stage, "skipped: distributed launch", detail="run `hippo ablate RECIPE` afterwards")
            else:
                with accel.main_process_first():  # one rank evaluates and writes; the others wait
                    row = getattr(self, f"run_{stage}")() if accel.is_main_process() else Row(stage, "rank 0")
            row.seconds = time.time() - t0
            self.rows.append(row)
        return self.rows

    def run_annotate(self) -> Row:
        return self.run_step("annotate")


def _metrics(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "metrics.json"
    return read_json_object(path) if path.is_file() else {}


def _headline(stage: str, metrics: dict[str, Any]) -> str:
    if stage == "annotate":
        pairs = metrics.get("preference_pairs")
        return f"preference pairs={pairs}" if pairs is not None else ""
    keys = {
        "cpt": ("eval_perplexity_before", "eval_perplexity_after", "ppl"),
        "sft": ("eval_loss_before", "eval_loss_after", "held-out loss"),
        "dpo": ("eval_reward_accuracy_before", "eval_reward_accuracy_after", "reward acc"),
        "grpo": ("eval_accuracy_before", "eval_accuracy_after", "held-out generative acc"),
    }[stage]
    before, after = metrics.get(keys[0]), metrics.get(keys[1])
    if before is None or after is None:
        return f"train_loss={metrics.get('train_loss')}"
    merge = metrics.get("merge") or {}
    kept = f"; merged {merge['dtype']}, {100 * merge['update_retained']:.1f}% kept" if merge else ""
    return f"{keys[2]} {before:.3f} -> {after:.3f}{kept}"


def _mean_acc(path: Path) -> str:
    if not path.is_file():
        return "?"
    accs = [
        t.get("acc")
        for t in read_json_object(path).get("tasks", {}).values()
        if isinstance(t.get("acc"), (int, float))
    ]
    return f"{sum(accs) / len(accs):.3f}" if accs else "?"


def print_summary(rows: list[Row], recipe: Recipe, file=None) -> None:
    file = file or sys.stdout
    width = max(len(r.status) for r in rows)
    print(f"\npipeline {recipe.name}: output in {recipe.output_dir}", file=file)
    for r in rows:
        time_s = f"{r.seconds:7.1f}s" if r.seconds >= 0.05 else " " * 8
        print(f"  {r.stage:<9} {r.status:<{width}} {time_s}  {r.detail}", file=file)
    counts = {s: sum(r.status.startswith(s) for r in rows) for s in ("ran", "skipped: unchanged")}
    print(f"  {counts['ran']} ran, {counts['skipped: unchanged']} unchanged", file=file)
    report = next((r.output for r in rows if r.stage == "report" and r.output), None)
    if report:
        print(f"  report: {Path(report).resolve()} (open it in a browser; report.md beside it)", file=file)


def dry_run(recipe: Recipe, args: argparse.Namespace) -> int:
    from hippocrates.models import load_model, load_tokenizer, resolve_model

    resolved = resolve_model(recipe.base_model)
    tokenizer = load_tokenizer(resolved, trust_remote_code=recipe.trust_remote_code)
    model = load_model(resolved, precision="fp32", trust_remote_code=recipe.trust_remote_code)
    answer = generate_answer(model, tokenizer, PREVIEW_QUESTION, args.max_new_tokens)
    print(f"model: {resolved.spec} -> {resolved.path}")
    print(f"Q: {PREVIEW_QUESTION}\nA: {answer}\n")
    print("every data file, task and model the recipe names: checked")
    print("stages that will run, in order:")
    for i, stage in enumerate(selected_stages(recipe, args.stages), 1):
        print(f"  {i}. {stage}")
    print(f"outputs: {recipe.output_dir}/<stage>/")
    return 0


def run(args: argparse.Namespace) -> int:
    from hippocrates.lock import hold
    from hippocrates.preflight import preflight

    recipe = load_recipe(args.recipe)
    stages = selected_stages(recipe, args.stages)
    preflight(recipe, stages)
    pipeline = Pipeline(recipe, args)
    pipeline.check_outputs()
    status(f"recipe {args.recipe}: {recipe.name}, base model {recipe.base_model}; every input checked")
    if args.dry_run:
        return dry_run(recipe, args)
    with hold(recipe.output_dir):
        try:
            rows = pipeline.run()
        except BaseException:
            if pipeline.rows:
                print_summary(pipeline.rows, recipe, file=sys.stderr)
            raise
        if accel.is_main_process():
            print_summary(rows, recipe)
            write_json(Path(recipe.output_dir) / "pipeline.json", [r.__dict__ for r in rows])
    return 0
