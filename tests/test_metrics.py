"""Request metrics are folded into the collectors in batches; nothing observed may be lost or
counted differently from observing each request on its own."""

from __future__ import annotations

import itertools
import math
import threading

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from model_gateway.metrics import LATENCY_BUCKETS, Metrics, add_observations

from .conftest import GatewayFactory, Upstream, dead_url, route, wait_until

INFER = {
    "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]
}
# around every bucket bound, both sides and on it, and far past the last one
values = st.one_of(
    st.sampled_from(LATENCY_BUCKETS),
    st.floats(min_value=-1.0, max_value=100.0, allow_nan=False),
    st.floats(min_value=0.0, allow_nan=False),
)


def histogram_samples(histogram: Histogram) -> dict[str, float]:
    (family,) = histogram.collect()
    return {f"{s.name}{s.labels.get('le', '')}": s.value for s in family.samples if s.labels} | {
        s.name: s.value for s in family.samples if s.name.endswith(("_count", "_sum"))
    }


@settings(max_examples=300, deadline=None)
@given(
    observed=st.lists(values, max_size=60),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=4),
)
def test_adding_observations_at_once_equals_observing_each(
    observed: list[float], cuts: list[int]
) -> None:
    one_by_one = Histogram("h", "h", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    folded = Histogram("h", "h", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    for value in observed:
        one_by_one.observe(value)
    bounds = sorted({0, len(observed), *(min(c, len(observed)) for c in cuts)})
    for start, end in itertools.pairwise(bounds):
        add_observations(folded, observed[start:end])
    want, got = histogram_samples(one_by_one), histogram_samples(folded)
    assert want.keys() == got.keys()
    for name, value in want.items():
        if name.endswith("_sum"):
            # the same values added in another grouping: equal up to rounding
            assert got[name] == value or math.isclose(got[name], value, rel_tol=1e-9), name
        else:
            assert got[name] == value, name


def test_fold_counts_every_observation_by_its_labels() -> None:
    metrics = Metrics()
    for i in range(250):
        status = (200, 200, 502, 404)[i % 4]
        metrics.observe_request(
            "r",
            "a" if i % 5 else "b",
            "1",
            status,
            0.001 * i,
            0.0005 * i if status == 200 else None,
            (i % 10) / 10 if status == 200 else None,
        )
        if i % 37 == 0:
            metrics.fold()
    metrics.requests_in_flight = 3
    metrics.fold()
    value = metrics.registry.get_sample_value
    for variant in ("a", "b"):
        picked = [i for i in range(250) if (variant == "a") == bool(i % 5)]
        ok = [i for i in picked if i % 4 in (0, 1)]
        labels = {"route": "r", "variant": variant, "model_version": "1"}
        assert value("model_gateway_requests_total", labels | {"code": "2xx"}) == len(ok)
        assert value("model_gateway_requests_total", labels | {"code": "5xx"}) == len(
            [i for i in picked if i % 4 == 2]
        )
        pair = {"route": "r", "variant": variant}
        assert value("model_gateway_request_duration_seconds_count", pair) == len(picked)
        assert value("model_gateway_upstream_duration_seconds_count", pair) == len(ok)
        assert value("model_gateway_prediction_score_count", labels) == len(ok)
        assert math.isclose(
            value("model_gateway_request_duration_seconds_sum", pair) or 0.0,
            sum(0.001 * i for i in picked),
        )
    assert value("model_gateway_requests_in_flight") == 3


def scrape(url: str) -> dict[str, float]:
    samples = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, number = line.rsplit(" ", 1)
            samples[name] = float(number)
    return samples


def series(name: str, **labels: str) -> str:
    """A sample's name as the exposition writes it (labels in name order)."""
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


@pytest.mark.slow
def test_a_scrape_counts_every_request_answered_before_it(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = gateway(
        [
            route("fraud", "/v2/models/fraud", [("a", upstreams["a"].url, 1)]),
            route("dead", "/dead", [("d", dead_url(), 1)]),
            route("slow", "/slow", [("a", upstreams["a"].url, 1)]),
        ]
    )
    fraud = {"route": "fraud", "variant": "a"}
    dead = {"route": "dead", "variant": "d"}
    for n in range(1, 4):
        for _ in range(7):
            assert httpx.post(f"{gw.url}/v2/models/fraud/infer", json=INFER).status_code == 200
        assert httpx.get(f"{gw.url}/dead").status_code == 502
        samples = scrape(gw.url)
        requests = "model_gateway_requests_total"
        assert samples[series(requests, **fraud, model_version="1", code="2xx")] == 7 * n
        assert samples[series("model_gateway_request_duration_seconds_count", **fraud)] == 7 * n
        assert samples[series("model_gateway_upstream_duration_seconds_count", **fraud)] == 7 * n
        assert samples[series(requests, **dead, model_version="9", code="5xx")] == n
        assert samples["model_gateway_requests_in_flight"] == 0

    # a request held by a slow model is in flight while it waits, and not after
    slow = threading.Thread(target=httpx.get, args=(f"{gw.url}/slow?seconds=1",))
    slow.start()
    in_flight = "model_gateway_requests_in_flight"
    wait_until(lambda: scrape(gw.url)[in_flight] == 1, "the slow request in flight")
    slow.join()
    assert scrape(gw.url)[in_flight] == 0


def test_every_reason_a_client_connection_is_closed_is_exported_from_the_start() -> None:
    # at 0 before the first: a rate over the series then has a value, and a first close is
    # seen as a rise rather than as a series appearing
    exposition = Metrics().exposition().decode()
    for reason in ("header_timeout", "header_too_large", "send_timeout"):
        sample = f'model_gateway_client_connections_closed_total{{reason="{reason}"}} 0.0'
        assert sample in exposition.splitlines()
