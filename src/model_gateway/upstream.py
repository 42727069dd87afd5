"""The upstream side: one pooled aiohttp client session, per-route timeouts, error translation."""

from __future__ import annotations

import asyncio
from types import TracebackType

import aiohttp

from .config import Timeouts
from .errors import (
    BadGatewayError,
    UpstreamConnectError,
    UpstreamConnectTimeoutError,
    UpstreamTimeoutError,
)

# Idle keep-alive connections are reused for this long; model servers (uvicorn, MLServer,
# Triton) keep theirs for 5 s or more, so 4 s avoids racing their close.
KEEPALIVE_SECONDS = 4.0


def create_session() -> aiohttp.ClientSession:
    """The client session every proxied request goes through; created in the lifespan."""
    connector = aiohttp.TCPConnector(
        limit=0,  # no global cap: the model servers and the client's concurrency set the pace
        keepalive_timeout=KEEPALIVE_SECONDS,
        ttl_dns_cache=60,
    )
    return aiohttp.ClientSession(
        connector=connector,
        # bodies pass through byte for byte, encodings included
        auto_decompress=False,
        # only the client's own headers go upstream
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def client_timeout(timeouts: Timeouts) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=timeouts.total, connect=timeouts.connect)


class UpstreamErrors:
    """The single place where aiohttp's exceptions become gateway errors.

    A class rather than ``@contextmanager``: it runs twice per proxied request, and a plain
    ``__exit__`` costs a fraction of a generator-based context manager.
    """

    __slots__ = ("variant",)

    def __init__(self, variant: str) -> None:
        self.variant = variant

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            return
        variant = self.variant
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            raise UpstreamConnectTimeoutError(
                f"variant {variant!r} did not accept a connection in time"
            ) from exc
        if isinstance(exc, TimeoutError):  # aiohttp's timeout errors subclass it
            raise UpstreamTimeoutError(f"variant {variant!r} did not answer in time") from exc
        if isinstance(exc, aiohttp.ClientConnectorError):
            raise UpstreamConnectError(
                f"variant {variant!r} refused the connection: {exc.os_error.strerror or exc}"
            ) from exc
        if isinstance(exc, aiohttp.ClientError | asyncio.IncompleteReadError):
            raise BadGatewayError(
                f"variant {variant!r} answered badly: {type(exc).__name__}: {exc}"
            ) from exc
