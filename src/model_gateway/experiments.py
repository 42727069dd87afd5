"""An experiment's decisions: is each challenger arm better or worse than the champion, on the
primary metric and the guardrails, safely at any look.

Every arm's metrics become :class:`Measure` (an estimate, its variance, its sample size);
:func:`judge` tests each challenger's difference from the champion with the mixture SPRT of
:mod:`.sequential`, controls the error rate across challengers with Holm's procedure (the
primary metric as one family, the guardrails as another, each at the experiment's alpha),
and names a ``decision`` per metric and per comparison:

- ``challenger_better`` / ``challenger_worse``: the difference is not 0 (adjusted always-valid
  p-value at or below alpha), in the metric's good or bad direction;
- ``no_difference``: the interval lies within plus or minus the minimum detectable effect;
- ``keep_running``: neither yet; ``samples_needed`` says about how many more per arm.

A comparison as a whole is worse when its primary metric or any guardrail is worse, better
when its primary metric is better (and no guardrail worse), no different when its primary
metric is no different (and no guardrail worse), and else keeps running.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import EXPERIMENT_METRICS, RouteConfig
from .sequential import MIN_UNITS, always_valid_p, holm_adjusted, mixture_sprt, samples_needed

#: metrics where a smaller value is the better one
LOWER_IS_BETTER = frozenset({"mae", "rmse", "error_ratio", "cost_per_1000"})
#: metrics in the model's (or the money's) own units: their default minimum detectable
#: effect is a share of the champion's value
RELATIVE_EFFECT_METRICS = frozenset({"mae", "rmse", "cost_per_1000"})
DEFAULT_ALPHA = 0.05
#: a route without an experiment section decides on this metric
DEFAULT_PRIMARY = {"binary": "f1", "multiclass": "accuracy", "regression": "mae"}
#: minimum detectable effect when none is configured: two points of a rate (precision,
#: error ratio...), or this share of the champion's error for MAE and RMSE (whose units
#: are the model's own)
DEFAULT_RATE_EFFECT = 0.02
DEFAULT_RELATIVE_EFFECT = 0.05
#: in what each metric's ``samples_needed`` is counted
UNITS = {"error_ratio": "requests"}

BETTER, WORSE = "challenger_better", "challenger_worse"
NO_DIFFERENCE, KEEP_RUNNING = "no_difference", "keep_running"


@dataclass(frozen=True, slots=True)
class Measure:
    """One metric of one arm: the estimate, the variance of the estimate, how many
    observations it rests on (its denominator: predicted positives for precision) and how
    many the arm has in ``samples_needed``'s unit (labelled predictions; requests for the
    error ratio)."""

    value: float
    variance: float
    units: int
    basis: int
    #: a proportion's count of successes (of ``units``): its test pools the two arms
    successes: int | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    """What an experiment decides on; a route without an experiment section gets the
    defaults, its first variant as champion, and every metric of its task judged."""

    id: str | None
    start: float | None
    champion: str
    champion_named: bool
    primary: str
    guardrails: tuple[str, ...]
    effects: float | dict[str, float] | None
    alpha: float

    def effect(self, metric: str, champion_value: float | None) -> float | None:
        """The minimum detectable effect of ``metric``, in its own units."""
        if isinstance(self.effects, dict) and metric in self.effects:
            return self.effects[metric]
        if isinstance(self.effects, int | float):
            return float(self.effects)
        if metric in RELATIVE_EFFECT_METRICS:
            if champion_value is None or champion_value <= 0:
                return None
            return DEFAULT_RELATIVE_EFFECT * champion_value
        return DEFAULT_RATE_EFFECT

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "start": self.start,
            "champion": self.champion,
            "champion_named": self.champion_named,
            "primary_metric": self.primary,
            "guardrails": list(self.guardrails),
            "minimum_detectable_effect": self.effects,
            "alpha": self.alpha,
            "method": "mixture SPRT (always valid); Holm across challengers and guardrails",
        }
        if not self.champion_named:
            out["note"] = (
                "the route has no experiment section: its first variant is the champion, "
                f"{self.primary} the primary metric, the task's other metrics guardrails,"
                " with the default alpha and minimum detectable effects"
            )
        return out


def settings_of(route: RouteConfig) -> Settings:
    task = route.evaluation.task if route.evaluation is not None else "binary"
    experiment = route.experiment
    if experiment is None:
        primary = DEFAULT_PRIMARY[task]
        return Settings(
            id=None,
            start=None,
            champion=route.variants[0].name,
            champion_named=False,
            primary=primary,
            guardrails=tuple(
                m
                for m in EXPERIMENT_METRICS[task]
                if m != primary and (m != "cost_per_1000" or _has_costs(route))
            ),
            effects=None,
            alpha=DEFAULT_ALPHA,
        )
    return Settings(
        id=experiment.id,
        start=experiment.start.timestamp(),
        champion=experiment.champion,
        champion_named=True,
        primary=experiment.primary_metric,
        guardrails=tuple(experiment.guardrails),
        effects=experiment.minimum_detectable_effect,
        alpha=experiment.alpha,
    )


def _has_costs(route: RouteConfig) -> bool:
    return route.evaluation is not None and route.evaluation.costs is not None


def rate(successes: int, n: int, basis: int) -> Measure | None:
    """A proportion; its variance from (k + 1) / (n + 2), so that an arm with no errors yet
    is not taken for one known to have none."""
    if n == 0:
        return None
    smoothed = (successes + 1) / (n + 2)
    return Measure(successes / n, smoothed * (1 - smoothed) / n, n, basis, successes)


def f1_measure(tp: int, fp: int, fn: int, n: int) -> Measure | None:
    """F1 with its delta-method variance: the labelled predictions are a multinomial sample
    of (tp, fp, fn, tn), and F1 = 2a / (2a + b + c) of their shares a, b, c. The variance
    takes half a count more of each of tp, fp and fn, so that an arm with none of one yet
    (no false positives so far) is not taken for one whose F1 is known exactly; F1 rests on
    2 tp + fp + fn events, its ``units``, however many predictions were labelled."""
    events = 2 * tp + fp + fn
    if n == 0 or events == 0:
        return None
    shares = np.array([tp + 0.5, fp + 0.5, fn + 0.5]) / (n + 1.5)
    a, b, c = shares
    denominator = (2 * a + b + c) ** 2
    gradient = np.array([2 * (b + c), -2 * a, -2 * a]) / denominator
    covariance = (np.diag(shares) - np.outer(shares, shares)) / n
    variance = float(gradient @ covariance @ gradient)
    return Measure(2 * tp / events, variance, events, n)


def measures(quality: dict[str, Any], task: str) -> dict[str, Measure]:
    """An arm's metrics as :class:`Measure`, from its quality internals (``quality.py``) and
    its experiment requests and errors."""
    out: dict[str, Measure] = {}
    errors = rate(quality.get("experiment_errors", 0), quality.get("experiment_requests", 0), 0)
    if errors is not None:
        out["error_ratio"] = Measure(errors.value, errors.variance, errors.units, errors.units)
    n = quality.get("labelled", 0)
    found: dict[str, Measure | None] = {}
    if n and task == "binary":
        m = quality["confusion"]
        tp, fp, fn, tn = m["tp"], m["fp"], m["fn"], m["tn"]
        found["precision"] = rate(tp, tp + fp, n)
        found["recall"] = rate(tp, tp + fn, n)
        found["accuracy"] = rate(tp + tn, n, n)
        found["f1"] = f1_measure(tp, fp, fn, n)
        each = quality.get("costs_each") or []
        if len(each) > 1:
            # the mean cost of a prediction, per 1,000: its variance from their spread
            costs = np.asarray(each, dtype=float)
            found["cost_per_1000"] = Measure(
                1000 * float(costs.mean()), 1e6 * float(costs.var(ddof=1)) / len(costs), n, n
            )
        if quality.get("auc_se") is not None:
            found["auc"] = Measure(
                quality["auc"].value, quality["auc_se"] ** 2, min(tp + fn, fp + tn), n
            )
    elif n and task == "multiclass":
        found["accuracy"] = rate(round(quality["accuracy"].value * n), n, n)
    elif n and task == "regression":
        absolute = np.asarray(quality["absolute_errors"], dtype=float)
        if len(absolute) > 1:
            found["mae"] = Measure(float(absolute.mean()), float(absolute.var(ddof=1)) / n, n, n)
            squared = absolute * absolute
            mse = float(squared.mean())
            if mse > 0:
                # delta method: RMSE = sqrt(MSE), so Var(RMSE) = Var(MSE) / (4 MSE)
                variance = float(squared.var(ddof=1)) / n / (4 * mse)
                found["rmse"] = Measure(math.sqrt(mse), variance, n, n)
    out.update({k: v for k, v in found.items() if v is not None})
    return out


def judge(
    champion: dict[str, Measure],
    challengers: Sequence[tuple[str, dict[str, Measure]]],
    settings: Settings,
) -> dict[str, dict[str, Any]]:
    """Each challenger (by key) against the champion: per metric the difference (challenger
    minus champion), its always-valid interval and p-value, the Holm-adjusted p-value, the
    decision and the samples still needed; and the comparison's overall decision."""
    planned = [("primary", settings.primary)] + [("guardrail", g) for g in settings.guardrails]
    entries: dict[str, list[dict[str, Any]]] = {key: [] for key, _ in challengers}
    families: dict[str, list[dict[str, Any]]] = {"primary": [], "guardrail": []}
    for key, arm in challengers:
        for role, metric in planned:
            entry = _test(metric, role, arm.get(metric), champion.get(metric), settings)
            entries[key].append(entry)
            families[role].append(entry)
    for family in families.values():
        # the family's size is fixed by the plan, not by which tests have data yet, so that
        # an early look with fewer tests is not judged more leniently
        size = len(family)
        adjusted = holm_adjusted(
            [e["p_value"] if e["p_value"] is not None else 1.0 for e in family]
        )
        for entry, p in zip(family, adjusted, strict=True):
            _decide(entry, p, size, settings.alpha)
    return {key: {"decision": overall(found), "metrics": found} for key, found in entries.items()}


def _test(
    metric: str, role: str, arm: Measure | None, base: Measure | None, settings: Settings
) -> dict[str, Any]:
    effect = settings.effect(metric, base.value if base else None)
    entry: dict[str, Any] = {
        "metric": metric,
        "role": role,
        "lower_is_better": metric in LOWER_IS_BETTER,
        "minimum_detectable_effect": effect,
        "difference": None,
        "low": None,
        "high": None,
        "p_value": None,
        "adjusted_p_value": None,
        "decision": KEEP_RUNNING,
        "samples_needed": None,
        "unit": UNITS.get(metric, "labelled predictions"),
        #: whether either arm has the metric at all (a route without scores has no AUC)
        "measured": arm is not None or base is not None,
        # kept out of the answer by _decide
        "_arms": (arm, base),
    }
    if arm is None or base is None:
        return entry
    entry["difference"] = arm.value - base.value
    variance = arm.variance + base.variance
    if effect is not None and variance > 0 and min(arm.units, base.units) >= MIN_UNITS:
        entry["p_value"] = always_valid_p(entry["difference"], _null_variance(arm, base), effect**2)
    return entry


def _null_variance(arm: Measure, base: Measure) -> float:
    """The difference's variance were there none: two proportions pool their counts (the
    two-proportion test's), which keeps the test at its level when one arm is small and
    its rate near 0 or 1, where its own variance is too small a guess and a small canary
    would be found "better" far more often than alpha (tests/test_sequential.py measures
    the case); else the arms' own."""
    if arm.successes is None or base.successes is None:
        return arm.variance + base.variance
    pooled = (arm.successes + base.successes + 1) / (arm.units + base.units + 2)
    return pooled * (1 - pooled) * (1 / arm.units + 1 / base.units)


def _decide(entry: dict[str, Any], adjusted: float, size: int, alpha: float) -> None:
    arm, base = entry.pop("_arms")
    effect = entry["minimum_detectable_effect"]
    if entry["p_value"] is None:
        if arm is not None and base is not None and effect is not None:
            entry["samples_needed"] = _needed(arm, base, effect, alpha / size)
        return
    entry["adjusted_p_value"] = adjusted
    # the interval at the Bonferroni level of the family, Holm's first step
    interval = mixture_sprt(
        entry["difference"], arm.variance + base.variance, effect**2, alpha / size
    )
    entry["low"], entry["high"] = interval.low, interval.high
    if adjusted <= alpha:
        up = entry["difference"] > 0
        entry["decision"] = BETTER if up != entry["lower_is_better"] else WORSE
    elif -effect <= interval.low and interval.high <= effect:
        entry["decision"] = NO_DIFFERENCE
    entry["samples_needed"] = (
        0 if entry["decision"] != KEEP_RUNNING else _needed(arm, base, effect, alpha / size)
    )


def _needed(arm: Measure, base: Measure, effect: float, alpha: float) -> int | None:
    unit_variance = arm.variance * arm.basis + base.variance * base.basis
    if unit_variance <= 0 or arm.basis == 0 or base.basis == 0:
        return None
    total = samples_needed(unit_variance, effect**2, alpha, effect)
    return None if total < 0 else max(0, total - min(arm.basis, base.basis))


def overall(metrics: Sequence[dict[str, Any]]) -> str:
    """Worse when any metric is; better when the primary metric is and no guardrail can
    still be worse by more than its minimum detectable effect; no different when the
    primary metric is not; else keep running."""
    primary = str(next(m["decision"] for m in metrics if m["role"] == "primary"))
    if primary == WORSE or any(m["decision"] == WORSE for m in metrics):
        return WORSE
    if primary == BETTER:
        guardrails = [m for m in metrics if m["role"] == "guardrail" and m["measured"]]
        return BETTER if all(no_worse(m) for m in guardrails) else KEEP_RUNNING
    return primary


def no_worse(metric: dict[str, Any]) -> bool:
    """Whether a metric's always-valid interval rules out the challenger being worse by more
    than the minimum detectable effect (a guardrail's harm; a rollout's non-inferiority)."""
    if metric["decision"] in (BETTER, NO_DIFFERENCE):
        return True
    effect, low, high = metric["minimum_detectable_effect"], metric["low"], metric["high"]
    if effect is None or low is None or high is None:
        return False
    return bool(high <= effect) if metric["lower_is_better"] else bool(low >= -effect)
