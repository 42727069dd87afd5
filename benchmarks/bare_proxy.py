"""The floors: uvicorn and aiohttp with nothing else (the gateway's stack), and uvicorn alone.

No routing, logging, metrics, header handling or error handling: what the gateway would cost
if it did nothing but pass bytes. Four of them:

- ``lean``: a plain ASGI function on the gateway's own upstream client
  (``model_gateway.upstream``: aiohttp's connector and response parser, no
  ``ClientSession.request``): the floor of this stack as the gateway uses it;
- ``asgi``: a plain ASGI function on ``aiohttp.ClientSession``, the usual way to call aiohttp;
- ``starlette``: the same behind a Starlette route, ``Request`` and ``Response`` — the "bare
  Starlette + aiohttp proxy" that the gateway's hot path is meant to beat;
- ``raw``: a plain ASGI function on a raw httptools connection to the model server
  (``callback_proxy.RawUpstream``), no aiohttp: uvicorn's half of the floor alone.

``python bare_proxy.py PORT UPSTREAM_URL [lean|asgi|starlette|raw] [WORKERS]``. Each worker prints
``bare proxy started`` on stderr once it serves, so that a harness can wait for all of them.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import uvicorn
from callback_proxy import RawUpstream  # beside this script
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from yarl import URL

from model_gateway.config import Timeouts
from model_gateway.upstream import Deadlines, UpstreamClient, create_clients

UPSTREAM = sys.argv[2]
session: aiohttp.ClientSession | None = None
client: UpstreamClient | None = None
raw: RawUpstream | None = None


def started() -> None:
    sys.stderr.write("bare proxy started\n")  # one write: the workers share the pipe
    sys.stderr.flush()


def open_lean() -> None:
    global session, client
    session, client = create_clients()


def open_session() -> None:
    global session
    session = aiohttp.ClientSession(auto_decompress=False)


def open_raw() -> None:
    global raw
    url = URL(UPSTREAM)
    assert url.host is not None and url.port is not None
    raw = RawUpstream(url.host, url.port)


async def via_client(scope: dict[str, Any], body: bytes) -> tuple[int, bytes]:
    assert client is not None
    upstream = await client.request(
        scope["method"], UPSTREAM, scope["raw_path"], [], body, DEADLINES
    )
    return upstream.status, await upstream.read()


async def via_raw(scope: dict[str, Any], body: bytes) -> tuple[int, bytes]:
    assert raw is not None
    return await raw.exchange(scope["raw_path"], body)


async def via_session(scope: dict[str, Any], body: bytes) -> tuple[int, bytes]:
    assert session is not None
    async with session.post(UPSTREAM + scope["path"], data=body) as upstream:
        return upstream.status, await upstream.read()


Forward = Callable[[dict[str, Any], bytes], Awaitable[tuple[int, bytes]]]


def plain_asgi(open_clients: Callable[[], None], forward: Forward) -> Any:
    """A plain ASGI app that forwards every request with ``forward``."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            open_clients()
            await send({"type": "lifespan.startup.complete"})
            started()
            await receive()
            if session is not None:
                await session.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        status, answer = await forward(scope, (await receive())["body"])
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    return app


DEADLINES = Deadlines(Timeouts())
lean_app = plain_asgi(open_lean, via_client)
asgi_app = plain_asgi(open_session, via_session)
raw_app = plain_asgi(open_raw, via_raw)


@contextlib.asynccontextmanager
async def lifespan(_: Starlette) -> AsyncIterator[None]:
    open_session()
    started()
    yield
    assert session is not None
    await session.close()


async def forward(request: Request) -> Response:
    assert session is not None
    body = await request.body()
    async with session.post(UPSTREAM + request.url.path, data=body) as upstream:
        answer = await upstream.read()
    return Response(answer, status_code=upstream.status, media_type="application/json")


starlette_app = Starlette(
    routes=[Route("/{path:path}", forward, methods=["GET", "POST"])], lifespan=lifespan
)

if __name__ == "__main__":
    kind = sys.argv[3] if len(sys.argv) > 3 else "lean"
    workers = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    app_name = {
        "lean": "lean_app",
        "asgi": "asgi_app",
        "starlette": "starlette_app",
        "raw": "raw_app",
    }[kind]
    config = uvicorn.Config(
        # several workers import the app by name (each reads the same argv)
        f"bare_proxy:{app_name}" if workers > 1 else globals()[app_name],
        workers=workers,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )
    if workers > 1:
        # the gateway's worker sockets (one per worker, SO_REUSEPORT), so that the floor
        # spreads connections over its workers as the gateway does
        from model_gateway.serving.server import Supervisor
        from model_gateway.serving.sockets import bind_one_per_worker

        sys.path.insert(0, str(Path(__file__).resolve().parent))  # the workers import from here
        sockets, _ = bind_one_per_worker(config, workers)
        Supervisor(config, sockets=sockets).run()
    else:
        uvicorn.Server(config).run()
