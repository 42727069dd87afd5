"""The store interface the writer, the admin endpoints and the CLI program against."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import asyncpg

#: what a store raises when the database under it fails (not a bug in a query)
STORE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    sqlite3.Error,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


class StoreDataError(Exception):
    """A write refused for what its rows hold, not for the store's state: retrying the same
    rows can only fail again."""


#: SQLSTATE classes of PostgreSQL errors caused by the values written: 22 data exception
#: (NUL in TEXT, a number out of range), 23 integrity constraint violation, 54 program limit
#: exceeded (a value too large for an index row)
_DATA_SQLSTATE_CLASSES = ("22", "23", "54")


def is_data_error(exc: BaseException) -> bool:
    """Whether a failed write failed for its rows' values (split it, keep the bad row aside)
    rather than for the store being unavailable (retry it whole)."""
    if isinstance(exc, StoreDataError | sqlite3.DataError | sqlite3.IntegrityError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return str(getattr(exc, "sqlstate", "") or "")[:2] in _DATA_SQLSTATE_CLASSES
    # asyncpg's own refusal to encode an argument (an unpaired surrogate, a wrong type) is an
    # InterfaceError and a ValueError; a lost connection is an InterfaceError only
    if isinstance(exc, asyncpg.InterfaceError):
        return isinstance(exc, ValueError)
    # binding a value sqlite3 cannot take: an unpaired surrogate, an integer past 64 bits
    return isinstance(exc, UnicodeError | OverflowError)


#: a rollout's state as the store keeps it (rollouts.RolloutState)
ROLLOUT_COLUMNS = (
    "id",
    "route",
    "status",
    "step",
    "started_at",
    "step_started_at",
    "updated_at",
    "reason",
)


class StoreOpenError(Exception):
    """The store could not be opened (unreachable, unreadable, not a database). The message
    names the store, never its credentials; the cause is chained."""


class Store(Protocol):
    async def open(self) -> None:
        """Connect and bring the schema up to date."""

    async def close(self) -> None: ...

    async def write_predictions(
        self, rows: Sequence[tuple[Any, ...]], *, replay: bool = False
    ) -> None:
        """Insert rows in :data:`model_gateway.records.COLUMNS` order, in one transaction;
        with ``replay``, rows whose prediction id is already stored are skipped. Raises an
        error :func:`is_data_error` accepts when a row's values are refused."""

    async def write_dead_letters(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert dead letters (id, kind, prediction id, failed at, error, record as JSON
        text) in one transaction."""

    async def list_dead_letters(self, limit: int) -> list[dict[str, Any]]:
        """The latest dead letters first, at most ``limit``."""

    async def record_config(
        self, version: str, activated_at: float, source: str, text: str
    ) -> None:
        """Keep a configuration that has just become active."""

    async def config_at(self, at: float) -> dict[str, Any] | None:
        """The configuration activated last at or before ``at`` (Unix seconds)."""

    async def config_texts(self, versions: Sequence[str]) -> dict[str, str]:
        """The text of each configuration version named that the history holds."""

    async def insert_feedback(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert feedback rows (id, prediction id, request id, label, label time, received
        at, source) in one transaction."""

    async def join_feedback(self, now: float) -> list[dict[str, Any]]:
        """Join waiting labels to stored predictions; the rows joined, with ``first`` set when
        the prediction had no label before and ``shadows`` the prediction's shadow copies
        (each with its variant, model version and prediction)."""

    async def feedback_for(self, prediction_id: str) -> list[dict[str, Any]]: ...

    async def routes_of(
        self, prediction_ids: Sequence[str], request_ids: Sequence[str]
    ) -> dict[str, tuple[str, int | None]]:
        """The route of each stored prediction named, by prediction id or request id, and
        its batch size when it is a batch request's own record."""

    async def rollouts(self) -> list[dict[str, Any]]:
        """Every rollout's stored state (:data:`ROLLOUT_COLUMNS`, holder and lease_until)."""

    async def begin_rollout(self, row: dict[str, Any]) -> dict[str, Any]:
        """Store a new rollout's state unless one with its id is stored; the stored state."""

    async def save_rollout(
        self, row: dict[str, Any], holder: str | None, judged_at: float | None = None
    ) -> bool:
        """Store a rollout's new state; with ``holder``, a decision: only while it holds the
        lease and the stored state is still the one it judged (``judged_at``, that state's
        ``updated_at``); False otherwise."""

    async def lease_rollout(self, rollout_id: str, holder: str, now: float, until: float) -> bool:
        """Take or renew the lease of a rollout until ``until``: granted when nobody holds it,
        ``holder`` does, or the last lease ran out before ``now``."""

    async def report_rows(self, route: str, since: float, until: float) -> list[dict[str, Any]]:
        """Predictions of a route in [since, until), each with its latest label (a shadow's:
        its live prediction's) and, for shadows, the live prediction's answer."""

    async def latest_rows(
        self, route: str, since: float, until: float, limit: int
    ) -> list[dict[str, Any]]:
        """The latest ``limit`` of :meth:`report_rows`, oldest first."""

    async def labelled_rows(self, route: str, since: float, until: float) -> list[dict[str, Any]]:
        """:meth:`report_rows` that have a label (a shadow's: its live prediction's)."""

    async def count_rows(self, route: str, since: float, until: float) -> int: ...

    async def count_monitored(self, route: str, since: float, until: float) -> int:
        """How many live inference records a route has in [since, until)."""

    async def monitored_rows(
        self, route: str, since: float, until: float, below: str
    ) -> list[dict[str, Any]]:
        """The live inference records of a route in [since, until) whose prediction id ends
        below ``below`` (:data:`~.queries.EVERY_RECORD`: all): variant, model_version,
        status, score, features, batch_size."""

    async def references(self, route: str | None) -> list[dict[str, Any]]:
        """The drift references of a route (of every route: None), newest first."""

    async def save_references(self, rows: Sequence[dict[str, Any]]) -> None:
        """Store references (:data:`~.queries.REFERENCE_COLUMNS`), in one transaction."""

    async def delete_reference(self, reference_id: str) -> bool:
        """Delete a reference; False when there was none with that id."""

    def iter_export(
        self, route: str, since: float, until: float, batch: int = 1000
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Predictions with their latest label, in batches, in prediction id order."""
        ...

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
        """Claim for the next run of ``delivery`` (at most ``limit``) live predictions of
        ``route`` made since ``since`` that no run of it has claimed, and the run's writing
        for ``holder`` until ``lease_until``; the run's number, or None when there was
        nothing to claim."""

    async def delivery_runs(self, delivery: str) -> list[dict[str, Any]]:
        """A delivery's last run and those not written yet, oldest first: seq, route,
        claimed_at, row_count, written_at (None until its file is in place) and file."""

    async def lease_delivery(
        self, delivery: str, seq: int, holder: str, now: float, until: float
    ) -> bool:
        """Take the writing of an unwritten run for ``holder`` until ``until``: False when
        another holder's lease runs on."""

    async def mark_delivered(self, delivery: str, seq: int, written_at: float, file: str) -> None:
        """Record that a run's file is in place."""

    def iter_delivery(
        self, delivery: str, seq: int, batch: int = 1000
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """The predictions a run claimed, as :meth:`iter_export` gives them (with the request
        body), in prediction id order."""
        ...

    async def get_prediction(self, prediction_id: str) -> dict[str, Any] | None: ...

    async def predictions_of_request(self, request_id: str, limit: int) -> list[str]:
        """The ids of the live predictions made for a client's request id, latest first."""

    async def shadows_of(self, prediction_id: str) -> list[dict[str, Any]]:
        """The shadow copies of a live prediction, each a summary of its answer."""

    async def count_predictions(self) -> int: ...

    async def schema_version(self) -> int: ...


def store_location(url: str) -> str:
    """Where a ``storage.url`` points, fit to print: a SQLite file's path, or a PostgreSQL
    server's host, port and database without the credentials, which the user part or the
    query (``?password=``) may hold."""
    if url.startswith("sqlite://"):
        return sqlite_path(url)
    parts = urlsplit(url)
    return parts.netloc.rsplit("@", 1)[-1] + parts.path


def sqlite_path(url: str) -> str:
    """``sqlite:///rel.db`` is relative to the working directory, ``sqlite:////abs.db`` absolute."""
    path = url.removeprefix("sqlite://").removeprefix("/")
    if not path:
        raise ValueError(f"storage url {url!r} names no file")
    return path


def attach_shadows(joined: list[dict[str, Any]], copies: list[dict[str, Any]]) -> None:
    """Give each joined row the list of its prediction's shadow copies."""
    by_live: dict[str, list[dict[str, Any]]] = {}
    for copy in copies:
        by_live.setdefault(copy["shadow_of"], []).append(copy)
    for row in joined:
        row["shadows"] = by_live.get(row["prediction_id"], [])
