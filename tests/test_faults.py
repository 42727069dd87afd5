"""Fault injection with real processes and sockets: broken upstreams, a locked store, kills."""

from __future__ import annotations

import asyncio
import random
import re
import select
import signal
import socket
import sqlite3
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest
import uvicorn
import yaml

from .conftest import (
    GatewayFactory,
    RunningGateway,
    Upstream,
    dead_url,
    error_code,
    route,
    wait_until,
)
from .test_health import gauge
from .test_processes import INFER, GatewayProcess
from .test_protocol import in_flight
from .test_store import POSTGRES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@contextmanager
def raw_upstream(behaviour: Callable[[socket.socket], None], accept: bool = True) -> Iterator[str]:
    """A TCP server on an ephemeral port that treats each connection with ``behaviour``."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)  # the request
                    behaviour(conn)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    if accept:
        thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        if accept:
            thread.join(timeout=5)
        server.close()


def reset(conn: socket.socket) -> None:
    # SO_LINGER 0: close() sends RST instead of FIN
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def resets_mid_body(conn: socket.socket) -> None:
    conn.sendall(
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"par'
    )
    time.sleep(0.05)
    reset(conn)


def resets_mid_stream(conn: socket.socket) -> None:
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    conn.sendall(b"e\r\ndata: first\n\n\r\n")
    time.sleep(0.05)
    reset(conn)


def garbage(conn: socket.socket) -> None:
    conn.sendall(b"\x00\x01 this is not HTTP at all \xff\xfe\r\n\r\n")


def test_broken_upstreams_get_502_and_are_logged(gateway: GatewayFactory) -> None:
    with raw_upstream(resets_mid_body) as mid_body, raw_upstream(garbage) as junk:
        gw = gateway(
            [
                route("reset", "/reset", [("r", mid_body, 1)], health={"passive_failures": 0}),
                route("junk", "/junk", [("j", junk, 1)], health={"passive_failures": 0}),
            ]
        )
        for path in ("/reset", "/junk"):
            for _ in range(3):
                r = httpx.get(f"{gw.url}{path}")
                assert r.status_code == 502, (path, r.text)
                assert error_code(r) == "bad_gateway"
                # the client is told which variant failed, not what it sent nor the
                # gateway's exception classes; the log keeps that
                assert r.json()["error"]["message"] == f"variant {path[1]!r} answered badly"
        gw.stop()
    records = gw.records()
    assert len(records) == 6
    assert all(rec["status"] == 502 and rec["error"].startswith("bad_gateway") for rec in records)
    assert any("this is not HTTP" in rec["error"] or "Error" in rec["error"] for rec in records)


def test_reset_mid_stream_truncates_the_stream_and_is_logged(gateway: GatewayFactory) -> None:
    with raw_upstream(resets_mid_stream) as upstream:
        gw = gateway([route("s", "/s", [("s", upstream, 1)])])
        received = b""
        try:
            with httpx.stream("GET", f"{gw.url}/s", timeout=10) as r:
                assert r.status_code == 200
                for chunk in r.iter_raw():
                    received += chunk
        except httpx.HTTPError:
            pass  # the client sees the stream end early, as behind nginx
        assert received.startswith(b"data: first")
        gw.stop()
    (record,) = gw.records()
    assert record["status"] == 200 and record["error"].startswith("bad_gateway")


def test_upstream_that_never_accepts_times_out(gateway: GatewayFactory) -> None:
    with raw_upstream(lambda conn: None, accept=False) as silent:
        gw = gateway(
            [route("q", "/q", [("q", silent, 1)], timeouts={"connect": 0.3, "total": 0.5})]
        )
        r = httpx.get(f"{gw.url}/q", timeout=10)
        assert r.status_code == 504
        gw.stop()
    assert gw.records()[0]["error"].startswith("timeout")


def test_a_client_that_leaves_while_the_model_computes_is_let_go_and_logged_499(
    gateway: GatewayFactory,
) -> None:
    """1. A model server reads the request and never answers; it notes when the gateway
       closes the connection.
    2. A client sends a request and closes its connection once the model server has it.
    3. The gateway stops waiting and closes its connection to the model server, as nginx
       does, long before the total timeout.
    4. The record says 499, client disconnected; the in-flight gauge is back to 0.
    """
    received, let_go = threading.Event(), threading.Event()

    def computes_for_ever(conn: socket.socket) -> None:
        received.set()
        conn.settimeout(30)
        if conn.recv(1) == b"":
            let_go.set()

    with raw_upstream(computes_for_ever) as model:
        gw = gateway([route("m", "/m", [("m", model, 1)], timeouts={"total": 60})])
        client = socket.create_connection(("127.0.0.1", gw.server.port))
        client.sendall(
            b"POST /m HTTP/1.1\r\nHost: x\r\nX-Request-Id: gone-1\r\nContent-Length: 2\r\n\r\n{}"
        )
        assert received.wait(10)
        client.close()
        assert let_go.wait(20), "the gateway kept waiting on the model server"
        wait_until(lambda: len(gw.records()) == 1, "the record")
        (record,) = gw.records()
        assert (record["status"], record["error"]) == (499, "client disconnected before the answer")
        assert record["request_id"] == "gone-1"
        assert in_flight(gw.url) == 0
        gw.stop()


def read_answer(conn: socket.socket) -> bytes:
    """Everything the gateway sends on ``conn`` until it closes it."""
    conn.settimeout(20)  # a guard against a gateway that never answers, not a timing
    answer = b""
    while chunk := conn.recv(65536):
        answer += chunk
    return answer


def test_a_request_body_that_stops_coming_is_answered_408_and_logged(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """1. A client sends a request's headers and the first 10 of its 100 bytes of body, then
       nothing more, to a gateway whose client_body_timeout is 0.5 s.
    2. The gateway answers 408 request_timeout with its own headers, and closes the
       connection (the rest of the body may still come on it), as nginx does.
    3. Nothing reached the model server; the record says 408 and why.
    """
    a = upstreams["a"]
    gw = gateway([route("m", "/m", [("a", a.url, 1)])], server={"client_body_timeout": 0.5})
    with socket.create_connection(("127.0.0.1", gw.server.port)) as conn:
        conn.sendall(
            b"POST /m HTTP/1.1\r\nHost: x\r\nX-Request-Id: slow-1\r\n"
            b"Content-Length: 100\r\n\r\n0123456789"
        )
        answer = read_answer(conn)  # returns once the gateway closes the connection
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert b"\r\nconnection: close" in head.lower()
    assert b"\r\nx-prediction-id: " in head.lower()
    assert orjson.loads(body)["error"]["code"] == "request_timeout"
    assert a.control.requests == 0
    wait_until(lambda: len(gw.records()) == 1, "the record")
    (record,) = gw.records()
    assert (record["status"], record["request_id"]) == (408, "slow-1")
    assert record["error"].startswith("client_body_timeout: the request body stopped coming")
    assert in_flight(gw.url) == 0


def test_requests_that_never_reach_the_model_server_say_nothing_of_it(
    gateway: GatewayFactory,
) -> None:
    """A variant is ejected after 2 consecutive failed requests. Between its two failures
    (502: nothing listens) come a body that stops coming (408) and one too large (413):
    neither reached the model server, so neither clears its count, and the second failure
    ejects it."""
    gw = gateway(
        [
            route(
                "m",
                "/m",
                [("m", dead_url(), 1)],
                max_body_bytes=10,
                health={"passive_failures": 2, "ejection_seconds": 60},
            )
        ],
        server={"client_body_timeout": 0.5},
    )
    assert httpx.post(f"{gw.url}/m", content=b"{}").status_code == 502
    with socket.create_connection(("127.0.0.1", gw.server.port)) as conn:
        conn.sendall(b"POST /m HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n01")
        assert read_answer(conn).startswith(b"HTTP/1.1 408 ")
    assert httpx.post(f"{gw.url}/m", content=b"x" * 11).status_code == 413
    assert gauge(gw, "model_gateway_variant_up", route="m", variant="m") == 1
    assert httpx.post(f"{gw.url}/m", content=b"{}").status_code == 502
    assert gauge(gw, "model_gateway_variant_up", route="m", variant="m") == 0


def test_a_request_body_that_comes_slowly_but_steadily_is_forwarded(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """client_body_timeout bounds the time between two parts of a body, not the whole body
    (as nginx's): a body that comes in five parts, 0.2 s apart, within a 0.5 s timeout, is
    forwarded whole, though it takes longer than 0.5 s in all."""
    a = upstreams["a"]
    gw = gateway([route("e", "/echo", [("a", a.url, 1)])], server={"client_body_timeout": 0.5})
    with socket.create_connection(("127.0.0.1", gw.server.port)) as conn:
        conn.sendall(
            b"POST /echo/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 10\r\n\r\n"
        )
        for part in (b"01", b"23", b"45", b"67", b"89"):
            time.sleep(0.2)
            conn.sendall(part)
        answer = read_answer(conn)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer
    assert orjson.loads(body)["body"] == "0123456789"
    assert a.control.requests == 1


def read_one_answer(conn: socket.socket) -> bytes:
    """One answer with a Content-Length from a connection that stays open."""
    conn.settimeout(20)  # a guard against a gateway that never answers, not a timing
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
    assert length is not None, head
    while len(body) < int(length[1]):
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


def connections_closed(gw: RunningGateway, reason: str) -> float:
    return gauge(gw, "model_gateway_client_connections_closed_total", reason=reason) or 0.0


@pytest.mark.tuned_edge
def test_a_request_head_that_stops_coming_is_answered_408_and_its_connection_closed(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """1. On a gateway whose client_header_timeout is 0.5 s, a client sends a request that
       takes the model 1 s, and right behind it (pipelined) half of its next request's head,
       then nothing.
    2. The first request is answered whole: the limit is on a head's arrival, and a head
       behind a request in progress waits its turn.
    3. Then, once the limit has passed (not before), the gateway answers 408
       request_timeout and closes the connection, as nginx's client_header_timeout does.
    4. The half request reached neither the model server nor the log; the metric counts it.
    """
    a = upstreams["a"]
    gw = gateway([route("s", "/slow", [("a", a.url, 1)])], server={"client_header_timeout": 0.5})
    with socket.create_connection(("127.0.0.1", gw.server.port)) as conn:
        conn.sendall(
            b"GET /slow?seconds=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /slow?seconds=0 HTTP/1.1\r\nHost: x\r\nX-Req"
        )
        sent = time.monotonic()
        first = read_one_answer(conn)
        answer = read_answer(conn)  # returns once the gateway closes the connection
        waited = time.monotonic() - sent
    assert first.startswith(b"HTTP/1.1 200 "), first
    assert orjson.loads(first.partition(b"\r\n\r\n")[2])["upstream"] == "a"
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert b"\r\nconnection: close" in head.lower()
    assert orjson.loads(body)["error"] == {
        "code": "request_timeout",
        "message": "the request's head did not arrive in full within 0.5 s",
    }
    assert waited >= 1.5  # the model's 1 s, then the limit (how long after is not asserted)
    assert a.control.requests == 1
    wait_until(lambda: connections_closed(gw, "header_timeout") == 1, "the count")
    assert len(gw.records()) == 1


@pytest.mark.tuned_edge
def test_a_head_must_arrive_whole_within_the_limit_and_a_silent_connection_is_closed(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """Unlike the body's limit, client_header_timeout bounds the whole head (as nginx's):
    a head sent in six parts 0.2 s apart, none late on its own, but whole only after 1 s, is
    answered 408 once 0.5 s have passed. A connection that sends nothing at all is closed
    without an answer (nothing to answer, and not counted), also as nginx does."""
    a = upstreams["a"]
    gw = gateway([route("e", "/echo", [("a", a.url, 1)])], server={"client_header_timeout": 0.5})
    parts = (b"GET /echo/x HTTP/1.1\r\n", b"Host: x\r\n", b"A: 1\r\n", b"B: 2\r\n", b"C: 3\r\n")
    with socket.create_connection(("127.0.0.1", gw.server.port)) as silent:
        with socket.create_connection(("127.0.0.1", gw.server.port)) as dribbling:
            try:
                for part in (*parts, b"\r\n"):
                    dribbling.sendall(part)
                    time.sleep(0.2)
            except OSError:
                pass  # the gateway closed the connection before the head was whole
            answer = read_answer(dribbling)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert read_answer(silent) == b""
    assert a.control.requests == 0
    assert connections_closed(gw, "header_timeout") == 1


@pytest.mark.tuned_edge
def test_a_half_head_behind_a_request_waits_for_the_header_timeout_not_the_keep_alive(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """1. A client sends a request and, right behind it (pipelined), half of its next head,
       then nothing, to a gateway whose client_header_timeout (6 s) is longer than the
       keep-alive timeout uvicorn sets after an answer (5 s).
    2. The first request is answered; the half head is then held to client_header_timeout,
       as one begun on an idle connection is: answered 408 once it has passed, not closed
       without a word when the keep-alive timer would have fired.
    """
    keep_alive = uvicorn.Config(app=None).timeout_keep_alive
    assert keep_alive < 6
    a = upstreams["a"]
    gw = gateway([route("e", "/echo", [("a", a.url, 1)])], server={"client_header_timeout": 6})
    with socket.create_connection(("127.0.0.1", gw.server.port)) as conn:
        conn.sendall(b"GET /echo/x HTTP/1.1\r\nHost: x\r\n\r\nGET /echo/y HTTP/1.1\r\nHo")
        answer = read_answer(conn)
    first, second = answer.split(b"HTTP/1.1 408 ")
    assert first.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert b'"code":"request_timeout"' in second
    assert connections_closed(gw, "header_timeout") == 1


@pytest.mark.tuned_edge
def test_a_head_too_large_is_answered_431_before_it_is_read_whole(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """1. With max_header_bytes at 16 KiB, a head of some 12 KiB (sent in parts) is served.
    2. A header that never ends is answered 431 request_header_too_large once 16 KiB of the
       head are in, and its connection is closed: the gateway does not buffer it further.
    3. Neither the model server nor the log saw the refused request; the metric counts it.
    4. Behind a request in progress (pipelined), such a head is refused only once that
       request's answer is out, whole; nothing more is read meanwhile.
    """
    a = upstreams["a"]
    gw = gateway(
        [route("e", "/echo", [("a", a.url, 1)]), route("s", "/slow", [("a", a.url, 1)])],
        server={"max_header_bytes": 16384},
    )
    with socket.create_connection(("127.0.0.1", gw.server.port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for part in (
            b"GET /echo/x HTTP/1.1\r\nHost: x\r\n",
            *[b"X-Pad: " + b"p" * 4000 + b"\r\n"] * 3,
        ):
            conn.sendall(part)
            time.sleep(0.05)  # separate reads, most likely; the limit must hold either way
        conn.sendall(b"Connection: close\r\n\r\n")
        assert read_answer(conn).startswith(b"HTTP/1.1 200 ")
    with socket.create_connection(("127.0.0.1", gw.server.port)) as conn:
        conn.sendall(b"GET /echo/x HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        sent = 0
        # the header goes on until the gateway answers (the guard: 64 MB)
        while sent < 64 * 1024 * 1024 and not select.select([conn], [], [], 0)[0]:
            conn.sendall(b"e" * 4096)
            sent += 4096
        answer = read_answer(conn)  # the gateway shut its side after the answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large"), answer[:200]
    assert b"\r\nconnection: close" in head.lower()
    assert orjson.loads(body)["error"] == {
        "code": "request_header_too_large",
        "message": "the request's head is over 16384 bytes",
    }
    assert b"\r\nx-gateway-error: request_header_too_large" in head.lower()
    assert sent < 64 * 1024 * 1024
    assert a.control.requests == 1  # the first request only
    wait_until(lambda: connections_closed(gw, "header_too_large") == 1, "the count")
    wait_until(lambda: len(gw.records()) == 1, "the first request's record")

    with socket.create_connection(("127.0.0.1", gw.server.port)) as conn:
        # in one read, most likely: the head is over the limit before the first request's
        # task has run, and that task's reads of its own request must not open the gate
        conn.sendall(
            b"GET /slow?seconds=0.5 HTTP/1.1\r\nHost: x\r\n\r\nGET /e HTTP/1.1\r\nX: "
            + b"e" * 20000
        )
        try:
            for _ in range(64):
                conn.sendall(b"e" * 1024)
                time.sleep(0.005)  # goes on while the first request is served
        except OSError:
            pass
        answer = read_answer(conn)
    first, refusal = answer.split(b"HTTP/1.1 431 ")
    assert first.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert orjson.loads(first.partition(b"\r\n\r\n")[2])["upstream"] == "a"
    assert b'"code":"request_header_too_large"' in refusal
    assert refusal.count(b"HTTP/1.1") == 0  # one refusal, whole
    wait_until(lambda: connections_closed(gw, "header_too_large") == 2, "the second count")
    assert connections_closed(gw, "header_too_large") == 2  # the one head refused once


def test_a_client_that_stops_reading_a_streamed_answer_is_let_go_and_logged(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """1. A client asks for a 32 MB answer (streamed: it is over the 1 MiB buffer limit) and
       reads none of it; its socket's buffers fill, and the gateway's writes pause.
    2. After server.send_timeout (0.5 s) the gateway closes the connection, as nginx's
       send_timeout does, rather than holding it and the model server's connection for good.
    3. The record keeps the answer's status and says why it ended; nothing is left in flight.
    """
    a = upstreams["a"]
    gw = gateway([route("b", "/big", [("a", a.url, 1)])], server={"send_timeout": 0.5})
    with socket.socket() as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        conn.connect(("127.0.0.1", gw.server.port))
        conn.sendall(
            b"GET /big?bytes=32000000 HTTP/1.1\r\nHost: x\r\nX-Request-Id: stalled\r\n\r\n"
        )
        wait_until(lambda: len(gw.records()) == 1, "the record")
        (record,) = gw.records()
        assert (record["status"], record["request_id"]) == (200, "stalled")
        assert record["error"] == "send_timeout: the client read nothing for 0.5 s"
        assert connections_closed(gw, "send_timeout") == 1
        assert in_flight(gw.url) == 0
        received = 0
        try:
            while chunk := conn.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass  # the unread rest was dropped with the connection
        assert received < 32_000_000


@pytest.mark.tuned_edge
def test_a_client_that_reads_slowly_is_not_let_go_until_it_stops(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """1. A client asks for a 32 MB answer (streamed) and reads it slowly, 4 KiB every
       0.1 s: too slowly for the gateway's paused writes to resume, or for the kernel to
       take more from them, within send_timeout (1 s), but steadily.
    2. For 4 s (four times the limit) it goes on receiving and the answer goes on:
       send_timeout is a limit on a client that reads nothing, not on one that reads slowly.
    3. Then it stops reading, and the gateway lets it go; the record says why.
    """
    a = upstreams["a"]
    gw = gateway([route("b", "/big", [("a", a.url, 1)])], server={"send_timeout": 1})
    with socket.socket() as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        conn.connect(("127.0.0.1", gw.server.port))
        conn.sendall(b"GET /big?bytes=32000000 HTTP/1.1\r\nHost: x\r\nX-Request-Id: slow\r\n\r\n")
        conn.settimeout(5)
        received = 0
        reading_until = time.monotonic() + 4.0
        while time.monotonic() < reading_until:
            chunk = conn.recv(4096)
            assert chunk, f"the gateway closed the connection after {received} bytes"
            received += len(chunk)
            time.sleep(0.1)
        assert gw.records() == []  # still being answered
        wait_until(lambda: len(gw.records()) == 1, "the record")
        (record,) = gw.records()
        assert (record["status"], record["request_id"]) == (200, "slow")
        assert record["error"] == "send_timeout: the client read nothing for 1 s"
        assert connections_closed(gw, "send_timeout") == 1


def test_a_client_that_leaves_neither_fails_nor_clears_its_variant(
    gateway: GatewayFactory,
) -> None:
    """1. A model server that never answers, behind a route that times out at 1 s and
       ejects a variant after 3 consecutive failures.
    2. Timeouts (504) alternate with clients that leave before the timeout (499).
    3. The third timeout ejects the variant: the clients that left did not clear its count
       of failures, nor add to it (nginx's max_fails and Envoy's outlier detection count
       neither).
    """
    with raw_upstream(lambda conn: conn.recv(1)) as model:
        gw = gateway(
            [
                route(
                    "m",
                    "/m",
                    [("m", model, 1)],
                    timeouts={"total": 1.0},
                    health={"passive_failures": 3, "ejection_seconds": 60},
                )
            ]
        )
        for i in range(3):
            if i:
                with socket.create_connection(("127.0.0.1", gw.server.port)) as conn:
                    conn.sendall(b"GET /m HTTP/1.1\r\nHost: x\r\n\r\n")
                    time.sleep(0.2)  # well within the timeout
                wait_until(lambda n=2 * i: len(gw.records()) == n, "the 499's record")
            assert httpx.get(f"{gw.url}/m").status_code == 504
        assert gauge(gw, "model_gateway_variant_up", route="m", variant="m") == 0
        assert httpx.get(f"{gw.url}/m").status_code == 503
        gw.stop()
    statuses = [r["status"] for r in sorted(gw.records(), key=lambda r: r["request_time"])]
    assert statuses == [504, 499, 504, 499, 504]  # the 503 chose no variant: not logged


def test_clients_that_leave_at_any_moment_leave_one_record_each(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """1. 60 clients at once each send a request to a model that answers in 200 ms, and close
       their connection after a delay drawn from 0 to 400 ms: some before their answer,
       some after; a third of them at once.
    2. After a graceful stop the store holds exactly one record per client. A client that
       got its answer has a 200; one that left before has a 499 or, where the answer was
       already on its way, a 200. Nothing else.
    3. The gateway still answers, and nothing is left in flight.
    """
    gw = gateway([route("slow", "/slow", [("a", upstreams["a"].url, 1)])])
    rng = random.Random(6)
    delays = [0.0 if i % 3 == 0 else rng.uniform(0, 0.4) for i in range(60)]
    answered: dict[str, bool] = {}

    def client(i: int) -> None:
        with socket.create_connection(("127.0.0.1", gw.server.port)) as conn:
            head = f"GET /slow?seconds=0.2 HTTP/1.1\r\nHost: x\r\nX-Request-Id: c-{i}\r\n\r\n"
            conn.sendall(head.encode())
            time.sleep(delays[i])
            conn.setblocking(False)
            try:
                answered[f"c-{i}"] = conn.recv(12).startswith(b"HTTP/1.1 200")
            except BlockingIOError:
                answered[f"c-{i}"] = False

    threads = [threading.Thread(target=client, args=(i,)) for i in range(60)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert httpx.get(f"{gw.url}/slow?seconds=0").status_code == 200
    wait_until(lambda: in_flight(gw.url) == 0, "no request in flight")
    gw.stop()
    records = {r["request_id"]: r for r in gw.records() if r["request_id"]}
    assert sorted(records) == sorted(answered)
    for request_id, got_answer in answered.items():
        status = records[request_id]["status"]
        assert status == 200 if got_answer else status in (200, 499), (request_id, status)
    assert sum(r["status"] == 499 for r in records.values()) >= 20  # those that left at once


def test_requests_still_running_when_the_shutdown_timeout_ends_are_answered_and_logged(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """1. A gateway whose graceful stop waits 0.5 s for requests in flight. One request
       waits on a model server that holds its answer (its route has a shadow); another is
       mid-stream, the model server holding the second chunk.
    2. The gateway is stopped gracefully.
    3. The waiting request is answered 503 shutting_down; the stream ends incomplete.
    4. Both are in the log, which was closed after them: the 503, and the stream's 200, each
       with the shutdown as its error. No shadow copy was made that the stop would wait for.
    5. The gateway's own 503 did not count against the model server: a route that ejects a
       variant after one failed request still has it in.
    """
    url = upstreams["a"].url
    shadow = {"name": "s", "url": upstreams["b"].url, "model_version": "2"}
    eject_at_once = {"passive_failures": 1}
    gw = gateway(
        [
            route("held", "/held", [("a", url, 1)], shadows=[shadow], health=eject_at_once),
            route("stream", "/stream", [("a", url, 1)]),
        ],
        server={"shutdown_timeout": 0.5, "config_poll_interval": 0},
    )
    answers: list[httpx.Response] = []
    waiting = threading.Thread(
        target=lambda: answers.append(httpx.get(f"{gw.url}/held/x", timeout=30))
    )
    waiting.start()
    wait_until(lambda: upstreams["a"].control.requests == 1, "the held request upstream")
    with httpx.stream("GET", f"{gw.url}/stream", timeout=30) as stream:
        chunks = stream.iter_raw()
        assert next(chunks) == b"data: first\n\n"
        gw.stop()
        with pytest.raises(httpx.RemoteProtocolError):  # the chunked body never ended
            b"".join(chunks)
    waiting.join(timeout=30)
    (answer,) = answers
    assert answer.status_code == 503
    assert error_code(answer) == "shutting_down"
    cut_off = "shutdown: the gateway stopped before the request was complete"
    records = gw.records()
    assert sorted((r["path"], r["status"], r["error"]) for r in records) == [
        ("/held/x", 503, cut_off),
        ("/stream", 200, cut_off),
    ]
    assert gw.app.state.health.down == {}


def test_locked_sqlite_store_delays_records_but_not_requests(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """1. Another process holds an exclusive lock on the SQLite file for a second.
    2. Requests during it are answered; their records wait in the queue.
    3. Once the lock is gone, every record is written.
    """
    gw = gateway([route("fraud", "/v2/models/fraud", [("a", upstreams["a"].url, 1)])])
    httpx.post(f"{gw.url}/v2/models/fraud/infer", json=INFER)
    wait_until(lambda: len(gw.records()) == 1, "the file, its tables and a first record")
    locker = sqlite3.connect(gw.db_path, timeout=5, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        for _ in range(20):
            assert httpx.post(f"{gw.url}/v2/models/fraud/infer", json=INFER).status_code == 200
        time.sleep(1.0)
    finally:
        locker.execute("COMMIT")
        locker.close()
    gw.stop()
    assert len(gw.records()) == 21


def test_a_full_log_holds_new_requests_back_and_a_stop_answers_them(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """1. A gateway whose log holds 2 records and blocks when full, and whose graceful stop
       waits 0.5 s.
    2. Another process locks the SQLite file: the writer stalls on one record, one more
       waits, and the requests after them wait for room before they are forwarded.
    3. The gateway is stopped; the 0.5 s run out while they wait, and the lock goes later.
    4. The two admitted requests are answered and logged; the others are answered 503
       shutting_down, were never forwarded, and nothing in memory outgrew the bound.
    """
    gw = gateway(
        [route("echo", "/echo", [("a", upstreams["a"].url, 1)])],
        storage={"queue_size": 2, "batch_size": 1},
        server={"shutdown_timeout": 0.5, "config_poll_interval": 0},
    )
    httpx.post(f"{gw.url}/echo/x", json=INFER)  # the file and tables exist
    wait_until(lambda: len(gw.records()) == 1, "the first record")
    forwarded_before = upstreams["a"].control.requests
    writer = gw.app.state.writer
    statuses: list[int] = []
    codes: list[str] = []

    def call() -> None:
        answer = httpx.post(f"{gw.url}/echo/x", json=INFER, timeout=30)
        statuses.append(answer.status_code)
        if answer.status_code != 200:
            codes.append(error_code(answer))

    locker = sqlite3.connect(gw.db_path, timeout=5, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        clients = [threading.Thread(target=call) for _ in range(6)]
        for client in clients:
            client.start()
        wait_until(lambda: len(writer._room) == 4, "four requests waiting for room")
        wait_until(lambda: statuses == [200, 200], "the two admitted requests answered")
        assert writer.in_memory == 2
        assert upstreams["a"].control.requests - forwarded_before == 2
        stopping = threading.Thread(target=gw.stop)
        stopping.start()
        for client in clients:
            client.join(timeout=30)
    finally:
        locker.execute("COMMIT")
        locker.close()
    stopping.join(timeout=60)
    assert sorted(statuses) == [200, 200, 503, 503, 503, 503]
    assert codes == ["shutting_down"] * 4
    assert upstreams["a"].control.requests - forwarded_before == 2
    assert len(gw.records()) == 3


def test_a_request_that_finds_no_room_within_block_timeout_is_answered_503(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """Under ``overflow: block`` a request waits for room at most ``storage.block_timeout``,
    then is answered 503 log_unavailable without being forwarded; once the store takes
    records again, requests go through and every answered one is logged."""
    gw = gateway(
        [route("echo", "/echo", [("a", upstreams["a"].url, 1)])],
        storage={"queue_size": 1, "batch_size": 1, "block_timeout": 0.3},
        server={"config_poll_interval": 0},
    )
    httpx.post(f"{gw.url}/echo/x", json=INFER)
    wait_until(lambda: len(gw.records()) == 1, "the first record")
    locker = sqlite3.connect(gw.db_path, timeout=5, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        assert httpx.post(f"{gw.url}/echo/x", json=INFER).status_code == 200
        forwarded = upstreams["a"].control.requests
        refused = httpx.post(f"{gw.url}/echo/x", json=INFER, timeout=30)
        assert refused.status_code == 503
        assert error_code(refused) == "log_unavailable"
        assert upstreams["a"].control.requests == forwarded
    finally:
        locker.execute("COMMIT")
        locker.close()
    assert httpx.post(f"{gw.url}/echo/x", json=INFER).status_code == 200
    gw.stop()
    assert len(gw.records()) == 3
    assert b"model_gateway_log_unavailable_total 1.0" in gw.app.state.metrics.exposition()


def test_locked_postgres_table_delays_records_but_not_requests(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    schema = f"mg_lock_{uuid.uuid4().hex[:12]}"
    gw = gateway(
        [route("fraud", "/v2/models/fraud", [("a", upstreams["a"].url, 1)])],
        storage={"url": f"{POSTGRES}?schema={schema}"},
    )

    async def scenario() -> int:
        conn = await asyncpg.connect(POSTGRES, server_settings={"search_path": schema})
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE")
                async with httpx.AsyncClient() as client:
                    for _ in range(20):
                        r = await client.post(f"{gw.url}/v2/models/fraud/infer", json=INFER)
                        assert r.status_code == 200
                await asyncio.sleep(1.0)
            await asyncio.to_thread(gw.stop)
            return int(await conn.fetchval("SELECT COUNT(*) FROM predictions"))
        finally:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            await conn.close()

    assert asyncio.run(scenario()) == 20


def test_sigkill_loses_at_most_the_unwritten_records(
    tmp_path: Path, upstreams: dict[str, Upstream]
) -> None:
    """Every answered request reaches the store (within a linger and one write, on a quiet
    machine), and what the store has survives the process killed without warning."""
    db = tmp_path / "log.db"
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"url": f"sqlite:///{db}"},
                "routes": [
                    {
                        "name": "fraud",
                        "path": "/v2/models/fraud",
                        "variants": [
                            {"name": "a", "url": upstreams["a"].url, "model_version": "1"}
                        ],
                    }
                ],
            }
        )
    )
    gw = GatewayProcess(config)
    with httpx.Client() as client:
        for _ in range(100):
            assert client.post(f"{gw.url}/v2/models/fraud/infer", json=INFER).status_code == 200

    def stored() -> int:
        conn = sqlite3.connect(db)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])
        finally:
            conn.close()

    wait_until(lambda: stored() == 100, "every answered request in the store")
    assert gw.terminate_and_wait(signal.SIGKILL) == -signal.SIGKILL
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 100
    conn.close()


class Forwarder:
    """A TCP forwarder in front of PostgreSQL that a test can take down and bring back: the
    database becomes unreachable for the gateway without touching the shared server."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.up()

    def _run(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)  # type: ignore[arg-type]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers.update({writer, up_writer})
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def up(self) -> None:
        async def start() -> None:
            self.server = await asyncio.start_server(
                self._handle, "127.0.0.1", self.port, reuse_address=True
            )

        self._run(start())

    def down(self) -> None:
        async def stop() -> None:
            assert self.server is not None
            self.server.close()
            for writer in self.writers:
                writer.transport.abort()
            self.writers.clear()
            await self.server.wait_closed()

        self._run(stop())

    def close(self) -> None:
        if self.server is not None and self.server.is_serving():
            self.down()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


def test_database_outage_keeps_serving_and_writes_when_it_returns(
    gateway: GatewayFactory, upstreams: dict[str, Upstream], caplog: pytest.LogCaptureFixture
) -> None:
    """1. The gateway's PostgreSQL goes away (its connections cut, new ones refused).
    2. 30 requests during the outage are answered; their records wait in the queue.
    3. The database comes back: every record is written, none counted lost.
    4. Every failure meanwhile was logged in a line of its own, never with a traceback.
    """
    schema = f"mg_outage_{uuid.uuid4().hex[:12]}"
    host = POSTGRES.split("@", 1)[1].split("/", 1)[0]
    forwarder = Forwarder((host.split(":")[0], int(host.split(":")[1])))
    url = POSTGRES.replace(host, f"127.0.0.1:{forwarder.port}") + f"?schema={schema}"
    try:
        gw = gateway(
            [route("fraud", "/v2/models/fraud", [("a", upstreams["a"].url, 1)])],
            storage={"url": url},
        )
        metrics = gw.app.state.metrics.registry

        def sampled(name: str, labels: dict[str, str] | None = None) -> float:
            return metrics.get_sample_value(name, labels or {}) or 0

        for _ in range(10):
            assert httpx.post(f"{gw.url}/v2/models/fraud/infer", json=INFER).status_code == 200
        wait_until(
            lambda: sampled("model_gateway_log_records_written_total") >= 10, "the first writes"
        )
        forwarder.down()
        for _ in range(30):
            assert httpx.post(f"{gw.url}/v2/models/fraud/infer", json=INFER).status_code == 200
        # several failed attempts to write, and a feedback join (every second) failing too
        wait_until(
            lambda: (
                sampled("model_gateway_log_write_failures_total") >= 2
                and sampled("model_gateway_background_errors_total", {"task": "feedback-join"}) >= 1
            ),
            "writes and a feedback join failing",
        )
        tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
        assert tracebacks == [], tracebacks
        # the control plane says what is wrong instead of failing with a 500
        down = httpx.get(f"{gw.url}/admin/predictions/x")
        assert down.status_code == 503 and error_code(down) == "store_unavailable"
        forwarder.up()
        gw.stop()
        assert metrics.get_sample_value("model_gateway_log_write_errors_total") == 0
        assert metrics.get_sample_value("model_gateway_log_records_written_total") == 40

        async def count() -> int:
            conn = await asyncpg.connect(POSTGRES, server_settings={"search_path": schema})
            try:
                return int(await conn.fetchval("SELECT COUNT(*) FROM predictions"))
            finally:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                await conn.close()

        assert asyncio.run(count()) == 40
    finally:
        forwarder.close()
