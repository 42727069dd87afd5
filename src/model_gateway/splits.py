"""Which predictions an experiment counts, and two checks that the comparison is fair: the
split of the randomly assigned requests against the weights live at each request (sample
ratio mismatch), and the share of each arm's predictions that got a label."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from scipy import stats

#: a split whose chi-square p-value is below this is reported as a sample ratio mismatch
SRM_ALPHA = 0.001

#: how a request chose its variant that makes it part of the experiment's random split
RANDOMISED = frozenset({"random", "sticky"})


def is_request(row: dict[str, Any]) -> bool:
    """Whether a row is a request's own record, not one of the rows of a batch request."""
    return row.get("batch_of") is None


def is_prediction(row: dict[str, Any]) -> bool:
    """Whether a row is one prediction: a request of one row, or one row of a batch (whose
    request's own record holds none)."""
    return row.get("batch_size") is None


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
        if not is_request(row):
            continue  # a batch is one request, however many rows it has
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


def label_coverage(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The share of each live variant's experiment predictions that have a label, compared
    across variants (chi-square test of independence, flagged as the split is): when labels
    reach one variant's predictions more than another's, the comparisons measure different
    populations."""
    predictions: dict[str, int] = {}
    labelled: dict[str, int] = {}
    for row in rows:
        if row.get("shadow") or not in_experiment(row) or not is_prediction(row):
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
