"""The active configuration as the hot path uses it: built once per (re)load, swapped whole.

A request reads ``GatewayState.active`` once when it starts and uses that object to the end,
so a reload never changes the routing of a request already in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import LoadedConfig
from .routing import RoutingTable
from .upstream import Deadlines


@dataclass(frozen=True, slots=True)
class ActiveConfig:
    loaded: LoadedConfig
    table: RoutingTable
    timeouts: dict[str, Deadlines]
    #: the configuration's version (its content hash), which every record carries
    version: str
    #: seconds a request body may go without a byte arriving
    client_body_timeout: float
    #: seconds a client may read nothing of a stream (applied by the proxy only where the
    #: server edge does not apply it to the connection)
    send_timeout: float

    @classmethod
    def build(cls, loaded: LoadedConfig) -> ActiveConfig:
        table = RoutingTable.from_config(loaded.config)
        return cls(
            loaded=loaded,
            table=table,
            timeouts={r.name: Deadlines(r.config.timeouts) for r in table.routes},
            version=loaded.version,
            client_body_timeout=loaded.config.server.client_body_timeout,
            send_timeout=loaded.config.server.send_timeout,
        )
