"""Samples for hand labelling that find the rare cases, and what their labels estimate.

A uniform sample of a fraud model's predictions at 0.5 % positives holds one positive in
200: precision cannot be measured from it. A stratified sample draws from each stratum
(variant, model version, predicted label, score decile) on its own, more where positives are
expected, and gives each row its inclusion probability; the hand labels keep it, and
:func:`weighted_rate` turns them back into estimates of the whole (docs/experiments-and-
quality.md, "Hand labels").

- Allocation (:func:`allocate`): in proportion to each stratum's expected positives, its size
  times its mean score (probability proportional to size, the score as the size), with at
  least two rows a stratum so that its spread can be estimated; without scores, in
  proportion to size.
- Estimates (:func:`weighted_rate`): the ratio estimator sum(w y) / sum(w x) with weights
  w = 1 / inclusion probability, its variance by linearisation within strata (rows of one
  variant sharing an inclusion probability are taken as one stratum) with the finite
  population correction, and a Clopper-Pearson interval on the effective sample size (Korn
  and Graubard, 1998): a Wilson interval there covers too seldom when a few dozen rows of a
  sample fall in a rate's denominator.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from .estimates import Estimate, wilson

#: what a stratified sample may be split by
STRATA = ("variant", "model_version", "predicted", "score_decile")
STRATEGIES = ("uniform", "stratified", "disagreement")
#: rows a stratum gets at least (its size permitting), so that its spread can be estimated
MIN_PER_STRATUM = 2


def score_deciles(scores: Sequence[float | None]) -> list[int]:
    """Each score's decile among ``scores`` (1 the lowest, 10 the highest); 0 for no score."""
    values = np.array([math.nan if s is None else s for s in scores], dtype=float)
    known = values[~np.isnan(values)]
    if len(known) == 0:
        return [0] * len(values)
    edges = np.quantile(known, np.linspace(0.1, 0.9, 9))
    deciles = np.searchsorted(edges, values, side="right") + 1
    return [0 if math.isnan(v) else int(min(d, 10)) for v, d in zip(values, deciles, strict=True)]


def allocate(sizes: Sequence[int], expected: Sequence[float], n: int) -> list[int]:
    """How many of ``n`` rows each stratum gets: in proportion to ``expected`` (its size times
    its mean score, or its size), at least :data:`MIN_PER_STRATUM` and at most its size;
    rounded by largest remainders, so that the counts add up to ``n`` (or to every row)."""
    total = sum(sizes)
    if n >= total:
        return list(sizes)
    counts = [min(size, MIN_PER_STRATUM) for size in sizes]
    left = n - sum(counts)
    if left < 0:
        # fewer rows asked for than the strata take at least: one each, in order of
        # expected positives, then a second each, until n are given
        counts = [0] * len(sizes)
        order = sorted(range(len(sizes)), key=lambda i: -expected[i])
        for round_ in range(1, MIN_PER_STRATUM + 1):
            for i in order:
                if n > 0 and counts[i] < min(sizes[i], round_):
                    counts[i] += 1
                    n -= 1
        return counts
    open_ = [i for i in range(len(sizes)) if counts[i] < sizes[i]]
    while left > 0 and open_:
        weight = sum(max(expected[i], 0.0) for i in open_)
        shares = {
            i: left * (max(expected[i], 0.0) / weight if weight > 0 else 1 / len(open_))
            for i in open_
        }
        grants = {i: min(math.floor(shares[i]), sizes[i] - counts[i]) for i in open_}
        if sum(grants.values()) == 0:
            # the rest, one at a time, to the largest remainders
            for i in sorted(open_, key=lambda i: -(shares[i] - math.floor(shares[i])))[:left]:
                grants[i] = 1
        for i, grant in grants.items():
            counts[i] += grant
            left -= grant
        open_ = [i for i in open_ if counts[i] < sizes[i]]
    return counts


def draw(
    keys: Sequence[Hashable],
    scores: Sequence[float | None],
    n: int,
    seed: int | tuple[int, ...],
    by_score: bool,
) -> list[tuple[int, float]]:
    """(index, inclusion probability) of the rows drawn: ``n`` rows split over the strata
    ``keys`` names (one key per row), in proportion to expected positives when ``by_score``.
    The same rows, keys, n and seed give the same draw."""
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        members[key].append(i)
    order = sorted(members, key=repr)
    sizes = [len(members[k]) for k in order]
    known = [s for s in scores if s is not None]
    overall = sum(known) / len(known) if known else 1.0
    expected = []
    for key in order:
        if not by_score:
            expected.append(float(len(members[key])))
            continue
        stratum = [scores[i] for i in members[key] if scores[i] is not None]
        mean = sum(stratum) / len(stratum) if stratum else overall  # type: ignore[arg-type]
        expected.append(len(members[key]) * max(mean, 0.0))
    counts = allocate(sizes, expected, n)
    rng = np.random.default_rng(seed)
    chosen: list[tuple[int, float]] = []
    for key, size, count in zip(order, sizes, counts, strict=True):
        if count == 0:
            continue
        picked = rng.choice(size, size=count, replace=False)
        chosen.extend((members[key][int(j)], count / size) for j in sorted(picked))
    return sorted(chosen)


def weighted_rate(rows: Sequence[tuple[bool, bool, float]]) -> dict[str, Any]:
    """A rate sum(w y) / sum(w x) from hand-labelled rows (x: in the denominator, y: in the
    numerator, p: inclusion probability), with its 95 % interval and effective size."""
    denominator = [(y, p) for x, y, p in rows if x]
    if not denominator:
        return {"estimate": Estimate(None), "rows": 0, "effective_rows": None}
    x_hat = sum(1 / p for _, p in denominator)
    rate = sum(1 / p for y, p in denominator if y) / x_hat
    # linearised residuals e = y - R x, over every row (a row out of the denominator is 0)
    strata: dict[str, list[float]] = defaultdict(list)
    probability: dict[str, float] = {}
    for x, y, p in rows:
        key = f"{p:.12g}"  # one stratum, one probability, whatever its last bits
        strata[key].append((1.0 if (x and y) else 0.0) - (rate if x else 0.0))
        probability[key] = p
    variance = 0.0
    for key, residuals in strata.items():
        count = len(residuals)
        if count < 2:
            continue  # a stratum of one labelled row: its spread is not known
        p = probability[key]
        size = count / p
        spread = float(np.var(residuals, ddof=1))
        variance += size * size * (1 - p) * spread / count
    variance /= x_hat * x_hat
    rows_in = len(denominator)
    if variance > 0:
        effective = min(rate * (1 - rate) / variance, float(rows_in))
    else:
        effective = float(rows_in)
    return {
        "estimate": clopper_pearson(rate * effective, effective),
        "rows": rows_in,
        "effective_rows": effective,
    }


def clopper_pearson(successes: float, n: float) -> Estimate:
    """The exact binomial 95 % interval, for a count that may be fractional (an effective
    sample's)."""
    from scipy import stats

    low = 0.0 if successes <= 0 else float(stats.beta.ppf(0.025, successes, n - successes + 1))
    high = 1.0 if successes >= n else float(stats.beta.ppf(0.975, successes + 1, n - successes))
    return Estimate(successes / n, low, high)


def hand_labelled_quality(rows: Sequence[tuple[str, str, float]], positive: str) -> dict[str, Any]:
    """Weighted precision and recall of a variant from (label, predicted, inclusion
    probability) of its hand-labelled rows."""
    flags = [(p == positive, a == positive, w) for a, p, w in rows]
    precision = weighted_rate(flags)
    recall = weighted_rate([(truth, flagged, w) for flagged, truth, w in flags])
    return {
        "labelled": len(rows),
        "estimated_predictions": sum(1 / w for _, _, w in rows),
        "precision": precision["estimate"],
        "precision_effective_rows": precision["effective_rows"],
        "recall": recall["estimate"],
        "recall_effective_rows": recall["effective_rows"],
    }


def decisions(rows: Sequence[tuple[str | None, float | None]]) -> dict[str, Any]:
    """What people did with a variant's recommendations, from (outcome, value) of each
    prediction's latest decision: the acceptance rate with its Wilson interval, and the
    value (money lost or saved) in all and per decision, with a t interval."""
    from scipy import stats

    outcomes = [outcome for outcome, _ in rows if outcome is not None]
    accepted = sum(1 for outcome in outcomes if outcome == "accepted")
    values = np.array([value for _, value in rows if value is not None], dtype=float)
    mean = Estimate(None)
    if len(values) == 1:
        mean = Estimate(float(values[0]))
    elif len(values) > 1:
        centre = float(values.mean())
        half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1)) / math.sqrt(
            len(values)
        )
        mean = Estimate(centre, centre - half, centre + half)
    return {
        "decided": len(outcomes),
        "accepted": accepted,
        "acceptance_rate": wilson(accepted, len(outcomes)),
        "valued": len(values),
        "value_total": float(values.sum()),
        "value_mean": mean,
    }
