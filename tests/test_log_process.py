"""The SQLite store's log process: a real child process on a real SQLite file.

What must hold: a batch is stored whole when ``write`` returns and not at all when it raises
the SQLite error the process sent back; a process that dies is replaced by the next write; a
batch that got no answer is sent again without failing on the rows it may already have stored;
a Ctrl+C meant for the gateway does not stop the process under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from model_gateway.records import COLUMNS
from model_gateway.store.base import StoreDataError
from model_gateway.store.log_child import BatchWriter
from model_gateway.store.log_process import LogProcess, LogProcessError
from model_gateway.store.sqlite import SQLiteStore

from .test_store import record, with_store


def rows(first: int, count: int) -> list[tuple[object, ...]]:
    return [record(i).as_row() for i in range(first, first + count)]


def stored_ids(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT prediction_id FROM predictions")]
    finally:
        conn.close()


@contextlib.asynccontextmanager
async def opened(path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(str(path))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def log_of(store: SQLiteStore) -> LogProcess:
    return store._log


def test_a_batch_is_stored_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    first, second = rows(0, 300), rows(300, 40)

    async def work() -> None:
        async with opened(path) as store:
            await store.write_predictions(first)
            # one row already stored: the whole batch is refused, with the process's error,
            # as an error of the rows' values (the writer splits such a batch)
            with pytest.raises(StoreDataError, match="IntegrityError: UNIQUE"):
                await store.write_predictions([*second, first[0]])
            await store.write_predictions(second)

    asyncio.run(work())
    assert sorted(stored_ids(path)) == sorted(str(r[0]) for r in [*first, *second])


def test_a_process_that_died_is_replaced_by_the_next_write(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    batches = [rows(0, 10), rows(10, 10)]

    async def work() -> None:
        async with opened(path) as store:
            await store.write_predictions(batches[0])
            old = log_of(store).pid
            assert old is not None
            os.kill(old, signal.SIGKILL)
            # the death shows on the next write, which fails: the writer retries it
            with pytest.raises(LogProcessError):
                await store.write_predictions(batches[1])
            await store.write_predictions(batches[1])
            assert log_of(store).pid not in (None, old)

    asyncio.run(work())
    assert len(stored_ids(path)) == 20


def test_a_batch_left_without_an_answer_is_sent_again_without_duplicate_errors(
    tmp_path: Path,
) -> None:
    """A write cancelled while the process is stopped: the process is replaced, and the next
    write may repeat rows that were stored, so it skips them instead of failing."""
    path = tmp_path / "log.db"
    stored, pending = rows(0, 5), rows(5, 5)

    async def work() -> None:
        async with opened(path) as store:
            await store.write_predictions(stored)
            pid = log_of(store).pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)  # it will never answer this batch
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(store.write_predictions(pending), 0.5)
            # with rows already stored: a plain write would fail on their ids
            await store.write_predictions([*stored, *pending])
            # answered: the next batch is plain again, and a stored id fails it
            with pytest.raises(StoreDataError, match="IntegrityError"):
                await store.write_predictions(stored[:1])

    asyncio.run(work())
    assert sorted(stored_ids(path)) == sorted(str(r[0]) for r in [*stored, *pending])


def test_replayed_rows_already_stored_are_skipped_and_new_ones_stored(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    asyncio.run(with_store(f"sqlite:///{path}", lambda s: s.count_predictions()))  # the schema
    conn = sqlite3.connect(path)
    try:
        writer = BatchWriter(conn, list(COLUMNS))
        first = rows(0, 3)
        writer.write(first, replay=False)
        writer.write([*first, *rows(3, 2)], replay=True)
        with pytest.raises(sqlite3.IntegrityError):
            writer.write(first[:1], replay=False)
        assert conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 5
    finally:
        conn.close()


def test_ctrl_c_for_the_gateway_does_not_stop_the_log_process(tmp_path: Path) -> None:
    """SIGINT and SIGTERM reach the whole process group; the log process must outlive them
    so that the gateway can hand it the records it flushes while it shuts down."""
    path = tmp_path / "log.db"

    async def work() -> int | None:
        async with opened(path) as store:
            process = log_of(store)._process
            assert process is not None
            os.kill(process.pid, signal.SIGINT)
            os.kill(process.pid, signal.SIGTERM)
            await store.write_predictions(rows(0, 7))
            assert process.returncode is None
        return process.returncode  # it exits once its pipe closes, and cleanly

    assert asyncio.run(work()) == 0
    assert len(stored_ids(path)) == 7


def test_a_log_process_that_cannot_open_the_file_fails_the_start(tmp_path: Path) -> None:
    log = LogProcess(str(tmp_path / "missing-dir" / "log.db"), COLUMNS)
    with pytest.raises(LogProcessError, match="could not open"):
        asyncio.run(log.start())


def test_a_batch_the_process_cannot_bind_is_refused_and_the_process_goes_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.db"
    good = rows(0, 3)
    at = COLUMNS.index("error")  # a text column that cannot take a dict
    bad = [*rows(3, 2), (*good[0][:at], {"not": "bindable"}, *good[0][at + 1 :])]

    async def work() -> None:
        async with opened(path) as store:
            pid = log_of(store).pid
            with pytest.raises(StoreDataError, match="binding"):
                await store.write_predictions(bad)
            await store.write_predictions(good)
            assert log_of(store).pid == pid

    asyncio.run(work())
    assert sorted(stored_ids(path)) == sorted(str(r[0]) for r in good)
