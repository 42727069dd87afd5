"""The embedded default store: one SQLite file in WAL mode; the prediction log is written in
batches by a process of its own (:mod:`.log_process`), everything else through aiosqlite."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiosqlite

from ..records import COLUMNS
from .base import STORE_ERRORS, StoreOpenError, attach_shadows
from .log_process import LogProcess
from .queries import (
    COUNT_ROWS,
    EXPORT_ROWS,
    PENDING_JOINS,
    PREDICTIONS_OF_REQUEST,
    REPORT_ROWS,
    SHADOWS_OF,
    SHADOWS_OF_JOINED,
)
from .schema import LATEST_VERSION, MIGRATIONS, SchemaTooNewError

_PENDING_JOINS = PENDING_JOINS.replace("%s", "?")
_REPORT_ROWS = REPORT_ROWS.replace("%s", "?")
_EXPORT_ROWS = EXPORT_ROWS.replace("%s", "?")
_COUNT_ROWS = COUNT_ROWS.replace("%s", "?")
_SHADOWS_OF = SHADOWS_OF.replace("%s", "?")
_PREDICTIONS_OF_REQUEST = PREDICTIONS_OF_REQUEST.replace("%s", "?")
_SHADOWS_OF_JOINED = SHADOWS_OF_JOINED.replace("%s", "?")

_INSERT_FEEDBACK = (
    "INSERT INTO feedback (feedback_id, prediction_id, request_id, label, label_time, "
    "received_at, source) VALUES (?, ?, ?, ?, ?, ?, ?)"
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

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

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
        try:
            await self.db.executemany(_INSERT_DEAD_LETTER, rows)
            await self.db.commit()
        except BaseException:
            await self.db.rollback()
            raise

    async def list_dead_letters(self, limit: int) -> list[dict[str, Any]]:
        async with self.db.execute(
            "SELECT * FROM dead_letters ORDER BY failed_at DESC LIMIT ?", (limit,)
        ) as cur:
            return [dict(row) for row in await cur.fetchall()]

    async def record_config(
        self, version: str, activated_at: float, source: str, text: str
    ) -> None:
        await self.db.execute(
            "INSERT INTO configs (version, activated_at, source, text) VALUES (?, ?, ?, ?)",
            (version, activated_at, source, text),
        )
        await self.db.commit()

    async def config_at(self, at: float) -> dict[str, Any] | None:
        async with self.db.execute(
            "SELECT version, activated_at, source, text FROM configs WHERE activated_at <= ? "
            "ORDER BY activated_at DESC LIMIT 1",
            (at,),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else dict(row)

    async def config_texts(self, versions: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        unique = list(dict.fromkeys(versions))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            query = f"SELECT version, text FROM configs WHERE version IN ({marks})"  # noqa: S608
            async with self.db.execute(query, chunk) as cur:
                found.update((row[0], row[1]) for row in await cur.fetchall())
        return found

    async def insert_feedback(self, rows: Sequence[tuple[Any, ...]]) -> None:
        try:
            await self.db.executemany(_INSERT_FEEDBACK, rows)
            await self.db.commit()
        except BaseException:
            await self.db.rollback()
            raise

    async def join_feedback(self, now: float) -> list[dict[str, Any]]:
        """Join every waiting label whose prediction is now stored; mark it joined."""
        async with self.db.execute(_PENDING_JOINS) as cur:
            found = [dict(row) for row in await cur.fetchall()]
        joined = []
        try:
            for row in found:
                async with self.db.execute(
                    "SELECT 1 FROM feedback WHERE joined_prediction_id = ? LIMIT 1",
                    (row["prediction_id"],),
                ) as cur:
                    row["first"] = await cur.fetchone() is None
                cur = await self.db.execute(
                    "UPDATE feedback SET joined_prediction_id = ?, joined_at = ? "
                    "WHERE feedback_id = ? AND joined_at IS NULL",
                    (row["prediction_id"], now, row["feedback_id"]),
                )
                if cur.rowcount == 1:
                    joined.append(row)
            copies = []
            if joined:
                async with self.db.execute(_SHADOWS_OF_JOINED, (now,)) as cur:
                    copies = [dict(r) for r in await cur.fetchall()]
            await self.db.commit()
        except BaseException:
            await self.db.rollback()
            raise
        attach_shadows(joined, copies)
        return joined

    async def feedback_for(self, prediction_id: str) -> list[dict[str, Any]]:
        async with self.db.execute(
            "SELECT feedback_id, label, label_time, received_at, source FROM feedback "
            "WHERE joined_prediction_id = ? ORDER BY label_time, received_at",
            (prediction_id,),
        ) as cur:
            return [dict(row) for row in await cur.fetchall()]

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
                async with self.db.execute(query, chunk) as cur:
                    found.update((row[0], (row[1], row[2])) for row in await cur.fetchall())
        return found

    async def report_rows(self, route: str, since: float, until: float) -> list[dict[str, Any]]:
        async with self.db.execute(_REPORT_ROWS, (route, since, until)) as cur:
            return [dict(row) for row in await cur.fetchall()]

    async def count_rows(self, route: str, since: float, until: float) -> int:
        async with self.db.execute(_COUNT_ROWS, (route, since, until)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def iter_export(
        self, route: str, since: float, until: float, batch: int = 1000
    ) -> AsyncIterator[list[dict[str, Any]]]:
        async with self.db.execute(_EXPORT_ROWS, (route, since, until)) as cur:
            while rows := await cur.fetchmany(batch):
                yield [dict(row) for row in rows]

    async def get_prediction(self, prediction_id: str) -> dict[str, Any] | None:
        async with self.db.execute(
            "SELECT * FROM predictions WHERE prediction_id = ?", (prediction_id,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else dict(row)

    async def predictions_of_request(self, request_id: str, limit: int) -> list[str]:
        async with self.db.execute(_PREDICTIONS_OF_REQUEST, (request_id, limit)) as cur:
            return [row[0] for row in await cur.fetchall()]

    async def shadows_of(self, prediction_id: str) -> list[dict[str, Any]]:
        async with self.db.execute(_SHADOWS_OF, (prediction_id,)) as cur:
            return [dict(row) for row in await cur.fetchall()]

    async def count_predictions(self) -> int:
        async with self.db.execute("SELECT COUNT(*) FROM predictions") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0
