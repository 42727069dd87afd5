"""The batched writer: nothing lost under block, drops counted under drop, failures retried."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from model_gateway.metrics import Metrics
from model_gateway.records import PredictionRecord, new_prediction_id
from model_gateway.store.sqlite import SQLiteStore
from model_gateway.store.writer import RecordWriter

from .conftest import wait_until_async

# starts servers or processes, or simulates: not in make test-fast
pytestmark = pytest.mark.slow


def record(i: int) -> PredictionRecord:
    return PredictionRecord(
        prediction_id=new_prediction_id(),
        request_id=f"req-{i}",
        route="r",
        variant="a",
        model_name="m",
        configured_version="1",
        reported_version=None,
        assignment="random",
        routing_key=None,
        config_version="c",
        method="POST",
        path="/p",
        request_time=1.0,
        response_time=2.0,
        latency_ms=1000.0,
        status=200,
        error=None,
        request_body=None,
        response_body=None,
        request_truncated=False,
        response_truncated=False,
    )


class GatedStore(SQLiteStore):
    """A real SQLite store whose writes wait for a gate and can be made to fail."""

    def __init__(self, path: str, failures: int = 0) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.gate.set()
        self.failures = failures
        self.attempts = 0

    async def write_predictions(
        self, rows: Sequence[tuple[Any, ...]], *, replay: bool = False
    ) -> None:
        self.attempts += 1
        await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database is locked")
        await super().write_predictions(rows, replay=replay)


def stored_request_ids(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [row[0] for row in db.execute("SELECT request_id FROM predictions")]
    finally:
        db.close()


def sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(f"model_gateway_{name}")
    assert value is not None, name
    return value


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 300),
    queue_size=st.integers(1, 50),
    batch_size=st.integers(1, 64),
    producers=st.integers(1, 8),
    pauses=st.lists(st.booleans(), min_size=1, max_size=20),
)
def test_block_policy_loses_nothing(
    n: int, queue_size: int, batch_size: int, producers: int, pauses: list[bool]
) -> None:
    """Any interleaving of concurrent submitters and a close: every record written once."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "log.db"

        async def scenario() -> Metrics:
            store = SQLiteStore(str(path))
            await store.open()
            metrics = Metrics()
            writer = RecordWriter(
                store,
                metrics,
                queue_size=queue_size,
                batch_size=batch_size,
                overflow="block",
                write_retries=0,
            )
            writer.start()

            async def produce(start: int) -> None:
                for i in range(start, n, producers):
                    await writer.submit(record(i))
                    if pauses[i % len(pauses)]:
                        await asyncio.sleep(0)

            await asyncio.gather(*(produce(p) for p in range(producers)))
            await writer.close()
            await store.close()
            return metrics

        metrics = asyncio.run(scenario())
        assert sorted(stored_request_ids(path)) == sorted(f"req-{i}" for i in range(n))
        assert sample(metrics, "log_records_written_total") == n
        assert sample(metrics, "log_records_dropped_total") == 0


def test_drop_policy_counts_what_it_drops(tmp_path: Path) -> None:
    async def scenario() -> tuple[Metrics, GatedStore]:
        store = GatedStore(str(tmp_path / "log.db"))
        await store.open()
        store.gate.clear()  # the store stalls
        metrics = Metrics()
        writer = RecordWriter(
            store, metrics, queue_size=5, batch_size=100, overflow="drop", write_retries=0
        )
        writer.start()
        await writer.submit(record(0))
        await wait_until_async(lambda: store.attempts == 1, "the writer waiting on the store")
        for i in range(1, 20):
            await writer.submit(record(i))  # never waits
        assert writer.offer(record(20))  # dropped and counted: nothing left for the caller
        # bounded: the record in the write counts until the store has it, and 4 wait
        await wait_until_async(
            lambda: sample(metrics, "log_queue_depth") == 5, "the depth sampled at the bound"
        )
        store.gate.set()
        await writer.close()
        await store.close()
        return metrics, store

    metrics, _ = asyncio.run(scenario())
    assert len(stored_request_ids(tmp_path / "log.db")) == 5
    assert sample(metrics, "log_records_written_total") == 5
    assert sample(metrics, "log_records_dropped_total") == 16


async def full_blocking_writer(path: Path, batch_size: int) -> tuple[GatedStore, RecordWriter]:
    """A ``block`` writer with room for three records (the one in the write counts until the
    store has it), all taken, in front of a stalled store that holds the first record: the
    next ``submit`` must wait."""
    store = GatedStore(str(path))
    await store.open()
    store.gate.clear()
    writer = RecordWriter(
        store, Metrics(), queue_size=3, batch_size=batch_size, overflow="block", write_retries=0
    )
    writer.start()
    await writer.submit(record(0))
    await wait_until_async(lambda: store.attempts == 1, "the writer waiting on the store")
    for i in (1, 2):  # the queue is now full
        await writer.submit(record(i))
    return store, writer


def test_block_policy_makes_requests_wait(tmp_path: Path) -> None:
    async def scenario() -> None:
        store, writer = await full_blocking_writer(tmp_path / "log.db", batch_size=100)
        assert not writer.offer(record(99))  # no room, and not queued: the caller must wait
        blocked = asyncio.ensure_future(writer.submit(record(3)))
        # the request is queued for room, not written: wait on that, not on a clock
        await wait_until_async(lambda: len(writer._room) == 1, "the request to wait for room")
        assert not blocked.done()
        store.gate.set()
        await blocked
        await writer.close()
        await store.close()

    asyncio.run(scenario())
    assert len(stored_request_ids(tmp_path / "log.db")) == 4


@settings(max_examples=40, deadline=None)
@example(waiting=4, doomed={0, 1}, writes=1, turns=0)  # both given room, both gone
@given(
    waiting=st.integers(1, 10),
    doomed=st.sets(st.integers(0, 9)),
    writes=st.integers(1, 4),
    turns=st.integers(0, 2),
)
def test_block_policy_survives_cancelled_waiters(
    waiting: int, doomed: set[int], writes: int, turns: int
) -> None:
    """Requests waiting for room are cancelled (their clients went away) a few loop turns
    after the writer began its ``writes``-th write, the moment it made room: some before
    their turn, some after room was given to them but before they used it. Every other
    request still gets its record in, and nothing hangs."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "log.db"

        async def scenario() -> list[asyncio.Future[None]]:
            store, writer = await full_blocking_writer(path, batch_size=2)
            tasks = [asyncio.ensure_future(writer.submit(record(3 + i))) for i in range(waiting)]
            await wait_until_async(
                lambda: len(writer._room) == waiting, "every one of them to wait for room"
            )
            store.gate.set()
            while store.attempts <= writes and not all(task.done() for task in tasks):
                await asyncio.sleep(0)
            for _ in range(turns):
                await asyncio.sleep(0)
            for i, task in enumerate(tasks):
                if i in doomed:
                    task.cancel()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
            await asyncio.wait_for(writer.close(), 10)
            await store.close()
            return tasks

        tasks = asyncio.run(scenario())
        expected = {f"req-{i}" for i in range(3)}
        expected |= {f"req-{3 + i}" for i, task in enumerate(tasks) if not task.cancelled()}
        assert sorted(stored_request_ids(path)) == sorted(expected)


@pytest.mark.parametrize(("failures", "retries", "kept"), [(2, 3, 5), (4, 3, 0)])
def test_failing_writes_are_retried_then_counted(
    tmp_path: Path, failures: int, retries: int, kept: int
) -> None:
    async def scenario() -> Metrics:
        store = GatedStore(str(tmp_path / "log.db"), failures=failures)
        await store.open()
        store.gate.clear()
        metrics = Metrics()
        writer = RecordWriter(
            store, metrics, queue_size=10, batch_size=100, overflow="block", write_retries=retries
        )
        writer.start()
        for i in range(5):
            await writer.submit(record(i))
        await asyncio.sleep(0)
        store.gate.set()
        await writer.close()
        await store.close()
        return metrics

    metrics = asyncio.run(scenario())
    assert len(stored_request_ids(tmp_path / "log.db")) == kept
    assert sample(metrics, "log_records_written_total") == kept
    assert sample(metrics, "log_write_errors_total") == 5 - kept


class CountingStore(SQLiteStore):
    """A real SQLite store that remembers the size of every batch it was given."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.batches: list[int] = []

    async def write_predictions(
        self, rows: Sequence[tuple[Any, ...]], *, replay: bool = False
    ) -> None:
        self.batches.append(len(rows))
        await super().write_predictions(rows, replay=replay)


@pytest.mark.parametrize("linger", [0.0, 0.5])
def test_linger_gathers_records_that_find_the_writer_idle(tmp_path: Path, linger: float) -> None:
    """Ten records a few event-loop turns apart: with no linger each is written alone as it
    comes; lingering, the first waits and the rest join its batch. Nothing is lost either way."""

    async def scenario() -> list[int]:
        store = CountingStore(str(tmp_path / "log.db"))
        await store.open()
        writer = RecordWriter(
            store, Metrics(), queue_size=100, batch_size=100, overflow="block",
            write_retries=0, linger=linger,
        )  # fmt: skip
        writer.start()
        for i in range(10):
            await writer.submit(record(i))
            # long enough for an idle writer with no linger to write the record alone
            while linger == 0 and len(store.batches) <= i:
                await asyncio.sleep(0.001)
        await writer.close()
        await store.close()
        return store.batches

    batches = asyncio.run(scenario())
    assert sum(batches) == 10
    assert batches == ([1] * 10 if linger == 0 else [10])
    assert sorted(stored_request_ids(tmp_path / "log.db")) == sorted(f"req-{i}" for i in range(10))
