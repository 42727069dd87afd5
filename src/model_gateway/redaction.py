"""What is kept of a request's headers and bodies: secrets replaced, sizes capped.

Runs only for routes that capture, after the response has been sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import orjson

from .config import ALWAYS_REDACTED_HEADERS, CaptureConfig

REDACTED = "[REDACTED]"
#: query parameters of a URL whose values are credentials
_SECRET_PARAMETERS = frozenset(
    {
        "password",
        "passwd",
        "sslpassword",
        "token",
        "access_token",
        "secret",
        "api_key",
        "apikey",
    }
)
_USER_PASSWORD = re.compile(r"//([^/@:]*):[^/@]*@")


def redact_url(url: str) -> str:
    """``url`` fit to log or show: a password in its user part, and credentials in its
    query (``?password=``), replaced by ``[REDACTED]``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL after all (an unexpanded ${VAR} in a port, say)
        return _USER_PASSWORD.sub(rf"//\1:{REDACTED}@", url)
    netloc = parts.netloc
    # a reference to the environment (as a stored configuration text holds it) is no secret
    if password is not None and not (password.startswith("${") and password.endswith("}")):
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.split(':', 1)[0]}:{REDACTED}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMETERS for k, _ in pairs):
            query = urlencode(
                [(k, REDACTED if k.lower() in _SECRET_PARAMETERS else v) for k, v in pairs]
            )
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def url_secrets(url: str) -> list[str]:
    """The credentials written in ``url`` as it is written (percent-encoded as it is): its
    password and secret query values."""
    try:
        parts = urlsplit(url)
        found = [parts.password] if parts.password else []
    except ValueError:
        found = [m.group(0)[2:-1].split(":", 1)[1] for m in _USER_PASSWORD.finditer(url)]
        parts = urlsplit(url.split("?", 1)[0])._replace(query=url.partition("?")[2])
    for pair in parts.query.split("&"):
        name, _, value = pair.partition("=")
        if value and unquote(name).lower() in _SECRET_PARAMETERS:
            found.append(value)
    return found


class Redactor:
    """One route's capture rules, precomputed."""

    def __init__(self, capture: CaptureConfig) -> None:
        # copied out of the pydantic model, whose attribute reads are slow (it has __getattr__)
        self.keep_headers = capture.headers
        self.keep_bodies = capture.bodies
        self.max_bytes = capture.max_bytes
        self.secret_headers = frozenset(ALWAYS_REDACTED_HEADERS) | frozenset(capture.redact_headers)
        self.secret_fields = frozenset(capture.redact_fields)

    def headers(self, pairs: Iterable[tuple[bytes, bytes]]) -> str | None:
        """Headers as a JSON object (repeated names joined by ", "), secrets replaced."""
        if not self.keep_headers:
            return None
        out: dict[str, str] = {}
        for raw_name, raw_value in pairs:
            name = raw_name.decode("latin-1").lower()
            value = REDACTED if name in self.secret_headers else raw_value.decode("latin-1")
            out[name] = f"{out[name]}, {value}" if name in out else value
        return orjson.dumps(out).decode()

    def body(self, body: bytes | None) -> tuple[bytes | None, bool]:
        """The body to keep and whether it was cut. With fields to redact, a body that is not
        JSON is not kept at all: what cannot be searched cannot be shown to be clean."""
        if not self.keep_bodies or body is None:
            return None, False
        if self.secret_fields and body:
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError:
                return None, False
            body = orjson.dumps(_redact(doc, self.secret_fields))
        limit = self.max_bytes
        return body[:limit], len(body) > limit


def _redact(node: Any, fields: frozenset[str]) -> Any:
    if isinstance(node, dict):
        return {k: REDACTED if k in fields else _redact(v, fields) for k, v in node.items()}
    if isinstance(node, list):
        return [_redact(v, fields) for v in node]
    return node
