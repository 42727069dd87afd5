"""The SQLite store's prediction log, written by a process of its own.

Everything else the SQLite store does goes through aiosqlite's thread; the log's batches do
not. Each batch written on that thread held the GIL while binding its rows and handed work
to the thread and back once per statement and once per commit: every hand-over is a GIL
switch the event loop waits through: the event loop lost more time per request to the write
than the thread spent on it (docs/design.md). A process has a GIL of its own: the event loop
pays one ``marshal.dumps`` and one pipe write per batch, and waits for the answer without
the GIL.

The process (:mod:`.log_child`) is started when the store opens, started again by the next
write if it died, and closed with the store after the last batch. A batch counts as written
only once the process answers that it committed it; the writer retries one that fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import marshal
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from . import log_child
from .base import StoreDataError

CHILD_SCRIPT = str(Path(log_child.__file__).resolve())
#: where orjson is installed: the process reads monitored features with it when it can
ORJSON_HOME = str(Path(orjson.__file__).resolve().parent.parent)
#: the exceptions the process sends back that a row's values caused: binding a value sqlite3
#: cannot take (an unpaired surrogate: UnicodeEncodeError; an integer past 64 bits:
#: OverflowError; a type it has no adapter for: ProgrammingError "Error binding"), or a
#: constraint
_DATA_ERRORS = frozenset(
    {
        "DataError",
        "IntegrityError",
        "UnicodeEncodeError",
        "OverflowError",
    }
)
CLOSE_SECONDS = 10.0


class LogProcessError(sqlite3.OperationalError):
    """The log process died, or could not start, before it answered."""


class LogProcess:
    def __init__(self, path: str, columns: Sequence[str]) -> None:
        self._path = path
        self._columns = ",".join(columns)
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        # the last batch was sent but got no answer: it may have been committed
        self._unsure = False

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    async def start(self) -> None:
        async with self._lock:
            await self._start()

    async def _start(self) -> asyncio.subprocess.Process:
        # -I: no PYTHON* variables, no user site; -S: no site packages. The script needs only
        # the standard library, and starts in tens of milliseconds.
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-I", "-S", CHILD_SCRIPT, self._path, self._columns, ORJSON_HOME),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdin is not None and process.stdout is not None
        try:
            ready = await process.stdout.readexactly(1)
        except asyncio.IncompleteReadError:
            ready = b""
        except BaseException:
            # cancelled before it was ready: nothing else holds it, so it would run as long
            # as the gateway does
            await _kill(process)
            raise
        if ready != log_child.READY:
            await _kill(process)
            raise LogProcessError(f"the log process could not open {self._path}")
        self._process = process
        return process

    async def write(self, rows: Sequence[tuple[Any, ...]], *, replay: bool = False) -> None:
        """Every row committed when this returns; none of them when it raises a sqlite3
        error (or :class:`StoreDataError`) the process sent back; unknown when the process
        died (the next write then skips the rows already stored, as ``replay`` asks)."""
        async with self._lock:
            process = self._process or await self._start()
            assert process.stdin is not None and process.stdout is not None
            payload = marshal.dumps(rows if isinstance(rows, list) else list(rows))
            flag = log_child.REPLAY if self._unsure or replay else log_child.PLAIN
            self._unsure = True
            try:
                process.stdin.write(log_child.HEADER.pack(flag, len(payload)))
                process.stdin.write(payload)
                await process.stdin.drain()
                answer = await process.stdout.readexactly(1)
                if answer != log_child.OK:
                    size = log_child.LENGTH.unpack(await process.stdout.readexactly(4))[0]
                    message = (await process.stdout.readexactly(size)).decode()
            except (ConnectionError, asyncio.IncompleteReadError) as error:
                self._process = None
                await _kill(process)
                raise LogProcessError("the log process exited before it answered") from error
            except BaseException:
                # cancelled half-way: the pipe's state is unknown, so the process goes
                self._process = None
                await _kill(process)
                raise
            self._unsure = False
            if answer != log_child.OK:
                name, _, text = message.partition(":")
                if name in _DATA_ERRORS or (
                    name in ("ProgrammingError", "InterfaceError") and "binding" in text
                ):
                    raise StoreDataError(f"{name}: {text}")
                error_type = getattr(sqlite3, name, sqlite3.Error)
                if not (isinstance(error_type, type) and issubclass(error_type, sqlite3.Error)):
                    error_type = sqlite3.Error
                raise error_type(text)

    async def close(self) -> None:
        """Let the process finish what it was sent and exit."""
        async with self._lock:
            process, self._process = self._process, None
            if process is None:
                return
            assert process.stdin is not None
            process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), CLOSE_SECONDS)
            except TimeoutError:
                await _kill(process)


async def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
