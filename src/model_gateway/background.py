"""The gateway's long-lived background tasks: how one runs, and how one is stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import Counter


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has finished unwinding."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def run_every(
    interval: Callable[[], float],
    work: Callable[[], Awaitable[object]],
    *,
    task: str,
    what: str,
    errors: Counter,
    log: logging.Logger,
    quiet: tuple[type[BaseException], ...] = (),
) -> None:
    """Run ``work`` every ``interval()`` seconds until cancelled. A failure is caught,
    counted in ``errors`` under ``task``, logged, and the loop goes on: as one line for an
    expected kind (``quiet``: a store that is down, say, which would otherwise print a
    traceback each time), with its traceback for anything else."""
    while True:
        await asyncio.sleep(interval())
        try:
            await work()
        except Exception as exc:
            errors.labels(task).inc()
            if isinstance(exc, quiet):
                log.warning("%s failed, retrying: %s", what, exc)
            else:
                log.exception("%s failed; retrying", what)
