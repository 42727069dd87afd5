"""``storage.durability: answered``: a record is on local disk (the spool) before its answer
leaves, so ``kill -9`` under load loses no record of an answered request; the next start
writes what the spool holds. ``buffered`` mode, run the same way, shows what it loses."""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import uuid
from pathlib import Path

import orjson
import pytest
import yaml

from model_gateway.metrics import Metrics
from model_gateway.store import Store
from model_gateway.store.spool import ENTRY_HEADER, SUFFIX, Spool, read_segment
from model_gateway.store.writer import RecordWriter

from .conftest import Upstream, wait_until_async
from .test_processes import INFER, GatewayProcess
from .test_store import POSTGRES, drop_schema, record, with_store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

INFER_BYTES = orjson.dumps(INFER)
REQUEST = (
    b"POST /v2/models/fraud/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(INFER_BYTES), INFER_BYTES)
)


def write_config(tmp_path: Path, upstream: Upstream, durability: str) -> tuple[Path, Path]:
    db = tmp_path / "log.db"
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                # a long linger: at any moment a second of answered records is not yet
                # written, which is what a kill takes with it in buffered mode
                "storage": {
                    "url": f"sqlite:///{db}",
                    "linger": 1.0,
                    "durability": durability,
                    "spool_path": str(tmp_path / "spool"),
                },
                "server": {"config_poll_interval": 0},
                "routes": [
                    {
                        "name": "fraud",
                        "path": "/v2/models/fraud",
                        "variants": [{"name": "a", "url": upstream.url, "model_version": "1"}],
                    }
                ],
            }
        )
    )
    return config, db


def load_until_killed(gw: GatewayProcess, answers: int) -> list[str]:
    """32 keep-alive clients send requests back to back; once ``answers`` have come the
    process is killed (SIGKILL). The ids of the answers received whole."""
    host, port = gw.url.removeprefix("http://").split(":")
    answered: list[str] = []

    async def client() -> None:
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            return
        try:
            while True:
                writer.write(REQUEST)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                answered.append(re.search(rb"x-prediction-id: ([\w-]+)", head).group(1).decode())  # type: ignore[union-attr]
        except (OSError, asyncio.IncompleteReadError):
            return  # the process is gone
        finally:
            writer.close()

    async def run() -> None:
        clients = [asyncio.ensure_future(client()) for _ in range(32)]
        while len(answered) < answers:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(gw.terminate_and_wait, signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*clients), 30)

    asyncio.run(run())
    return answered


def stored_ids(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {r[0] for r in conn.execute("SELECT prediction_id FROM predictions")}
    finally:
        conn.close()


@pytest.mark.parametrize("durability", ["answered", "buffered"])
def test_kill_9_under_load_loses_no_answered_record_with_the_spool(
    tmp_path: Path, upstreams: dict[str, Upstream], durability: str
) -> None:
    """Three rounds of: start, load at 32 connections, kill -9. Then one more start, which
    writes what the spool holds, and a graceful stop. With ``answered``, every answer a
    client received is in the store, and no record twice."""
    config, db = write_config(tmp_path, upstreams["a"], durability)
    answered: list[str] = []
    for _ in range(3):
        answered += load_until_killed(GatewayProcess(config), len(answered) // 3 + 1000)
    last = GatewayProcess(config)  # replays the spool before it serves
    last.terminate_and_wait()
    stored = stored_ids(db)
    lost = set(answered) - stored
    replayed = sum(line.count("records left in the spool") for line in last.lines)
    print(
        f"\n{durability}: answered {len(answered)}, stored {len(stored)}, lost {len(lost)}, "
        f"replay at the last start: {replayed}"
    )
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT COUNT(*), COUNT(DISTINCT prediction_id) FROM predictions")
    total, distinct = rows.fetchone()
    conn.close()
    assert total == distinct
    if durability == "answered":
        assert lost == set()
        assert not list((tmp_path / "spool").glob(f"*{SUFFIX}"))  # all of it in the store


def test_a_torn_last_entry_is_skipped_and_the_rest_replayed(tmp_path: Path) -> None:
    """A crash mid-write leaves the last entry short, or damaged: reading stops there (its
    flush never finished, so its answer never left)."""
    spool_dir = tmp_path / "spool"

    async def write() -> None:
        spool = Spool(spool_dir)
        assert spool.recover() == []
        spool.start()
        for i in range(5):
            await spool.append(record(i).as_row())
        # as a kill would: no close, the segment stays with its records pending
        spool._flusher.cancel()  # type: ignore[union-attr]
        for segment in spool._segments.values():
            segment.keep()

    asyncio.run(write())
    (segment,) = spool_dir.glob(f"*{SUFFIX}")
    data = segment.read_bytes()
    segment.write_bytes(data + ENTRY_HEADER.pack(100, 0) + b"short")
    with segment.open("rb") as handle:
        rows = read_segment(handle)
    assert [row[1] for row in rows] == [f"req-{i}" for i in range(5)]
    damaged = bytearray(data)
    damaged[-1] ^= 0xFF
    segment.write_bytes(bytes(damaged))
    with segment.open("rb") as handle:
        assert len(read_segment(handle)) == 4


def test_a_segment_a_live_process_holds_is_not_taken(tmp_path: Path) -> None:
    """A segment with records that another process holds locked is left to it; once the
    lock goes (the process died), the next start takes it, writes it and deletes it."""
    spool_dir = tmp_path / "spool"

    async def hold() -> Spool:
        spool = Spool(spool_dir)
        spool.recover()
        spool.start()
        await spool.append(record(1).as_row())
        spool._flusher.cancel()  # type: ignore[union-attr]
        return spool

    holder = asyncio.run(hold())
    other = Spool(spool_dir)
    assert other.recover() == []
    other.forget_recovered()
    assert len(list(spool_dir.glob(f"*{SUFFIX}"))) == 1
    for segment in holder._segments.values():
        segment.keep()  # as its process dies: the lock goes, the file stays
    after = Spool(spool_dir)
    assert [row[1] for row in after.recover()] == ["req-1"]
    after.forget_recovered()
    assert list(spool_dir.glob(f"*{SUFFIX}")) == []


def test_records_the_store_never_got_stay_in_the_spool(tmp_path: Path) -> None:
    """A write given up on (here PostgreSQL's pool closed under the writer, no retries) leaves
    its records in the spool, with the segment they share, for the next start."""
    spool_dir = tmp_path / "spool"
    schema = f"mg_spool_{uuid.uuid4().hex[:12]}"
    store_url = f"{POSTGRES}?schema={schema}"

    async def work(store: Store) -> None:
        spool = Spool(spool_dir)
        spool.recover()
        spool.start()
        writer = RecordWriter(
            store,
            Metrics(),
            queue_size=100,
            batch_size=10,
            overflow="block",
            write_retries=0,
            spool=spool,
        )
        writer.start()
        item = record(1)
        item.spool_segment = await spool.append(item.as_row())
        writer.offer(item)
        await wait_until_async(lambda: writer.in_memory == 0, "the first record written")
        await store.close()  # from here on every write fails
        for i in (2, 3):
            item = record(i)
            item.spool_segment = await spool.append(item.as_row())
            writer.offer(item)
        await writer.close()
        await spool.close()
        await store.open()

    try:
        asyncio.run(with_store(store_url, work))
    finally:
        drop_schema(schema)
    next_start = Spool(spool_dir)
    left = next_start.recover()
    next_start.forget_recovered()
    assert sorted(row[1] for row in left) == ["req-1", "req-2", "req-3"]  # one segment


def test_segments_go_once_their_records_are_in_the_store(tmp_path: Path) -> None:
    """Through the writer: a record appended to the spool and then written to the store is
    released; a closed segment with nothing pending is deleted, and close leaves no file."""
    url = f"sqlite:///{tmp_path / 'log.db'}"
    spool_dir = tmp_path / "spool"

    async def work(store: Store) -> list[Path]:
        spool = Spool(spool_dir)
        spool.recover()
        spool.start()
        writer = RecordWriter(
            store,
            Metrics(),
            queue_size=100,
            batch_size=10,
            overflow="block",
            write_retries=None,
            spool=spool,
        )
        writer.start()
        for i in range(30):
            item = record(i)
            item.spool_segment = await spool.append(item.as_row())
            assert writer.offer(item)
        await writer.close()
        left = list(spool_dir.glob(f"*{SUFFIX}"))
        await spool.close()
        return left

    left: list[Path] = asyncio.run(with_store(url, work))
    assert len(left) == 1  # the current segment, still open for appends
    assert not list(spool_dir.glob(f"*{SUFFIX}"))
    conn = sqlite3.connect(tmp_path / "log.db")
    assert conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 30
    conn.close()
