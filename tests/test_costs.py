"""What mistakes cost: a variant's expected cost per 1,000 predictions against a hand
computation, its interval against the formula written out here, the trivial baselines, and
the cheapest threshold against a search over every threshold."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_gateway.config import GatewayConfig
from model_gateway.costs import cheapest_threshold, cost_report
from model_gateway.quality import build_report


def confusion(tp: int, fp: int, fn: int, n: int = 1000) -> dict[str, int]:
    return {"tp": tp, "fp": fp, "fn": fn, "tn": n - tp - fp - fn}


def test_the_challenger_wins_on_cost_while_precision_favours_the_champion() -> None:
    # fp = 5, fn = 100; per 1,000: champion TP 80, FP 20, FN 40; challenger TP 100, FP 60, FN 20
    champion = cost_report(confusion(80, 20, 40), [], 5, 100)
    challenger = cost_report(confusion(100, 60, 20), [], 5, 100)
    assert champion["cost_per_1000"].value == pytest.approx(20 * 5 + 40 * 100, abs=1e-9)
    assert challenger["cost_per_1000"].value == pytest.approx(60 * 5 + 20 * 100, abs=1e-9)
    assert champion["cost_per_1000"].value == pytest.approx(4100, abs=1e-9)
    assert challenger["cost_per_1000"].value == pytest.approx(2300, abs=1e-9)
    assert 80 / (80 + 20) > 100 / (100 + 60)  # precision: the champion's is higher
    # nothing flagged: the 120 positives all missed
    assert champion["baselines"]["never_flag"] == pytest.approx(12_000, abs=1e-9)
    assert challenger["baselines"]["never_flag"] == pytest.approx(12_000, abs=1e-9)
    # flagging 100 at random among 880 negatives and 120 positives
    rate, positives = 100 / 1000, 120 / 1000
    random = 1000 * (rate * (1 - positives) * 5 + (1 - rate) * positives * 100)
    assert champion["baselines"]["random_at_same_rate"] == pytest.approx(random, abs=1e-9)
    # the interval: the mean of per-prediction costs (0, 5 or 100), normal at 95 %, written out
    costs = [5.0] * 20 + [100.0] * 40 + [0.0] * 940
    mean = sum(costs) / 1000
    sd = math.sqrt(sum((c - mean) ** 2 for c in costs) / 999)
    half = 1.959963984540054 * sd / math.sqrt(1000) * 1000
    assert champion["cost_per_1000"].low == pytest.approx(4100 - half, abs=1e-9)
    assert champion["cost_per_1000"].high == pytest.approx(4100 + half, abs=1e-9)


def brute_force(scored: list[tuple[bool, float]], fp: float, fn: float) -> float:
    """The least cost over every threshold (each score, and above them all)."""
    thresholds = [math.inf, *sorted({s for _, s in scored})]
    return min(
        sum(fp for t, s in scored if s >= c and not t) + sum(fn for t, s in scored if s < c and t)
        for c in thresholds
    )


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.sampled_from([0.1, 0.2, 0.35, 0.5, 0.9])), max_size=40),
    st.floats(0, 50),
    st.floats(0, 50),
)
def test_the_cheapest_threshold_is_the_cheapest_of_all(
    scored: list[tuple[bool, float]], fp: float, fn: float
) -> None:
    found = cheapest_threshold(scored, fp, fn)
    if not scored:
        assert found is None
        return
    assert found is not None
    threshold, per_1000 = found
    assert per_1000 == pytest.approx(1000 * brute_force(scored, fp, fn) / len(scored), abs=1e-6)
    cut = math.inf if threshold is None else threshold
    cost = sum(fp for t, s in scored if s >= cut and not t) + sum(
        fn for t, s in scored if s < cut and t
    )
    assert 1000 * cost / len(scored) == pytest.approx(per_1000, abs=1e-6)


def rows(variant: str, tp: int, fp: int, fn: int, n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        truth, flagged = (
            (1, 1) if i < tp else (0, 1) if i < tp + fp else (1, 0) if i < tp + fp + fn else (0, 0)
        )
        out.append(
            {"variant": variant, "status": 200, "latency_ms": 1.0, "predicted": str(flagged),
             "score": 0.9 if flagged else 0.1, "model_version": "1", "label": str(truth),
             "shadow": 0, "assignment": "random", "inference": 1, "request_time": float(i),
             "config_version": "c"}
        )  # fmt: skip
    return out


def test_the_report_gives_each_variant_its_cost_per_1000() -> None:
    config = GatewayConfig.model_validate(
        {
            "routes": [
                {
                    "name": "fraud",
                    "path": "/f",
                    "evaluation": {"costs": {"false_positive": 5, "false_negative": 100}},
                    "variants": [
                        {"name": "champion", "url": "http://127.0.0.1:1", "model_version": "1"},
                        {"name": "challenger", "url": "http://127.0.0.1:2", "model_version": "1"},
                    ],
                }
            ]
        }
    )
    found = rows("champion", 80, 20, 40, 1000) + rows("challenger", 100, 60, 20, 1000)
    report = build_report(found, config.routes[0], 0.0, 1e9)
    champion, challenger = report["variants"]["champion"], report["variants"]["challenger"]
    assert champion["cost_per_1000"]["value"] == pytest.approx(4100, abs=1e-9)
    assert challenger["cost_per_1000"]["value"] == pytest.approx(2300, abs=1e-9)
    assert champion["costs"]["baselines"]["never_flag"] == pytest.approx(12_000, abs=1e-9)
    assert champion["precision"]["value"] > challenger["precision"]["value"]
    # on the champion's scores, flagging at 0.9 is the cheapest there is
    assert champion["costs"]["cheapest_threshold"]["threshold"] == 0.9


def test_costs_are_refused_for_a_task_that_is_not_binary() -> None:
    from model_gateway.config import _cross_field_problems

    config = GatewayConfig.model_validate(
        {
            "routes": [
                {
                    "name": "r",
                    "path": "/r",
                    "evaluation": {"task": "regression", "prediction": "/p",
                                   "costs": {"false_positive": 1, "false_negative": 2}},
                    "variants": [{"name": "a", "url": "http://127.0.0.1:1", "model_version": "1"}],
                }
            ]
        }
    )  # fmt: skip
    problems = _cross_field_problems(config)
    assert any("evaluation.costs: only for a binary task" in p for p in problems)


def experiment_route(primary: str, costs: dict[str, Any] | None) -> Any:
    evaluation: dict[str, Any] = {"task": "binary"}
    if costs is not None:
        evaluation["costs"] = costs
    return GatewayConfig.model_validate(
        {
            "routes": [
                {
                    "name": "fraud",
                    "path": "/f",
                    "evaluation": evaluation,
                    "experiment": {
                        "id": "cost-test",
                        "start": "2026-01-01T00:00:00Z",
                        "champion": "champion",
                        "primary_metric": primary,
                        "guardrails": [],
                    },
                    "variants": [
                        {"name": "champion", "url": "http://127.0.0.1:1", "model_version": "1"},
                        {"name": "challenger", "url": "http://127.0.0.1:2", "model_version": "1"},
                    ],
                }
            ]
        }
    ).routes[0]


def test_cost_can_be_the_experiments_primary_metric_and_the_cheaper_arm_wins() -> None:
    """The issue's case, 30,000 labelled predictions an arm (the per-1,000 mix 30 times):
    on cost_per_1000 the challenger (2,300) is better than the champion (4,100), a lower
    value being the better one; on precision the same data makes it worse."""
    found = rows("champion", 2400, 600, 1200, 30_000) + rows("challenger", 3000, 1800, 600, 30_000)
    costs = {"false_positive": 5, "false_negative": 100}
    report = build_report(found, experiment_route("cost_per_1000", costs), 0.0, 1e9)
    (comparison,) = report["comparisons"]
    primary = comparison["sequential"][0]
    assert (primary["metric"], primary["lower_is_better"]) == ("cost_per_1000", True)
    assert primary["decision"] == "challenger_better"
    assert comparison["decision"] == "challenger_better"
    assert primary["difference"] == pytest.approx(2300 - 4100, abs=1e-9)
    assert report["variants"]["challenger"]["cost_per_1000"]["value"] == pytest.approx(2300)
    on_precision = build_report(found, experiment_route("precision", costs), 0.0, 1e9)
    assert on_precision["comparisons"][0]["sequential"][0]["decision"] == "challenger_worse"


def test_cost_as_a_metric_needs_costs() -> None:
    from model_gateway.config import _cross_field_problems
    from model_gateway.errors import ConfigError

    with pytest.raises((ConfigError, ValueError)):
        route = experiment_route("cost_per_1000", None)
        config = GatewayConfig.model_validate(
            {"routes": [route.model_dump(mode="json", exclude_none=True)]}
        )
        problems = _cross_field_problems(config)
        assert any("cost_per_1000 needs the route's evaluation.costs" in p for p in problems)
        raise ConfigError("x", problems)


def test_amounts_read_from_each_request_cost_what_they_say(
    in_process: Any, upstreams: dict[str, Any]
) -> None:
    """A miss costs the transaction's amount (read from the request's parameters), a false
    alarm 5. 40 requests with amounts 10, 20, ..., 400, two without one (a default of 50);
    labels make some of each outcome. The report's cost per 1,000 equals the sum written out
    here from each record's answer and label; a request without its amount costs the default."""
    from .conftest import route as route_config
    from .test_feedback import EVALUATION, features, wait_for_label

    evaluation = {
        **EVALUATION,
        "costs": {"false_positive": 5, "false_negative": {"pointer": "/parameters/amount",
                                                          "default": 50}},
    }  # fmt: skip
    gw = in_process(
        [route_config("fraud", "/v2/models/fraud", [("a", upstreams["a"].url, 1)],
                      evaluation=evaluation)]
    )  # fmt: skip
    sent: list[tuple[str, float]] = []
    for i in range(42):
        body = features(i)
        amount = 50.0 if i >= 40 else 10.0 * (i + 1)
        if i < 40:
            body["parameters"] = {"amount": amount}
        answer = gw.http.post("/v2/models/fraud/infer", json=body)
        assert answer.status_code == 200
        sent.append((answer.headers["x-prediction-id"], amount))
    labels = [{"prediction_id": pid, "label": i % 3 == 0} for i, (pid, _) in enumerate(sent)]
    wait_for_label(gw, sent[-1][0], None)
    assert gw.http.post("/feedback", json=labels).json()["accepted"] == 42
    total = 0.0
    for (pid, amount), label in zip(sent, labels, strict=True):
        record = wait_for_label(gw, pid, "1" if label["label"] else "0")
        flagged, truth = record["predicted"] == "1", bool(label["label"])
        total += 5.0 if flagged and not truth else amount if truth and not flagged else 0.0
    report = gw.http.get("/admin/report", params={"route": "fraud"}).json()
    variant = report["variants"]["a"]
    assert variant["cost_per_1000"]["value"] == pytest.approx(1000 * total / 42, abs=1e-9)
    assert variant["costs"]["amount_unread"] == 0
