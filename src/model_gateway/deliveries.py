"""Files of a route's predictions for downstream teams: each delivery run writes what no run
of the same delivery has (docs/deliveries.md).

Exactly once, across crashes: a run first claims its predictions in the store, in one
transaction, under the delivery's next number; the file is then written from the claim to a
hidden temporary name, synced, and renamed into place, its manifest (rows, SHA-256) after
it; the run is marked written last. A run claimed but not marked (the process died between)
is finished before anything new is claimed: its file is written again from the claim
unless it is already in place. Runs of one delivery take a lock on its directory, so two
workers of one gateway, or the gateway and ``model-gateway export --since-last``, never
run it at once; on separate hosts the store's keys keep two claims apart.
"""

from __future__ import annotations

import asyncio
import csv
import fcntl
import hashlib
import io
import logging
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .background import cancel_and_wait, run_every
from .columns import EXPORT_COLUMNS
from .columns import SAMPLE_COLUMNS as LABELLING_COLUMNS
from .config import DeliveryConfig, duration_seconds
from .control_answers import format_rfc3339
from .datafiles import export_row, parquet_schema, sample_rows
from .features import read_features
from .live import LiveConfig
from .metrics import Metrics
from .store import Store
from .store.base import STORE_ERRORS

log = logging.getLogger("model_gateway.deliveries")

#: how often the runner looks whether a delivery is due
LOOK_SECONDS = 5.0
#: how long before the last run an ordinary run looks: a record is written within a second
#: or two of its answer, unless the store was away (then the spool or the queue holds it)
RECENT_SECONDS = 120.0
#: how long a process may take to write a run before another may take it over
LEASE_SECONDS = 600.0
#: a run's file holds at most this many predictions (a first run over a long backlog, or a
#: sweep after an outage, is split over several), so that its claim holds the store's write
#: lock briefly
MAX_ROWS_PER_FILE = 500_000
#: the holder of a run's lease: this host. On one host the directory's lock already keeps
#: two processes apart, and a run its killed process left is taken over at once by the
#: next; another host waits for the lease to run out
HOLDER = socket.gethostname()
#: how often a gateway sweeps the whole lookback for records written late (and at its
#: start, when the spool's records of a crash are written)
SWEEP_SECONDS = 6 * 3600.0


#: the exit status of ``export --since-last`` when another process holds the delivery
#: (sysexits' EX_TEMPFAIL: try again later)
BUSY_EXIT = 75


class DeliveryBusy(Exception):
    """Another process is running this delivery now."""


@dataclass(frozen=True, slots=True)
class Delivered:
    """One run's file, as the manifest describes it."""

    seq: int
    path: Path
    rows: int
    sample: Path | None


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeliveryBusy(f"{directory} is being delivered to by another process") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_name(delivery: DeliveryConfig, seq: int, claimed_at: float) -> str:
    """A run's file: the delivery, the run's number and when it was claimed (two stores
    that number runs alike never name the same file)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(claimed_at))
    millis = int(claimed_at * 1000) % 1000
    suffix = "parquet" if delivery.format == "parquet" else "csv"
    return f"{delivery.name}-{seq:08d}-{stamp}{millis:03d}Z.{suffix}"


def _manifest(final: Path) -> Path:
    return final.with_name(final.name + ".manifest.json")


def _hidden(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


async def deliver(
    store: Store,
    delivery: DeliveryConfig,
    now: float,
    *,
    sweep: bool = True,
    holder: str | None = None,
) -> list[Delivered]:
    """Finish a run left unfinished, then claim and write a new one; the files written
    (none when nothing new was logged). A sweep looks for predictions ``lookback`` before
    the last run; otherwise the run looks :data:`RECENT_SECONDS` before it, which is where
    the log's records land (one written later waits for the next sweep). Raises
    :class:`DeliveryBusy` when another process holds the delivery's directory, or the
    writing of its unfinished run."""
    directory = Path(delivery.directory)
    holder = holder or HOLDER
    written = []
    with _locked(directory):
        runs = await store.delivery_runs(delivery.name)
        if runs and runs[-1]["written_at"] is not None:
            # marked written, its manifest perhaps not yet renamed into place
            last = runs[-1]
            final = directory / file_name(delivery, last["seq"], last["claimed_at"])
            await asyncio.to_thread(_publish, _hidden(_manifest(final)), _manifest(final))
        await asyncio.to_thread(_remove_abandoned, directory, delivery.name)
        for run in runs:
            if run["written_at"] is not None:
                continue
            if not await store.lease_delivery(
                delivery.name, run["seq"], holder, now, now + LEASE_SECONDS
            ):
                raise DeliveryBusy(f"run {run['seq']} of {delivery.name} is being written")
            written.append(
                await _write_run(store, delivery, directory, run["seq"], run["claimed_at"], now)
            )
        # back from the last run, not from now: runs that failed for longer than the
        # lookback (a full disk over a long weekend) skip nothing
        back = duration_seconds(delivery.lookback)
        if not sweep:
            back = min(back, RECENT_SECONDS)
        since = (runs[-1]["claimed_at"] if runs else now) - back
        seq = await store.claim_delivery(
            delivery.name,
            delivery.route,
            since,
            now,
            holder,
            now + LEASE_SECONDS,
            MAX_ROWS_PER_FILE,
        )
        if seq is not None:
            written.append(await _write_run(store, delivery, directory, seq, now, now))
    return written


async def _write_run(
    store: Store,
    delivery: DeliveryConfig,
    directory: Path,
    seq: int,
    claimed_at: float,
    now: float,
) -> Delivered:
    """Write a run's file from its claim (again, if an earlier try died: a file without its
    manifest was never delivered), its sample, its manifest to a hidden name; mark the run
    written; then rename the manifest into place."""
    final = directory / file_name(delivery, seq, claimed_at)
    manifest = _manifest(final)
    columns = [*EXPORT_COLUMNS, *delivery.fields]
    writer = _FileWriter(final, columns, delivery)
    # batch by batch, each converted and written in a thread, and memory holds one batch
    # (and, for the sample, what it draws from)
    try:
        async for batch in store.iter_delivery(delivery.name, seq):
            await asyncio.to_thread(writer.add, batch)
        await asyncio.to_thread(writer.finish)
    except BaseException:
        writer.abandon()
        raise
    sample_path = None
    if delivery.sample is not None:
        sample_path = final.with_name(final.name.rsplit(".", 1)[0] + "-sample.csv")
        data = await asyncio.to_thread(_sample_csv, writer.unlabelled, delivery, seq)
        await asyncio.to_thread(_write_atomically, sample_path, data)
    await asyncio.to_thread(writer.publish)
    described = {
        "delivery": delivery.name,
        "seq": seq,
        "route": delivery.route,
        "file": final.name,
        "format": delivery.format,
        "rows": writer.rows,
        "sha256": writer.sha256(),
        "columns": columns,
        "first_request_time": _time(writer.first),
        "last_request_time": _time(writer.last),
        "sample": None if sample_path is None else sample_path.name,
        "claimed_at": format_rfc3339(claimed_at),
        "written_at": format_rfc3339(time.time()),
    }
    hidden = _hidden(manifest)
    data = orjson.dumps(described, option=orjson.OPT_INDENT_2)
    await asyncio.to_thread(_write_synced, hidden, data)
    # marked before the manifest shows: a run whose manifest was in place is never written
    # again, even if a consumer has taken the file away since
    await store.mark_delivered(delivery.name, seq, now, final.name)
    await asyncio.to_thread(_publish, hidden, manifest)
    return Delivered(seq, final, writer.rows, sample_path)


def _time(seconds: float | None) -> str | None:
    return None if seconds is None else format_rfc3339(seconds)


#: what a labelling sample needs of each prediction
_SAMPLED = (
    "prediction_id",
    "request_id",
    "variant",
    "reported_version",
    "configured_version",
    "request_time",
    "predicted",
    "score",
    "label",
)


class _FileWriter:
    """One run's file, written batch by batch to a hidden name, then renamed into place."""

    def __init__(self, final: Path, columns: list[str], delivery: DeliveryConfig) -> None:
        self.final = final
        self.temporary = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        self.columns = columns
        self.delivery = delivery
        self.rows = 0
        self.first: float | None = None
        self.last: float | None = None
        #: the run's predictions not labelled yet, for its sample
        self.unlabelled: list[dict[str, Any]] = []
        self._hash = hashlib.sha256()
        self._handle = self.temporary.open("wb")
        self._parquet: Any = None
        self._text: csv.DictWriter[str] | None = None
        self._buffer = io.StringIO(newline="")
        if delivery.format == "parquet":
            import pyarrow.parquet as pq

            self._schema = parquet_schema(columns)
            self._parquet = pq.ParquetWriter(self._handle, self._schema)
        else:
            self._text = csv.DictWriter(self._buffer, fieldnames=columns)
            self._text.writeheader()
            self._flush_text()

    def add(self, batch: list[dict[str, Any]]) -> None:
        table = [_delivered_row(row, self.delivery) for row in batch]
        for row in batch:
            moment = row["request_time"]
            self.first = moment if self.first is None else min(self.first, moment)
            self.last = moment if self.last is None else max(self.last, moment)
            if self.delivery.sample is not None and row["label"] is None:
                self.unlabelled.append({key: row[key] for key in _SAMPLED})
        self.rows += len(table)
        if self._parquet is not None:
            import pyarrow as pa

            self._parquet.write_table(pa.Table.from_pylist(table, schema=self._schema))
        else:
            assert self._text is not None
            self._text.writerows(table)
            self._flush_text()

    def _flush_text(self) -> None:
        data = self._buffer.getvalue().encode()
        self._buffer.seek(0)
        self._buffer.truncate()
        self._hash.update(data)
        self._handle.write(data)

    def finish(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
            self._handle.flush()
            # Parquet writes its footer last: hash what is on disk
            with self.temporary.open("rb") as written:
                while chunk := written.read(1 << 20):
                    self._hash.update(chunk)
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()

    def publish(self) -> None:
        os.replace(self.temporary, self.final)
        _sync_directory(self.final.parent)

    def abandon(self) -> None:
        self._handle.close()
        self.temporary.unlink(missing_ok=True)

    def sha256(self) -> str:
        return self._hash.hexdigest()


def _delivered_row(row: dict[str, Any], delivery: DeliveryConfig) -> dict[str, Any]:
    out = export_row(row)
    if delivery.fields:
        spec = tuple((name, True, pointer, None, 0) for name, pointer in delivery.fields.items())
        body = row.get("request_body")
        found = read_features(spec, bytes(body), 0) if body is not None else {}
        for name in delivery.fields:
            value = found.get(name)
            out[name] = None if value is None else str(value)
    return out


def _sample_csv(rows: list[dict[str, Any]], delivery: DeliveryConfig, seq: int) -> bytes:
    """The run's labelling sample: its predictions not labelled yet, drawn as ``sample``
    says, each with its inclusion probability (labelling.py)."""
    assert delivery.sample is not None
    plan = delivery.sample
    chosen = sample_rows(rows, {}, plan.n, (plan.seed, seq), plan.strategy, plan.by)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=LABELLING_COLUMNS)
    writer.writeheader()
    writer.writerows(chosen)
    return text.getvalue().encode()


def _remove_abandoned(directory: Path, name: str) -> None:
    """Hidden files of runs whose writers died long ago (a run is written again whole)."""
    now = time.time()
    for hidden in directory.glob(f".{name}-*.tmp"):
        try:
            if now - hidden.stat().st_mtime > LEASE_SECONDS:
                hidden.unlink()
        except FileNotFoundError:
            continue


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _publish(hidden: Path, path: Path) -> None:
    """Rename a hidden file into place, if it is there."""
    try:
        os.replace(hidden, path)
    except FileNotFoundError:
        return
    _sync_directory(path.parent)


def _write_atomically(path: Path, data: bytes) -> None:
    """``data`` at ``path`` whole or not at all: written to a hidden name, synced, renamed,
    and the directory synced (the rename itself survives a power cut)."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _sync_directory(path.parent)


def _sync_directory(path: Path) -> None:
    """Make a rename in ``path`` survive a power cut."""
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class DeliveryRunner:
    """Runs each configured delivery when it is due (its ``every`` since its last run)."""

    def __init__(self, store: Store, live: LiveConfig, metrics: Metrics) -> None:
        self._store = store
        self._live = live
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        #: when each delivery was last run by this gateway, and last swept
        self._looked: dict[str, float] = {}
        self._swept: dict[str, float] = {}

    def start(self) -> None:
        # always: a reload may add a delivery
        self._task = asyncio.create_task(self._loop(), name="deliveries")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _loop(self) -> None:
        await run_every(
            self._tick,
            self.run_due,
            task="deliveries",
            what="delivering files",
            errors=self._metrics.background_errors,
            log=log,
            quiet=STORE_ERRORS,
        )

    def _tick(self) -> float:
        """How long until the next look: the shortest schedule's, at most LOOK_SECONDS."""
        every = [
            duration_seconds(d.every)
            for d in self._live.loaded.config.deliveries
            if d.every is not None
        ]
        return min([LOOK_SECONDS, *every])

    async def run_due(self) -> None:
        for delivery in self._live.loaded.config.deliveries:
            if delivery.every is None:
                continue
            runs = await self._store.delivery_runs(delivery.name)
            now = time.time()
            # a run is due its ``every`` after the last one, or after the last look that
            # found nothing new; at once when one is unfinished
            last = max(
                [run["claimed_at"] for run in runs[-1:]]
                + [self._looked.get(delivery.name, -math.inf)]
                or [-math.inf]
            )
            unfinished = any(run["written_at"] is None for run in runs)
            if not unfinished and now - last < duration_seconds(delivery.every):
                continue
            swept = self._swept.get(delivery.name)
            sweep = swept is None or now - swept >= SWEEP_SECONDS
            try:
                written = await self._run(delivery, now, sweep)
            except DeliveryBusy:
                continue  # another worker is running it now
            except Exception:
                # one delivery's failure (its directory, a race lost to another gateway)
                # holds back none of the others
                log.exception("delivery %s failed; tried again at the next look", delivery.name)
                self._metrics.background_errors.labels("deliveries").inc()
                self._looked[delivery.name] = now
                continue
            self._looked[delivery.name] = now
            if sweep:
                self._swept[delivery.name] = now
            for path, rows in written:
                log.info("delivery %s: %s, %d predictions", delivery.name, path, rows)
                self._metrics.delivered_rows.labels(delivery.name).inc(rows)

    async def _run(
        self, delivery: DeliveryConfig, now: float, sweep: bool
    ) -> list[tuple[str, int]]:
        """One run, in a process of its own (``model-gateway export --since-last``): reading
        the rows and writing the file takes CPU the serving loop would otherwise lose. Where
        the configuration is no file a process could read, in this one."""
        source = Path(self._live.loaded.source)
        if not await asyncio.to_thread(source.is_file):
            done = await deliver(self._store, delivery, now, sweep=sweep)
            return [(str(d.path), d.rows) for d in done]
        command = [sys.executable, "-m", "model_gateway", "export", "--config", str(source)]
        command += ["--since-last", delivery.name, *([] if sweep else ["--recent"])]
        # its output to files, not pipes: a run cut short by the gateway's stop leaves only
        # the process to reap, no pipe open on a loop about to close
        with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
            process = await asyncio.create_subprocess_exec(*command, stdout=stdout, stderr=stderr)
            try:
                await process.wait()
            except asyncio.CancelledError:
                # the gateway stops: a run cut short is finished by the next one
                if process.returncode is None:
                    process.kill()
                await process.wait()
                raise
            stdout.seek(0)
            stderr.seek(0)
            out, err = stdout.read(), stderr.read()
        if process.returncode == BUSY_EXIT:
            raise DeliveryBusy(delivery.directory)
        if process.returncode != 0:
            said = err.decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(
                f"delivery {delivery.name}: exit {process.returncode}: {' / '.join(said)}"
            )
        found = [orjson.loads(line) for line in out.splitlines() if line.startswith(b"{")]
        return [(item["file"], int(item["rows"])) for item in found]
