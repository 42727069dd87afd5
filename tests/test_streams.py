"""Streams under stress: every stream a client read to its end is logged with its status, every
one the client cut is 499, none both."""

from __future__ import annotations

import asyncio
import random
from urllib.parse import urlsplit

import orjson

from .conftest import GatewayFactory, Upstream, route, wait_until

STREAMS = 10_000


async def one_stream(host: str, port: int, request_id: str, how: str) -> None:
    """POST a streaming chat completion and read its answer: ``end`` to the chunked end,
    ``done`` to the ``[DONE]`` event (then close, as SSE clients do), ``cut`` to the first
    event (the model still talking)."""
    body = orjson.dumps(
        {
            "model": "m",
            "stream": True,
            "messages": [{"role": "user", "content": "one two three four"}],
            "pause": 0.5 if how == "cut" else 0,
            "linger": 0.02,
        }
    )
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            + f"X-Request-Id: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        seen = b""
        wanted = {"end": b"\r\n0\r\n\r\n", "done": b"data: [DONE]", "cut": b"data: "}[how]
        while wanted not in seen:
            chunk = await reader.read(65536)
            assert chunk, f"{request_id}: the answer ended before {wanted!r}"
            seen += chunk
    finally:
        writer.close()


def test_ten_thousand_streams_read_or_cut_are_logged_as_such(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """Seed 3: 10,000 streams, 64 at a time, each read to its end, read to ``[DONE]`` or cut
    after its first event, at random; the model server ends each answer a moment after its
    ``[DONE]``. Before, a client that closed at ``[DONE]`` (as the openai SDK does) before
    the answer's end reached the gateway was logged 499."""
    gw = gateway([route("llm", "/v1", [("a", upstreams["a"].url, 1)])])
    address = urlsplit(gw.url)
    rng = random.Random(3)
    plan = {f"s{i}": rng.choice(["end", "done", "cut"]) for i in range(STREAMS)}

    async def run() -> None:
        pending = iter(plan.items())

        async def worker() -> None:
            for request_id, how in pending:
                await one_stream(address.hostname or "", address.port or 0, request_id, how)

        await asyncio.gather(*(worker() for _ in range(64)))

    asyncio.run(run())
    wait_until(lambda: len(gw.records()) == STREAMS, "every stream logged", seconds=120)
    logged = {r["request_id"]: r["status"] for r in gw.records()}
    wrong = {
        request_id: (how, logged[request_id])
        for request_id, how in plan.items()
        if logged[request_id] != (499 if how == "cut" else 200)
    }
    assert not wrong, f"{len(wrong)} logged wrong, e.g. {list(wrong.items())[:5]}"
