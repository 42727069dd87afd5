"""A shadow and the live variant answered the same requests: McNemar's paired test."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from scipy import stats

from model_gateway.quality import paired_accuracy, proportion_difference


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
