"""Drift and data quality: a reference's summary of each feature, and a window's statistics
against it (docs/monitoring.md).

A reference keeps, per feature, what a comparison needs and nothing of the rows: for a
numeric feature its deciles and the share of values between each two, a sample of at most
:data:`REFERENCE_SAMPLE` values (all of them when there are fewer: the Kolmogorov-Smirnov
test then runs on the whole reference), its missing ratio, mean and variance; for a
categorical one the share of each of its commonest categories.

The PSI is the classic decile one (Siddiqi's): ten bins at the reference's deciles, a share
under :data:`PSI_EMPTY` counted as that, so that the index stays finite; its noise in a sample
of n is about (bins - 1) / n. The Kolmogorov-Smirnov test is scipy's two-sample test; the
chi-square test of a categorical feature is scipy's goodness of fit against the reference's
shares.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

PSI_BINS = 10
#: the share an empty bin counts as
PSI_EMPTY = 1e-4
#: the reference's values kept for the Kolmogorov-Smirnov test, at most
REFERENCE_SAMPLE = 10_000
#: a categorical reference keeps its commonest categories; the rest are one, OTHER
MAX_CATEGORIES = 50
OTHER = "__other__"
#: a comparison needs at least this many values on each side; fewer give no PSI nor tests
MIN_VALUES = PSI_BINS
#: the seed of the reference's sample, so that one file gives one reference
SAMPLE_SEED = 0

#: a window's statistics of one feature, in the order `model-gateway drift` prints them
STATISTICS = (
    "count",
    "psi",
    "ks_statistic",
    "ks_p_value",
    "chi2_p_value",
    "missing_ratio",
    "reference_missing_ratio",
    "missing_increase",
    "out_of_range_ratio",
    "mean",
    "mean_shift",
    "variance",
    "variance_ratio",
)


def summarize(values: Sequence[Any], categorical: bool) -> dict[str, Any]:
    """A reference's summary of one feature's values (``None`` for a missing one)."""
    # values near the float's limits overflow a sum: the figure is then infinite (stored as
    # null), not an error
    with np.errstate(all="ignore"):
        return _summarize(values, categorical)


def _summarize(values: Sequence[Any], categorical: bool) -> dict[str, Any]:
    present = _present(values, categorical)
    count = len(values)
    summary: dict[str, Any] = {
        "kind": "categorical" if categorical else "numeric",
        "count": count,
        "missing_ratio": (count - len(present)) / count if count else 0.0,
    }
    if categorical:
        counts = Counter(present)
        kept = dict(counts.most_common(MAX_CATEGORIES))
        rest = len(present) - sum(kept.values())
        if rest:
            kept[OTHER] = kept.get(OTHER, 0) + rest
        summary["shares"] = {k: n / len(present) for k, n in kept.items()} if present else {}
        return summary
    data = np.asarray(present, dtype=float)
    if data.size == 0:
        return summary | {"edges": [], "shares": [], "sample": []}
    edges = np.unique(np.quantile(data, np.arange(1, PSI_BINS) / PSI_BINS))
    binned = np.bincount(np.searchsorted(edges, data, side="right"), minlength=len(edges) + 1)
    if data.size > REFERENCE_SAMPLE:
        rng = np.random.default_rng(SAMPLE_SEED)
        sample = np.sort(rng.choice(data, REFERENCE_SAMPLE, replace=False))
    else:
        sample = np.sort(data)
    return summary | {
        "edges": edges.tolist(),
        "shares": (binned / data.size).tolist(),
        "sample": sample.tolist(),
        "mean": float(data.mean()),
        "variance": float(data.var(ddof=1)) if data.size > 1 else None,
    }


def psi_from_shares(
    expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray
) -> float:
    """The population stability index of two distributions over the same bins."""
    p = np.maximum(np.asarray(expected, dtype=float), PSI_EMPTY)
    q = np.maximum(np.asarray(actual, dtype=float), PSI_EMPTY)
    return float(np.sum((q - p) * np.log(q / p)))


def _numeric_shares(edges: Sequence[float], data: np.ndarray) -> np.ndarray:
    binned = np.bincount(
        np.searchsorted(np.asarray(edges, dtype=float), data, side="right"),
        minlength=len(edges) + 1,
    )
    return np.asarray(binned / data.size)


def psi(expected: Sequence[float], actual: Sequence[float]) -> float | None:
    """The PSI of ``actual`` against ``expected``, binned at ``expected``'s deciles; None with
    fewer than :data:`MIN_VALUES` values on either side."""
    if len(expected) < MIN_VALUES or len(actual) < MIN_VALUES:
        return None
    reference = summarize(list(expected), categorical=False)
    shares = _numeric_shares(reference["edges"], np.asarray(actual, dtype=float))
    return psi_from_shares(reference["shares"], shares)


def compare(
    reference: dict[str, Any] | None,
    values: Sequence[Any],
    categorical: bool,
    bounds: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """A window's statistics of one feature's values against its reference's summary
    (None: no reference, so no drift figures). Every statistic of :data:`STATISTICS` is
    there, None where it cannot be told."""
    with np.errstate(all="ignore"):
        out = _compare(reference, values, categorical, bounds)
    return {k: finite_or_none(v) for k, v in out.items()}


def _compare(
    reference: dict[str, Any] | None,
    values: Sequence[Any],
    categorical: bool,
    bounds: tuple[float, float] | None,
) -> dict[str, Any]:
    out: dict[str, Any] = dict.fromkeys(STATISTICS)
    if reference is not None and reference.get("kind") != (
        "categorical" if categorical else "numeric"
    ):
        reference = None  # built when the feature was of the other kind: no comparison
    present = _present(values, categorical)
    count = len(values)
    out["count"] = count
    out["missing_ratio"] = (count - len(present)) / count if count else None
    if reference is not None:
        out["reference_missing_ratio"] = reference.get("missing_ratio")
    if count:
        # over the reference's share of missing values (none, without a reference)
        out["missing_increase"] = out["missing_ratio"] - (out["reference_missing_ratio"] or 0.0)
    if categorical:
        if reference is not None and len(present) >= MIN_VALUES and reference["shares"]:
            _compare_categories(reference["shares"], present, out)
        return out
    data = np.asarray(present, dtype=float)
    if data.size:
        out["mean"] = float(data.mean())
        if bounds is not None:
            outside = np.count_nonzero((data < bounds[0]) | (data > bounds[1]))
            out["out_of_range_ratio"] = outside / data.size
    if data.size > 1:
        out["variance"] = float(data.var(ddof=1))
        base = None if reference is None else reference.get("variance")
        centre = None if reference is None else reference.get("mean")
        if base and centre is not None and math.isfinite(base):
            out["variance_ratio"] = out["variance"] / base
            # the mean's move in the reference's standard deviations
            out["mean_shift"] = (out["mean"] - centre) / math.sqrt(base)
    if reference is None or data.size < MIN_VALUES or len(reference["sample"]) < MIN_VALUES:
        return out
    out["psi"] = psi_from_shares(reference["shares"], _numeric_shares(reference["edges"], data))
    with warnings.catch_warnings():
        # where the exact p-value cannot be computed, scipy says so and gives the asymptotic
        warnings.simplefilter("ignore", RuntimeWarning)
        tested = stats.ks_2samp(np.asarray(reference["sample"], dtype=float), data)
    out["ks_statistic"] = float(tested.statistic)
    out["ks_p_value"] = float(tested.pvalue)
    return out


def _compare_categories(shares: dict[str, float], present: list[Any], out: dict[str, Any]) -> None:
    known = list(shares)
    if OTHER not in shares:
        known.append(OTHER)
    counts = Counter(v if v in shares else OTHER for v in present)
    observed = np.array([counts.get(k, 0) for k in known], dtype=float)
    expected = np.array([shares.get(k, 0.0) for k in known])
    out["psi"] = psi_from_shares(expected, observed / observed.sum())
    # the test needs every category possible: an empty one counts as PSI_EMPTY of the values
    possible = np.maximum(expected, PSI_EMPTY)
    tested = stats.chisquare(observed, possible / possible.sum() * observed.sum())
    out["chi2_p_value"] = float(tested.pvalue)


def _present(values: Sequence[Any], categorical: bool) -> list[Any]:
    """The values that are of the feature's kind (a value logged when the feature was of the
    other kind counts as missing)."""
    if categorical:
        return [v for v in values if isinstance(v, str)]
    return [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]


def finite_or_none(value: Any) -> Any:
    """``value`` as a plain Python number, or None for one that is not finite (JSON has no
    NaN)."""
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value
