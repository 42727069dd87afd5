"""Streams under stress: every stream a client read to its end is logged with its status, every
one the client cut is 499, none both."""

from __future__ import annotations

import asyncio
import random
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from .conftest import GatewayFactory, Upstream, route, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STREAMS = 10_000


def unchunked(answer: bytes) -> bytes:
    """The body of an answer read so far, without its chunked framing."""
    _, _, rest = answer.partition(b"\r\n\r\n")
    body = b""
    while True:
        size_line, found, rest = rest.partition(b"\r\n")
        if not found or not size_line:
            return body
        size = int(size_line.split(b";")[0], 16)
        body += rest[:size]
        if size == 0 or len(rest) < size + 2:
            return body
        rest = rest[size + 2 :]


async def one_stream(
    host: str, port: int, request_id: str, how: str, extra: dict[str, Any] | None = None
) -> None:
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
            **(extra or {}),
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
        while wanted not in (seen if how == "end" else unchunked(seen)):
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


def test_a_last_event_split_over_two_writes_still_ends_the_stream(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """``data: [DONE]`` arriving in two parts: a client that closes at it read the whole
    stream (status 200, and the model and usage the stream named are kept). Before, only
    the last part was looked at: 499, and no model."""
    gw = gateway([route("llm", "/v1", [("a", upstreams["a"].url, 1)])])
    address = urlsplit(gw.url)
    body = {"split_done": True, "linger": 0.2, "stream_options": {"include_usage": True}}
    asyncio.run(one_stream(address.hostname or "", address.port or 0, "split", "done", body))
    wait_until(lambda: len(gw.records()) == 1, "the stream logged")
    (logged,) = gw.records()
    assert logged["status"] == 200, logged["error"]
    assert (logged["served_model"], logged["completion_tokens"]) == ("tiny-chat-1", 4)


def test_the_first_byte_of_a_stream_is_its_first_token(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """A streaming server sends its answer's head at once and its first token later: time
    to first byte is when the first token left (before: the head's time, near zero)."""
    gw = gateway([route("llm", "/v1", [("a", upstreams["a"].url, 1)])])
    address = urlsplit(gw.url)
    body = {"first_pause": 0.3}
    asyncio.run(one_stream(address.hostname or "", address.port or 0, "slow", "end", body))
    wait_until(lambda: len(gw.records()) == 1, "the stream logged")
    (logged,) = gw.records()
    assert 300 <= logged["first_byte_ms"] <= logged["latency_ms"]
