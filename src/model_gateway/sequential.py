"""Always-valid inference for a difference between two arms, and Holm's step-down procedure.

The mixture sequential probability ratio test (Robbins 1970; Johari, Koomen, Pekelis and Walsh,
"Always valid inference", 2017/2022): an estimated difference ``d`` with variance ``V`` is
compared with 0 by the likelihood ratio of a normal mixture ``N(0, tau2)`` over the effect
against no effect,

    Lambda = sqrt(V / (V + tau2)) * exp(tau2 * d**2 / (2 * V * (V + tau2))),

whose reciprocal is a p-value that stays valid however often, and whenever, it is looked at;
inverting it gives the confidence sequence

    d +- sqrt(V * (V + tau2) / tau2 * (log((V + tau2) / V) - 2 * log(alpha))).

With plug-in variances (a proportion's p(1-p)/n) it is the asymptotic confidence sequence of
Waudby-Smith et al. (2021): valid once each arm holds enough observations for the normal
approximation, which is why :data:`MIN_UNITS` are asked for before anything is concluded.
``tau2`` tunes where the sequence is tightest; the experiment's minimum detectable effect,
squared, puts that where an effect of that size becomes visible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

#: observations each arm needs (in the metric's own denominator) before a difference is judged
MIN_UNITS = 30
#: the power ``samples_needed`` plans for, should the true effect be the minimum detectable one
PLANNED_POWER = 0.8


@dataclass(frozen=True, slots=True)
class Sequential:
    """An always-valid p-value and confidence interval (at some alpha) for a difference."""

    p_value: float
    low: float
    high: float


def half_width(variance: float, tau2: float, alpha: float) -> float:
    """Half the width of the mixture confidence sequence at this variance of the estimate."""
    return math.sqrt(
        variance
        * (variance + tau2)
        / tau2
        * (math.log((variance + tau2) / variance) - 2 * math.log(alpha))
    )


def always_valid_p(difference: float, variance: float, tau2: float) -> float:
    """1 / Lambda, capped at 1: the mixture SPRT's always-valid p-value (log space, so that a
    large difference does not overflow)."""
    log_ratio = 0.5 * math.log(variance / (variance + tau2)) + tau2 * difference**2 / (
        2 * variance * (variance + tau2)
    )
    return 1.0 if log_ratio <= 0 else math.exp(-log_ratio)


def mixture_sprt(difference: float, variance: float, tau2: float, alpha: float) -> Sequential:
    width = half_width(variance, tau2, alpha)
    return Sequential(
        always_valid_p(difference, variance, tau2), difference - width, difference + width
    )


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's (1979) step-down adjusted p-values: reject those at or below alpha, and the
    family-wise error rate is at most alpha under any dependence between the tests."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def samples_needed(unit_variance: float, tau2: float, alpha: float, effect: float) -> int:
    """Observations per arm at which a true difference of ``effect`` is seen (the sequence
    leaves 0 behind) with :data:`PLANNED_POWER`: the least ``n`` with
    ``half_width(u / n) + z_power * sqrt(u / n) <= effect``, ``u`` the two arms' summed
    variance of one observation."""
    z = float(stats.norm.ppf(PLANNED_POWER))

    def enough(n: float) -> bool:
        variance = unit_variance / n
        return half_width(variance, tau2, alpha) + z * math.sqrt(variance) <= effect

    low, high = 1.0, 2.0
    while not enough(high):
        low, high = high, high * 2
        if high > 1e15:
            return -1  # beyond any experiment: the caller says so
    while high - low > 0.5:
        middle = (low + high) / 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return max(MIN_UNITS, math.ceil(high))
