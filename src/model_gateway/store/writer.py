"""The batched background writer between the hot path and the store.

Requests hand records to a bounded queue and never wait on the store. One task takes every
record waiting, writes them in one transaction, and repeats: batches grow by themselves when
the store is slower than the traffic (group commit). Before each write the writer lingers
(tens of milliseconds) for more records to join, unless a full batch already waits: light
traffic does not cost one transaction per request, and heavy traffic is written in full
batches, since each write costs the event loop a fixed price whatever its size. When the
queue is full the overflow policy applies: ``block`` makes the request wait for room (nothing
lost, back-pressure), ``drop`` drops and counts the record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Literal

from ..background import cancel_and_wait
from ..metrics import Metrics
from ..records import PredictionRecord
from .base import Store

log = logging.getLogger("model_gateway.writer")

_RETRY_BASE_DELAY = 0.1
RETRY_MAX_DELAY = 2.0
#: how long shutdown keeps retrying a failing store before counting the rest as lost
DEFAULT_CLOSE_TIMEOUT = 10.0
QUEUE_DEPTH_SAMPLE_SECONDS = 0.5


class RecordWriter:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        *,
        queue_size: int,
        batch_size: int,
        overflow: Literal["block", "drop"],
        linger: float = 0.0,
        write_retries: int | None,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        self._store = store
        self._metrics = metrics
        # The queue: records waiting for the writer, oldest first, at most ``queue_size``. A list
        # and futures rather than an asyncio.Queue, whose put_nowait and get_nowait run about
        # forty lines of Python per record; here queueing is an append.
        self._waiting: list[PredictionRecord] = []
        self._capacity = queue_size
        #: set when the writer waits for a record
        self._wakeup: asyncio.Future[None] | None = None
        #: requests waiting for room under ``block``, first come first served
        self._room: deque[asyncio.Future[None]] = deque()
        self._closing = False
        self._batch_size = batch_size
        self._linger = linger
        self._block = overflow == "block"
        self._retries = write_retries
        self._close_timeout = close_timeout
        self._close_deadline: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._sampler: asyncio.Task[None] | None = None
        metrics.log_queue_capacity.set(queue_size)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="model-gateway-record-writer")
        self._sampler = asyncio.create_task(self._sample_depth(), name="log-queue-depth")

    async def _sample_depth(self) -> None:
        # A gauge set by a timer rather than a callback, which multiprocess mode cannot read.
        while True:
            self._metrics.log_queue_depth.set(len(self._waiting))
            await asyncio.sleep(QUEUE_DEPTH_SAMPLE_SECONDS)

    def offer(self, record: PredictionRecord) -> bool:
        """Queue a record if there is room; else ``False`` under ``block`` (then `submit` it),
        ``True`` under ``drop`` (the record is counted as dropped).

        Not a coroutine: the hot path queues one record per request without one."""
        if len(self._waiting) >= self._capacity:
            if self._block:
                return False
            self._metrics.log_dropped.inc()
            return True
        self._waiting.append(record)
        self._wake_writer()
        return True

    def force(self, record: PredictionRecord) -> None:
        """Queue a record past the bound: for a request that a stop running out of time cut
        off while it waited for room. The writer writes it before it closes."""
        self._waiting.append(record)
        self._wake_writer()

    async def submit(self, record: PredictionRecord) -> None:
        """Queue a record; under ``block`` wait for room, under ``drop`` count it and go on."""
        while not self.offer(record):
            room = asyncio.get_running_loop().create_future()
            self._room.append(room)
            try:
                await room
            except asyncio.CancelledError:
                if room.done() and not room.cancelled():
                    self._give_room(1)  # the room this request was given goes to the next
                raise

    def _wake_writer(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            if not wakeup.done():
                wakeup.set_result(None)

    def _give_room(self, places: int) -> None:
        """Wake up to ``places`` requests waiting for room, oldest first."""
        while places and self._room:
            room = self._room.popleft()
            if not room.done():  # else cancelled while waiting
                room.set_result(None)
                places -= 1

    def _take(self) -> list[PredictionRecord]:
        """The oldest records, up to a batch, out of the queue."""
        waiting = self._waiting
        if len(waiting) <= self._batch_size:
            batch, self._waiting = waiting, []
        else:
            batch = waiting[: self._batch_size]
            del waiting[: self._batch_size]
        self._give_room(len(batch))
        return batch

    async def close(self) -> None:
        """Write every queued record, then stop. Call after the server stopped taking requests."""
        if self._task is None:
            return
        self._close_deadline = time.monotonic() + self._close_timeout
        self._closing = True
        self._wake_writer()
        await self._task
        self._task = None
        await cancel_and_wait(self._sampler)
        self._metrics.log_queue_depth.set(0)

    async def _run(self) -> None:
        while True:
            if not self._waiting:
                if self._closing:
                    # every record queued before, and while, the server stopped is written
                    return
                self._wakeup = asyncio.get_running_loop().create_future()
                await self._wakeup
                continue
            if self._linger and len(self._waiting) < self._batch_size and not self._closing:
                await asyncio.sleep(self._linger)
            await self._write(self._take())

    async def _write(self, batch: list[PredictionRecord]) -> None:
        rows = [record.as_row() for record in batch]
        attempt = 0
        while True:
            try:
                await self._store.write_predictions(rows)
            except Exception as exc:
                attempt += 1
                self._metrics.log_write_failures.inc()
                if self._gives_up(attempt):
                    log.error(
                        "giving up on %d prediction records after %d attempts: %s",
                        len(rows),
                        attempt,
                        exc,
                    )
                    self._metrics.log_write_errors.inc(len(rows))
                    return
                # one line per failure, not a traceback per retry while a store is down
                log.warning("writing %d records failed (attempt %d): %s", len(rows), attempt, exc)
                await asyncio.sleep(min(_RETRY_BASE_DELAY * 2 ** (attempt - 1), RETRY_MAX_DELAY))
            else:
                self._metrics.log_written.inc(len(rows))
                return

    def _gives_up(self, attempt: int) -> bool:
        if self._retries is not None and attempt > self._retries:
            return True
        # shutting down with the store still failing: keep trying only so long
        return self._close_deadline is not None and time.monotonic() > self._close_deadline
