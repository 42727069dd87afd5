"""Shadow traffic: copies of live requests sent to shadow model servers in the background.

A route's ``shadows`` get a copy of a share of its requests once the live answer has gone to
the client, so the client never waits for a shadow and never sees its answer (Seldon's
shadow, Istio's mirror). Each copy's answer is read, evaluated and logged like a live one:
its own prediction id, ``shadow`` set, and ``shadow_of`` naming the live prediction it copies,
so the two answers to one request can be compared, and a label given for the live prediction
measures the shadow too.

A slow or dead shadow costs memory, never latency: each shadow has at most ``max_in_flight``
copies outstanding, and a copy past that is skipped and counted. Shutdown waits for the copies
in flight (each bounded by the route's timeouts), so their records are written like the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import GatewayError
from .metrics import Metrics
from .records import PredictionRecord, new_prediction_id
from .routing import NOT_INFERENCE_METHODS, Route, Shadow
from .store.writer import RecordWriter
from .upstream import UpstreamClient, UpstreamErrors, UpstreamResponse

if TYPE_CHECKING:
    from .active import ActiveConfig

log = logging.getLogger("model_gateway.shadow")

# A shadow's answer is read whole up to this size, to be evaluated; past it the rest is read
# and dropped (the copy's latency is to the end of the answer), and it is not evaluated.
READ_LIMIT = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveRequest:
    """What a shadow copy needs of the live request it copies."""

    prediction_id: str
    request_id: str | None
    method: str
    path: str
    #: path and query as the client encoded them, appended to the shadow's base URL
    target: bytes
    #: the headers forwarded to the live variant, ``X-Prediction-Id`` last
    headers: list[tuple[bytes, bytes]]
    body: bytes
    #: the rows of the live answer when it was a batch (0: one row); a shadow's rows are
    #: compared with the live rows only when there are as many
    batch_size: int = 0


class ShadowMirror:
    def __init__(self, upstream: UpstreamClient, writer: RecordWriter, metrics: Metrics) -> None:
        self._upstream = upstream
        self._writer = writer
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: dict[tuple[str, str], int] = {}

    def send(
        self, active: ActiveConfig, route: Route, shadows: list[Shadow], live: LiveRequest
    ) -> None:
        """Start a copy of ``live`` to each of ``shadows``; returns at once."""
        for shadow in shadows:
            key = (route.name, shadow.name)
            waiting = self._in_flight.get(key, 0)
            # a copy is skipped rather than waited for when the log is full (overflow: block)
            if waiting >= shadow.max_in_flight or not self._writer.admit():
                self._metrics.skip_shadow(route.name, shadow.name)
                continue
            self._in_flight[key] = waiting + 1
            task = asyncio.get_running_loop().create_task(self._copy(active, route, shadow, live))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Wait for every copy in flight; each ends within its route's total timeout."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _copy(
        self, active: ActiveConfig, route: Route, shadow: Shadow, live: LiveRequest
    ) -> None:
        try:
            record = await self._exchange(active, route, shadow, live)
        except BaseException as fault:
            self._writer.release()  # no record: its place goes back
            if not isinstance(fault, Exception):
                raise
            # a fault in the gateway itself (upstream faults become records): said, not hidden
            log.exception(
                "shadow copy of %s to %s/%s failed", live.prediction_id, route.name, shadow.name
            )
            return
        finally:
            self._in_flight[(route.name, shadow.name)] -= 1
        self._writer.offer(record, reserved=True)

    async def _exchange(
        self, active: ActiveConfig, route: Route, shadow: Shadow, live: LiveRequest
    ) -> PredictionRecord:
        prediction_id = new_prediction_id()
        headers = [*live.headers[:-1], (b"X-Prediction-Id", prediction_id.encode())]
        request_time = time.time()
        started = time.perf_counter()
        status, error = 0, None
        body: bytes | None = None
        response_headers: list[tuple[bytes, bytes]] = []
        version: str | None = None
        predicted: str | None = None
        score: float | None = None
        rows: list[tuple[str | None, float | None]] | None = None
        size = 0
        truncated = False
        try:
            with UpstreamErrors(shadow.name):
                response = await self._upstream.request(
                    live.method,
                    shadow.url,
                    live.target,
                    headers,
                    live.body,
                    active.timeouts[route.name],
                )
                try:
                    status = response.status
                    response_headers = list(response.raw_headers)
                    body, truncated = await _read_capped(response)
                finally:
                    response.close()  # a no-op once the answer was read to the end
            content_type = response.headers.get("Content-Type")
            encoding = response.headers.get("Content-Encoding")
            doc = route.answers.document(
                body, content_type, response.headers, not truncated, encoding
            )
            version = route.answers.version(response.headers, doc)
            inference = live.method not in NOT_INFERENCE_METHODS
            if route.answers.evaluates and 200 <= status < 300 and inference:
                predicted, score = route.answers.prediction(doc)
                found = route.answers.rows(doc)
                shadow_size = 0 if found is None else found[0]
                if shadow_size != live.batch_size:
                    # no row of one answer is a row of the other: nothing to compare
                    predicted, score, size = None, None, shadow_size
                    error = (
                        f"answered {shadow_size or 1} row(s) to the live answer's"
                        f" {live.batch_size or 1}: not compared"
                    )
                elif found is not None:  # a batch: each row is a prediction of its own
                    (size, rows), predicted, score = found, None, None
        except GatewayError as failure:
            status = status or failure.status
            error = failure.log_text()
        elapsed = time.perf_counter() - started
        served = version or shadow.model_version
        self._metrics.observe_shadow(route.name, shadow.name, served, status, elapsed)
        redactor = route.redactor
        request_body, request_cut = redactor.body(live.body)
        response_body, response_cut = redactor.body(body)
        return PredictionRecord(
            prediction_id=prediction_id,
            request_id=live.request_id,
            route=route.name,
            variant=shadow.name,
            model_name=route.model_name_for(live.path),
            configured_version=shadow.model_version,
            reported_version=version,
            assignment="shadow",
            routing_key=None,
            config_version=active.version,
            method=live.method,
            path=live.path,
            request_time=request_time,
            response_time=request_time + elapsed,
            latency_ms=elapsed * 1000.0,
            status=status,
            error=error,
            request_body=request_body,
            response_body=response_body,
            request_truncated=request_cut,
            response_truncated=response_cut or truncated,
            request_headers=redactor.headers(headers),
            response_headers=redactor.headers(response_headers),
            shadow=True,
            predicted=predicted,
            score=score,
            shadow_of=live.prediction_id,
            inference=live.method not in NOT_INFERENCE_METHODS,
            batch_size=size or None,
            batch_rows=rows,
        )


async def _read_capped(response: UpstreamResponse) -> tuple[bytes, bool]:
    """The answer up to :data:`READ_LIMIT` bytes, and whether there was more (read and
    dropped, so that the connection goes back to the pool and the latency is the whole
    answer's)."""
    chunks: list[bytes] = []
    size = 0
    truncated = False
    while chunk := await response.readany():
        size += len(chunk)
        if size <= READ_LIMIT:
            chunks.append(chunk)
        else:
            truncated = True
    return b"".join(chunks), truncated
