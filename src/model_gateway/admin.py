"""The control plane: health, metrics, and the ``/admin`` endpoints.

Admin endpoints require ``Authorization: Bearer <admin.token>`` when a token is configured.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import yaml
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .admin_monitoring import monitoring_routes
from .config import ExperimentConfig, RouteConfig, ShadowConfig, VariantConfig
from .control_answers import (
    BodyTooLarge,
    error_response,
    format_rfc3339,
    json_response,
    parse_rfc3339,
    read_capped,
)
from .feedback import MAX_BODY_BYTES as MAX_FEEDBACK_BYTES
from .feedback import (
    MAX_ITEMS,
    FeedbackBodyError,
    FeedbackItem,
    judge_labels,
    parse_body,
    validate_item,
)
from .metrics import CONTENT_TYPE
from .quality import build_report
from .records import unstorable
from .redaction import redact_url
from .rollouts import WEIGHTS_KEY

if TYPE_CHECKING:
    from .feedback import FeedbackJoiner
    from .live import LiveConfig
    from .metrics import Metrics
    from .monitor_runner import DriftMonitor
    from .reload import ConfigReloader
    from .rollout_runner import RolloutRunner
    from .store.base import Store

DAY = 86_400.0
log = logging.getLogger("model_gateway.admin")

Handler = Callable[[Request], Awaitable[Response]]


#: the statuses the control plane's router answers itself, with the gateway's error code for
#: each; every other ``HTTPException`` keeps Starlette's own handler
ROUTER_CODES = {404: "not_found", 405: "method_not_allowed"}


async def router_error(request: Request, exc: Exception) -> Response:
    """The router's own answers (a control path with no endpoint, a method the endpoint does
    not take) in the JSON shape of every other error the gateway makes, headers such as
    ``Allow`` kept; Starlette's are plain text."""
    assert isinstance(exc, HTTPException)
    path = request.url.path
    if exc.status_code == 404:
        message = f"no endpoint {path}"
    else:
        message = f"{request.method} is not allowed on {path}"
    response = error_response(exc.status_code, ROUTER_CODES[exc.status_code], message)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def store_unavailable(request: Request, exc: Exception) -> Response:
    """What the control plane answers when the store fails under it (e.g. a database outage):
    a clear 503, logged once, rather than a bare 500."""
    log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return error_response(503, "store_unavailable", "the prediction store is not available")


@dataclass(frozen=True, slots=True)
class ControlPlane:
    """What the control plane's endpoints work with, given to them explicitly."""

    store: Store
    live: LiveConfig
    metrics: Metrics
    reloader: ConfigReloader
    joiner: FeedbackJoiner
    rollouts: RolloutRunner
    monitor: DriftMonitor


def control_routes(plane: ControlPlane) -> list[BaseRoute]:
    def guarded(handler: Handler) -> Handler:
        async def check_token(request: Request) -> Response:
            token = plane.live.loaded.config.admin.effective_token()
            if token and not _bearer_matches(request, token):
                return error_response(401, "unauthorized", "a valid bearer token is required")
            return await handler(request)

        return check_token

    async def feedback(request: Request) -> Response:
        admin = plane.live.loaded.config.admin
        tokens = [t for t in (admin.feedback_token, admin.effective_token()) if t]
        if tokens and not any(_bearer_matches(request, t) for t in tokens):
            return error_response(401, "unauthorized", "a valid bearer token is required")
        try:
            body = await read_capped(request, MAX_FEEDBACK_BYTES)
        except BodyTooLarge:
            return error_response(413, "payload_too_large", f"over {MAX_FEEDBACK_BYTES} bytes")
        except ClientDisconnect:
            # nobody is there to read an answer, and nothing of the body was kept
            log.info("a /feedback client left before its body was whole; nothing stored")
            return error_response(400, "bad_request", "the client left mid-body")
        try:
            items = parse_body(body, request.headers.get("content-type"))
        except FeedbackBodyError as exc:
            return error_response(400, "bad_request", str(exc))
        if not items:
            return error_response(400, "bad_request", "no feedback items in the body")
        if len(items) > MAX_ITEMS:
            return error_response(413, "payload_too_large", f"over {MAX_ITEMS} items")
        now = time.time()
        valid: list[tuple[int, FeedbackItem]] = []
        refused: list[tuple[int, str]] = []
        for index, item in enumerate(items):
            result = validate_item(item, now)
            if isinstance(result, str):
                refused.append((index, result))
            else:
                valid.append((index, result))
        # each label is judged against the task of its prediction's route, when stored
        routes = {r.name: r for r in plane.live.loaded.config.routes}
        kept, unfit, waiting = await judge_labels(plane.store, routes, valid)
        errors = [{"index": i, "reason": r} for i, r in sorted([*refused, *unfit])]
        if kept:
            await plane.store.insert_feedback([item.as_row(now) for _, item in kept])
            await plane.joiner.join_pending()
        metrics = plane.metrics
        metrics.feedback_received.labels("accepted").inc(len(kept))
        metrics.feedback_received.labels("rejected").inc(len(errors))
        return json_response(
            {
                "accepted": len(kept),
                "rejected": len(errors),
                # accepted, naming no prediction stored yet: joined once it is
                "waiting": waiting,
                "errors": errors,
            },
            200 if kept else 422,
        )

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok", "config_version": plane.live.loaded.version})

    async def metrics(request: Request) -> Response:
        return Response(await plane.metrics.scrape(), media_type=CONTENT_TYPE)

    async def predictions(request: Request) -> Response:
        request_id = request.query_params.get("request_id")
        if not request_id:
            return error_response(400, "bad_request", "request_id: the client's request id")
        if unstorable(request_id):  # no stored id holds these, and a store would refuse them
            return json_response({"request_id": request_id, "predictions": []})
        found = await plane.store.predictions_of_request(request_id, 1000)
        return json_response({"request_id": request_id, "predictions": found})

    async def prediction(request: Request) -> Response:
        wanted = request.path_params["prediction_id"]
        if not wanted:
            raise HTTPException(404)  # /admin/predictions/: no endpoint, as for any other
        if unstorable(wanted):  # no stored id holds NUL or an unpaired surrogate
            return error_response(
                404, "not_found", f"no prediction or client request id {wanted!r}"
            )
        record = await plane.store.get_prediction(wanted)
        if record is None:
            # the client's own id (X-Request-Id, or the id of a V2 request): its latest
            latest = await plane.store.predictions_of_request(wanted, 1)
            record = await plane.store.get_prediction(latest[0]) if latest else None
        if record is None:
            return error_response(
                404, "not_found", f"no prediction or client request id {wanted!r}"
            )
        prediction_id = record["prediction_id"]
        out = _jsonable(record)
        labels = await plane.store.feedback_for(prediction_id)
        out["feedback"] = [
            {
                **f,
                "label_time": format_rfc3339(f["label_time"]),
                "received_at": format_rfc3339(f["received_at"]),
            }
            for f in labels
        ]
        # the latest label: a person's decision alone is none
        given = [f["label"] for f in labels if f["label"] is not None]
        out["label"] = given[-1] if given else None
        # the shadows' answers to the same request (a shadow's own record has shadow_of)
        out["shadows"] = [_jsonable(copy) for copy in await plane.store.shadows_of(prediction_id)]
        return json_response(out)

    async def reload(request: Request) -> Response:
        result = await plane.reloader.reload("POST /admin/reload")
        if result.outcome == "failed":
            return json_response(
                {
                    "error": {
                        "code": "invalid_config",
                        "message": "the configuration was not reloaded; the old one stays live",
                        "problems": result.problems,
                    },
                    "config_version": result.version,
                },
                422,
            )
        return json_response({"status": result.outcome, "config_version": result.version})

    async def routing(request: Request) -> Response:
        raw = request.query_params.get("at")
        if raw is None:
            at = time.time()
        else:
            try:
                at = parse_rfc3339(raw)
            except ValueError as exc:
                return error_response(400, "bad_request", f"at: {exc}")
        found = await plane.store.config_at(at)
        if found is None:
            return error_response(
                404, "not_found", f"no configuration was active at {format_rfc3339(at)}"
            )
        return json_response(
            {
                "at": format_rfc3339(at),
                "config_version": found["version"],
                "activated_at": format_rfc3339(found["activated_at"]),
                "source": found["source"],
                "routes": routing_snapshot(found["text"]),
            }
        )

    async def report(request: Request) -> Response:
        params = request.query_params
        routes = {r.name: r for r in plane.live.loaded.config.routes}
        name = params.get("route")
        if name is None and len(routes) == 1:
            name = next(iter(routes))
        if name not in routes:
            return error_response(
                400, "bad_request", f"route: one of {', '.join(sorted(routes))} is required"
            )
        bounds: dict[str, float] = {}
        for bound in ("until", "since"):
            if bound in params:
                try:
                    bounds[bound] = parse_rfc3339(params[bound])
                except ValueError as exc:
                    return error_response(400, "bad_request", f"{bound}: {exc}")
        until = bounds.get("until", time.time() - label_horizon(routes[name]))
        since = bounds.get("since", until - DAY)
        if since >= until:
            return error_response(400, "bad_request", "since must be before until")
        result = await route_report(plane.store, routes[name], since, until)
        if routes[name].monitoring is not None:
            # the data's statistics: each monitoring window's latest, up to their computation
            result["monitoring"] = await plane.monitor.statistics(name)
        return json_response(presented(result))

    async def experiments(request: Request) -> Response:
        return json_response(
            {
                "experiments": [
                    {
                        "id": r.experiment.id,
                        "route": r.name,
                        "start": format_rfc3339(r.experiment.start.timestamp()),
                        "champion": r.experiment.champion,
                        "primary_metric": r.experiment.primary_metric,
                    }
                    for r in plane.live.loaded.config.routes
                    if r.experiment is not None
                ]
            }
        )

    async def experiment(request: Request) -> Response:
        wanted = request.path_params["experiment_id"]
        route = find_experiment(plane.live.loaded.config.routes, wanted)
        if route is None or route.experiment is None:
            return error_response(
                404, "not_found", "no experiment of the live configuration has that id"
            )
        until = None
        if "until" in request.query_params:
            try:
                until = parse_rfc3339(request.query_params["until"])
            except ValueError as exc:
                return error_response(400, "bad_request", f"until: {exc}")
        since, until = experiment_window(route, route.experiment, until)
        result = await route_report(plane.store, route, since, until)
        return json_response(presented(result))

    async def dead_letters(request: Request) -> Response:
        raw = request.query_params.get("limit", "100")
        if not raw.isdigit() or not 1 <= int(raw) <= 10_000:
            return error_response(400, "bad_request", "limit: a whole number from 1 to 10000")
        letters = await plane.store.list_dead_letters(int(raw))
        for letter in letters:
            # the record stays JSON text: it may hold escapes of what JSON cannot carry
            letter["failed_at"] = format_rfc3339(letter["failed_at"])
        return json_response({"dead_letters": letters})

    async def rollouts(request: Request) -> Response:
        found = plane.rollouts.described(time.time())
        return json_response({"rollouts": _rollouts_presented(found)})

    async def rollout(request: Request) -> Response:
        wanted = request.path_params["rollout_id"]
        for found in plane.rollouts.described(time.time()):
            if found["id"] == wanted:
                return json_response(_rollouts_presented([found])[0])
        return error_response(404, "not_found", f"no rollout {wanted!r} in the configuration")

    async def rollout_action(request: Request) -> Response:
        wanted, action = request.path_params["rollout_id"], request.path_params["action"]
        try:
            found = await plane.rollouts.act(wanted, action, "admin")
        except KeyError:
            return error_response(404, "not_found", f"no rollout {wanted!r} in the configuration")
        except ValueError as refused:
            return error_response(409, "conflict", str(refused))
        return json_response(_rollouts_presented([found])[0])

    return [
        Route("/healthz", healthz),
        Route("/admin/dead-letters", guarded(dead_letters)),
        Route("/admin/report", guarded(report)),
        Route("/admin/experiments", guarded(experiments)),
        Route("/admin/experiments/{experiment_id}", guarded(experiment)),
        Route("/metrics", metrics),
        Route("/admin/predictions", guarded(predictions)),
        # a row of a batch is <id>/<row>
        Route("/admin/predictions/{prediction_id:path}", guarded(prediction)),
        Route("/admin/reload", guarded(reload), methods=["POST"]),
        Route("/feedback", feedback, methods=["POST"]),
        Route("/admin/routing", guarded(routing)),
        Route("/admin/rollouts", guarded(rollouts)),
        Route("/admin/rollouts/{rollout_id}", guarded(rollout)),
        Route("/admin/rollouts/{rollout_id}/{action}", guarded(rollout_action), methods=["POST"]),
        *monitoring_routes(plane.store, plane.live, plane.monitor, guarded),
    ]


async def route_report(store: Store, route: RouteConfig, since: float, until: float) -> Any:
    """A route's quality report over [since, until), its split judged against the weights
    each request was routed by (the configuration history)."""
    rows = await store.report_rows(route.name, since, until)
    versions = sorted({r["config_version"] for r in rows if r.get("config_version")})
    texts = await store.config_texts(versions) if versions else {}
    weights_at = {}
    for version, text in texts.items():
        weights = route_weights(text, route.name)
        if weights is not None:
            weights_at[version] = weights
    # the statistics are CPU work: keep them off the event loop
    return await asyncio.to_thread(build_report, rows, route, since, until, weights_at)


def presented(report: dict[str, Any]) -> dict[str, Any]:
    """A report as answered: its instants as RFC 3339 text."""
    report["since"], report["until"] = (
        format_rfc3339(report["since"]),
        format_rfc3339(report["until"]),
    )
    start = report["experiment"]["start"]
    if start is not None:
        report["experiment"]["start"] = format_rfc3339(start)
    return report


def find_experiment(routes: Sequence[RouteConfig], experiment_id: str) -> RouteConfig | None:
    """The route whose experiment has this id (ids are unique in a configuration)."""
    return next((r for r in routes if r.experiment and r.experiment.id == experiment_id), None)


def experiment_window(
    route: RouteConfig, experiment: ExperimentConfig, until: float | None
) -> tuple[float, float]:
    """An experiment's report counts from its start to ``until``, by default the route's
    label horizon before now (a window that has not begun yet is empty)."""
    since = experiment.start.timestamp()
    end = until if until is not None else time.time() - label_horizon(route)
    return since, max(since, end)


def label_horizon(route: RouteConfig) -> float:
    """How long before now a report's default window ends: the route's label horizon."""
    return route.evaluation.label_horizon if route.evaluation is not None else 0.0


def route_weights(text: str, route_name: str) -> dict[str, float] | None:
    """A route's variant weights in a stored configuration text; None when the route is not
    in it, or a weight is not written as a number there."""
    for route in routing_snapshot(text):
        if route["name"] == route_name:
            weights = {v["name"]: v["weight"] for v in route["variants"]}
            numeric = all(
                isinstance(w, int | float) and not isinstance(w, bool) for w in weights.values()
            )
            return {n: float(w) for n, w in weights.items()} if numeric else None
    return None


def _bearer_matches(request: Request, token: str) -> bool:
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


def routing_snapshot(text: str) -> list[dict[str, Any]]:
    """Routes, variants, versions, weights and shares (and shadows) of a stored configuration
    text, with any password a URL holds replaced.

    The text was valid, its ``${VAR}`` references expanded, when it was activated; it is read
    here as written, as data, without validating it again: a reference need not be set in
    this process, and ``${VAR}`` (shown as is) is how a URL keeps its credentials out of the
    file. A share is given when every weight of the route is written as a number.
    """
    routes = []
    document = yaml.safe_load(text)
    moved = document.get(WEIGHTS_KEY) or {}
    for raw in document["routes"]:
        variants = raw.get("variants") or []
        # a rollout's weights, where one moved them, over the file's
        overrides = moved.get(raw.get("name")) or {}
        weights = [overrides.get(v.get("name"), v.get("weight", _DEFAULT_WEIGHT)) for v in variants]
        numeric = all(isinstance(w, int | float) and not isinstance(w, bool) for w in weights)
        total = sum(weights) if numeric else 0
        routes.append(
            {
                "name": raw.get("name"),
                "path": raw.get("path"),
                "match": raw.get("match", _DEFAULT_MATCH),
                "routing_key": raw.get("routing_key"),
                "variants": [
                    {
                        "name": v.get("name"),
                        "model_version": _text(v.get("model_version")),
                        "url": redact_url(str(v.get("url"))),
                        "weight": weight,
                        "share": weight / total if total else None,
                    }
                    for v, weight in zip(variants, weights, strict=True)
                ],
                # copied traffic: deployed, logged, never answering clients
                "shadows": [
                    {
                        "name": sh.get("name"),
                        "model_version": _text(sh.get("model_version")),
                        "url": redact_url(str(sh.get("url"))),
                        "percent": sh.get("percent", _DEFAULT_PERCENT),
                    }
                    for sh in raw.get("shadows") or []
                ],
            }
        )
    return routes


_DEFAULT_WEIGHT = VariantConfig.model_fields["weight"].default
_DEFAULT_MATCH = RouteConfig.model_fields["match"].default
_DEFAULT_PERCENT = ShadowConfig.model_fields["percent"].default


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key in ("request_time", "response_time"):
            value = format_rfc3339(value)
        elif key in ("request_headers", "response_headers") and value is not None:
            value = orjson.loads(value)
        elif key in ("request_truncated", "response_truncated", "shadow"):
            value = bool(value)
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                value = {"base64": base64.b64encode(value).decode()}
        out[key] = value
    return out


def _rollouts_presented(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rollouts as answered: their instants as RFC 3339 text."""
    for rollout in found:
        for key in ("started_at", "step_started_at", "updated_at"):
            rollout[key] = format_rfc3339(rollout[key])
    return found
