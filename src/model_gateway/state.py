"""Everything long-lived the request handlers need, built and closed by the lifespan."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from .active import ActiveConfig
from .health import HealthMonitor
from .metrics import Metrics
from .shadow import ShadowMirror
from .store.spool import Spool
from .store.writer import RecordWriter
from .upstream import UpstreamClient


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
