"""The event loop's own floor: a proxy of protocol callbacks on uvloop and httptools.

No ASGI server, no task per request, no aiohttp: a request parsed by httptools is written to
an idle upstream connection from the callback that parsed it, and the answer is written to
the client from the callback that parsed it. It handles exactly what the benchmark sends
(keep-alive requests with a Content-Length body, answers with a Content-Length) and nothing
else a proxy must: no headers forwarded, no limits, no errors, no timeouts.

It is there to split what separates the gateway from nginx in the 20 ms case: what any Python
proxy on this event loop pays (this), and what the serving stack the gateway is built on pays
on top (the bare proxy: uvicorn's protocol and ASGI cycle, aiohttp's pool and parser).

``python callback_proxy.py PORT UPSTREAM_HOST UPSTREAM_PORT``. Prints ``callback proxy
started`` on stderr once it serves.
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import httptools
import uvloop

PORT, UPSTREAM_HOST, UPSTREAM_PORT = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
HOST_HEADER = f"{UPSTREAM_HOST}:{UPSTREAM_PORT}".encode()
REASONS = {200: b"OK"}


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to the model server, idle or carrying one client's request."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.parser = httptools.HttpResponseParser(self)
        self.client: ClientConnection | None = None
        self.body: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.body = []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        IDLE.append(self)
        if client is not None:
            client.answer(self.parser.get_status_code(), b"".join(self.body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self in IDLE:
            IDLE.remove(self)


#: upstream connections waiting for a request, last used first
IDLE: list[UpstreamConnection] = []


class ClientConnection(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url, self.body = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        request = b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            self.url,
            HOST_HEADER,
            len(body),
            body,
        )
        if IDLE:
            upstream = IDLE.pop()
            upstream.client = self
            upstream.transport.write(request)
        else:
            asyncio.get_running_loop().create_task(self.connect_and_send(request))

    async def connect_and_send(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(UpstreamConnection, UPSTREAM_HOST, UPSTREAM_PORT)
        upstream.client = self
        upstream.transport.write(request)

    def answer(self, status: int, body: bytes) -> None:
        if self.transport.is_closing():  # the client left while the model answered
            return
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, REASONS.get(status, b"-"), len(body), body)
        )


async def serve() -> None:
    server = await asyncio.get_running_loop().create_server(ClientConnection, "127.0.0.1", PORT)
    sys.stderr.write("callback proxy started\n")
    sys.stderr.flush()
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(serve())
