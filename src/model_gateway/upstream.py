"""The upstream side: aiohttp's connections and response parser, per-route timeouts, errors.

Every connection to a model server is opened and closed by aiohttp's ``TCPConnector`` (DNS
cache, TLS, connect timeouts), and every answer is read by its ``ResponseHandler`` (the C
response parser, the body stream); between two exchanges a connection waits in its origin's
idle list (:class:`UpstreamClient`). What the gateway leaves out is the
``ClientSession.request`` layer above them: cookies, redirects, auth helpers, tracing,
middlewares, the ``ClientRequest`` and ``ClientResponse`` objects built and validated per
request. A proxy has no use for any of it — the request it forwards is already parsed and
its body already read — and on a fast model server that layer was nearly half of a bare
uvicorn + aiohttp proxy's instructions per request (docs/design.md). The session stays for
the health checks, on the same connector.

``set_response_params``, ``_parser`` and ``read`` of the connection's protocol are aiohttp's
internals, not its documented API, so ``pyproject.toml`` bounds aiohttp to the releases
tested here.
"""

from __future__ import annotations

import asyncio
import base64
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.connector import Connection
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .config import Timeouts
from .errors import (
    BadGatewayError,
    BadRequestError,
    UpstreamConnectError,
    UpstreamConnectTimeoutError,
    UpstreamTimeoutError,
)
from .wheel import Bucket, TimeoutWheel

# Idle keep-alive connections are reused for this long; model servers (uvicorn, MLServer,
# Triton) keep theirs for 5 s or more, so 4 s avoids racing their close.
KEEPALIVE_SECONDS = 4.0
# RFC 9110 §9.2.2: a request with one of these methods may be sent again when a pooled
# connection turns out closed before any answer came, as aiohttp's session does.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods whose request carries no body unless the client sent one (no Content-Length: 0).
_BODILESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "DELETE", "CONNECT"})
# A body up to this size is sent in one buffer with the head; past it, without a copy.
_JOIN_LIMIT = 64 * 1024

Headers = list[tuple[bytes, bytes]]
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
# The protocol's attribute that holds the parser this client built for it (_prepare_parser).
_OUR_PARSER = "_model_gateway_parser"


def create_clients() -> tuple[aiohttp.ClientSession, UpstreamClient]:
    """One pool of upstream connections, and the two ways in: the session for the health
    checks and the lean client for every proxied request and shadow copy."""
    connector = aiohttp.TCPConnector(
        limit=0,  # no global cap: the model servers and the client's concurrency set the pace
        keepalive_timeout=KEEPALIVE_SECONDS,
        ttl_dns_cache=60,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    return session, UpstreamClient(connector)


class Deadlines:
    """A route's timeouts in the form an exchange uses them: the whole exchange, from the
    connection to the last byte of the answer, within ``total``; the connection within
    ``connect`` (or ``total``, if that is shorter)."""

    __slots__ = ("connect", "total")

    def __init__(self, timeouts: Timeouts) -> None:
        self.total = timeouts.total
        self.connect = aiohttp.ClientTimeout(connect=min(timeouts.connect, timeouts.total))


class Origin:
    """One upstream base URL, resolved once: the key the connector opens its connections by,
    the Host header, the path prefix and the credentials the URL carries; and its idle
    connections."""

    __slots__ = ("authorization", "host", "idle", "key", "prefix")

    def __init__(self, base: str, loop: asyncio.AbstractEventLoop) -> None:
        url = URL(base)
        # a request object with nothing but the URL: what the connector reads to pick or open
        # a connection (host, port, TLS); it is never sent
        self.key = aiohttp.ClientRequest("GET", url.with_user(None), loop=loop)
        self.host = (url.host_port_subcomponent or "").encode("ascii")
        self.prefix = url.raw_path.rstrip("/").encode("ascii")
        self.authorization: bytes | None = None
        if url.user is not None:  # RFC 7617, in UTF-8
            credentials = f"{url.user}:{url.password or ''}".encode()
            self.authorization = b"Basic " + base64.b64encode(credentials)
        #: connections whose last answer was read to the end, with when (the loop's clock),
        #: oldest first; the newest is used first, so the pool shrinks to what the load needs
        self.idle: list[tuple[Connection, float]] = []


class UpstreamResponse:
    """A model server's answer: status and headers parsed, the body still arriving.

    The connection goes back to the pool as soon as the body has been read to the end
    (:meth:`read`, or :meth:`readany` returning ``b""``); :meth:`close` drops it instead, for an
    answer abandoned half-way. Past the route's total timeout every read raises
    ``TimeoutError``.
    """

    __slots__ = (
        "_client",
        "_connection",
        "_deadline",
        "_expired",
        "_origin",
        "_protocol",
        "content",
        "headers",
        "raw_headers",
        "status",
    )

    def __init__(self, client: UpstreamClient, origin: Origin) -> None:
        self._client, self._origin = client, origin
        self.status = 0
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self.raw_headers: tuple[tuple[bytes, bytes], ...] = ()
        self.content: StreamReader | None = None
        self._connection: Connection | None = None
        self._protocol: ResponseHandler | None = None
        self._deadline: Bucket | None = None  # where the total timeout is armed
        self._expired = False

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None else None

    async def read(self) -> bytes:
        content = self.content
        assert content is not None
        # An answer whose end is already in (a small one comes in one read from the socket)
        # is taken in one call; ``read()`` would loop over ``readany()`` coroutines to find
        # the end it has already seen.
        body = content.read_nowait() if content.is_eof() else await content.read()
        self.release()
        return body

    async def readany(self) -> bytes:
        assert self.content is not None
        chunk = await self.content.readany()
        if not chunk:
            self.release()
        return chunk

    def release(self) -> None:
        """Back to the idle connections (closed instead if it cannot be reused)."""
        self._cancel_deadline()
        connection, self._connection = self._connection, None
        if connection is not None:
            self._client.keep(self._origin, connection)

    def close(self) -> None:
        self._cancel_deadline()
        self.drop_connection()

    def drop_connection(self) -> None:
        """Close the connection of a failed attempt; the deadline stays for the next one."""
        connection, self._connection = self._connection, None
        self._protocol = self.content = None
        if connection is not None:
            connection.close()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            TimeoutWheel.disarm(self, self._deadline)
            self._deadline = None

    def _time_out(self) -> None:
        # the same error aiohttp's own read timeout gives, for a wait on the head or the body
        error = aiohttp.ServerTimeoutError("the total timeout passed")
        self._expired = True
        if self._protocol is not None:
            self._protocol.set_exception(error)
        if self.content is not None:
            self.content.set_exception(error)


class UpstreamClient:
    """Sends one already-read request to a model server and returns its answer's head.

    New connections come from aiohttp's connector, and go back to it to be closed; between
    two exchanges a connection waits in its origin's ``idle`` list rather than in the
    connector's pool. Taking one from and giving one back to the connector (its connection
    key built and hashed per call, its acquired sets, a ``Connection`` object per exchange)
    was a twentieth of the gateway's instructions per request; here it is a list pop and
    append, with the same keep-alive limit and the same checks before reuse.
    """

    def __init__(
        self, connector: aiohttp.BaseConnector, keepalive: float = KEEPALIVE_SECONDS
    ) -> None:
        self._connector = connector
        self._keepalive = keepalive
        self._origins: dict[str, Origin] = {}
        # the total timeouts: armed by every exchange, fired by almost none
        self._timeouts = TimeoutWheel()
        self._loop = asyncio.get_running_loop()
        # closes the connections left idle past the keep-alive time; set while any is idle
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    def close(self) -> None:
        """Drop the timeouts still armed and close the idle connections, before the session
        closes the connector."""
        self._closed = True
        self._timeouts.close()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for origin in self._origins.values():
            idle, origin.idle = origin.idle, []
            for connection, _ in idle:
                connection.close()

    def keep(self, origin: Origin, connection: Connection) -> None:
        """``connection``'s answer was read to the end: idle until the next exchange, unless
        it cannot carry one (the server said close, or it is closed already) or the client
        has closed (an answer read to its end while the gateway stops)."""
        protocol = connection.protocol
        if self._closed or connection.closed or protocol is None or protocol.should_close:
            connection.close()
            return
        origin.idle.append((connection, self._loop.time()))
        if self._sweep is None:
            self._sweep = self._loop.call_later(self._keepalive, self._close_expired)

    def _idle_connection(self, origin: Origin) -> Connection | None:
        """The newest idle connection still open and within the keep-alive time, if any;
        those found past it on the way are closed."""
        idle = origin.idle
        if not idle:
            return None
        now = self._loop.time()
        while idle:
            connection, since = idle.pop()
            if not connection.closed and now - since < self._keepalive:
                return connection
            connection.close()
        return None

    def _close_expired(self) -> None:
        self._sweep = None
        deadline = self._loop.time() - self._keepalive
        for origin in self._origins.values():
            idle = origin.idle
            expired = 0
            while expired < len(idle) and idle[expired][1] <= deadline:
                expired += 1
            if expired:
                for connection, _ in idle[:expired]:
                    connection.close()
                del idle[:expired]
            if idle and self._sweep is None:
                self._sweep = self._loop.call_later(self._keepalive, self._close_expired)

    async def request(
        self,
        method: str,
        base: str,
        target: bytes,
        headers: Headers,
        body: bytes,
        deadlines: Deadlines,
    ) -> UpstreamResponse:
        """``target`` is the path and query the client sent; ``base`` (from the configuration)
        alone decides the host."""
        origin = self._origins.get(base)
        if origin is None:
            origin = self._origins[base] = Origin(base, self._loop)
        head = _request_head(method, origin, target, headers, len(body))
        message = [head + body] if len(body) <= _JOIN_LIMIT else [head, body]
        response = UpstreamResponse(self, origin)
        response._deadline = self._timeouts.arm(response, deadlines.total, response._time_out)
        retry = method in IDEMPOTENT_METHODS
        reuse = True
        try:
            while True:
                try:
                    await self._send(response, origin, message, method, deadlines, reuse)
                    return response
                # A refused connection (a ClientOSError too, hence named first) sent
                # nothing: the proxy's connect retries, not this resend, deal with it.
                except aiohttp.ClientConnectorError:
                    raise
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                    # an idle connection the server had closed: once more on a new one,
                    # within what is left of the total timeout (the other idle ones date
                    # from before the server closed this one)
                    if not retry:
                        raise
                    retry = reuse = False
                    response.drop_connection()
        except BaseException:
            response.close()
            raise

    async def _send(
        self,
        response: UpstreamResponse,
        origin: Origin,
        message: list[bytes],
        method: str,
        deadlines: Deadlines,
        reuse: bool,
    ) -> None:
        connection = self._idle_connection(origin) if reuse else None
        if connection is None:
            try:
                connection = await self._connector.connect(origin.key, [], deadlines.connect)
            except TimeoutError as error:
                raise aiohttp.ConnectionTimeoutError("no connection in time") from error
        response._connection = connection
        if response._expired:  # the connection came, but after the total timeout
            raise aiohttp.ServerTimeoutError("the total timeout passed")
        protocol = connection.protocol
        transport = connection.transport
        if protocol is None or transport is None:
            raise aiohttp.ServerDisconnectedError()
        response._protocol = protocol
        _prepare_parser(protocol, method)
        if len(message) == 1:
            transport.write(message[0])
        else:
            transport.writelines(message)
        # aiohttp declares (RawResponseMessage, StreamReader), a named tuple; its C parser
        # gives its own message type instead, which a compiled build would refuse as that
        reader: Any = protocol
        while True:
            head, payload = await reader.read()
            # informational answers (100 Continue, 103 Early Hints) precede the real one
            if not 100 <= head.code < 200 or head.code == 101:
                break
        response.status = head.code
        response.headers = head.headers
        response.raw_headers = head.raw_headers
        response.content = payload


def _prepare_parser(protocol: ResponseHandler, method: str) -> None:
    """A response parser for the exchange about to start on ``protocol``.

    aiohttp builds a new C parser per request (``set_response_params``, a visible share of a
    busy event loop's samples). A parser that read the last answer on this connection to
    its end is ready for the next one, as on a server's keep-alive connection, so the one this
    client built for a body-bearing request is kept: a connection is pooled only once its
    last answer was read to the end. A parser someone else built (the health checks' session,
    with its own settings) or one for a HEAD, which expects no body, is replaced.
    """
    if method != "HEAD":
        parser = protocol._parser
        if parser is not None and parser is getattr(protocol, _OUR_PARSER, None):
            return
    protocol.set_response_params(
        skip_payload=method == "HEAD", read_until_eof=True, auto_decompress=False
    )
    setattr(protocol, _OUR_PARSER, protocol._parser if method != "HEAD" else None)


def _request_head(
    method: str, origin: Origin, target: bytes, headers: Headers, length: int
) -> bytes:
    lines = [
        b"%s %s%s HTTP/1.1\r\nHost: %s" % (method.encode(), origin.prefix, target, origin.host)
    ]
    lines += [name + b": " + value for name, value in headers]
    if origin.authorization is not None:
        lines = [line for line in lines if line[:14].lower() != b"authorization:"]
        lines.append(b"Authorization: " + origin.authorization)
    if length or method not in _BODILESS_METHODS:
        lines.append(b"Content-Length: %d" % length)
    lines.append(b"\r\n")
    head = b"\r\n".join(lines)
    # One CR LF per line and no other (the first item holds two lines): a CR or LF inside a
    # name or value would end the line early and let what follows pass for a header or a
    # second request.
    breaks = len(lines) + 1
    if head.count(b"\n") != breaks or head.count(b"\r") != breaks:
        raise BadRequestError("a forwarded header or the path holds a line break")
    return head


class UpstreamErrors:
    """The single place where aiohttp's exceptions become gateway errors.

    A class rather than ``@contextmanager``: it runs twice per proxied request, and a plain
    ``__exit__`` costs a fraction of a generator-based context manager.
    """

    __slots__ = ("variant",)

    def __init__(self, variant: str) -> None:
        self.variant = variant

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            return
        variant = self.variant
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            raise UpstreamConnectTimeoutError(
                f"variant {variant!r} did not accept a connection in time"
            ) from exc
        if isinstance(exc, TimeoutError):  # aiohttp's timeout errors subclass it
            raise UpstreamTimeoutError(f"variant {variant!r} did not answer in time") from exc
        if isinstance(exc, aiohttp.ClientConnectorError):
            # the client is not told where the model server is: the address goes to the log
            raise UpstreamConnectError(
                f"variant {variant!r} refused the connection",
                detail=str(exc.os_error.strerror or exc),
            ) from exc
        if isinstance(
            exc,
            aiohttp.ClientError | HttpProcessingError | asyncio.IncompleteReadError | OSError,
        ):
            # the client is not shown what the model server sent, nor the gateway's insides
            raise BadGatewayError(
                f"variant {variant!r} answered badly", f"{type(exc).__name__}: {exc}"
            ) from exc
