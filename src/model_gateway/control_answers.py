"""How the control plane answers: JSON bodies, errors in one shape, and times as RFC 3339."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from .errors import ERROR_CODE_HEADER
from .feedback import parse_time


def json_response(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def error_response(status: int, code: str, message: str) -> Response:
    answer = json_response({"error": {"code": code, "message": message}}, status)
    answer.headers[ERROR_CODE_HEADER.decode()] = code
    return answer


def parse_rfc3339(text: str) -> float:
    """Unix seconds from an RFC 3339 timestamp; the offset is required."""
    seconds = parse_time(text)
    if seconds is not None:
        return seconds
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 3339 time, e.g. 2026-01-31T12:00:00Z") from None
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset; add Z or +hh:mm")
    raise ValueError(f"{text!r} is outside years 1 to 9999 in UTC")


def format_rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


class BodyTooLarge(Exception):
    """A request body past the endpoint's limit."""


async def read_capped(request: Request, limit: int) -> bytes:
    """The request's body, read only up to ``limit`` bytes (:class:`BodyTooLarge` past it)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)
