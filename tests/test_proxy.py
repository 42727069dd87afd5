"""The proxy path through a real gateway in front of real upstream servers."""

from __future__ import annotations

import httpx
import pytest

from .conftest import GatewayFactory, Upstream, dead_url, error_code, raw_request, route

INFER = {
    "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]
}


def test_forwards_request_and_response_unchanged(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = gateway([route("r", "/echo", [("a", upstreams["a"].url, 1)])])
    r = httpx.post(
        f"{gw.url}/echo/x%20y?q=1&q=2",
        content=b'{"hello": "world"}',
        headers={"Content-Type": "application/json", "X-Custom": "kept"},
    )
    assert r.status_code == 200
    seen = r.json()
    assert seen["upstream"] == "a"
    assert seen["path"] == "/echo/x y"
    assert seen["query"] == "q=1&q=2"
    assert seen["body"] == '{"hello": "world"}'
    assert seen["headers"]["x-custom"] == "kept"
    assert seen["headers"]["x-prediction-id"] == r.headers["x-prediction-id"]


def test_every_response_carries_prediction_variant_and_version(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = gateway([route("fraud", "/v2/models/fraud", [("b", upstreams["b"].url, 1)])])
    ids = set()
    for _ in range(20):
        r = httpx.post(f"{gw.url}/v2/models/fraud/infer", json=INFER)
        assert r.status_code == 200
        assert r.headers["x-model-variant"] == "b"
        assert r.headers["x-model-version"] == "2"
        assert r.json()["model_version"] == "2"
        ids.add(r.headers["x-prediction-id"])
    assert len(ids) == 20
    # UUIDv7 ids sort by creation time
    assert sorted(ids) == sorted(ids, key=lambda i: i[:13])


def test_version_from_response_header_body_or_config(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = gateway(
        [
            route("h", "/reports-header", [("a", upstreams["a"].url, 1)]),
            route("j", "/reports-body", [("a", upstreams["a"].url, 1)]),
            route("c", "/echo", [("x", upstreams["a"].url, 1)], version={"pointer": "/nothing"}),
        ]
    )
    assert httpx.get(f"{gw.url}/reports-header").headers["x-model-version"] == "7.1"
    assert httpx.get(f"{gw.url}/reports-body").headers["x-model-version"] == "2024-06-01"
    # neither reported: the configured version ("9" for variant x)
    assert httpx.get(f"{gw.url}/echo/").headers["x-model-version"] == "9"
    gw.stop()
    by_route = {r["route"]: r for r in gw.records()}
    assert by_route["h"]["reported_version"] == "7.1"
    assert by_route["j"]["reported_version"] == "2024-06-01"
    assert by_route["c"]["reported_version"] is None
    assert by_route["c"]["configured_version"] == "9"


def test_hop_by_hop_dropped_and_forwarded_headers_set(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = gateway([route("r", "/echo", [("a", upstreams["a"].url, 1)])])
    r = httpx.get(
        f"{gw.url}/echo/h",
        headers={
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "must not pass",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "X-Forwarded-For": "203.0.113.7",
            "X-Prediction-Id": "client-chosen",
        },
    )
    headers = r.json()["headers"]
    for name in ("x-secret-hop", "keep-alive", "te", "proxy-authorization"):
        assert name not in headers
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == gw.url.removeprefix("http://")
    assert headers["host"] == upstreams["a"].url.removeprefix("http://")
    assert headers["x-prediction-id"] == r.headers["x-prediction-id"] != "client-chosen"


def test_no_route_is_404_json(gateway: GatewayFactory, upstreams: dict[str, Upstream]) -> None:
    gw = gateway([route("r", "/v2/models/fraud", [("a", upstreams["a"].url, 1)], methods=["POST"])])
    for method, path in [
        ("GET", "/elsewhere"),
        ("POST", "/v2/models/fraudster"),
        ("GET", "/v2/models/fraud/infer"),
    ]:
        r = httpx.request(method, f"{gw.url}{path}")
        assert r.status_code == 404
        assert error_code(r) == "no_route"
        assert "x-prediction-id" in r.headers


def test_body_over_limit_is_413(gateway: GatewayFactory, upstreams: dict[str, Upstream]) -> None:
    gw = gateway([route("r", "/echo", [("a", upstreams["a"].url, 1)], max_body_bytes=1000)])
    assert httpx.post(f"{gw.url}/echo/ok", content=b"x" * 1000).status_code == 200
    r = httpx.post(f"{gw.url}/echo/big", content=b"x" * 1001)
    assert r.status_code == 413
    assert error_code(r) == "payload_too_large"

    def chunked():  # no Content-Length: the limit holds while reading
        for _ in range(20):
            yield b"y" * 100

    r = httpx.post(f"{gw.url}/echo/big", content=chunked())
    assert r.status_code == 413
    assert upstreams["a"].control.requests == 1


def test_dead_upstream_is_502_and_logged(gateway: GatewayFactory) -> None:
    gw = gateway([route("r", "/", [("dead", dead_url(), 1)])])
    r = httpx.get(f"{gw.url}/anything")
    assert r.status_code == 502
    assert error_code(r) == "bad_gateway"
    assert r.headers["x-model-variant"] == "dead"
    assert r.headers["x-model-version"] == "9"
    gw.stop()
    (record,) = gw.records()
    assert record["status"] == 502
    assert record["error"].startswith("connect:")


def test_slow_upstream_is_504(gateway: GatewayFactory, upstreams: dict[str, Upstream]) -> None:
    gw = gateway(
        [route("r", "/slow", [("a", upstreams["a"].url, 1)], timeouts={"connect": 1, "total": 0.2})]
    )
    r = httpx.get(f"{gw.url}/slow?seconds=3", timeout=10)
    assert r.status_code == 504
    assert error_code(r) == "upstream_timeout"
    gw.stop()
    assert gw.records()[0]["error"].startswith("timeout:")


def test_dot_segments_are_refused(gateway: GatewayFactory, upstreams: dict[str, Upstream]) -> None:
    gw = gateway([route("r", "/echo", [("a", upstreams["a"].url, 1)])])
    for target in (b"/echo/../admin", b"/echo/%2e%2e/admin", b"/echo/./x"):
        status, _ = raw_request(gw.url, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 400, target
    assert upstreams["a"].control.requests == 0


@pytest.mark.parametrize("media_type", ["application/octet-stream", "text/event-stream"])
def test_streaming_passes_through_unbuffered(
    gateway: GatewayFactory, upstreams: dict[str, Upstream], media_type: str
) -> None:
    """1. The upstream sends its first chunk, then holds the rest until released.
    2. The client must read that first chunk through the gateway while the upstream holds.
    3. Released, the rest arrives and the record is written with the captured stream.
    """
    gw = gateway([route("r", "/stream", [("a", upstreams["a"].url, 1)], capture={"bodies": True})])
    with httpx.stream("GET", f"{gw.url}/stream?type={media_type}", timeout=5) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith(media_type)
        assert r.headers["x-model-variant"] == "a"
        chunks = r.iter_raw()
        first = next(chunks)  # a buffering proxy would time out here
        assert first == b"data: first\n\n"
        upstreams["a"].control.release.set()
        rest = b"".join(chunks)
    assert rest == b"data: second\n\n"
    gw.stop()
    (record,) = gw.records()
    assert record["response_body"] == b"data: first\n\ndata: second\n\n"


def test_large_response_streams_byte_exact(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = gateway(
        [
            route(
                "r",
                "/big",
                [("a", upstreams["a"].url, 1)],
                capture={"bodies": True, "max_bytes": 10},
            )
        ]
    )
    r = httpx.get(f"{gw.url}/big?bytes=3000000")
    assert r.status_code == 200
    assert r.content == b"x" * 3_000_000
    gw.stop()
    (record,) = gw.records()
    assert record["response_body"] == b"x" * 10
    assert record["response_truncated"] == 1


def test_upstream_connections_go_back_to_the_pool(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """Buffered and streamed responses, read to the end, leave their connection to the
    gateway's pool: one connection serves every request sent one after another."""
    url = upstreams["a"].url
    gw = gateway(
        [
            route("peer", "/peer", [("a", url, 1)]),
            route("big", "/big", [("a", url, 1)]),
            route("echo", "/echo", [("a", url, 1)]),
        ]
    )
    ports = set()
    with httpx.Client(timeout=30) as client:
        for _ in range(5):
            ports.add(client.get(f"{gw.url}/peer").json()["port"])
            assert len(client.get(f"{gw.url}/big?bytes=2000000").content) == 2_000_000
            assert client.post(f"{gw.url}/echo/x", content=b"{}").status_code == 200
    assert len(ports) == 1


def test_gzip_body_passes_through_encoded(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = gateway([route("r", "/echo", [("a", upstreams["a"].url, 1)])])
    r = httpx.post(
        f"{gw.url}/echo/g", json={"k": "v" * 2000}, headers={"Accept-Encoding": "identity"}
    )
    assert r.status_code == 200
    assert r.json()["headers"]["accept-encoding"] == "identity"
