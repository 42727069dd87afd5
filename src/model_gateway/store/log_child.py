"""The process that writes the prediction log's batches into the SQLite file.

Run by :class:`~model_gateway.store.log_process.LogProcess` as a script (``python -I -S``),
so it imports nothing but the standard library, and of the gateway only ``features.py`` and
``tensors.py`` (the monitored features are read here, off the gateway's event loop). Why a
process and not aiosqlite's thread: see that module.

The protocol, over stdin and stdout:

- out, once, when the database is open: ``READY``;
- in, per batch: one flag byte (``PLAIN`` or ``REPLAY``), the payload's length (4 bytes,
  little-endian), and the rows as a ``marshal``-ed list of tuples, in the record's column order;
- out, per batch, once it is committed: ``OK``; or, once it is rolled back: ``FAILED``, the
  length of the rest (4 bytes), and ``<exception class name>:<message>`` in UTF-8 (the
  gateway raises the ``sqlite3`` exception of that name, or ``sqlite3.Error``).

``REPLAY`` marks a batch whose last attempt ended without an answer (the process died, or
the attempt was cancelled): it may have been committed, so rows already stored are skipped
(``INSERT OR IGNORE``) rather than failing the batch on their prediction ids.

The process ignores SIGINT and SIGTERM and exits when its stdin closes: a Ctrl+C meant for
the gateway reaches its whole process group, and the gateway still has records to hand over
while it shuts down. If the gateway dies, the pipe closes and so does this process.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import marshal
import signal
import sqlite3
import struct
import sys
import types
from pathlib import Path
from typing import Any, BinaryIO

READY, OK, FAILED = b"R", b"K", b"F"
PLAIN, REPLAY = 0, 1
HEADER = struct.Struct("<BI")
LENGTH = struct.Struct("<I")

# SQLite binds at most 32,766 parameters per statement (999 before 3.32).
_MAX_PARAMETERS = 32_766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999


def register_adapters() -> None:
    """sqlite3 binds int, float, str and bytearray as they are, but sends every other value,
    None and bytes included, through its adapter registry; a miss there raises, formats and
    clears an AttributeError per value (14 of a record's 27 are None without capture: ~17 k
    instructions per record, a third of the insert). Identity adapters turn the miss into a
    hit on a C function; an empty dict's ``get`` maps None to None."""
    no_adaptations: dict[None, None] = {}
    sqlite3.register_adapter(type(None), no_adaptations.get)
    sqlite3.register_adapter(bytes, bytes)


_read_features: Any = None


def _features_text(value: Any) -> str | None:
    global _read_features
    if _read_features is None:
        _read_features = _load_features_text()
    text: str | None = _read_features(value)
    return text


def _load_features_text() -> Any:
    """features.features_text, from the gateway's own source beside this file: features.py
    and the tensors.py it reads binary bodies with need only the standard library, and are
    loaded under a package name of their own, so that nothing else of the gateway is."""
    here = Path(__file__).resolve().parent.parent
    package = types.ModuleType("_model_gateway_log_features")
    package.__path__ = [str(here)]
    sys.modules[package.__name__] = package
    module = None
    for name in ("tensors", "features"):
        spec = importlib.util.spec_from_file_location(
            f"{package.__name__}.{name}", here / f"{name}.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module.features_text  # type: ignore[union-attr]


class BatchWriter:
    """Multi-row INSERTs of power-of-two sizes, one transaction per batch.

    Multi-row statements, not ``executemany``, which steps once per row. Power-of-two sizes
    keep the prepared-statement cache to a handful of entries, and the default batch size
    (512) is one of them, so that a full batch is one statement.
    """

    def __init__(self, conn: sqlite3.Connection, columns: list[str]) -> None:
        self.conn = conn
        # a record's monitored features come to be read (its route's spec, the request's
        # body): read and written as JSON text here, off the gateway's event loop
        self._features = columns.index("features") if "features" in columns else -1
        self._columns = ", ".join(columns)
        self._row = "(" + ", ".join("?" * len(columns)) + ")"
        self.max_rows = 1 << ((_MAX_PARAMETERS // len(columns)).bit_length() - 1)
        self._statements: dict[tuple[int, bool], str] = {}

    def statement(self, rows: int, replay: bool) -> str:
        sql = self._statements.get((rows, replay))
        if sql is None:
            verb = "INSERT OR IGNORE" if replay else "INSERT"
            values = ", ".join([self._row] * rows)
            # column names are the record's own constants, never input; values are parameters
            sql = f"{verb} INTO predictions ({self._columns}) VALUES {values}"
            self._statements[(rows, replay)] = sql
        return sql

    def _read(self, row: tuple[Any, ...]) -> tuple[Any, ...]:
        at = self._features
        value = row[at]
        if value is None or isinstance(value, str):
            return row
        return (*row[:at], _features_text(value), *row[at + 1 :])

    def write(self, rows: list[tuple[Any, ...]], replay: bool) -> None:
        """All of ``rows`` committed, or none of them and the error raised."""
        try:
            start = 0
            while start < len(rows):
                size = min(self.max_rows, 1 << ((len(rows) - start).bit_length() - 1))
                chunk = rows[start : start + size]
                if self._features >= 0:
                    chunk = [self._read(row) for row in chunk]
                self.conn.execute(self.statement(size, replay), [v for row in chunk for v in row])
                start += size
            self.conn.commit()
        except BaseException:
            self.conn.rollback()
            raise


def serve(writer: BatchWriter, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Answer batches until stdin closes."""
    while True:
        header = stdin.read(HEADER.size)
        if len(header) < HEADER.size:
            return
        flag, size = HEADER.unpack(header)
        payload = stdin.read(size)
        if len(payload) < size:
            return
        try:
            # the payload comes from the gateway that started this process, over its pipe
            writer.write(marshal.loads(payload), flag == REPLAY)  # noqa: S302
        except Exception as exc:  # the batch is refused, not the process ended
            message = f"{type(exc).__name__}:{exc}".encode()
            stdout.write(FAILED + LENGTH.pack(len(message)) + message)
        else:
            stdout.write(OK)
        stdout.flush()


# A full default batch marshals to ~150 kB: a pipe of 1 MiB takes it in one write instead of
# several rounds of write, wait for room, write (Linux allows 1 MiB without privileges). Set
# here, on the read end, as the gateway's loop may not expose the write end's descriptor.
# Under uvloop stdin is a Unix socket pair instead, whose default buffer (~208 kB) already
# holds a full batch, and the call fails harmlessly.
PIPE_BYTES = 1 << 20


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        with contextlib.suppress(OSError):  # a smaller pipe only costs more writes
            fcntl.fcntl(sys.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    path, columns = sys.argv[1], sys.argv[2].split(",")
    if len(sys.argv) > 3:
        # orjson's home, after the standard library's: features are read faster with it
        sys.path.append(sys.argv[3])
    register_adapters()
    try:
        conn = sqlite3.connect(path)
        # The gateway set journal_mode=WAL on the file; synchronous and busy_timeout are per
        # connection. NORMAL is durable across process crashes, the failure this log must
        # survive.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=10000")
    except sqlite3.Error as exc:
        # the gateway reports the failed start; this says why, in its log
        print(f"model-gateway log process: {path}: {exc}", file=sys.stderr)
        sys.exit(1)
    stdout = sys.stdout.buffer
    stdout.write(READY)
    stdout.flush()
    try:
        serve(BatchWriter(conn, columns), sys.stdin.buffer, stdout)
    finally:
        conn.close()


if __name__ == "__main__":
    main()
