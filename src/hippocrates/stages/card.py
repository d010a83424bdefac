"""Model cards (README.md) for stage outputs: what was trained, on what, how, and how well."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hippocrates.stages.run import StageRun

DESCRIPTIONS = {
    "cpt": "continued pre-training on medical text (LoRA, merged)",
    "sft": "medical instruction tuning on a weighted mixture, loss on responses only (LoRA, merged)",
    "dpo": "direct preference optimisation on judged answer pairs (LoRA, merged; reference = adapter disabled)",
    "grpo": "reinforcement learning with verifiable rewards (GRPO on questions with known answers; LoRA, merged)",
}
SKIP = {"log_history", "notes", "stage"}


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, float) else "?"


def model_card(run: StageRun, metrics: dict[str, Any]) -> str:
    """A Hugging Face style card with YAML front matter, data, hyper-parameters and metrics."""
    stage = run.stage
    rows = "\n".join(
        f"| {k} | {_value(v)} |"
        for k, v in metrics.items()
        if k not in SKIP and not isinstance(v, (dict, list))
    )
    data = (
        "\n".join(
            f"- `{d['path']}` (weight {d.get('weight', 1)}, {d.get('kind', '')}"
            + (f", sha256 `{d['sha256'][:16]}…`" if d.get("sha256") else ", Hugging Face hub")
            + ")"
            for d in run.step.data
        )
        or "- (none)"
    )
    cfg = run.config
    merge = metrics.get("merge") or {}
    lora = cfg.get("lora", {})
    train = cfg.get("train", {})
    notes = "\n".join(f"- {n}" for n in run.notes) or "- none"
    return f"""---
library_name: transformers
base_model: {run.model_path}
tags: [hippocrates, medical, {stage}, lora]
---

# {run.recipe.name}: {stage}

This model is the output of the **{stage}** stage of the Hippocrates pipeline: {DESCRIPTIONS.get(stage, stage)}.
Input model: `{run.model_path}`. The LoRA adapter is in `adapter/`; this folder holds the merged weights,
so `AutoModelForCausalLM.from_pretrained("<this folder>")` loads it directly.

## Data
{data}

## Training
- LoRA: r={lora.get("r")}, alpha={lora.get("alpha")}, dropout={lora.get("dropout")}, targets={lora.get("target_modules")}
- learning rate {train.get("learning_rate")} ({train.get("lr_scheduler")}, warmup ratio {train.get("warmup_ratio")}),
  batch {train.get("batch_size")} x accumulation {train.get("grad_accum")}, max length {train.get("max_seq_len")},
  epochs {train.get("epochs")}, max steps {train.get("max_steps")}
- precision {run.precision}, seed {run.recipe.seed}, started {run.started}
- merged in fp32 and stored as {merge.get("dtype")}: {_pct(merge.get("update_retained"))} of the adapter's weight update kept,
  max |Δ logit| against the unmerged model {_value(merge.get("max_abs_logit_diff"))}

## Metrics
| metric | value |
|---|---|
{rows}

## Notes
{notes}

## Intended use
Research on medical language models. Not a medical device: its answers can be wrong or unsafe and
must not be used for diagnosis or treatment. See `manifest.json` for the exact inputs (data sha256,
package versions, git commit, hardware).
"""
