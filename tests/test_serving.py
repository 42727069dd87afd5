"""The server edge's choice and interface: the tuned edge only on the uvicorn releases it is
tested on, the stock one otherwise; the limits reach the edge through ASGI middleware; a
client that leaves while the model works is seen on either edge."""

from __future__ import annotations

import logging
import re
import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from model_gateway import serving
from model_gateway.app import GatewayApp
from model_gateway.config import load_config
from model_gateway.server import gateway_server_config
from model_gateway.serving.protocol import CoalescingHttpToolsProtocol

from .conftest import EDGE, GatewayFactory, ServerThread, Upstream, route, wait_until
from .test_faults import read_answer

ROOT = Path(__file__).resolve().parent.parent


def test_the_tested_range_is_the_one_pyproject_allows() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bound = next(d for d in project["dependencies"] if d.startswith("uvicorn"))
    lowest, beyond = re.findall(r"(>=|<)(\d+)\.(\d+)", bound)
    assert (
        (int(lowest[1]), int(lowest[2])),
        (int(beyond[1]), int(beyond[2])),
    ) == serving.TESTED_UVICORN
    pinned = (ROOT / ".ci" / "lowest.txt").read_text()
    assert f"uvicorn=={lowest[1]}.{lowest[2]}.0" in pinned


@pytest.mark.parametrize(
    ("version", "runs"),
    [("0.52.9", False), ("0.53.0", True), ("0.55.4", True), ("0.56.0", False), ("1.0", False)],
)
def test_the_tuned_edge_runs_only_on_the_releases_it_is_tested_on(version: str, runs: bool) -> None:
    problem = serving.tuned_edge_problem(version)
    assert (problem is None) is runs
    if not runs:
        assert problem is not None and version in problem


def test_an_untested_uvicorn_falls_back_to_the_stock_edge_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(serving.EDGE_ENV, raising=False)
    # the installed release cannot be another here: the check is given the answer one gives
    monkeypatch.setattr(serving, "tuned_edge_problem", lambda: "uvicorn 0.99.0 is outside")
    with caplog.at_level(logging.WARNING, logger="model_gateway"):
        assert serving.choose_edge("tuned") == "stock"
    assert "uvicorn 0.99.0 is outside" in caplog.text
    assert serving.choose_edge("stock") == "stock"
    monkeypatch.setenv(serving.EDGE_ENV, "neither")
    with pytest.raises(SystemExit, match="one of tuned, stock"):
        serving.choose_edge("tuned")


def test_the_environment_chooses_the_edge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(serving.EDGE_ENV, "stock")
    config = gateway_server_config(object(), "127.0.0.1", 0, shutdown_timeout=1)
    assert config.http == "httptools"
    monkeypatch.setenv(serving.EDGE_ENV, "tuned")
    config = gateway_server_config(object(), "127.0.0.1", 0, shutdown_timeout=1, edge="stock")
    assert config.http is CoalescingHttpToolsProtocol


class PassThrough:
    """An ASGI middleware that changes nothing, as a user's tracing or auth layer would."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


@pytest.mark.tuned_edge
def test_the_client_limits_hold_through_asgi_middleware(
    tmp_path: Path, upstreams: dict[str, Upstream]
) -> None:
    """The app offers its limits in the lifespan state, which middleware passes on: a head
    that stops coming is still answered 408 by a gateway wrapped in one."""
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"client_header_timeout": 0.5},
                "storage": {"url": f"sqlite:///{tmp_path / 'log.db'}"},
                "routes": [route("s", "/slow", [("a", upstreams["a"].url, 1)])],
            }
        )
    )
    app = GatewayApp(load_config(config))
    server = ServerThread(
        gateway_server_config(PassThrough(app), "127.0.0.1", 0, shutdown_timeout=5)
    ).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as conn:
            conn.sendall(b"GET /slow?seconds=0 HTTP/1.1\r\nHost: x\r\nX-Req")
            answer = read_answer(conn)  # returns once the gateway closes the connection
        assert answer.startswith(b"HTTP/1.1 408 "), answer
    finally:
        server.stop()


def test_a_client_gone_while_the_model_works_is_logged_499_on_either_edge(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """The tuned edge cancels the request's wait when the connection is lost; the stock one
    leaves it to the proxy's own watch on ``receive``. Either way the gateway stops waiting
    at once (its record is written while the model still holds the request, which it never
    answers until the end), logs 499, and lets the model's connection go."""
    a = upstreams["a"]
    gw = gateway([route("s", "/held", [("a", a.url, 1)])])
    with socket.create_connection(("127.0.0.1", gw.server.port)) as conn:
        conn.sendall(b"GET /held/x HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: a.control.requests == 1, "the request at the model server")
    wait_until(lambda: len(gw.records()) == 1, "the request's record")
    assert not a.control.release.is_set()  # the model has still not answered
    record = gw.records()[0]
    assert record["status"] == 499, (EDGE, record)
    assert record["error"] == "client disconnected before the answer"
