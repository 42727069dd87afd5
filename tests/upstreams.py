"""Real upstream HTTP servers the tests start: the demo model plus endpoints for edge cases."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Mount, Route

from model_gateway.demo import create_model_server


class UpstreamControl:
    """Knobs a test turns on a running upstream from its own thread."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.requests = 0


def create_upstream(name: str, version: str, control: UpstreamControl | None = None) -> Starlette:
    """An upstream that names itself in every answer, so a test sees which variant served."""
    control = control or UpstreamControl()

    async def echo(request: Request) -> Response:
        control.requests += 1
        body = await request.body()
        return Response(
            orjson.dumps(
                {
                    "upstream": name,
                    "model_version": version,
                    "method": request.method,
                    "path": request.url.path,
                    "query": request.url.query,
                    "headers": dict(request.headers),
                    "body": body.decode("utf-8", "replace"),
                }
            ),
            media_type="application/json",
        )

    async def slow(request: Request) -> Response:
        control.requests += 1
        await asyncio.sleep(float(request.query_params.get("seconds", "2")))
        return Response(orjson.dumps({"upstream": name, "model_version": version}))

    async def reports_header(request: Request) -> Response:
        return Response(b"{}", media_type="application/json", headers={"X-Model-Version": "7.1"})

    async def reports_body(request: Request) -> Response:
        return Response(
            orjson.dumps({"model_version": "2024-06-01", "outputs": []}),
            media_type="application/json",
        )

    async def stream(request: Request) -> StreamingResponse:
        media_type = request.query_params.get("type", "application/octet-stream")

        async def chunks() -> AsyncIterator[bytes]:
            yield b"data: first\n\n"
            # held until the test has seen the first chunk through the gateway
            while not control.release.is_set():
                await asyncio.sleep(0.01)
            yield b"data: second\n\n"

        return StreamingResponse(chunks(), media_type=media_type)

    async def held(request: Request) -> Response:
        # answers only once the test releases it (as echo, without the headers)
        control.requests += 1
        body = await request.body()
        while not control.release.is_set():
            await asyncio.sleep(0.01)
        return Response(
            orjson.dumps({"upstream": name, "model_version": version, "body": body.decode()}),
            media_type="application/json",
        )

    async def peer(request: Request) -> Response:
        # the gateway's side of the connection: the same port means a reused connection
        port = request.client.port if request.client else 0
        return Response(orjson.dumps({"port": port}), media_type="application/json")

    async def big(request: Request) -> Response:
        size = int(request.query_params.get("bytes", "2000000"))
        return Response(b"x" * size, media_type="application/octet-stream")

    return Starlette(
        routes=[
            Route("/echo/{rest:path}", echo, methods=["GET", "POST", "PUT", "DELETE"]),
            Route("/slow", slow),
            Route("/reports-header", reports_header),
            Route("/reports-body", reports_body),
            Route("/stream", stream),
            Route("/big", big),
            Route("/peer", peer),
            Route("/held/{rest:path}", held, methods=["GET", "POST"]),
            Mount("/", create_model_server("fraud", version)),
        ]
    )
