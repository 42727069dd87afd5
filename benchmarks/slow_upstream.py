"""A model server that takes 20 ms per answer: the latency-bound benchmark's upstream."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import uvicorn

BODY = b'{"model_name":"fraud","model_version":"1","outputs":[{"name":"score","datatype":"FP32","shape":[1],"data":[0.42]},{"name":"label","datatype":"INT64","shape":[1],"data":[0]}]}'
DELAY_SECONDS = 0.020


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await asyncio.sleep(DELAY_SECONDS)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(BODY)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
        lifespan="off",
    )
