"""One suite, both stores: SQLite (a file) and PostgreSQL (a fresh schema per test).

PostgreSQL is the one at MODEL_GATEWAY_TEST_POSTGRES (default: 127.0.0.1:5432, database
``test``). It is required: these tests fail, never skip, when it cannot be reached.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_gateway.records import PredictionRecord, new_prediction_id
from model_gateway.rollouts import RolloutState
from model_gateway.store import Store, open_store
from model_gateway.store.base import (
    STORE_ERRORS,
    StoreOpenError,
    is_data_error,
    sqlite_path,
    store_location,
)
from model_gateway.store.schema import LATEST_VERSION, SchemaTooNewError

from .conftest import GatewayFactory, Upstream, route, wait_until
from .test_processes import child_pids

POSTGRES = os.environ.get(
    "MODEL_GATEWAY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    schema = f"mg_test_{uuid.uuid4().hex[:12]}"
    sep = "&" if "?" in POSTGRES else "?"
    yield f"{POSTGRES}{sep}schema={schema}"
    drop_schema(schema)


def drop_schema(schema: str) -> None:
    """Remove a test's PostgreSQL schema and everything in it."""

    async def drop() -> None:
        conn = await asyncpg.connect(POSTGRES)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


def record(
    i: int, *, route_name: str = "r", variant: str = "a", t: float = 1000.0
) -> PredictionRecord:
    return PredictionRecord(
        prediction_id=new_prediction_id(),
        request_id=f"req-{i}",
        route=route_name,
        variant=variant,
        model_name="m",
        configured_version="1",
        reported_version="1.1" if i % 2 else None,
        assignment="random",
        routing_key=None,
        config_version="c1",
        method="POST",
        path="/p",
        request_time=t + i,
        response_time=t + i + 0.01,
        latency_ms=10.0 + i,
        status=200,
        error=None,
        request_body=b"\x00\xffbody",
        response_body=None,
        request_truncated=False,
        response_truncated=True,
        predicted=str(i % 2),
        score=0.1 * (i % 10),
    )


def label_row(*fields: Any) -> tuple[Any, ...]:
    """A feedback row: (feedback id, prediction id, request id, label, label time, received
    at, source), from downstream, with no weight and no decision."""
    return (*fields, "downstream", None, None, None)


async def with_store(url: str, work: Any) -> Any:
    store: Store = open_store(url)
    await store.open()
    try:
        return await work(store)
    finally:
        await store.close()


def test_schema_records_configs_and_lookups(store_url: str) -> None:
    records = [record(i) for i in range(10)]

    async def work(store: Store) -> None:
        assert await store.schema_version() == LATEST_VERSION
        await store.write_predictions([r.as_row() for r in records])
        assert await store.count_predictions() == 10
        got = await store.get_prediction(records[3].prediction_id)
        assert got is not None
        assert got["request_body"] == b"\x00\xffbody"
        assert got["reported_version"] == "1.1" and got["response_truncated"] == 1
        assert await store.get_prediction("nope") is None
        # by the client's request id: the live predictions, latest first, at most limit
        again = record(3)
        await store.write_predictions([again.as_row()])
        both = [again.prediction_id, records[3].prediction_id]
        assert await store.predictions_of_request("req-3", 10) == both
        assert await store.predictions_of_request("req-3", 1) == both[:1]
        assert await store.predictions_of_request("req-none", 10) == []
        await store.record_config("v1", 100.0, "a.yaml", "routes: []")
        await store.record_config("v2", 200.0, "a.yaml", "routes: [x]")
        assert (await store.config_at(150.0))["version"] == "v1"  # type: ignore[index]
        assert (await store.config_at(200.0))["version"] == "v2"  # type: ignore[index]
        assert await store.config_at(50.0) is None

    asyncio.run(with_store(store_url, work))
    # opening again neither migrates nor loses anything
    assert asyncio.run(with_store(store_url, lambda s: s.count_predictions())) == 11


def test_batches_of_any_size_are_written_whole_and_exact(store_url: str) -> None:
    """Sizes around the multi-row statements' power-of-two chunks and past the largest one;
    a batch with a duplicate id is refused whole, so a retry cannot half-write it."""
    sizes = [1, 2, 3, 7, 64, 83, 1024, 1031]
    batches = [
        [record(i, t=1000.0 + 10_000 * n) for i in range(size)] for n, size in enumerate(sizes)
    ]

    async def work(store: Store) -> None:
        for batch in batches:
            await store.write_predictions([r.as_row() for r in batch])
        assert await store.count_predictions() == sum(sizes)
        for batch in batches:
            for sample in (batch[0], batch[len(batch) // 2], batch[-1]):
                got = await store.get_prediction(sample.prediction_id)
                assert got is not None
                assert got["request_time"] == sample.request_time
                assert got["latency_ms"] == sample.latency_ms
                assert got["score"] == sample.score
                assert bytes(got["request_body"]) == sample.request_body
        fresh = [record(i) for i in range(70)]
        with pytest.raises(Exception) as refused:
            await store.write_predictions([r.as_row() for r in [*fresh, batches[0][0]]])
        # the writer splits such a batch rather than retrying it whole
        assert is_data_error(refused.value), refused.value
        assert await store.count_predictions() == sum(sizes)

    asyncio.run(with_store(store_url, work))


def test_a_full_batch_of_the_default_size_is_one_sqlite_statement(tmp_path: Path) -> None:
    """The log process writes a batch in power-of-two multi-row statements, and the default
    batch size is one of them: under load, when batches are full, a batch is one INSERT and
    one commit. Other sizes take their power-of-two chunks."""
    import sqlite3

    from model_gateway.config import DEFAULT_BATCH_SIZE
    from model_gateway.records import COLUMNS
    from model_gateway.store.log_child import BatchWriter

    path = tmp_path / "log.db"
    asyncio.run(with_store(f"sqlite:///{path}", lambda s: s.count_predictions()))  # the schema

    def inserts_for(size: int, first: int) -> int:
        conn = sqlite3.connect(path)
        try:
            statements: list[str] = []
            conn.set_trace_callback(statements.append)
            BatchWriter(conn, list(COLUMNS)).write(
                [record(i).as_row() for i in range(first, first + size)], replay=False
            )
            conn.set_trace_callback(None)
            assert conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == first + size
            return sum(s.startswith("INSERT INTO predictions") for s in statements)
        finally:
            conn.close()

    assert inserts_for(DEFAULT_BATCH_SIZE, 0) == 1
    assert inserts_for(500, DEFAULT_BATCH_SIZE) == 6  # 256 + 128 + 64 + 32 + 16 + 4


def test_the_log_process_binds_none_and_bytes_through_identity_adapters() -> None:
    """The log process registers identity adapters for None and bytes, so that binding them
    hits sqlite3's adapter registry instead of missing (a raised and cleared AttributeError per
    value); the values must come out unchanged (the round trips above check the stored side)."""
    import sqlite3

    from model_gateway.store.log_child import register_adapters

    register_adapters()
    adapters = sqlite3.adapters
    body = b"\x00\xffbody"
    assert adapters[(type(None), sqlite3.PrepareProtocol)](None) is None
    assert adapters[(bytes, sqlite3.PrepareProtocol)](body) is body


def test_feedback_join_report_and_export(store_url: str) -> None:
    records = [record(i) for i in range(6)]

    async def work(store: Store) -> None:
        await store.write_predictions([r.as_row() for r in records[:4]])
        await store.insert_feedback(
            [
                label_row("f1", records[0].prediction_id, None, "1", 10.0, 10.0, "s"),
                label_row("f2", None, "req-1", "0", 10.0, 10.0, None),
                label_row(
                    "f3", records[0].prediction_id, None, "0", 20.0, 20.0, None
                ),  # supersedes f1
                label_row("f4", None, "req-5", "1", 10.0, 10.0, None),  # prediction not stored yet
            ]
        )
        joined = await store.join_feedback(30.0)
        assert sorted(j["feedback_id"] for j in joined) == ["f1", "f2", "f3"]
        assert [j["first"] for j in sorted(joined, key=lambda j: j["feedback_id"])] == [
            True,
            True,
            False,
        ]
        assert await store.join_feedback(31.0) == []  # nothing joins twice
        await store.write_predictions([r.as_row() for r in records[4:]])
        late = await store.join_feedback(40.0)
        assert [(j["feedback_id"], j["prediction_id"]) for j in late] == [
            ("f4", records[5].prediction_id)
        ]

        labels = [f["label"] for f in await store.feedback_for(records[0].prediction_id)]
        assert labels == ["1", "0"]
        rows = await store.report_rows("r", 0.0, 1e12)
        assert len(rows) == 6
        by_latency = {row["latency_ms"]: row["label"] for row in rows}
        assert by_latency[10.0] == "0" and by_latency[11.0] == "0" and by_latency[15.0] == "1"
        assert by_latency[12.0] is None
        assert await store.report_rows("r", 1003.0, 1005.0) == [
            row for row in rows if 1003.0 <= 1000.0 + row["latency_ms"] - 10.0 < 1005.0
        ]
        assert await store.count_rows("r", 0.0, 1e12) == 6
        assert await store.latest_rows("r", 0.0, 1e12, 2) == rows[-2:]
        labelled = await store.labelled_rows("r", 0.0, 1e12)
        assert labelled == [row for row in rows if row["label"] is not None]
        batches = [batch async for batch in store.iter_export("r", 0.0, 1e12, batch=4)]
        assert [len(b) for b in batches] == [4, 2]
        exported = [row["prediction_id"] for b in batches for row in b]
        assert exported == sorted(r.prediction_id for r in records)

    asyncio.run(with_store(store_url, work))


def test_gateway_logs_every_request_on_either_store(
    gateway: GatewayFactory, upstreams: dict[str, Upstream], store_url: str
) -> None:
    gw = gateway(
        [
            route(
                "fraud",
                "/v2/models/fraud",
                [("a", upstreams["a"].url, 1), ("b", upstreams["b"].url, 1)],
            )
        ],
        storage={"url": store_url},
    )
    ids = {}
    with httpx.Client() as client:
        for i in range(50):
            r = client.post(
                f"{gw.url}/v2/models/fraud/infer",
                json={"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [i]}]},
            )
            ids[r.headers["x-prediction-id"]] = r.headers["x-model-variant"]
    gw.stop()

    async def work(store: Store) -> dict[str, str]:
        assert len(await store.report_rows("fraud", 0.0, 1e12)) == 50
        assert await store.count_predictions() == 50
        return {pid: (await store.get_prediction(pid))["variant"] for pid in ids}  # type: ignore[index]

    assert asyncio.run(with_store(store_url, work)) == ids


def test_shadow_copies_share_the_live_label_and_never_take_a_request_id_join(
    store_url: str,
) -> None:
    """A shadow's record names its live prediction: the report gives it that prediction's
    label and answer, the audit view of the live prediction lists it, and a label keyed by
    the client's request id (which the copy carries too) joins the live prediction."""
    live = [record(i) for i in range(3)]
    copies = [
        PredictionRecord(
            **{
                **{f: getattr(r, f) for f in r.__dataclass_fields__},
                "prediction_id": new_prediction_id(),
                "variant": "s",
                "assignment": "shadow",
                "request_time": r.request_time + 0.5,  # the copy leaves after the live answer
                "predicted": "1",
                "shadow": True,
                "shadow_of": r.prediction_id,
            }
        )
        for r in live
    ]

    async def work(store: Store) -> None:
        await store.write_predictions([r.as_row() for r in [*live, *copies]])
        await store.insert_feedback(
            [
                label_row("f0", live[0].prediction_id, None, "1", 10.0, 10.0, None),
                label_row("f1", None, "req-1", "0", 10.0, 10.0, None),
            ]
        )
        joined = await store.join_feedback(30.0)
        assert {j["prediction_id"] for j in joined} == {
            live[0].prediction_id,
            live[1].prediction_id,
        }
        # each joined label comes with its prediction's copies, for their confusion counters
        for row in joined:
            (copy,) = row["shadows"]
            expected = copies[0] if row["prediction_id"] == live[0].prediction_id else copies[1]
            assert copy["prediction_id"] == expected.prediction_id
            version = expected.reported_version or expected.configured_version
            assert (copy["variant"], copy["model_version"], copy["predicted"]) == (
                "s",
                version,
                "1",
            )
        rows = await store.report_rows("r", 0.0, 10_000.0)
        assert len(rows) == 6
        live_answers = [r["live_predicted"] for r in rows if r["shadow"]]
        assert live_answers == [r.predicted for r in live]
        copy_labels = [r["label"] for r in rows if r["shadow"]]  # in request time order
        assert copy_labels == ["1", "0", None]
        assert all(r["live_predicted"] is None for r in rows if not r["shadow"])
        (copy,) = await store.shadows_of(live[2].prediction_id)
        assert copy["prediction_id"] == copies[2].prediction_id and copy["variant"] == "s"
        assert await store.shadows_of(copies[2].prediction_id) == []
        got = await store.get_prediction(copies[0].prediction_id)
        assert got is not None and got["shadow_of"] == live[0].prediction_id

    asyncio.run(with_store(store_url, work))


def test_a_store_that_cannot_be_opened_is_named_and_leaves_nothing_open(
    tmp_path: Path,
) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 300)
    # the password is there to be kept out of the message (the server trusts anyone)
    host = urlsplit(POSTGRES).netloc.rsplit("@", 1)[-1]
    database = f"no_such_database_{uuid.uuid4().hex[:8]}"
    cases = [(f"sqlite:///{garbage}", f"cannot open the SQLite store {garbage}: ")]
    for url in (
        f"postgresql://postgres:s3cret@{host}/{database}",
        f"postgresql://postgres@{host}/{database}?password=s3cret",
    ):
        cases.append((url, f"cannot open the PostgreSQL store {host}/{database}: "))

    async def fail_to_open(url: str) -> tuple[StoreOpenError, Store]:
        store = open_store(url)
        with pytest.raises(StoreOpenError) as failed:
            await store.open()
        return failed.value, store

    for url, message in cases:
        error, store = asyncio.run(fail_to_open(url))
        assert str(error).startswith(message), error
        assert "s3cret" not in str(error)
        assert isinstance(error.__cause__, STORE_ERRORS)
        # what the failed open had started is closed again: no aiosqlite thread, which is
        # not a daemon and would keep the process alive, no pool, no log process
        assert getattr(store, "_db", None) is None and getattr(store, "_pool", None) is None
        assert getattr(getattr(store, "_log", None), "_process", None) is None


@pytest.mark.slow
def test_an_open_cancelled_at_any_point_leaves_nothing_running(store_url: str) -> None:
    """1. A full open and close of the store is timed.
    2. Opens are cancelled after delays drawn across that time (and past it: then the open
       has finished, and the store is closed instead).
    3. After each, nothing the open started is left: no aiosqlite thread, no log process,
       no PostgreSQL connection; and the store opens again.
    """
    sqlite = store_url.startswith("sqlite")
    made = 0

    def next_url() -> str:
        # SQLite: a new file each time, so that the cancel can land in a migration too
        nonlocal made
        made += 1
        return store_url.replace("store.db", f"store{made}.db") if sqlite else store_url

    async def open_and_close(url: str) -> float:
        began = time.monotonic()
        await with_store(url, lambda store: asyncio.sleep(0))
        return time.monotonic() - began

    async def cancel_open(url: str, delay: float) -> None:
        store = open_store(url)
        opening = asyncio.create_task(store.open())
        await asyncio.sleep(delay)
        opening.cancel()
        try:
            await opening
        except asyncio.CancelledError:
            return
        await store.close()

    async def postgres_connections() -> int:
        conn = await asyncpg.connect(POSTGRES)
        try:
            # this one included
            found: int = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            )
            return found
        finally:
            await conn.close()

    threads = _lasting_threads()
    children = _log_processes()
    connections = asyncio.run(postgres_connections())
    full = asyncio.run(open_and_close(next_url()))

    @settings(max_examples=20, deadline=None)
    @given(fraction=st.floats(0, 1.2))
    def cancelled_at(fraction: float) -> None:
        url = next_url()
        asyncio.run(cancel_open(url, fraction * full))
        # aiosqlite's thread ends a moment after its close has returned
        wait_until(lambda: _lasting_threads() <= threads, "aiosqlite's thread to end", 5)
        wait_until(lambda: _log_processes() == children, "the log process to end", 5)
        if not sqlite:
            wait_until(
                lambda: asyncio.run(postgres_connections()) == connections,
                "the cancelled open's connections to close",
            )
        asyncio.run(open_and_close(url))

    cancelled_at()


def _lasting_threads() -> set[threading.Thread]:
    """Threads that keep the process alive (aiosqlite's is one); asyncio's daemon threads that
    wait for a child to exit are not."""
    return {thread for thread in threading.enumerate() if not thread.daemon}


def _log_processes() -> set[int]:
    """The log processes this process has running."""
    found = set()
    for pid in child_pids(os.getpid()):
        try:
            if b"log_child" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
        except OSError:
            continue  # gone meanwhile
    return found


def test_a_store_too_new_for_this_gateway_is_refused_and_closed(store_url: str) -> None:
    async def set_up_and_open() -> Store:
        first = open_store(store_url)
        await first.open()
        await first.close()
        future = open_store(store_url)
        # a later release's migration, as its own store would have recorded it
        if store_url.startswith("sqlite"):
            conn = sqlite3.connect(sqlite_path(store_url))
            conn.execute("INSERT INTO schema_version VALUES (?)", (LATEST_VERSION + 1,))
            conn.commit()
            conn.close()
        else:
            schema = store_url.rsplit("schema=", 1)[1]
            conn = await asyncpg.connect(POSTGRES)
            try:
                await conn.execute(
                    f'INSERT INTO "{schema}".schema_version VALUES ($1)', LATEST_VERSION + 1
                )
            finally:
                await conn.close()
        with pytest.raises(SchemaTooNewError):
            await future.open()
        return future

    store = asyncio.run(set_up_and_open())
    assert getattr(store, "_db", None) is None and getattr(store, "_pool", None) is None


def test_a_store_location_is_printed_without_credentials() -> None:
    assert store_location("sqlite:////var/lib/mg/log.db") == "/var/lib/mg/log.db"
    assert store_location("sqlite:///log.db") == "log.db"
    for url in (
        "postgresql://mg:s3cret@db.internal:5432/gateway",
        "postgresql://db.internal:5432/gateway?user=mg&password=s3cret",
        "postgres://mg@db.internal:5432/gateway?password=s3cret&schema=blue",
    ):
        assert store_location(url) == "db.internal:5432/gateway"


def test_a_rollout_has_one_decider_until_its_lease_runs_out(store_url: str) -> None:
    """The lease goes to one holder at a time, renewed by it, taken by another once it ran
    out; a decision is stored only by the holder, and only on the state it judged; an
    operator's action is stored whoever holds the lease."""
    row = RolloutState("r1", "fraud", "running", 0, 1.0, 1.0, 1.0, "started").as_row()

    async def work(store: Store) -> None:
        assert await store.begin_rollout(row) == row
        assert await store.begin_rollout({**row, "status": "paused"}) == row  # kept as it was
        assert await store.lease_rollout("r1", "A", 10.0, 20.0)
        assert not await store.lease_rollout("r1", "B", 15.0, 25.0)  # A's until 20
        assert await store.lease_rollout("r1", "A", 15.0, 25.0)  # renewed
        assert await store.lease_rollout("r1", "B", 26.0, 36.0)  # ran out: B's now
        moved = {**row, "status": "rolled_back", "updated_at": 30.0, "reason": "gate"}
        assert not await store.save_rollout(moved, "A", 1.0)  # A no longer holds it
        assert not await store.save_rollout(moved, "B", 2.0)  # not the state stored
        assert await store.save_rollout(moved, "B", 1.0)
        assert await store.save_rollout({**moved, "status": "paused", "updated_at": 31.0}, None)
        [stored] = await store.rollouts()
        assert (stored["status"], stored["reason"], stored["holder"]) == ("paused", "gate", "B")
        assert stored["updated_at"] == 31.0

    asyncio.run(with_store(store_url, work))
