"""The report's figures as PNG bytes (matplotlib, Agg backend: no display, same pixels everywhere).

Each function returns PNG bytes so the report can embed them as data URIs and stay one
self-contained file.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from hippocrates.eval.calibration import Bin, density

CORRECT, WRONG, ACCENT = "#2a9d8f", "#e76f51", "#264653"


def _plt() -> Any:
    """pyplot on the Agg backend, imported lazily (matplotlib costs ~1 s to import)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)  # constrained layout already fits; "tight" would draw twice
    _plt().close(fig)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _grid(n: int, cols: int = 3, size: float = 3.0) -> tuple[Any, list[Any]]:
    plt = _plt()
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(size * cols, size * rows + 0.3), squeeze=False, layout="constrained"
    )
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def training_curve(log_history: Sequence[dict[str, Any]], title: str) -> bytes | None:
    """Training (and eval) loss against optimizer step; None when the history logs no loss."""
    series = {}
    for key in ("loss", "eval_loss"):
        points = [
            (h["step"], h[key]) for h in log_history if isinstance(h.get(key), int | float) and "step" in h
        ]
        if points:
            series[key] = points
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 3.0), layout="constrained")
    for (key, points), color in zip(series.items(), (ACCENT, WRONG), strict=False):
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, ms=3, color=color, label=key)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    return _png(fig)


def reliability_diagram(panels: Sequence[tuple[str, list[Bin], float]], title: str) -> bytes:
    """One panel per task: accuracy per confidence bin against the diagonal, bars shaded by count."""
    fig, axes = _grid(len(panels))
    for ax, (task, bins, ece_value) in zip(axes, panels, strict=True):
        total = sum(b.count for b in bins) or 1
        for b in bins:
            ax.bar(
                (b.lo + b.hi) / 2, b.accuracy, width=b.hi - b.lo, color=ACCENT,
                alpha=0.25 + 0.75 * b.count / total, edgecolor="white",
            )  # fmt: skip
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ax.plot([b.confidence for b in bins], [b.accuracy for b in bins], "o", ms=3, color=WRONG)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
        ax.set_title(f"{task}\nECE {ece_value:.3f} · n={total}", fontsize=9)
    fig.suptitle(title, fontweight="bold")
    return _png(fig)


def confidence_density(panels: Sequence[tuple[str, np.ndarray, np.ndarray]], title: str) -> bytes:
    """One panel per task: density of confidence on correct vs incorrect predictions (as in the paper)."""
    fig, axes = _grid(len(panels))
    grid = np.linspace(0, 1, 201)
    for ax, (task, right, wrong) in zip(axes, panels, strict=True):
        for values, color, label in ((right, CORRECT, "correct"), (wrong, WRONG, "incorrect")):
            if len(values):
                y = density(values, grid)
                ax.plot(grid, y, color=color, label=f"{label} (n={len(values)})")
                ax.fill_between(grid, y, color=color, alpha=0.15)
        ax.set(xlim=(0, 1), xlabel="confidence", ylabel="density")
        ax.set_title(task, fontsize=9)
        ax.legend(frameon=False, fontsize=7)
    fig.suptitle(title, fontweight="bold")
    return _png(fig)
