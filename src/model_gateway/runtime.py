"""The active configuration as the hot path uses it: built once per (re)load, swapped whole.

A request reads ``GatewayState.active`` once when it starts and uses that object to the end,
so a reload never changes the routing of a request already in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from .config import LoadedConfig
from .health import HealthMonitor
from .metrics import Metrics
from .routing import RoutingTable
from .shadow import ShadowMirror
from .store.spool import Spool
from .store.writer import RecordWriter
from .upstream import Deadlines, UpstreamClient


@dataclass(frozen=True, slots=True)
class ActiveConfig:
    loaded: LoadedConfig
    table: RoutingTable
    timeouts: dict[str, Deadlines]
    #: the configuration's version (its content hash), which every record carries
    version: str
    #: seconds a request body may go without a byte arriving
    client_body_timeout: float

    @classmethod
    def build(cls, loaded: LoadedConfig) -> ActiveConfig:
        table = RoutingTable.from_config(loaded.config)
        return cls(
            loaded=loaded,
            table=table,
            timeouts={r.name: Deadlines(r.config.timeouts) for r in table.routes},
            version=loaded.version,
            client_body_timeout=loaded.config.server.client_body_timeout,
        )


@dataclass(slots=True)
class GatewayState:
    """Everything long-lived the request handlers need; built and closed by the lifespan."""

    active: ActiveConfig
    session: aiohttp.ClientSession
    upstream: UpstreamClient
    writer: RecordWriter
    metrics: Metrics
    health: HealthMonitor
    mirror: ShadowMirror
    #: durability answered: where each answered request's record is made durable first
    spool: Spool | None = None
    #: the gateway's own release, as its V2 server metadata names it
    version: str = ""
