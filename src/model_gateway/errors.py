"""Every error the gateway itself answers with, and the one table that maps them to HTTP.

Hierarchy::

    GatewayError                 base; never raised itself
    ├── BadRequestError          400  a request the gateway will not forward (e.g. "..")
    ├── NoRouteError             404  no route matches the path and method
    ├── UnknownVariantError      404  a forced variant the route does not have
    ├── UnknownVersionError      404  a model version (V2 path) no variant of the route serves
    ├── RequestTimeoutError      408  the request's body stopped coming (client_body_timeout),
    │                                 or its head did not come (client_header_timeout)
    ├── PayloadTooLargeError     413  request body over the route's limit
    ├── HeaderTooLargeError      431  request head over server.max_header_bytes
    ├── BadGatewayError          502  upstream reset, or answered garbage
    │   └── UpstreamConnectError 502  upstream refused the connection (nothing was sent)
    ├── NoHealthyVariantError    503  no variant of the route can take traffic
    ├── ShuttingDownError        503  the gateway's graceful stop ran out of time
    ├── LogUnavailableError      503  no room in the full prediction log within
    │                                 storage.block_timeout (overflow: block)
    └── UpstreamTimeoutError     504  upstream did not answer within the route's timeout
        └── UpstreamConnectTimeoutError  504  no connection within the connect timeout

    ConfigError                  invalid configuration; carries path-qualified messages

On the paths of the Open Inference Protocol (``/v2``) and KServe V1 (``/v1/models/``), whose
clients expect an error as ``{"error": "<text>"}`` (tritonclient concatenates it to a string),
the body takes that shape; the code is in the ``X-Gateway-Error`` header of every error the
gateway answers itself, whatever its path.

A client that goes away before its answer began gets nothing (nobody is there to read it);
its request is logged with :data:`CLIENT_CLOSED_REQUEST`, nginx's 499.

Upstream client exceptions are translated in exactly one place,
:class:`model_gateway.upstream.UpstreamErrors`.
"""

from __future__ import annotations

from typing import ClassVar, Final

import orjson

CLIENT_CLOSED_REQUEST: Final = 499
#: the header that names the code of every error the gateway answers itself
ERROR_CODE_HEADER: Final = b"x-gateway-error"


class GatewayError(Exception):
    """An error the gateway answers itself, as ``{"error": {"code", "message"}}``."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    #: the short reason recorded in the log and the upstream-error metric
    reason: ClassVar[str] = "internal"
    #: the request never reached the model server, so another variant may safely take it
    #: (whatever the method: nothing was sent)
    nothing_sent: ClassVar[bool] = False
    #: the answer closes the connection: what is left of the request may still arrive on it
    closes_connection: ClassVar[bool] = False

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        #: what the client is told
        self.message = message
        #: what only the log is told: what the model server sent, an exception's class
        self.detail = detail

    def log_text(self) -> str:
        """The error as the prediction log records it."""
        text = f"{self.reason}: {self.message}"
        return text if self.detail is None else f"{text}: {self.detail}"

    def body(self, path: str = "") -> bytes:
        """The answer's body for a request to ``path``: in its protocol's shape."""
        if path == "/v2" or path.startswith(("/v2/", "/v1/models/")):
            return orjson.dumps({"error": self.message})
        return orjson.dumps({"error": {"code": self.code, "message": self.message}})


class BadRequestError(GatewayError):
    status = 400
    code = "bad_request"
    reason = "bad_request"


class NoRouteError(GatewayError):
    status = 404
    code = "no_route"
    reason = "no_route"


class UnknownVariantError(GatewayError):
    status = 404
    code = "unknown_variant"
    reason = "unknown_variant"


class UnknownVersionError(GatewayError):
    status = 404
    code = "unknown_version"
    reason = "unknown_version"


class RequestTimeoutError(GatewayError):
    status = 408
    code = "request_timeout"
    reason = "client_body_timeout"
    closes_connection = True


class PayloadTooLargeError(GatewayError):
    status = 413
    code = "payload_too_large"
    reason = "payload_too_large"


class HeaderTooLargeError(GatewayError):
    status = 431
    code = "request_header_too_large"
    reason = "header_too_large"
    closes_connection = True


class BadGatewayError(GatewayError):
    status = 502
    code = "bad_gateway"
    reason = "bad_gateway"


class UpstreamConnectError(BadGatewayError):
    reason = "connect"
    nothing_sent = True


class NoHealthyVariantError(GatewayError):
    status = 503
    code = "no_healthy_variant"
    reason = "no_healthy_variant"


class ShuttingDownError(GatewayError):
    status = 503
    code = "shutting_down"
    reason = "shutdown"


class LogUnavailableError(GatewayError):
    status = 503
    code = "log_unavailable"
    reason = "log_unavailable"


class UpstreamTimeoutError(GatewayError):
    status = 504
    code = "upstream_timeout"
    reason = "timeout"


class UpstreamConnectTimeoutError(UpstreamTimeoutError):
    nothing_sent = True


class ConfigError(Exception):
    """A configuration that failed validation; ``problems`` are ``"path: message"`` lines."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid configuration\n  " + "\n  ".join(problems))
