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


#: one labelled prediction: (truly positive, flagged, what a false positive of it costs,
#: what a false negative of it costs)
Costed = tuple[bool, bool, float, float]


def cost_report(
    confusion: dict[str, int],
    scored: Sequence[tuple[bool, float]],
    false_positive: float,
    false_negative: float,
) -> dict[str, Any]:
    """The costs of a variant's labelled predictions (``confusion``: tp, fp, fn, tn), each
    false positive costing ``false_positive`` and each false negative ``false_negative``;
    ``scored``: (truly positive, score) of those with a score, for the cheapest threshold."""
    rows: list[Costed] = []
    for kind, truth, flagged in (
        ("tp", True, True),
        ("fp", False, True),
        ("fn", True, False),
        ("tn", False, False),
    ):
        rows += [(truth, flagged, false_positive, false_negative)] * confusion[kind]
    return costed_report(
        rows, [(truth, score, false_positive, false_negative) for truth, score in scored]
    )


def costed_report(
    rows: Sequence[Costed], scored: Sequence[tuple[bool, float, float, float]]
) -> dict[str, Any]:
    """The costs of labelled predictions whose amounts may differ one from another (read from
    each request): ``rows`` as :data:`Costed`; ``scored``: (truly positive, score, false
    positive's cost, false negative's cost) of those with a score."""
    n = len(rows)
    if n == 0:
        return {"cost_per_1000": Estimate(None), "costs_each": []}
    each = [
        (fp if flagged and not truth else fn if truth and not flagged else 0.0)
        for truth, flagged, fp, fn in rows
    ]
    mean = sum(each) / n
    # the mean's standard error from the spread of what each prediction cost
    spread = math.sqrt(sum((c - mean) ** 2 for c in each) / (n - 1)) if n > 1 else 0.0
    half = Z95 * spread / math.sqrt(n)
    flagged_share = sum(1 for _, flagged, _, _ in rows if flagged) / n
    missed_all = sum(fn for truth, _, _, fn in rows if truth) / n
    alarms_all = sum(fp for truth, _, fp, _ in rows if not truth) / n
    out: dict[str, Any] = {
        "cost_per_1000": Estimate(PER * mean, PER * (mean - half), PER * (mean + half)),
        "costs_each": each,
        "baselines": {
            # nothing flagged: every positive is missed
            "never_flag": PER * missed_all,
            # as many flagged, at random: a flag lands on each prediction alike
            "random_at_same_rate": PER
            * (flagged_share * alarms_all + (1 - flagged_share) * missed_all),
        },
    }
    cheapest = cheapest_costed_threshold(scored)
    if cheapest is not None:
        out["cheapest_threshold"] = {"threshold": cheapest[0], "cost_per_1000": cheapest[1]}
    return out


def cheapest_threshold(
    scored: Sequence[tuple[bool, float]], false_positive: float, false_negative: float
) -> tuple[float | None, float] | None:
    """The score threshold (flag when score >= it) that would have cost least on ``scored``,
    and its cost per 1,000; the threshold is None when flagging nothing costs least."""
    return cheapest_costed_threshold(
        [(truth, score, false_positive, false_negative) for truth, score in scored]
    )


def cheapest_costed_threshold(
    scored: Sequence[tuple[bool, float, float, float]],
) -> tuple[float | None, float] | None:
    """:func:`cheapest_threshold` with each prediction's own amounts."""
    if not scored:
        return None
    ranked = sorted(scored, key=lambda row: row[1], reverse=True)
    missed = sum(fn for truth, _, _, fn in ranked if truth)
    # flag nothing first, then lower the threshold one distinct score at a time
    best_cost, best_threshold = missed, None
    alarms = 0.0
    for i, (truth, score, fp, fn) in enumerate(ranked):
        if truth:
            missed -= fn
        else:
            alarms += fp
        if i + 1 < len(ranked) and ranked[i + 1][1] == score:
            continue  # a threshold flags every prediction of a score, or none of them
        cost = alarms + missed
        if cost < best_cost:
            best_cost, best_threshold = cost, score
    return best_threshold, PER * best_cost / len(ranked)
