"""Which of a request's and an answer's headers cross the gateway, and what it adds.

The client's headers are read in one pass (``ClientHeaders``): what the gateway takes from
them (request id, forced variant, routing key, length) and the ones it forwards as they came.
Hop-by-hop headers go no further than the connection they came on; the gateway sets the
``X-Forwarded-*`` headers, the host from its configuration, and its own answer headers.
"""

from __future__ import annotations

from typing import Any, Final

from .routing import Variant

Scope = dict[str, Any]

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Rebuilt by the gateway rather than passed through.
_REQUEST_REBUILT = frozenset(
    {
        b"host",
        b"content-length",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-prediction-id",
    }
)
# The answer's headers the gateway writes itself.
_RESPONSE_REPLACED = frozenset(
    {b"x-prediction-id", b"x-model-variant", b"x-model-version", b"date", b"server"}
)
#: the answer's headers that are not relayed to the client
NOT_RELAYED = HOP_BY_HOP | _RESPONSE_REPLACED
_NOT_FORWARDED = HOP_BY_HOP | _REQUEST_REBUILT


def gateway_headers(prediction_id: str, variant: Variant) -> list[tuple[bytes, bytes]]:
    """The headers the gateway adds to every answer (X-Model-Version once it is known)."""
    return [
        (b"x-prediction-id", prediction_id.encode()),
        (b"x-model-variant", variant.name.encode()),
    ]


def header_value(text: str) -> bytes:
    """``text`` as a header value: control characters, which no header may hold (uvicorn
    refuses to send them), written ``\\xNN``. A model version comes from the model server's
    answer and may hold anything."""
    if text.isascii() and text.isprintable():
        return text.encode()
    return "".join(
        f"\\x{ord(c):02x}" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in text
    ).encode("utf-8", "backslashreplace")


def upstream_target(scope: Scope) -> bytes:
    """The path and query sent upstream, as the client encoded them. The client supplies no
    more than these: the host always comes from the configuration."""
    target: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    return target + b"?" + query if query else target


# What the one pass over a request's headers does with a name it knows; a name not here is
# forwarded as it came. Final: compiled, each is a constant rather than a lookup by name.
_FORWARD_AND_NOTE_REQUEST_ID: Final = 1
_FORWARD_AND_NOTE_VARIANT: Final = 2
_NOTE_CONTENT_LENGTH: Final = 3
_NOTE_FORWARDED_FOR: Final = 4
_NOTE_HOST: Final = 5
_NOTE_CONNECTION: Final = 6
_DROP: Final = 7
_REQUEST_HEADER_ROLES: Final[dict[bytes, int]] = {name: _DROP for name in _NOT_FORWARDED}
_REQUEST_HEADER_ROLES.update(
    {
        b"x-request-id": _FORWARD_AND_NOTE_REQUEST_ID,
        b"x-model-variant": _FORWARD_AND_NOTE_VARIANT,
        b"content-length": _NOTE_CONTENT_LENGTH,
        b"x-forwarded-for": _NOTE_FORWARDED_FOR,
        b"host": _NOTE_HOST,
        b"connection": _NOTE_CONNECTION,
    }
)


class ClientHeaders:
    """The client's headers, read in one pass: what the gateway takes from them, and the ones
    it forwards as they came. The server gives them lower-cased and checked (no line breaks)."""

    def __init__(self, headers: list[tuple[bytes, bytes]], routing_header: bytes | None) -> None:
        self.request_id: str | None = None
        #: the variant asked for by X-Model-Variant
        self.forced: str | None = None
        #: the routing key, when the route has one and the request carries it
        self.key: str | None = None
        self.content_length = -1
        self.forwarded_for: bytes | None = None
        self.host: bytes | None = None
        self.named_by_connection: set[bytes] | None = None
        #: the headers forwarded as they came; ``forward_headers`` adds the gateway's own
        self.forwarded: list[tuple[bytes, bytes]] = []
        for pair in headers:
            name, value = pair
            if routing_header is not None and name == routing_header:
                self.key = value.decode("latin-1")
            role = _REQUEST_HEADER_ROLES.get(name)
            if role is None:
                self.forwarded.append(pair)
            elif role == _FORWARD_AND_NOTE_REQUEST_ID:
                self.request_id = value.decode("latin-1")
                self.forwarded.append(pair)
            elif role == _FORWARD_AND_NOTE_VARIANT:
                self.forced = value.decode("latin-1")
                self.forwarded.append(pair)
            elif role == _NOTE_CONTENT_LENGTH:
                if value.isdigit():
                    self.content_length = int(value)
            elif role == _NOTE_FORWARDED_FOR:
                self.forwarded_for = value
            elif role == _NOTE_HOST:
                self.host = value
            elif role == _NOTE_CONNECTION:
                # RFC 9110 §7.6.1: headers the client marked connection-specific go too
                named = {token.strip().lower() for token in value.split(b",")}
                if self.named_by_connection is None:
                    self.named_by_connection = named
                else:
                    self.named_by_connection |= named


def forward_headers(
    scope: Scope, client: ClientHeaders, prediction_id: str
) -> list[tuple[bytes, bytes]]:
    """The headers sent upstream: the client's as they came, less any its Connection header
    named, then the gateway's. X-Prediction-Id comes last: a shadow copy swaps in its own."""
    out = client.forwarded
    if client.named_by_connection:
        named = client.named_by_connection
        out = [(name, value) for name, value in out if name not in named]
    peer_address = scope.get("client")
    if peer_address:
        peer = peer_address[0].encode()
        forwarded_for = client.forwarded_for
        out.append((b"X-Forwarded-For", forwarded_for + b", " + peer if forwarded_for else peer))
    out.append((b"X-Forwarded-Proto", scope.get("scheme", "http").encode()))
    if client.host:
        out.append((b"X-Forwarded-Host", client.host))
    out.append((b"X-Prediction-Id", prediction_id.encode()))
    return out
