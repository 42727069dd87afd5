"""The hot path: one request in, one request forwarded, one response out, one record queued.

A pure ASGI app. Per request it does a dict lookup for the route, a draw or a hash for the
variant, one upstream exchange over a pooled connection, and one record appended to the log queue;
no disk, no database, no validation library.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .active import ActiveConfig
from .answers import AnswerReader
from .errors import (
    CLIENT_CLOSED_REQUEST,
    ERROR_CODE_HEADER,
    BadRequestError,
    GatewayError,
    LogUnavailableError,
    NoHealthyVariantError,
    NoRouteError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ShuttingDownError,
    UnknownVariantError,
    UnknownVersionError,
)
from .features import binary_header_length
from .headers import (
    NOT_RELAYED,
    ClientHeaders,
    Scope,
    forward_headers,
    gateway_headers,
    header_value,
    upstream_target,
)
from .metrics import Metrics
from .protocols import requested_version, server_answer
from .records import PredictionRecord, new_prediction_id
from .routing import (
    NOT_INFERENCE_METHODS,
    Assignment,
    Route,
    Variant,
    choose_variant,
    shadows_for,
)
from .serving.limits import SEND_TIMEOUT
from .serving.signals import RequestSignals, request_signals
from .shadow import LiveRequest
from .state import GatewayState
from .upstream import UpstreamErrors, UpstreamResponse
from .usage import NO_USAGE, STREAM_TAIL_BYTES, stream_usage, usage_of

Message = dict[str, Any]
log = logging.getLogger("model_gateway.proxy")

# Responses up to this size with a Content-Length are read whole, so the served version can
# be read from the body; anything larger, chunked, or an event stream passes through as it comes.
BUFFER_LIMIT = 1024 * 1024
_DOT_SEGMENTS = frozenset({".", ".."})
_JSON_ERROR_HEADERS = [(b"content-type", b"application/json")]
#: how an OpenAI-style event stream ends (the last event; then the answer's end)
_SSE_DONE = b"data: [DONE]"


class ClientDisconnected(Exception):
    """The client went away before the response was complete; the message says when."""


class Exchange:
    """What one request learned on its way through; becomes the log record."""

    __slots__ = (
        "answer_id",
        "batch_rows",
        "batch_size",
        "durable",
        "error",
        "fell_back",
        "first_byte",
        "forwarded_headers",
        "key",
        "predicted",
        "rand",
        "reported_version",
        "request_body",
        "response_body",
        "response_headers",
        "response_truncated",
        "score",
        "signals",
        "spool_failed",
        "spool_segment",
        "started",
        "status",
        "streamed",
        "target",
        "upstream_seconds",
        "usage",
        "variant",
        "version",
        "watcher",
    )

    def __init__(
        self, variant: Variant, key: str | None, rand: float, version: str | None, started: float
    ) -> None:
        #: the variant that answered: the one chosen, or another after a connect retry
        self.variant = variant
        #: what chose the variant (routing key, uniform draw, the version the path names),
        #: to choose again on a retry
        self.key = key
        self.rand = rand
        self.version = version
        #: the id a V2 answer repeats from its request
        self.answer_id: str | None = None
        #: when the request arrived (perf_counter), and how long after it the answer began
        self.started = started
        self.first_byte: float | None = None
        #: relayed as it came, not read whole
        self.streamed = False
        #: what an OpenAI-style answer says of its model and tokens
        self.usage = NO_USAGE
        #: a batch answer's rows, and the (prediction, score) of those logged
        self.batch_size = 0
        self.batch_rows: list[tuple[str | None, float | None]] | None = None
        #: the headers sent upstream; set once the whole request body has been read
        self.forwarded_headers: list[tuple[bytes, bytes]] | None = None
        #: the path and query sent upstream, set with them
        self.target = b""
        self.status = 0
        self.error: str | None = None
        self.reported_version: str | None = None
        #: what the server edge tells of the connection (serving/signals.py); under an edge
        #: that tells nothing, the proxy's own, with ``watcher`` reading ``receive`` for the
        #: client's going while the request waits on the model server
        self.signals: RequestSignals | None = None
        self.watcher: asyncio.Future[None] | None = None
        self.request_body = b""
        self.response_body: bytes | None = None
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.response_truncated = False
        self.predicted: str | None = None
        self.score: float | None = None
        self.upstream_seconds: float | None = None
        #: durability answered: makes the record durable, before the answer with this status
        #: leaves; None in buffered mode
        self.durable: Callable[[int], Awaitable[None]] | None = None
        #: the spool segment that holds the record until the store has it
        self.spool_segment = 0
        #: the spool could not be written: the 503 says nothing of the model server
        self.spool_failed = False
        #: the variant chosen refused the connection and another answered (a connect retry)
        self.fell_back = False


class ProxyApp:
    def __init__(self, state: GatewayState) -> None:
        self.state = state
        # uniform draws from a generator of the proxy's own: the module-level one is shared
        # state that anything else in the process may seed or consume
        self._draw = random.Random().random

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        started = time.perf_counter()
        request_time = time.time()
        active = self.state.active
        prediction_id = new_prediction_id()
        method: str = scope["method"]
        path: str = scope["path"]

        route = active.table.match(path, method)
        if route is None:
            await self._no_route(scope, send, active, prediction_id)
            return

        client = ClientHeaders(scope["headers"], route.routing_header)
        request_id, key = client.request_id, client.key
        rand = self._draw()
        version = requested_version(path) if "/versions/" in path else None
        try:
            variant, assignment = choose_variant(
                route,
                key=key,
                forced=client.forced,
                rand=rand,
                down=self.state.health.down.get(route.name),
                version=version,
            )
        except (UnknownVariantError, UnknownVersionError, NoHealthyVariantError) as error:
            await _send_error(send, error, [(b"x-prediction-id", prediction_id.encode())], path)
            self.state.metrics.observe_request(route.name, "", "", error.status, 0.0)
            return

        # Under overflow: block the record's place in the log is taken now, before anything
        # is forwarded: a store that cannot keep up slows new requests, never fills memory.
        writer = self.state.writer
        if not writer.admit():
            refused: GatewayError | None = None
            try:
                await writer.wait_for_room()
            except LogUnavailableError as full:
                self.state.metrics.log_unavailable.inc()
                refused = full
            except asyncio.CancelledError:
                _answer_cancel()  # the stop ran out of time: the request ends here
                refused = ShuttingDownError("the gateway stopped before the request began")
            if refused is not None:
                ids = [(b"x-prediction-id", prediction_id.encode())]
                await _send_error(send, refused, ids, path)
                self.state.metrics.observe_request(route.name, "", "", refused.status, 0.0)
                return

        queued = False
        try:
            exchange = Exchange(variant, key, rand, version, started)
            spool = self.state.spool
            if spool is not None:

                async def durable(status: int) -> None:
                    if exchange.spool_segment:
                        return  # on disk already (an error after the append)
                    elapsed = time.perf_counter() - started
                    record = self._record(
                        scope,
                        active,
                        route,
                        prediction_id,
                        client,
                        assignment,
                        exchange,
                        request_time,
                        elapsed,
                    )
                    record.status = status
                    try:
                        exchange.spool_segment = await spool.append(record.spool_row())
                    except OSError as failed:
                        raise LogUnavailableError(
                            f"the spool could not be written: {failed}"
                        ) from None

                exchange.durable = durable
            metrics = self.state.metrics
            metrics.requests_in_flight += 1
            cut_off = False
            try:
                await self._exchange(
                    scope,
                    receive,
                    send,
                    active,
                    route,
                    assignment,
                    prediction_id,
                    client,
                    exchange,
                )
            except ClientDisconnected as gone:
                signals = exchange.signals
                stalled = None if signals is None else signals.send_timed_out
                if stalled is None:
                    exchange.status = CLIENT_CLOSED_REQUEST
                    exchange.error = f"client disconnected {gone}"
                else:  # the answer had begun: its status stands, as nginx logs it
                    exchange.error = stalled
            except asyncio.CancelledError:
                # uvicorn cancels what still runs when a graceful stop's shutdown_timeout ends,
                # then closes the log: the request is answered and logged here, before that
                cut_off = True
                await _cut_off(send, prediction_id, exchange, path)
            except Exception as fault:
                # a fault of the gateway's own: the client still gets an answer, the log a record
                log.exception("request %s failed inside the gateway", prediction_id)
                exchange.error = f"internal: {type(fault).__name__}: {fault}"
                if exchange.status == 0:
                    exchange.status = 500
                    internal = GatewayError("the gateway failed to handle the request")
                    ids = [(b"x-prediction-id", prediction_id.encode())]
                    with contextlib.suppress(Exception):
                        if exchange.durable is not None:  # on disk before it leaves
                            await exchange.durable(500)
                        await _send_error(send, internal, ids, path)
            finally:
                metrics.requests_in_flight -= 1
                _stop_waiting(exchange)
            variant = exchange.variant
            # Neither the gateway's own stop nor a request that never reached the model server
            # (its body refused, too large, or not sent in time) says anything of the model server.
            if not (cut_off or exchange.spool_failed) and exchange.forwarded_headers is not None:
                self.state.health.record_result(route.name, variant.name, exchange.status)

            elapsed = time.perf_counter() - started
            version = exchange.reported_version or variant.model_version
            if exchange.batch_rows is not None:
                if exchange.batch_size > len(exchange.batch_rows):
                    metrics.batch_rows_unlogged.labels(route.name).inc(
                        exchange.batch_size - len(exchange.batch_rows)
                    )
                metrics.observe_row_scores(
                    route.name,
                    variant.name,
                    version,
                    [s for _, s in exchange.batch_rows[1:] if s is not None],
                )
            usage = exchange.usage
            if usage.prompt_tokens is not None or usage.completion_tokens is not None:
                metrics.observe_tokens(
                    route.name, variant.name, usage.prompt_tokens, usage.completion_tokens
                )
            metrics.observe_request(
                route.name,
                variant.name,
                version,
                exchange.status,
                elapsed,
                exchange.upstream_seconds,
                exchange.score,
                exchange.first_byte,
                exchange.streamed,
            )
            record = self._record(
                scope,
                active,
                route,
                prediction_id,
                client,
                assignment,
                exchange,
                request_time,
                elapsed,
            )
            record.spool_segment = exchange.spool_segment
            writer.offer(record, reserved=True)  # never waits: its place was taken on the way in
            queued = True
        finally:
            if not queued:  # a fault on the way: the place reserved goes back
                writer.release()
        # no copies are made during a shutdown's last moments: it would wait for them
        if route.shadows and exchange.forwarded_headers is not None and not cut_off:
            shadows = shadows_for(route, self._draw())  # a draw of its own, not the variant's
            if shadows:
                live = LiveRequest(
                    prediction_id=prediction_id,
                    request_id=request_id,
                    method=method,
                    path=path,
                    target=exchange.target,
                    headers=exchange.forwarded_headers,
                    body=exchange.request_body,
                    batch_size=exchange.batch_size,
                )
                self.state.mirror.send(active, route, shadows, live)

    def _record(
        self,
        scope: Scope,
        active: ActiveConfig,
        route: Route,
        prediction_id: str,
        client: ClientHeaders,
        assignment: Assignment,
        exchange: Exchange,
        request_time: float,
        elapsed: float,
    ) -> PredictionRecord:
        """The log record of what ``exchange`` learned, ``elapsed`` seconds in."""
        variant = exchange.variant
        redactor = route.redactor
        request_body, request_cut = redactor.body(exchange.request_body)
        response_body, response_cut = redactor.body(exchange.response_body)
        key = client.key
        if key is not None and route.hash_routing_key:
            key = hashlib.sha256(key.encode()).hexdigest()[:32]
        path: str = scope["path"]
        rows = exchange.batch_rows
        # the monitored features, for the log to read (features.py): only of a whole body sent
        # for a prediction (one refused before it was read tells nothing of the data)
        spec = route.features
        features = None
        if (
            spec is not None
            and exchange.forwarded_headers is not None
            and scope["method"] not in NOT_INFERENCE_METHODS
        ):
            features = (spec, exchange.request_body, binary_header_length(scope["headers"]))
        return PredictionRecord(
            prediction_id=prediction_id,
            request_id=client.request_id if client.request_id is not None else exchange.answer_id,
            route=route.name,
            variant=variant.name,
            model_name=route.model_name_for(path),
            configured_version=variant.model_version,
            reported_version=exchange.reported_version,
            assignment="fallback" if exchange.fell_back else assignment,
            routing_key=key if assignment == "sticky" else None,
            config_version=active.version,
            method=scope["method"],
            path=path,
            request_time=request_time,
            response_time=request_time + elapsed,
            latency_ms=elapsed * 1000.0,
            status=exchange.status,
            error=exchange.error,
            request_body=request_body,
            response_body=response_body,
            request_truncated=request_cut,
            response_truncated=response_cut or exchange.response_truncated,
            request_headers=redactor.headers(scope["headers"]),
            response_headers=redactor.headers(exchange.response_headers),
            # a batch's predictions are its rows'
            predicted=exchange.predicted if rows is None else None,
            score=exchange.score if rows is None else None,
            inference=scope["method"] not in NOT_INFERENCE_METHODS,
            first_byte_ms=None if exchange.first_byte is None else exchange.first_byte * 1000.0,
            streamed=exchange.streamed,
            served_model=exchange.usage.served_model,
            prompt_tokens=exchange.usage.prompt_tokens,
            completion_tokens=exchange.usage.completion_tokens,
            batch_size=None if rows is None else exchange.batch_size,
            features=features,
            batch_rows=rows,
        )

    async def _exchange(
        self,
        scope: Scope,
        receive: Any,
        send: Any,
        active: ActiveConfig,
        route: Route,
        assignment: Assignment,
        prediction_id: str,
        client: ClientHeaders,
        exchange: Exchange,
    ) -> None:
        variant = exchange.variant
        # none until the body is whole (the tuned edge), or at all (the stock edge)
        signals = request_signals(scope)
        try:
            path: str = scope["path"]
            # a "." or ".." segment follows a "/": most paths are cleared without a split
            if "/." in path and not _DOT_SEGMENTS.isdisjoint(path.split("/")):
                raise BadRequestError("path segments '.' and '..' are not forwarded")
            exchange.request_body = await _read_body(
                signals,
                receive,
                route.max_body_bytes,
                client.content_length,
                active.client_body_timeout,
            )
            signals = exchange.signals = request_signals(scope)
            headers = exchange.forwarded_headers = forward_headers(scope, client, prediction_id)
            target = exchange.target = upstream_target(scope)
            retries_left = route.connect_retries if assignment != "forced" else 0
            tried: set[str] | None = None  # built only on a retry
            if signals is None:
                # an edge that tells nothing of the connection (the stock one): the client's
                # going is watched for here, as any ASGI app would
                signals = exchange.signals = RequestSignals()
                exchange.watcher = asyncio.ensure_future(_watch_for_disconnect(receive, signals))
            signals.waiting = asyncio.current_task()
            while True:
                sent = time.perf_counter()
                upstream_errors = UpstreamErrors(variant.name)
                try:
                    with upstream_errors:
                        upstream = await self.state.upstream.request(
                            scope["method"],
                            variant.url,
                            target,
                            headers,
                            exchange.request_body,
                            active.timeouts[route.name],
                        )
                    break
                except GatewayError as error:
                    if not (error.nothing_sent and retries_left):
                        raise
                    tried = {variant.name} if tried is None else tried | {variant.name}
                    following = self._next_variant(route, exchange, tried)
                    if following is None:
                        raise
                    retries_left -= 1
                    self.state.metrics.upstream_retry(route.name, variant.name, error.reason)
                    # the failed attempt counts toward the variant's passive ejection
                    self.state.health.record_result(route.name, variant.name, error.status)
                    variant = exchange.variant = following
                    exchange.fell_back = True
            ours = gateway_headers(prediction_id, variant)
            complete = False
            try:
                with upstream_errors:
                    await self._relay(
                        scope, send, receive, active, route, variant, upstream, ours, exchange
                    )
                complete = True
                exchange.upstream_seconds = time.perf_counter() - sent
            finally:
                # A response not read to the end must not go back to the pool; one read to
                # the end has already given its connection back.
                if not complete:
                    upstream.close()
        except asyncio.CancelledError:
            if signals is None or not signals.client_gone:
                raise
            _stop_waiting(exchange)
            _answer_cancel()  # the protocol's cancel becomes this exception
            raise ClientDisconnected("before the answer") from None
        except GatewayError as error:
            _stop_waiting(exchange)
            exchange.error = error.log_text()
            if isinstance(error, LogUnavailableError):
                exchange.spool_failed = True
            else:
                self.state.metrics.upstream_error(route.name, variant.name, error.reason)
            if exchange.status == 0:
                exchange.status = error.status
                if exchange.durable is not None:
                    # a spool that cannot be written does not keep the error from the client
                    with contextlib.suppress(LogUnavailableError):
                        await exchange.durable(error.status)
                ours = gateway_headers(prediction_id, variant)
                ours.append((b"x-model-version", header_value(variant.model_version)))
                await _send_error(send, error, ours, scope["path"])
            # else the response had begun: the client sees a truncated body, as from nginx

    async def _no_route(
        self, scope: Scope, send: Any, active: ActiveConfig, prediction_id: str
    ) -> None:
        """A path no route claims: a V2 server-level call the gateway answers itself (see
        :mod:`.protocols`), else 404 ``no_route``."""
        method: str = scope["method"]
        path: str = scope["path"]
        answer = server_answer(
            path, method, active.table.routes, self.state.health.down, self.state.version
        )
        if answer is None:
            error = NoRouteError(f"no route for {method} {path}")
            await _send_error(send, error, [(b"x-prediction-id", prediction_id.encode())], path)
            self.state.metrics.observe_request("", "", "", error.status, 0.0)
            return
        status, body = answer
        headers = [(b"content-length", str(len(body)).encode())]
        if body:
            headers.append((b"content-type", b"application/json"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
        self.state.metrics.observe_request("", "", "", status, 0.0)

    def _next_variant(self, route: Route, exchange: Exchange, tried: set[str]) -> Variant | None:
        """Another variant for a request no variant in ``tried`` would connect for: chosen as
        the first was, by the same key or draw, among the variants that are up and untried."""
        down = self.state.health.down.get(route.name, frozenset()) | tried
        try:
            variant, _ = choose_variant(
                route,
                key=exchange.key,
                forced=None,
                rand=exchange.rand,
                down=down,
                version=exchange.version,
            )
        except NoHealthyVariantError:
            return None
        return variant

    async def _relay(
        self,
        scope: Scope,
        send: Any,
        receive: Any,
        active: ActiveConfig,
        route: Route,
        variant: Variant,
        upstream: UpstreamResponse,
        ours: list[tuple[bytes, bytes]],
        exchange: Exchange,
    ) -> None:
        headers = [
            (name, value) for name, value in upstream.raw_headers if name.lower() not in NOT_RELAYED
        ]
        exchange.response_headers = headers
        content_type = upstream.headers.get("Content-Type")
        encoded = "Content-Encoding" in upstream.headers
        length = upstream.content_length
        answers = route.answers

        if (
            length is not None
            and length <= BUFFER_LIMIT
            and "event-stream" not in (content_type or "")
        ):
            body = await upstream.read()
            _stop_waiting(exchange)
            doc = answers.document(
                body,
                content_type,
                upstream.headers,
                whole=True,
                encoding=upstream.headers.get("Content-Encoding") if encoded else None,
            )
            if doc is not None:
                # a V2 answer repeats the request's "id": the client's own id for the
                # prediction, when it sent no X-Request-Id (tritonclient sends none)
                answer_id = doc.get("id")
                if isinstance(answer_id, str) and "outputs" in doc:
                    exchange.answer_id = answer_id
                exchange.usage = usage_of(doc)
            exchange.reported_version = answers.version(upstream.headers, doc)
            if route.redactor.keep_bodies:
                exchange.response_body = body
            version = exchange.reported_version or variant.model_version
            headers.extend(ours)
            headers.append((b"x-model-version", header_value(version)))
            evaluates = (
                answers.evaluates
                and 200 <= upstream.status < 300
                and scope["method"] not in NOT_INFERENCE_METHODS
            )
            if exchange.durable is not None:
                if evaluates:
                    _evaluate(exchange, answers, doc)
                    evaluates = False
                await exchange.durable(upstream.status)
            exchange.first_byte = time.perf_counter() - exchange.started
            await send(
                {"type": "http.response.start", "status": upstream.status, "headers": headers}
            )
            exchange.status = upstream.status  # once sent: until then, another answer may be
            await send({"type": "http.response.body", "body": body})
            if evaluates:
                _evaluate(exchange, answers, doc)
            return

        _stop_waiting(exchange)  # from here on, a client that goes away is seen by receive
        # the stream's own bound on a client that reads nothing, where the edge has none
        send_timeout = active.send_timeout if exchange.watcher is not None else None
        exchange.reported_version = answers.version(upstream.headers, None)
        version = exchange.reported_version or variant.model_version
        headers.extend(ours)
        headers.append((b"x-model-version", header_value(version)))
        if exchange.durable is not None:
            await exchange.durable(upstream.status)
        exchange.streamed = True
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        exchange.status = upstream.status
        captured = bytearray()
        # the last events of an event stream, where an OpenAI-style answer puts its usage
        events = "event-stream" in (content_type or "")
        tail = bytearray()
        keep = route.redactor.max_bytes if route.redactor.keep_bodies else 0
        disconnect = asyncio.ensure_future(_wait_for_disconnect(receive))
        read: asyncio.Future[bytes] | None = None
        try:
            while True:
                read = asyncio.ensure_future(upstream.readany())
                await asyncio.wait((read, disconnect), return_when=asyncio.FIRST_COMPLETED)
                if not read.done():  # the client left while the model had more to say
                    if events and tail.rstrip().endswith(_SSE_DONE):
                        # ...or nothing more: it read the stream to its last event, as the
                        # openai SDK does, and closed before the answer's end came
                        upstream.close()
                        break
                    raise ClientDisconnected("during the stream")
                chunk = read.result()
                if not chunk:  # the end, though the client may have left as it came
                    break
                if disconnect.done():  # it left before this part
                    raise ClientDisconnected("during the stream")
                if events:
                    tail += chunk
                    if len(tail) > 2 * STREAM_TAIL_BYTES:
                        del tail[:-STREAM_TAIL_BYTES]
                if len(captured) < keep:
                    captured += chunk[: keep - len(captured)]
                elif keep:
                    exchange.response_truncated = True
                if exchange.first_byte is None:
                    # a streaming server sends its head at once, and its first token later
                    exchange.first_byte = time.perf_counter() - exchange.started
                part = {"type": "http.response.body", "body": chunk, "more_body": True}
                if send_timeout is None:
                    await send(part)
                else:
                    await _send_within(send, part, send_timeout, exchange, self.state.metrics)
        finally:
            disconnect.cancel()
            if read is not None:
                read.cancel()  # cancelled while it waited (a no-op once it is done)
                if read.done() and not read.cancelled():
                    read.exception()  # a failed read left behind by a client gone is seen
            if route.redactor.keep_bodies:
                exchange.response_body = bytes(captured)
            if events:  # what was relayed says which model, even of a stream cut short
                exchange.usage = stream_usage(bytes(tail[-STREAM_TAIL_BYTES:]))
        await send({"type": "http.response.body", "body": b""})


def _evaluate(exchange: Exchange, answers: AnswerReader, doc: dict[str, Any] | None) -> None:
    """The prediction and score of an answer; a batch's, row by row."""
    exchange.predicted, exchange.score = answers.prediction(doc)
    found = answers.rows(doc)
    if found is not None:
        exchange.batch_size, exchange.batch_rows = found


async def _wait_for_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _watch_for_disconnect(receive: Any, signals: RequestSignals) -> None:
    """What the tuned edge does for a request: cancel its wait on the model server when its
    client goes."""
    await _wait_for_disconnect(receive)
    waiting = signals.waiting
    if waiting is not None:
        signals.client_gone = True
        waiting.cancel()


def _stop_waiting(exchange: Exchange) -> None:
    """The request no longer waits on the model server: a client's going is not its cancel."""
    signals = exchange.signals
    if signals is not None:
        signals.waiting = None
    watcher = exchange.watcher
    if watcher is not None:
        watcher.cancel()


async def _send_within(
    send: Any, message: Message, seconds: float, exchange: Exchange, metrics: Metrics
) -> None:
    """Send a part of a stream, as long as the client takes it within ``seconds``: what the
    tuned edge's send_timeout does, for an edge that has none. Without the connection's
    transport in sight, a part still waiting counts as unread, so a client that reads too
    slowly for one part to leave within the limit is let go too."""
    try:
        async with asyncio.timeout(seconds):
            await send(message)
    except TimeoutError:
        assert exchange.signals is not None
        exchange.signals.send_timed_out = f"send_timeout: the client read nothing for {seconds:g} s"
        metrics.client_connection_closed(SEND_TIMEOUT)
        raise ClientDisconnected("during the stream") from None


async def _read_body(
    signals: RequestSignals | None,
    receive: Any,
    limit: int,
    content_length: int,
    pause_limit: float,
) -> bytes:
    """The whole request body; ``pause_limit``: the longest wait for its next part."""
    if content_length > limit:
        raise PayloadTooLargeError(f"request body of {content_length} bytes is over {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        if signals is not None and signals.body_complete:
            message = await receive()
        else:
            message = await _receive_within(receive, pause_limit)
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("while sending the request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body is over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _receive_within(receive: Any, seconds: float) -> Message:
    """The next part of the request, as long as it comes within ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            message: Message = await receive()
            return message
    except TimeoutError:
        raise RequestTimeoutError(
            f"the request body stopped coming: nothing arrived for {seconds:g} s"
        ) from None


def _answer_cancel() -> None:
    """The request's task caught a cancel meant for it and answers it itself (the request
    ends, or the cancel becomes its own exception): ``Task.uncancel``, so that the task no
    longer counts as being cancelled."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


async def _cut_off(send: Any, prediction_id: str, exchange: Exchange, path: str) -> None:
    _answer_cancel()  # the request ends here, as the cancel asked
    error = ShuttingDownError("the gateway stopped before the request was complete")
    exchange.error = error.log_text()
    if exchange.status == 0:
        exchange.status = error.status
        await _send_error(send, error, gateway_headers(prediction_id, exchange.variant), path)
    # else a response had begun: it stays incomplete, and uvicorn closes the connection


async def _send_error(
    send: Any, error: GatewayError, headers: list[tuple[bytes, bytes]], path: str
) -> None:
    """The gateway's own error, in the shape of the protocol of ``path``, its code in a header."""
    body = error.body(path)
    headers = [*headers, (ERROR_CODE_HEADER, error.code.encode())]
    if error.closes_connection:
        headers = [*headers, (b"connection", b"close")]
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                *_JSON_ERROR_HEADERS,
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
