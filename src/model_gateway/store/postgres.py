"""The PostgreSQL store for several gateway replicas: the same schema and queries as SQLite.

One asyncpg pool per process. Migrations run under a transaction-scoped advisory lock, so
replicas starting together apply each migration once. A ``?schema=NAME`` parameter on the
URL puts the tables in that schema (created if missing), e.g. for one test run or one
environment per schema.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from ..features import features_text
from ..records import COLUMNS
from .base import (
    ROLLOUT_COLUMNS,
    STORE_ERRORS,
    StoreOpenError,
    attach_shadows,
    store_location,
)
from .queries import (
    BEGIN_ROLLOUT,
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

# An arbitrary constant naming this application's migration lock.
_MIGRATION_LOCK = 7_236_155_004_211
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _numbered(query: str) -> str:
    """``%s`` placeholders as asyncpg's ``$1, $2, …``."""
    counter = iter(range(1, 1000))
    return re.sub(r"%s", lambda _: f"${next(counter)}", query)


_UNCLAIMED = _numbered(UNCLAIMED)
_DELIVERY_ROWS = _numbered(DELIVERY_ROWS)
_LEASE_DELIVERY = _numbered(LEASE_DELIVERY)
_DELIVERY_RUNS = _numbered(DELIVERY_RUNS)
_MARK_DELIVERED = _numbered(MARK_DELIVERED)
_NEXT_DELIVERY = _numbered(NEXT_DELIVERY)
_SAVE_DELIVERY = _numbered(SAVE_DELIVERY)
_MONITORED_COUNT = _numbered(MONITORED_COUNT)
_MONITORED_ROWS = _numbered(MONITORED_ROWS.format(collate=' COLLATE "C"'))
_REFERENCES = _numbered(REFERENCES)
_SAVE_REFERENCE = _numbered(SAVE_REFERENCE)
_DELETE_REFERENCE = _numbered(DELETE_REFERENCE)
_COLUMN_LIST = ", ".join(COLUMNS)
_INSERT = _numbered(
    f"INSERT INTO predictions ({_COLUMN_LIST}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"  # noqa: S608
)
_FEATURES = COLUMNS.index("features")


def _with_features_text(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return (*row[:_FEATURES], features_text(row[_FEATURES]), *row[_FEATURES + 1 :])


# a batch retried after a lost connection may have been committed already
_INSERT_REPLAY = _INSERT + " ON CONFLICT (prediction_id) DO NOTHING"
_INSERT_DEAD_LETTER = (
    "INSERT INTO dead_letters (dead_letter_id, kind, prediction_id, failed_at, error, record) "
    "VALUES ($1, $2, $3, $4, $5, $6)"
)
_INSERT_FEEDBACK = _numbered(
    "INSERT INTO feedback (feedback_id, prediction_id, request_id, label, label_time, "
    "received_at, source, origin, inclusion_probability, outcome, value) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_PENDING_JOINS = _numbered(PENDING_JOINS)
_REPORT_ROWS = _numbered(REPORT_ROWS)
_LATEST_ROWS = _numbered(LATEST_ROWS)
_LABELLED_ROWS = _numbered(LABELLED_ROWS)
_ROLLOUT_BY_ID = _numbered(ROLLOUT_BY_ID)
_BEGIN_ROLLOUT = _numbered(BEGIN_ROLLOUT)
_SAVE_ROLLOUT = _numbered(SAVE_ROLLOUT)
_SAVE_HELD_ROLLOUT = _numbered(SAVE_HELD_ROLLOUT)
_LEASE_ROLLOUT = _numbered(LEASE_ROLLOUT)
_EXPORT_ROWS = _numbered(EXPORT_ROWS)
_COUNT_ROWS = _numbered(COUNT_ROWS)
_SHADOWS_OF = _numbered(SHADOWS_OF)
_PREDICTIONS_OF_REQUEST = _numbered(PREDICTIONS_OF_REQUEST)
_SHADOWS_OF_JOINED = _numbered(SHADOWS_OF_JOINED)


def split_schema(url: str) -> tuple[str, str | None]:
    """The URL without ``schema=``, and the schema it named."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    schema = next((v for k, v in query if k == "schema"), None)
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    if schema is not None and not _SCHEMA_NAME.match(schema):
        raise ValueError(f"schema {schema!r}: use lower-case letters, digits and '_'")
    return urlunsplit(parts._replace(query=rest)), schema


class PostgresStore:
    # No floor of connections (min_size 0): asyncpg restores a floor in the background and
    # logs a traceback for every failed try, several a second while the database is down.
    # Connections are opened when a write or a query needs one, and kept while used.
    def __init__(self, url: str, *, min_size: int = 0, max_size: int = 8) -> None:
        self.url, self.schema = split_schema(url)
        self._min, self._max = min_size, max_size
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    async def open(self) -> None:
        settings = {"search_path": self.schema} if self.schema else {}
        try:
            if self.schema:
                conn = await asyncpg.connect(self.url)
                try:
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                finally:
                    await conn.close()
            self._pool = await asyncpg.create_pool(
                self.url, min_size=self._min, max_size=self._max, server_settings=settings
            )
            await self._migrate()
        except BaseException as exc:
            await self.close()  # the pool's connections, if it was made
            if isinstance(exc, STORE_ERRORS):
                where = store_location(self.url)
                raise StoreOpenError(f"cannot open the PostgreSQL store {where}: {exc}") from exc
            raise

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def schema_version(self) -> int:
        async with self.pool.acquire() as conn:
            return await self._version(conn)

    async def _version(self, conn: Any) -> int:
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        found = await conn.fetchval("SELECT MAX(version) FROM schema_version")
        return int(found) if found is not None else 0

    async def _migrate(self) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            current = await self._version(conn)
            if current > LATEST_VERSION:
                raise SchemaTooNewError(current)
            for version in range(current + 1, LATEST_VERSION + 1):
                for statement in MIGRATIONS[version - 1]:
                    await conn.execute(statement.format(blob="BYTEA"))
                await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)

    async def write_predictions(
        self, rows: Sequence[tuple[Any, ...]], *, replay: bool = False
    ) -> None:
        # a record's features come as a dict (the SQLite log's process writes them as JSON
        # text off the event loop; here, on it, in the batch)
        rows = [row if row[_FEATURES] is None else _with_features_text(row) for row in rows]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(_INSERT_REPLAY if replay else _INSERT, rows)

    async def write_dead_letters(self, rows: Sequence[tuple[Any, ...]]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(_INSERT_DEAD_LETTER, rows)

    async def list_dead_letters(self, limit: int) -> list[dict[str, Any]]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT * FROM dead_letters ORDER BY failed_at DESC LIMIT $1", limit
            )
        return [dict(r) for r in rows]

    async def record_config(
        self, version: str, activated_at: float, source: str, text: str
    ) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO configs (version, activated_at, source, text) VALUES ($1, $2, $3, $4)",
                version,
                activated_at,
                source,
                text,
            )

    async def rollouts(self) -> list[dict[str, Any]]:
        async with self.pool.acquire() as conn:
            return [dict(row) for row in await conn.fetch(ROLLOUTS)]

    async def begin_rollout(self, row: dict[str, Any]) -> dict[str, Any]:
        async with self.pool.acquire() as conn:
            await conn.execute(_BEGIN_ROLLOUT, *(row[c] for c in ROLLOUT_COLUMNS))
            stored = await conn.fetchrow(_ROLLOUT_BY_ID, row["id"])
        assert stored is not None
        return dict(stored)

    async def save_rollout(
        self, row: dict[str, Any], holder: str | None, judged_at: float | None = None
    ) -> bool:
        values = [row[c] for c in ROLLOUT_SAVED] + [row["id"]]
        async with self.pool.acquire() as conn:
            if holder is None:
                status = await conn.execute(_SAVE_ROLLOUT, *values)
            else:
                status = await conn.execute(_SAVE_HELD_ROLLOUT, *values, holder, judged_at)
        return bool(status == "UPDATE 1")

    async def lease_rollout(self, rollout_id: str, holder: str, now: float, until: float) -> bool:
        async with self.pool.acquire() as conn:
            status = await conn.execute(_LEASE_ROLLOUT, holder, until, rollout_id, holder, now)
        return bool(status == "UPDATE 1")

    async def config_at(self, at: float) -> dict[str, Any] | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT version, activated_at, source, text FROM configs WHERE activated_at <= $1 "
                "ORDER BY activated_at DESC LIMIT 1",
                at,
            )
        return None if row is None else dict(row)

    async def config_texts(self, versions: Sequence[str]) -> dict[str, str]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT version, text FROM configs WHERE version = ANY($1)", list(set(versions))
            )
        return {r["version"]: r["text"] for r in rows}

    async def insert_feedback(self, rows: Sequence[tuple[Any, ...]]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(_INSERT_FEEDBACK, rows)

    async def join_feedback(self, now: float) -> list[dict[str, Any]]:
        joined = []
        async with self.pool.acquire() as conn, conn.transaction():
            for record in await conn.fetch(_PENDING_JOINS):
                row = dict(record)
                row["first"] = (
                    await conn.fetchval(
                        "SELECT 1 FROM feedback WHERE joined_prediction_id = $1 "
                        "AND label IS NOT NULL AND inclusion_probability IS NULL LIMIT 1",
                        row["prediction_id"],
                    )
                    is None
                )
                # another replica may have joined it meanwhile: only one UPDATE wins
                status = await conn.execute(
                    "UPDATE feedback SET joined_prediction_id = $1, joined_at = $2 "
                    "WHERE feedback_id = $3 AND joined_at IS NULL",
                    row["prediction_id"],
                    now,
                    row["feedback_id"],
                )
                if status == "UPDATE 1":
                    joined.append(row)
            copies = [dict(r) for r in await conn.fetch(_SHADOWS_OF_JOINED, now)] if joined else []
        attach_shadows(joined, copies)
        return joined

    async def feedback_for(self, prediction_id: str) -> list[dict[str, Any]]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT feedback_id, label, label_time, received_at, source, origin, "
                "inclusion_probability, outcome, value FROM feedback "
                "WHERE joined_prediction_id = $1 ORDER BY label_time, received_at",
                prediction_id,
            )
        return [dict(r) for r in rows]

    async def routes_of(
        self, prediction_ids: Sequence[str], request_ids: Sequence[str]
    ) -> dict[str, tuple[str, int | None]]:
        found: dict[str, tuple[str, int | None]] = {}
        async with self.pool.acquire() as conn:
            for column, keys in (("prediction_id", prediction_ids), ("request_id", request_ids)):
                if keys:
                    # the column is one of two constants, the keys a parameter
                    query = f"SELECT {column}, route, batch_size FROM predictions WHERE {column} = ANY($1)"  # noqa: S608, E501
                    rows = await conn.fetch(query, list(set(keys)))
                    found.update((r[0], (r[1], r[2])) for r in rows)
        return found

    async def report_rows(self, route: str, since: float, until: float) -> list[dict[str, Any]]:
        async with self.pool.acquire() as conn:
            return [dict(r) for r in await conn.fetch(_REPORT_ROWS, route, since, until)]

    async def latest_rows(
        self, route: str, since: float, until: float, limit: int
    ) -> list[dict[str, Any]]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_LATEST_ROWS, route, since, until, limit)
        return [dict(row) for row in reversed(rows)]

    async def labelled_rows(self, route: str, since: float, until: float) -> list[dict[str, Any]]:
        async with self.pool.acquire() as conn:
            return [dict(r) for r in await conn.fetch(_LABELLED_ROWS, route, since, until)]

    async def count_rows(self, route: str, since: float, until: float) -> int:
        async with self.pool.acquire() as conn:
            return int(await conn.fetchval(_COUNT_ROWS, route, since, until))

    async def count_monitored(self, route: str, since: float, until: float) -> int:
        async with self.pool.acquire() as conn:
            return int(await conn.fetchval(_MONITORED_COUNT, route, since, until))

    async def monitored_rows(
        self, route: str, since: float, until: float, below: str
    ) -> list[dict[str, Any]]:
        async with self.pool.acquire() as conn:
            return [dict(r) for r in await conn.fetch(_MONITORED_ROWS, route, since, until, below)]

    async def references(self, route: str | None) -> list[dict[str, Any]]:
        async with self.pool.acquire() as conn:
            return [dict(row) for row in await conn.fetch(_REFERENCES, route, route)]

    async def save_references(self, rows: Sequence[dict[str, Any]]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                _SAVE_REFERENCE, [tuple(r[c] for c in REFERENCE_COLUMNS) for r in rows]
            )

    async def delete_reference(self, reference_id: str) -> bool:
        async with self.pool.acquire() as conn:
            status = await conn.execute(_DELETE_REFERENCE, reference_id)
        return bool(status == "DELETE 1")

    async def iter_export(
        self, route: str, since: float, until: float, batch: int = 1000
    ) -> AsyncIterator[list[dict[str, Any]]]:
        async with self.pool.acquire() as conn, conn.transaction():
            cursor = await conn.cursor(_EXPORT_ROWS, route, since, until)
            while rows := await cursor.fetch(batch):
                yield [dict(r) for r in rows]

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
        async with self.pool.acquire() as conn:
            found = [r[0] for r in await conn.fetch(_UNCLAIMED, route, since, delivery)][:limit]
            if not found:
                return None
            async with conn.transaction():
                seq = int(await conn.fetchval(_NEXT_DELIVERY, delivery))
                # a prediction another gateway claimed meanwhile is skipped; of two runs
                # taking the same number, the second fails and tries again at its next look
                count = 0
                for start in range(0, len(found), 10_000):
                    status = await conn.execute(
                        "INSERT INTO delivered (delivery, prediction_id, seq) "
                        "SELECT $1, unnest($2::text[]), $3 "
                        "ON CONFLICT (delivery, prediction_id) DO NOTHING",
                        delivery,
                        found[start : start + 10_000],
                        seq,
                    )
                    count += int(status.split()[-1])
                if count == 0:
                    return None
                await conn.execute(
                    _SAVE_DELIVERY, delivery, seq, route, now, count, holder, lease_until
                )
        return seq

    async def delivery_runs(self, delivery: str) -> list[dict[str, Any]]:
        async with self.pool.acquire() as conn:
            return [dict(r) for r in await conn.fetch(_DELIVERY_RUNS, delivery, delivery)]

    async def lease_delivery(
        self, delivery: str, seq: int, holder: str, now: float, until: float
    ) -> bool:
        async with self.pool.acquire() as conn:
            status = await conn.execute(_LEASE_DELIVERY, holder, until, delivery, seq, holder, now)
        return bool(status == "UPDATE 1")

    async def mark_delivered(self, delivery: str, seq: int, written_at: float, file: str) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(_MARK_DELIVERED, written_at, file, delivery, seq)

    async def iter_delivery(
        self, delivery: str, seq: int, batch: int = 1000
    ) -> AsyncIterator[list[dict[str, Any]]]:
        after = ""
        while True:
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(_DELIVERY_ROWS, delivery, seq, after, batch)
            if not rows:
                return
            after = rows[-1]["prediction_id"]
            yield [dict(r) for r in rows]

    async def get_prediction(self, prediction_id: str) -> dict[str, Any] | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM predictions WHERE prediction_id = $1", prediction_id
            )
        return None if row is None else dict(row)

    async def predictions_of_request(self, request_id: str, limit: int) -> list[str]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_PREDICTIONS_OF_REQUEST, request_id, limit)
        return [row[0] for row in rows]

    async def shadows_of(self, prediction_id: str) -> list[dict[str, Any]]:
        async with self.pool.acquire() as conn:
            return [dict(r) for r in await conn.fetch(_SHADOWS_OF, prediction_id)]

    async def count_predictions(self) -> int:
        async with self.pool.acquire() as conn:
            return int(await conn.fetchval("SELECT COUNT(*) FROM predictions"))
