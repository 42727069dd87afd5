"""Assembles the ASGI app: the data plane (every path a route claims), the control plane
(``/healthz``, ``/metrics``, ``/admin``), and the lifespan that owns every long-lived resource.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette

from . import heap
from .active import ActiveConfig
from .admin import ROUTER_CODES, ControlPlane, control_routes, router_error, store_unavailable
from .config import RESERVED_PREFIXES, LoadedConfig, load_config
from .console import configure_logging
from .deliveries import DeliveryRunner
from .feedback import FeedbackJoiner
from .health import HealthMonitor
from .live import LiveConfig
from .metrics import Metrics
from .monitor_runner import DriftMonitor
from .proxy import ProxyApp
from .redaction import REDACTED, url_secrets
from .reload import ConfigReloader
from .rollout_runner import RolloutRunner
from .serving.limits import ClientLimits
from .serving.signals import LIMITS_STATE
from .shadow import ShadowMirror
from .state import GatewayState
from .store import Store, open_store
from .store.base import STORE_ERRORS
from .store.spool import Spool
from .store.writer import RecordWriter
from .upstream import create_clients

log = logging.getLogger("model_gateway")

#: how a worker process started by ``serve --workers N`` finds its configuration
CONFIG_ENV = "MODEL_GATEWAY_CONFIG"


class GatewayApp:
    """The gateway as one ASGI callable; nothing is opened until the lifespan starts."""

    def __init__(self, loaded: LoadedConfig, *, settle_heap: bool = False) -> None:
        #: the one live configuration; a reload replaces it through :meth:`activate`
        self.live = LiveConfig(loaded)
        self.live.activate_with(self.activate)
        # only a process that is the gateway (serve) tunes the collector; tests embed the app
        self._settle_heap = settle_heap
        self._state: GatewayState | None = None
        self._proxy: ProxyApp | None = None
        self._store = open_store(loaded.config.storage.url)
        self.metrics = Metrics(build_version=_package_version())
        #: offered to the server edge in the lifespan state (serving/signals.py)
        self.client_limits = ClientLimits(loaded.config.server)
        self.reloader = ConfigReloader(self.live, self.metrics)
        self.joiner = FeedbackJoiner(self._store, self.live, self.metrics)
        self.rollouts = RolloutRunner(self._store, self.live, self.metrics)
        self.monitor = DriftMonitor(self._store, self.live, self.metrics)
        self.deliveries = DeliveryRunner(self._store, self.live, self.metrics)
        plane = ControlPlane(
            self._store,
            self.live,
            self.metrics,
            self.reloader,
            self.joiner,
            self.rollouts,
            self.monitor,
        )
        handlers: dict[Any, Any] = dict.fromkeys(STORE_ERRORS, store_unavailable)
        handlers.update(dict.fromkeys(ROUTER_CODES, router_error))  # by status code
        self._control = Starlette(routes=control_routes(plane), exception_handlers=handlers)
        # no redirect of /admin/x/ to /admin/x: Starlette builds it from the client's Host
        # header, an open redirect; such a path is answered 404 like any other unknown one
        self._control.router.redirect_slashes = False

    @property
    def loaded(self) -> LoadedConfig:
        """The live configuration."""
        return self.live.loaded

    @property
    def state(self) -> GatewayState:
        if self._state is None:
            raise RuntimeError("the gateway has not started")
        return self._state

    @property
    def store(self) -> Store:
        return self._store

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            if _is_control_path(scope["path"]):
                await self._control(scope, receive, send)
            else:
                assert self._proxy is not None
                await self._proxy(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:  # websockets are not proxied
            await send({"type": "websocket.close", "code": 1003})

    async def _lifespan(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()  # lifespan.startup
        try:
            await self.startup()
        except Exception as exc:
            log.exception("gateway failed to start")
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        state = scope.get("state")
        if state is not None:  # a server with no lifespan state applies no client limits
            state[LIMITS_STATE] = self.client_limits
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self.shutdown()
        await send({"type": "lifespan.shutdown.complete"})

    async def startup(self) -> None:
        storage = self.loaded.config.storage
        metrics = self.metrics
        metrics.start()
        await self._store.open()
        spool = Spool(storage.spool_path) if storage.durability == "answered" else None
        writer = RecordWriter(
            self._store,
            metrics,
            queue_size=storage.queue_size,
            batch_size=storage.batch_size,
            linger=storage.linger,
            overflow=storage.overflow,
            write_retries=storage.write_retries,
            close_timeout=storage.close_timeout,
            block_timeout=storage.block_timeout,
            spool=spool,
        )
        if spool is not None:
            # what a process killed outright left in the spool is written before serving
            recovered = spool.recover()
            if recovered:
                log.warning("writing %d records left in the spool", len(recovered))
                await writer.replay(recovered)
                metrics.log_spool_replayed.inc(len(recovered))
            spool.forget_recovered()
            spool.start()
        writer.start()
        session, upstream = create_clients()
        self._state = GatewayState(
            active=ActiveConfig.build(self.loaded),
            session=session,
            upstream=upstream,
            writer=writer,
            metrics=metrics,
            health=HealthMonitor(metrics, session),
            mirror=ShadowMirror(upstream, writer, metrics),
            spool=spool,
            version=metrics.build_version,
        )
        self.client_limits.on_close = metrics.client_connection_closed
        loaded = self.loaded
        await self.activate(loaded, time.time(), loaded.source, self._state.active)
        # a rollout's weights serve from the first request (its state is in the store)
        await self.rollouts.start()
        self._proxy = ProxyApp(self._state)
        self.reloader.start()
        if self._settle_heap:
            heap.settle()
        self.joiner.start()
        self.monitor.start()
        self.deliveries.start()
        log.info(
            "model-gateway started with config %s (%s)", self.loaded.version, self.loaded.source
        )

    async def activate(
        self, loaded: LoadedConfig, at: float, source: str, active: ActiveConfig | None = None
    ) -> None:
        """Make ``loaded`` the live configuration and add it to the history with what made it
        (``source``: the file, or a rollout's move); ``active`` is its routing tables when the
        caller has already built them."""
        await self._store.record_config(loaded.version, at, source, _history_text(loaded))
        self.state.active = active or ActiveConfig.build(loaded)
        self.state.health.configure(self.state.active.table.routes)
        self.state.metrics.set_config_version(loaded.version)
        self.client_limits.configure(loaded.config.server)

    async def shutdown(self) -> None:
        # The server has stopped taking requests and finished those in flight, so every
        # record is already queued: write them all, then close what they needed.
        # Each step runs whatever the ones before it did: a failure is logged and counted,
        # and never keeps the log from being flushed or the store from being closed.
        state = self.state
        steps: list[tuple[str, Callable[[], Awaitable[None] | None]]] = [
            # shadow copies still in flight end, and are queued too
            ("shadow copies", state.mirror.close),
            # every request is answered: fold the last of them
            ("metrics", state.metrics.close),
            ("client limits", self.client_limits.close),
            ("config watch", self.reloader.stop),
            ("rollouts", self.rollouts.stop),
            ("feedback joiner", self.joiner.stop),
            ("monitoring", self.monitor.stop),
            ("deliveries", self.deliveries.stop),
            ("health checks", state.health.close),
            ("prediction log", state.writer.close),
            ("spool", state.spool.close if state.spool is not None else _nothing),
            # its idle connections, before the connector closes
            ("upstream connections", state.upstream.close),
            ("upstream session", state.session.close),
            ("store", self._store.close),
            ("metrics files", state.metrics.process_exited),
        ]
        failed = []
        for name, step in steps:
            try:
                pending = step()
                if pending is not None:
                    await pending
            except Exception:
                failed.append(name)
                log.exception("shutdown: closing the %s failed; going on", name)
                state.metrics.background_errors.labels("shutdown").inc()
        if failed:
            log.error("model-gateway stopped; these failed to close: %s", ", ".join(failed))
        else:
            log.info("model-gateway stopped; prediction log flushed")


def _nothing() -> None:
    return None


def _package_version() -> str:
    try:
        return importlib.metadata.version("model-gateway")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _history_text(loaded: LoadedConfig) -> str:
    """The file's text as the history keeps it: every secret written into it literally (the
    tokens, a URL's password or credentials in its query) replaced."""
    config = loaded.config
    secrets = [config.admin.token, config.admin.feedback_token]
    for url in (
        config.storage.url,
        *(v.url for r in config.routes for v in r.variants),
        *(sh.url for r in config.routes for sh in r.shadows),
    ):
        secrets += url_secrets(url)
    text = loaded.text
    # the longest first, so that a secret holding a shorter one is replaced whole
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def _is_control_path(path: str) -> bool:
    for prefix in RESERVED_PREFIXES:
        if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
            return True
    return False


def create_app(config_path: str, *, settle_heap: bool = False) -> GatewayApp:
    return GatewayApp(load_config(config_path), settle_heap=settle_heap)


def app_from_env() -> GatewayApp:
    """The factory each worker process of ``serve --workers N`` calls."""
    configure_logging()
    return create_app(os.environ[CONFIG_ENV], settle_heap=True)
