"""The floor: uvicorn and aiohttp's client with nothing else, the same stack as the gateway.

No routing, logging, metrics, header handling or error handling: what the gateway would cost
if it did nothing but pass bytes. ``python bare_proxy.py PORT UPSTREAM_URL``.
"""

from __future__ import annotations

import sys
from typing import Any

import aiohttp
import uvicorn

UPSTREAM = sys.argv[2]
session: aiohttp.ClientSession | None = None


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global session
    if scope["type"] == "lifespan":
        await receive()
        session = aiohttp.ClientSession(auto_decompress=False)
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await session.close()
        await send({"type": "lifespan.shutdown.complete"})
        return
    assert session is not None
    body = (await receive())["body"]
    async with session.post(UPSTREAM + scope["path"], data=body) as upstream:
        answer = await upstream.read()
    await send(
        {
            "type": "http.response.start",
            "status": upstream.status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": answer})


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )
