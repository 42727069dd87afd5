"""The embedded default store: one SQLite file in WAL mode; the prediction log is written in
batches by a process of its own (:mod:`.log_process`), everything else through aiosqlite."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiosqlite

from ..records import COLUMNS
from .base import ROLLOUT_COLUMNS, STORE_ERRORS, StoreOpenError, attach_shadows
from .log_process import LogProcess
from .queries import (
    BEGIN_ROLLOUT,
    CLAIM,
    COUNT_ROWS,
    DELETE_REFERENCE,
    DELIVERY_ROWS,
    DELIVERY_RUNS,
    EXPORT_ROWS,
    LABELLED_ROWS,
    LATEST_ROWS,
    LEASE_DELIVERY,
    LEASE_ROLLOUT,
    MARK_DELIVERED,
    MONITORED_COUNT,
    MONITORED_ROWS,
    NEXT_DELIVERY,
    PENDING_JOINS,
    PREDICTIONS_OF_REQUEST,
    REFERENCE_COLUMNS,
    REFERENCES,
    REPORT_ROWS,
    ROLLOUT_BY_ID,
    ROLLOUT_SAVED,
    ROLLOUTS,
    SAVE_DELIVERY,
    SAVE_HELD_ROLLOUT,
    SAVE_REFERENCE,
    SAVE_ROLLOUT,
    SHADOWS_OF,
    SHADOWS_OF_JOINED,
    UNCLAIMED,
)
from .schema import LATEST_VERSION, MIGRATIONS, SchemaTooNewError

_PENDING_JOINS = PENDING_JOINS.replace("%s", "?")
_CLAIM = CLAIM.replace("%s", "?")
_UNCLAIMED = UNCLAIMED.replace("%s", "?")
_DELIVERY_ROWS = DELIVERY_ROWS.replace("%s", "?")
_LEASE_DELIVERY = LEASE_DELIVERY.replace("%s", "?")
_DELIVERY_RUNS = DELIVERY_RUNS.replace("%s", "?")
_MARK_DELIVERED = MARK_DELIVERED.replace("%s", "?")
_NEXT_DELIVERY = NEXT_DELIVERY.replace("%s", "?")
_SAVE_DELIVERY = SAVE_DELIVERY.replace("%s", "?")
_MONITORED_COUNT = MONITORED_COUNT.replace("%s", "?")
_MONITORED_ROWS = MONITORED_ROWS.format(collate="").replace("%s", "?")
_REFERENCES = REFERENCES.replace("%s", "?")
_SAVE_REFERENCE = SAVE_REFERENCE.replace("%s", "?")
_DELETE_REFERENCE = DELETE_REFERENCE.replace("%s", "?")
_REPORT_ROWS = REPORT_ROWS.replace("%s", "?")
_LATEST_ROWS = LATEST_ROWS.replace("%s", "?")
_LABELLED_ROWS = LABELLED_ROWS.replace("%s", "?")
_EXPORT_ROWS = EXPORT_ROWS.replace("%s", "?")
_COUNT_ROWS = COUNT_ROWS.replace("%s", "?")
_ROLLOUT_BY_ID = ROLLOUT_BY_ID.replace("%s", "?")
_BEGIN_ROLLOUT = BEGIN_ROLLOUT.replace("%s", "?")
_SAVE_ROLLOUT = SAVE_ROLLOUT.replace("%s", "?")
_SAVE_HELD_ROLLOUT = SAVE_HELD_ROLLOUT.replace("%s", "?")
_LEASE_ROLLOUT = LEASE_ROLLOUT.replace("%s", "?")
_SHADOWS_OF = SHADOWS_OF.replace("%s", "?")
_PREDICTIONS_OF_REQUEST = PREDICTIONS_OF_REQUEST.replace("%s", "?")
_SHADOWS_OF_JOINED = SHADOWS_OF_JOINED.replace("%s", "?")

_INSERT_FEEDBACK = (
    "INSERT INTO feedback (feedback_id, prediction_id, request_id, label, label_time, "
    "received_at, source, origin, inclusion_probability, outcome, value) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


_INSERT_DEAD_LETTER = (
    "INSERT INTO dead_letters (dead_letter_id, kind, prediction_id, failed_at, error, record) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)


class SQLiteStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._log = LogProcess(path, COLUMNS)
        self._using = asyncio.Lock()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    # The connection is used by one coroutine at a time, each use whole (a query executed and
    # read in one call). Interleaved, a transaction would commit or roll back another's
    # statements (a failed insert rolling back labels another request was told were kept),
    # a query left half read would hold a snapshot that makes the next write fail at once
    # ("database is locked" while the log process writes), and under load sqlite3 refused
    # the interleaving outright (InterfaceError: API misuse).

    async def _fetch(self, query: str, params: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        """A query's rows, read whole."""
        async with self._using:
            return list(await self.db.execute_fetchall(query, params))

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection for one transaction, committed at the end (rolled back on error);
        inside it, queries are read with ``execute_fetchall``."""
        async with self._using:
            try:
                yield self.db
                await self.db.commit()
            except BaseException:
                await self.db.rollback()
                raise

    async def open(self) -> None:
        connection = aiosqlite.connect(self.path)
        try:
            self._db = await connection
            self._db.row_factory = aiosqlite.Row
            # WAL lets readers (admin, CLI, other workers) run beside the writer; NORMAL sync
            # is durable across process crashes, which is the failure this log must survive.
            await self.db.execute("PRAGMA journal_mode=WAL")
            await self.db.execute("PRAGMA synchronous=NORMAL")
            await self.db.execute("PRAGMA busy_timeout=10000")
            await self._migrate()
            await self._log.start()
        except BaseException as exc:
            # aiosqlite's thread is not a daemon: a connection left open would keep the
            # process alive after the error, a gateway that never exits
            await self.close()
            # and a failed connect stops the thread without waiting for it: the thread would
            # then answer a loop that may be closed by then (a traceback on stderr)
            thread: threading.Thread | None = getattr(connection, "_thread", None)
            if thread is not None and thread.is_alive():
                await asyncio.to_thread(thread.join, 5)
            if isinstance(exc, STORE_ERRORS):
                raise StoreOpenError(f"cannot open the SQLite store {self.path}: {exc}") from exc
            raise

    async def close(self) -> None:
        await self._log.close()
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def schema_version(self) -> int:
        await self.db.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
        )
        async with self.db.execute("SELECT MAX(version) FROM schema_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    async def _migrate(self) -> None:
        # BEGIN IMMEDIATE takes the write lock first, so two workers starting together
        # cannot both apply the same migration.
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            current = await self.schema_version()
            if current > LATEST_VERSION:
                raise SchemaTooNewError(current)
            for version in range(current + 1, LATEST_VERSION + 1):
                for statement in MIGRATIONS[version - 1]:
                    await self.db.execute(statement.format(blob="BLOB"))
                await self.db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            await self.db.commit()
        except BaseException:
            await self.db.rollback()
            raise

    async def write_predictions(
        self, rows: Sequence[tuple[Any, ...]], *, replay: bool = False
    ) -> None:
        await self._log.write(rows, replay=replay)

    async def write_dead_letters(self, rows: Sequence[tuple[Any, ...]]) -> None:
        async with self._transaction() as db:
            await db.executemany(_INSERT_DEAD_LETTER, rows)

    async def list_dead_letters(self, limit: int) -> list[dict[str, Any]]:
        rows = await self._fetch(
            "SELECT * FROM dead_letters ORDER BY failed_at DESC LIMIT ?", (limit,)
        )
        return [dict(row) for row in rows]

    async def record_config(
        self, version: str, activated_at: float, source: str, text: str
    ) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO configs (version, activated_at, source, text) VALUES (?, ?, ?, ?)",
                (version, activated_at, source, text),
            )

    async def rollouts(self) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._fetch(ROLLOUTS)]

    async def begin_rollout(self, row: dict[str, Any]) -> dict[str, Any]:
        async with self._transaction() as db:
            await db.execute(_BEGIN_ROLLOUT, tuple(row[c] for c in ROLLOUT_COLUMNS))
        stored = await self._fetch(_ROLLOUT_BY_ID, (row["id"],))
        return dict(stored[0])

    async def save_rollout(
        self, row: dict[str, Any], holder: str | None, judged_at: float | None = None
    ) -> bool:
        values = [row[c] for c in ROLLOUT_SAVED] + [row["id"]]
        async with self._transaction() as db:
            if holder is None:
                cursor = await db.execute(_SAVE_ROLLOUT, values)
            else:
                cursor = await db.execute(_SAVE_HELD_ROLLOUT, [*values, holder, judged_at])
            saved = cursor.rowcount == 1
            await cursor.close()
        return saved

    async def lease_rollout(self, rollout_id: str, holder: str, now: float, until: float) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute(_LEASE_ROLLOUT, (holder, until, rollout_id, holder, now))
            leased = cursor.rowcount == 1
            await cursor.close()
        return leased

    async def config_at(self, at: float) -> dict[str, Any] | None:
        rows = await self._fetch(
            "SELECT version, activated_at, source, text FROM configs WHERE activated_at <= ? "
            "ORDER BY activated_at DESC LIMIT 1",
            (at,),
        )
        return dict(rows[0]) if rows else None

    async def config_texts(self, versions: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        unique = list(dict.fromkeys(versions))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            query = f"SELECT version, text FROM configs WHERE version IN ({marks})"  # noqa: S608
            found.update((row[0], row[1]) for row in await self._fetch(query, chunk))
        return found

    async def insert_feedback(self, rows: Sequence[tuple[Any, ...]]) -> None:
        async with self._transaction() as db:
            await db.executemany(_INSERT_FEEDBACK, rows)

    async def join_feedback(self, now: float) -> list[dict[str, Any]]:
        """Join every waiting label whose prediction is now stored; mark it joined."""
        joined = []
        copies = []
        async with self._transaction() as db:
            found = [dict(row) for row in await db.execute_fetchall(_PENDING_JOINS)]
            for row in found:
                earlier = await db.execute_fetchall(
                    "SELECT 1 FROM feedback WHERE joined_prediction_id = ? "
                    "AND label IS NOT NULL AND inclusion_probability IS NULL LIMIT 1",
                    (row["prediction_id"],),
                )
                row["first"] = not list(earlier)
                async with db.execute(
                    "UPDATE feedback SET joined_prediction_id = ?, joined_at = ? "
                    "WHERE feedback_id = ? AND joined_at IS NULL",
                    (row["prediction_id"], now, row["feedback_id"]),
                ) as cur:
                    if cur.rowcount == 1:
                        joined.append(row)
            if joined:
                copies = [dict(r) for r in await db.execute_fetchall(_SHADOWS_OF_JOINED, (now,))]
        attach_shadows(joined, copies)
        return joined

    async def feedback_for(self, prediction_id: str) -> list[dict[str, Any]]:
        rows = await self._fetch(
            "SELECT feedback_id, label, label_time, received_at, source, origin, "
            "inclusion_probability, outcome, value FROM feedback "
            "WHERE joined_prediction_id = ? ORDER BY label_time, received_at",
            (prediction_id,),
        )
        return [dict(row) for row in rows]

    async def routes_of(
        self, prediction_ids: Sequence[str], request_ids: Sequence[str]
    ) -> dict[str, tuple[str, int | None]]:
        found: dict[str, tuple[str, int | None]] = {}
        for column, keys in (("prediction_id", prediction_ids), ("request_id", request_ids)):
            unique = list(dict.fromkeys(keys))
            for start in range(0, len(unique), 500):  # SQLite binds at most 999 (older builds)
                chunk = unique[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                # the column is one of two constants, the keys are parameters
                query = f"SELECT {column}, route, batch_size FROM predictions WHERE {column} IN ({marks})"  # noqa: S608, E501
                rows = await self._fetch(query, chunk)
                found.update((row[0], (row[1], row[2])) for row in rows)
        return found

    async def report_rows(self, route: str, since: float, until: float) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._fetch(_REPORT_ROWS, (route, since, until))]

    async def latest_rows(
        self, route: str, since: float, until: float, limit: int
    ) -> list[dict[str, Any]]:
        rows = await self._fetch(_LATEST_ROWS, (route, since, until, limit))
        return [dict(row) for row in reversed(rows)]

    async def labelled_rows(self, route: str, since: float, until: float) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._fetch(_LABELLED_ROWS, (route, since, until))]

    async def count_rows(self, route: str, since: float, until: float) -> int:
        rows = await self._fetch(_COUNT_ROWS, (route, since, until))
        return int(rows[0][0]) if rows else 0

    async def count_monitored(self, route: str, since: float, until: float) -> int:
        rows = await self._fetch(_MONITORED_COUNT, (route, since, until))
        return int(rows[0][0])

    async def monitored_rows(
        self, route: str, since: float, until: float, below: str
    ) -> list[dict[str, Any]]:
        wanted = (route, since, until, below)
        return [dict(row) for row in await self._fetch(_MONITORED_ROWS, wanted)]

    async def references(self, route: str | None) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._fetch(_REFERENCES, (route, route))]

    async def save_references(self, rows: Sequence[dict[str, Any]]) -> None:
        async with self._transaction() as db:
            await db.executemany(
                _SAVE_REFERENCE, [tuple(r[c] for c in REFERENCE_COLUMNS) for r in rows]
            )

    async def delete_reference(self, reference_id: str) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute(_DELETE_REFERENCE, (reference_id,))
            deleted = cursor.rowcount == 1
            await cursor.close()
        return deleted

    async def iter_export(
        self, route: str, since: float, until: float, batch: int = 1000
    ) -> AsyncIterator[list[dict[str, Any]]]:
        async with self.db.execute(_EXPORT_ROWS, (route, since, until)) as cur:
            while rows := await cur.fetchmany(batch):
                yield [dict(row) for row in rows]

    async def claim_delivery(
        self,
        delivery: str,
        route: str,
        since: float,
        now: float,
        holder: str,
        lease_until: float,
        limit: int,
    ) -> int | None:
        # the read first, outside the write lock: the log writes on while it scans
        found = [row[0] for row in await self._fetch(_UNCLAIMED, (route, since, delivery))]
        found = found[:limit]
        if not found:
            return None
        async with self._using:
            # then the write lock: two processes cannot both take the same run number
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                async with self.db.execute(_NEXT_DELIVERY, (delivery,)) as cur:
                    row = await cur.fetchone()
                seq = int(row[0]) if row else 1
                before = self.db.total_changes
                await self.db.executemany(_CLAIM, [(delivery, pid, seq) for pid in found])
                count = self.db.total_changes - before
                if count <= 0:
                    await self.db.rollback()
                    return None
                await self.db.execute(
                    _SAVE_DELIVERY, (delivery, seq, route, now, count, holder, lease_until)
                )
                await self.db.commit()
            except BaseException:
                await self.db.rollback()
                raise
        return seq

    async def delivery_runs(self, delivery: str) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._fetch(_DELIVERY_RUNS, (delivery, delivery))]

    async def lease_delivery(
        self, delivery: str, seq: int, holder: str, now: float, until: float
    ) -> bool:
        async with (
            self._transaction() as db,
            db.execute(_LEASE_DELIVERY, (holder, until, delivery, seq, holder, now)) as cur,
        ):
            return bool(cur.rowcount == 1)

    async def mark_delivered(self, delivery: str, seq: int, written_at: float, file: str) -> None:
        async with self._transaction() as db:
            await db.execute(_MARK_DELIVERED, (written_at, file, delivery, seq))

    async def iter_delivery(
        self, delivery: str, seq: int, batch: int = 1000
    ) -> AsyncIterator[list[dict[str, Any]]]:
        # a query a batch, each read whole: no cursor stays open across the caller's awaits
        # (an open read would make this connection's next write fail as the log writes on)
        after = ""
        while rows := await self._fetch(_DELIVERY_ROWS, (delivery, seq, after, batch)):
            after = rows[-1]["prediction_id"]
            yield [dict(row) for row in rows]

    async def get_prediction(self, prediction_id: str) -> dict[str, Any] | None:
        rows = await self._fetch(
            "SELECT * FROM predictions WHERE prediction_id = ?", (prediction_id,)
        )
        return dict(rows[0]) if rows else None

    async def predictions_of_request(self, request_id: str, limit: int) -> list[str]:
        return [row[0] for row in await self._fetch(_PREDICTIONS_OF_REQUEST, (request_id, limit))]

    async def shadows_of(self, prediction_id: str) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._fetch(_SHADOWS_OF, (prediction_id,))]

    async def count_predictions(self) -> int:
        rows = await self._fetch("SELECT COUNT(*) FROM predictions")
        return int(rows[0][0]) if rows else 0
