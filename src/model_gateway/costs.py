"""What a binary model's mistakes cost: expected cost per 1,000 predictions with a 95 %
interval, the same for the trivial baselines (never flag; flag at random at the model's own
rate), and the threshold on the labelled scores that would have cost least
(docs/experiments-and-quality.md).

Accuracy is not what a business pays for: a false alarm (a blocked good customer) and a miss
(a fraud let through) cost different amounts, and a model can be more precise yet dearer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .estimates import Z95, Estimate

PER = 1000


def cost_report(
    confusion: dict[str, int],
    scored: Sequence[tuple[bool, float]],
    false_positive: float,
    false_negative: float,
) -> dict[str, Any]:
    """The costs of a variant's labelled predictions (``confusion``: tp, fp, fn, tn), each
    false positive costing ``false_positive`` and each false negative ``false_negative``;
    ``scored``: (truly positive, score) of those with a score, for the cheapest threshold."""
    tp, fp, fn, tn = confusion["tp"], confusion["fp"], confusion["fn"], confusion["tn"]
    n = tp + fp + fn + tn
    if n == 0:
        return {"cost_per_1000": Estimate(None)}
    total = fp * false_positive + fn * false_negative
    mean = total / n
    # each prediction costs 0, the false-positive cost or the false-negative cost: the mean's
    # standard error from their spread
    square = (fp * false_positive**2 + fn * false_negative**2) / n
    spread = math.sqrt(max(square - mean * mean, 0.0) * n / (n - 1)) if n > 1 else 0.0
    half = Z95 * spread / math.sqrt(n)
    positives = (tp + fn) / n
    flagged = (tp + fp) / n
    out: dict[str, Any] = {
        "cost_per_1000": Estimate(PER * mean, PER * (mean - half), PER * (mean + half)),
        "baselines": {
            # nothing flagged: every positive is missed
            "never_flag": PER * positives * false_negative,
            # as many flagged, at random: a flag lands on a negative as often as they come
            "random_at_same_rate": PER
            * (
                flagged * (1 - positives) * false_positive
                + (1 - flagged) * positives * false_negative
            ),
        },
    }
    cheapest = cheapest_threshold(scored, false_positive, false_negative)
    if cheapest is not None:
        out["cheapest_threshold"] = {"threshold": cheapest[0], "cost_per_1000": cheapest[1]}
    return out


def cheapest_threshold(
    scored: Sequence[tuple[bool, float]], false_positive: float, false_negative: float
) -> tuple[float | None, float] | None:
    """The score threshold (flag when score >= it) that would have cost least on ``scored``,
    and its cost per 1,000; the threshold is None when flagging nothing costs least."""
    if not scored:
        return None
    ranked = sorted(scored, key=lambda pair: pair[1], reverse=True)
    positives = sum(1 for truth, _ in ranked if truth)
    # flag nothing first, then lower the threshold one distinct score at a time
    best_cost, best_threshold = positives * false_negative, None
    caught = alarms = 0
    for i, (truth, score) in enumerate(ranked):
        if truth:
            caught += 1
        else:
            alarms += 1
        if i + 1 < len(ranked) and ranked[i + 1][1] == score:
            continue  # a threshold flags every prediction of a score, or none of them
        cost = alarms * false_positive + (positives - caught) * false_negative
        if cost < best_cost:
            best_cost, best_threshold = cost, score
    return best_threshold, PER * best_cost / len(ranked)
