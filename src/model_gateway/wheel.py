"""Timeouts that almost never fire, kept in buckets of one tick each rather than one loop timer
apiece.

Every proxied request arms a total timeout and disarms it a few milliseconds later; it fires
only for a stalled model server. A loop timer per request (``loop.call_later`` and
``cancel``) is a libuv timer allocated, put in and taken out of the loop's heap, and closed,
a measurable share of the throughput (docs/design.md). Here
arming is a dict insert into the bucket of the tick the timeout falls due in, disarming a
dict delete, and one loop timer, set for the earliest bucket, fires the buckets that are
due. A timeout fires up to one tick late (``TICK_SECONDS``): the trade Netty's
``HashedWheelTimer`` and Kafka's timing wheel make for the same reason.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable, Hashable

#: How late a timeout may fire. The gateway's timeouts are seconds long.
TICK_SECONDS = 0.01

#: The timeouts due in one tick: what each one is for, and what it calls.
Bucket = dict[Hashable, Callable[[], object]]


class TimeoutWheel:
    """One event loop's coarse timeouts. Create it in the loop that runs it."""

    def __init__(self, tick: float = TICK_SECONDS) -> None:
        self._loop = asyncio.get_running_loop()
        self._tick = tick
        self._buckets: dict[int, Bucket] = {}
        self._due: list[int] = []  # heap of the ticks that have a bucket
        # set for the earliest tick in _due, whenever _due holds one
        self._timer: asyncio.TimerHandle | None = None

    def arm(self, key: Hashable, delay: float, callback: Callable[[], object]) -> Bucket:
        """Call ``callback`` once ``delay`` seconds have passed (up to a tick later), unless
        ``disarm(key, bucket)`` comes first. ``key`` names this timeout in its bucket."""
        tick = math.ceil((self._loop.time() + delay) / self._tick)
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = {}
            earliest = not self._due or tick < self._due[0]
            heapq.heappush(self._due, tick)
            if earliest:
                self._set_timer(tick)
        bucket[key] = callback
        return bucket

    @staticmethod
    def disarm(key: Hashable, bucket: Bucket) -> None:
        bucket.pop(key, None)
        if not bucket:
            # A dict keeps its table when emptied one key at a time, and a bucket waits for
            # its tick, a whole timeout away: a busy gateway with long timeouts holds
            # thousands of them. Clearing an empty one gives its table back.
            bucket.clear()

    def close(self) -> None:
        """Drop every timeout still armed."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._buckets.clear()
        self._due.clear()

    def _set_timer(self, tick: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(tick * self._tick, self._fire_due)

    def _fire_due(self) -> None:
        self._timer = None
        # the loop's clock counts whole milliseconds: half of one absorbs the float error of
        # tick * TICK_SECONDS, which would otherwise leave a bucket due "now" for a later turn
        now = self._loop.time() + 0.0005
        while self._due and self._due[0] * self._tick <= now:
            bucket = self._buckets.pop(heapq.heappop(self._due))
            while bucket:
                _, callback = bucket.popitem()
                try:
                    callback()
                except Exception as error:  # one failing callback must not stop the others
                    self._loop.call_exception_handler(
                        {"message": "timeout callback failed", "exception": error}
                    )
        if self._due:
            self._set_timer(self._due[0])
