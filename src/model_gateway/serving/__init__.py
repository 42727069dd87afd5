"""The server edge: how the gateway's ASGI app is put on the network, and all that the gateway
builds on uvicorn's internals.

Two edges serve the same app, with every feature of the app either way:

- ``tuned`` (the default): uvicorn's httptools protocol and server, subclassed
  (``protocol.py``, ``server.py``): each answer in one system call, the client limits
  (``limits.py``: a head's time and size, a client that stops reading), a drain before a
  graceful stop, one listening socket per worker, and a request told at once when its client
  goes while the model server works. These lean on uvicorn's internals, so pyproject.toml
  bounds uvicorn to the releases CI tests at both ends of the range.
- ``stock``: uvicorn's own protocol and supervisor, through their public settings only. The
  app learns a client's going and bounds a stalled stream itself (``signals.py``), at some
  speed; a head's time and size, a whole answer left unread, and the drain are not bounded:
  docs/operations.md says what to put in front instead. An uvicorn outside the tested range
  runs this edge, with a warning, so an upgrade costs speed, not correctness.

The edge and the app share nothing but ``signals.py``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import re
import socket
from typing import Final

import uvicorn

log = logging.getLogger("model_gateway")

#: overrides ``server.edge`` (``tuned`` or ``stock``): how the test suite runs on either
EDGE_ENV: Final = "MODEL_GATEWAY_EDGE"
EDGES: Final = ("tuned", "stock")
#: the uvicorn releases the tuned edge is tested on, as pyproject.toml bounds them:
#: from the first, up to and without the second
TESTED_UVICORN: Final = ((0, 53), (0, 56))
#: how long a worker may leave the supervisor's ping unanswered before it is taken for hung
WORKER_HEALTHCHECK_SECONDS: Final = 30


def tuned_edge_problem(version: str | None = None) -> str | None:
    """Why the tuned edge cannot run here (None if it can): the installed uvicorn (or
    ``version``) is outside the tested releases, or lacks what the edge is built on."""
    if version is None:
        version = importlib.metadata.version("uvicorn")
    found = re.match(r"(\d+)\.(\d+)", version)
    lowest, beyond = TESTED_UVICORN
    if found is None or not lowest <= (int(found[1]), int(found[2])) < beyond:
        return (
            f"uvicorn {version} is outside the releases it is tested on "
            f"({lowest[0]}.{lowest[1]} to before {beyond[0]}.{beyond[1]})"
        )
    try:
        from . import protocol, server  # noqa: F401
    except ImportError as missing:
        return f"uvicorn {version} lacks what it is built on: {missing}"
    return None


def choose_edge(setting: str) -> str:
    """The edge to run: ``setting`` (``server.edge``), or the environment's override; the
    stock one, with a warning, where the tuned one cannot run."""
    wanted = os.environ.get(EDGE_ENV) or setting
    if wanted not in EDGES:
        raise SystemExit(f"{EDGE_ENV}={wanted!r}: the edge is one of {', '.join(EDGES)}")
    if wanted == "tuned":
        problem = tuned_edge_problem()
        if problem is not None:
            log.warning(
                "the tuned server edge is off (%s): serving on uvicorn's own protocol, "
                "slower and without the head limits and drain",
                problem,
            )
            return "stock"
    return wanted


def server_config(
    app: object,
    host: str,
    port: int,
    *,
    edge: str,
    shutdown_timeout: float,
    workers: int = 1,
) -> uvicorn.Config:
    """uvicorn's configuration for the gateway ``app`` (an ASGI app, or the import string
    of a factory) on ``edge``."""
    if edge == "tuned":
        from .protocol import CoalescingHttpToolsProtocol

        http: type[asyncio.Protocol] | str = CoalescingHttpToolsProtocol
    else:
        http = "httptools"
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        workers=workers,
        factory=isinstance(app, str),
        loop="uvloop",
        http=http,
        lifespan="on",
        # The gateway writes X-Forwarded-For itself; uvicorn must not rewrite the client address.
        proxy_headers=False,
        server_header=False,
        access_log=False,
        # SIGTERM lets requests in flight finish for this long, then cancels them (the proxy
        # answers and logs those), and the log is flushed. Declared int, used as
        # asyncio.wait_for's timeout: a float works.
        timeout_graceful_shutdown=shutdown_timeout,  # type: ignore[arg-type]
        # The supervisor kills a worker that leaves its ping unanswered this long, taking it
        # for hung, and every client of it is reset. uvicorn's 5 s is crossed by a worker that
        # is only starved of CPU on a loaded host (starting, it imports numpy and scipy).
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_SECONDS,
        log_level="info",
    )


def listen(config: uvicorn.Config, *, edge: str) -> tuple[list[socket.socket], str]:
    """The listening sockets for ``config``'s workers, and the URL they answer on."""
    from .sockets import bind, bind_one_per_worker

    if config.workers > 1 and edge == "tuned":
        return bind_one_per_worker(config, config.workers)
    sock, url = bind(config)
    return [sock], url


def run(config: uvicorn.Config, sockets: list[socket.socket], *, edge: str) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully."""
    from uvicorn.config import STARTUP_FAILURE

    if edge == "tuned":
        from .server import GatewayServer, Supervisor

        if config.workers > 1:
            supervisor = Supervisor(config, sockets=sockets)
            supervisor.run()
            if supervisor.failed_to_start:
                # the status one worker's server exits with, so that a service manager sees it
                raise SystemExit(STARTUP_FAILURE)
        else:
            GatewayServer(config).run(sockets=sockets)
    elif config.workers > 1:
        # as uvicorn's own command line runs workers
        from uvicorn.supervisors import Multiprocess

        workers = Multiprocess(config, sockets=sockets)
        workers.run()
        # a worker that could not start (its store, say) stopped them all: the exit says so,
        # as the tuned edge's does
        codes = {getattr(worker, "exitcode", None) for worker in workers.processes}
        if STARTUP_FAILURE in codes:
            raise SystemExit(STARTUP_FAILURE)
    else:
        uvicorn.Server(config).run(sockets=sockets)
