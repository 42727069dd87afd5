"""Pipelined requests on one connection, over any split of their bytes: every complete request
is answered, in order, before a head that is too large is refused; the refusal comes once,
and nothing the gateway does for it fails."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import GatewayFactory, Upstream, route, wait_until
from .test_faults import connections_closed, read_answer

# starts servers or processes, or simulates: not in make test-fast
pytestmark = pytest.mark.slow

HEAD_LIMIT = 4096
#: the most uvloop reads from a socket at once
LARGEST_READ = 256_000


@st.composite
def conversations(draw: st.DrawFn) -> tuple[list[bytes], list[bytes], bool]:
    """The bytes of one connection's requests, split into parts; what the body of each
    answer 200 holds, in order; and whether the last request is a head too large (else a
    request that asks to close the connection)."""
    requests, expected = [], []
    for i in range(draw(st.integers(0, 4))):
        pad = b"X-Pad: " + b"p" * draw(st.integers(0, 3000)) + b"\r\n"
        kind = draw(st.sampled_from(["get", "post", "0.02", "0.1"]))
        if kind == "get":  # the echo says which request it answers
            head = b"GET /echo/x?i=%d HTTP/1.1\r\n" % i
            expected.append(b'"query":"i=%d"' % i)
        elif kind == "post":  # and a body, which may end in the read a next head begins in
            body = b"%d:" % i + b"b" * draw(st.integers(0, 20_000))
            head = b"POST /echo/x HTTP/1.1\r\nContent-Length: %d\r\n" % len(body)
            pad += b"\r\n" + body
            expected.append(b'"body":"' + body + b'"}')  # whole, and this request's
        else:  # a request still in progress while the next ones arrive
            head = b"GET /slow?seconds=" + kind.encode() + b" HTTP/1.1\r\n"
            expected.append(b'"upstream":"a"')
        requests.append(head + b"Host: x\r\n" + pad + (b"" if kind == "post" else b"\r\n"))
    too_large = draw(st.booleans())
    if too_large:
        size = draw(st.integers(HEAD_LIMIT + 1, 6 * HEAD_LIMIT))
        requests.append(b"GET /echo/x HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"e" * size)
    else:
        requests.append(b"GET /echo/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        expected.append(b'"path":"/echo/last"')
    data = b"".join(requests)
    # one cut inside the last head, so that a read may end in it with whole requests before
    last = len(data) - len(requests[-1])
    cuts = draw(st.lists(st.integers(1, len(data) - 1), max_size=4))
    cuts = sorted({*cuts, draw(st.integers(last + 1, len(data) - 1))})
    parts = [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return parts, expected, too_large


def answers_in(stream: bytes) -> list[tuple[int, bytes]]:
    """The status and body of each answer in ``stream``, which frames every answer with a
    Content-Length."""
    answers = []
    while stream:
        head, separator, rest = stream.partition(b"\r\n\r\n")
        assert separator, stream[:300]
        assert head.startswith(b"HTTP/1.1 "), stream[:300]
        lines = head.lower().split(b"\r\n")
        length = next(int(line[15:]) for line in lines if line.startswith(b"content-length:"))
        answers.append((int(head[9:12]), rest[:length]))
        stream = rest[length:]
    return answers


@pytest.mark.tuned_edge
def test_pipelined_requests_are_answered_in_order_and_a_head_too_large_refused_once(
    gateway: GatewayFactory, upstreams: dict[str, Upstream], caplog: pytest.LogCaptureFixture
) -> None:
    """1. On a gateway whose max_header_bytes is 4 KiB, each example opens a connection and
       sends up to four complete requests (some wait on the model, some carry a body of up
       to 20 KB), then either a request that asks to close the connection or a head that
       never ends and is over the limit, all of it split at random points (one of them in
       the last head), with a pause after each part.
    2. Every complete request is answered 200, in the order sent, whole; then the connection
       ends, after a 431 when the last head was too large, and after nothing else.
    3. The metric counts one close per refused connection; the gateway logs no error.
    """
    a = upstreams["a"]
    gw = gateway(
        [route("s", "/slow", [("a", a.url, 1)]), route("e", "/echo", [("a", a.url, 1)])],
        server={"max_header_bytes": HEAD_LIMIT},
    )
    refused = 0

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(conversation=conversations(), pause=st.sampled_from([0.0, 0.002, 0.02]))
    def check(conversation: tuple[list[bytes], list[bytes], bool], pause: float) -> None:
        nonlocal refused
        parts, expected, too_large = conversation
        with socket.create_connection(("127.0.0.1", gw.server.port), timeout=20) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                for part in parts:
                    conn.sendall(part)
                    time.sleep(pause)
                # a head too large goes on, past the limit after one more read: the read it
                # began in is not counted, for it may hold the requests before it
                for _ in range((LARGEST_READ + 2 * HEAD_LIMIT) // 8192 if too_large else 0):
                    conn.sendall(b"e" * 8192)
            except OSError:
                pass  # a refused connection may be gone before its last part
            stream = read_answer(conn)
        answers = answers_in(stream)
        statuses = [status for status, _ in answers]
        assert statuses == [200] * len(expected) + ([431] if too_large else []), statuses
        for (_, body), holds in zip(answers, expected, strict=False):
            assert holds in body, (holds, body[:300])
        refused += too_large

    check()
    wait_until(lambda: connections_closed(gw, "header_too_large") == refused, "the count")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
