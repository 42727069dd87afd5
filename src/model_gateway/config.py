"""The YAML configuration: schema, validation with path-qualified messages, loading, versioning.

A configuration is validated once, when it is loaded; everything downstream takes the typed
:class:`GatewayConfig` and never re-checks it. ``${VAR}`` and ``${VAR:-default}`` inside string
values are replaced from the environment, so secrets need not sit in the file.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from .columns import EXPORT_COLUMNS
from .errors import ConfigError

DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_TOTAL_TIMEOUT = 30.0
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
DEFAULT_CAPTURE_MAX_BYTES = 64 * 1024
DEFAULT_QUEUE_SIZE = 10_000
DEFAULT_DRAIN_TIME = 1.0
# A power of two: the SQLite log process writes a batch in power-of-two statements, so a
# full batch (the usual one under load) is a single statement, where a size made of several
# powers of two would be as many statements per batch.
DEFAULT_BATCH_SIZE = 512
# Each write costs the event loop a fixed price whatever its size, so fewer and fuller
# batches: a commit per request, or batches cut short by a short linger, cost a visible share
# of the throughput (docs/design.md). A record waits at most this long for company; under
# load a full batch ends the wait sooner.
DEFAULT_LINGER = 0.05
DEFAULT_STORAGE_URL = "sqlite:///model-gateway.db"
DEFAULT_CONFIG_POLL_INTERVAL = 2.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_CLIENT_BODY_TIMEOUT = 60.0  # nginx's client_body_timeout
DEFAULT_CLIENT_HEADER_TIMEOUT = 60.0  # nginx's client_header_timeout
DEFAULT_SEND_TIMEOUT = 60.0  # nginx's send_timeout
DEFAULT_MAX_HEADER_BYTES = 64 * 1024  # about Envoy's max_request_headers_kb (60)
#: environment variable that supplies admin.token when the file sets none
ADMIN_TOKEN_ENV = "MODEL_GATEWAY_ADMIN_TOKEN"  # noqa: S105 (a variable name)
#: request and response headers whose values never reach the log, whatever the config says
ALWAYS_REDACTED_HEADERS = ("authorization", "cookie", "proxy-authorization", "set-cookie")

#: paths the gateway answers itself; a route may not claim them
RESERVED_PREFIXES = ("/admin", "/feedback", "/metrics", "/healthz")

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    #: seconds between checks of the config file for changes; 0 turns the check off
    config_poll_interval: float = Field(default=DEFAULT_CONFIG_POLL_INTERVAL, ge=0)
    #: seconds a graceful stop lets requests in flight finish; those still running then are
    #: cut off, answered 503 if nothing was sent yet, and logged
    shutdown_timeout: float = Field(default=DEFAULT_SHUTDOWN_TIMEOUT, gt=0)
    #: seconds a graceful stop first keeps serving, every answer with ``Connection: close``,
    #: before it closes the listeners (Envoy's drain time): a keep-alive client's next
    #: request is answered, not reset; 0 closes the listeners at once
    drain_time: float = Field(default=DEFAULT_DRAIN_TIME, ge=0)
    #: seconds a request's body may go without a byte arriving (between two reads, as
    #: nginx's client_body_timeout); past it the request is answered 408 and not forwarded
    client_body_timeout: float = Field(default=DEFAULT_CLIENT_BODY_TIMEOUT, gt=0)
    #: seconds a request's head may take to arrive whole, from its first byte (or from the
    #: connection's start, for its first request; nginx's client_header_timeout); past it
    #: the connection is answered 408 (closed without an answer if nothing came)
    client_header_timeout: float = Field(default=DEFAULT_CLIENT_HEADER_TIMEOUT, gt=0)
    #: seconds a client may leave its socket's buffer full without reading any of the answer
    #: (nginx's send_timeout); past it the connection is closed
    send_timeout: float = Field(default=DEFAULT_SEND_TIMEOUT, gt=0)
    #: bytes a request's head may hold while still incomplete (as h11's
    #: max_incomplete_event_size); past it the connection is answered 431
    max_header_bytes: int = Field(default=DEFAULT_MAX_HEADER_BYTES, ge=1024)
    #: the server edge (read at start): ``tuned`` writes each answer in one system call and
    #: applies the client limits, drain and a client's going while the model server works
    #: (built on uvicorn's internals, so only on the releases tested); ``stock`` is uvicorn's
    #: own protocol, slower and without the head limits and drain (docs/operations.md). An
    #: uvicorn outside the tested range runs ``stock`` whatever this says.
    edge: Literal["tuned", "stock"] = "tuned"


class StorageConfig(_Strict):
    url: str = DEFAULT_STORAGE_URL
    queue_size: int = Field(default=DEFAULT_QUEUE_SIZE, ge=1)
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1)
    #: seconds the writer waits, once a record arrives at an idle writer, for more to join its
    #: batch (as Kafka's linger.ms); 0 writes each record at once
    linger: float = Field(default=DEFAULT_LINGER, ge=0, le=1)
    #: what a request does when the log queue is full: wait for room, or drop and count
    overflow: Literal["block", "drop"] = "block"
    #: under ``block``, how long a request waits for room before it is answered 503
    #: ``log_unavailable`` (Kafka's ``max.block.ms``)
    block_timeout: float = Field(default=60.0, gt=0)
    #: retries of a failing write before its records are counted lost; unset: until the
    #: store is back (records wait in the queue meanwhile)
    write_retries: int | None = Field(default=None, ge=0)
    #: seconds shutdown keeps retrying a failing store before counting the rest lost
    close_timeout: float = Field(default=10.0, ge=0)
    #: ``buffered``: a record reaches the store within a linger of its answer (a process
    #: killed outright loses the records not yet written); ``answered``: every record is on
    #: local disk (the spool) before its answer leaves, and a start writes what a killed
    #: process left there
    durability: Literal["buffered", "answered"] = "buffered"
    #: the spool's directory (durability answered); one per host, shared by its workers
    spool_path: str = "model-gateway-spool"

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if not url.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ValueError("must start with sqlite:// or postgresql://")
        return url


class AdminConfig(_Strict):
    token: str | None = None
    #: a token that grants /feedback only (for label pipelines); the admin token works too
    feedback_token: str | None = None

    def effective_token(self) -> str | None:
        """The configured token, else ``$MODEL_GATEWAY_ADMIN_TOKEN``; empty means none."""
        return self.token or os.environ.get(ADMIN_TOKEN_ENV) or None


class Timeouts(_Strict):
    connect: float = Field(default=DEFAULT_CONNECT_TIMEOUT, gt=0)
    total: float = Field(default=DEFAULT_TOTAL_TIMEOUT, gt=0)


class CaptureConfig(_Strict):
    bodies: bool = False
    max_bytes: int = Field(default=DEFAULT_CAPTURE_MAX_BYTES, ge=0)
    #: keep request and response headers; those in ALWAYS_REDACTED_HEADERS and
    #: ``redact_headers`` are kept with their value replaced
    headers: bool = False
    redact_headers: list[str] = []
    #: JSON object keys whose values are replaced in captured bodies, at any depth
    redact_fields: list[str] = []

    @field_validator("redact_headers")
    @classmethod
    def _lower_headers(cls, names: list[str]) -> list[str]:
        return [n.lower() for n in names]


class VersionSource(_Strict):
    """Where the served model version is read from; the configured version is the fallback."""

    #: response header naming the served version, when the model server sends one
    header: str | None = "X-Model-Version"
    #: JSON pointer into the response body (RFC 6901); V2's ``/model_version`` by default
    pointer: str | None = "/model_version"

    @field_validator("pointer")
    @classmethod
    def _pointer_syntax(cls, pointer: str | None) -> str | None:
        if pointer is not None and pointer != "" and not pointer.startswith("/"):
            raise ValueError("must be a JSON pointer starting with '/'")
        return pointer


def http_base_url(url: str) -> str:
    """An upstream's base URL: http(s), a host, no query or fragment; no trailing slash."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query or fragment")
    return url.rstrip("/")


class VariantConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    url: str
    model_version: str = Field(min_length=1)
    weight: float = Field(default=1.0, ge=0)

    @field_validator("url")
    @classmethod
    def _http_base_url(cls, url: str) -> str:
        return http_base_url(url)


class ShadowConfig(_Strict):
    """A model server that gets a copy of some of the route's requests; its answers are
    logged (marked shadow) and never reach the client."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    url: str
    model_version: str = Field(min_length=1)
    #: share of the route's requests copied to this shadow; one draw per request serves all
    #: of a route's shadows, so a shadow at 10 % sees a subset of what one at 50 % sees
    percent: float = Field(default=100.0, ge=0, le=100)
    #: copies waiting for this shadow's answer at most; past it a copy is skipped and counted
    #: (a slow shadow costs memory, never the client's time)
    max_in_flight: int = Field(default=100, ge=1)

    @field_validator("url")
    @classmethod
    def _http_base_url(cls, url: str) -> str:
        return http_base_url(url)


class HealthConfig(_Strict):
    """Active checks (when ``path`` is set) and passive ejection, per variant of a route."""

    #: e.g. /v2/health/ready; unset means no active checks
    path: str | None = None
    interval: float = Field(default=5.0, gt=0)
    timeout: float = Field(default=1.0, gt=0)
    #: consecutive passing checks that bring a down variant back
    healthy_threshold: int = Field(default=1, ge=1)
    #: consecutive failing checks that take a variant down
    unhealthy_threshold: int = Field(default=2, ge=1)
    #: consecutive failed requests (502/503/504) that eject a variant; 0 turns ejection off
    passive_failures: int = Field(default=5, ge=0)
    #: seconds an ejected variant stays out when no active check brings it back sooner
    ejection_seconds: float = Field(default=30.0, gt=0)

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str | None) -> str | None:
        if path is not None and not path.startswith("/"):
            raise ValueError("must start with '/'")
        return path


class CostAmount(_Strict):
    """A cost read from each request (a transaction's amount), by JSON pointer."""

    pointer: str
    #: the cost of a request whose amount cannot be read (none: left out of the costs)
    default: float | None = Field(default=None, ge=0)

    @field_validator("pointer")
    @classmethod
    def _pointer_syntax(cls, pointer: str) -> str:
        if not pointer.startswith("/"):
            raise ValueError("must be a JSON pointer starting with '/'")
        return pointer


class CostsConfig(_Strict):
    """What a binary model's mistakes cost, in any unit (money, minutes of review): a number
    each, or an amount read from each request."""

    false_positive: float | CostAmount = Field(union_mode="left_to_right")
    false_negative: float | CostAmount = Field(union_mode="left_to_right")

    @field_validator("false_positive", "false_negative")
    @classmethod
    def _not_negative(cls, cost: float | CostAmount) -> float | CostAmount:
        if isinstance(cost, bool):
            raise ValueError("must be a number or {pointer: ...}, not a boolean")
        if isinstance(cost, float | int) and not (cost >= 0 and math.isfinite(cost)):
            raise ValueError("must be a finite number >= 0, or {pointer: ...}")
        return cost

    def pointers(self) -> dict[str, CostAmount]:
        """The amounts read from requests, by the feature name the log keeps them under."""
        return {
            f"{COST_FEATURE_PREFIX}{kind}": cost
            for kind, cost in (
                ("false_positive", self.false_positive),
                ("false_negative", self.false_negative),
            )
            if isinstance(cost, CostAmount)
        }


#: a cost read from requests is kept among the record's features under this prefix and its
#: kind (a colon, which no configured feature's name may hold)
COST_FEATURE_PREFIX = "cost:"


class EvaluationConfig(_Strict):
    """How a response yields the prediction that feedback labels are compared with."""

    task: Literal["binary", "multiclass", "regression"] = "binary"
    #: JSON pointer to the predicted label (or value, for regression); unset: with a score
    #: (binary only), the score by ``threshold``; else V2 ``/outputs/0/data/0``, then KServe
    #: V1 ``/predictions/0``
    prediction: str | None = None
    #: JSON pointer to a score in [0, 1] (binary: the positive class's probability)
    score: str | None = None
    #: the label that counts as positive in binary tasks
    positive_label: str | int | bool = 1
    #: binary tasks without a prediction pointer: predicted positive when score >= threshold
    threshold: float = Field(default=0.5, ge=0, le=1)
    #: seconds labels take to arrive (chargebacks: weeks): a report's default window ends
    #: this long before now, so that recent predictions, not labelled yet, are left out
    label_horizon: float = Field(default=0.0, ge=0)
    #: a batch answer's rows logged as predictions, at most; the rows past it are counted
    #: (``model_gateway_batch_rows_unlogged_total``), not logged
    max_batch_rows: int = Field(default=1000, ge=1, le=100_000)
    #: binary tasks: each variant's expected cost per 1,000 predictions in the report
    costs: CostsConfig | None = None

    @field_validator("prediction", "score")
    @classmethod
    def _pointer_syntax(cls, pointer: str | None) -> str | None:
        if pointer is not None and pointer != "" and not pointer.startswith("/"):
            raise ValueError("must be a JSON pointer starting with '/'")
        return pointer


#: the metrics an experiment can judge, per task: those with a variance the sequential test
#: can use (macro averages of a multiclass task have none, and stay descriptive)
EXPERIMENT_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("f1", "precision", "recall", "accuracy", "auc", "error_ratio", "cost_per_1000"),
    "multiclass": ("accuracy", "error_ratio"),
    "regression": ("mae", "rmse", "error_ratio"),
}


class ExperimentConfig(_Strict):
    """A route's A/B experiment: who is compared with whom, on what, since when, how strictly."""

    #: named in ``GET /admin/experiments/{id}`` and ``model-gateway report --experiment``
    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    #: the report of the experiment counts the predictions made from this instant on
    start: AwareDatetime
    #: the variant every other arm is compared with (YAML order plays no part)
    champion: str
    #: the metric the experiment decides on, tested at the full alpha
    primary_metric: str
    #: metrics that must not get worse; Holm's procedure across them and the challengers
    guardrails: list[str] = []
    #: the smallest difference worth acting on, in the metric's own units (0.02: two points
    #: of precision); a number for every metric, or one per metric name
    minimum_detectable_effect: float | dict[str, float] | None = None
    alpha: float = Field(default=0.05, gt=0, lt=0.5)

    @field_validator("minimum_detectable_effect")
    @classmethod
    def _positive(cls, effect: float | dict[str, float] | None) -> float | dict[str, float] | None:
        values = effect.values() if isinstance(effect, dict) else [effect]
        if any(v is not None and not (v > 0 and math.isfinite(v)) for v in values):
            raise ValueError("must be a finite number > 0")
        return effect


class ErrorRatioGate(_Strict):
    """The challenger's share of 5xx answers in the current step."""

    #: at most this share
    max: float | None = Field(default=None, ge=0, le=1)
    #: at most the champion's share in the same window plus this
    max_over_champion: float | None = Field(default=None, ge=0, le=1)


class LatencyGate(_Strict):
    """The challenger's 99th percentile latency in the current step."""

    #: at most this many milliseconds
    max_ms: float | None = Field(default=None, gt=0)
    #: at most this many times the champion's in the same window
    max_ratio: float | None = Field(default=None, gt=0)


class ScoreShiftGate(_Strict):
    """How far the challenger's scores moved from the champion's in the current step: the
    population stability index over the champion's deciles (0.1: a small shift, 0.25: a
    large one, by the usual reading)."""

    max_psi: float = Field(default=0.25, gt=0)


class DisagreementGate(_Strict):
    """How often the challenger answers otherwise than the champion in the current step."""

    max: float = Field(gt=0, le=1)
    #: a shadow of the route that answers as the challenger does: disagreement is then
    #: counted pair by pair on the same requests; without one, as the distance between the
    #: two arms' shares of each predicted class
    shadow: str | None = None


class RolloutGates(_Strict):
    error_ratio: ErrorRatioGate | None = None
    p99_latency: LatencyGate | None = None
    #: the experiment's always-valid comparison since the rollout began: a metric found worse
    #: rolls back; every measured one shown no worse than its minimum detectable effect passes
    quality: bool = False
    score_shift: ScoreShiftGate | None = None
    disagreement: DisagreementGate | None = None
    #: the challenger's requests in a step before the operational and label-free gates judge
    min_requests: int = Field(default=50, ge=1)


class RolloutConfig(_Strict):
    """A route's progressive delivery: the challenger's share of traffic raised step by step
    while every gate passes, and taken back to 0 the moment one fails."""

    #: named in ``/admin/rollouts/{id}`` and ``model-gateway rollout``; a new id starts over
    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    #: the variant the traffic moves to; it moves from the champion (the experiment's, else
    #: the first other variant)
    challenger: str
    #: the challenger's share of the two variants' traffic at each step, in percent
    steps: list[float] = Field(default=[5, 25, 50, 100], min_length=1)
    #: the least time a step lasts, in seconds
    step_seconds: float = Field(default=300, gt=0)
    #: the least labelled predictions of the challenger made in a step (with labels)
    min_labelled: int = Field(default=0, ge=0)
    #: a step still inconclusive after this many seconds pauses the rollout, with an alert
    max_step_seconds: float = Field(default=3600, gt=0)
    #: how often the gates are looked at, in seconds
    interval: float = Field(default=5, gt=0)
    gates: RolloutGates = RolloutGates()

    @field_validator("steps")
    @classmethod
    def _rising_to_all(cls, steps: list[float]) -> list[float]:
        if any(not 0 < s <= 100 for s in steps):
            raise ValueError("each step must be > 0 and <= 100 (percent)")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError("steps must rise")
        if steps[-1] != 100:
            raise ValueError("the last step must be 100")
        return steps


#: a window's length: a number and a unit (``30s``, ``5m``, ``1h``, ``1d``), as Prometheus
#: writes durations; the window's label in metrics is this text
_DURATION = re.compile(r"^([1-9][0-9]*)([smhd])$")
_DURATION_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: the name the score goes by among a route's monitored features
SCORE_FEATURE = "score"


def duration_seconds(text: str) -> float:
    """The seconds a duration (``5m``) stands for."""
    found = _DURATION.match(text)
    if found is None:
        raise ValueError(f"{text!r} is not a duration like 30s, 5m, 1h or 1d")
    return float(int(found.group(1)) * _DURATION_SECONDS[found.group(2)])


class MonitoredFeature(_Strict):
    """One input read from each request, to compare with its reference (docs/monitoring.md)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    #: JSON pointer into the request body; a ``*`` token takes every item of a list, one row
    #: each (``/instances/*/amount``)
    pointer: str | None = None
    #: a V2 input's name, and the column of its [N, k] tensor (one value per row; default 0)
    input: str | None = None
    column: int | None = Field(default=None, ge=0)
    kind: Literal["numeric", "categorical"] = "numeric"
    #: the values expected, [low, high]; a value outside counts in the out-of-range ratio
    range: tuple[float, float] | None = None

    @field_validator("pointer")
    @classmethod
    def _pointer_syntax(cls, pointer: str | None) -> str | None:
        if pointer is not None and not pointer.startswith("/"):
            raise ValueError("must be a JSON pointer starting with '/'")
        return pointer

    @field_validator("range")
    @classmethod
    def _rising(cls, bounds: tuple[float, float] | None) -> tuple[float, float] | None:
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError("must be [low, high] with low < high")
        return bounds


class MonitoringConfig(_Strict):
    """What of a route's traffic is compared with a reference: features and the score."""

    features: list[MonitoredFeature] = Field(default=[], max_length=100)
    #: monitor the score too (the default when ``evaluation.score`` is set)
    score: bool | None = None
    #: each window's statistics are computed over its latest requests; the first is the one
    #: ``model_gateway_feature_drift`` shows
    windows: list[str] = Field(default=["5m", "1h"], min_length=1, max_length=4)
    #: seconds between two computations
    interval: float = Field(default=60.0, ge=0.1)
    #: a window's statistics read at most its latest this many requests
    max_rows: int = Field(default=20_000, ge=100, le=1_000_000)

    @field_validator("windows")
    @classmethod
    def _durations(cls, windows: list[str]) -> list[str]:
        for window in windows:
            duration_seconds(window)
        if len(set(windows)) != len(windows):
            raise ValueError("a window is named twice")
        return windows


class RouteConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    path: str
    match: Literal["exact", "prefix"] = "prefix"
    methods: list[str] | None = None
    model_name: str | None = None
    #: request header whose value pins a caller to one variant (sticky A/B)
    routing_key: str | None = None
    #: store a hash of the routing key instead of the key itself (user ids are personal data)
    hash_routing_key: bool = False
    allow_override: bool = False
    timeouts: Timeouts = Timeouts()
    #: when a variant refuses the connection or does not accept one within the connect
    #: timeout, try up to this many other variants that are up, chosen by weight (the request
    #: never reached the model, so this is safe for any method); 0 turns retries off
    connect_retries: int = Field(default=0, ge=0)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=0)
    capture: CaptureConfig = CaptureConfig()
    version: VersionSource = VersionSource()
    health: HealthConfig = HealthConfig()
    #: set to measure precision, recall, F1 (or MAE/RMSE) from /feedback labels
    evaluation: EvaluationConfig | None = None
    #: an A/B experiment over the variants, judged by always-valid sequential tests
    experiment: ExperimentConfig | None = None
    #: a progressive delivery of a challenger, judged by gates (docs/rollouts.md)
    rollout: RolloutConfig | None = None
    #: features and the score compared with a reference: drift, missing and out-of-range values
    monitoring: MonitoringConfig | None = None
    variants: list[VariantConfig] = Field(min_length=1)
    #: copies of live traffic (Seldon's shadow, Istio's mirror): logged, never answered
    shadows: list[ShadowConfig] = []

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError("must start with '/'")
        for reserved in RESERVED_PREFIXES:
            if path == reserved or path.startswith(reserved + "/"):
                raise ValueError(f"{reserved} is answered by the gateway itself")
        return path

    @field_validator("methods")
    @classmethod
    def _upper_methods(cls, methods: list[str] | None) -> list[str] | None:
        return None if methods is None else [m.upper() for m in methods]


class DeliverySample(_Strict):
    """The labelling sample written beside each delivered file (labelling.py)."""

    strategy: Literal["uniform", "stratified"] = "stratified"
    by: list[Literal["variant", "model_version", "predicted", "score_decile"]] = [
        "variant",
        "score_decile",
    ]
    #: rows per file (per variant when ``by`` names the variant)
    n: int = Field(ge=1, le=100_000)
    #: each file's sample is drawn with this seed plus the file's number
    seed: int = 0


class DeliveryConfig(_Strict):
    """Files of a route's predictions for a downstream team, on a schedule (docs/deliveries)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    route: str
    #: where the files go; created if missing
    directory: str = Field(min_length=1)
    #: how often; unset: only when asked (``model-gateway export --since-last NAME``)
    every: str | None = "1h"
    format: Literal["csv", "parquet"] = "csv"
    #: columns read from each captured request body: column name to JSON pointer
    fields: dict[str, str] = {}
    #: how far before the previous run (the first: before now) a run looks for predictions
    #: no run has delivered
    lookback: str = "7d"
    sample: DeliverySample | None = None

    @field_validator("every", "lookback")
    @classmethod
    def _duration(cls, text: str | None) -> str | None:
        if text is not None:
            duration_seconds(text)
        return text

    @field_validator("fields")
    @classmethod
    def _pointers(cls, fields: dict[str, str]) -> dict[str, str]:
        for name, pointer in fields.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
                raise ValueError(f"column {name!r}: letters, digits, '_', '.' and '-' only")
            if not pointer.startswith("/"):
                raise ValueError(f"column {name!r}: must be a JSON pointer starting with '/'")
        return fields


class GatewayConfig(_Strict):
    server: ServerConfig = ServerConfig()
    storage: StorageConfig = StorageConfig()
    admin: AdminConfig = AdminConfig()
    routes: list[RouteConfig] = Field(min_length=1)
    #: files of predictions for downstream teams
    deliveries: list[DeliveryConfig] = []


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated configuration with the text it came from and its version (content hash)."""

    config: GatewayConfig
    text: str
    version: str
    source: str


def config_version(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_config(path: str | Path) -> LoadedConfig:
    """Read and validate a YAML file; raise :class:`ConfigError` with every problem found."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read file: {exc.strerror}"]) from exc
    return parse_config(text, source)


def parse_config(text: str, source: str = "<config>") -> LoadedConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"{where}invalid YAML: {problem}"]) from exc
    if not isinstance(raw, dict):
        raise ConfigError(source, ["(top level): must be a mapping"])
    env_problems: list[str] = []
    raw = _expand_env(raw, "", env_problems)
    if env_problems:
        raise ConfigError(source, env_problems)
    try:
        config = GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(err) for err in exc.errors()]) from exc
    problems = _cross_field_problems(config)
    if problems:
        raise ConfigError(source, problems)
    return LoadedConfig(config=config, text=text, version=config_version(text), source=source)


def _expand_env(node: Any, path: str, problems: list[str]) -> Any:
    if isinstance(node, dict):
        return {k: _expand_env(v, _join(path, k), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, f"{path}[{i}]", problems) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = os.environ.get(name)
            if value is None:
                if default is None:
                    problems.append(f"{path}: environment variable {name} is not set")
                    return ""
                return default
            return value

        return _ENV_REF.sub(substitute, node)
    return node


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out = f"{out}[{part}]" if isinstance(part, int) else _join(out, part)
    return out or "(top level)"


_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "is not a known setting",
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "too_short": "must have at least {min_length} item(s)",
    "string_too_short": "must not be empty",
    "string_pattern_mismatch": "may contain only letters, digits, '_', '.' and '-'",
    "literal_error": "must be one of {expected}",
}


def _describe(err: Any) -> str:
    template = _MESSAGES.get(err["type"])
    if template is not None:
        ctx = {
            k: int(v) if isinstance(v, float) and v.is_integer() else v
            for k, v in err.get("ctx", {}).items()
        }
        message = template.format(**ctx)
    else:
        message = str(err["msg"]).removeprefix("Value error, ")
        message = message[:1].lower() + message[1:]
    return f"{format_loc(tuple(err['loc']))}: {message}"


def _cross_field_problems(config: GatewayConfig) -> list[str]:
    problems: list[str] = []
    route_names: set[str] = set()
    experiment_ids: set[str] = set()
    rollout_ids: set[str] = set()
    route_keys: set[tuple[str, str]] = set()
    for i, route in enumerate(config.routes):
        where = f"routes[{i}]"
        if route.name in route_names:
            problems.append(f"{where}.name: duplicate route name {route.name!r}")
        route_names.add(route.name)
        if (route.match, route.path) in route_keys:
            problems.append(f"{where}.path: another route already has {route.match} {route.path}")
        route_keys.add((route.match, route.path))
        variant_names: set[str] = set()
        for j, variant in enumerate(route.variants):
            if variant.name in variant_names:
                problems.append(
                    f"{where}.variants[{j}].name: duplicate variant name {variant.name!r}"
                )
            variant_names.add(variant.name)
        for j, shadow in enumerate(route.shadows):
            if shadow.name in variant_names:
                problems.append(
                    f"{where}.shadows[{j}].name: {shadow.name!r} already names a variant"
                    " or shadow of this route"
                )
            variant_names.add(shadow.name)
        if sum(v.weight for v in route.variants) <= 0:
            problems.append(f"{where}.variants: at least one weight must be > 0")
        evaluation = route.evaluation
        if (
            evaluation is not None
            and evaluation.score is not None
            and evaluation.prediction is None
            and evaluation.task != "binary"
        ):
            problems.append(
                f"{where}.evaluation.prediction: required with a score on a {evaluation.task}"
                " route (only a binary label can be derived from a score and the threshold)"
            )
        if evaluation is not None and evaluation.costs is not None and evaluation.task != "binary":
            problems.append(
                f"{where}.evaluation.costs: only for a binary task (a mistake is a false"
                " positive or a false negative)"
            )
        if route.experiment is not None:
            if route.experiment.id in experiment_ids:
                problems.append(
                    f"{where}.experiment.id: another route's experiment is {route.experiment.id!r}"
                )
            experiment_ids.add(route.experiment.id)
            problems += _experiment_problems(route, route.experiment, where)
        if route.rollout is not None:
            if route.rollout.id in rollout_ids:
                problems.append(
                    f"{where}.rollout.id: another route's rollout is {route.rollout.id!r}"
                )
            rollout_ids.add(route.rollout.id)
            problems += _rollout_problems(route, route.rollout, where)
        if route.monitoring is not None:
            problems += _monitoring_problems(route, route.monitoring, where)
    problems += _delivery_problems(config, route_names)
    return problems


def _delivery_problems(config: GatewayConfig, route_names: set[str]) -> list[str]:
    problems = []
    names: set[str] = set()
    for i, delivery in enumerate(config.deliveries):
        where = f"deliveries[{i}]"
        if delivery.name in names:
            problems.append(f"{where}.name: duplicate delivery name {delivery.name!r}")
        names.add(delivery.name)
        if delivery.route not in route_names:
            problems.append(f"{where}.route: no route is named {delivery.route!r}")
        taken = sorted(set(delivery.fields) & set(EXPORT_COLUMNS))
        if taken:
            problems.append(f"{where}.fields: {', '.join(taken)} already name columns")
    return problems


def monitors_score(route: RouteConfig) -> bool:
    """Whether the route's score is monitored: asked for, or by default with a score."""
    monitoring = route.monitoring
    if monitoring is None or route.evaluation is None or route.evaluation.score is None:
        return False
    return monitoring.score is not False


def _monitoring_problems(route: RouteConfig, monitoring: MonitoringConfig, where: str) -> list[str]:
    where += ".monitoring"
    problems = []
    if monitoring.score and (route.evaluation is None or route.evaluation.score is None):
        problems.append(f"{where}.score: needs the route's evaluation.score")
    seen: set[str] = set()
    for i, feature in enumerate(monitoring.features):
        at = f"{where}.features[{i}]"
        if feature.name in seen:
            problems.append(f"{at}.name: {feature.name!r} is named twice")
        seen.add(feature.name)
        if feature.name == SCORE_FEATURE:
            problems.append(f"{at}.name: {SCORE_FEATURE!r} is the score's name")
        if (feature.pointer is None) == (feature.input is None):
            problems.append(f"{at}: give either pointer or input (a V2 input's name)")
        if feature.column is not None and feature.input is None:
            problems.append(f"{at}.column: only with input")
        if feature.range is not None and feature.kind == "categorical":
            problems.append(f"{at}.range: only for a numeric feature")
    if not monitoring.features and not monitors_score(route):
        problems.append(f"{where}: monitors nothing (no features, and no evaluation.score)")
    return problems


def _rollout_problems(route: RouteConfig, rollout: RolloutConfig, where: str) -> list[str]:
    where += ".rollout"
    problems = []
    variants = [v.name for v in route.variants]
    if rollout.challenger not in variants:
        problems.append(
            f"{where}.challenger: {rollout.challenger!r} is not a variant of this route"
            f" (one of {', '.join(variants)})"
        )
    elif len(variants) < 2:
        problems.append(f"{where}: needs a champion beside the challenger")
    elif route.experiment is not None and route.experiment.champion == rollout.challenger:
        problems.append(f"{where}.challenger: is the experiment's champion")
    gates = rollout.gates
    if gates.quality and route.evaluation is None:
        problems.append(f"{where}.gates.quality: needs the route's evaluation section")
    if gates.score_shift is not None and (route.evaluation is None or not route.evaluation.score):
        problems.append(f"{where}.gates.score_shift: needs the route's evaluation.score")
    if gates.disagreement is not None:
        if route.evaluation is None:
            problems.append(f"{where}.gates.disagreement: needs the route's evaluation section")
        shadow = gates.disagreement.shadow
        if shadow is not None and shadow not in [s.name for s in route.shadows]:
            problems.append(
                f"{where}.gates.disagreement.shadow: {shadow!r} is no shadow of this route"
            )
    if rollout.min_labelled and route.evaluation is None:
        problems.append(f"{where}.min_labelled: needs the route's evaluation section")
    if rollout.max_step_seconds < rollout.step_seconds:
        problems.append(f"{where}.max_step_seconds: must be >= step_seconds")
    return problems


def _experiment_problems(route: RouteConfig, experiment: ExperimentConfig, where: str) -> list[str]:
    where += ".experiment"
    if route.evaluation is None:
        return [f"{where}: needs the route's evaluation section (how a prediction is read)"]
    problems = []
    variants = [v.name for v in route.variants]
    if experiment.champion not in variants:
        problems.append(
            f"{where}.champion: {experiment.champion!r} is not a variant of this route"
            f" (one of {', '.join(variants)})"
        )
    known = EXPERIMENT_METRICS[route.evaluation.task]
    named = [("primary_metric", experiment.primary_metric)] + [
        (f"guardrails[{i}]", m) for i, m in enumerate(experiment.guardrails)
    ]
    for field, metric in named:
        if metric not in known:
            problems.append(
                f"{where}.{field}: {metric!r} is not a metric of a {route.evaluation.task}"
                f" experiment (one of {', '.join(known)})"
            )
        elif metric == "cost_per_1000" and route.evaluation.costs is None:
            problems.append(f"{where}.{field}: cost_per_1000 needs the route's evaluation.costs")
    seen = [m for _, m in named]
    for metric in sorted({m for m in seen if seen.count(m) > 1}):
        problems.append(f"{where}.guardrails: {metric!r} is named twice")
    if isinstance(experiment.minimum_detectable_effect, dict):
        for metric in experiment.minimum_detectable_effect:
            if metric not in seen:
                problems.append(
                    f"{where}.minimum_detectable_effect.{metric}: not the primary metric"
                    " or a guardrail of this experiment"
                )
    return problems
