"""Model quality from labelled predictions: point estimates, confidence intervals, A/B tests.

Pure functions over plain lists; :func:`build_report` turns a route's rows from the store into
the report that ``GET /admin/report`` and ``model-gateway report`` show. Intervals are 95 %:
Wilson for proportions (precision, recall, accuracy, error ratio), Hanley-McNeil for AUC, a
seeded bootstrap for F1 and RMSE, the normal approximation for MAE. Differences between a
challenger and the champion (named by the route's experiment; else its first variant) come
with fixed-horizon intervals and p-values (valid for one look, planned in advance) and with
the always-valid sequential tests and decisions of :mod:`.experiments`; the split of the
randomly assigned requests is checked with a chi-square test against the weights live at
each request (sample ratio mismatch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from .config import EvaluationConfig, RouteConfig
from .experiments import Settings, judge, measures, settings_of
from .records import canonical_label

Z95 = 1.959963984540054
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 20261125
#: a split whose chi-square p-value is below this is reported as a sample ratio mismatch
SRM_ALPHA = 0.001


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


def sample_ratio_mismatch(observed: dict[str, int], weights: dict[str, float]) -> dict[str, Any]:
    """Chi-square goodness of fit of the observed split against the configured weights."""
    names = [n for n, w in weights.items() if w > 0]
    total = sum(observed.get(n, 0) for n in names)
    if len(names) < 2 or total == 0:
        return {"chi2": None, "p_value": None, "mismatch": False}
    weight_sum = sum(weights[n] for n in names)
    expected = [total * weights[n] / weight_sum for n in names]
    result = stats.chisquare([observed.get(n, 0) for n in names], expected)
    p_value = float(result.pvalue)
    return {"chi2": float(result.statistic), "p_value": p_value, "mismatch": p_value < SRM_ALPHA}


#: how a request chose its variant that makes it part of the experiment's random split
RANDOMISED = frozenset({"random", "sticky"})


def in_experiment(row: dict[str, Any]) -> bool:
    """Whether a live row is part of the experiment: an inference call whose variant the
    weights chose (at random or by its routing key); not one forced by the client, moved by
    a connect retry, or a readiness or metadata call."""
    return row.get("assignment") in RANDOMISED and bool(row.get("inference", True))


def sample_ratio_over_time(
    rows: Sequence[dict[str, Any]],
    weights_at: dict[str, dict[str, float]],
    current: dict[str, float],
) -> dict[str, Any]:
    """The split of the randomly assigned live requests against the weights live at each
    request (those of its configuration version, from the history; ``current`` where the
    history has none): each request adds its configuration's shares to the expected counts,
    so a weight change in the window is no mismatch. Requests outside the experiment
    (:func:`in_experiment`) take no part, and are counted in ``excluded``."""
    observed: dict[str, int] = {}
    expected: dict[str, float] = {}
    excluded = 0
    for row in rows:
        if not in_experiment(row):
            excluded += 1
            continue
        weights = weights_at.get(row.get("config_version") or "", current)
        total = sum(w for w in weights.values() if w > 0)
        if total <= 0:
            continue
        observed[row["variant"]] = observed.get(row["variant"], 0) + 1
        for name, weight in weights.items():
            if weight > 0:
                expected[name] = expected.get(name, 0.0) + weight / total
    names = sorted(set(expected) | set(observed))
    out: dict[str, Any] = {
        "observed": {n: observed.get(n, 0) for n in names},
        "expected": {n: expected.get(n, 0.0) for n in names},
        "excluded": excluded,
    }
    if len([n for n in names if expected.get(n, 0) > 0]) < 2:
        return {**out, "chi2": None, "p_value": None, "mismatch": False}
    if any(observed.get(n, 0) and not expected.get(n) for n in names):
        # traffic to a variant whose weight was 0 all along: a mismatch beyond any test
        return {**out, "chi2": math.inf, "p_value": 0.0, "mismatch": True}
    live = [n for n in names if expected.get(n, 0) > 0]
    result = stats.chisquare([observed.get(n, 0) for n in live], [expected[n] for n in live])
    p_value = float(result.pvalue)
    return {
        **out,
        "chi2": float(result.statistic),
        "p_value": p_value,
        "mismatch": p_value < SRM_ALPHA,
    }


def paired_accuracy(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A shadow against the live answers to the same labelled requests: McNemar's test on
    the discordant pairs (``live_only``: the live answer right and the shadow's wrong;
    ``shadow_only``: the reverse), Pearson's chi-square without continuity correction, and
    the paired difference in accuracy (shadow minus live) with its Wald interval. An
    unpaired test on paired data ignores that both answered the same requests, and is far
    weaker: 1,000 requests with 45 and 20 discordant pairs give McNemar p 0.0019 where the
    two-proportion test gives 0.15."""
    pairs = [
        (str(r["live_predicted"]) == str(r["label"]), str(r["predicted"]) == str(r["label"]))
        for r in rows
        if r["label"] is not None
        and r["predicted"] is not None
        and r.get("live_predicted") is not None
    ]
    n = len(pairs)
    live_only = sum(1 for live, shadow in pairs if live and not shadow)
    shadow_only = sum(1 for live, shadow in pairs if shadow and not live)
    out: dict[str, Any] = {
        "test": "mcnemar",
        "pairs": n,
        "live_only": live_only,
        "shadow_only": shadow_only,
    }
    discordant = live_only + shadow_only
    if n == 0 or discordant == 0:
        return {**out, "difference": 0.0 if n else None, "low": None, "high": None,
                "chi2": None, "p_value": None}  # fmt: skip
    difference = (shadow_only - live_only) / n
    se = math.sqrt(max(discordant - (shadow_only - live_only) ** 2 / n, 0.0)) / n
    chi2 = (shadow_only - live_only) ** 2 / discordant
    return {
        **out,
        "difference": difference,
        "low": difference - Z95 * se,
        "high": difference + Z95 * se,
        "chi2": chi2,
        "p_value": float(stats.chi2.sf(chi2, 1)),
    }


def delong_paired(
    positive: Sequence[bool], first: Sequence[float], second: Sequence[float]
) -> dict[str, float] | None:
    """DeLong, DeLong and Clarke-Pearson (1988): two correlated AUCs on the same cases, their
    difference (second minus first), its standard error and two-sided p-value; placements
    from midranks (Sun and Xu, 2014)."""
    y = np.asarray(positive, dtype=bool)
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        return None
    placements = []
    aucs = []
    for scores in (np.asarray(first, dtype=float), np.asarray(second, dtype=float)):
        pos, neg = scores[y], scores[~y]
        every = stats.rankdata(np.concatenate([pos, neg]))
        v10 = (every[:m] - stats.rankdata(pos)) / n  # per positive: share of negatives below
        v01 = 1 - (every[m:] - stats.rankdata(neg)) / m  # per negative: share of positives above
        placements.append((v10, v01))
        aucs.append(float(v10.mean()))
    s10 = np.cov(np.vstack([placements[0][0], placements[1][0]]))
    s01 = np.cov(np.vstack([placements[0][1], placements[1][1]]))
    covariance = s10 / m + s01 / n
    variance = float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    difference = aucs[1] - aucs[0]
    se = math.sqrt(max(variance, 0.0))
    p_value = 1.0 if se == 0 else float(2 * stats.norm.sf(abs(difference) / se))
    return {
        "first": aucs[0],
        "second": aucs[1],
        "difference": difference,
        "se": se,
        "low": difference - Z95 * se,
        "high": difference + Z95 * se,
        "p_value": p_value,
    }


def paired_bootstrap_f1(
    positive: Sequence[bool], first: Sequence[bool], second: Sequence[bool]
) -> dict[str, float | None]:
    """F1 of two sets of predictions on the same cases, resampled together (seeded): the
    difference (second minus first), its 95 % percentile interval and a two-sided p-value
    (twice the share of resampled differences on the far side of 0)."""
    truth = np.asarray(positive, dtype=bool)
    guesses = (np.asarray(first, dtype=bool), np.asarray(second, dtype=bool))

    def f1(t: np.ndarray, g: np.ndarray) -> float:
        tp = int((t & g).sum())
        value = f1_from_counts(tp, int((~t & g).sum()), int((t & ~g).sum()))
        return math.nan if value is None else value

    observed = f1(truth, guesses[1]) - f1(truth, guesses[0])
    if len(truth) < 2 or math.isnan(observed):
        return {"difference": None, "low": None, "high": None, "p_value": None}
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    picks = rng.integers(0, len(truth), size=(BOOTSTRAP_SAMPLES, len(truth)))
    samples = np.array([f1(truth[p], guesses[1][p]) - f1(truth[p], guesses[0][p]) for p in picks])
    samples = samples[~np.isnan(samples)]
    if len(samples) == 0:
        return {"difference": observed, "low": None, "high": None, "p_value": None}
    p_value = min(1.0, 2 * min(float((samples <= 0).mean()), float((samples >= 0).mean())))
    return {
        "difference": observed,
        "low": float(np.percentile(samples, 2.5)),
        "high": float(np.percentile(samples, 97.5)),
        "p_value": p_value,
    }


def _paired_binary(rows: Sequence[dict[str, Any]], positive: str) -> dict[str, Any]:
    """A shadow's F1 (paired bootstrap) and AUC (DeLong) against the live answers to the same
    labelled requests; shadow minus live."""
    labelled = [
        r
        for r in rows
        if r["label"] is not None
        and r["predicted"] is not None
        and r.get("live_predicted") is not None
    ]
    truth = [str(r["label"]) == positive for r in labelled]
    out: dict[str, Any] = {
        "f1": paired_bootstrap_f1(
            truth,
            [str(r["live_predicted"]) == positive for r in labelled],
            [str(r["predicted"]) == positive for r in labelled],
        )
    }
    scored = [r for r in labelled if r["score"] is not None and r.get("live_score") is not None]
    auc = delong_paired(
        [str(r["label"]) == positive for r in scored],
        [r["live_score"] for r in scored],
        [r["score"] for r in scored],
    )
    out["auc"] = None if auc is None else {
        "live": auc["first"], "shadow": auc["second"], "difference": auc["difference"],
        "low": auc["low"], "high": auc["high"], "p_value": auc["p_value"], "test": "delong",
    }  # fmt: skip
    return out


def label_coverage(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The share of each live variant's experiment predictions that have a label, compared
    across variants (chi-square test of independence, flagged as the split is): when labels
    reach one variant's predictions more than another's, the comparisons measure different
    populations."""
    predictions: dict[str, int] = {}
    labelled: dict[str, int] = {}
    for row in rows:
        if row.get("shadow") or not in_experiment(row):
            continue
        name = row["variant"]
        predictions[name] = predictions.get(name, 0) + 1
        labelled[name] = labelled.get(name, 0) + (row["label"] is not None)
    names = sorted(predictions)
    out: dict[str, Any] = {
        "predictions": {n: predictions[n] for n in names},
        "labelled": {n: labelled[n] for n in names},
        "share": {n: labelled[n] / predictions[n] for n in names},
    }
    table = [[labelled[n] for n in names], [predictions[n] - labelled[n] for n in names]]
    if len(names) < 2 or 0 in (sum(table[0]), sum(table[1])):
        return {**out, "chi2": None, "p_value": None, "mismatch": False}
    chi2, p_value, _, _ = stats.chi2_contingency(table, correction=False)
    return {
        **out,
        "chi2": float(chi2),
        "p_value": float(p_value),
        "mismatch": bool(p_value < SRM_ALPHA),
    }


def _latency(latencies: Sequence[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50": None, "p95": None, "p99": None}
    values = np.asarray(latencies, dtype=float)
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)}


def _variant_quality(rows: list[dict[str, Any]], evaluation: EvaluationConfig) -> dict[str, Any]:
    labelled = [r for r in rows if r["label"] is not None and r["predicted"] is not None]
    out: dict[str, Any] = {"labelled": len(labelled)}
    if not labelled:
        return out
    labels = [str(r["label"]) for r in labelled]
    predicted = [str(r["predicted"]) for r in labelled]
    if evaluation.task == "binary":
        positive = canonical_label(evaluation.positive_label) or ""
        out.update(binary_quality(labels, predicted, [r["score"] for r in labelled], positive))
    elif evaluation.task == "multiclass":
        out.update(multiclass_quality(labels, predicted))
    else:
        pairs = [(_number(a), _number(p)) for a, p in zip(labels, predicted, strict=True)]
        numeric = [(a, p) for a, p in pairs if a is not None and p is not None]
        out["labelled"] = len(numeric)
        if numeric:
            out.update(regression_quality([a for a, _ in numeric], [p for _, p in numeric]))
    return out


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def build_report(
    rows: list[dict[str, Any]],
    route: RouteConfig,
    since: float,
    until: float,
    weights_at: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """The per-variant report of one route over [since, until) from the store's rows;
    ``weights_at``: the route's weights in each configuration version the rows name.

    Shadows are reported beside the live variants, measured against the labels of the live
    predictions they copy, with how often each agreed with the live answer; they take no part
    in the traffic split. Live predictions are also reported by arm, each (variant, served
    model version) apart, and the comparisons are between arms: each against the champion's
    most recently served version.
    """
    evaluation = route.evaluation or EvaluationConfig()
    by_variant: dict[str, list[dict[str, Any]]] = {v.name: [] for v in route.variants}
    by_shadow: dict[str, list[dict[str, Any]]] = {s.name: [] for s in route.shadows}
    for row in rows:
        (by_shadow if row.get("shadow") else by_variant).setdefault(row["variant"], []).append(row)
    internals: dict[str, dict[str, Any]] = {}
    variants = {
        name: _summary(vrows, route, evaluation, internals, name)
        for name, vrows in by_variant.items()
    }
    shadows = {}
    for name, srows in by_shadow.items():
        shadows[name] = _summary(srows, route, evaluation, internals, name)
        compared = [
            r for r in srows if r["predicted"] is not None and r.get("live_predicted") is not None
        ]
        agreed = sum(1 for r in compared if r["predicted"] == r["live_predicted"])
        shadows[name]["compared_with_live"] = len(compared)
        shadows[name]["agreement_with_live"] = wilson(agreed, len(compared))
    settings = settings_of(route)
    champion = settings.champion
    # Arms: each (variant, served model version) apart, so that a variant redeployed with
    # another model under the same name is two arms, never one.
    by_arm: dict[tuple[str, str], list[dict[str, Any]]] = {}
    latest: dict[tuple[str, str], int] = {}
    for position, row in enumerate(rows):
        if not row.get("shadow"):
            key = (row["variant"], str(row["model_version"]))
            by_arm.setdefault(key, []).append(row)
            latest[key] = position
    arm_internals: dict[str, dict[str, Any]] = {}
    arms = [
        {
            "variant": variant,
            "model_version": version,
            **_plain(_summary(arm_rows, route, evaluation, arm_internals, f"{variant}@{version}")),
        }
        for (variant, version), arm_rows in sorted(by_arm.items())
    ]
    # the champion's arm: its variant's most recently served version
    champion_arms = [key for key in by_arm if key[0] == champion]
    champion_arm = max(champion_arms, key=lambda key: latest[key]) if champion_arms else None
    comparisons: list[dict[str, Any]] = []
    if route.evaluation and champion_arm is not None:
        base = arm_internals[f"{champion_arm[0]}@{champion_arm[1]}"]
        challengers: list[tuple[str, str | None, dict[str, Any], bool]] = [
            (variant, version, arm_internals[f"{variant}@{version}"], False)
            for variant, version in sorted(by_arm)
            if (variant, version) != champion_arm
        ]
        challengers += [(name, None, internals[name], True) for name in by_shadow]
        for name, version, measured, shadow in challengers:
            comparisons.append(
                {
                    "challenger": name,
                    "challenger_version": version,
                    "champion": champion,
                    "champion_version": champion_arm[1],
                    "shadow": shadow,
                    "fixed_horizon": [asdict(d) for d in _differences(measured, base, evaluation)],
                }
            )
            if shadow and evaluation.task in ("binary", "multiclass"):
                # a shadow answered the same requests as the live variants: paired
                paired = paired_accuracy(by_shadow[name])
                if evaluation.task == "binary":
                    positive_label = canonical_label(evaluation.positive_label) or ""
                    paired.update(_paired_binary(by_shadow[name], positive_label))
                comparisons[-1]["paired"] = paired
        _attach_decisions(comparisons, challengers, base, settings, evaluation.task)
    current = {v.name: v.weight for v in route.variants}
    live_rows = [r for r in rows if not r.get("shadow")]
    return {
        "route": route.name,
        "task": evaluation.task if route.evaluation else None,
        "since": since,
        "until": until,
        "champion": champion,
        "experiment": settings.describe(),
        "variants": {name: _plain(v) for name, v in variants.items()},
        "arms": arms,
        "shadows": {name: _plain(v) for name, v in shadows.items()},
        "comparisons": comparisons,
        "sample_ratio": {
            "weights": current,
            **sample_ratio_over_time(live_rows, weights_at or {}, current),
        },
        "label_coverage": label_coverage(live_rows),
    }


def _attach_decisions(
    comparisons: list[dict[str, Any]],
    challengers: list[tuple[str, str | None, dict[str, Any], bool]],
    champion: dict[str, Any],
    settings: Settings,
    task: str,
) -> None:
    """Each comparison's sequential tests and decision (:mod:`.experiments`): the live arms as
    one family, the shadows as another (tested as if independent of the live answers, which
    is conservative for paired answers; the paired tests are fixed-horizon figures)."""
    base = measures(champion, task)
    for shadow in (False, True):
        picked = [
            (index, measures(measured, task))
            for index, (_, _, measured, is_shadow) in enumerate(challengers)
            if is_shadow == shadow
        ]
        judged = judge(base, [(str(i), found) for i, found in picked], settings)
        for index, _ in picked:
            comparisons[index]["decision"] = judged[str(index)]["decision"]
            comparisons[index]["sequential"] = judged[str(index)]["metrics"]


def _summary(
    rows: list[dict[str, Any]],
    route: RouteConfig,
    evaluation: EvaluationConfig,
    internals: dict[str, dict[str, Any]],
    name: str,
) -> dict[str, Any]:
    """Requests, versions, errors, latency and quality of one variant's (or shadow's) rows;
    the quality with its internals (for the comparisons) is kept in ``internals[name]``."""
    errors = sum(1 for r in rows if r["status"] >= 500)
    # quality and the comparisons: the experiment's predictions only (a shadow's rows are
    # copies of live ones, all of them predictions)
    measured = [
        r for r in rows if (r.get("shadow") and r.get("inference", True)) or in_experiment(r)
    ]
    quality = _variant_quality(measured, evaluation) if route.evaluation else {"labelled": 0}
    internals[name] = {
        **quality,
        "experiment_requests": len(measured),
        "experiment_errors": sum(1 for r in measured if r["status"] >= 500),
    }
    return {
        "requests": len(rows),
        "model_versions": sorted({r["model_version"] for r in rows}),
        "error_ratio": wilson(errors, len(rows)),
        "latency_ms": _latency([r["latency_ms"] for r in rows]),
        **{k: v for k, v in quality.items() if k not in ("absolute_errors", "auc_se", "mae_se")},
    }


def _differences(
    challenger: dict[str, Any], champion: dict[str, Any], evaluation: EvaluationConfig
) -> list[Difference]:
    if not challenger.get("labelled") or not champion.get("labelled"):
        return []
    if evaluation.task == "regression":
        if challenger.get("mae_se") is None or champion.get("mae_se") is None:
            return []
        return [
            normal_difference(
                "mae",
                challenger["mae"].value,
                challenger["mae_se"],
                champion["mae"].value,
                champion["mae_se"],
            )
        ]
    if evaluation.task == "multiclass":
        c1, c0 = challenger["accuracy"], champion["accuracy"]
        n1, n0 = challenger["labelled"], champion["labelled"]
        return [
            proportion_difference("accuracy", round(c1.value * n1), n1, round(c0.value * n0), n0)
        ]
    m1, m0 = challenger["confusion"], champion["confusion"]
    out = [
        proportion_difference(
            "precision", m1["tp"], m1["tp"] + m1["fp"], m0["tp"], m0["tp"] + m0["fp"]
        ),
        proportion_difference(
            "recall", m1["tp"], m1["tp"] + m1["fn"], m0["tp"], m0["tp"] + m0["fn"]
        ),
        proportion_difference(
            "accuracy", m1["tp"] + m1["tn"], sum(m1.values()), m0["tp"] + m0["tn"], sum(m0.values())
        ),
        bootstrap_f1_difference(_outcome_array(m1), _outcome_array(m0)),
    ]
    if challenger["auc"].value is not None and champion["auc"].value is not None:
        out.append(
            normal_difference(
                "auc",
                challenger["auc"].value,
                challenger["auc_se"],
                champion["auc"].value,
                champion["auc_se"],
            )
        )
    return out


def _outcome_array(confusion: dict[str, int]) -> np.ndarray:
    return np.repeat(
        np.arange(4), [confusion["tp"], confusion["fp"], confusion["fn"], confusion["tn"]]
    )


def _plain(value: Any) -> Any:
    if isinstance(value, Estimate):
        return asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
