"""What a client's connection is held to: a request head that comes in time and within a
size, and an answer that the client reads.

nginx's ``client_header_timeout``, ``large_client_header_buffers`` and ``send_timeout`` are the
models. uvicorn's httptools server has none of them: a client that sends half a request line
and then nothing holds its connection for good; one that sends an endless header makes the
server buffer all of it (tens of MB a second, each part copied onto the rest); and one that
stops reading an answer larger than the socket's buffers holds its request (and the model
server connection under it) for good.

The time limits almost never fire. A loop timer per request would cost every request a
measurable share of its time (see ``wheel.py``), so nothing is done per request: one sweep
per gateway, up to once a second, looks at each connection. A head still pending at a later
sweep is the same head (the connection gives the same object for as long as it waits for the
same head), so it has been pending at least since the sweep that first saw it. A
connection's writes note when the transport last paused them, which happens only once the
client's buffers are full, and a sweep that finds less of the answer unsent than the last
one saw (in the transport or in the kernel's send queue) takes that as the client reading,
and starts its time again: send_timeout cuts a client that reads nothing, not one that reads
slowly. A time limit fires between its value and two sweep intervals past the last sign of
the client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from ..config import ServerConfig

#: the longest gap between two sweeps
LONGEST_SWEEP_INTERVAL = 1.0
#: and the shortest time limit is swept at least this many times
SWEEPS_PER_LIMIT = 4

#: the reasons a connection is closed, as ``model_gateway_client_connections_closed_total``
#: names them
HEADER_TIMEOUT = "header_timeout"
HEADER_TOO_LARGE = "header_too_large"
SEND_TIMEOUT = "send_timeout"
CLIENT_CLOSE_REASONS = (HEADER_TIMEOUT, HEADER_TOO_LARGE, SEND_TIMEOUT)


class StallableConnection(Protocol):
    """What a sweep needs of a connection (the gateway's uvicorn protocol, ``protocol.py``)."""

    #: the request head the last sweep saw pending (``waiting_for_head``), and when
    head_seen: object | None
    head_seen_at: float
    #: when the transport paused the connection's writes (the client's buffer is full), or
    #: when a sweep last saw the client read some of what waits; 0: they are not paused
    writes_paused_at: float
    #: what the transport held unsent when a sweep (or the pause) last looked
    unsent_seen: int

    def unsent(self) -> int:
        """The bytes of the answer the client has not yet taken (held by the transport or
        queued in the kernel): less than before once the client reads."""

    def waiting_for_head(self) -> object | None:
        """What the connection waits for, if it waits for a request's head with no request
        of its own in progress: the same object for as long as it waits for the same head;
        None while it does not."""

    def head_timed_out(self) -> bool:
        """Close the connection; True if part of a head had arrived (it is answered 408),
        False if nothing had."""

    def send_timed_out(self) -> None:
        """Close the connection: its client has not read for ``send_timeout`` seconds."""


class ClientLimits:
    """The limits of one gateway's client connections (its ``server`` section), and the sweep
    that applies the time limits. The gateway's uvicorn protocol applies the size limit."""

    def __init__(self, server: ServerConfig, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``loop``: the one to sweep on; by default the one running when a sweep starts."""
        self.server = server
        #: called with the reason (HEADER_TIMEOUT, …) for each connection a limit closed
        self.on_close: Callable[[str], object] | None = None
        self._connections: set[StallableConnection] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._given_loop = loop
        self._loop: asyncio.AbstractEventLoop | None = None
        #: a graceful stop is draining: every answer closes its connection
        self.draining = False

    def configure(self, server: ServerConfig) -> None:
        """New limits (a reload), for every connection from the next sweep or read on."""
        self.server = server

    @property
    def interval(self) -> float:
        shortest = min(self.server.client_header_timeout, self.server.send_timeout)
        return min(LONGEST_SWEEP_INTERVAL, shortest / SWEEPS_PER_LIMIT)

    def watch(self, connection: StallableConnection) -> None:
        """Apply the time limits to a new connection, from now until ``forget``."""
        self._connections.add(connection)
        if self._sweep is None:
            self._loop = self._given_loop or asyncio.get_running_loop()
            self._sweep = self._loop.call_later(self.interval, self.sweep)

    def forget(self, connection: StallableConnection) -> None:
        self._connections.discard(connection)

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._connections.clear()

    def closed(self, reason: str) -> None:
        """Count a connection a limit closed."""
        if self.on_close is not None:
            self.on_close(reason)

    def sweep(self) -> None:
        """Close each connection that has stalled past its limit."""
        self._sweep = None
        assert self._loop is not None
        now = self._loop.time()
        server = self.server
        for connection in list(self._connections):
            paused_at = connection.writes_paused_at
            if paused_at:
                unsent = connection.unsent()
                if unsent < connection.unsent_seen:
                    # the client read some of its answer: a slow reader is not a stalled
                    # one (nginx's send_timeout too runs between two writes that moved)
                    connection.writes_paused_at = now
                elif now - paused_at >= server.send_timeout:
                    self._connections.discard(connection)
                    connection.send_timed_out()
                    self.closed(SEND_TIMEOUT)
                    continue
                connection.unsent_seen = unsent
            waiting = connection.waiting_for_head()
            if waiting is None:
                connection.head_seen = None
            elif waiting is not connection.head_seen:
                connection.head_seen, connection.head_seen_at = waiting, now
            elif now - connection.head_seen_at >= server.client_header_timeout:
                self._connections.discard(connection)
                if connection.head_timed_out():
                    self.closed(HEADER_TIMEOUT)
        if self._connections:
            self._sweep = self._loop.call_later(self.interval, self.sweep)
