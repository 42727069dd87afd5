"""Runs the rollouts the configuration names: looks at their gates, moves them, and makes what
they decided live in this gateway.

Every gateway sharing a store (the workers of one, the replicas of a fleet) runs one; a lease
in the store (:meth:`~model_gateway.store.base.Store.lease_rollout`) makes exactly one of them
the rollout's decider at a time. The others follow: at each look they read each rollout's
state from the store and serve the weights it gives. A decider that stops renewing its lease
(killed, cut off from the store) hands the rollout to the next gateway that looks once the
lease has run out. The state lives in the store, so a restart of any gateway picks the
rollout up where it was.

Rule for the file and a rollout: the file stays the operator's. While a route's ``rollout``
section names a rollout, that rollout owns the weights of its champion and challenger (they
share what the file gives them together); every other setting, and every other variant's
weight, is the file's, and a reload takes them. Removing the section, or giving it a new id,
gives the weights back to the file (a new id starts a new rollout from its first step).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from typing import Any

from .background import cancel_and_wait, run_every
from .config import LoadedConfig, RouteConfig
from .live import LiveConfig
from .metrics import Metrics
from .quality import build_report
from .rollouts import (
    RolloutState,
    act,
    challenger_percent,
    champion_of,
    describe,
    judge_gates,
    label_free,
    look,
    overlaid,
    step_figures,
    weights,
)
from .store import Store
from .store.base import STORE_ERRORS

log = logging.getLogger("model_gateway.rollouts")

#: a decider's lease lasts this many of its looks, and at least LEASE_SECONDS: a look or two
#: held up on a busy machine does not hand the rollout over
LEASE_LOOKS = 3
LEASE_SECONDS = 10.0
#: the operational and label-free gates judge the step's latest requests, at most this many:
#: a look costs the same however long the step and busy the route
LATEST_ROWS_JUDGED = 5_000


class RolloutRunner:
    """The rollouts of one gateway: their states as last read from the store, the decisions
    this gateway makes while it holds their leases, and the overlay it serves."""

    def __init__(self, store: Store, live: LiveConfig, metrics: Metrics) -> None:
        self._store = store
        self._live = live
        self._metrics = metrics
        #: who this gateway is, in the store's leases
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        #: each rollout's state as last read or decided, which the overlay serves
        self.states: dict[str, RolloutState] = {}
        #: each rollout's state once what it gives is live: what the control plane shows,
        #: so that a rollback seen there is a rollback in force
        self.published: dict[str, RolloutState] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        live.overlay_with(self.overlay)

    def routes(self) -> list[RouteConfig]:
        """The routes of the file that name a rollout."""
        return [r for r in self._live.file.config.routes if r.rollout is not None]

    def overlay(self, file: LoadedConfig) -> LoadedConfig:
        """``file`` with the weights of the rollouts it names, as their states give them."""
        moved = {}
        for route in file.config.routes:
            state = self.states.get(route.rollout.id) if route.rollout is not None else None
            if state is not None and state.route == route.name:
                moved[route.name] = weights(route, state)
        return overlaid(file, moved)

    async def start(self) -> None:
        """Read the rollouts' states (starting those new to the store), serve their weights,
        and look at them from now on."""
        if self.routes():
            try:
                await self.step(time.time())
            except STORE_ERRORS as exc:
                log.warning("rollouts not read at start, retrying: %s", exc)
        self._task = asyncio.create_task(self._loop(), name="rollouts")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _loop(self) -> None:
        def interval() -> float:
            return min((r.rollout.interval for r in self.routes() if r.rollout), default=5.0)

        async def look() -> None:
            if self.routes():
                await self.step(time.time())

        await run_every(
            interval,
            look,
            task="rollouts",
            what="looking at the rollouts",
            errors=self._metrics.background_errors,
            log=log,
            quiet=STORE_ERRORS,
        )

    async def step(self, now: float) -> None:
        """One look: every rollout's state read, judged where this gateway decides, and what
        they give made live."""
        async with self._lock:
            routes = self.routes()
            stored = {row["id"]: row for row in await self._store.rollouts()}
            for route in routes:
                assert route.rollout is not None
                rollout = route.rollout
                row = stored.get(rollout.id)
                if row is None:
                    row = await self._store.begin_rollout(
                        RolloutState.begin(rollout, route.name, now).as_row()
                    )
                    log.info("rollout %s of route %s started", rollout.id, route.name)
                state = RolloutState.from_row(row)
                self.states[rollout.id] = state
                lease = max(LEASE_LOOKS * rollout.interval, LEASE_SECONDS)
                if await self._store.lease_rollout(rollout.id, self.holder, now, now + lease):
                    self.states[rollout.id] = await self._decide(route, state, now)
            await self._serve(now)

    async def _decide(self, route: RouteConfig, state: RolloutState, now: float) -> RolloutState:
        rollout = route.rollout
        assert rollout is not None
        if state.status != "running":
            return state
        step_rows = await self._store.latest_rows(
            route.name, state.step_started_at, now, LATEST_ROWS_JUDGED
        )
        labels_needed = rollout.gates.quality or rollout.min_labelled > 0
        whole_rows = (
            await self._store.labelled_rows(route.name, state.started_at, now)
            if labels_needed
            else []
        )
        verdict, labelled = await asyncio.to_thread(
            _judge, route, step_rows, whole_rows, state.step_started_at, state.started_at, now
        )
        move = look(rollout, state, verdict, labelled, now)
        if move.decision is None:
            return state
        if not await self._store.save_rollout(move.state.as_row(), self.holder, state.updated_at):
            # the lease went to another gateway meanwhile, or an operator acted: theirs stands
            return state
        self._count(route, move.decision)
        level = logging.WARNING if move.decision in ("rollback", "pause") else logging.INFO
        log.log(level, "rollout %s: %s (%s)", rollout.id, move.decision, move.state.reason)
        return move.state

    async def act(self, rollout_id: str, action: str, who: str) -> dict[str, Any]:
        """An operator's action on a rollout, stored whoever holds the lease; the rollout as
        it then is. KeyError: no such rollout; ValueError: the action is not allowed now."""
        async with self._lock:
            now = time.time()
            route, state = await operate(self._store, self.routes(), rollout_id, action, who, now)
            self.states[rollout_id] = state
            self._count(route, action)
            await self._serve(now)
            return describe(route, state, now)

    def described(self, now: float) -> list[dict[str, Any]]:
        """Every rollout the file names, as last read."""
        found = []
        for route in self.routes():
            assert route.rollout is not None
            state = self.published.get(route.rollout.id)
            if state is not None:
                found.append(describe(route, state, now))
        return found

    async def _serve(self, now: float) -> None:
        """Make live what the states give, for the reason of the last move among them."""
        reasons = [
            f"rollout {s.id}: {s.reason}" for s in sorted(self.states.values(), key=_updated)
        ]
        # stamped when it is made live, not when the look began
        await self._live.refresh(time.time(), reasons[-1] if reasons else "rollout")
        self.published = dict(self.states)
        for route in self.routes():
            assert route.rollout is not None
            state = self.states.get(route.rollout.id)
            if state is not None:
                self._metrics.set_rollout(
                    route.name,
                    state.id,
                    state.status,
                    state.step + 1,
                    challenger_percent(route.rollout, state),
                )

    def _count(self, route: RouteConfig, decision: str) -> None:
        self._metrics.rollout_decisions.labels(route.name, decision).inc()


async def operate(
    store: Store, routes: list[RouteConfig], rollout_id: str, action: str, who: str, now: float
) -> tuple[RouteConfig, RolloutState]:
    """An operator's ``action`` on the stored rollout ``rollout_id``, stored whoever decides
    for it (the deciding gateway's next decision sees it); the route and the new state.
    KeyError: no such rollout in ``routes`` or the store; ValueError: not allowed now."""
    route = next((r for r in routes if r.rollout and r.rollout.id == rollout_id), None)
    stored = {row["id"]: row for row in await store.rollouts()}
    if route is None or route.rollout is None or rollout_id not in stored:
        raise KeyError(rollout_id)
    move = act(route.rollout, RolloutState.from_row(stored[rollout_id]), action, who, now)
    await store.save_rollout(move.state.as_row(), None)
    log.info("rollout %s: %s by %s", rollout_id, action, who)
    return route, move.state


async def stored_rollouts(store: Store, routes: list[RouteConfig], now: float) -> list[Any]:
    """The rollouts ``routes`` name, as the store holds them."""
    stored = {row["id"]: row for row in await store.rollouts()}
    found = []
    for route in routes:
        if route.rollout is not None and route.rollout.id in stored:
            state = RolloutState.from_row(stored[route.rollout.id])
            found.append(describe(route, state, now))
    return found


def _updated(state: RolloutState) -> float:
    return state.updated_at


def _judge(
    route: RouteConfig,
    step_rows: list[dict[str, Any]],
    whole_rows: list[dict[str, Any]],
    step_since: float,
    since: float,
    now: float,
) -> tuple[Any, int]:
    """The gates' verdict, and the challenger's labelled predictions made in the step: CPU
    work, off the event loop."""
    rollout = route.rollout
    assert rollout is not None
    champion = champion_of(route)
    step_report = step_figures(step_rows, (champion, rollout.challenger))
    shadow = rollout.gates.disagreement.shadow if rollout.gates.disagreement else None
    step_report.update(label_free(step_rows, champion, rollout.challenger, shadow))
    whole = build_report(whole_rows, route, since, now) if rollout.gates.quality else {}
    labelled = sum(
        1
        for r in whole_rows
        if r["variant"] == rollout.challenger
        and not r.get("shadow")
        and r["predicted"] is not None
        and r["request_time"] >= step_since
    )
    return judge_gates(route, step_report, whole), labelled
