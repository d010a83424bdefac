"""Figures beyond training to the experiment loggers: evaluation, annotation, sweep and ablation.

The Trainer already sends the training curves wherever ``--report-to`` says. This sends the rest:
scalars (``medqa/acc``, ``ablation/+CPT/average``, ...) and tables (as Markdown text) to TensorBoard
event files in the output folder (``FOLDER/tensorboard``) and, when ``wandb`` is asked for and
installed, to a W&B run. A logger that is not installed was already refused by ``--report-to``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hippocrates.progress import status


def scalars_of(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric per-task metrics of a results.json as ``task/metric`` scalars."""
    out: dict[str, float] = {}
    for task, metrics in (results.get("tasks") or {}).items():
        for key in ("acc", "acc_norm", "acc_stderr", "ece", "brier", "n", "skipped", "duplicates", "unparsed_rate",
                    "mean_generated_tokens"):  # fmt: skip
            value = metrics.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"{prefix}{task}/{key}"] = float(value)
    return out


def report_figures(
    folder: Path,
    report_to: list[str] | None,
    scalars: dict[str, float],
    *,
    tables: dict[str, str] | None = None,
    run_name: str = "hippocrates",
    step: int = 0,
) -> None:
    """Send ``scalars`` (and Markdown ``tables``) to each logger in ``report_to``."""
    names = set(report_to or [])
    if "all" in names:
        names |= {"tensorboard", "wandb"}
    if "tensorboard" in names:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(Path(folder) / "tensorboard"))
        for key, value in scalars.items():
            writer.add_scalar(key, value, step)
        for key, text in (tables or {}).items():
            writer.add_text(key, text, step)
        writer.close()
    if "wandb" in names:
        try:
            import wandb
        except ImportError:
            status("report-to: wandb is not installed; skipped")
            return
        run = wandb.init(project=run_name, name=Path(folder).name, dir=str(folder), reinit="finish_previous")
        run.log(
            {**scalars, **{k: wandb.Html(f"<pre>{v}</pre>") for k, v in (tables or {}).items()}}, step=step
        )
        run.finish()
