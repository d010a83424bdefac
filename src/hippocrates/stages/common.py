"""Bookkeeping shared by the training stages: output ownership, change detection, checkpoints,
model loading with LoRA, Trainer arguments, and the atomic write of a finished stage.

A stage's identity is its ``inputs_hash``: the resolved stage config, seed and precision, the input
model's fingerprint and the sha256 of every data file. The pipeline skips a stage whose manifest
holds the same hash. A finished stage gets a fresh ``fingerprint`` (its hash plus its finish time),
which is what the next stage hashes as its input model, so rerunning a stage reruns everything after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hippocrates import __version__
from hippocrates.accel import is_main_process, main_process_first, world_size
from hippocrates.config import LoraConfig, Recipe, TrainConfig, recipe_to_dict
from hippocrates.data.io import atomic_dir, read_json, write_json
from hippocrates.errors import HippoError
from hippocrates.progress import status

MANIFEST = "manifest.json"
PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "tokenizers")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def resolve_precision(precision: str) -> str:
    """``auto`` is bf16 on a GPU and fp32 on CPU; fp16 needs a GPU."""
    import torch

    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    if precision == "fp16" and not torch.cuda.is_available():
        raise HippoError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    return precision


def stage_dir(recipe: Recipe, stage: str) -> Path:
    return Path(recipe.output_dir) / stage


def work_dir_for(out_dir: Path) -> Path:
    """Trainer checkpoints live here until the stage succeeds: ``OUTPUT/.work/STAGE``."""
    return out_dir.parent / ".work" / out_dir.name


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST
    return read_json(path) if path.is_file() else None


def check_owner(out_dir: Path, recipe: Recipe, overwrite: bool) -> None:
    """Refuse to replace a stage written by another recipe (or a folder we did not write)."""
    if overwrite or not out_dir.exists():
        return
    manifest = read_manifest(out_dir)
    if manifest is None:
        if any(out_dir.iterdir()):
            raise HippoError(
                f"{out_dir} exists and is not a Hippocrates stage output; pass --overwrite to replace it"
            )
        return
    if manifest.get("recipe_name") != recipe.name:
        raise HippoError(
            f"{out_dir} holds the {manifest.get('stage', '?')} stage of another run "
            f"(recipe '{manifest.get('recipe_name')}'); change output_dir or pass --overwrite"
        )


def model_fingerprint(path: str) -> str:
    """A cheap identity for a model: a stage output's own fingerprint, else config + weight file stats."""
    p = Path(path)
    if not p.is_dir():
        from hippocrates.models import resolve_model

        resolved = resolve_model(path)  # an alias resolves to its converted (sha-named) cache dir
        if not resolved.is_local:
            return digest({"spec": str(path)})
        p = Path(resolved.path)
    manifest = read_manifest(p)
    if manifest and manifest.get("fingerprint"):
        return manifest["fingerprint"]
    parts: dict[str, Any] = {}
    for name in sorted(os.listdir(p)):
        f = p / name
        if name in ("config.json", "hippo_source.json"):
            parts[name] = f.read_text(encoding="utf-8")
        elif name.endswith((".safetensors", ".bin", ".gguf")):
            st = f.stat()
            parts[name] = [st.st_size, st.st_mtime_ns]
    return digest(parts)


def compute_inputs_hash(
    stage: str, config: dict[str, Any], recipe: Recipe, model_fp: str, data: list[dict]
) -> str:
    return digest(
        {
            "stage": stage,
            "config": config,
            "seed": recipe.seed,
            "precision": resolve_precision(recipe.precision),
            "model": model_fp,
            "data": data,
        }
    )


def is_current(out_dir: Path, inputs_hash: str) -> bool:
    """True when the stage output is complete and was made from exactly these inputs."""
    manifest = read_manifest(out_dir)
    return bool(manifest and manifest.get("inputs_hash") == inputs_hash)


def default_report_to() -> list[str]:
    from transformers.integrations import is_tensorboard_available

    return ["tensorboard"] if is_tensorboard_available() else []


@dataclass
class StageRun:
    """Everything a stage needs to know about the run it is part of."""

    stage: str
    recipe: Recipe
    model_path: str
    out_dir: Path
    config: dict[str, Any]
    data: list[dict[str, Any]]
    inputs_hash: str
    model_fp: str
    precision: str
    resume_from: str | None = None
    report_to: list[str] = field(default_factory=list)
    callbacks: list[Any] = field(default_factory=list)
    started: str = field(default_factory=now)
    t0: float = field(default_factory=time.time)
    cpu0: float = field(default_factory=time.process_time)
    notes: list[str] = field(default_factory=list)

    @property
    def work_dir(self) -> Path:
        return work_dir_for(self.out_dir)


def begin_stage(
    stage: str,
    recipe: Recipe,
    model_path: str,
    out_dir: Path,
    config: dict[str, Any],
    data: list[dict[str, Any]],
    *,
    resume: bool = False,
    overwrite: bool = False,
    report_to: list[str] | None = None,
    callbacks: list[Any] | None = None,
) -> StageRun:
    """Check ownership, hash the inputs and prepare (or resume) the checkpoint folder."""
    from transformers.trainer_utils import get_last_checkpoint

    out_dir = Path(out_dir)
    check_owner(out_dir, recipe, overwrite)
    with main_process_first(local=True):  # an alias or GGUF is converted into the node's cache once
        model_fp = model_fingerprint(model_path)
    inputs_hash = compute_inputs_hash(stage, config, recipe, model_fp, data)
    run = StageRun(
        stage=stage,
        recipe=recipe,
        model_path=str(model_path),
        out_dir=out_dir,
        config=config,
        data=data,
        inputs_hash=inputs_hash,
        model_fp=model_fp,
        precision=resolve_precision(recipe.precision),
        report_to=default_report_to() if report_to is None else report_to,
        callbacks=list(callbacks or []),
    )
    # Under a launcher the main process prepares the checkpoint folder while the others wait; they
    # then find the same checkpoint to resume from (or none, after the main process cleared it).
    main = is_main_process()
    with main_process_first():
        work, stamp = run.work_dir, run.work_dir / "inputs.json"
        last = get_last_checkpoint(str(work)) if work.is_dir() else None
        if resume and last:
            previous = read_json(stamp).get("inputs_hash") if stamp.is_file() else None
            if previous != inputs_hash:
                raise HippoError(
                    f"{work}: its checkpoints were made from different inputs (config, model or data changed); "
                    "rerun without --resume to start over"
                )
            run.resume_from = last
            if main:
                status(f"{stage}: resuming from {last}")
        elif main:
            if last:
                status(
                    f"{stage}: discarding the checkpoints of an interrupted run in {work} (use --resume to continue)"
                )
            shutil.rmtree(work, ignore_errors=True)
            if resume:
                status(f"{stage}: nothing to resume in {work}; starting from the beginning")
        if main:
            work.mkdir(parents=True, exist_ok=True)
            write_json(stamp, {"inputs_hash": inputs_hash, "stage": stage, "recipe_name": recipe.name})
    return run


def load_for_training(run: StageRun):
    """Load the input model and tokenizer in the stage precision (bf16 weights when training in bf16)."""
    from hippocrates.models import load_model, load_tokenizer, resolve_model

    resolved = resolve_model(run.model_path)
    tokenizer = load_tokenizer(resolved, trust_remote_code=run.recipe.trust_remote_code)
    model = load_model(resolved, precision=run.precision, trust_remote_code=run.recipe.trust_remote_code)
    drop_inert_quantizer(model)
    model.config.use_cache = False
    return model, tokenizer


def drop_inert_quantizer(model) -> None:
    """A de-quantized GGUF keeps ``quantization_config`` in its config although its layers are plain
    float ``nn.Linear``; left in place it would make the Trainer refuse to train and be copied into
    every merged model we save."""
    import torch

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or type(quantizer).__name__ != "GgufHfQuantizer":
        return
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if linears and all(type(m) is torch.nn.Linear and m.weight.is_floating_point() for m in linears):
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def peft_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )


def trainer_kwargs(run: StageRun, train: TrainConfig, *, batch_size: int | None = None) -> dict[str, Any]:
    """Keyword arguments for TrainingArguments (and TRL configs, which extend it)."""
    import torch

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.work_dir / "tensorboard")
    return dict(
        output_dir=str(run.work_dir),
        per_device_train_batch_size=batch_size or train.batch_size,
        per_device_eval_batch_size=batch_size or train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=train.weight_decay,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        activation_checkpointing=train.gradient_checkpointing,
        seed=run.recipe.seed,
        data_seed=run.recipe.seed,
        bf16=run.precision == "bf16",
        fp16=run.precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        report_to=run.report_to or "none",
        eval_strategy="no",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def wrap_lora(model, cfg: LoraConfig, train: TrainConfig, seed: int):
    """Seed, then wrap with a fresh LoRA: PEFT draws lora_A at random, so the seed must come first
    for a run (and a killed-and-resumed run) to be reproducible."""
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(seed)
    model = get_peft_model(model, peft_config(cfg))
    enable_checkpointing_inputs(model, train)
    return model


def enable_checkpointing_inputs(model, train: TrainConfig) -> None:
    """PEFT + gradient checkpointing needs input embeddings that require grad."""
    if train.gradient_checkpointing:
        model.enable_input_require_grads()


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "hippocrates": __version__}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "world_size": world_size(),  # processes that trained (accelerate / torchrun)
    }
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def manifest_for(run: StageRun, finished: str, fingerprint: str) -> dict[str, Any]:
    return {
        "stage": run.stage,
        "recipe_name": run.recipe.name,
        "recipe_path": run.recipe.source_path,
        "hippocrates_version": __version__,
        "inputs_hash": run.inputs_hash,
        "fingerprint": fingerprint,
        "input_model": {"path": run.model_path, "fingerprint": run.model_fp},
        "config": run.config,
        "data": run.data,
        "seed": run.recipe.seed,
        "precision": run.precision,
        "started": run.started,
        "finished": finished,
        "duration_s": round(time.time() - run.t0, 1),
        "resumed_from": run.resume_from,
        "packages": package_versions(),
        "git_commit": git_commit(),
        "hardware": hardware(),
        "command": sys.argv,
        "recipe": recipe_to_dict(run.recipe),
    }


def finish_stage(run: StageRun, model, tokenizer, metrics: dict[str, Any]) -> dict[str, Any]:
    """Write adapter, merged model, metrics, manifest and model card atomically; drop the checkpoints.

    Under a launcher (accelerate, torchrun) only the main process writes, exactly once; every
    other process waits at a barrier until the stage folder is complete, so no process returns
    (or exits) before the outputs exist.
    """
    finished = now()
    fingerprint = digest({"inputs_hash": run.inputs_hash, "finished": finished, "t": time.time()})
    timing = {
        "stage_wall_s": round(time.time() - run.t0, 1),
        "stage_cpu_s": round(time.process_time() - run.cpu0, 1),
    }
    metrics = {"stage": run.stage, **metrics, **timing, "notes": run.notes}
    with main_process_first():  # the others wait here until the main process has written
        if is_main_process():
            _write_stage(run, model, tokenizer, metrics, manifest_for(run, finished, fingerprint))
    return metrics


def _write_stage(run: StageRun, model, tokenizer, metrics: dict[str, Any], manifest: dict[str, Any]) -> None:
    from hippocrates.stages.card import model_card
    from hippocrates.stages.modeling import remove_masked_head

    with atomic_dir(run.out_dir) as tmp:
        status(
            f"{run.stage}: saving adapter and merged model to {run.out_dir} ({time.time() - run.t0:.0f}s in)"
        )
        model.save_pretrained(tmp / "adapter")
        merged = model.merge_and_unload()
        remove_masked_head(merged)
        drop_inert_quantizer(merged)
        merged.config.use_cache = True
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        logs = run.work_dir / "tensorboard"
        if logs.is_dir():
            shutil.copytree(logs, tmp / "tensorboard")
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / MANIFEST, manifest)
        (tmp / "README.md").write_text(model_card(run, metrics), encoding="utf-8")
    shutil.rmtree(run.work_dir, ignore_errors=True)
    status(f"{run.stage}: done in {time.time() - run.t0:.0f}s")


def train_summary(trainer, run: StageRun) -> dict[str, Any]:
    """The common part of metrics.json: final loss, steps, time and the Trainer's log history."""
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    return {
        "train_loss": losses[-1] if losses else None,
        "train_loss_first": losses[0] if losses else None,
        "train_steps": trainer.state.global_step,
        "train_runtime_s": next(
            (h["train_runtime"] for h in reversed(history) if "train_runtime" in h), None
        ),
        "log_history": history,
    }


# ----------------------------------------------------------------------------------------------- CLI


def add_stage_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument(
        "--model",
        help="input model (default: the previous enabled stage's output when it exists, else base_model)",
    )
    parser.add_argument("--output", help=f"output folder (default: OUTPUT/{stage})")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint of an interrupted run"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an output folder written by another run"
    )
    parser.add_argument(
        "--report-to",
        help="comma-separated Trainer integrations (tensorboard, wandb, none; default tensorboard if installed)",
    )


def report_to_arg(value: str | None) -> list[str] | None:
    """``--report-to a,b`` as the Trainer's list; a logger that is not installed is a usage error."""
    import importlib.util

    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if names == ["none"]:
        return []
    for name in names:
        module = {"comet_ml": "comet_ml", "tensorboard": "tensorboard"}.get(name, name)
        if name != "all" and importlib.util.find_spec(module) is None:
            raise HippoError(
                f"--report-to {name}: the '{module}' package is not installed (pip install {module})"
            )
    return names


def default_input_model(recipe: Recipe, stage: str) -> str:
    """The model a standalone stage trains: the latest earlier training stage's output, else the base."""
    order = ["cpt", "sft", "dpo"]
    for previous in reversed(order[: order.index(stage)]):
        if getattr(recipe.stages, previous).enabled and read_manifest(stage_dir(recipe, previous)):
            return str(stage_dir(recipe, previous))
    return recipe.base_model


def print_result(stage: str, out_dir: Path, metrics: dict[str, Any], keys: list[str]) -> None:
    if not is_main_process():  # one summary per job, not one per process
        return
    shown = ", ".join(
        f"{k}={metrics[k]:.4g}" if isinstance(metrics.get(k), float) else f"{k}={metrics.get(k)}"
        for k in keys
    )
    print(f"{stage}: {shown}")
    print(f"{stage}: model, adapter/, metrics.json, manifest.json, README.md in {out_dir}")


def source_inputs(cfg: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A stage's resolved config and the identities of its training and eval sources (inputs hash)."""
    from hippocrates.data.sources import describe

    data = [describe(s) for s in cfg.data] + [{**describe(s), "role": "eval"} for s in cfg.eval_data]
    return cfg.model_dump(mode="json"), data


def run_stage_command(args: argparse.Namespace, stage: str, train: Any, keys: list[str]) -> int:
    """``hippo cpt|sft|dpo RECIPE``: train one stage from the recipe and print its headline metrics."""
    from hippocrates.config import load_recipe

    recipe = load_recipe(args.recipe)
    model = args.model or default_input_model(recipe, stage)
    out = Path(args.output) if args.output else stage_dir(recipe, stage)
    metrics = train(
        recipe,
        model,
        out,
        resume=args.resume,
        overwrite=args.overwrite,
        report_to=report_to_arg(args.report_to),
    )
    print_result(stage, out, metrics, keys)
    return 0
