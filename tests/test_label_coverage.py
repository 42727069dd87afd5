"""Label coverage: labels that reach one variant's predictions more than another's are
flagged, as a broken split is; ``evaluation.label_horizon`` ends a report's default window
that long before now."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from scipy import stats

from model_gateway.splits import SRM_ALPHA, label_coverage

from .conftest import InProcessFactory, Upstream, route, wait_until
from .test_feedback import EVALUATION, features

# starts servers or processes, or simulates: not in make test-fast
pytestmark = pytest.mark.slow


def rows(rng: random.Random, variant: str, n: int, share: float) -> list[dict[str, Any]]:
    return [
        {
            "variant": variant,
            "assignment": "random",
            "inference": 1,
            "label": "1" if rng.random() < share else None,
        }
        for _ in range(n)
    ]


def test_31_against_62_percent_labelled_is_flagged() -> None:
    """1,000 predictions per variant, 31 % of a's labelled and 62 % of b's: flagged, and the
    statistic equals scipy's test of independence; forced and metadata calls are left out."""
    rng = random.Random(31)
    data = rows(rng, "a", 1000, 0.31) + rows(rng, "b", 1000, 0.62)
    data += [{"variant": "b", "assignment": "forced", "inference": 1, "label": None}] * 500
    result = label_coverage(data)
    assert result["predictions"] == {"a": 1000, "b": 1000}
    labelled = [result["labelled"]["a"], result["labelled"]["b"]]
    table = [labelled, [1000 - labelled[0], 1000 - labelled[1]]]
    chi2, p_value, _, _ = stats.chi2_contingency(table, correction=False)
    assert result["chi2"] == pytest.approx(chi2, abs=1e-9)
    assert result["p_value"] == pytest.approx(p_value, abs=1e-12)
    assert result["mismatch"] is True
    assert result["share"]["a"] == pytest.approx(labelled[0] / 1000)


def test_equal_coverage_is_flagged_at_the_rate_of_alpha() -> None:
    """Seed 5, 2,000 windows with 40 % of every variant's predictions labelled: flagged in
    at most 0.5 % (alpha 0.1 %)."""
    rng = random.Random(5)
    flagged = sum(
        label_coverage(rows(rng, "a", 500, 0.4) + rows(rng, "b", 500, 0.4))["mismatch"]
        for _ in range(2_000)
    )
    assert flagged / 2_000 <= 0.005
    assert SRM_ALPHA == 0.001


def test_the_label_horizon_ends_the_default_window_before_now(
    in_process: InProcessFactory, upstreams: dict[str, Upstream]
) -> None:
    """With a label horizon of an hour, a report asked for without ``until`` ends an hour
    ago: predictions made now are not in it; asked up to now, they are."""
    gw = in_process(
        [
            route(
                "fraud",
                "/v2/models/fraud",
                [("a", upstreams["a"].url, 1)],
                evaluation={**EVALUATION, "label_horizon": 3600},
            )
        ],
        server={"config_poll_interval": 0},
    )
    for i in range(5):
        gw.http.post("/v2/models/fraud/infer", json=features(i))
    wait_until(lambda: len(gw.records()) == 5, "the records written")
    default = gw.http.get("/admin/report", params={"route": "fraud"}).json()
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 5))
    upto_now = gw.http.get("/admin/report", params={"route": "fraud", "until": now})
    assert default["variants"]["a"]["requests"] == 0
    assert upto_now.json()["variants"]["a"]["requests"] == 5
