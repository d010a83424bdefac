"""``hippo pipeline``: run a recipe's enabled stages in order, as in the paper.

CPT adapter merged -> domain-adapted model -> SFT -> merged -> annotate (RLAIF) -> DPO -> merged ->
evaluation (once per shot count) -> stage ablation and prompting sweep (when the recipe's
``analyses`` enable them) -> report. A stage whose output is complete and whose inputs
(resolved config, input model fingerprint, data sha256s) are unchanged is skipped; ``--from STAGE``
reruns from there. Stages owned by other modules (annotate, eval, report) are imported lazily; one
that has not landed yet is reported as skipped, never faked. ``--dry-run`` checks the recipe, answers
one question with the base model and prints the plan without training.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hippocrates import accel
from hippocrates.config import Recipe, load_recipe
from hippocrates.data.io import read_json, sha256_file, write_json
from hippocrates.errors import HippoError
from hippocrates.progress import status

ORDER = ("cpt", "sft", "annotate", "dpo", "eval", "ablate", "sweep", "report")
TRAINING = ("cpt", "sft", "dpo")
EXTERNAL = {
    "annotate": ("hippocrates.rlaif.annotate", "run_annotate"),
    "eval": ("hippocrates.eval.runner", "evaluate"),
    "ablate": ("hippocrates.ablate", "run_ablation"),
    "sweep": ("hippocrates.report.sweep", "run_sweep"),
    "report": ("hippocrates.report.build", "build_report"),
}
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
        "--resume", action="store_true", help="continue interrupted training stages from checkpoints"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace stage outputs written by another run"
    )
    parser.add_argument(
        "--report-to", help="Trainer integrations (tensorboard, wandb, none; default tensorboard)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="check the recipe, answer one question, print the plan"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="length of the dry-run answer")


def generate_answer(model, tokenizer, question: str, max_new_tokens: int) -> str:
    """Greedy answer to one question, through the chat template when the tokenizer has one."""
    import torch

    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = f"Question: {question}\nAnswer:"
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def load_entry(stage: str) -> Callable[..., Any] | None:
    """The entry point of a stage owned by another module, or None when that module has not landed."""
    module, name = EXTERNAL[stage]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            return None
        raise
    return getattr(mod, name, None)


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
    return [s for s in ORDER if s in names]


class Pipeline:
    """Runs the stages, threading the current model from one training stage to the next."""

    def __init__(self, recipe: Recipe, args: argparse.Namespace):
        from hippocrates.stages.common import report_to_arg

        self.recipe, self.args = recipe, args
        self.out = Path(recipe.output_dir)
        self.stamps = self.out / ".pipeline"
        self.selected = selected_stages(recipe, args.stages)
        self.forced = set(ORDER[ORDER.index(args.from_stage) :]) if args.from_stage else set()
        self.report_to = report_to_arg(args.report_to)
        self.model = recipe.base_model
        self.rows: list[Row] = []

    # -------------------------------------------------------------------------------- bookkeeping

    def check_outputs(self) -> None:
        """Fail before writing anything if an output folder belongs to another run."""
        from hippocrates.stages.common import check_owner

        for stage in TRAINING:
            check_owner(self.out / stage, self.recipe, self.args.overwrite)
        for stamp in sorted(self.stamps.glob("*.json")) if self.stamps.is_dir() else []:
            owner = read_json(stamp).get("recipe_name")
            if owner != self.recipe.name and not self.args.overwrite:
                raise HippoError(
                    f"{self.out} holds a run of recipe '{owner}'; change output_dir or pass --overwrite"
                )

    def stamp_current(self, name: str, inputs_hash: str, outputs: list[Path]) -> bool:
        stamp = self.stamps / f"{name}.json"
        return (
            all(p.exists() for p in outputs)
            and stamp.is_file()
            and read_json(stamp).get("inputs_hash") == inputs_hash
        )

    def write_stamp(self, name: str, inputs_hash: str) -> None:
        write_json(
            self.stamps / f"{name}.json", {"inputs_hash": inputs_hash, "recipe_name": self.recipe.name}
        )

    # ---------------------------------------------------------------------------------- the stages

    def run_training(self, stage: str) -> Row:
        from hippocrates.stages import common

        module = importlib.import_module(f"hippocrates.stages.{stage}")
        out_dir = self.out / stage
        if stage not in self.selected:
            if common.read_manifest(out_dir):
                self.model = str(out_dir)
                return Row(stage, "not selected: using existing output", output=str(out_dir))
            return Row(stage, "not selected (no output: later stages use the previous model)")
        config, data = module.stage_inputs(self.recipe, out_dir)
        inputs_hash = common.compute_inputs_hash(
            stage, config, self.recipe, common.model_fingerprint(self.model), data
        )
        if stage not in self.forced and common.is_current(out_dir, inputs_hash):
            self.model = str(out_dir)
            return Row(
                stage,
                "skipped: unchanged",
                detail=_headline(stage, read_json(out_dir / "metrics.json")),
                output=str(out_dir),
            )
        metrics = getattr(module, f"run_{stage}")(
            self.recipe,
            self.model,
            out_dir,
            resume=self.args.resume,
            overwrite=self.args.overwrite,
            report_to=self.report_to,
        )
        self.model = str(out_dir)
        return Row(stage, "ran", detail=_headline(stage, metrics), output=str(out_dir))

    def run_annotate(self, entry: Callable[..., Any]) -> Row:
        """Hashed exactly as run_annotate hashes itself, so its own manifest tells whether it is current."""
        import inspect

        from hippocrates.stages.common import compute_inputs_hash, is_current, model_fingerprint

        cfg = self.recipe.stages.annotate
        out_dir = self.out / "annotate"
        prompts = Path(cfg.prompts)
        data = [{"path": str(cfg.prompts), "sha256": sha256_file(prompts) if prompts.is_file() else None}]
        inputs_hash = compute_inputs_hash(
            "annotate", cfg.model_dump(mode="json"), self.recipe, model_fingerprint(self.model), data
        )
        if "annotate" not in self.forced and is_current(out_dir, inputs_hash):
            metrics = read_json(out_dir / "metrics.json") if (out_dir / "metrics.json").is_file() else {}
            return Row("annotate", "skipped: unchanged", detail=_pairs(metrics), output=str(out_dir))
        kwargs = (
            {"overwrite": self.args.overwrite} if "overwrite" in inspect.signature(entry).parameters else {}
        )
        metrics = entry(self.recipe, self.model, out_dir, **kwargs) or {}
        return Row("annotate", "ran", detail=_pairs(metrics), output=str(out_dir))

    def run_eval(self, entry: Callable[..., Any]) -> Row:
        from hippocrates.stages.common import compute_inputs_hash, model_fingerprint, resolve_precision

        cfg = self.recipe.eval
        data = _file_identities(cfg.data)
        ran, details = 0, []
        for shots in cfg.num_fewshot:
            out_dir = self.out / "eval" / f"{shots}shot"
            config = {**cfg.model_dump(mode="json"), "num_fewshot": shots}
            inputs_hash = compute_inputs_hash(
                "eval", config, self.recipe, model_fingerprint(self.model), data
            )
            name = f"eval-{shots}shot"
            if "eval" in self.forced or not self.stamp_current(name, inputs_hash, [out_dir / "results.json"]):
                entry(
                    self.model,
                    cfg.tasks,
                    data=cfg.data or None,
                    num_fewshot=shots,
                    prompt=cfg.prompt,
                    chat_template=cfg.chat_template,
                    limit=cfg.limit,
                    batch_size=cfg.batch_size,
                    output_dir=out_dir,
                    precision=resolve_precision(self.recipe.precision),
                )
                self.write_stamp(name, inputs_hash)
                ran += 1
            details.append(f"{shots}-shot mean acc={_mean_acc(out_dir / 'results.json')}")
        state = "ran" if ran else "skipped: unchanged"
        return Row("eval", state, detail="; ".join(details), output=str(self.out / "eval"))

    def run_ablate(self, entry: Callable[..., Any]) -> Row:
        """The paper's stage-contribution table; reuses this run's stage outputs and evaluations."""
        cfg = self.recipe.analyses.ablation
        data = entry(self.recipe, shots=cfg.num_fewshot, limit=cfg.limit, force_eval="ablate" in self.forced)
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
        return Row("ablate", state, detail=detail, output=str(self.out / "ablation"))

    def run_sweep(self, entry: Callable[..., Any]) -> Row:
        """Prompt x chat template x shots on the final model, into OUTPUT/sweep/."""
        from hippocrates.stages.common import compute_inputs_hash, model_fingerprint, resolve_precision

        cfg, ev = self.recipe.analyses.sweep, self.recipe.eval
        tasks = cfg.tasks or ev.tasks
        out_dir = self.out / "sweep"
        files = {t: p for t, p in ev.data.items() if t in tasks}
        data = _file_identities(files)
        config = {**cfg.model_dump(mode="json"), "tasks": tasks, "eval_limit": ev.limit}
        inputs_hash = compute_inputs_hash("sweep", config, self.recipe, model_fingerprint(self.model), data)
        state = "skipped: unchanged"
        if "sweep" in self.forced or not self.stamp_current("sweep", inputs_hash, [out_dir / "sweep.json"]):
            entry(
                self.model, tasks, files or None, cfg.prompts, cfg.chat_template, cfg.num_fewshot, out_dir,
                limit=cfg.limit or ev.limit, batch_size=ev.batch_size,
                precision=resolve_precision(self.recipe.precision),
            )  # fmt: skip
            self.write_stamp("sweep", inputs_hash)
            state = "ran"
        rows = read_json(out_dir / "sweep.json").get("rows", [])
        best = max(
            (r for r in rows if isinstance(r.get("average"), float)), key=lambda r: r["average"], default=None
        )
        detail = f"{len(rows)} combinations"
        if best:
            chat = "chat" if best["chat_template"] else "plain"
            detail += f"; best {best['prompt']}-{chat} {best['num_fewshot']}-shot {best['average']:.3f}"
        return Row("sweep", state, detail=detail, output=str(out_dir))

    def run_external(self, stage: str, entry: Callable[..., Any]) -> Row:
        status(f"pipeline: {stage}")
        if stage == "annotate":
            return self.run_annotate(entry)
        if stage == "eval":
            return self.run_eval(entry)
        if stage == "ablate":
            return self.run_ablate(entry)
        if stage == "sweep":
            return self.run_sweep(entry)
        return Row("report", "ran", output=str(entry(self.out)))

    def run(self) -> list[Row]:
        self.check_outputs()
        for stage in ORDER:
            enabled = stage in [*self.recipe.enabled_stages(), "report"]
            if not enabled:
                self.rows.append(Row(stage, "disabled in recipe"))
                continue
            t0 = time.time()
            if stage in TRAINING:
                status(f"pipeline: {stage}")
                row = self.run_training(stage)
            elif stage not in self.selected:
                row = Row(stage, "not selected")
            elif (entry := load_entry(stage)) is None:
                module = EXTERNAL[stage][0]
                status(f"pipeline: {stage} skipped: {module} has not landed yet")
                row = Row(stage, "skipped: not landed", detail=f"{module} is missing")
            elif stage == "ablate" and accel.world_size() > 1:
                # it trains one more model (all ranks) and evaluates (one rank): run it on its own
                status("pipeline: ablate skipped under a distributed launch; run `hippo ablate RECIPE` after")
                row = Row(stage, "skipped: distributed launch", detail="run `hippo ablate RECIPE` afterwards")
            else:
                with accel.main_process_first():  # one rank evaluates and writes; the others wait
                    row = self.run_external(stage, entry) if accel.is_main_process() else Row(stage, "rank 0")
            row.seconds = time.time() - t0
            self.rows.append(row)
        return self.rows


def _file_identities(files: dict[str, str]) -> list[dict[str, str]]:
    """Each task's data file by sha256 (or by name when it is a hub id), for the inputs hash."""
    return [
        {"task": t, "sha256": sha256_file(p) if Path(p).is_file() else p} for t, p in sorted(files.items())
    ]


def _headline(stage: str, metrics: dict[str, Any]) -> str:
    keys = {
        "cpt": ("eval_perplexity_before", "eval_perplexity_after", "ppl"),
        "sft": ("eval_loss_before", "eval_loss_after", "held-out loss"),
        "dpo": ("eval_reward_accuracy_before", "eval_reward_accuracy_after", "reward acc"),
    }[stage]
    before, after = metrics.get(keys[0]), metrics.get(keys[1])
    if before is None or after is None:
        return f"train_loss={metrics.get('train_loss')}"
    return f"{keys[2]} {before:.3f} -> {after:.3f}"


def _pairs(metrics: dict[str, Any]) -> str:
    pairs = metrics.get("preference_pairs")
    return f"preference pairs={pairs}" if pairs is not None else ""


def _mean_acc(path: Path) -> str:
    if not path.is_file():
        return "?"
    accs = [
        t.get("acc")
        for t in read_json(path).get("tasks", {}).values()
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
    not_landed = [r.stage for r in rows if r.status == "skipped: not landed"]
    counts = {s: sum(r.status.startswith(s) for r in rows) for s in ("ran", "skipped: unchanged")}
    print(
        f"  {counts['ran']} ran, {counts['skipped: unchanged']} unchanged, "
        f"{len(not_landed)} skipped because not landed{': ' + ', '.join(not_landed) if not_landed else ''}",
        file=file,
    )
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
    print("stages that will run, in order:")
    for i, stage in enumerate(selected_stages(recipe, args.stages), 1):
        landed = stage not in EXTERNAL or load_entry(stage) is not None
        print(f"  {i}. {stage}{'' if landed else ' (not landed yet: will be skipped)'}")
    print(f"outputs: {recipe.output_dir}/<stage>/")
    return 0


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    status(f"recipe {args.recipe} is valid: {recipe.name}, base model {recipe.base_model}")
    if args.dry_run:
        return dry_run(recipe, args)
    pipeline = Pipeline(recipe, args)
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
