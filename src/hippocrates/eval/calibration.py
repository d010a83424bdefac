"""Uncertainty calibration of multiple-choice predictions, computed from eval samples files.

The paper asks whether a model's confidence (the softmax of the summed option
log-likelihoods) can be trusted. We report ECE with equal-width and equal-mass bins, MCE,
the multi-class Brier score and NLL, the data for reliability diagrams and for the density
plots of confidence on correct vs incorrect answers, and optionally the same metrics after
temperature scaling fitted on a dev split. Everything is plain numpy so the eval extra
needs no scipy or sklearn (the tests check against sklearn).

Bins are right-closed, ``(lo, hi]`` (first bin also holds 0), as in Guo et al. (2017) and
``sklearn.calibration.calibration_curve``. Equal-mass bins split the items sorted by
confidence into ``n_bins`` groups of (almost) equal size.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hippocrates.data.io import iter_jsonl
from hippocrates.errors import HippoError

Strategy = Literal["uniform", "quantile"]
DEFAULT_BINS = 10  # as results.json's ece (eval/metrics.py), so the two tables agree


@dataclass(frozen=True)
class Samples:
    """The per-item arrays calibration needs; ``loglik`` rows may differ in length (option counts)."""

    task: str
    loglik: list[np.ndarray]
    gold: np.ndarray

    @property
    def probs(self) -> list[np.ndarray]:
        return [softmax(row) for row in self.loglik]

    def __len__(self) -> int:
        return len(self.gold)

    def subset(self, index: np.ndarray) -> Samples:
        return Samples(self.task, [self.loglik[i] for i in index], self.gold[index])


@dataclass(frozen=True)
class Bin:
    """One bin of a reliability diagram: its edges, item count, mean confidence and accuracy."""

    lo: float
    hi: float
    count: int
    confidence: float
    accuracy: float


def softmax(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64) / temperature
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def _arrays(probs: Sequence[Sequence[float]], gold: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Confidence (max prob) and correctness (argmax == gold) per item, for ragged option lists."""
    conf = np.array([float(np.max(p)) for p in probs], dtype=np.float64)
    correct = np.array([int(np.argmax(p)) == int(g) for p, g in zip(probs, gold, strict=True)], dtype=float)
    return conf, correct


def reliability_bins(
    confidence: Sequence[float],
    correct: Sequence[float],
    n_bins: int = DEFAULT_BINS,
    strategy: Strategy = "uniform",
) -> list[Bin]:
    """Non-empty bins of (confidence, correct) pairs; the basis of ECE, MCE and reliability diagrams."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    if n_bins < 1:
        raise HippoError(f"number of calibration bins must be >= 1, got {n_bins}")
    if conf.size == 0:
        return []
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        ids = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
        groups = [np.flatnonzero(ids == b) for b in range(n_bins)]
        bounds = [(edges[b], edges[b + 1]) for b in range(n_bins)]
    elif strategy == "quantile":
        order = np.argsort(conf, kind="stable")
        groups = [g for g in np.array_split(order, n_bins) if g.size]
        bounds = [(float(conf[g].min()), float(conf[g].max())) for g in groups]
    else:
        raise HippoError(f"unknown binning strategy {strategy!r}; choose from uniform, quantile")
    return [
        Bin(float(lo), float(hi), int(g.size), float(conf[g].mean()), float(hit[g].mean()))
        for g, (lo, hi) in zip(groups, bounds, strict=True)
        if g.size
    ]


def ece(
    confidence: Sequence[float],
    correct: Sequence[float],
    n_bins: int = DEFAULT_BINS,
    strategy: Strategy = "uniform",
) -> float:
    """Expected calibration error: the count-weighted mean |accuracy - confidence| over bins."""
    bins = reliability_bins(confidence, correct, n_bins, strategy)
    total = sum(b.count for b in bins)
    return (
        float(sum(b.count * abs(b.accuracy - b.confidence) for b in bins) / total) if total else float("nan")
    )


def mce(
    confidence: Sequence[float],
    correct: Sequence[float],
    n_bins: int = DEFAULT_BINS,
    strategy: Strategy = "uniform",
) -> float:
    """Maximum calibration error: the worst |accuracy - confidence| over non-empty bins."""
    bins = reliability_bins(confidence, correct, n_bins, strategy)
    return float(max(abs(b.accuracy - b.confidence) for b in bins)) if bins else float("nan")


def brier(probs: Sequence[Sequence[float]], gold: Sequence[int]) -> float:
    """Multi-class Brier score: mean over items of sum_k (p_k - 1[k == gold])^2 (range 0..2)."""
    if not len(probs):
        return float("nan")
    total = 0.0
    for p, g in zip(probs, gold, strict=True):
        onehot = np.zeros(len(p))
        onehot[int(g)] = 1.0
        total += float(np.sum((np.asarray(p, dtype=np.float64) - onehot) ** 2))
    return total / len(probs)


def _padded(loglik: Sequence[np.ndarray]) -> np.ndarray:
    """Ragged option rows as one matrix, padded with -inf (zero probability)."""
    width = max(len(row) for row in loglik)
    out = np.full((len(loglik), width), -np.inf)
    for i, row in enumerate(loglik):
        out[i, : len(row)] = row
    return out


def nll(loglik: Sequence[np.ndarray] | np.ndarray, gold: Sequence[int], temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the gold option under softmax(loglik / T)."""
    if not len(loglik):
        return float("nan")
    z = (loglik if isinstance(loglik, np.ndarray) and loglik.ndim == 2 else _padded(loglik)) / temperature
    m = z.max(axis=1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(z)), np.asarray(gold, dtype=int)]))


def fit_temperature(
    loglik: Sequence[np.ndarray], gold: Sequence[int], lo: float = 0.05, hi: float = 20.0
) -> float:
    """The T minimising NLL on dev items (golden-section search on 1/T, where NLL is convex)."""
    if not len(loglik):
        return 1.0
    matrix = _padded(loglik)
    a, b = 1.0 / hi, 1.0 / lo
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    f = lambda beta: nll(matrix, gold, 1.0 / beta)  # noqa: E731
    fc, fd = f(c), f(d)
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
        if b - a < 1e-6:
            break
    return float(2.0 / (a + b))


def metrics(samples: Samples, n_bins: int = DEFAULT_BINS, temperature: float = 1.0) -> dict[str, float]:
    """Accuracy, mean confidence, ECE (equal width and equal mass), MCE, Brier and NLL of one sample set."""
    probs = [softmax(row, temperature) for row in samples.loglik]
    conf, hit = _arrays(probs, samples.gold)
    return {
        "n": len(samples),
        "acc": float(hit.mean()) if len(hit) else float("nan"),
        "confidence": float(conf.mean()) if len(conf) else float("nan"),
        "ece": ece(conf, hit, n_bins, "uniform"),
        "ece_mass": ece(conf, hit, n_bins, "quantile"),
        "mce": mce(conf, hit, n_bins, "uniform"),
        "brier": brier(probs, samples.gold),
        "nll": nll(samples.loglik, samples.gold, temperature),
    }


def split_dev_test(
    samples: Samples, ids: Sequence[str], dev_fraction: float = 0.5
) -> tuple[Samples, Samples]:
    """A deterministic dev/test split by a hash of each item id, stable across models and stages."""
    keys = np.array([zlib.crc32(str(i).encode()) / 2**32 for i in ids])
    dev = np.flatnonzero(keys < dev_fraction)
    test = np.flatnonzero(keys >= dev_fraction)
    return samples.subset(dev), samples.subset(test)


def temperature_scaling(dev: Samples, test: Samples, n_bins: int = DEFAULT_BINS) -> dict[str, float]:
    """Fit T on ``dev``; report ``test`` metrics before (``*_before``) and after (``*_after``) scaling."""
    t = fit_temperature(dev.loglik, dev.gold)
    before, after = metrics(test, n_bins), metrics(test, n_bins, t)
    out: dict[str, float] = {"temperature": t, "n_dev": len(dev), "n_test": len(test)}
    for key in ("ece", "ece_mass", "mce", "brier", "nll"):
        out[f"{key}_before"], out[f"{key}_after"] = before[key], after[key]
    return out


def load_samples(path: str | Path) -> tuple[Samples, list[str]]:
    """Read a ``samples_<task>.jsonl`` file (docs/CONTRACTS.md) into :class:`Samples` plus item ids."""
    p = Path(path)
    task = re.sub(r"^samples_", "", p.stem)
    rows, gold, ids = [], [], []
    for line, rec in iter_jsonl(p):
        ll = rec.get("loglikelihoods")
        if ll is None and rec.get("probs") is not None:
            ll = np.log(np.clip(np.asarray(rec["probs"], dtype=np.float64), 1e-300, None))
        g = rec.get("gold")
        if ll is None or not len(ll) or not isinstance(g, int) or not 0 <= g < len(ll):
            raise HippoError(f"{p}:{line}: needs 'loglikelihoods' (or 'probs') and an integer 'gold' index")
        rows.append(np.asarray(ll, dtype=np.float64))
        gold.append(g)
        ids.append(str(rec.get("id", rec.get("doc_id", line))))
    return Samples(task, rows, np.asarray(gold, dtype=int)), ids


def describe_samples_path(path: Path) -> dict[str, Any]:
    """Task, shot count and stage of a samples file from its place in the run directory.

    ``OUTPUT/eval/<K>shot/samples_<task>.jsonl`` is the pipeline's final model (stage
    ``final``); ``OUTPUT/ablation/eval/<variant>/<K>shot/...`` is an ablation variant.
    """
    shots = re.fullmatch(r"(\d+)shot", path.parent.name)
    parts = path.parts
    stage = "final"
    if len(parts) >= 5 and parts[-5:-3] == ("ablation", "eval"):
        stage = parts[-3]
    return {
        "task": re.sub(r"^samples_", "", path.stem),
        "shots": int(shots.group(1)) if shots else None,
        "stage": stage,
    }


def calibration_table(
    samples_paths: Iterable[str | Path], n_bins: int = DEFAULT_BINS, temperature: bool = True
) -> list[dict[str, Any]]:
    """One row per samples file: where it came from, the metrics and, optionally, temperature scaling.

    Temperature scaling is fitted on a hash-based half of the items and reported on the
    other half (columns ``ts_*``); the untouched metrics use every item.
    """
    rows = []
    for path in samples_paths:
        p = Path(path)
        samples, ids = load_samples(p)
        row: dict[str, Any] = {**describe_samples_path(p), "path": str(p), **metrics(samples, n_bins)}
        if temperature and len(samples) >= 4:
            dev, test = split_dev_test(samples, ids)
            if len(dev) and len(test):
                row.update({f"ts_{k}": v for k, v in temperature_scaling(dev, test, n_bins).items()})
        rows.append(row)
    return rows


def outcomes(samples: Samples) -> tuple[np.ndarray, np.ndarray]:
    """Confidence (max probability) and correctness (0/1) of each prediction."""
    return _arrays(samples.probs, samples.gold)


def confidence_by_outcome(samples: Samples) -> tuple[np.ndarray, np.ndarray]:
    """Confidence on correct and on incorrect predictions (the paper's density plots)."""
    conf, hit = outcomes(samples)
    return conf[hit == 1], conf[hit == 0]


def density(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Gaussian kernel density (Scott's bandwidth) of values in [0, 1], reflected at both ends."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return np.zeros_like(grid)
    bw = max(1.06 * (v.std() if v.size > 1 else 0.1) * v.size ** (-1 / 5), 0.02)
    points = np.concatenate([v, -v, 2.0 - v])  # reflection keeps mass inside [0, 1]
    z = (grid[:, None] - points[None, :]) / bw
    return np.exp(-0.5 * z**2).sum(axis=1) / (v.size * bw * np.sqrt(2 * np.pi))
