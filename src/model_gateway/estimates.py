"""Point estimates with 95 % intervals, and fixed-horizon differences between two arms.

Wilson for proportions (precision, recall, accuracy, error ratio), Hanley-McNeil for AUC, a
seeded bootstrap for F1 and RMSE, the normal approximation for MAE. A difference (challenger
minus champion) comes with an interval and a two-sided p-value that are valid for one look
planned in advance; :mod:`.experiments` gives the always-valid ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

Z95 = 1.959963984540054
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 20261125


@dataclass(frozen=True, slots=True)
class Estimate:
    value: float | None
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True, slots=True)
class Difference:
    metric: str
    difference: float | None
    low: float | None
    high: float | None
    p_value: float | None


def wilson(successes: int, n: int) -> Estimate:
    if n == 0:
        return Estimate(None)
    p = successes / n
    denominator = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Estimate(p, low, high)


def f1_from_counts(tp: int, fp: int, fn: int) -> float | None:
    return None if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def auc_with_se(positive: Sequence[bool], scores: Sequence[float]) -> tuple[float, float] | None:
    """ROC AUC (Mann-Whitney, ties averaged) and its Hanley-McNeil standard error."""
    y = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = stats.rankdata(np.asarray(scores, dtype=float))
    auc = float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return auc, hanley_mcneil_se(auc, n_pos, n_neg)


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """The standard error of an AUC by Hanley and McNeil (1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (
        auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)
    ) / (n_pos * n_neg)
    return math.sqrt(max(variance, 0.0))


def _bootstrap(values: np.ndarray, statistic: Any) -> tuple[float, float] | None:
    if len(values) < 2:
        return None
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    picks = rng.integers(0, len(values), size=(BOOTSTRAP_SAMPLES, len(values)))
    samples = np.array([statistic(values[p]) for p in picks], dtype=float)
    samples = samples[~np.isnan(samples)]
    if len(samples) == 0:
        return None
    return float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))


def _f1_of(outcomes: np.ndarray) -> float:
    # outcomes: 0 tp, 1 fp, 2 fn, 3 tn
    counts = np.bincount(outcomes, minlength=4)
    value = f1_from_counts(int(counts[0]), int(counts[1]), int(counts[2]))
    return math.nan if value is None else value


def binary_quality(
    labels: Sequence[str], predicted: Sequence[str], scores: Sequence[float | None], positive: str
) -> dict[str, Any]:
    truth = [label == positive for label in labels]
    guess = [p == positive for p in predicted]
    tp = sum(t and g for t, g in zip(truth, guess, strict=True))
    fp = sum(g and not t for t, g in zip(truth, guess, strict=True))
    fn = sum(t and not g for t, g in zip(truth, guess, strict=True))
    tn = len(truth) - tp - fp - fn
    outcomes = np.array(
        [0 if t and g else 1 if g else 2 if t else 3 for t, g in zip(truth, guess, strict=True)],
        dtype=int,
    )
    f1_interval = _bootstrap(outcomes, _f1_of)
    out: dict[str, Any] = {
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        "precision": wilson(tp, tp + fp),
        "recall": wilson(tp, tp + fn),
        "f1": Estimate(f1_from_counts(tp, fp, fn), *(f1_interval or (None, None))),
        "accuracy": wilson(tp + tn, len(truth)),
        "auc": Estimate(None),
    }
    scored = [(t, s) for t, s in zip(truth, scores, strict=True) if s is not None]
    if scored:
        found = auc_with_se([t for t, _ in scored], [s for _, s in scored])
        if found is not None:
            auc, se = found
            out["auc"] = Estimate(auc, max(0.0, auc - Z95 * se), min(1.0, auc + Z95 * se))
            out["auc_se"] = se
    return out


def multiclass_quality(labels: Sequence[str], predicted: Sequence[str]) -> dict[str, Any]:
    """Accuracy, and precision / recall / F1 macro-averaged over the classes seen."""
    classes = sorted(set(labels) | set(predicted))
    precisions, recalls, f1s = [], [], []
    for c in classes:
        tp = sum(t == c and p == c for t, p in zip(labels, predicted, strict=True))
        fp = sum(t != c and p == c for t, p in zip(labels, predicted, strict=True))
        fn = sum(t == c and p != c for t, p in zip(labels, predicted, strict=True))
        precisions.append(tp / (tp + fp) if tp + fp else 0.0)
        recalls.append(tp / (tp + fn) if tp + fn else 0.0)
        f1s.append(f1_from_counts(tp, fp, fn) or 0.0)
    correct = sum(t == p for t, p in zip(labels, predicted, strict=True))
    return {
        "classes": classes,
        "precision": Estimate(float(np.mean(precisions))),
        "recall": Estimate(float(np.mean(recalls))),
        "f1": Estimate(float(np.mean(f1s))),
        "accuracy": wilson(correct, len(labels)),
    }


def regression_quality(actual: Sequence[float], predicted: Sequence[float]) -> dict[str, Any]:
    errors = np.asarray(predicted, dtype=float) - np.asarray(actual, dtype=float)
    absolute = np.abs(errors)
    n = len(errors)
    mae = float(absolute.mean())
    half = Z95 * float(absolute.std(ddof=1)) / math.sqrt(n) if n > 1 else None
    rmse_interval = _bootstrap(errors, lambda e: float(np.sqrt(np.mean(e * e))))
    return {
        "mae": Estimate(
            mae, mae - half if half is not None else None, mae + half if half is not None else None
        ),
        "rmse": Estimate(
            float(np.sqrt(np.mean(errors * errors))), *(rmse_interval or (None, None))
        ),
        "mae_se": float(absolute.std(ddof=1)) / math.sqrt(n) if n > 1 else None,
        "absolute_errors": absolute,
    }


def proportion_difference(metric: str, k1: int, n1: int, k0: int, n0: int) -> Difference:
    """Challenger (1) minus champion (0): Wald interval, pooled two-proportion z-test."""
    if n1 == 0 or n0 == 0:
        return Difference(metric, None, None, None, None)
    p1, p0 = k1 / n1, k0 / n0
    diff = p1 - p0
    se = math.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
    pooled = (k1 + k0) / (n1 + n0)
    se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n0))
    p_value = 1.0 if se_pooled == 0 else float(2 * stats.norm.sf(abs(diff) / se_pooled))
    return Difference(metric, diff, diff - Z95 * se, diff + Z95 * se, p_value)


def normal_difference(metric: str, v1: float, se1: float, v0: float, se0: float) -> Difference:
    diff = v1 - v0
    se = math.sqrt(se1 * se1 + se0 * se0)
    p_value = 1.0 if se == 0 else float(2 * stats.norm.sf(abs(diff) / se))
    return Difference(metric, diff, diff - Z95 * se, diff + Z95 * se, p_value)


def bootstrap_f1_difference(challenger: np.ndarray, champion: np.ndarray) -> Difference:
    """F1 difference with a percentile interval and a bootstrap two-sided p-value."""
    if len(challenger) < 2 or len(champion) < 2:
        return Difference("f1", None, None, None, None)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    diffs = []
    for _ in range(BOOTSTRAP_SAMPLES):
        a = challenger[rng.integers(0, len(challenger), len(challenger))]
        b = champion[rng.integers(0, len(champion), len(champion))]
        diffs.append(_f1_of(a) - _f1_of(b))
    samples = np.array(diffs)
    samples = samples[~np.isnan(samples)]
    point = _f1_of(challenger) - _f1_of(champion)
    if len(samples) == 0 or math.isnan(point):
        return Difference("f1", None, None, None, None)
    p_value = min(1.0, 2 * min(float((samples <= 0).mean()), float((samples >= 0).mean())))
    return Difference(
        "f1",
        float(point),
        float(np.percentile(samples, 2.5)),
        float(np.percentile(samples, 97.5)),
        p_value,
    )
