"""The control plane's monitoring endpoints: a window's drift, and the references
(docs/monitoring.md)."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .config import RouteConfig, duration_seconds
from .control_answers import (
    BodyTooLarge,
    error_response,
    format_rfc3339,
    json_response,
    parse_rfc3339,
    read_capped,
)
from .monitoring import ReferenceBuildError, described, drift, pin_from_log, stored_references

if TYPE_CHECKING:
    from .live import LiveConfig
    from .monitor_runner import DriftMonitor
    from .store.base import Store

Handler = Callable[[Request], Awaitable[Response]]
#: what a reference's id looks like (a UUID's hex): anything else names none
REFERENCE_ID = re.compile(r"[0-9a-f]{32}")
#: the earliest instant an RFC 3339 time can name (year 1)
EARLIEST = parse_rfc3339("0001-01-01T00:00:00Z")
#: the largest body POST /admin/references reads
MAX_BODY_BYTES = 64 * 1024


def monitoring_routes(
    store: Store, live: LiveConfig, monitor: DriftMonitor, guarded: Callable[[Handler], Handler]
) -> list[BaseRoute]:
    def monitored_route(name: str | None) -> RouteConfig | str:
        """The monitored route named, or the only one; else what is wrong, as text."""
        routes = {r.name: r for r in live.loaded.config.routes if r.monitoring is not None}
        if name is None and len(routes) == 1:
            return next(iter(routes.values()))
        if name not in routes:
            known = ", ".join(sorted(routes)) or "none"
            return f"route: one of the monitored routes is required ({known})"
        return routes[name]

    async def drift_now(request: Request) -> Response:
        """``GET /admin/drift?route=&since=&until=``: the statistics of a window, by default
        the route's first monitoring window up to now."""
        params = request.query_params
        route = monitored_route(params.get("route"))
        if isinstance(route, str):
            return error_response(400, "bad_request", route)
        assert route.monitoring is not None
        try:
            until = parse_rfc3339(params["until"]) if "until" in params else time.time()
            first = route.monitoring.windows[0]
            since = (
                parse_rfc3339(params["since"])
                if "since" in params
                else max(until - duration_seconds(first), EARLIEST)
            )
        except ValueError as exc:
            return error_response(400, "bad_request", str(exc))
        if since >= until:
            return error_response(400, "bad_request", "since must be before until")
        window = first if "since" not in params else "since"
        found = await drift(store, route, since, until, window)
        return json_response(
            {
                "route": route.name,
                "since": format_rfc3339(since),
                "until": format_rfc3339(until),
                "statistics": found,
            }
        )

    async def references(request: Request) -> Response:
        if request.method == "POST":
            return await pin(request)
        name = request.query_params.get("route")
        if name is not None and name not in {r.name for r in live.loaded.config.routes}:
            return error_response(400, "bad_request", "route: not a route of the configuration")
        found = await stored_references(store, name)
        return json_response({"references": [_presented(described(r)) for r in found]})

    async def pin(request: Request) -> Response:
        """``POST /admin/references`` with ``{"route", "since", "until"}``: a reference per
        variant and model version, pinned from that window of the log."""
        try:
            body = await read_capped(request, MAX_BODY_BYTES)
        except BodyTooLarge:
            return error_response(413, "payload_too_large", f"over {MAX_BODY_BYTES} bytes")
        except ClientDisconnect:
            return error_response(400, "bad_request", "the client left mid-body")
        try:
            asked = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return error_response(400, "bad_request", f"the body is not JSON: {exc}")
        if not isinstance(asked, dict):
            return error_response(400, "bad_request", "the body must be a JSON object")
        route = monitored_route(asked.get("route") if isinstance(asked.get("route"), str) else None)
        if isinstance(route, str):
            return error_response(400, "bad_request", route)
        try:
            since = parse_rfc3339(_text(asked, "since"))
            until = parse_rfc3339(_text(asked, "until"))
        except ValueError as exc:
            return error_response(400, "bad_request", str(exc))
        if since >= until:
            return error_response(400, "bad_request", "since must be before until")
        try:
            rows = await pin_from_log(store, route, since, until)
        except ReferenceBuildError as exc:
            return error_response(400, "bad_request", str(exc))
        await store.save_references(rows)
        await monitor.look(every=True)
        saved = await stored_references(store, route.name)
        ids = {r["reference_id"] for r in rows}
        answer = [_presented(described(r)) for r in saved if r["reference_id"] in ids]
        return json_response({"references": answer}, 201)

    async def delete(request: Request) -> Response:
        wanted = request.path_params["reference_id"]
        if not REFERENCE_ID.fullmatch(wanted) or not await store.delete_reference(wanted):
            return error_response(404, "not_found", f"no reference {wanted!r}")
        return Response(status_code=204)

    return [
        Route("/admin/drift", guarded(drift_now)),
        Route("/admin/references", guarded(references), methods=["GET", "POST"]),
        Route("/admin/references/{reference_id}", guarded(delete), methods=["DELETE"]),
    ]


def _text(asked: dict[str, Any], key: str) -> str:
    value = asked.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key}: an RFC 3339 time is required")
    return value


def _presented(reference: dict[str, Any]) -> dict[str, Any]:
    out = dict(reference)
    out["created_at"] = format_rfc3339(out["created_at"])
    log = out["source"].get("log")
    if isinstance(log, dict):
        out["source"] = {
            "log": {
                **log,
                "since": format_rfc3339(log["since"]),
                "until": format_rfc3339(log["until"]),
            }
        }
    return out
