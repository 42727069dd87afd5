"""Every Prometheus collector the gateway exports, in one registry owned by the app.

The registry is created in the lifespan and passed down, never a module global, so tests and
several apps in one process do not collide. Label children are cached per label tuple, so the
hot path does a dict lookup and an ``inc``/``observe``, nothing more.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

PREFIX = "model_gateway"
# Boundaries at the usual latency SLOs (0.1, 0.25, 0.5, 1 s) and fine below them, where a
# healthy model server answers.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def code_class(status: int) -> str:
    return f"{status // 100}xx"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests answered, by route, variant, served model version and status class.",
            ["route", "variant", "model_version", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from request received to response sent, as the client sees it.",
            ["route", "variant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            f"{PREFIX}_upstream_errors",
            "Requests the gateway answered with its own error, by reason.",
            ["route", "variant", "reason"],
            registry=r,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight", "Requests being proxied now.", registry=r
        )
        self.log_written = Counter(
            f"{PREFIX}_log_records_written", "Prediction records written to the store.", registry=r
        )
        self.log_dropped = Counter(
            f"{PREFIX}_log_records_dropped",
            "Prediction records dropped because the log queue was full (overflow: drop).",
            registry=r,
        )
        self.log_write_errors = Counter(
            f"{PREFIX}_log_write_errors",
            "Prediction records lost because the store refused them after every retry.",
            registry=r,
        )
        self.log_queue_depth = Gauge(
            f"{PREFIX}_log_queue_depth", "Prediction records waiting to be written.", registry=r
        )
        self.config_reloads = Counter(
            f"{PREFIX}_config_reloads", "Configurations activated by a reload.", registry=r
        )
        self.config_reload_failures = Counter(
            f"{PREFIX}_config_reload_failures",
            "Reloads refused because the file was invalid; the old configuration stayed live.",
            registry=r,
        )
        self.config_info = Gauge(
            f"{PREFIX}_config_info",
            "The active configuration's version (content hash); always 1.",
            ["version"],
            registry=r,
        )
        self._children: dict[tuple[object, ...], MetricWrapperBase] = {}

    def _child(self, metric: MetricWrapperBase, *labels: str) -> MetricWrapperBase:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(
        self, route: str, variant: str, model_version: str, status: int, seconds: float
    ) -> None:
        self._child(self.requests, route, variant, model_version, code_class(status)).inc()  # type: ignore[attr-defined]
        self._child(self.request_duration, route, variant).observe(seconds)  # type: ignore[attr-defined]

    def upstream_error(self, route: str, variant: str, reason: str) -> None:
        self._child(self.upstream_errors, route, variant, reason).inc()  # type: ignore[attr-defined]

    def set_config_version(self, version: str) -> None:
        self.config_info.clear()
        self.config_info.labels(version).set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
