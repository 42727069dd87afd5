"""The control plane under faults and attacks: reloads while the store is down, secrets in
URLs and tokens, trailing slashes, clients that leave mid-body."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest
import yaml

from .conftest import GatewayFactory, Upstream, dead_url, error_code, route, wait_until
from .test_faults import Forwarder
from .test_processes import INFER
from .test_store import POSTGRES


def sample(gw: object, name: str, **labels: str) -> float:
    value = gw.app.state.metrics.registry.get_sample_value(name, labels)  # type: ignore[attr-defined]
    return float(value or 0)


def test_the_config_watch_survives_a_store_outage_during_a_reload(
    gateway: GatewayFactory, upstreams: dict[str, Upstream], caplog: pytest.LogCaptureFixture
) -> None:
    """1. The store (PostgreSQL) goes away; the config file is edited.
    2. The reload fails on the store: logged in one line, counted, the old version stays.
    3. The store comes back: the same edit is applied without another touch of the file,
       and a later edit too. The stop then completes, the log flushed."""
    caplog.set_level(logging.INFO)
    schema = f"mg_reload_{uuid.uuid4().hex[:12]}"
    host = POSTGRES.split("@", 1)[1].split("/", 1)[0]
    forwarder = Forwarder((host.split(":")[0], int(host.split(":")[1])))
    url = POSTGRES.replace(host, f"127.0.0.1:{forwarder.port}") + f"?schema={schema}"
    try:
        gw = gateway(
            [route("fraud", "/v2/models/fraud", [("a", upstreams["a"].url, 1)])],
            storage={"url": url},
            server={"config_poll_interval": 0.05},
        )
        first = gw.app.loaded.version

        def edit(weight: float) -> None:
            doc = yaml.safe_load(gw.config_path.read_text())
            doc["routes"][0]["variants"][0]["weight"] = weight
            gw.config_path.write_text(yaml.safe_dump(doc))

        forwarder.down()
        edit(2)
        wait_until(
            lambda: sample(gw, "model_gateway_background_errors_total", task="config-reload") >= 2,
            "two failed reloads while the store is down",
        )
        assert gw.app.loaded.version == first
        forwarder.up()
        wait_until(
            lambda: gw.app.loaded.version != first, "the edit applied once the store is back"
        )
        second = gw.app.loaded.version
        edit(3)
        wait_until(lambda: gw.app.loaded.version != second, "a later edit applied too")
        assert httpx.post(f"{gw.url}/v2/models/fraud/infer", json=INFER).status_code == 200
        gw.stop()
        assert not any(r.exc_info for r in caplog.records if "reload" in r.getMessage())
        assert any(
            "model-gateway stopped; prediction log flushed" in r.getMessage()
            for r in caplog.records
        )

        async def count() -> int:
            conn = await asyncpg.connect(POSTGRES, server_settings={"search_path": schema})
            try:
                return int(await conn.fetchval("SELECT COUNT(*) FROM configs"))
            finally:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                await conn.close()

        assert asyncio.run(count()) == 3
    finally:
        forwarder.close()


def test_a_failing_shutdown_step_keeps_none_of_the_others_from_running(
    gateway: GatewayFactory, upstreams: dict[str, Upstream], caplog: pytest.LogCaptureFixture
) -> None:
    """A step of the stop that raises (here the config watch's) is logged and counted; the
    log is still flushed and the store closed."""
    gw = gateway([route("fraud", "/v2/models/fraud", [("a", upstreams["a"].url, 1)])])
    for _ in range(5):
        assert httpx.post(f"{gw.url}/v2/models/fraud/infer", json=INFER).status_code == 200

    async def broken() -> None:
        raise RuntimeError("a stored exception")

    gw.app.reloader.stop = broken  # type: ignore[method-assign]
    gw.stop()
    assert len(gw.records()) == 5
    assert sample(gw, "model_gateway_background_errors_total", task="shutdown") == 1
    assert any("config watch failed" in r.getMessage() for r in caplog.records)


def test_variant_urls_with_env_credentials_show_in_routing_and_secrets_never_do(
    gateway: GatewayFactory,
    upstreams: dict[str, Upstream],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A variant URL whose password comes from ``${VAR}`` (as the README recommends), a
    shadow URL with a literal password, a literal feedback token and a health-checked
    variant that is down with a password in its URL: ``/admin/routing`` answers, and no
    secret reaches it, the config history or the log."""
    monkeypatch.setenv("MG_TEST_PASSWORD", "env-s3cret")
    port = upstreams["a"].url.rsplit(":", 1)[1]
    dead = dead_url().removeprefix("http://")
    gw = gateway(
        [
            route(
                "fraud",
                "/v2/models/fraud",
                [("a", f"http://alice:${{MG_TEST_PASSWORD}}@127.0.0.1:{port}", 1)],
                shadows=[
                    {
                        "name": "s",
                        "url": f"http://bob:hunter2@127.0.0.1:{port}",
                        "model_version": "9",
                    }
                ],
            ),
            route(
                "down",
                "/down",
                [("d", f"http://carol:pa55word@{dead}", 1)],
                health={"path": "/ready", "interval": 0.05, "unhealthy_threshold": 1},
            ),
        ],
        admin={"feedback_token": "fb-literal-token"},
        server={"config_poll_interval": 0},
    )
    assert httpx.post(f"{gw.url}/v2/models/fraud/infer", json=INFER).status_code == 200
    wait_until(lambda: gw.app.state.health.down.get("down"), "the down variant seen down")
    answer = httpx.get(f"{gw.url}/admin/routing")
    assert answer.status_code == 200, answer.text
    routes = {r["name"]: r for r in answer.json()["routes"]}
    assert routes["fraud"]["variants"][0]["url"] == (
        f"http://alice:${{MG_TEST_PASSWORD}}@127.0.0.1:{port}"
    )
    assert routes["fraud"]["variants"][0]["share"] == 1.0
    assert routes["fraud"]["shadows"][0]["url"] == f"http://bob:[REDACTED]@127.0.0.1:{port}"
    history = asyncio.run(gw.app.store.config_at(time.time()))  # type: ignore[arg-type]
    gw.stop()
    text = (history or {})["text"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in ("env-s3cret", "hunter2", "fb-literal-token", "pa55word"):
        assert secret not in answer.text
        assert secret not in text
        assert secret not in logged
    assert "carol:[REDACTED]@" in logged


def test_the_history_read_needs_no_gateway_loop(tmp_path: Path) -> None:
    """The routing snapshot reads a stored text as data: unexpanded references, and weights
    written as references (no share then), never fail it."""
    from model_gateway.admin import routing_snapshot

    text = yaml.safe_dump(
        {
            "routes": [
                {
                    "name": "r",
                    "path": "/r",
                    "variants": [
                        {
                            "name": "a",
                            "url": "http://${HOST}:${PORT}",
                            "model_version": 1,
                            "weight": "${W}",
                        },
                        {"name": "b", "url": "http://x:${P}@h", "model_version": "2"},
                    ],
                }
            ]
        }
    )
    snapshot = routing_snapshot(text)
    assert [v["url"] for v in snapshot[0]["variants"]] == [
        "http://${HOST}:${PORT}",
        "http://x:${P}@h",
    ]
    assert [v["share"] for v in snapshot[0]["variants"]] == [None, None]
    assert snapshot[0]["variants"][0]["model_version"] == "1"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/routing/"),
        ("POST", "/feedback/"),
        ("GET", "/healthz/"),
        ("GET", "/admin/report/"),
    ],
)
def test_a_trailing_slash_on_a_control_path_is_not_redirected(
    gateway: GatewayFactory, upstreams: dict[str, Upstream], method: str, path: str
) -> None:
    """Starlette would redirect to the path without its slash on whatever host the client
    named (an open redirect); the gateway answers 404 instead."""
    gw = gateway([route("fraud", "/v2/models/fraud", [("a", upstreams["a"].url, 1)])])
    answer = httpx.request(
        method, f"{gw.url}{path}", headers={"Host": "evil.example"}, follow_redirects=False
    )
    assert answer.status_code == 404
    assert "location" not in answer.headers
    assert error_code(answer) == "not_found"


def test_a_feedback_client_that_leaves_mid_body_leaves_no_traceback(
    gateway: GatewayFactory, upstreams: dict[str, Upstream], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    gw = gateway([route("fraud", "/v2/models/fraud", [("a", upstreams["a"].url, 1)])])
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n[{"prediction_id": '
        )
        time.sleep(0.1)
    wait_until(
        lambda: any("left before its body" in r.getMessage() for r in caplog.records),
        "the gateway to see the client gone",
    )
    gw.stop()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
