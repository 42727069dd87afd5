"""The server side's transport: a busy server's writes go out once per loop turn, whole and in
order; a lone request's response, or any response of a server with time to spare, in one
write as soon as it is complete; nothing is held past the turn."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import httpx
import pytest
import uvicorn
from uvicorn.server import ServerState

from model_gateway.config import ServerConfig
from model_gateway.serving.limits import ClientLimits
from model_gateway.serving.protocol import (
    HOLD_ABOVE,
    LOAD_INTERVAL,
    RELEASE_BELOW,
    CoalescingHttpToolsProtocol,
    CoalescingTransport,
    LoadWatch,
)
from model_gateway.serving.signals import LIMITS_STATE

from .conftest import GatewayFactory, Upstream, route, wait_until


class RecordingTransport:
    """What the socket was asked to do, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def close(self) -> None:
        self.closing = True
        self.calls.append(("close", None))

    def abort(self) -> None:
        self.closing = True
        self.calls.append(("abort", None))

    def is_closing(self) -> bool:
        return self.closing

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.calls.append((name, args))


class Load:
    """A :class:`LoadWatch`'s verdict, set by the test."""

    def __init__(self, busy: bool) -> None:
        self.verdict = busy

    def busy(self) -> bool:
        return self.verdict


def coalescing(
    in_progress: set[object], busy: bool = True
) -> tuple[CoalescingTransport, RecordingTransport]:
    socket = RecordingTransport()
    loop = asyncio.get_running_loop()
    transport = CoalescingTransport(socket, loop, in_progress, Load(busy))  # type: ignore[arg-type]
    return transport, socket


def test_a_lone_response_is_one_write_as_soon_as_it_is_complete() -> None:
    async def scenario() -> None:
        transport, socket = coalescing({"this request"})
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"body")
        assert socket.calls == []
        transport.response_complete()  # in the same step: no loop turn waited
        assert socket.calls == [("write", b"HTTP/1.1 200 OK\r\n\r\nbody")]
        await asyncio.sleep(0)  # the turn's flush finds nothing left to send
        assert len(socket.calls) == 1

        # a lone response that streams: what it wrote leaves at the end of the turn
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"first chunk")
        await asyncio.sleep(0)
        assert socket.calls[-1] == ("write", b"HTTP/1.1 200 OK\r\n\r\nfirst chunk")

    asyncio.run(scenario())


def test_a_busy_server_writes_once_per_turn_in_order() -> None:
    async def scenario() -> None:
        transport, socket = coalescing({"this request", "another"})
        transport.write(b"head,")
        transport.writelines([b"body,", b"more"])
        transport.response_complete()
        assert socket.calls == []  # held for the rest of the turn, to leave with the others
        await asyncio.sleep(0)
        assert socket.calls == [("write", b"head,body,more")]
        transport.write(b"next turn")
        await asyncio.sleep(0)
        assert socket.calls[-1] == ("write", b"next turn")
        # the socket's other methods are its own
        transport.pause_reading()
        assert socket.calls[-1] == ("pause_reading", ())

    asyncio.run(scenario())


def test_a_server_with_time_to_spare_writes_each_response_when_it_is_complete() -> None:
    async def scenario() -> None:
        transport, socket = coalescing({"this request", "another"}, busy=False)
        transport.write(b"head,")
        transport.write(b"body")
        transport.response_complete()  # others in progress, but no turn is waited
        assert socket.calls == [("write", b"head,body")]
        # what streams still leaves at the end of the turn, in one write
        transport.write(b"first,")
        transport.write(b"chunk")
        assert len(socket.calls) == 1
        await asyncio.sleep(0)
        assert socket.calls[-1] == ("write", b"first,chunk")

    asyncio.run(scenario())


def test_the_load_watch_holds_above_its_bound_and_lets_go_below_the_lower_one() -> None:
    """The share of the CPU in each interval decides; between the two bounds the verdict
    stays as it was, so that a load at the border does not flip it every interval."""
    shares = [0.4, HOLD_ABOVE + 0.05, (HOLD_ABOVE + RELEASE_BELOW) / 2, RELEASE_BELOW - 0.05]
    shares += [(HOLD_ABOVE + RELEASE_BELOW) / 2, 1.0]
    wall, cpu = [0.0], [0.0]
    watch = LoadWatch(lambda: wall[0], lambda: cpu[0])
    verdicts = []
    step = 0.0625  # over LOAD_INTERVAL, and a sum of such steps is exact in binary
    assert step >= LOAD_INTERVAL
    for share in shares:
        wall[0] += step
        cpu[0] += share * step
        verdicts.append(watch.busy())
    assert verdicts == [False, True, True, False, False, True]


def test_the_load_watch_looks_once_per_interval_and_a_quiet_spell_counts_whole() -> None:
    """1. Within an interval of its last look the watch answers as it did, whatever the CPU
       did meanwhile (and reads no CPU clock).
    2. Asked again after a quiet second, it measures that second: not busy, although the
       last 50 ms of it were spent on the CPU."""
    wall, cpu = [0.0], [0.0]
    cpu_reads = [0]

    def cpu_clock() -> float:
        cpu_reads[0] += 1
        return cpu[0]

    watch = LoadWatch(lambda: wall[0], cpu_clock)
    wall[0] = cpu[0] = LOAD_INTERVAL  # a whole interval on the CPU
    assert watch.busy()
    reads = cpu_reads[0]
    wall[0] += LOAD_INTERVAL / 2  # idle, but not an interval yet
    assert watch.busy() and cpu_reads[0] == reads
    wall[0] += 1.0
    cpu[0] += LOAD_INTERVAL
    assert not watch.busy()


def test_close_sends_what_is_held_first_and_abort_drops_it() -> None:
    async def scenario() -> None:
        transport, socket = coalescing({"this request", "another"})
        transport.write(b"last words")
        transport.close()
        assert socket.calls == [("write", b"last words"), ("close", None)]
        await asyncio.sleep(0)  # the turn's flush finds nothing left to send
        assert len(socket.calls) == 2

        transport, socket = coalescing({"this request", "another"})
        transport.write(b"never sent")
        transport.abort()
        await asyncio.sleep(0)
        assert socket.calls == [("abort", None)]

        transport, socket = coalescing({"this request", "another"})
        transport.write(b"too late")
        socket.closing = True  # the peer went away within the turn
        await asyncio.sleep(0)
        assert socket.calls == []

    asyncio.run(scenario())


def in_flight(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("model_gateway_requests_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no in-flight gauge")


@pytest.mark.slow
def test_concurrent_responses_and_a_stream_while_busy(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """1. 40 requests at once through a real gateway: each answer whole and its own.
    2. While a slow request keeps the server busy, a streamed response's first chunk still
       reaches the client while the upstream holds the second: held writes leave at the end
       of the turn, not with the next chunk.
    """
    url = upstreams["a"].url
    gw = gateway(
        [
            route("echo", "/echo", [("a", url, 1)]),
            route("stream", "/stream", [("a", url, 1)]),
            route("slow", "/slow", [("a", url, 1)]),
        ]
    )

    async def many() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            answers = await asyncio.gather(
                *(client.post(f"{gw.url}/echo/{i}", content=b"x" * i) for i in range(40))
            )
        for i, answer in enumerate(answers):
            assert answer.status_code == 200
            assert answer.json()["path"] == f"/echo/{i}"
            assert answer.json()["body"] == "x" * i

    asyncio.run(many())

    slow = threading.Thread(target=httpx.get, args=(f"{gw.url}/slow?seconds=3",))
    slow.start()
    try:
        wait_until(lambda: in_flight(gw.url) == 1, "the slow request in flight")
        with httpx.stream("GET", f"{gw.url}/stream", timeout=2) as r:
            chunks = r.iter_raw()
            assert next(chunks) == b"data: first\n\n"  # a write held past the turn times out
            upstreams["a"].control.release.set()
            assert b"".join(chunks) == b"data: second\n\n"
    finally:
        slow.join()


@pytest.mark.tuned_edge
def test_through_a_real_gateway_a_lone_response_is_one_write_at_its_end(
    gateway: GatewayFactory, upstreams: dict[str, Upstream], monkeypatch: Any
) -> None:
    """uvicorn's protocol tells the transport when a response is complete: a lone request's
    status line, headers and body leave in one write then, not at the end of the turn. And
    a lone stream is not held: its first chunk arrives while the upstream holds the second."""
    url = upstreams["a"].url
    gw = gateway(
        [route("echo", "/echo", [("a", url, 1)]), route("stream", "/stream", [("a", url, 1)])]
    )
    events: list[object] = []
    flush, complete = CoalescingTransport.flush, CoalescingTransport.response_complete

    def recording_flush(self: CoalescingTransport) -> None:
        if self._held is not None:
            events.append(len(self._held))
        flush(self)

    def recording_complete(self: CoalescingTransport) -> None:
        events.append("complete")
        complete(self)

    monkeypatch.setattr(CoalescingTransport, "flush", recording_flush)
    monkeypatch.setattr(CoalescingTransport, "response_complete", recording_complete)
    answer = httpx.post(f"{gw.url}/echo/1", content=b"x")
    assert answer.status_code == 200
    assert events == ["complete", 2]  # head and body, written at once when complete

    with httpx.stream("GET", f"{gw.url}/stream", timeout=2) as r:
        chunks = r.iter_raw()
        assert next(chunks) == b"data: first\n\n"  # a write held past the turn times out
        upstreams["a"].control.release.set()
        assert b"".join(chunks) == b"data: second\n\n"


def test_a_drained_connection_with_its_request_unread_is_answered_not_closed() -> None:
    """At a graceful stop, a connection with no request yet is given a grace to send one. A
    loop busy past that grace runs its due timers before it reads: the grace's end must not
    close a connection whose request already waits in the kernel's buffer. It is read and
    answered (with Connection: close) instead."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def scenario() -> bytes:
        loop = asyncio.get_running_loop()
        config = uvicorn.Config(app, lifespan="off", log_level="warning")
        config.load()
        limits = ClientLimits(ServerConfig())
        limits.draining = True
        protocol = CoalescingHttpToolsProtocol(
            config=config, server_state=ServerState(), app_state={LIMITS_STATE: limits}
        )
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        await loop.connect_accepted_socket(lambda: protocol, ours)
        theirs.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # the loop has not read it
        protocol._close_if_idle()  # the grace ends before the loop's next read
        answer = b""
        try:
            async with asyncio.timeout(20):  # a guard, not a timing
                while chunk := await loop.sock_recv(theirs, 65536):
                    answer += chunk
                    if answer.endswith(b"ok"):
                        break
        finally:
            theirs.close()
            limits.close()
            protocol.transport.close()
        return answer

    answer = asyncio.run(scenario())
    assert answer.startswith(b"HTTP/1.1 200 "), answer
