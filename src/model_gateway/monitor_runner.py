"""Computes the monitored routes' statistics on a schedule and exports them (docs/monitoring.md).

Every gateway sharing a store computes the same figures from it: a replica's gauges say
what the fleet's traffic did, not what its own share did. Each look reads, per route and
window, at most ``monitoring.max_rows`` of the latest records and the route's references;
the statistics are computed in a thread, so the event loop only waits on the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .background import cancel_and_wait, run_every
from .config import RouteConfig, duration_seconds
from .control_answers import format_rfc3339
from .drift import STATISTICS
from .live import LiveConfig
from .metrics import Metrics
from .monitoring import stored_references, window_rows, window_statistics
from .store import Store
from .store.base import STORE_ERRORS

log = logging.getLogger("model_gateway.monitoring")


class DriftMonitor:
    """The monitoring of one gateway's routes: each window's latest statistics."""

    def __init__(self, store: Store, live: LiveConfig, metrics: Metrics) -> None:
        self._store = store
        self._live = live
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        #: each route's latest statistics, every window's, as last computed
        self.latest: dict[str, list[dict[str, Any]]] = {}
        #: when a route's statistics were last computed
        self._computed: dict[str, float] = {}
        #: the series each route's gauges hold: (variant, feature, window)
        self._exported: dict[str, set[tuple[str, str, str]]] = {}
        #: each route's first window when its gauges were last set (the drift gauge's)
        self._first: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def statistics(self, route: str) -> dict[str, Any]:
        """A route's latest statistics of every window, computed now if they never were."""
        if route not in self.latest:
            await self.look(every=True)
        computed = self._computed.get(route) if route in self.latest else None
        return {
            "computed_at": None if computed is None else format_rfc3339(computed),
            "statistics": self.latest.get(route, []),
        }

    def routes(self) -> list[RouteConfig]:
        return [r for r in self._live.loaded.config.routes if r.monitoring is not None]

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="drift-monitor")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _loop(self) -> None:
        await run_every(
            self._tick,
            self.look,
            task="monitoring",
            what="computing the monitored statistics",
            errors=self._metrics.background_errors,
            log=log,
            quiet=STORE_ERRORS,
        )

    def _tick(self) -> float:
        """How long until the next look: each route is looked at on its own interval."""
        intervals = [r.monitoring.interval for r in self.routes() if r.monitoring is not None]
        return min([*intervals, 5.0]) if intervals else 5.0

    async def look(self, now: float | None = None, *, every: bool = False) -> None:
        """Compute the statistics of each route due (``every``: of all of them) and export
        them. One look at a time: a later one never gives way to older figures."""
        async with self._lock:
            await self._look(time.time() if now is None else now, every)

    async def _look(self, now: float, every: bool) -> None:
        routes = self.routes()
        for gone in set(self._exported) - {r.name for r in routes}:
            self._export(gone, [], "")
        for route in routes:
            monitoring = route.monitoring
            assert monitoring is not None
            # a route's first look is an interval after it is first seen (a gateway starting
            # under load is not given this work at once), unless asked for
            due = self._computed.setdefault(route.name, now) + monitoring.interval
            if not every and now < due:
                continue
            self._computed[route.name] = now
            began = time.perf_counter()
            references = await stored_references(self._store, route.name)
            found = []
            for window in monitoring.windows:
                since = now - duration_seconds(window)
                most = monitoring.max_rows
                rows = await window_rows(self._store, route.name, since, now, most)
                found += await asyncio.to_thread(window_statistics, route, rows, references, window)
            self.latest[route.name] = found
            self._export(route.name, found, monitoring.windows[0])
            self._metrics.monitoring_look_seconds.labels(route.name).set(
                time.perf_counter() - began
            )

    def _export(self, route: str, found: list[dict[str, Any]], first: str) -> None:
        """The gauges of ``route``: one series per variant, feature and window, from the
        model version with the most values in it (the gauges name no version: while one
        takes over from another, or errors log the configured one, the main one shows); a
        series exported before and not now (a variant without traffic, a feature or route
        no longer monitored) is cleared, so that no alert fires on figures of the past."""
        chosen: dict[tuple[str, str, str], dict[str, Any]] = {}
        for entry in found:
            key = (entry["variant"], entry["feature"], entry["window"])
            if key not in chosen or entry["count"] > chosen[key]["count"]:
                chosen[key] = entry
        was_first = self._first.get(route)
        for variant, feature, window in self._exported.get(route, set()) - set(chosen):
            drift = window == was_first
            metrics = self._metrics
            metrics.clear_feature_statistics(route, variant, feature, window, STATISTICS, drift)
        self._metrics.set_feature_statistics(route, list(chosen.values()), STATISTICS, first)
        self._exported[route] = set(chosen)
        self._first[route] = first
