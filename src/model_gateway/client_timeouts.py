"""Time limits on a client that stalls: one slow to send its request's head (or that opens a
connection and sends nothing), and one that stops reading its answer.

nginx's ``client_header_timeout`` and ``send_timeout`` are the models. uvicorn has neither: a
client that sends half a request line and then nothing holds its connection for good, and so
does one that stops reading an answer larger than the socket's buffers (the request's task
waits for the transport to drain, holding its model server connection too). A few hundred
such clients are enough to use up a process's file descriptors.

Both limits almost never fire. A loop timer per request would cost every request some 3 µs
(see ``wheel.py``), so nothing here is done per request. Instead one sweep per gateway, up to
once a second, looks at each connection: a head that has been pending since an earlier sweep
(the same request, seen again) has been pending at least since then, and a connection's
writes note when the transport last paused them (which happens only when the client's socket
buffer is full). A limit fires between its value and two sweep intervals past it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

#: the longest gap between two sweeps
LONGEST_SWEEP_INTERVAL = 1.0
#: and the shortest limit is swept at least this many times
SWEEPS_PER_LIMIT = 4


class StallableConnection(Protocol):
    """What a sweep needs of a connection (the gateway's uvicorn protocol, ``http.py``)."""

    #: the request head the last sweep saw pending (``waiting_for_head``), and when
    head_seen: object | None
    head_seen_at: float
    #: when the transport paused the connection's writes (the client's buffer is full); 0:
    #: they are not paused
    writes_paused_at: float

    def waiting_for_head(self) -> object | None:
        """What the connection waits for, if it waits for a request's head with no request
        of its own in progress: the same object for as long as it waits for the same head;
        None while it does not."""

    def head_timed_out(self) -> bool:
        """Close the connection; True if part of a head had arrived (it is answered 408),
        False if nothing had."""

    def send_timed_out(self) -> None:
        """Close the connection: its client has not read for ``send`` seconds."""


class ClientTimeouts:
    """The stall limits of one gateway's connections, and the sweep that applies them."""

    def __init__(self, header: float, send: float) -> None:
        self.header = header
        self.send = send
        #: called with "client_header" or "send" for each connection a limit closed
        self.on_timeout: Callable[[str], object] | None = None
        self._connections: set[StallableConnection] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def configure(self, header: float, send: float) -> None:
        """New limits (a reload); the next sweep applies them to every connection."""
        self.header, self.send = header, send

    @property
    def interval(self) -> float:
        return min(LONGEST_SWEEP_INTERVAL, min(self.header, self.send) / SWEEPS_PER_LIMIT)

    def watch(self, connection: StallableConnection) -> None:
        """Apply the limits to a new connection, from now until ``forget``."""
        self._connections.add(connection)
        if self._sweep is None:
            self._loop = asyncio.get_running_loop()
            self._sweep = self._loop.call_later(self.interval, self.sweep)

    def forget(self, connection: StallableConnection) -> None:
        self._connections.discard(connection)

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._connections.clear()

    def sweep(self) -> None:
        """Close each connection that has stalled past its limit."""
        self._sweep = None
        assert self._loop is not None
        now = self._loop.time()
        for connection in list(self._connections):
            paused_at = connection.writes_paused_at
            if paused_at and now - paused_at >= self.send:
                self._connections.discard(connection)
                connection.send_timed_out()
                self._count("send")
                continue
            waiting = connection.waiting_for_head()
            if waiting is None:
                connection.head_seen = None
            elif waiting is not connection.head_seen:
                connection.head_seen, connection.head_seen_at = waiting, now
            elif now - connection.head_seen_at >= self.header:
                self._connections.discard(connection)
                if connection.head_timed_out():
                    self._count("client_header")
        if self._connections:
            self._sweep = self._loop.call_later(self.interval, self.sweep)

    def _count(self, timeout: str) -> None:
        if self.on_timeout is not None:
            self.on_timeout(timeout)
