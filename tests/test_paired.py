"""A shadow and the live variant answered the same requests: McNemar's paired test."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from scipy import stats

from model_gateway.estimates import proportion_difference
from model_gateway.paired import paired_accuracy


def pairs(live_only: int, shadow_only: int, both: int, neither: int) -> list[dict[str, Any]]:
    """Shadow rows with their live prediction and the request's label."""
    rows = []
    for live_right, shadow_right, count in (
        (True, False, live_only),
        (False, True, shadow_only),
        (True, True, both),
        (False, False, neither),
    ):
        for _ in range(count):
            rows.append(
                {
                    "label": "1",
                    "live_predicted": "1" if live_right else "0",
                    "predicted": "1" if shadow_right else "0",
                }
            )
    return rows


def test_mcnemar_on_45_and_20_discordant_pairs_of_1000() -> None:
    """The issue's case: 1,000 paired requests, the live answer alone right on 45, the
    shadow alone on 20. McNemar's statistic (b - c)^2 / (b + c), written out here, gives
    p 0.0019; the unpaired two-proportion test on the same answers gives 0.15."""
    rows = pairs(live_only=45, shadow_only=20, both=800, neither=135)
    result = paired_accuracy(rows)
    chi2 = (45 - 20) ** 2 / (45 + 20)
    assert result["chi2"] == pytest.approx(chi2, abs=1e-12)
    assert result["p_value"] == pytest.approx(stats.chi2.sf(chi2, 1), abs=1e-12)
    assert round(result["p_value"], 4) == 0.0019
    assert (result["live_only"], result["shadow_only"], result["pairs"]) == (45, 20, 1000)
    assert result["difference"] == pytest.approx(-25 / 1000)
    se = math.sqrt(65 - 25**2 / 1000) / 1000
    assert result["low"] == pytest.approx(-0.025 - 1.959963984540054 * se)
    unpaired = proportion_difference("accuracy", 820, 1000, 845, 1000)
    assert unpaired.p_value is not None and unpaired.p_value > 0.1


@pytest.mark.slow
def test_false_alarms_of_the_paired_test_stay_near_alpha() -> None:
    """Seed 3, 2,000 simulated shadows exactly as accurate as the live variant (each pair
    discordant with probability 0.1, either way alike): p < 0.05 in 3.5 to 6.5 % of them."""
    rng = random.Random(3)
    alarms = 0
    for _ in range(2_000):
        live_only = shadow_only = 0
        for _ in range(500):
            if rng.random() < 0.1:
                if rng.random() < 0.5:
                    live_only += 1
                else:
                    shadow_only += 1
        result = paired_accuracy(pairs(live_only, shadow_only, 500 - live_only - shadow_only, 0))
        alarms += result["p_value"] is not None and result["p_value"] < 0.05
    assert 0.035 <= alarms / 2_000 <= 0.065


def test_no_discordant_pair_has_no_test() -> None:
    result = paired_accuracy(pairs(0, 0, 10, 2))
    assert result["difference"] == 0.0 and result["p_value"] is None
    assert paired_accuracy([])["pairs"] == 0


def delong_by_the_paper(
    y: list[bool], first: list[float], second: list[float]
) -> tuple[float, float, float]:
    """DeLong et al. (1988), written out: psi for every positive-negative pair, the
    structural components V10 and V01, their covariances; (auc1, auc2, variance of the
    difference)."""

    def psi(x: float, z: float) -> float:
        return 1.0 if x > z else 0.5 if x == z else 0.0

    pos = [i for i, t in enumerate(y) if t]
    neg = [i for i, t in enumerate(y) if not t]
    m, n = len(pos), len(neg)
    v10 = [[sum(psi(s[i], s[j]) for j in neg) / n for i in pos] for s in (first, second)]
    v01 = [[sum(psi(s[i], s[j]) for i in pos) / m for j in neg] for s in (first, second)]
    auc = [sum(v) / m for v in v10]

    def cov(a: list[float], b: list[float]) -> float:
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        return sum((x - ma) * (z - mb) for x, z in zip(a, b, strict=True)) / (len(a) - 1)

    s10 = [[cov(v10[k], v10[j]) for j in range(2)] for k in range(2)]
    s01 = [[cov(v01[k], v01[j]) for j in range(2)] for k in range(2)]
    s = [[s10[k][j] / m + s01[k][j] / n for j in range(2)] for k in range(2)]
    return auc[0], auc[1], s[0][0] + s[1][1] - 2 * s[0][1]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_delong_equals_the_papers_formula(seed: int) -> None:
    """Two correlated scores on 150 cases (ties included, rounded to 2 places): the AUCs
    equal scikit-learn's, and the variance and p-value the paper's formula, to 1e-9."""
    import sklearn.metrics as sk

    from model_gateway.paired import delong_paired

    rng = random.Random(seed)
    y = [rng.random() < 0.4 for _ in range(150)]
    base = [rng.gauss(1.0 if t else 0.0, 1.0) for t in y]
    first = [round(b + rng.gauss(0, 0.8), 2) for b in base]
    second = [round(b + rng.gauss(0, 0.5), 2) for b in base]
    result = delong_paired(y, first, second)
    assert result is not None
    auc1, auc2, variance = delong_by_the_paper(y, first, second)
    assert result["first"] == pytest.approx(sk.roc_auc_score(y, first), abs=1e-9)
    assert result["second"] == pytest.approx(sk.roc_auc_score(y, second), abs=1e-9)
    assert (result["first"], result["second"]) == (pytest.approx(auc1), pytest.approx(auc2))
    assert result["se"] ** 2 == pytest.approx(variance, abs=1e-9)
    z = (auc2 - auc1) / math.sqrt(variance)
    assert result["p_value"] == pytest.approx(2 * stats.norm.sf(abs(z)), abs=1e-9)


def test_paired_bootstrap_f1() -> None:
    """The difference is the two F1s' (scikit-learn's); identical predictions differ by 0
    with p 1; a shadow right where the live variant is wrong on 60 of 400 cases is better
    with p < 0.05 and an interval above 0."""
    import sklearn.metrics as sk

    from model_gateway.paired import paired_bootstrap_f1

    rng = random.Random(9)
    y = [rng.random() < 0.5 for _ in range(400)]
    live = [t if rng.random() < 0.7 else not t for t in y]
    shadow = [t if i < 60 else g for i, (t, g) in enumerate(zip(y, live, strict=True))]
    result = paired_bootstrap_f1(y, live, shadow)
    expected = sk.f1_score(y, shadow) - sk.f1_score(y, live)
    assert result["difference"] == pytest.approx(expected, abs=1e-12)
    assert result["low"] is not None and result["low"] > 0
    assert result["p_value"] is not None and result["p_value"] < 0.05
    same = paired_bootstrap_f1(y, live, live)
    assert same["difference"] == 0 and same["p_value"] == 1.0
