"""The life of a training stage: plan, begin (or resume), train, save, merge, record.

A stage's inputs are a :class:`hippocrates.record.Step` (config, input model, data, seed,
precision); the pipeline and the ablation skip a stage whose folder is :func:`record.current`
for those inputs. While a stage trains, its Trainer checkpoints live in a hidden folder beside
its output (``.sft.work`` for ``sft``). Each checkpoint gets a completion marker once the Trainer
has written all of it, so a checkpoint torn by ``kill -9`` is recognised, removed and reported, and
``--resume`` continues from the newest complete one.

At the end every process takes part in saving the adapter (the Trainer's own save, which gathers
sharded weights under FSDP or ZeRO-3); then the main process alone merges it, from that saved
adapter, into a full-precision copy of the input model (:mod:`hippocrates.stages.merge`) and
writes the output folder atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hippocrates.accel import is_main_process, main_process_first
from hippocrates.config import LoRASettings, Recipe, TrainSettings
from hippocrates.data.io import atomic_dir, check_writable, full_disk, require_space, write_json, write_text
from hippocrates.errors import HippoError
from hippocrates.models import resolve_precision
from hippocrates.progress import status
from hippocrates.record import Step, check_owner, now, write_manifest

COMPLETE = "hippo_complete.json"  # written into a checkpoint once the Trainer has saved all of it


def stage_dir(recipe: Recipe, stage: str) -> Path:
    return Path(recipe.output_dir) / stage


def work_dir_for(out_dir: Path) -> Path:
    """Trainer checkpoints live beside the output until the stage succeeds: ``.STAGE.work``."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}.work")


def training_step(stage: str, recipe: Recipe, model: str, config: dict[str, Any], data: list[dict]) -> Step:
    """The inputs of a training stage (what its inputs hash covers)."""
    return Step(
        stage,
        {**config, "merge_dtype": recipe.merge_dtype},
        model=str(model),
        data=data,
        seed=recipe.seed,
        precision=resolve_precision(recipe.precision),
    )


@dataclass
class StageRun:
    """Everything a stage needs to know about the run it is part of."""

    step: Step
    recipe: Recipe
    out_dir: Path
    resume_from: str | None = None
    report_to: list[str] = field(default_factory=list)
    callbacks: list[Any] = field(default_factory=list)
    started: str = field(default_factory=now)
    t0: float = field(default_factory=time.time)
    cpu0: float = field(default_factory=time.process_time)
    notes: list[str] = field(default_factory=list)

    @property
    def stage(self) -> str:
        return self.step.stage

    @property
    def model_path(self) -> str:
        return str(self.step.model)

    @property
    def precision(self) -> str:
        return str(self.step.precision)

    @property
    def config(self) -> dict[str, Any]:
        return self.step.config

    @property
    def work_dir(self) -> Path:
        return work_dir_for(self.out_dir)


# ------------------------------------------------------------------------------------- checkpoints


def _files(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(Path(COMPLETE).stem)
    }


def mark_complete(folder: Path) -> None:
    """Record every file of a finished checkpoint with its size (then it counts as complete)."""
    path = folder / COMPLETE
    files = _files(folder)
    with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as fh:
        json.dump({"files": files}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(path.with_suffix(".tmp"), path)


def is_complete(folder: Path) -> bool:
    """A checkpoint holds every file its marker lists, each at the recorded size."""
    try:
        listed = json.loads((folder / COMPLETE).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    have = _files(folder)
    return bool(listed) and all(have.get(name) == size for name, size in listed.items())


def _checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def newest_complete_checkpoint(work: Path) -> Path | None:
    """The newest complete checkpoint in ``work``; torn ones (a killed save) are removed and reported."""
    if not work.is_dir():
        return None
    found = sorted(
        (
            p
            for p in work.iterdir()
            if p.is_dir() and p.name.startswith("checkpoint-") and _checkpoint_step(p) >= 0
        ),
        key=_checkpoint_step,
        reverse=True,
    )
    for path in found:
        if is_complete(path):
            return path
        status(f"{path}: incomplete checkpoint (its save was interrupted); removing it")
        shutil.rmtree(path, ignore_errors=True)
    return None


def checkpoint_marker():
    """A Trainer callback that marks each checkpoint complete once the Trainer has saved all of it."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    mark_complete(folder)
            return control

    return MarkComplete()


# ------------------------------------------------------------------------------------------- begin


def begin_stage(
    step: Step,
    recipe: Recipe,
    out_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    report_to: list[str] | None = None,
    callbacks: list[Any] | None = None,
) -> StageRun:
    """Check ownership and writability, hash the inputs, and prepare (or resume) the checkpoint folder."""
    out_dir = Path(out_dir)
    check_owner(out_dir, recipe, overwrite)
    check_writable(out_dir.parent)
    with main_process_first(local=True):  # an alias or GGUF is converted into the node's cache once
        step.inputs_hash  # noqa: B018 (computes and caches the input model's fingerprint)
    run = StageRun(
        step=step,
        recipe=recipe,
        out_dir=out_dir,
        report_to=default_report_to() if report_to is None else report_to,
        callbacks=[*(callbacks or []), checkpoint_marker()],
    )
    # Under a launcher the main process prepares the checkpoint folder while the others wait; they
    # then find the same checkpoint to resume from (or none, after the main process cleared it).
    main = is_main_process()
    with main_process_first():
        work, stamp = run.work_dir, run.work_dir / "inputs.json"
        last = newest_complete_checkpoint(work) if main else _newest(work)
        if resume and last:
            try:
                previous = json.loads(stamp.read_text(encoding="utf-8")).get("inputs_hash")
            except (OSError, ValueError):
                previous = None
            if previous != step.inputs_hash:
                raise HippoError(
                    f"{work}: its checkpoints were made from different inputs (config, model or data changed); "
                    "rerun without --resume to start over"
                )
            run.resume_from = str(last)
            if main:
                status(f"{step.stage}: resuming from {last}")
        elif main:
            if last:
                status(
                    f"{step.stage}: discarding the checkpoints of an interrupted run in {work} "
                    "(use --resume to continue)"
                )
            shutil.rmtree(work, ignore_errors=True)
            if resume:
                status(f"{step.stage}: no complete checkpoint in {work}; starting from the beginning")
    return run


def _newest(work: Path) -> Path | None:
    """What the main process kept: the only checkpoints left are complete ones."""
    if not work.is_dir():
        return None
    kept = [p for p in work.iterdir() if p.is_dir() and (p / COMPLETE).is_file()]
    return max(kept, key=_checkpoint_step, default=None)


def abandon(run: StageRun) -> None:
    """After a failure: drop the checkpoint folder when it holds nothing to resume from."""
    if is_main_process() and newest_complete_checkpoint(run.work_dir) is None:
        shutil.rmtree(run.work_dir, ignore_errors=True)


def default_report_to() -> list[str]:
    from transformers.integrations import is_tensorboard_available

    return ["tensorboard"] if is_tensorboard_available() else []


# ----------------------------------------------------------------------------------------- training


def load_for_training(run: StageRun):
    """Load the input model and tokenizer in the stage precision (bf16 weights when training in bf16)."""
    from hippocrates.models import load_model, load_tokenizer, precision_for, resolve_model

    if precision_for(run.model_path, run.precision)[0] != run.precision:
        note = (
            f"the input model's 16-bit weights keep less than 95% of its last stage's effect on the logits; "
            f"this stage trains on them in {run.precision} (precision: fp32 trains on all of it)"
        )
        status(f"{run.stage}: {note}")
        run.notes.append(note)
    resolved = resolve_model(run.model_path)
    tokenizer = load_tokenizer(resolved, trust_remote_code=run.recipe.trust_remote_code)
    model = load_model(resolved, precision=run.precision, trust_remote_code=run.recipe.trust_remote_code)
    model.config.use_cache = False
    return model, tokenizer


def peft_config(cfg: LoRASettings):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )


def wrap_lora(model, cfg: LoRASettings, train: TrainSettings, seed: int):
    """Seed, then wrap with a fresh LoRA: PEFT draws lora_A at random, so the seed must come first
    for a run (and a killed-and-resumed run) to be reproducible."""
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(seed)
    model = get_peft_model(model, peft_config(cfg))
    if train.gradient_checkpointing:  # PEFT + checkpointing needs input embeddings that require grad
        model.enable_input_require_grads()
    return model


def trainer_kwargs(run: StageRun, train: TrainSettings, *, batch_size: int | None = None) -> dict[str, Any]:
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


def train_summary(trainer) -> dict[str, Any]:
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


def train(run: StageRun, trainer) -> None:
    """``trainer.train`` (resuming when asked); a failure leaves only what a resume can use.

    The checkpoint folder and its inputs stamp appear only now, so a stage that fails before
    training (bad data, a model that does not load) leaves nothing behind.
    """
    if is_main_process():
        run.work_dir.mkdir(parents=True, exist_ok=True)
        stamp = {"inputs_hash": run.step.inputs_hash, "stage": run.stage, "recipe_name": run.recipe.name}
        write_json(run.work_dir / "inputs.json", stamp)
    try:
        trainer.train(resume_from_checkpoint=run.resume_from)
    except BaseException as exc:
        abandon(run)
        if full_disk(exc):
            raise HippoError(
                f"{run.work_dir}: no space left on device while writing a checkpoint; "
                "free some space and rerun with --resume"
            ) from None
        raise


def save_adapter(run: StageRun, trainer) -> Path:
    """Every process takes part: the Trainer's save gathers sharded weights (FSDP, ZeRO-3) first."""
    folder = run.work_dir / "final-adapter"
    if getattr(trainer, "is_fsdp_enabled", False):  # a full, loadable adapter, not per-rank shards
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(folder))
    return folder


# ------------------------------------------------------------------------------------------ finish


def finish_stage(
    run: StageRun,
    adapter: Path,
    tokenizer,
    metrics: dict[str, Any],
    probe: list[list[int]],
) -> dict[str, Any]:
    """Merge the saved adapter, then write the stage folder atomically; drop the checkpoints.

    Only the main process writes, exactly once; every other process waits at a barrier until the
    stage folder is complete, so no process returns (or exits) before the outputs exist.
    ``probe`` (a few held-out token sequences) is what the merge's logit check runs on.
    """
    metrics = {
        "stage": run.stage,
        **metrics,
        "stage_wall_s": round(time.time() - run.t0, 1),
        "stage_cpu_s": round(time.process_time() - run.cpu0, 1),
        "notes": run.notes,
    }
    with main_process_first():  # the others wait here until the main process has written
        if is_main_process():
            _write_stage(run, adapter, tokenizer, metrics, probe)
    return metrics


def _write_stage(
    run: StageRun, adapter: Path, tokenizer, metrics: dict[str, Any], probe: list[list[int]]
) -> None:
    from hippocrates.stages.card import model_card
    from hippocrates.stages.merge import merge_adapter

    require_space(run.out_dir.parent, merged_size(run.model_path), f"the merged {run.stage} model")
    with atomic_dir(run.out_dir) as tmp:
        status(f"{run.stage}: merging the adapter into {run.model_path} ({time.time() - run.t0:.0f}s in)")
        shutil.copytree(adapter, tmp / "adapter")
        metrics["merge"] = merge_adapter(
            run.model_path,
            tmp / "adapter",
            tmp,
            store=run.recipe.merge_dtype,
            probe=probe,
            trust_remote_code=run.recipe.trust_remote_code,
        )
        m = metrics["merge"]
        status(
            f"{run.stage}: merged into {m['dtype']}: {100 * m['update_retained']:.2f}% of the weight update kept, "
            f"max |Δ logit| {m['max_abs_logit_diff']:.2e} against the unmerged model"
        )
        tokenizer.save_pretrained(tmp)
        logs = run.work_dir / "tensorboard"
        if logs.is_dir():
            shutil.copytree(logs, tmp / "tensorboard")
        write_json(tmp / "metrics.json", metrics)
        outputs = ["config.json", "metrics.json", "adapter/adapter_config.json", "README.md"]
        write_manifest(
            tmp,
            run.step.manifest(
                outputs=outputs,
                started=run.started,
                t0=run.t0,
                recipe=run.recipe,
                resumed_from=run.resume_from,
                extra={"merge": metrics["merge"]},
            ),
        )
        write_text(tmp / "README.md", model_card(run, metrics))
    shutil.rmtree(run.work_dir, ignore_errors=True)
    status(f"{run.stage}: done in {time.time() - run.t0:.0f}s")


def merged_size(model: str) -> int:
    """An upper bound on the bytes of a merged model: the input's weights, widened to fp32."""
    from hippocrates.models import resolve_model

    resolved = resolve_model(model)
    if not resolved.is_local:
        return 0
    total = 0
    for file in Path(resolved.path).glob("*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():
                piece = fh.get_slice(key)
                count = 1
                for dim in piece.get_shape():
                    count *= dim
                total += 4 * count
    return total


def probe_rows(rows: list[dict[str, Any]], n: int = 4, length: int = 128) -> list[list[int]]:
    """A few token sequences for the merge's logit check (held-out rows when there are any)."""
    return [list(r["input_ids"][:length]) for r in rows[:n] if r.get("input_ids")]
