"""The upstream client: requests as written on the wire, and model servers at the edges of
HTTP/1.1 (a pooled connection closed under a request, informational answers, HEAD, stalls,
credentials in the URL), each a real socket server the test scripts byte for byte."""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import aiohttp
import httptools
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from model_gateway.config import Timeouts
from model_gateway.errors import BadRequestError
from model_gateway.upstream import (
    KEEPALIVE_SECONDS,
    Deadlines,
    Origin,
    UpstreamClient,
    _request_head,
)

from .conftest import (
    GatewayFactory,
    RunningGateway,
    Upstream,
    error_code,
    route,
    wait_until_async,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

# A scripted model server: given (connection number, request number on it, the request's
# bytes), the bytes to answer, or None to close the connection without answering. An answer
# that ends with THEN_CLOSE is sent without it, and the server then closes the connection.
Script = Callable[[int, int, bytes], bytes | None]
THEN_CLOSE = b"<then close>"


def _read_request(conn: socket.socket, buffer: bytearray) -> bytes | None:
    while b"\r\n\r\n" not in buffer:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    end = buffer.index(b"\r\n\r\n") + 4
    length = 0
    for line in bytes(buffer[:end]).split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(buffer) < end + length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    request = bytes(buffer[: end + length])
    del buffer[: end + length]
    return request


@contextmanager
def scripted_upstream(script: Script) -> Iterator[tuple[str, list[bytes]]]:
    """A keep-alive HTTP/1.1 server run by ``script``; yields its URL and every request seen."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.1)
    seen: list[bytes] = []
    stop = threading.Event()

    def serve_connection(conn: socket.socket, number: int) -> None:
        buffer = bytearray()
        with conn:
            conn.settimeout(10)
            for index in range(1000):
                try:
                    request = _read_request(conn, buffer)
                except OSError:
                    return
                if request is None:
                    return
                seen.append(request)
                answer = script(number, index, request)
                if answer is None:
                    return
                try:
                    conn.sendall(answer.removesuffix(THEN_CLOSE))
                except OSError:
                    return
                if answer.startswith(b"HTTP/1.0") or answer.endswith(THEN_CLOSE):
                    return  # an HTTP/1.0 answer ends with the connection

    def accept() -> None:
        number = 0
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            threading.Thread(target=serve_connection, args=(conn, number), daemon=True).start()
            number += 1

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", seen
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def closes_the_second_request_on_the_first_connection(
    number: int, index: int, request: bytes
) -> bytes | None:
    """A model server whose keep-alive connection ends just as the gateway reuses it."""
    return None if (number, index) == (0, 1) else OK


def test_a_pooled_connection_closed_under_a_get_is_retried_once_on_a_new_one(
    gateway: GatewayFactory,
) -> None:
    with scripted_upstream(closes_the_second_request_on_the_first_connection) as (url, seen):
        gw = gateway([route("r", "/", [("m", url, 1)])])
        with httpx.Client() as client:
            assert client.get(f"{gw.url}/v1/models/m").status_code == 200
            assert client.get(f"{gw.url}/v1/models/m").status_code == 200
        assert len(seen) == 3  # the second GET went out twice: closed under it, then answered
        gw.stop()
    assert [r["status"] for r in gw.records()] == [200, 200]


def test_a_post_is_never_sent_twice_even_on_a_closed_pooled_connection(
    gateway: GatewayFactory,
) -> None:
    # The model may have acted on a request it did not answer; only idempotent methods go
    # again (RFC 9110 §9.2.2), as with aiohttp's session.
    with scripted_upstream(closes_the_second_request_on_the_first_connection) as (url, seen):
        gw = gateway([route("r", "/", [("m", url, 1)], health={"passive_failures": 0})])
        with httpx.Client() as client:
            assert client.post(f"{gw.url}/infer", content=b"{}").status_code == 200
            second = client.post(f"{gw.url}/infer", content=b"{}")
        assert second.status_code == 502
        assert error_code(second) == "bad_gateway"
        assert len(seen) == 2
        gw.stop()
    assert [r["status"] for r in gw.records()] == [200, 502]


def test_informational_answers_are_skipped(gateway: GatewayFactory) -> None:
    def hints_first(number: int, index: int, request: bytes) -> bytes:
        return b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n" + OK

    with scripted_upstream(hints_first) as (url, _):
        gw = gateway([route("r", "/", [("m", url, 1)])])
        with httpx.Client() as client:
            for _ in range(2):  # and the connection stays usable
                r = client.post(f"{gw.url}/infer", content=b"{}")
                assert (r.status_code, r.content) == (200, b"{}")


def test_an_answer_without_length_is_read_until_the_connection_ends(
    gateway: GatewayFactory,
) -> None:
    def old_server(number: int, index: int, request: bytes) -> bytes:
        return b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + b'{"a": 1}' * 500

    with scripted_upstream(old_server) as (url, seen):
        gw = gateway([route("r", "/", [("m", url, 1)])])
        with httpx.Client(timeout=10) as client:
            for _ in range(2):  # the second on a new connection: the first one ended
                r = client.post(f"{gw.url}/infer", content=b"{}")
                assert (r.status_code, r.content) == (200, b'{"a": 1}' * 500)
        assert len(seen) == 2


def test_head_answers_have_no_body_and_keep_the_connection(gateway: GatewayFactory) -> None:
    def head_then_get(number: int, index: int, request: bytes) -> bytes:
        if request.startswith(b"HEAD "):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n"  # the length GET would have
        return OK

    with scripted_upstream(head_then_get) as (url, seen):
        gw = gateway([route("r", "/", [("m", url, 1)])])
        with httpx.Client(timeout=10) as client:
            head = client.head(f"{gw.url}/v2/health/ready")
            assert head.status_code == 200
            assert head.headers["content-length"] == "50"
            assert client.get(f"{gw.url}/v2/health/ready").content == b"{}"
        assert [r.split(b" ")[0] for r in seen] == [b"HEAD", b"GET"]


def _stalling_gateway(gateway: GatewayFactory, url: str) -> RunningGateway:
    return gateway(
        [
            route(
                "r",
                "/",
                [("m", url, 1)],
                timeouts={"connect": 1, "total": 0.3},
                health={"passive_failures": 0},
            )
        ]
    )


def test_the_total_timeout_covers_a_body_that_stalls(gateway: GatewayFactory) -> None:
    half = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    with scripted_upstream(lambda number, index, request: half) as (url, _):
        gw = _stalling_gateway(gateway, url)
        r = httpx.post(f"{gw.url}/infer", content=b"{}", timeout=10)
        assert r.status_code == 504
        assert error_code(r) == "upstream_timeout"
        gw.stop()
    (record,) = gw.records()
    assert record["error"].startswith("timeout:"), record["error"]


def test_the_total_timeout_ends_a_stream_that_stalls(gateway: GatewayFactory) -> None:
    begun = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked"
        b"\r\n\r\nd\r\ndata: first\n\n\r\n"
    )
    with scripted_upstream(lambda number, index, request: begun) as (url, _):
        gw = _stalling_gateway(gateway, url)
        received = b""
        with (
            pytest.raises(httpx.RemoteProtocolError),  # the stream had begun: it ends short
            httpx.stream("POST", f"{gw.url}/infer", content=b"{}", timeout=10) as r,
        ):
            assert r.status_code == 200
            for chunk in r.iter_bytes():
                received += chunk
        assert received == b"data: first\n\n"
        gw.stop()
    (record,) = gw.records()
    assert record["error"].startswith("timeout:"), record["error"]


def test_credentials_in_the_variant_url_are_sent_as_basic_auth(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    url = upstreams["a"].url.replace("http://", "http://svc:s%3Dcret@")
    gw = gateway([route("r", "/echo", [("a", url, 1)])])
    r = httpx.post(f"{gw.url}/echo/x", content=b"{}", headers={"Authorization": "Bearer client"})
    seen = r.json()["headers"]
    assert seen["authorization"] == "Basic " + base64.b64encode(b"svc:s=cret").decode()
    assert seen["host"] == upstreams["a"].url.removeprefix("http://")


# --- the request head, as written on the wire ---------------------------------------------

_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
_VALUE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)
_METHOD = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"])
_PATH = st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789%._~", max_size=8))


def _origin(base: str) -> Origin:
    loop = asyncio.new_event_loop()
    try:
        return Origin(base, loop)
    finally:
        loop.close()


class _Parsed:
    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        self.complete = True


@given(
    method=_METHOD,
    prefix=st.sampled_from(["", "/models", "/a/b"]),
    segments=_PATH,
    query=st.one_of(st.none(), _VALUE.filter(lambda q: "#" not in q)),
    headers=st.lists(st.tuples(_TOKEN, _VALUE), max_size=8),
    body=st.binary(max_size=64),
)
def test_the_request_head_parses_back_to_what_was_forwarded(
    method: str,
    prefix: str,
    segments: list[str],
    query: str | None,
    headers: list[tuple[str, str]],
    body: bytes,
) -> None:
    headers = [(n, v) for n, v in headers if n not in ("host", "content-length", "authorization")]
    origin = _origin(f"http://model.internal:8080{prefix}")
    target = ("/" + "/".join(segments)).encode() + (b"?" + query.encode() if query else b"")
    pairs = [(n.encode(), v.encode()) for n, v in headers]
    message = _request_head(method, origin, target, pairs, len(body)) + body
    parsed = _Parsed()
    parser = httptools.HttpRequestParser(parsed)
    parser.feed_data(message)
    assert parsed.complete
    assert parser.get_method().decode() == method
    assert parsed.url == prefix.encode() + target
    assert parsed.headers[0] == (b"Host", b"model.internal:8080")
    forwarded = [(n, v) for n, v in parsed.headers[1:] if n != b"Content-Length"]
    assert forwarded == pairs
    lengths = [v for n, v in parsed.headers if n == b"Content-Length"]
    if body or method in ("POST", "PUT", "PATCH"):
        assert lengths == [str(len(body)).encode()]
    else:
        assert lengths == []


@given(
    before=_VALUE,
    after=_VALUE,
    brk=st.sampled_from(["\r", "\n", "\r\n"]),
    where=st.sampled_from(["value", "target"]),
)
def test_a_line_break_in_a_header_or_the_target_is_refused(
    before: str, after: str, brk: str, where: str
) -> None:
    origin = _origin("http://model.internal:8080")
    bad = (before + brk + after).encode()
    target, value = (b"/x", bad) if where == "value" else (b"/x" + bad, b"ok")
    with pytest.raises(BadRequestError):
        _request_head("POST", origin, target, [(b"x-note", value)], 0)


class _SlowToConnect(aiohttp.TCPConnector):
    """A real connector whose connections come late: a pool waiting on a busy host."""

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        await asyncio.sleep(0.3)
        return await super().connect(req, traces, timeout)


DEADLINES = Deadlines(Timeouts(connect=5, total=5))


def _answer_every_request(number: int, index: int, request: bytes) -> bytes:
    return OK


@asynccontextmanager
async def direct_client(
    script: Script,
    connector: aiohttp.TCPConnector | None = None,
    keepalive: float = KEEPALIVE_SECONDS,
) -> AsyncIterator[tuple[UpstreamClient, str, list[bytes]]]:
    """The upstream client alone, on a connector of its own, in front of a scripted model
    server: yields the client, the server's URL and every request the server saw."""
    with scripted_upstream(script) as (url, seen):
        connector = connector or aiohttp.TCPConnector()
        client = UpstreamClient(connector, keepalive)
        try:
            yield client, url, seen
        finally:
            client.close()
            await connector.close()


@pytest.mark.anyio
async def test_a_connection_that_comes_after_the_total_timeout_is_not_used() -> None:
    async with direct_client(_answer_every_request, _SlowToConnect()) as (client, url, seen):
        deadlines = Deadlines(Timeouts(connect=5, total=0.1))
        with pytest.raises(TimeoutError):
            await client.request("POST", url, b"/infer", [], b"{}", deadlines)
    assert seen == []


# Answers framed every way HTTP/1.1 allows on a keep-alive connection, in a row.
_FRAMINGS = {
    b"/length": OK,
    b"/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'3\r\n{"a\r\n5\r\n": 1}\r\n0\r\nX-Trailer: t\r\n\r\n',
    b"/empty": b"HTTP/1.1 204 No Content\r\n\r\n",
    b"/hints": b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK,
    b"/error": b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 3\r\n\r\nbad",
}
_BODIES = {
    b"/length": b"{}",
    b"/chunked": b'{"a": 1}',
    b"/empty": b"",
    b"/hints": b"{}",
    b"/error": b"bad",
}


def _one_connection(number: int, index: int, request: bytes) -> bytes | None:
    if number != 0:  # every exchange must reuse the first connection
        return None
    target = request.split(b" ")[1]
    if request.startswith(b"HEAD "):
        return b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n"
    return _FRAMINGS[target]


@pytest.mark.anyio
async def test_a_pooled_connection_keeps_its_parser_across_answers_framed_every_way() -> None:
    parsers = []
    order = [*_FRAMINGS, b"/length", b"HEAD", b"/chunked", *reversed(_FRAMINGS)]
    async with direct_client(_one_connection) as (client, url, seen):
        for target in order:
            method = "HEAD" if target == b"HEAD" else "POST"
            path = b"/length" if method == "HEAD" else target
            response = await client.request(method, url, path, [], b"{}", DEADLINES)
            assert response._protocol is not None
            parsers.append(response._protocol._parser)
            body = await response.read()
            if method == "HEAD":
                assert (response.status, body) == (200, b"")
            else:
                assert body == _BODIES[target], target
                final = _FRAMINGS[target].rsplit(b"HTTP/1.1 ", 1)[1]  # after any 103
                assert response.status == int(final.split(b" ")[0]), target
    assert len(seen) == len(order)  # one connection throughout
    head = order.index(b"HEAD")
    # one parser for every answer before the HEAD, a parser of its own for the HEAD (it
    # expects no body), and then one again for every answer after it
    assert all(p is parsers[0] for p in parsers[:head])
    assert parsers[head] is not parsers[0] and parsers[head + 1] is not parsers[head]
    assert all(p is parsers[head + 1] for p in parsers[head + 1 :])


@pytest.mark.anyio
async def test_a_parser_the_health_checks_session_built_is_not_reused() -> None:
    # The health checks' session and the client share the connector: a connection the session
    # gave back to the connector's pool is the next one the client takes from it.
    connector = aiohttp.TCPConnector()
    async with direct_client(_one_connection, connector) as (client, url, seen):
        session = aiohttp.ClientSession(connector=connector, connector_owner=False)
        async with session, session.post(f"{url}/chunked", data=b"{}") as answer:
            assert await answer.read() == b'{"a": 1}'
        protocol = answer._protocol  # back in the connector's pool
        assert protocol is not None and protocol.is_connected()
        sessions = protocol._parser  # built with the session's settings and timer
        first = await client.request("POST", url, b"/length", [], b"{}", DEADLINES)
        assert first._protocol is protocol  # the same connection, a parser of our own
        ours = protocol._parser
        assert sessions is not None and ours is not sessions
        assert await first.read() == b"{}"
        second = await client.request("POST", url, b"/length", [], b"{}", DEADLINES)
        assert second._protocol is protocol and protocol._parser is ours
        assert await second.read() == b"{}"
    assert len(seen) == 3


def _numbered(log: list[tuple[int, int]]) -> Script:
    """Answers every request, noting on which connection (number, index) it came."""

    def script(number: int, index: int, request: bytes) -> bytes:
        log.append((number, index))
        return OK

    return script


@pytest.mark.anyio
async def test_idle_connections_are_reused_newest_first_and_closed_past_the_keepalive() -> None:
    came_on: list[tuple[int, int]] = []
    async with direct_client(_numbered(came_on), keepalive=0.3) as (client, url, _):
        # two at once open two connections; then one at a time, the newest idle one
        first, second = await asyncio.gather(
            *(client.request("POST", url, b"/", [], b"{}", DEADLINES) for _ in range(2))
        )
        assert await first.read() == b"{}"
        assert await second.read() == b"{}"
        newest = second._protocol
        again = await client.request("POST", url, b"/", [], b"{}", DEADLINES)
        assert again._protocol is newest
        assert await again.read() == b"{}"
        assert newest is not None and first._protocol is not None
        idle = [connection.protocol for connection, _ in client._origins[url].idle]
        assert idle == [first._protocol, newest]  # oldest first
        # past the keep-alive, the sweep closes both
        await wait_until_async(lambda: client._origins[url].idle == [], "the idle sweep")
        assert client._origins[url].idle == []
        assert not newest.is_connected() and not first._protocol.is_connected()
        late = await client.request("POST", url, b"/", [], b"{}", DEADLINES)
        assert late._protocol not in (newest, first._protocol)
        assert await late.read() == b"{}"
    assert sorted(came_on[:2]) == [(0, 0), (1, 0)]
    assert came_on[2] in {(0, 1), (1, 1)}
    assert came_on[3] == (2, 0)  # a new connection after the keep-alive


@pytest.mark.anyio
async def test_a_connection_the_server_closed_or_said_it_would_close_is_not_reused() -> None:
    closing = OK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    came_on: list[tuple[int, int]] = []

    def script(number: int, index: int, request: bytes) -> bytes:
        came_on.append((number, index))
        # connection 0 says it will close; connection 1 closes without saying so
        return {0: closing, 1: OK + THEN_CLOSE}.get(number, OK)

    async with direct_client(script) as (client, url, seen):
        said_close = await client.request("POST", url, b"/", [], b"{}", DEADLINES)
        assert await said_close.read() == b"{}"
        kept = await client.request("POST", url, b"/", [], b"{}", DEADLINES)
        assert await kept.read() == b"{}"
        assert kept._protocol is not said_close._protocol
        # the server ended the idle connection: the next POST (never sent twice) must not go
        # out on it
        idle = client._origins[url].idle
        assert [connection.protocol for connection, _ in idle] == [kept._protocol]
        await wait_until_async(
            lambda: not kept._protocol.is_connected(), "the server's close to reach the client"
        )
        fresh = await client.request("POST", url, b"/", [], b"{}", DEADLINES)
        assert await fresh.read() == b"{}"
        assert fresh._protocol is not kept._protocol
    assert came_on == [(0, 0), (1, 0), (2, 0)]
    assert len(seen) == 3


@pytest.mark.anyio
async def test_the_resend_after_a_closed_idle_connection_goes_on_a_new_one() -> None:
    # The model server restarted: every idle connection is dead, though none has been told
    # yet. The GET goes again once, on a new connection rather than on another idle one.
    def script(number: int, index: int, request: bytes) -> bytes | None:
        return OK if index == 0 else None  # each connection dies under its second request

    async with direct_client(script) as (client, url, seen):
        first, second = await asyncio.gather(
            *(client.request("GET", url, b"/", [], b"", DEADLINES) for _ in range(2))
        )
        assert await first.read() == b"{}"
        assert await second.read() == b"{}"
        assert len(client._origins[url].idle) == 2
        again = await client.request("GET", url, b"/", [], b"", DEADLINES)
        assert await again.read() == b"{}"
        assert again._protocol not in (first._protocol, second._protocol)
    assert len(seen) == 4  # two, the GET on an idle connection, and once more on a new one


@pytest.mark.anyio
async def test_closing_the_client_closes_its_idle_connections() -> None:
    async with direct_client(_answer_every_request) as (client, url, _):
        response = await client.request("POST", url, b"/", [], b"{}", DEADLINES)
        assert await response.read() == b"{}"
        protocol = response._protocol
        assert protocol is not None and protocol.is_connected()
        client.close()
        assert not protocol.is_connected()
        assert client._origins[url].idle == []


@pytest.mark.anyio
async def test_an_answer_read_after_the_client_closed_does_not_keep_its_connection() -> None:
    async with direct_client(_answer_every_request) as (client, url, _):
        response = await client.request("POST", url, b"/", [], b"{}", DEADLINES)
        client.close()  # the gateway stops while the answer is being read
        assert await response.read() == b"{}"
        assert response._protocol is not None and not response._protocol.is_connected()
        assert client._origins[url].idle == []
