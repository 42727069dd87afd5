"""Every Prometheus collector the gateway exports, in one registry owned by the app.

The registry is created in the lifespan and passed down, never a module global, so tests and
several apps in one process do not collide. Label children are cached per label tuple, so the
hot path does a dict lookup and an ``inc``/``observe``, nothing more.

With ``serve --workers N`` each worker writes its values to files in
``$PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode, set up by the parent
before the workers start) and ``/metrics`` on any worker answers for all of them.
"""

from __future__ import annotations

import os
import platform

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics import MetricWrapperBase

PREFIX = "model_gateway"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Boundaries at the usual latency SLOs (0.1, 0.25, 0.5, 1 s) and fine below them, where a
# healthy model server answers.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The *_created series double the exposition for no use here; multiprocess mode has none.
disable_created_metrics()  # type: ignore[no-untyped-call]


def code_class(status: int) -> str:
    return f"{status // 100}xx"


def multiprocess_mode() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    def __init__(self, build_version: str = "") -> None:
        self.multiprocess = multiprocess_mode()
        self.registry = CollectorRegistry()
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
        self.upstream_duration = Histogram(
            f"{PREFIX}_upstream_duration_seconds",
            "Time from request sent upstream to the model server's response read.",
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
            f"{PREFIX}_requests_in_flight",
            "Requests being proxied now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.variant_up = Gauge(
            f"{PREFIX}_variant_up",
            "1 when the variant may take traffic, 0 when health checks or ejection took it out.",
            ["route", "variant"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.variant_weight = Gauge(
            f"{PREFIX}_variant_weight",
            "The variant's configured A/B weight.",
            ["route", "variant"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.ejections = Counter(
            f"{PREFIX}_variant_ejections",
            "Times a variant was taken out after consecutive failed requests.",
            ["route", "variant"],
            registry=r,
        )
        self.health_checks = Counter(
            f"{PREFIX}_health_checks",
            "Active health checks, by result (pass, fail).",
            ["route", "variant", "result"],
            registry=r,
        )
        self.prediction_score = Histogram(
            f"{PREFIX}_prediction_score",
            "Scores the model servers returned, on [0, 1], for routes with evaluation.score.",
            ["route", "variant", "model_version"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.feedback_received = Counter(
            f"{PREFIX}_feedback_received",
            "Feedback items posted, by result (accepted, rejected).",
            ["result"],
            registry=r,
        )
        self.feedback_joined = Counter(
            f"{PREFIX}_feedback_joined",
            "Feedback labels joined to their logged prediction.",
            ["route", "variant", "model_version"],
            registry=r,
        )
        self.feedback_outcomes = Counter(
            f"{PREFIX}_feedback_outcomes",
            "Binary predictions by outcome once labelled (tp, fp, tn, fn); the first label of "
            "each prediction counts.",
            ["route", "variant", "model_version", "outcome"],
            registry=r,
        )
        self.feedback_class_outcomes = Counter(
            f"{PREFIX}_feedback_class_outcomes",
            "Multiclass predictions once labelled, one-vs-rest per class (tp, fp, fn).",
            ["route", "variant", "model_version", "class", "outcome"],
            registry=r,
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
        self.log_write_failures = Counter(
            f"{PREFIX}_log_write_failures",
            "Failed attempts to write a batch of records (each is retried).",
            registry=r,
        )
        self.log_queue_depth = Gauge(
            f"{PREFIX}_log_queue_depth",
            "Prediction records waiting to be written.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.log_queue_capacity = Gauge(
            f"{PREFIX}_log_queue_capacity",
            "Prediction records the log queue holds before the overflow policy applies.",
            registry=r,
            multiprocess_mode="livesum",
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
            "1 for the active configuration's version (content hash), 0 for earlier ones.",
            ["version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.build_info = Gauge(
            f"{PREFIX}_build_info",
            "Always 1; labels name the gateway's and Python's versions.",
            ["version", "python_version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.build_info.labels(build_version, platform.python_version()).set(1)
        self._config_version: str | None = None
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

    def observe_upstream(self, route: str, variant: str, seconds: float) -> None:
        self._child(self.upstream_duration, route, variant).observe(seconds)  # type: ignore[attr-defined]

    def observe_score(self, route: str, variant: str, model_version: str, score: float) -> None:
        self._child(self.prediction_score, route, variant, model_version).observe(score)  # type: ignore[attr-defined]

    def upstream_error(self, route: str, variant: str, reason: str) -> None:
        self._child(self.upstream_errors, route, variant, reason).inc()  # type: ignore[attr-defined]

    def set_config_version(self, version: str) -> None:
        # An earlier version goes to 0 rather than away: multiprocess files cannot drop a series.
        if self._config_version is not None and self._config_version != version:
            self.config_info.labels(self._config_version).set(0)
        self.config_info.labels(version).set(1)
        self._config_version = version

    def exposition(self) -> bytes:
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)

    def process_exited(self) -> None:
        """Drop this worker's live gauges from the shared directory."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
