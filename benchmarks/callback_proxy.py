"""The event loop's own floor: proxies of protocol callbacks on uvloop and httptools.

No ASGI server and no aiohttp: a request parsed by httptools is written to an idle upstream
connection, and the answer, parsed by httptools too, is written to the client. They handle
exactly what the benchmark sends (keep-alive requests with a Content-Length body, answers
with a Content-Length) and nothing else a proxy must: no headers forwarded, no limits, no
errors, no timeouts.

They are there to split what separates the gateway from nginx in the 20 ms case: what any
Python proxy on this event loop pays, and what each half of the serving stack the gateway is
built on pays on top (uvicorn's protocol and ASGI cycle in front, aiohttp's pool and parser
behind; the bare proxy has both). Three modes:

- ``callbacks``: the request is written upstream from the callback that parsed it, the answer
  to the client from the callback that parsed it; not even a task;
- ``task``: a task per request, as an ASGI server runs one, awaiting the answer on the same
  raw connection;
- ``client``: a task per request on the gateway's own upstream client
  (``model_gateway.upstream``: aiohttp's connector and response parser) instead.

:class:`RawUpstream` is also the upstream of the bare proxy's ``raw`` kind: uvicorn in front of
a raw connection, the other half alone.

``python callback_proxy.py PORT UPSTREAM_HOST UPSTREAM_PORT [MODE]``. Prints ``callback proxy
started`` on stderr once it serves.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httptools
import uvloop

REASONS = {200: b"OK"}
Answer = Callable[[int, bytes], None]


class ParsedConnection(asyncio.Protocol):
    """A connection whose bytes go to an httptools parser, which calls back the methods
    below; the body of the message being parsed is gathered in ``body``."""

    def __init__(self, parser: Callable[[ParsedConnection], Any]) -> None:
        self.parser = parser(self)
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.body = []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)


class UpstreamConnection(ParsedConnection):
    """One keep-alive connection to the model server, idle or carrying one request."""

    def __init__(self, pool: RawUpstream) -> None:
        super().__init__(httptools.HttpResponseParser)
        self.pool = pool
        self.on_answer: Answer | None = None

    def on_message_complete(self) -> None:
        on_answer, self.on_answer = self.on_answer, None
        self.pool.idle.append(self)
        if on_answer is not None:
            on_answer(self.parser.get_status_code(), b"".join(self.body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool.idle:
            self.pool.idle.remove(self)


class RawUpstream:
    """Keep-alive connections to one model server; the last one used goes out first."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.host_header = f"{host}:{port}".encode()
        self.idle: list[UpstreamConnection] = []

    def request(self, target: bytes, body: bytes) -> bytes:
        return b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            target,
            self.host_header,
            len(body),
            body,
        )

    def send(self, request: bytes, on_answer: Answer) -> None:
        """Write ``request`` on an idle connection (a new one if none is idle); ``on_answer``
        gets the status and body."""
        if self.idle:
            upstream = self.idle.pop()
            upstream.on_answer = on_answer
            upstream.transport.write(request)
        else:
            asyncio.get_running_loop().create_task(self._connect_and_send(request, on_answer))

    async def _connect_and_send(self, request: bytes, on_answer: Answer) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(
            lambda: UpstreamConnection(self), self.host, self.port
        )
        upstream.on_answer = on_answer
        upstream.transport.write(request)

    async def exchange(self, target: bytes, body: bytes) -> tuple[int, bytes]:
        answer: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()

        def on_answer(status: int, body: bytes) -> None:
            if not answer.done():
                answer.set_result((status, body))

        self.send(self.request(target, body), on_answer)
        return await answer


class ClientConnection(ParsedConnection):
    def __init__(self, forward: Forward) -> None:
        super().__init__(httptools.HttpRequestParser)
        self.forward = forward
        self.url = b""

    def on_message_begin(self) -> None:
        self.url, self.body = b"", []  # the base's reset and this one's, in one call

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        self.forward(self, self.url, b"".join(self.body))

    def answer(self, status: int, body: bytes) -> None:
        if self.transport.is_closing():  # the client left while the model answered
            return
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, REASONS.get(status, b"-"), len(body), body)
        )


Forward = Callable[[ClientConnection, bytes, bytes], None]


def forwarder(mode: str, host: str, port: int) -> Forward:
    """How a parsed request reaches the model server and its answer the client, by ``mode``."""
    if mode == "callbacks":
        raw = RawUpstream(host, port)

        def forward(connection: ClientConnection, target: bytes, body: bytes) -> None:
            raw.send(raw.request(target, body), connection.answer)

        return forward

    exchange = {"task": raw_exchange, "client": client_exchange}[mode](host, port)
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    async def forward_and_answer(connection: ClientConnection, target: bytes, body: bytes) -> None:
        connection.answer(*await exchange(target, body))

    def in_a_task(connection: ClientConnection, target: bytes, body: bytes) -> None:
        task = loop.create_task(forward_and_answer(connection, target, body))
        running.add(task)
        task.add_done_callback(running.discard)

    return in_a_task


Exchange = Callable[[bytes, bytes], Awaitable[tuple[int, bytes]]]


def raw_exchange(host: str, port: int) -> Exchange:
    return RawUpstream(host, port).exchange


def client_exchange(host: str, port: int) -> Exchange:
    """An exchange on the gateway's own upstream client."""
    from model_gateway.config import Timeouts
    from model_gateway.upstream import Deadlines, create_clients

    _, client = create_clients()
    deadlines, base = Deadlines(Timeouts()), f"http://{host}:{port}"

    async def exchange(target: bytes, body: bytes) -> tuple[int, bytes]:
        upstream = await client.request("POST", base, target, [], body, deadlines)
        return upstream.status, await upstream.read()

    return exchange


async def serve(port: int, host: str, upstream_port: int, mode: str) -> None:
    forward = forwarder(mode, host, upstream_port)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ClientConnection(forward), "127.0.0.1", port)
    sys.stderr.write("callback proxy started\n")
    sys.stderr.flush()
    await server.serve_forever()


if __name__ == "__main__":
    mode = sys.argv[4] if len(sys.argv) > 4 else "callbacks"
    uvloop.install()
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), mode))
