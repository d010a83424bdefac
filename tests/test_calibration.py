"""Calibration metrics checked against sklearn, straightforward loops and a hand-computed example."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from hippocrates.errors import HippoError
from hippocrates.eval import calibration as cal


def _random_probs(rng: np.random.Generator, n: int, k: int, sharpness: float = 2.0):
    logits = rng.normal(size=(n, k)) * sharpness
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    gold = np.array(
        [rng.choice(k, p=p) for p in np.exp(logits / 2) / np.exp(logits / 2).sum(1, keepdims=True)]
    )
    return logits, probs, gold


def _loop_ece_mce(conf: np.ndarray, hit: np.ndarray, n_bins: int) -> tuple[float, float]:
    """Guo et al. (2017) style: explicit (lo, hi] masks per equal-width bin."""
    edges = np.linspace(0, 1, n_bins + 1)
    total, worst = 0.0, 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            gap = abs(hit[mask].mean() - conf[mask].mean())
            total += mask.mean() * gap
            worst = max(worst, gap)
    return total, worst


@pytest.mark.parametrize("n_bins", [5, 10, 15])
def test_equal_width_ece_mce_match_independent_computation(n_bins: int) -> None:
    rng = np.random.default_rng(n_bins)
    _, probs, gold = _random_probs(rng, 1000, 4)
    conf, hit = probs.max(1), (probs.argmax(1) == gold).astype(float)

    bins = cal.reliability_bins(conf, hit, n_bins, "uniform")
    prob_true, prob_pred = calibration_curve(hit, conf, n_bins=n_bins, strategy="uniform")
    np.testing.assert_allclose([b.accuracy for b in bins], prob_true, atol=1e-12)
    np.testing.assert_allclose([b.confidence for b in bins], prob_pred, atol=1e-12)

    want_ece, want_mce = _loop_ece_mce(conf, hit, n_bins)
    assert cal.ece(conf, hit, n_bins) == pytest.approx(want_ece, abs=1e-12)
    assert cal.mce(conf, hit, n_bins) == pytest.approx(want_mce, abs=1e-12)


def test_equal_mass_bins_match_sklearn_quantile_bins() -> None:
    rng = np.random.default_rng(7)
    _, probs, gold = _random_probs(rng, 1000, 5)
    conf, hit = probs.max(1), (probs.argmax(1) == gold).astype(float)
    bins = cal.reliability_bins(conf, hit, 10, "quantile")
    assert [b.count for b in bins] == [100] * 10
    prob_true, prob_pred = calibration_curve(hit, conf, n_bins=10, strategy="quantile")
    np.testing.assert_allclose([b.accuracy for b in bins], prob_true, atol=1e-12)
    np.testing.assert_allclose([b.confidence for b in bins], prob_pred, atol=1e-12)
    order = np.argsort(conf)
    want = np.mean([abs(hit[g].mean() - conf[g].mean()) for g in np.split(order, 10)])
    assert cal.ece(conf, hit, 10, "quantile") == pytest.approx(want, abs=1e-12)


def test_brier_matches_sklearn_and_one_hot() -> None:
    rng = np.random.default_rng(3)
    _, probs, gold = _random_probs(rng, 500, 4)
    onehot = np.eye(4)[gold]
    manual = float(((probs - onehot) ** 2).sum(1).mean())
    sk = brier_score_loss(gold, probs, labels=[0, 1, 2, 3], scale_by_half=False)
    assert cal.brier(probs, gold) == pytest.approx(manual, abs=1e-12)
    assert cal.brier(probs, gold) == pytest.approx(sk, abs=1e-12)


def test_hand_computed_example() -> None:
    # item 1: p=(0.7,0.2,0.1), gold 0 -> correct, conf 0.7, brier 0.09+0.04+0.01=0.14
    # item 2: p=(0.6,0.4), gold 1     -> wrong,   conf 0.6, brier 0.36+0.36=0.72
    # item 3: p=(0.9,0.05,0.05), gold 0 -> correct, conf 0.9, brier 0.01+0.0025+0.0025=0.015
    probs = [[0.7, 0.2, 0.1], [0.6, 0.4], [0.9, 0.05, 0.05]]
    gold = [0, 1, 0]
    assert cal.brier(probs, gold) == pytest.approx((0.14 + 0.72 + 0.015) / 3)
    conf, hit = [0.7, 0.6, 0.9], [1, 0, 1]
    # 2 equal-width bins: (0,0.5] empty; (0.5,1]: acc 2/3, conf 2.2/3 -> gap 0.2/3
    assert cal.ece(conf, hit, 2) == pytest.approx(0.2 / 3)
    # 10 bins: 0.6 -> gap 0.6, 0.7 -> gap 0.3, 0.9 -> gap 0.1 (each 1/3 of the mass)
    assert cal.ece(conf, hit, 10) == pytest.approx((0.6 + 0.3 + 0.1) / 3)
    assert cal.mce(conf, hit, 10) == pytest.approx(0.6)
    # 3 equal-mass bins hold one item each: same as above
    assert cal.ece(conf, hit, 3, "quantile") == pytest.approx((0.6 + 0.3 + 0.1) / 3)


def test_temperature_scaling_recovers_overconfidence() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 4)) * 1.5
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    gold = np.array([rng.choice(4, p=row) for row in p])
    samples = cal.Samples("t", list(true_logits * 3.0), gold)  # the model is 3x overconfident
    ids = [f"q{i}" for i in range(len(gold))]
    dev, test = cal.split_dev_test(samples, ids)
    assert 1500 < len(dev) < 2500 and len(dev) + len(test) == 4000
    out = cal.temperature_scaling(dev, test)
    assert out["temperature"] == pytest.approx(3.0, rel=0.1)
    assert out["ece_after"] < out["ece_before"] / 2
    assert out["nll_after"] < out["nll_before"]
    t = out["temperature"]
    assert cal.nll(dev.loglik, dev.gold, t) <= min(
        cal.nll(dev.loglik, dev.gold, t * 0.95), cal.nll(dev.loglik, dev.gold, t * 1.05)
    )


def test_calibration_table_from_samples_files(tmp_path) -> None:
    rng = np.random.default_rng(1)
    logits, probs, gold = _random_probs(rng, 60, 4)
    run = tmp_path / "run"
    paths = [
        run / "eval" / "0shot" / "samples_medqa.jsonl",
        run / "ablation" / "eval" / "cpt" / "3shot" / "samples_pubmedqa.jsonl",
    ]
    for path in paths:
        path.parent.mkdir(parents=True)
        with open(path, "w") as fh:
            for i, (ll, p, g) in enumerate(zip(logits, probs, gold, strict=True)):
                fh.write(
                    json.dumps(
                        {
                            "doc_id": i,
                            "id": f"q{i}",
                            "loglikelihoods": ll.tolist(),
                            "probs": p.tolist(),
                            "gold": int(g),
                        }
                    )
                    + "\n"
                )
    rows = cal.calibration_table(paths, n_bins=10)
    assert [(r["stage"], r["shots"], r["task"]) for r in rows] == [
        ("final", 0, "medqa"),
        ("cpt", 3, "pubmedqa"),
    ]
    assert rows[0]["brier"] == pytest.approx(cal.brier(probs, gold))
    assert rows[0]["acc"] == pytest.approx(float((probs.argmax(1) == gold).mean()))
    assert rows[0]["ts_temperature"] > 0 and rows[0]["ts_n_dev"] + rows[0]["ts_n_test"] == 60

    bad = tmp_path / "samples_bad.jsonl"
    bad.write_text('{"gold": 0, "loglikelihoods": [-1.0, -2.0]}\n{"gold": 5, "loglikelihoods": [-1.0]}\n')
    with pytest.raises(HippoError, match=r"samples_bad.jsonl:2:"):
        cal.calibration_table([bad])


def test_density_integrates_to_one_on_unit_interval() -> None:
    grid = np.linspace(0, 1, 2001)
    values = np.random.default_rng(0).uniform(0.3, 1.0, 300)
    mass = np.trapezoid(cal.density(values, grid), grid)
    assert mass == pytest.approx(1.0, abs=0.02)
