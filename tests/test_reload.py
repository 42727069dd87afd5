"""Hot reload: a valid file takes over, an invalid one never does, in-flight requests keep
the configuration they started with, and every activation is kept for /admin/routing?at=."""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .conftest import (
    GatewayFactory,
    RunningGateway,
    Upstream,
    route,
    wait_until,
    wait_until_async,
)


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def rewrite(gw: RunningGateway, change: Any) -> None:
    doc = yaml.safe_load(gw.config_path.read_text())
    change(doc)
    gw.config_path.write_text(yaml.safe_dump(doc))


def metric(gw: RunningGateway, name: str) -> float:
    for line in httpx.get(f"{gw.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def two_variant_gateway(
    gateway: GatewayFactory, upstreams: dict[str, Upstream], **extra: Any
) -> RunningGateway:
    return gateway(
        [route("r", "/echo", [("a", upstreams["a"].url, 1), ("b", upstreams["b"].url, 0)])],
        server={"config_poll_interval": 0},
        **extra,
    )


def test_reload_by_api_switches_routing_and_records_history(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """1. Before the gateway starts, /admin/routing has nothing for that instant.
    2. Version 1 sends everything to a; after a reload, version 2 sends everything to b.
    3. /admin/routing?at= answers version 1 for an instant between, version 2 for now.
    """
    before = time.time() - 1
    gw = two_variant_gateway(gateway, upstreams)
    v1 = gw.app.loaded.version
    assert httpx.get(f"{gw.url}/echo/x").json()["upstream"] == "a"
    unchanged = httpx.post(f"{gw.url}/admin/reload").json()
    assert unchanged == {"status": "unchanged", "config_version": v1}

    between = time.time()
    rewrite(gw, lambda d: [v.update(weight=1 - v["weight"]) for v in d["routes"][0]["variants"]])
    answer = httpx.post(f"{gw.url}/admin/reload")
    assert answer.status_code == 200
    v2 = answer.json()["config_version"]
    assert answer.json()["status"] == "reloaded" and v2 != v1
    r = httpx.get(f"{gw.url}/echo/x")
    assert r.json()["upstream"] == "b"
    assert httpx.get(f"{gw.url}/healthz").json()["config_version"] == v2
    assert metric(gw, "model_gateway_config_reloads_total") == 1
    assert f'model_gateway_config_info{{version="{v2}"}} 1.0' in httpx.get(f"{gw.url}/metrics").text

    then = httpx.get(f"{gw.url}/admin/routing", params={"at": rfc3339(between)})
    assert then.status_code == 200
    assert then.json()["config_version"] == v1
    shares = {v["name"]: v["share"] for v in then.json()["routes"][0]["variants"]}
    assert shares == {"a": 1.0, "b": 0.0}
    now = httpx.get(f"{gw.url}/admin/routing").json()
    assert now["config_version"] == v2
    assert {v["name"]: v["weight"] for v in now["routes"][0]["variants"]} == {"a": 0, "b": 1}
    assert {v["name"]: v["model_version"] for v in now["routes"][0]["variants"]} == {
        "a": "1",
        "b": "2",
    }

    missing = httpx.get(f"{gw.url}/admin/routing", params={"at": rfc3339(before)})
    assert missing.status_code == 404
    assert "no configuration was active" in missing.json()["error"]["message"]
    # not a time, no offset, past year 9999 once in UTC
    for bad in ("yesterday", "2026-01-01T00:00:00", "9999-12-31T23:59:59-23:59"):
        assert httpx.get(f"{gw.url}/admin/routing", params={"at": bad}).status_code == 400

    gw.stop()
    (record_v1, record_v2) = sorted(gw.records(), key=lambda rec: rec["request_time"])
    assert (record_v1["config_version"], record_v1["variant"]) == (v1, "a")
    assert (record_v2["config_version"], record_v2["variant"]) == (v2, "b")


def test_invalid_file_never_replaces_the_live_config(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = two_variant_gateway(gateway, upstreams)
    v1 = gw.app.loaded.version
    rewrite(gw, lambda d: d["routes"][0]["variants"][1].update(weight=-5))
    answer = httpx.post(f"{gw.url}/admin/reload")
    assert answer.status_code == 422
    body = answer.json()
    assert body["error"]["code"] == "invalid_config"
    assert body["error"]["problems"] == ["routes[0].variants[1].weight: must be >= 0"]
    assert body["config_version"] == v1
    gw.config_path.write_text("routes: [unclosed\n")
    problems = httpx.post(f"{gw.url}/admin/reload").json()["error"]["problems"]
    assert problems[0].startswith("line 2, column 1: invalid YAML")
    assert httpx.get(f"{gw.url}/echo/x").json()["upstream"] == "a"
    assert httpx.get(f"{gw.url}/healthz").json()["config_version"] == v1
    assert metric(gw, "model_gateway_config_reload_failures_total") == 2


def test_storage_change_needs_a_restart(
    gateway: GatewayFactory, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    gw = two_variant_gateway(gateway, upstreams)
    rewrite(gw, lambda d: d["storage"].update(url=f"sqlite:///{tmp_path / 'other.db'}"))
    answer = httpx.post(f"{gw.url}/admin/reload")
    assert answer.status_code == 422
    assert answer.json()["error"]["problems"] == ["storage: changes take effect only on restart"]


def test_a_new_shutdown_timeout_needs_a_restart(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    # the server holds it from its start, as it holds its host and port
    gw = two_variant_gateway(gateway, upstreams)
    rewrite(gw, lambda d: d.setdefault("server", {}).update(shutdown_timeout=5))
    answer = httpx.post(f"{gw.url}/admin/reload")
    assert answer.status_code == 422
    assert answer.json()["error"]["problems"] == [
        "server.shutdown_timeout: changes take effect only on restart"
    ]


@pytest.mark.tuned_edge
def test_the_client_limits_change_with_a_reload(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """client_header_timeout (and send_timeout beside it) take effect on a reload, for the
    connections already open too: a half head, held under the default 60 s, is answered 408
    once the limit is reloaded at 0.3 s."""
    gw = two_variant_gateway(gateway, upstreams)
    with socket.create_connection(("127.0.0.1", gw.server.port)) as conn:
        conn.sendall(b"GET /echo/x HTTP/1.1\r\nHost")
        rewrite(
            gw,
            lambda d: d.setdefault("server", {}).update(client_header_timeout=0.3, send_timeout=5),
        )
        assert httpx.post(f"{gw.url}/admin/reload").status_code == 200
        conn.settimeout(20)  # a guard against a gateway that never answers, not a timing
        assert conn.recv(65536).startswith(b"HTTP/1.1 408 ")


def test_file_change_is_picked_up(gateway: GatewayFactory, upstreams: dict[str, Upstream]) -> None:
    gw = gateway(
        [route("r", "/echo", [("a", upstreams["a"].url, 1), ("b", upstreams["b"].url, 0)])],
        server={"config_poll_interval": 0.05},
    )
    v1 = gw.app.loaded.version
    rewrite(gw, lambda d: [v.update(weight=1 - v["weight"]) for v in d["routes"][0]["variants"]])
    wait_until(
        lambda: httpx.get(f"{gw.url}/healthz").json()["config_version"] != v1,
        "the file change to be picked up",
    )
    assert httpx.get(f"{gw.url}/echo/x").json()["upstream"] == "b"


@pytest.mark.anyio
async def test_in_flight_requests_finish_on_the_config_they_started_with(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """1. A slow request starts on version 1 (variant a).
    2. While it waits on the upstream, version 2 (variant b only) is activated.
    3. The slow request is still answered by a, and its record names version 1.
    """
    gw = gateway(
        [route("r", "/slow", [("a", upstreams["a"].url, 1), ("b", upstreams["b"].url, 0)])],
        server={"config_poll_interval": 0},
    )
    v1 = gw.app.loaded.version
    async with httpx.AsyncClient(timeout=20) as client:
        slow = asyncio.ensure_future(client.get(f"{gw.url}/slow?seconds=0.6"))
        await wait_until_async(lambda: upstreams["a"].control.requests > 0, "the slow request")
        rewrite(
            gw, lambda d: [v.update(weight=1 - v["weight"]) for v in d["routes"][0]["variants"]]
        )
        reloaded = await client.post(f"{gw.url}/admin/reload")
        v2 = reloaded.json()["config_version"]
        fresh = await client.get(f"{gw.url}/slow?seconds=0")
        old = await slow
    assert old.json()["upstream"] == "a" and old.headers["x-model-variant"] == "a"
    assert fresh.json()["upstream"] == "b"
    await asyncio.to_thread(gw.stop)
    by_id = {rec["prediction_id"]: rec for rec in gw.records()}
    assert by_id[old.headers["x-prediction-id"]]["config_version"] == v1
    assert by_id[fresh.headers["x-prediction-id"]]["config_version"] == v2
