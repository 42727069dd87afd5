"""Which variants may take traffic: active health checks and passive ejection.

A variant is up until proven otherwise. Active checks (``health.path``) take it down after
``unhealthy_threshold`` failed checks and bring it back after ``healthy_threshold`` passing
ones. Passive ejection takes it down after ``passive_failures`` consecutive failed requests
(connection refused, reset, timeout, or a 502/503/504 from the model server); it comes back
when an active check passes or, without active checks, after ``ejection_seconds``.

The hot path reads only :attr:`HealthMonitor.down`: route name to the frozenset of variant
names that are down, absent when all are up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import aiohttp

from .config import HealthConfig
from .errors import CLIENT_CLOSED_REQUEST
from .metrics import Metrics
from .redaction import redact_url
from .routing import Route

log = logging.getLogger("model_gateway.health")

_FAILED_STATUSES = frozenset({502, 503, 504})


@dataclass(slots=True)
class VariantHealth:
    route: str
    variant: str
    url: str
    config: HealthConfig
    up: bool = True
    passes: int = 0
    fails: int = 0
    request_failures: int = 0
    ejected_until: float = 0.0


class HealthMonitor:
    def __init__(self, metrics: Metrics, session: aiohttp.ClientSession) -> None:
        self._metrics = metrics
        self._session = session
        self._states: dict[tuple[str, str], VariantHealth] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.down: dict[str, frozenset[str]] = {}

    def configure(self, routes: tuple[Route, ...]) -> None:
        """(Re)start checks for a configuration; a variant unchanged keeps its state."""
        self._cancel_tasks()
        old, self._states = self._states, {}
        for route in routes:
            for variant in route.variants:
                key = (route.name, variant.name)
                state = old.get(key)
                if state is None or state.url != variant.url:
                    state = VariantHealth(
                        route.name, variant.name, variant.url, route.config.health
                    )
                else:
                    state.config = route.config.health
                self._states[key] = state
                self._metrics.variant_weight.labels(route.name, variant.name).set(variant.weight)
                self._metrics.variant_up.labels(route.name, variant.name).set(int(state.up))
                if state.config.path is not None:
                    self._tasks.append(
                        asyncio.create_task(self._check_loop(state), name=f"health-{key}")
                    )
        self._publish()

    async def close(self) -> None:
        self._cancel_tasks()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()

    def record_result(self, route: str, variant: str, status: int) -> None:
        """Passive health: called by the proxy after each exchange."""
        state = self._states.get((route, variant))
        if state is None:
            return
        if status not in _FAILED_STATUSES:
            # a client that left says nothing of the model server either way (nginx's
            # max_fails and Envoy's outlier detection do not count it)
            if status != CLIENT_CLOSED_REQUEST:
                state.request_failures = 0
            return
        state.request_failures += 1
        limit = state.config.passive_failures
        if limit and state.up and state.request_failures >= limit:
            state.ejected_until = time.monotonic() + state.config.ejection_seconds
            self._metrics.ejections.labels(route, variant).inc()
            self._set(state, up=False, why=f"{state.request_failures} consecutive failed requests")
            if state.config.path is None:
                asyncio.get_running_loop().call_later(
                    state.config.ejection_seconds, self._readmit, state
                )

    def _readmit(self, state: VariantHealth) -> None:
        if self._states.get((state.route, state.variant)) is state and not state.up:
            self._set(state, up=True, why="ejection time over")

    async def _check_loop(self, state: VariantHealth) -> None:
        assert state.config.path is not None
        url = state.url + state.config.path
        timeout = aiohttp.ClientTimeout(total=state.config.timeout)
        while True:
            try:
                self._check_once(state, url, await self._probe(url, timeout))
            except Exception:
                # a fault of the checker's own: said and counted; the checks go on
                log.exception("health check of %s failed", redact_url(url))
                self._metrics.background_errors.labels("health-check").inc()
            await asyncio.sleep(state.config.interval)

    def _check_once(self, state: VariantHealth, url: str, ok: bool) -> None:
        self._metrics.health_checks.labels(
            state.route, state.variant, "pass" if ok else "fail"
        ).inc()
        if ok:
            state.passes, state.fails = state.passes + 1, 0
            if not state.up and state.passes >= state.config.healthy_threshold:
                state.request_failures = 0
                self._set(state, up=True, why=f"{state.passes} passing checks")
        else:
            state.passes, state.fails = 0, state.fails + 1
            if state.up and state.fails >= state.config.unhealthy_threshold:
                why = f"{state.fails} failing checks of {redact_url(url)}"
                self._set(state, up=False, why=why)

    async def _probe(self, url: str, limit: aiohttp.ClientTimeout) -> bool:
        try:
            async with self._session.get(url, timeout=limit, allow_redirects=False) as resp:
                await resp.read()
                return 200 <= resp.status < 300
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    def _set(self, state: VariantHealth, *, up: bool, why: str) -> None:
        state.up = up
        self._metrics.variant_up.labels(state.route, state.variant).set(int(up))
        log.warning(
            "variant %s/%s is %s: %s", state.route, state.variant, "up" if up else "down", why
        )
        self._publish()

    def _publish(self) -> None:
        down: dict[str, set[str]] = {}
        for state in self._states.values():
            if not state.up:
                down.setdefault(state.route, set()).add(state.variant)
        self.down = {route: frozenset(names) for route, names in down.items()}
