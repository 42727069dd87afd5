"""Hot reload: SIGHUP, a change of the config file, or ``POST /admin/reload``.

Each re-reads the file the gateway started with. A file that fails validation never replaces
the live configuration: the problems are logged, counted and returned, and the old routing
stays. A valid file becomes active at once for new requests; requests in flight finish on the
configuration they started with (they hold their own reference to it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .background import cancel_and_wait
from .config import LoadedConfig, load_config
from .errors import ConfigError
from .live import LiveConfig
from .store.base import STORE_ERRORS

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("model_gateway.reload")

# Sections the running process cannot swap: they name sockets and files it already holds.
RESTART_ONLY = ("server.host", "server.port", "storage")


@dataclass(frozen=True, slots=True)
class ReloadResult:
    outcome: Literal["reloaded", "unchanged", "failed"]
    version: str
    problems: list[str] = field(default_factory=list)


def restart_only_changes(old: LoadedConfig, new: LoadedConfig) -> list[str]:
    problems = []
    if old.config.storage != new.config.storage:
        problems.append("storage: changes take effect only on restart")
    for key in ("host", "port", "shutdown_timeout"):
        if getattr(old.config.server, key) != getattr(new.config.server, key):
            problems.append(f"server.{key}: changes take effect only on restart")
    return problems


class ConfigReloader:
    def __init__(self, live: LiveConfig, metrics: Metrics) -> None:
        self._live = live
        self._metrics = metrics
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._signal_installed = False
        self._pending: set[asyncio.Future[bool]] = set()
        self._file_state = _file_state(live.loaded.source)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            self._signal_installed = True
        except (NotImplementedError, RuntimeError, ValueError):
            # not the main thread (tests, embedding): reload by API and file watch only
            log.debug("SIGHUP handler not installed")
        interval = self._live.loaded.config.server.config_poll_interval
        if interval > 0:
            self._poller = asyncio.create_task(self._poll(interval), name="config-file-watch")

    async def stop(self) -> None:
        if self._signal_installed:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await cancel_and_wait(self._poller)
        for task in tuple(self._pending):
            await task

    def _on_sighup(self) -> None:
        task = asyncio.ensure_future(self._reload_in_background("SIGHUP"))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _reload_in_background(self, trigger: str) -> bool:
        """A reload nobody waits for: a failure of the store under it is logged and counted,
        never raised (it would end the loop, or fail the shutdown that awaits it). ``True``
        when it ran to a result, valid or not."""
        try:
            await self.reload(trigger)
        except Exception as exc:
            self._metrics.background_errors.labels("config-reload").inc()
            self._metrics.config_reload_failures.inc()
            if isinstance(exc, STORE_ERRORS):
                log.error("config reload on %s failed, to be tried again: %s", trigger, exc)
            else:
                log.exception("config reload on %s failed, to be tried again", trigger)
            return False
        return True

    async def _poll(self, interval: float) -> None:
        # Polling stat() rather than inotify: it also sees the symlink swap that Kubernetes
        # uses to update a mounted ConfigMap, which inotify on the file misses.
        while True:
            await asyncio.sleep(interval)
            state = _file_state(self._live.loaded.source)
            if state != self._file_state and await self._reload_in_background("file change"):
                # only a change that was read is done with: a failed one is tried next time
                self._file_state = state

    async def reload(self, trigger: str) -> ReloadResult:
        async with self._lock:
            current = self._live.file  # the file as last read, not what a rollout overlays
            try:
                new = load_config(current.source)
            except ConfigError as exc:
                return self._failed(trigger, current.version, exc.problems)
            if new.version == current.version:
                return ReloadResult("unchanged", current.version)
            problems = restart_only_changes(current, new)
            if problems:
                return self._failed(trigger, current.version, problems)
            await self._live.replace(new, time.time())
            self._metrics.config_reloads.inc()
            log.info("config reloaded on %s: %s -> %s", trigger, current.version, new.version)
            return ReloadResult("reloaded", new.version)

    def _failed(self, trigger: str, version: str, problems: list[str]) -> ReloadResult:
        self._metrics.config_reload_failures.inc()
        log.error(
            "config reload on %s failed; version %s stays live:\n  %s",
            trigger,
            version,
            "\n  ".join(problems),
        )
        return ReloadResult("failed", version, problems)


def _file_state(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
