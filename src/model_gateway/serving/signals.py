"""Everything that passes between the server edge and the gateway's app, and nothing else.

Both ways go through the channels the ASGI specification gives a server and an app:

- the app offers its :class:`~model_gateway.serving.limits.ClientLimits` to the edge in the
  lifespan state (:data:`LIMITS_STATE`), which ASGI middleware passes through unchanged;
- the edge gives each request a :class:`RequestSignals` in the scope's ``extensions``
  (:data:`EXTENSION`). An app served by another server (the stock edge) finds none, and
  learns the same things the plain ASGI way, at some cost: a task of its own watching
  ``receive`` for the client's going, and a timer on each read of the body.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

#: the key of the lifespan state under which the app offers its client limits
LIMITS_STATE: Final = "model_gateway.client_limits"
#: the key of the scope's ``extensions`` under which the edge gives a request its signals
EXTENSION: Final = "model_gateway.connection"


class RequestSignals:
    """What the edge tells one request about its connection, and the one thing the request
    tells the edge (``waiting``). The tuned edge gives them once the request's body is whole,
    which is all a request needs them for."""

    __slots__ = ("body_complete", "client_gone", "send_timed_out", "waiting")

    def __init__(self) -> None:
        #: the request's last byte has arrived: reading its body cannot wait, and needs no
        #: timer
        self.body_complete = False
        #: set by the request while it waits on the model server, None otherwise: the edge
        #: cancels it when the client goes away (setting ``client_gone`` first), so that the
        #: request stops waiting and is logged 499, as nginx does
        self.waiting: asyncio.Task[Any] | None = None
        self.client_gone = False
        #: the record's error when the edge closed the connection because its client stopped
        #: reading the answer (``server.send_timeout``)
        self.send_timed_out: str | None = None


def request_signals(scope: dict[str, Any]) -> RequestSignals | None:
    """The signals the edge gave this request; None under a server that gives none."""
    extensions = scope.get("extensions")
    if extensions is None:
        return None
    signals: RequestSignals | None = extensions.get(EXTENSION)
    return signals
