"""The batched background writer between the hot path and the store.

Requests hand records to a bounded queue and never wait on the store. One task takes every
record waiting, writes them in one transaction, and repeats: batches grow by themselves when
the store is slower than the traffic (group commit). Before each write the writer lingers
(tens of milliseconds) for more records to join, unless a full batch already waits: light
traffic does not cost one transaction per request, and heavy traffic is written in full
batches, since each write costs the event loop a fixed price whatever its size.

The bound is on every record in memory: queued, being written (until the store took it), and
reserved. Under ``overflow: block`` a request reserves its record's place before it is
forwarded (:meth:`RecordWriter.admit`), and waits there while the queue is full, so a store
outage slows new requests rather than growing the process; past ``storage.block_timeout`` it
is answered 503 ``log_unavailable``. Under ``drop`` nothing waits: a record with no room is
dropped and counted.

A failed write is retried whole when the store was unavailable (a lost connection, a locked
file). One the store refused for what a row holds (:func:`~.base.is_data_error`) is split in
halves until the rows it refuses are alone; those go to the ``dead_letters`` table with the
store's reason, and the rest are written: one bad value cannot hold back the log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

from ..background import cancel_and_wait
from ..errors import LogUnavailableError
from ..features import features_text
from ..metrics import Metrics
from ..records import COLUMNS, PredictionRecord, new_prediction_id, storable_text
from .base import Store, is_data_error
from .spool import Spool

log = logging.getLogger("model_gateway.writer")

_RETRY_BASE_DELAY = 0.1
RETRY_MAX_DELAY = 2.0
#: how long shutdown keeps retrying a failing store before counting the rest as lost
DEFAULT_CLOSE_TIMEOUT = 10.0
QUEUE_DEPTH_SAMPLE_SECONDS = 0.5
#: how long a request waits for room in a full queue under ``block`` by default (Kafka's
#: producer waits ``max.block.ms``, 60 s, before it fails a send)
DEFAULT_BLOCK_TIMEOUT = 60.0
#: what a write given up on (retries or the close timeout spent) leaves: its rows are lost
_GIVEN_UP = Exception("given up")


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
        block_timeout: float = DEFAULT_BLOCK_TIMEOUT,
        spool: Spool | None = None,
    ) -> None:
        self._store = store
        #: durability answered: the spool to tell when its records are in the store
        self._spool = spool
        self._metrics = metrics
        # The queue: records waiting for the writer, oldest first. A list and futures rather
        # than an asyncio.Queue, whose put_nowait and get_nowait run about forty lines of
        # Python per record; here queueing is an append.
        self._waiting: list[PredictionRecord] = []
        self._capacity = queue_size
        #: places promised to requests in flight (block), whose records are not queued yet
        self._reserved = 0
        #: records taken for the write in progress, in memory until the store has them
        self._writing = 0
        #: the rows of the batch requests queued and being written: each is a record of the
        #: store's, and counts against the bound as one
        self._rows_waiting = 0
        self._rows_writing = 0
        #: set when the writer waits for a record
        self._wakeup: asyncio.Future[None] | None = None
        #: requests waiting for room under ``block``, first come first served
        self._room: deque[asyncio.Future[None]] = deque()
        self._closing = False
        self._batch_size = batch_size
        self._linger = linger
        self._block = overflow == "block"
        self._block_timeout = block_timeout
        self._retries = write_retries
        self._close_timeout = close_timeout
        self._close_deadline: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._sampler: asyncio.Task[None] | None = None
        metrics.log_queue_capacity.set(queue_size)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="model-gateway-record-writer")
        self._sampler = asyncio.create_task(self._sample_depth(), name="log-queue-depth")

    @property
    def in_memory(self) -> int:
        """Records queued, being written, or reserved, and the rows of the batches among
        them: what the bound ``queue_size`` holds. (A batch's rows count once the batch is
        queued: the bound can be passed by the rows of the batches answered while the queue
        was all but full, at most ``max_batch_rows`` each.)"""
        return (
            len(self._waiting)
            + self._writing
            + self._reserved
            + self._rows_waiting
            + self._rows_writing
        )

    async def _sample_depth(self) -> None:
        # A gauge set by a timer rather than a callback, which multiprocess mode cannot read.
        while True:
            self._metrics.log_queue_depth.set(self.in_memory)
            self._metrics.log_requests_waiting.set(len(self._room))
            await asyncio.sleep(QUEUE_DEPTH_SAMPLE_SECONDS)

    def admit(self) -> bool:
        """Reserve a place for the record of a request about to be forwarded; ``False`` under
        ``block`` when the queue is full (then await :meth:`wait_for_room`). Under ``drop``
        always ``True``, reserving nothing: a record with no room is dropped when offered.

        Not a coroutine: the hot path reserves once per request without one."""
        if not self._block:
            return True
        if self.in_memory >= self._capacity or self._room:
            return False  # full, or others came first
        self._reserved += 1
        return True

    async def wait_for_room(self) -> None:
        """Wait, first come first served, until a place is reserved for this request; raise
        :class:`LogUnavailableError` after the block timeout."""
        loop = asyncio.get_running_loop()
        room = loop.create_future()
        self._room.append(room)
        try:
            async with asyncio.timeout(self._block_timeout):
                await room
        except (TimeoutError, asyncio.CancelledError) as exc:
            if room.done() and not room.cancelled():
                self.release()  # the place reserved for it as it gave up goes to the next
            else:
                room.cancel()
            if isinstance(exc, TimeoutError):
                raise LogUnavailableError(
                    f"no room in the prediction log within {self._block_timeout:g} s"
                ) from None
            raise

    def release(self) -> None:
        """Give back a place :meth:`admit` reserved, for a request that makes no record."""
        if self._block:
            self._reserved -= 1
            self._give_room()

    def offer(self, record: PredictionRecord, *, reserved: bool = False) -> bool:
        """Queue a record; ``reserved``: its place was reserved by :meth:`admit`. Without a
        reservation, ``False`` under ``block`` when there is no room (then `submit` it), and
        ``True`` under ``drop`` (the record is counted as dropped).

        Not a coroutine: the hot path queues one record per request without one."""
        if reserved and self._block:
            self._reserved -= 1
        elif self.in_memory >= self._capacity:
            if self._block:
                return False
            self._metrics.log_dropped.inc()
            if self._spool is not None and record.spool_segment:
                # dropped by policy: the spool keeps it no longer either
                self._spool.done([record.spool_segment])
            return True
        self._waiting.append(record)
        if record.batch_rows:
            self._rows_waiting += len(record.batch_rows)
        self._wake_writer()
        return True

    def force(self, record: PredictionRecord) -> None:
        """Queue a record past the bound: for a request that a stop running out of time cut
        off while it waited for room. The writer writes it before it closes."""
        self._waiting.append(record)
        if record.batch_rows:
            self._rows_waiting += len(record.batch_rows)
        self._wake_writer()

    async def submit(self, record: PredictionRecord) -> None:
        """Queue a record that has no reserved place; under ``block`` wait for room, under
        ``drop`` count it and go on."""
        if not self.offer(record):
            await self.wait_for_room()
            self.offer(record, reserved=True)

    def _wake_writer(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            if not wakeup.done():
                wakeup.set_result(None)

    def _give_room(self) -> None:
        """Reserve the places free for the requests waiting for room, oldest first, and wake
        them."""
        while self._room and self.in_memory < self._capacity:
            room = self._room.popleft()
            if not room.done():  # else it gave up while waiting
                self._reserved += 1
                room.set_result(None)

    def _take(self) -> list[PredictionRecord]:
        """The oldest records, up to a batch, out of the queue."""
        waiting = self._waiting
        if len(waiting) <= self._batch_size:
            batch, self._waiting = waiting, []
        else:
            batch = waiting[: self._batch_size]
            del waiting[: self._batch_size]
        self._writing = len(batch)
        rows = sum(len(r.batch_rows) for r in batch if r.batch_rows)
        self._rows_waiting -= rows
        self._rows_writing = rows
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
        self._metrics.log_requests_waiting.set(0)

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
            batch = self._take()
            lost: set[str] | None = None
            try:
                lost = await self._write(batch)
            except Exception:
                # a fault of the writer's own (never the store's, which _write handles): the
                # batch is counted lost, and the log goes on with the next
                log.exception("writing %d prediction records failed", len(batch))
                self._metrics.log_write_errors.inc(len(batch))
                self._metrics.background_errors.labels("record-writer").inc()
            finally:
                # their places are free only once the store has them
                self._writing = 0
                self._rows_writing = 0
                self._give_room()
                if self._spool is not None and lost is not None:
                    # the spool lets go of what the store has; what was lost stays there,
                    # for the next start to write
                    self._spool.done(
                        [
                            r.spool_segment
                            for r in batch
                            if r.spool_segment and r.prediction_id not in lost
                        ]
                    )

    async def _write(self, batch: list[PredictionRecord], *, replay: bool = False) -> set[str]:
        """Write a batch; the prediction ids of the records lost (given up on)."""
        escaped = 0
        for record in batch:
            escaped += record.make_storable()
        if escaped:
            self._metrics.log_escaped.inc(escaped)
        lost: set[str] = set()
        rows: list[tuple[Any, ...]] = []
        for record in batch:
            if record.batch_rows:
                rows.extend(record.as_rows())  # a batch: its rows are records of their own
            else:
                rows.append(record.as_row())
        await self._write_rows(rows, replay=replay, lost=lost)
        return lost

    async def replay(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Write rows recovered from the spool (those already stored are skipped), before
        the gateway serves."""
        for start in range(0, len(rows), self._batch_size):
            chunk = rows[start : start + self._batch_size]
            await self._write([PredictionRecord.from_row(row) for row in chunk], replay=True)

    async def _write_rows(
        self, rows: Sequence[tuple[Any, ...]], *, replay: bool, lost: set[str]
    ) -> None:
        """Write ``rows``; those the store refuses for their values end in ``dead_letters``,
        and the ids of those given up on are added to ``lost``."""
        error = await self._write_retrying(rows, replay=replay)
        if error is None:
            return
        if error is _GIVEN_UP:
            lost.update(str(row[0]) for row in rows)
            return
        if len(rows) == 1:
            if not await self._dead_letter(rows[0], error):
                lost.add(str(rows[0][0]))
            return
        middle = len(rows) // 2
        # a half may have been committed by an attempt whose answer was lost: replay
        await self._write_rows(rows[:middle], replay=True, lost=lost)
        await self._write_rows(rows[middle:], replay=True, lost=lost)

    async def _write_retrying(
        self, rows: Sequence[tuple[Any, ...]], *, replay: bool
    ) -> Exception | None:
        """Write ``rows``, retrying while the store is unavailable; ``None`` once written,
        :data:`_GIVEN_UP` when given up on (counted lost), else the error with which the
        store refused them for their values (nothing of them written)."""
        attempt = 0
        while True:
            try:
                await self._store.write_predictions(rows, replay=replay or attempt > 0)
            except Exception as exc:
                if is_data_error(exc):
                    return exc
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
                    return _GIVEN_UP
                # one line per failure, not a traceback per retry while a store is down
                log.warning("writing %d records failed (attempt %d): %s", len(rows), attempt, exc)
                await asyncio.sleep(min(_RETRY_BASE_DELAY * 2 ** (attempt - 1), RETRY_MAX_DELAY))
            else:
                self._metrics.log_written.inc(len(rows))
                return None

    async def _dead_letter(self, row: tuple[Any, ...], error: Exception) -> bool:
        """Keep a row the store refused in ``dead_letters``, with the store's reason; False
        when that failed too (the row is lost)."""
        reason = storable_text(f"{type(error).__name__}: {error}")
        letter = (
            new_prediction_id(),
            "prediction",
            storable_text(str(row[0])),
            time.time(),
            reason,
            dead_letter_text(row),
        )
        attempt = 0
        while True:
            try:
                await self._store.write_dead_letters([letter])
            except Exception as exc:
                attempt += 1
                self._metrics.log_write_failures.inc()
                if is_data_error(exc) or self._gives_up(attempt):
                    log.error("prediction record %s lost: %s; then %s", letter[2], reason, exc)
                    self._metrics.log_write_errors.inc()
                    return False
                log.warning("keeping a dead letter failed (attempt %d): %s", attempt, exc)
                await asyncio.sleep(min(_RETRY_BASE_DELAY * 2 ** (attempt - 1), RETRY_MAX_DELAY))
            else:
                log.error(
                    "prediction record %s refused by the store, kept in dead_letters: %s",
                    letter[2],
                    reason,
                )
                self._metrics.log_dead_lettered.inc()
                return True

    def _gives_up(self, attempt: int) -> bool:
        if self._retries is not None and attempt > self._retries:
            return True
        # shutting down with the store still failing: keep trying only so long
        return self._close_deadline is not None and time.monotonic() > self._close_deadline


def dead_letter_text(row: Sequence[Any]) -> str:
    """A refused record as JSON text of ASCII only (every store keeps it): its columns by
    name, bytes as ``{"base64": ...}``, NUL and unpaired surrogates as ``\\u`` escapes."""

    def bytes_as_base64(value: object) -> object:
        if isinstance(value, bytes | bytearray):
            return {"base64": base64.b64encode(value).decode()}
        return repr(value)

    named = dict(zip(COLUMNS, row, strict=False))
    # the features as the store would have kept them: read, never the request's body
    named["features"] = features_text(named.get("features"))
    return json.dumps(named, default=bytes_as_base64)
