"""The spool: a local append-only file that makes a record durable before its answer leaves
(``storage.durability: answered``).

Each answered request's record is appended and flushed to disk (``fdatasync``) before the
first byte of its answer is sent; the record then goes through the log queue to the store as
in ``buffered`` mode. Appends that arrive while a flush runs are written by the next one
together (group commit): a flush costs one write and one sync on a thread, whatever the
number of requests waiting on it.

The spool is a directory of segment files, each written by one process and locked by it
(``flock``) for as long as it holds records not yet in the store. A segment is closed after
:data:`SEGMENT_SECONDS` or :data:`SEGMENT_BYTES`, and deleted once every record in it has
reached the store (written, or kept as a dead letter). A process that starts takes every
segment no live process holds (a gateway killed, or a worker replaced) and writes its records
to the store first; a record already there is skipped, so a record is never stored twice.

An entry is its length and CRC-32 (8 bytes) and the record's row, ``marshal``-ed. A crash
can leave an entry half written: that entry's flush never finished, so its answer never left,
and reading a segment stops there.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import marshal
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger("model_gateway.spool")

ENTRY_HEADER = struct.Struct("<II")
#: a segment is closed after this long, or this size, whichever comes first
SEGMENT_SECONDS = 10.0
SEGMENT_BYTES = 64 * 1024 * 1024
SUFFIX = ".spool"


class Segment:
    """One file of the spool, open and locked by this process."""

    def __init__(self, path: Path, number: int) -> None:
        self.path = path
        self.number = number
        # Made under another name, locked, then renamed: a process that starts never sees
        # a segment of this process before it is locked (it would take it for a dead one's).
        making = path.with_suffix(".new")
        self.fd = os.open(making, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(making, path)
        except BaseException:
            os.close(self.fd)
            with contextlib.suppress(OSError):
                making.unlink()
            raise
        self.opened = time.monotonic()
        self.size = 0
        #: records appended whose store write has not yet finished
        self.pending = 0
        self.closed = False
        self._released = False

    def remove(self) -> None:
        if self._released:
            return
        self._released = True
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)

    def keep(self) -> None:
        """Close the file, and so its lock, leaving it for the next start to write."""
        if not self._released:
            self._released = True
            os.close(self.fd)


class Spool:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._segments: dict[int, Segment] = {}
        self._current: Segment | None = None
        self._numbers = 0
        #: entries waiting for the next flush, each with its segment, and the appends
        #: waiting on it
        self._buffer: list[tuple[Segment, bytes]] = []
        self._waiting: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._closing = False

    def recover(self) -> list[tuple[Any, ...]]:
        """The rows of every segment no live process holds (left by a process that died),
        whose segments are then this process's, deleted by :meth:`forget_recovered`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._recovered: list[tuple[Path, BinaryIO]] = []
        rows: list[tuple[Any, ...]] = []
        for making in self.directory.glob("*.new"):
            # a segment a process died making, before it had a record: gone, unless locked
            with contextlib.suppress(OSError), open(making, "rb") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                making.unlink()
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                handle = open(path, "rb")  # noqa: SIM115 - held until forget_recovered
            except OSError:
                continue  # deleted meanwhile by the process that wrote it
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()  # a live process holds it
                continue
            rows.extend(read_segment(handle))
            self._recovered.append((path, handle))
        return rows

    def forget_recovered(self) -> None:
        """The recovered rows are in the store: their segments go."""
        for path, handle in getattr(self, "_recovered", []):
            with contextlib.suppress(OSError):
                path.unlink()
            handle.close()
        self._recovered = []

    def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_loop(), name="spool-flush")

    async def append(self, row: tuple[Any, ...]) -> int:
        """Append a record's row; returns once it is on disk, with the number of its
        segment (give it back to :meth:`done` once the record is in the store)."""
        payload = marshal.dumps(row)
        entry = ENTRY_HEADER.pack(len(payload), zlib.crc32(payload)) + payload
        segment = self._segment_for(len(entry))
        segment.pending += 1
        self._buffer.append((segment, entry))
        flushed = asyncio.get_running_loop().create_future()
        self._waiting.append(flushed)
        self._wakeup.set()
        try:
            await flushed
        except BaseException:
            # not on disk, or nobody waits for it: not the spool's to keep (the segment goes
            # after its flush, never during one)
            segment.pending -= 1
            raise
        return segment.number

    def done(self, numbers: list[int]) -> None:
        """These records (by segment number) are in the store."""
        for number in numbers:
            segment = self._segments.get(number)
            if segment is None:
                continue
            segment.pending -= 1
            self._remove_if_done(segment)

    def _segment_for(self, size: int) -> Segment:
        current = self._current
        if current is not None and (
            current.size + size > SEGMENT_BYTES
            or time.monotonic() - current.opened > SEGMENT_SECONDS
        ):
            # closed to new records; it goes once the last of its own is in the store
            current.closed = True
            self._remove_if_done(current)
            current = None
        if current is None:
            self._numbers += 1
            name = f"{os.getpid()}-{time.time_ns()}-{self._numbers}{SUFFIX}"
            current = Segment(self.directory / name, self._numbers)
            self._segments[current.number] = current
            self._current = current
        current.size += size
        return current

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._buffer:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            entries, waiting = self._buffer, self._waiting
            self._buffer, self._waiting = [], []
            writes: dict[Segment, list[bytes]] = {}
            for segment, entry in entries:
                writes.setdefault(segment, []).append(entry)
            try:
                for segment, data in writes.items():
                    await loop.run_in_executor(None, _write_and_sync, segment.fd, b"".join(data))
            except BaseException as exc:
                for future in waiting:
                    if not future.done():
                        future.set_exception(OSError(f"the spool could not be written: {exc}"))
                # A failed write may have left part of an entry: nothing more goes after it
                # (reading stops at the first damaged entry). New appends start a new segment.
                for segment in writes:
                    segment.closed = True
                    if segment is self._current:
                        self._current = None
                if not isinstance(exc, Exception):
                    raise
                log.error("writing the spool failed: %s", exc)
                continue
            for future in waiting:
                if not future.done():
                    future.set_result(None)
            for segment in writes:
                self._remove_if_done(segment)

    def _remove_if_done(self, segment: Segment) -> None:
        if segment.closed and segment.pending <= 0 and segment.number in self._segments:
            del self._segments[segment.number]
            segment.remove()

    async def close(self) -> None:
        """Flush what is buffered and stop. Segments whose records are all in the store are
        gone; any other stays for the next start."""
        self._closing = True
        self._wakeup.set()
        if self._flusher is not None:
            await self._flusher
            self._flusher = None
        for number, segment in list(self._segments.items()):
            del self._segments[number]
            if segment.pending <= 0:
                segment.remove()
            else:
                segment.keep()  # the lock goes with it: the next start writes its records


def _write_and_sync(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fdatasync(fd)


def read_segment(handle: BinaryIO) -> list[tuple[Any, ...]]:
    """The rows of a segment, up to the first entry that is incomplete or damaged."""
    data = handle.read()
    rows = []
    offset = 0
    while offset + ENTRY_HEADER.size <= len(data):
        length, checksum = ENTRY_HEADER.unpack_from(data, offset)
        start = offset + ENTRY_HEADER.size
        payload = data[start : start + length]
        if len(payload) < length or zlib.crc32(payload) != checksum:
            break
        # written by a gateway into its own spool directory
        rows.append(marshal.loads(payload))  # noqa: S302
        offset = start + length
    return rows
