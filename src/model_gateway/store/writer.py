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
from typing import Literal

from ..background import cancel_and_wait
from ..metrics import Metrics
from ..records import PredictionRecord
from .base import Store

log = logging.getLogger("model_gateway.writer")

_STOP = object()
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
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=queue_size)
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
            self._metrics.log_queue_depth.set(self._queue.qsize())
            await asyncio.sleep(QUEUE_DEPTH_SAMPLE_SECONDS)

    def offer(self, record: PredictionRecord) -> bool:
        """Queue a record if there is room; else ``False`` under ``block`` (then `submit` it),
        ``True`` under ``drop`` (the record is counted as dropped).

        Not a coroutine: the hot path queues one record per request without one."""
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            if self._block:
                return False
            self._metrics.log_dropped.inc()
        return True

    async def submit(self, record: PredictionRecord) -> None:
        """Queue a record; under ``block`` wait for room, under ``drop`` count it and go on."""
        if not self.offer(record):
            await self._queue.put(record)

    async def close(self) -> None:
        """Write every queued record, then stop. Call after the server stopped taking requests."""
        if self._task is None:
            return
        self._close_deadline = time.monotonic() + self._close_timeout
        await self._queue.put(_STOP)
        await self._task
        self._task = None
        await cancel_and_wait(self._sampler)
        self._metrics.log_queue_depth.set(0)

    async def _run(self) -> None:
        while True:
            batch: list[PredictionRecord] = []
            item = await self._queue.get()
            stop = item is _STOP
            if not stop:
                batch.append(item)  # type: ignore[arg-type]
                if self._linger and self._queue.qsize() < self._batch_size:
                    await asyncio.sleep(self._linger)
                while len(batch) < self._batch_size:
                    try:
                        item = self._queue.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                    if item is _STOP:
                        stop = True
                        break
                    batch.append(item)  # type: ignore[arg-type]
            if batch:
                await self._write(batch)
            if stop and self._queue.empty():
                return
            if stop:
                # records queued behind the stop marker by requests that were still finishing
                await self._queue.put(_STOP)

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
