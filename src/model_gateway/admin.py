"""The control plane: health, metrics, and the ``/admin`` endpoints.

Admin endpoints require ``Authorization: Bearer <admin.token>`` when a token is configured.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from .app import GatewayApp

Handler = Callable[[Request], Awaitable[Response]]


def json_response(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def error_response(status: int, code: str, message: str) -> Response:
    return json_response({"error": {"code": code, "message": message}}, status)


def control_routes(gateway: GatewayApp) -> list[BaseRoute]:
    def guarded(handler: Handler) -> Handler:
        async def check_token(request: Request) -> Response:
            token = gateway.loaded.config.admin.token
            if token:
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                    return error_response(401, "unauthorized", "a valid bearer token is required")
            return await handler(request)

        return check_token

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok", "config_version": gateway.state.active.version})

    async def metrics(request: Request) -> Response:
        return Response(gateway.state.metrics.exposition(), media_type=CONTENT_TYPE)

    async def prediction(request: Request) -> Response:
        prediction_id = request.path_params["prediction_id"]
        record = await gateway.store.get_prediction(prediction_id)
        if record is None:
            return error_response(404, "not_found", f"no prediction {prediction_id!r}")
        return json_response(_jsonable(record))

    return [
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        Route("/admin/predictions/{prediction_id}", guarded(prediction)),
    ]


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                value = {"base64": base64.b64encode(value).decode()}
        out[key] = value
    return out
