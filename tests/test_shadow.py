"""Shadow traffic: a copy of live requests goes to shadow variants after the client has its
answer; the shadow's answer is logged (marked shadow, linked to the live prediction) and
measured against the live prediction's labels, and never reaches or delays the client."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import httpx
import orjson
import pytest
import sklearn.metrics as sk
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route as StarletteRoute

from model_gateway.config import RouteConfig
from model_gateway.routing import Route, shadows_for

from .conftest import (
    GatewayFactory,
    RunningGateway,
    Upstream,
    dead_url,
    route,
    running,
    wait_until,
)
from .test_feedback import EVALUATION, features, wait_for_label
from .test_metrics import scrape, series

pytestmark = pytest.mark.slow


def shadow(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": url, "model_version": {"b": "2"}.get(name, "9"), **extra}


def shadowed(
    gateway: GatewayFactory,
    upstreams: dict[str, Upstream],
    path: str,
    shadows: list[dict[str, Any]],
    **settings: Any,
) -> RunningGateway:
    """A gateway with one route, ``path``, answered by upstream a, copied to ``shadows``."""
    return gateway([route("r", path, [("a", upstreams["a"].url, 1)], shadows=shadows, **settings)])


def test_the_shadow_gets_a_copy_and_the_client_only_the_live_answer(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = shadowed(
        gateway, upstreams, "/echo", [shadow("b", upstreams["b"].url)], capture={"bodies": True}
    )
    live_ids = {}
    live_answers = {}
    for i in range(10):
        r = httpx.post(
            f"{gw.url}/echo/x%2Fy?q={i}",
            content=orjson.dumps({"n": i}),
            headers={"X-Request-Id": f"req-{i}", "Content-Type": "application/json"},
        )
        assert r.status_code == 200
        assert r.json()["upstream"] == "a"
        assert r.headers["x-model-variant"] == "a"
        live_ids[r.headers["x-prediction-id"]] = i
        live_answers[i] = r.json()
    wait_until(lambda: sum(rec["shadow"] for rec in gw.records()) == 10, "ten copies logged")
    some_live = next(iter(live_ids))
    audit = httpx.get(f"{gw.url}/admin/predictions/{some_live}").json()
    (listed,) = audit["shadows"]
    assert listed["variant"] == "b" and listed["model_version"] == "2" and listed["status"] == 200
    (live_route,) = httpx.get(f"{gw.url}/admin/routing").json()["routes"]
    assert live_route["shadows"] == [
        {"name": "b", "model_version": "2", "url": upstreams["b"].url, "percent": 100.0}
    ]
    gw.stop()
    records = gw.records()
    live = {rec["prediction_id"]: rec for rec in records if not rec["shadow"]}
    copies = [rec for rec in records if rec["shadow"]]
    assert set(live) == set(live_ids) and len(copies) == 10
    for copy in copies:
        original = live[copy["shadow_of"]]
        i = live_ids[copy["shadow_of"]]
        assert copy["prediction_id"] != original["prediction_id"]
        assert copy["variant"] == "b" and copy["assignment"] == "shadow"
        assert copy["configured_version"] == "2" and copy["reported_version"] == "2"
        assert copy["request_id"] == original["request_id"] == f"req-{i}"
        assert copy["status"] == 200 and copy["error"] is None
        assert copy["request_body"] == original["request_body"] == orjson.dumps({"n": i})
        answer = orjson.loads(copy["response_body"])
        # the shadow saw the request as the live variant did, under its own prediction id
        assert answer["upstream"] == "b"
        assert (answer["path"], answer["query"]) == (live_answers[i]["path"], f"q={i}")
        assert answer["body"] == f'{{"n":{i}}}'
        assert answer["headers"]["x-prediction-id"] == copy["prediction_id"]
        assert answer["headers"]["x-forwarded-for"] == "127.0.0.1"
        assert original["shadow_of"] is None


def test_a_slow_shadow_never_holds_the_client_and_is_logged_at_shutdown(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["a"].control.release.set()  # the live variant answers at once; b holds
    gw = shadowed(gateway, upstreams, "/held", [shadow("b", upstreams["b"].url)])
    for _ in range(3):
        r = httpx.post(f"{gw.url}/held/x", content=b"{}", timeout=10)
        assert r.status_code == 200 and r.json()["upstream"] == "a"
    wait_until(lambda: upstreams["b"].control.requests == 3, "three copies held at the shadow")
    # every client has its answer while every copy is still waiting for the shadow
    wait_until(lambda: len(gw.records()) == 3, "the live records")
    assert all(not rec["shadow"] for rec in gw.records())
    upstreams["b"].control.release.set()
    gw.stop()  # graceful: waits for the copies, and writes their records
    copies = [rec for rec in gw.records() if rec["shadow"]]
    assert len(copies) == 3 and {rec["status"] for rec in copies} == {200}


def test_copies_past_max_in_flight_are_skipped_and_counted(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    upstreams["a"].control.release.set()
    gw = shadowed(gateway, upstreams, "/held", [shadow("b", upstreams["b"].url, max_in_flight=2)])
    for _ in range(5):
        assert httpx.post(f"{gw.url}/held/x", content=b"{}").status_code == 200
    wait_until(lambda: upstreams["b"].control.requests == 2, "two copies at the shadow")
    skipped = scrape(gw.url)[series("model_gateway_shadow_skipped_total", route="r", variant="b")]
    upstreams["b"].control.release.set()
    wait_until(lambda: len(gw.records()) == 7, "five live and two shadow records")
    # with room again, the next request is copied
    assert httpx.post(f"{gw.url}/held/x", content=b"{}").status_code == 200
    wait_until(lambda: upstreams["b"].control.requests == 3, "the next copy")
    metrics = scrape(gw.url)
    gw.stop()
    assert skipped == 3
    served = series(
        "model_gateway_shadow_requests_total", route="r", variant="b", model_version="2", code="2xx"
    )
    assert metrics[served] == 3
    # the live request metrics count live answers only
    live = series(
        "model_gateway_requests_total", route="r", variant="a", model_version="1", code="2xx"
    )
    assert metrics[live] == 6
    assert not any('variant="b"' in name for name in metrics if "model_gateway_requests" in name)


def test_a_dead_shadow_is_logged_with_its_error_and_the_client_never_knows(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = shadowed(gateway, upstreams, "/echo", [shadow("gone", dead_url())])
    r = httpx.get(f"{gw.url}/echo/x")
    assert r.status_code == 200 and r.json()["upstream"] == "a"
    gw.stop()
    (copy,) = [rec for rec in gw.records() if rec["shadow"]]
    assert copy["variant"] == "gone" and copy["status"] == 502
    assert copy["error"].startswith("connect:")
    assert copy["configured_version"] == "9" and copy["reported_version"] is None


def test_a_request_refused_before_forwarding_is_not_copied(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = shadowed(gateway, upstreams, "/echo", [shadow("b", upstreams["b"].url)], max_body_bytes=10)
    assert httpx.post(f"{gw.url}/echo/x", content=b"x" * 100).status_code == 413
    gw.stop()
    assert upstreams["b"].control.requests == 0
    assert [rec["shadow"] for rec in gw.records()] == [0]


def test_percent_copies_a_share_of_the_requests(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = shadowed(
        gateway,
        upstreams,
        "/echo",
        [shadow("b", upstreams["b"].url, percent=50), shadow("never", dead_url(), percent=0)],
    )
    for _ in range(200):
        assert httpx.get(f"{gw.url}/echo/x").status_code == 200
    gw.stop()
    copies = [rec["variant"] for rec in gw.records() if rec["shadow"]]
    assert set(copies) <= {"b"}
    # binomial(200, 0.5): outside 60..140 with probability below 1e-8
    assert 60 <= len(copies) <= 140


@given(
    percents=st.lists(st.floats(min_value=0, max_value=100), min_size=1, max_size=5),
    draw=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_one_draw_copies_to_every_shadow_whose_share_it_falls_in(
    percents: list[float], draw: float
) -> None:
    config = RouteConfig.model_validate(
        {
            "name": "r",
            "path": "/",
            "variants": [{"name": "live", "url": "http://h", "model_version": "1"}],
            "shadows": [
                {"name": f"s{i}", "url": "http://h", "model_version": "1", "percent": p}
                for i, p in enumerate(percents)
            ],
        }
    )
    chosen = {s.name for s in shadows_for(Route.from_config(config), draw)}
    assert chosen == {f"s{i}" for i, p in enumerate(percents) if draw < p / 100}
    # nested: a shadow copied at some share is copied whenever a smaller share is
    for i, p in enumerate(percents):
        for j, q in enumerate(percents):
            if f"s{i}" in chosen and q >= p:
                assert f"s{j}" in chosen


def test_labels_of_live_predictions_measure_the_shadow_in_the_report(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """1. 60 requests to a live variant (version 1) with a shadow (version 2) on every one.
    2. Ground truth for 45 of them is posted by prediction id or by the client's request id
       of the live answer.
    3. The report measures the shadow on those labels (equal to scikit-learn on the shadow's
       own predictions), tells how often it agreed with the live answer, and compares it with
       the champion; the split and the live variant are as without a shadow.
    """
    since = time.time() - 1
    gw = gateway(
        [
            route(
                "fraud",
                "/v2/models/fraud",
                [("a", upstreams["a"].url, 1)],
                evaluation=EVALUATION,
                shadows=[shadow("b", upstreams["b"].url)],
            )
        ]
    )
    truth: dict[str, int] = {}
    feedback = []
    for i in range(60):
        r = httpx.post(
            f"{gw.url}/v2/models/fraud/infer", json=features(i), headers={"X-Request-Id": f"q{i}"}
        )
        assert r.status_code == 200 and r.headers["x-model-variant"] == "a"
        if i % 4 == 3:
            continue
        truth[r.headers["x-prediction-id"]] = label = (i * 7 % 10) < 4
        key = {"request_id": f"q{i}"} if i % 2 else {"prediction_id": r.headers["x-prediction-id"]}
        feedback.append({**key, "label": int(label)})
    wait_until(lambda: sum(rec["shadow"] for rec in gw.records()) == 60, "sixty copies logged")
    last = next(reversed(truth))
    wait_for_label(gw, last, None)
    assert httpx.post(f"{gw.url}/feedback", json=feedback).json()["accepted"] == 45
    wait_for_label(gw, last, "1" if truth[last] else "0")
    until = time.time() + 1
    report = httpx.get(
        f"{gw.url}/admin/report",
        params={"route": "fraud", "since": _rfc3339(since), "until": _rfc3339(until)},
    ).json()

    def outcomes(variant: str, version: str) -> dict[str, float]:
        metrics = scrape(gw.url)
        return {
            result: metrics.get(
                series(
                    "model_gateway_feedback_outcomes_total",
                    route="fraud",
                    variant=variant,
                    model_version=version,
                    outcome=result,
                ),
                0.0,
            )
            for result in ("tp", "fp", "tn", "fn")
        }

    # live in Prometheus too: each label counted once for the live variant, once for its copy
    wait_until(lambda: sum(outcomes("b", "2").values()) == 45, "the shadow's outcomes")
    shadow_outcomes = outcomes("b", "2")
    assert sum(outcomes("a", "1").values()) == 45
    gw.stop()

    records = gw.records()
    copies = {rec["shadow_of"]: rec for rec in records if rec["shadow"]}
    live = {rec["prediction_id"]: rec for rec in records if not rec["shadow"]}
    labelled = list(truth)
    y = [int(truth[p]) for p in labelled]
    shadow_predicted = [int(copies[p]["predicted"]) for p in labelled]
    shadow_scores = [copies[p]["score"] for p in labelled]
    agreed = sum(copies[p]["predicted"] == live[p]["predicted"] for p in live)

    assert set(report["variants"]) == {"a"} and report["sample_ratio"]["observed"] == {"a": 60}
    b = report["shadows"]["b"]
    assert b["requests"] == 60 and b["model_versions"] == ["2"] and b["labelled"] == 45
    assert b["precision"]["value"] == pytest.approx(
        sk.precision_score(y, shadow_predicted, zero_division=0)
    )
    assert b["recall"]["value"] == pytest.approx(sk.recall_score(y, shadow_predicted))
    assert b["f1"]["value"] == pytest.approx(sk.f1_score(y, shadow_predicted))
    assert b["auc"]["value"] == pytest.approx(sk.roc_auc_score(y, shadow_scores))
    expected = Counter(
        ("t" if p == t else "f") + ("p" if p else "n")
        for p, t in zip(shadow_predicted, y, strict=True)
    )
    assert shadow_outcomes == {k: float(expected[k]) for k in ("tp", "fp", "tn", "fn")}
    assert b["compared_with_live"] == 60
    assert b["agreement_with_live"]["value"] == pytest.approx(agreed / 60)
    assert report["variants"]["a"]["labelled"] == 45
    (comparison,) = report["comparisons"]
    assert comparison["challenger"] == "b" and comparison["shadow"] is True
    # paired on the same requests: McNemar's discordant pairs counted from the records
    live_predicted = [int(live[p]["predicted"]) for p in labelled]
    paired = comparison["paired"]
    assert paired["pairs"] == 45
    assert paired["live_only"] == sum(
        lp == t != sp for lp, sp, t in zip(live_predicted, shadow_predicted, y, strict=True)
    )
    assert paired["shadow_only"] == sum(
        sp == t != lp for lp, sp, t in zip(live_predicted, shadow_predicted, y, strict=True)
    )
    live_scores = [live[p]["score"] for p in labelled]
    assert paired["auc"]["test"] == "delong"
    assert paired["auc"]["live"] == pytest.approx(sk.roc_auc_score(y, live_scores))
    assert paired["auc"]["shadow"] == pytest.approx(sk.roc_auc_score(y, shadow_scores))
    assert paired["f1"]["difference"] == pytest.approx(
        sk.f1_score(y, shadow_predicted) - sk.f1_score(y, live_predicted)
    )
    # feedback by request id joined the live prediction, never its copy
    assert all(rec["shadow"] == 0 for rec in _joined(gw.db_path))


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def _joined(db_path: Any) -> list[dict[str, Any]]:
    import sqlite3

    db = sqlite3.connect(db_path)
    db.row_factory = sqlite3.Row
    try:
        return [
            dict(r)
            for r in db.execute(
                "SELECT p.shadow FROM feedback f JOIN predictions p"
                " ON p.prediction_id = f.joined_prediction_id"
            )
        ]
    finally:
        db.close()


def test_a_shadow_that_answers_other_rows_is_not_compared(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """The live answer has one row and the shadow's two: no row of one is a row of the
    other. The shadow's record says so, and no row of it names a live row that does not
    exist (before: rows ``<live id>/0`` and ``/1``, never measured)."""

    async def two_rows(request: Any) -> Any:
        return JSONResponse({"predictions": [1, 0]})

    other = Starlette(routes=[StarletteRoute("/v1/models/fraud:predict", two_rows,
                                             methods=["POST"])])  # fmt: skip
    with running(other) as shadow:
        copy_to = [{"name": "s", "url": shadow.url, "model_version": "9"}]
        gw = gateway([route("fraud", "/v1/models/fraud", [("a", upstreams["a"].url, 1)],
                            evaluation={"task": "binary"}, shadows=copy_to)])  # fmt: skip
        httpx.post(f"{gw.url}/v1/models/fraud:predict", json={"instances": [[1, 2, 3, 4]]})
        wait_until(lambda: len(gw.records()) == 2, "the live record and the shadow's")
        gw.stop()
    copy = next(r for r in gw.records() if r["shadow"])
    assert copy["batch_size"] == 2 and copy["predicted"] is None
    assert "answered 2 row(s) to the live answer's 1: not compared" in copy["error"]
