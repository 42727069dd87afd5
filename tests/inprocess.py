"""The in-process tier: the gateway's ASGI app called through ``httpx.ASGITransport``, with no
server and no socket, on an event loop of the test's own thread.

For what does not depend on the connection (the control plane, feedback, reports): the same
app, store and model servers as a served gateway, without a server's start and stop. The
proxy's, the edge's and the processes' tests keep a real server on a real port.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import httpx

from model_gateway.app import GatewayApp
from model_gateway.config import load_config


class InProcessClient:
    """httpx's client calls, answered by the app on ``runner``'s loop. The loop runs only
    while a call is answered: the gateway's background work (the log's writer, health checks)
    moves on with each call, so a test waits for a record by asking for it."""

    def __init__(self, app: GatewayApp, runner: asyncio.Runner) -> None:
        self._runner = runner
        transport = httpx.ASGITransport(app=app)
        self._client = httpx.AsyncClient(transport=transport, base_url="http://gateway")

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._runner.run(self._client.request(method, path, **kwargs))

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def close(self) -> None:
        self._runner.run(self._client.aclose())


class InProcessGateway:
    """A gateway started from ``config_path`` with no server in front: ``http`` calls it."""

    def __init__(self, config_path: Path, db_path: Path) -> None:
        self.config_path = config_path
        self.db_path = db_path
        self.app = GatewayApp(load_config(config_path))
        self._runner = asyncio.Runner()
        self._runner.run(self.app.startup())
        self.http = InProcessClient(self.app, self._runner)
        self.stopped = False

    def run(self, awaitable: Any) -> Any:
        """Run ``awaitable`` on the gateway's loop (its background work moves on meanwhile)."""
        return self._runner.run(awaitable)

    def stop(self) -> None:
        """The lifespan's shutdown, as a server's graceful stop runs it: the log flushed."""
        if self.stopped:
            return
        self.stopped = True
        try:
            self.http.close()
            self._runner.run(self.app.shutdown())
        finally:
            self._runner.close()

    def records(self) -> list[dict[str, Any]]:
        """The log's rows, once the loop has run a moment: a wait on them sees the writer
        move, as it would under a server."""
        self._runner.run(asyncio.sleep(0.01))
        db = sqlite3.connect(self.db_path)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM predictions")]
        finally:
            db.close()
