"""Test harness: real uvicorn servers on ephemeral ports, each in a thread with its own loop."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml

import model_gateway
from model_gateway.app import GatewayApp
from model_gateway.config import load_config
from model_gateway.server import gateway_server_config
from model_gateway.serving import EDGE_ENV

from .compiled import SRC, stale_extensions
from .inprocess import InProcessGateway
from .upstreams import UpstreamControl, create_upstream


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def wait_until(condition: Callable[[], object], what: str, seconds: float = 60) -> None:
    """Poll until ``condition()`` is true; fail naming ``what`` if it never becomes true.

    A bound on how long a test may hang, not a check of speed: every caller waits for
    something that must happen eventually (a record written, a worker reloaded).
    """
    give_up = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > give_up:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.02)


async def wait_until_async(condition: Callable[[], object], what: str, seconds: float = 60) -> None:
    """:func:`wait_until` for a test running on an event loop."""
    give_up = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > give_up:
            pytest.fail(f"gave up waiting for {what}")
        await asyncio.sleep(0.01)


class ServerThread:
    """A uvicorn server on 127.0.0.1:<ephemeral> in a thread; ``stop()`` is a graceful stop."""

    def __init__(self, config: uvicorn.Config, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
        assert not self.thread.is_alive(), "server did not stop"


@contextmanager
def running(app: Any, port: int = 0) -> Iterator[ServerThread]:
    """``app`` served on ``port`` (0: any free one) until the block ends."""
    server = ServerThread(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"), port
    ).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Upstream:
    name: str
    version: str
    url: str
    control: UpstreamControl


@pytest.fixture
def upstreams() -> Iterator[dict[str, Upstream]]:
    """Two real upstreams, ``a`` (version 1) and ``b`` (version 2)."""
    ca, cb = UpstreamControl(), UpstreamControl()
    with running(create_upstream("a", "1", ca)) as sa, running(create_upstream("b", "2", cb)) as sb:
        yield {"a": Upstream("a", "1", sa.url, ca), "b": Upstream("b", "2", sb.url, cb)}
        ca.release.set()
        cb.release.set()


def dead_url() -> str:
    """A URL on which nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def raw_request(url: str, request: bytes) -> tuple[int, bytes]:
    """Send bytes exactly as given (no client normalising the target); status and raw answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


class RunningGateway:
    def __init__(self, config_path: Path, db_path: Path) -> None:
        self.config_path = config_path
        self.db_path = db_path
        self.app = GatewayApp(load_config(config_path))
        grace = self.app.loaded.config.server.shutdown_timeout
        config = gateway_server_config(self.app, "127.0.0.1", 0, shutdown_timeout=grace)
        self.server = ServerThread(config).start()
        self.url = self.server.url
        #: httpx's client on this gateway's address, as ``InProcessGateway.http``
        self.http = httpx.Client(base_url=self.url)
        self.stopped = False

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.http.close()
            self.server.stop()

    def records(self) -> list[dict[str, Any]]:
        db = sqlite3.connect(self.db_path)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM predictions")]
        finally:
            db.close()


GatewayFactory = Callable[..., RunningGateway]


def write_config(
    tmp_path: Path, n: int, routes: list[dict[str, Any]], sections: dict[str, Any]
) -> tuple[Path, Path]:
    """The ``n``-th gateway's configuration file in ``tmp_path``, and its SQLite log."""
    db = tmp_path / f"log{n}.db"
    storage = {"url": f"sqlite:///{db}", **sections.pop("storage", {})}
    config = tmp_path / f"gateway{n}.yaml"
    config.write_text(yaml.safe_dump({"storage": storage, "routes": routes, **sections}))
    return config, db


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start a real gateway for a list of routes; stopped gracefully at the end of the test."""
    started: list[RunningGateway] = []

    def start(routes: list[dict[str, Any]], **sections: Any) -> RunningGateway:
        gw = RunningGateway(*write_config(tmp_path, len(started), routes, sections))
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


InProcessFactory = Callable[..., InProcessGateway]


@pytest.fixture
def in_process(tmp_path: Path) -> Iterator[InProcessFactory]:
    """Start a gateway for a list of routes with no server in front (``inprocess.py``)."""
    started: list[InProcessGateway] = []

    def start(routes: list[dict[str, Any]], **sections: Any) -> InProcessGateway:
        gw = InProcessGateway(*write_config(tmp_path, 100 + len(started), routes, sections))
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


def route(
    name: str, path: str, variants: list[tuple[str, str, float]], **extra: Any
) -> dict[str, Any]:
    """A route dict; variants as (name, url, weight), version taken from the name's upstream."""
    return {
        "name": name,
        "path": path,
        "variants": [
            {"name": n, "url": u, "model_version": {"a": "1", "b": "2"}.get(n, "9"), "weight": w}
            for n, u, w in variants
        ],
        **extra,
    }


#: the suite's server edge (``make test-stock`` runs it on the stock one)
EDGE = os.environ.get(EDGE_ENV) or "tuned"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The long tests first, so that a parallel run (pytest -n) does not end waiting on one
    # that started last.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    # What only the tuned edge does (a head's limits, the drain, one write per answer) is not
    # asked of the stock one: docs/operations.md says what the stock edge leaves out.
    if EDGE == "stock":
        skip = pytest.mark.skip(reason="the tuned server edge's own (MODEL_GATEWAY_EDGE=stock)")
        for item in items:
            if item.get_closest_marker("tuned_edge"):
                item.add_marker(skip)


def pytest_sessionstart(session: pytest.Session) -> None:
    # An extension built before a source changed would be imported instead of that source:
    # the suite would test old code. (`make test-pure` imports a copy without extensions.)
    stale = stale_extensions() if Path(model_gateway.__file__).is_relative_to(SRC) else []
    if stale:
        names = ", ".join(path.name for path in stale)
        pytest.exit(f"compiled modules older than src/ ({names}): run `make build`", returncode=2)


def error_code(answer: httpx.Response) -> str:
    """The code of an error the gateway answered itself: in ``X-Gateway-Error``, and in the
    body too where the protocol of the path has room for it (V1 and V2 paths carry a text)."""
    code = answer.headers["x-gateway-error"]
    body = answer.json()
    path = answer.request.url.path
    if path == "/v2" or path.startswith(("/v2/", "/v1/models/")):
        assert isinstance(body["error"], str), body
    else:
        assert body["error"]["code"] == code, body
    return code
