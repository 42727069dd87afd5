"""Retries on connection failure: a request that never reached a model server goes to another
variant that is up (``connect_retries``); one that did reach it is never sent twice."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from model_gateway.routing import sticky_point

from .conftest import GatewayFactory, RunningGateway, Upstream, dead_url, error_code, route
from .test_faults import raw_upstream, resets_mid_body
from .test_metrics import scrape, series

# starts servers or processes, or simulates: not in make test-fast
pytestmark = pytest.mark.slow


def echo_route(
    gateway: GatewayFactory, variants: list[tuple[str, str, float]], **settings: Any
) -> RunningGateway:
    """A gateway with one route, /echo, over ``variants``, with passive ejection off: a dead
    variant stays in rotation, so that every request may draw it."""
    return gateway([route("r", "/echo", variants, health={"passive_failures": 0}, **settings)])


@contextmanager
def never_connects() -> Iterator[str]:
    """A port whose accept queue is full, so that a new connection is never established."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(2):  # Linux queues backlog + 1 connections; these fill the queue
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def test_a_refused_connection_is_retried_on_another_variant(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = echo_route(
        gateway, [("dead", dead_url(), 1), ("a", upstreams["a"].url, 1)], connect_retries=1
    )
    answered_by = Counter()
    for _ in range(40):
        r = httpx.post(f"{gw.url}/echo/x", json={"n": 1})
        assert r.status_code == 200, r.text
        assert r.json()["upstream"] == "a"
        answered_by[r.headers["x-model-variant"]] += 1
        assert r.headers["x-model-version"] == "1"
    retried = scrape(gw.url)[
        series("model_gateway_upstream_retries_total", route="r", variant="dead", reason="connect")
    ]
    gw.stop()
    assert answered_by == {"a": 40}
    assert upstreams["a"].control.requests == 40
    # the draw sent about half to the dead variant first (all 40 elsewhere: 2^-40)
    assert 0 < retried < 40
    records = gw.records()
    assert len(records) == 40
    assert {(rec["variant"], rec["status"], rec["error"]) for rec in records} == {("a", 200, None)}


def test_without_connect_retries_the_refusal_is_the_answer(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = echo_route(gateway, [("dead", dead_url(), 1), ("a", upstreams["a"].url, 1)])
    statuses = Counter(httpx.get(f"{gw.url}/echo/x").status_code for _ in range(40))
    gw.stop()
    assert set(statuses) == {200, 502}


def test_retries_stop_at_the_configured_count_and_the_last_refusal_is_answered(
    gateway: GatewayFactory,
) -> None:
    dead = [(f"dead{i}", dead_url(), 1) for i in range(3)]
    gw = echo_route(gateway, dead, connect_retries=1)
    for _ in range(5):
        r = httpx.get(f"{gw.url}/echo/x")
        assert r.status_code == 502
        assert error_code(r) == "bad_gateway"
        # the variant is named; where its server is goes to the log only
        assert "refused the connection" in r.text
        assert not any(str(urlsplit(url).port) in r.text for _, url, _ in dead)
    metrics = scrape(gw.url)
    retried = sum(
        value
        for name, value in metrics.items()
        if name.startswith("model_gateway_upstream_retries")
    )
    gw.stop()
    assert retried == 5  # one retry per request, not two
    records = gw.records()
    assert len(records) == 5
    for record in records:
        assert record["status"] == 502 and record["error"].startswith("connect:")


def test_every_variant_tried_once_at_most(gateway: GatewayFactory) -> None:
    dead = [(f"dead{i}", dead_url(), 1) for i in range(3)]
    gw = echo_route(gateway, dead, connect_retries=10)
    assert httpx.get(f"{gw.url}/echo/x").status_code == 502
    metrics = scrape(gw.url)
    gw.stop()
    retried = {
        name: value
        for name, value in metrics.items()
        if name.startswith("model_gateway_upstream_retries_total")
    }
    # three variants: the first two were retried away from, the third answered 502
    assert sorted(retried.values()) == [1.0, 1.0]


def test_a_forced_variant_is_not_replaced(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = echo_route(
        gateway,
        [("dead", dead_url(), 1), ("a", upstreams["a"].url, 1)],
        connect_retries=1,
        allow_override=True,
    )
    r = httpx.get(f"{gw.url}/echo/x", headers={"X-Model-Variant": "dead"})
    gw.stop()
    assert r.status_code == 502
    assert r.headers["x-model-variant"] == "dead"
    assert upstreams["a"].control.requests == 0


def test_a_sticky_key_retries_to_the_same_variant_every_time(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = echo_route(
        gateway,
        [("dead", dead_url(), 2), ("a", upstreams["a"].url, 1), ("b", upstreams["b"].url, 1)],
        connect_retries=1,
        routing_key="X-User",
    )
    for user in range(12):
        served = {
            httpx.get(f"{gw.url}/echo/x", headers={"X-User": f"u{user}"}).headers["x-model-variant"]
            for _ in range(4)
        }
        assert len(served) == 1 and served <= {"a", "b"}, (user, served)
    gw.stop()


def test_a_connect_timeout_is_retried_on_another_variant(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    with never_connects() as stuck:
        gw = echo_route(
            gateway,
            [("stuck", stuck, 1), ("a", upstreams["a"].url, 1)],
            connect_retries=1,
            routing_key="X-User",
            timeouts={"connect": 0.2, "total": 5},
        )
        # a key whose own variant is the stuck one
        user = next(f"u{i}" for i in range(100) if sticky_point("r", f"u{i}") < 0.5)
        r = httpx.get(f"{gw.url}/echo/x", headers={"X-User": user}, timeout=10)
        retried = scrape(gw.url)[
            series(
                "model_gateway_upstream_retries_total", route="r", variant="stuck", reason="timeout"
            )
        ]
        gw.stop()
    assert r.status_code == 200, r.text
    assert r.headers["x-model-variant"] == "a"
    assert retried == 1


def test_a_request_that_reached_the_model_is_not_sent_again(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    with raw_upstream(resets_mid_body) as broken:
        gw = echo_route(
            gateway, [("broken", broken, 1), ("a", upstreams["a"].url, 1)], connect_retries=3
        )
        statuses = Counter(
            (r.status_code, r.headers["x-model-variant"])
            for r in (httpx.get(f"{gw.url}/echo/x") for _ in range(30))
        )
        gw.stop()
    assert set(statuses) == {(502, "broken"), (200, "a")}
    assert upstreams["a"].control.requests == statuses[(200, "a")]
