"""Check, before hours of work, everything a recipe's selected steps will need.

``preflight(recipe, stages)`` resolves every model the steps load (base model, judge, an explicit
input model), opens every local data file they read and decodes it (each record of JSONL, CSV and
JSON sources; each evaluation task parsed the way the evaluation will parse it), and makes sure
every output folder can be written. The first problem is one line naming the recipe file, line
and key, or the path: a missing ``eval.data`` file fails in a second, not after CPT, SFT and DPO.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from hippocrates.config import Recipe, Source
from hippocrates.data.io import check_writable
from hippocrates.errors import HippoError


def _at(recipe: Recipe, key: str, exc: HippoError) -> HippoError:
    message = str(exc)
    return HippoError(
        message if message.startswith(str(recipe.source_path or "\0")) else f"{recipe.where(key)}: {message}"
    )


def check_model(recipe: Recipe, key: str, spec: str) -> None:
    """The model resolves (an alias is installed, a folder has config.json, a GGUF is intact)."""
    from hippocrates.models import resolve_model

    try:
        resolve_model(spec)
    except HippoError as exc:
        raise _at(recipe, key, exc) from None


def check_source(recipe: Recipe, key: str, source: Source, how: str) -> None:
    """Every record of a local source is readable and of a shape its stage accepts."""
    from hippocrates.data.sources import is_local, iter_records, text_of

    if not is_local(source):
        return  # hub datasets are checked when they are downloaded
    path = Path(source.path).expanduser()
    if not path.is_file():
        raise HippoError(f"{recipe.where(key + '.path')}: {path}: data file not found")
    if how == "text":
        for where, record in iter_records(source):
            text_of(record, source.text_field, where)
    elif how == "conversation":
        from hippocrates.data.sources import iter_conversations

        for _ in iter_conversations(source):
            pass
    elif how == "preference":
        from collections import Counter

        from hippocrates.stages.dpo import load_pairs

        load_pairs([source], Counter())


def check_eval(recipe: Recipe, tasks: Iterable[str], key: str = "eval") -> None:
    """Each evaluation task resolves and its file parses (skipped records are the evaluation's business)."""
    from hippocrates.eval.loaders import load_task
    from hippocrates.eval.registry import resolve_tasks

    names = list(tasks)
    try:
        specs = resolve_tasks(names)
    except HippoError as exc:
        raise _at(recipe, f"{key}.tasks", exc) from None
    for spec in specs:
        path = recipe.eval.data.get(spec.task)
        if path is None:
            continue  # a hub dataset, downloaded when evaluated
        if not Path(path).exists():
            raise HippoError(f"{recipe.where(f'eval.data.{spec.task}')}: {path}: file not found")
        try:
            load_task(spec, data=path)
        except HippoError as exc:
            raise _at(recipe, f"eval.data.{spec.task}", exc) from None
    unknown = sorted(set(recipe.eval.data) - {s.task for s in specs})
    if unknown and key == "eval":
        raise HippoError(
            f"{recipe.where(f'eval.data.{unknown[0]}')}: task '{unknown[0]}' is not in eval.tasks"
        )


def preflight(
    recipe: Recipe,
    stages: Iterable[str],
    *,
    model: str | None = None,
    outputs: Iterable[Path] = (),
) -> None:
    """Raise a one-line HippoError for the first thing the selected steps would fail on."""
    selected = set(stages)
    st = recipe.stages
    check_model(recipe, "base_model", recipe.base_model)
    if model and model != recipe.base_model:
        from hippocrates.models import resolve_model

        resolve_model(model)
    if "cpt" in selected:
        for i, s in enumerate(st.cpt.data):
            check_source(recipe, f"stages.cpt.data.{i}", s, "text")
        for i, s in enumerate(st.cpt.eval_data):
            check_source(recipe, f"stages.cpt.eval_data.{i}", s, "text")
    if "sft" in selected or "ablate" in selected:
        for i, s in enumerate(st.sft.data):
            check_source(recipe, f"stages.sft.data.{i}", s, "conversation")
        for i, s in enumerate(st.sft.eval_data):
            check_source(recipe, f"stages.sft.eval_data.{i}", s, "conversation")
    if "annotate" in selected or ("dpo" in selected and not st.dpo.data):
        from hippocrates.rlaif.annotate import check_judge
        from hippocrates.rlaif.candidates import load_prompts

        try:
            load_prompts(st.annotate.prompts, st.annotate.prompt_field, st.annotate.max_prompts)
        except HippoError as exc:
            raise _at(recipe, "stages.annotate.prompts", exc) from None
        try:
            check_judge(st.annotate.judge)
        except HippoError as exc:
            raise _at(recipe, "stages.annotate.judge", exc) from None
    if "dpo" in selected:
        for i, s in enumerate(st.dpo.data):
            check_source(recipe, f"stages.dpo.data.{i}", s, "preference")
    if "grpo" in selected and hasattr(st, "grpo"):
        from hippocrates.stages.grpo import check_grpo

        check_grpo(recipe)
    if selected & {"eval", "ablate"}:
        check_eval(recipe, recipe.eval.tasks)
    if "eval" in selected and recipe.eval.rubric is not None and recipe.eval.rubric.enabled:
        from hippocrates.eval.rubric import check_recipe

        check_recipe(recipe)
    if "sweep" in selected:
        check_eval(recipe, recipe.analyses.sweep.tasks or recipe.eval.tasks, "analyses.sweep")
    for folder in [Path(recipe.output_dir), *outputs]:
        check_writable(folder if folder == Path(recipe.output_dir) else folder.parent)
