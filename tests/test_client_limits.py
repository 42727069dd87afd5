"""The sweep behind the client time limits: a head pending, or writes paused with the client
reading nothing, for less than the limit is never cut; one pending longer is cut between the
limit and two sweep intervals past it (the bound the README gives); a client that reads,
however slowly, is never cut. On a simulated clock, so that any timing can be tried."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from model_gateway.config import ServerConfig
from model_gateway.serving.limits import ClientLimits

# float sums of sweep intervals drift by far less than this
SLACK = 1e-6


class SimulatedLoop:
    """The two things a sweep asks of its loop, on a clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        timer = Timer(callback)
        heapq.heappush(self._timers, (self.now + delay, next(self._order), timer))
        return timer

    def run_until(self, until: float) -> None:
        """Fire every timer due by ``until``, in order, moving the clock to each."""
        while self._timers and self._timers[0][0] <= until:
            when, _, timer = heapq.heappop(self._timers)
            self.now = when
            if not timer.cancelled:
                timer.callback()
        self.now = until


class Timer:
    def __init__(self, callback: Callable[[], object]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Connection:
    """A connection that waits for a head, or has its writes paused, when the test says."""

    def __init__(self, loop: SimulatedLoop) -> None:
        self.loop = loop
        self.head_seen: object | None = None
        self.head_seen_at = 0.0
        self.writes_paused_at = 0.0
        self.unsent_seen = 0
        #: what of the answer waits; while ``reading``, less at each look
        self.waiting = 0
        self.reading = False
        self.head: object | None = None
        self.cut_at: float | None = None
        self.cut_for = ""

    def unsent(self) -> int:
        if self.reading:
            self.waiting -= 1
        return self.waiting

    def waiting_for_head(self) -> object | None:
        return self.head

    def head_timed_out(self) -> bool:
        self.cut_at, self.cut_for = self.loop.now, "head"
        return True

    def send_timed_out(self) -> None:
        self.cut_at, self.cut_for = self.loop.now, "send"


# what a connection does, and for how long: a head pending, an idle spell, writes paused
# with the client reading nothing, or reading slowly (the writes stay paused)
steps = st.lists(
    st.tuples(st.sampled_from(["head", "idle", "paused", "reading"]), st.floats(0.001, 5.0)),
    min_size=1,
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(
    header_timeout=st.floats(0.01, 3.0),
    send_timeout=st.floats(0.01, 3.0),
    plan=steps,
)
def test_a_limit_cuts_only_what_outlasts_it_and_soon_after(
    header_timeout: float, send_timeout: float, plan: list[tuple[str, float]]
) -> None:
    loop = SimulatedLoop()
    server = ServerConfig(client_header_timeout=header_timeout, send_timeout=send_timeout)
    limits = ClientLimits(server, loop=loop)  # type: ignore[arg-type]
    closed: list[str] = []
    limits.on_close = closed.append
    connection = Connection(loop)
    limits.watch(connection)  # type: ignore[arg-type]
    interval = limits.interval
    for what, lasted in plan:  # on the simulated clock
        started = loop.now
        if what == "head":
            connection.head = object()  # a new head: its own object, as uvicorn's scope
        elif what in ("paused", "reading"):
            connection.writes_paused_at = started or 1e-9  # 0 means "not paused"
            connection.waiting = connection.unsent_seen = 1_000_000
            connection.reading = what == "reading"
        loop.run_until(started + lasted)
        connection.head, connection.writes_paused_at = None, 0.0
        connection.reading = False
        limit = {"head": header_timeout, "paused": send_timeout}.get(what)
        if connection.cut_at is None:
            # not cut: it did not outlast its limit by two sweeps
            assert limit is None or lasted < limit + 2 * interval + SLACK
            continue
        # cut: only what it was doing, and only after its limit
        assert limit is not None
        assert connection.cut_for == ("head" if what == "head" else "send")
        waited = connection.cut_at - started
        assert limit - SLACK <= waited < limit + 2 * interval + SLACK
        assert closed == ["header_timeout" if what == "head" else "send_timeout"]
        return  # a cut connection is done


def test_the_sweep_stops_when_no_connection_is_left() -> None:
    loop = SimulatedLoop()
    limits = ClientLimits(ServerConfig(), loop=loop)  # type: ignore[arg-type]
    connection: Any = Connection(loop)
    limits.watch(connection)
    loop.run_until(10.0)
    limits.forget(connection)
    loop.run_until(20.0)
    assert not loop._timers  # nothing left to wake the loop for
