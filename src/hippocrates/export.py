"""``hippo export STAGE_DIR --to DIR [--hub REPO_ID]``: a stage output as a Hugging Face Hub model.

The folder holds what the Hub and ``from_pretrained`` expect: the safetensors weights, config,
generation config, tokenizer (with its chat template) and a model card whose metadata says what
the model is: ``base_model`` as the Hub id when it is known (an alias's source model, or a Hub id
in the recipe), the Hub datasets it was trained on, the license, the tags, and the evaluation
results of exactly this model (results whose manifest names this stage's fingerprint) in the
Hub's ``model-index`` form. The card's text adds the training figures (losses, held-out measures,
the merge record) and the local data files with their sha256. Cards are written with
``huggingface_hub`` (``ModelCard``, ``ModelCardData``, ``EvalResult``), uploads too.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

from hippocrates.data.io import atomic_dir, check_writable, read_json_object
from hippocrates.errors import HippoError
from hippocrates.progress import status
from hippocrates.record import Manifest, read_manifest

COPY = ("config.json", "generation_config.json", "chat_template.jinja", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt")  # fmt: skip
TRAINED = ("cpt", "sft", "dpo", "grpo")


def base_hub_id(spec: str | None) -> str | None:
    """The Hub id of a base model spec: a Hub id itself, or the model an alias ships."""
    from hippocrates.models import ALIASES, HUB_ID

    if not spec:
        return None
    if spec in ALIASES:
        return ALIASES[spec].hub_id
    if HUB_ID.match(spec) and not Path(spec).exists():
        return spec
    return None


def chain(folder: Path) -> list[tuple[Path, Manifest]]:
    """This stage and the stages it was trained from, newest first (as far as their folders exist)."""
    out: list[tuple[Path, Manifest]] = []
    while (manifest := read_manifest(folder)) is not None and manifest.stage in TRAINED:
        out.append((folder, manifest))
        if manifest.input_model is None:
            break
        folder = Path(manifest.input_model.path)
    return out


def evaluations(run: Path, fingerprint: str) -> list[tuple[int, dict[str, Any]]]:
    """(shots, results.json) of the evaluations of exactly this model under the run folder."""
    found = []
    for manifest_path in sorted(run.glob("**/manifest.json")):
        manifest = read_manifest(manifest_path.parent)
        if (
            manifest
            and manifest.stage == "eval"
            and manifest.input_model
            and manifest.input_model.fingerprint == fingerprint
        ):
            results = read_json_object(manifest_path.parent / "results.json")
            found.append((int(results.get("num_fewshot", 0)), results))
    return found


def eval_results(found: list[tuple[int, dict[str, Any]]]):
    from huggingface_hub import EvalResult

    from hippocrates.eval.registry import load_registry

    registry = load_registry()
    out = []
    for shots, results in found:
        for task, m in (results.get("tasks") or {}).items():
            if not isinstance(m.get("acc"), float):
                continue
            spec = registry.get(task)
            dataset = spec.hf.path if spec and spec.hf else task
            name = spec.describe() if spec else task
            how = (
                f"generative, up to {results.get('max_new_tokens')} new tokens, {m.get('unparsed')} unparsed"
                if results.get("mode") == "generate"
                else f"prompt {results.get('prompt')}, protocol {results.get('protocol', 'v0.4')}"
            )
            for metric in ("acc", "acc_norm"):
                if isinstance(m.get(metric), float):
                    out.append(EvalResult(
                        task_type="multiple-choice", dataset_type=dataset, dataset_name=name,
                        dataset_split=spec.hf.split if spec and spec.hf else None, metric_type="accuracy",
                        metric_value=round(m[metric], 4),
                        metric_name=f"{metric} ({shots}-shot, {how}, n={m.get('n')})",
                    ))  # fmt: skip
    return out


def card(folder: Path, stages: list[tuple[Path, Manifest]], found: list, name: str, license: str) -> Any:
    from huggingface_hub import ModelCard, ModelCardData

    manifest = stages[0][1]
    recipe = manifest.recipe or {}
    base = base_hub_id(recipe.get("base_model"))
    hub_data = sorted({d["path"] for _, m in stages for d in m.data if d.get("hub")})
    data = ModelCardData(
        model_name=name, base_model=base, datasets=hub_data or None, license=license, library_name="transformers",
        tags=["hippocrates", "medical", *[m.stage for _, m in reversed(stages)], "lora"],
        eval_results=eval_results(found) or None, pipeline_tag="text-generation",
    )  # fmt: skip
    lines = [f"# {name}", "", f"A medical language model trained with Hippocrates: "
             f"{' → '.join(m.stage.upper() for _, m in reversed(stages))} from "
             f"`{recipe.get('base_model', '?')}`" + (f" ([{base}](https://huggingface.co/{base}))" if base else "") + ".",
             "", "## Training", ""]  # fmt: skip
    for path, m in reversed(stages):
        metrics = read_json_object(path / "metrics.json") if (path / "metrics.json").is_file() else {}
        merge = metrics.get("merge") or {}
        shown = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        figures = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in list(shown.items())[:10]
        )
        lines.append(f"- **{m.stage}** (finished {m.finished}): {figures}")
        if merge:
            lines.append(f"  - merged in fp32, stored as {merge.get('dtype')}: {100 * merge.get('update_retained', 0):.2f}% "
                         f"of the weight update kept, max |Δ logit| {merge.get('max_abs_logit_diff')}")  # fmt: skip
        for d in m.data:
            if not d.get("hub"):
                lines.append(
                    f"  - data `{Path(d.get('path', '?')).name}` sha256 `{str(d.get('sha256', ''))[:16]}…`"
                )
    if found:
        lines += ["", "## Evaluation", "", "| task | shots | acc | acc_norm | n |", "|---|---|---|---|---|"]
        for shots, results in found:
            for task, m in (results.get("tasks") or {}).items():
                lines.append(f"| {task} | {shots} | {m.get('acc')} | {m.get('acc_norm')} | {m.get('n')} |")
    lines += ["", "## Intended use", "", "Research on medical language models. Not a medical device: its answers can "
              "be wrong or unsafe and must not be used for diagnosis or treatment.", ""]  # fmt: skip
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines))


def export(stage_dir: Path, to: Path, *, name: str | None = None, license: str = "other") -> Path:
    """Write the Hub-ready folder ``to`` for the stage output ``stage_dir`` (atomically)."""
    stage_dir = Path(stage_dir)
    if not (stage_dir / "config.json").is_file():
        raise HippoError(f"{stage_dir}: not a model folder (no config.json)")
    stages = chain(stage_dir)
    if not stages:
        raise HippoError(f"{stage_dir}: not a Hippocrates stage output (no readable manifest.json)")
    check_writable(to.parent)
    name = name or f"{stages[0][1].recipe_name or 'hippocrates'}-{stages[0][1].stage}"
    run = stage_dir.parent
    found = evaluations(run, stages[0][1].fingerprint)
    with atomic_dir(to) as tmp:
        for weights in sorted(stage_dir.glob("*.safetensors")) + sorted(
            stage_dir.glob("*.safetensors.index.json")
        ):
            shutil.copy2(weights, tmp / weights.name)
        for file in COPY:
            if (stage_dir / file).is_file():
                shutil.copy2(stage_dir / file, tmp / file)
        if (stage_dir / "adapter").is_dir():
            shutil.copytree(stage_dir / "adapter", tmp / "adapter")
        shutil.copy2(stage_dir / "manifest.json", tmp / "hippocrates_manifest.json")
        card(stage_dir, stages, found, name, license).save(tmp / "README.md")
    status(f"export: {to} ({len(found)} evaluation(s) of this model in the card)")
    return to


def upload(folder: Path, repo_id: str, private: bool) -> str:
    """Upload the folder with huggingface_hub; offline or without a token is one line."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise HippoError(
            f"--hub {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded (the folder {folder} is written)"
        )
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, commit_message="Upload from hippocrates"
        )
    except Exception as exc:  # network, authentication, permissions: the hub's own message
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HippoError(
            f"--hub {repo_id}: upload failed ({first}); the folder {folder} is written"
        ) from None
    return str(getattr(info, "commit_url", repo_id))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage_dir", type=Path, help="a stage output folder (e.g. runs/demo/dpo)")
    parser.add_argument("--to", type=Path, help="the folder to write (default: STAGE_DIR-export)")
    parser.add_argument("--hub", metavar="REPO_ID", help="also upload the folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--name", help="model name in the card (default: RECIPE-STAGE)")
    parser.add_argument("--license", default="other", help="license id for the card (default: other)")


def run(args: argparse.Namespace) -> int:
    from hippocrates.lock import hold

    to = args.to or args.stage_dir.with_name(f"{args.stage_dir.name}-export")
    with hold(args.stage_dir.parent):
        folder = export(args.stage_dir, to, name=args.name, license=args.license)
    print(f"export: {folder}")
    if args.hub:
        print(f"uploaded: {upload(folder, args.hub, args.private)}")
    return 0
