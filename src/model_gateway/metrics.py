"""Every Prometheus collector the gateway exports, in one registry owned by the app.

The registry is created in the lifespan and passed down, never a module global, so tests and
several apps in one process do not collide. Label children are cached per label tuple.

The hot path does not touch a collector. Each answered request appends one tuple to a list,
and every ``FOLD_SECONDS`` (and before every scrape) the list is folded into the collectors:
one ``inc`` per counter series and one per histogram bucket touched, instead of prometheus-
client's two locked updates and a bucket scan per observation, per request, which made the
metrics a large share of a request's instructions (docs/design.md).

With ``serve --workers N`` each worker writes its values to files in
``$PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode, set up by the parent
before the workers start) and ``/metrics`` on any worker answers for all of them.
"""

from __future__ import annotations

import asyncio
import math
import os
import platform
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

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

from .background import cancel_and_wait
from .serving.limits import CLIENT_CLOSE_REASONS

PREFIX = "model_gateway"
#: the states a rollout can be in (rollouts.py)
ROLLOUT_STATES = ("running", "paused", "rolled_back", "promoted", "aborted")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Boundaries at the usual latency SLOs (0.1, 0.25, 0.5, 1 s) and fine below them, where a
# healthy model server answers.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
#: how often each process folds the requests it answered into its collectors
FOLD_SECONDS = 0.05
#: with several workers, a scrape waits this long first: every other worker folds within
#: FOLD_SECONDS, so the answer counts every request answered before the scrape came in
SCRAPE_SETTLE_SECONDS = 3 * FOLD_SECONDS

# (route, variant, model version, status, seconds, upstream seconds or None, score or None)
#: route, variant, model version, status, seconds, upstream seconds, score, seconds to the
#: answer's first byte (None: no answer of the model server's), streamed
Observation = tuple[str, str, str, int, float, float | None, float | None, float | None, bool]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The *_created series double the exposition for no use here; multiprocess mode has none.
disable_created_metrics()  # type: ignore[no-untyped-call]


def code_label(status_class: int) -> str:
    """The ``code`` label of a status class (``status // 100``): 2xx, 4xx, 5xx."""
    return f"{status_class}xx"


def multiprocess_mode() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def add_observations(histogram: MetricWrapperBase, values: list[float]) -> None:
    """What ``histogram.observe(v)`` does for each value, done for all of them at once: the
    same bucket counts and sum, one update per bucket touched.

    prometheus-client has no call for this, so it reaches into the histogram's bounds
    (``_upper_bounds``, +Inf last), ``_sum`` and ``_buckets`` (per-bucket counts, made
    cumulative when collected). A property test holds it equal to ``observe``, so a release
    that changes that layout fails the suite.
    """
    bounds: list[float] = histogram._upper_bounds  # type: ignore[attr-defined]
    counts = [0] * len(bounds)
    for value in values:
        # observe() counts a value in the first bucket whose bound is >= it
        counts[bisect_left(bounds, value)] += 1
    histogram._sum.inc(sum(values))  # type: ignore[attr-defined]
    buckets = histogram._buckets  # type: ignore[attr-defined]
    for index, count in enumerate(counts):
        if count:
            buckets[index].inc(count)


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
        self.time_to_first_byte = Histogram(
            f"{PREFIX}_time_to_first_byte_seconds",
            "Time from request received to the model server's answer begun for the client:"
            " its head sent (a streamed answer's first byte follows it at once).",
            ["route", "variant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.streamed_answers = Counter(
            f"{PREFIX}_streamed_answers",
            "Answers relayed as they came (event streams, chunked or large answers), whose"
            " request duration is the whole stream's.",
            ["route", "variant"],
            registry=r,
        )
        self.batch_rows_unlogged = Counter(
            f"{PREFIX}_batch_rows_unlogged",
            "Rows of batch answers past the route's evaluation.max_batch_rows: counted, not"
            " logged as predictions.",
            ["route"],
            registry=r,
        )
        self.tokens = Counter(
            f"{PREFIX}_tokens",
            "Tokens OpenAI-style answers report (usage), by kind (prompt, completion). The"
            " model an answer names is in its record, not a label: a server may name any.",
            ["route", "variant", "kind"],
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
        self.client_connections_closed = Counter(
            f"{PREFIX}_client_connections_closed",
            "Client connections the gateway closed over a limit of its server section: a"
            " request head not whole in time (header_timeout, answered 408) or too large"
            " (header_too_large, 431), or an answer the client did not read (send_timeout).",
            ["reason"],
            registry=r,
        )
        # every reason exported from the start, at 0: a rate over it then has a value
        for reason in CLIENT_CLOSE_REASONS:
            self.client_connections_closed.labels(reason)
        self.upstream_retries = Counter(
            f"{PREFIX}_upstream_retries",
            "Requests sent on to another variant after this one refused the connection or did"
            " not accept one in time (route connect_retries).",
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
        self.shadow_requests = Counter(
            f"{PREFIX}_shadow_requests",
            "Copies of live requests answered by shadow variants (never seen by clients).",
            ["route", "variant", "model_version", "code"],
            registry=r,
        )
        self.shadow_duration = Histogram(
            f"{PREFIX}_shadow_duration_seconds",
            "Time from a copy sent to a shadow variant to its whole answer read.",
            ["route", "variant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.shadow_skipped = Counter(
            f"{PREFIX}_shadow_skipped",
            "Copies not sent because the shadow already had max_in_flight copies outstanding, "
            "or the log queue was full (overflow: block).",
            ["route", "variant"],
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
            "Feedback items joined to their logged prediction (labels, hand labels of weighted "
            "samples, people's decisions).",
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
        self.feedback_decisions = Counter(
            f"{PREFIX}_feedback_decisions",
            "People's decisions on recommendations (feedback items with an outcome), by "
            "decision: accepted or overridden; each item joined counts.",
            ["route", "variant", "model_version", "decision"],
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
        self.log_dead_lettered = Counter(
            f"{PREFIX}_log_records_dead_lettered",
            "Prediction records the store refused for what they hold, kept in dead_letters.",
            registry=r,
        )
        self.log_escaped = Counter(
            f"{PREFIX}_log_records_escaped",
            "Prediction records written with text escaped (NUL, unpaired surrogates).",
            registry=r,
        )
        self.log_spool_replayed = Counter(
            f"{PREFIX}_log_spool_replayed",
            "Records found in the spool at start (left by a process that died) and written.",
            registry=r,
        )
        self.log_unavailable = Counter(
            f"{PREFIX}_log_unavailable",
            "Requests answered 503 log_unavailable: no room in the log queue within "
            "storage.block_timeout (overflow: block).",
            registry=r,
        )
        self.log_requests_waiting = Gauge(
            f"{PREFIX}_log_requests_waiting",
            "Requests waiting for room in the full log queue before they are forwarded.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.log_queue_depth = Gauge(
            f"{PREFIX}_log_queue_depth",
            "Prediction records in memory: queued, being written, or reserved by requests "
            "in flight.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.log_queue_capacity = Gauge(
            f"{PREFIX}_log_queue_capacity",
            "Prediction records the log queue holds before the overflow policy applies.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.background_errors = Counter(
            f"{PREFIX}_background_errors",
            "Failures caught in a background loop (config-file watch, feedback join, health "
            "checks, shutdown steps); the loop logged it and went on.",
            ["task"],
            registry=r,
        )
        self.delivered_rows = Counter(
            f"{PREFIX}_delivered_rows",
            "Predictions written to a delivery's files (deliveries in the configuration).",
            ["delivery"],
            registry=r,
        )
        self.rollout_step = Gauge(
            f"{PREFIX}_rollout_step",
            "The step a rollout is at (1 is its first).",
            ["route", "rollout"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rollout_challenger_percent = Gauge(
            f"{PREFIX}_rollout_challenger_percent",
            "The challenger's share of the champion's and the challenger's traffic, in percent.",
            ["route", "rollout"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rollout_state = Gauge(
            f"{PREFIX}_rollout_state",
            "1 for the state a rollout is in (running, paused, rolled_back, promoted, aborted).",
            ["route", "rollout", "state"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rollout_decisions = Counter(
            f"{PREFIX}_rollout_decisions",
            "Moves of rollouts (advance, promote, rollback, pause, resume, abort), by the gateway "
            "that made them.",
            ["route", "decision"],
            registry=r,
        )
        self.feature_drift = Gauge(
            f"{PREFIX}_feature_drift",
            "Drift of a monitored feature (or the score) from its reference over the first "
            "monitoring window: PSI (method psi) or the Kolmogorov-Smirnov statistic (ks); NaN "
            "without a reference or with too few values.",
            ["route", "variant", "feature", "method"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.feature_statistic = Gauge(
            f"{PREFIX}_feature_statistic",
            "A monitored feature's (or the score's) statistic over a monitoring window: count, "
            "psi, ks_statistic, ks_p_value, chi2_p_value, missing_ratio, reference_missing_ratio, "
            "missing_increase (over the reference's), out_of_range_ratio, mean, mean_shift (in "
            "the reference's standard deviations), variance, variance_ratio (to the "
            "reference's); NaN where it cannot be told.",
            ["route", "variant", "feature", "statistic", "window"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.monitoring_look_seconds = Gauge(
            f"{PREFIX}_monitoring_look_seconds",
            "How long the last computation of a route's monitored statistics took (the store "
            "read and the statistics, every window).",
            ["route"],
            registry=r,
            multiprocess_mode="livemax",
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
        #: the gateway's own release
        self.build_version = build_version
        self._config_version: str | None = None
        self._children: dict[tuple[object, ...], MetricWrapperBase] = {}
        #: requests being proxied now; the in-flight gauge is set from it at each fold
        self.requests_in_flight = 0
        self._pending: list[Observation] = []
        self._tokens: list[tuple[str, str, int | None, int | None]] = []
        #: scores of the rows of batches past their first (which rides with its request)
        self._row_scores: list[tuple[str, str, str, float]] = []
        self._folder: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Fold every FOLD_SECONDS from now on; call inside the event loop."""
        self._folder = asyncio.create_task(self._fold_periodically(), name="metrics-fold")

    async def close(self) -> None:
        """Stop folding, and fold what is left, so that nothing observed is lost."""
        await cancel_and_wait(self._folder)
        self._folder = None
        self.fold()

    async def _fold_periodically(self) -> None:
        while True:
            await asyncio.sleep(FOLD_SECONDS)
            self.fold()

    def _child(self, metric: MetricWrapperBase, *labels: str) -> MetricWrapperBase:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(
        self,
        route: str,
        variant: str,
        model_version: str,
        status: int,
        seconds: float,
        upstream_seconds: float | None = None,
        score: float | None = None,
        first_byte_seconds: float | None = None,
        streamed: bool = False,
    ) -> None:
        """One answered request: counted, its durations and score observed at the next fold."""
        self._pending.append(
            (route, variant, model_version, status, seconds, upstream_seconds, score,
             first_byte_seconds, streamed)
        )  # fmt: skip

    def observe_tokens(
        self, route: str, variant: str, prompt: int | None, completion: int | None
    ) -> None:
        """The tokens an OpenAI-style answer reports, counted at the next fold."""
        self._tokens.append((route, variant, prompt, completion))

    def observe_row_scores(
        self, route: str, variant: str, model_version: str, scores: list[float]
    ) -> None:
        """The scores of a batch's rows after its first, observed at the next fold."""
        self._row_scores.extend((route, variant, model_version, s) for s in scores)

    def _fold_tokens(self) -> None:
        tokens, self._tokens = self._tokens, []
        totals: dict[tuple[str, str, str], int] = {}
        for route, variant, prompt, completion in tokens:
            for kind, count in (("prompt", prompt), ("completion", completion)):
                if count is not None:
                    key = (route, variant, kind)
                    totals[key] = totals.get(key, 0) + count
        for labels, count in totals.items():
            self._child(self.tokens, *labels).inc(count)  # type: ignore[attr-defined]

    def fold(self) -> None:
        """Add the requests observed since the last fold to the collectors."""
        self.in_flight.set(self.requests_in_flight)
        if self._tokens:
            self._fold_tokens()
        pending = self._pending
        if not pending:
            return
        self._pending = []
        counts: dict[tuple[str, str, str, int], int] = {}
        durations: dict[tuple[str, str], list[float]] = {}
        upstream: dict[tuple[str, str], list[float]] = {}
        first_bytes: dict[tuple[str, str], list[float]] = {}
        streams: dict[tuple[str, str], int] = {}
        scores: dict[tuple[str, str, str], list[float]] = {}
        row_scores, self._row_scores = self._row_scores, []
        for route, variant, version, row_score in row_scores:
            scores.setdefault((route, variant, version), []).append(row_score)
        for (
            route, variant, version, status, seconds, upstream_seconds, score, first_byte,
            streamed,
        ) in pending:  # fmt: skip
            key = (route, variant, version, status // 100)
            counts[key] = counts.get(key, 0) + 1
            pair = (route, variant)
            durations.setdefault(pair, []).append(seconds)
            if upstream_seconds is not None:
                upstream.setdefault(pair, []).append(upstream_seconds)
            if first_byte is not None:
                first_bytes.setdefault(pair, []).append(first_byte)
                if streamed:
                    streams[pair] = streams.get(pair, 0) + 1
            if score is not None:
                scores.setdefault((route, variant, version), []).append(score)
        for (route, variant, version, status_class), count in counts.items():
            code = code_label(status_class)  # once per series, not per request
            self._child(self.requests, route, variant, version, code).inc(count)  # type: ignore[attr-defined]
        for pair, values in durations.items():
            add_observations(self._child(self.request_duration, *pair), values)
        for pair, values in upstream.items():
            add_observations(self._child(self.upstream_duration, *pair), values)
        for pair, values in first_bytes.items():
            add_observations(self._child(self.time_to_first_byte, *pair), values)
        for pair, count in streams.items():
            self._child(self.streamed_answers, *pair).inc(count)  # type: ignore[attr-defined]
        for labels, values in scores.items():
            add_observations(self._child(self.prediction_score, *labels), values)

    def upstream_error(self, route: str, variant: str, reason: str) -> None:
        self._child(self.upstream_errors, route, variant, reason).inc()  # type: ignore[attr-defined]

    def observe_shadow(
        self, route: str, variant: str, model_version: str, status: int, seconds: float
    ) -> None:
        code = code_label(status // 100)
        self._child(self.shadow_requests, route, variant, model_version, code).inc()  # type: ignore[attr-defined]
        self._child(self.shadow_duration, route, variant).observe(seconds)  # type: ignore[attr-defined]

    def skip_shadow(self, route: str, variant: str) -> None:
        self._child(self.shadow_skipped, route, variant).inc()  # type: ignore[attr-defined]

    def client_connection_closed(self, reason: str) -> None:
        self._child(self.client_connections_closed, reason).inc()  # type: ignore[attr-defined]

    def upstream_retry(self, route: str, variant: str, reason: str) -> None:
        self._child(self.upstream_retries, route, variant, reason).inc()  # type: ignore[attr-defined]

    def set_rollout(
        self, route: str, rollout: str, state: str, step: int, challenger_percent: float
    ) -> None:
        self.rollout_step.labels(route, rollout).set(step)
        self.rollout_challenger_percent.labels(route, rollout).set(challenger_percent)
        for name in ROLLOUT_STATES:
            self.rollout_state.labels(route, rollout, name).set(1 if name == state else 0)

    def set_feature_statistics(
        self, route: str, entries: Sequence[dict[str, Any]], statistics: Sequence[str], first: str
    ) -> None:
        """Each entry's statistics (monitoring.py); the first window's drift as the drift
        gauge. A figure that cannot be told is NaN, not the last one told."""
        for entry in entries:
            labels = (route, entry["variant"], entry["feature"])
            window = entry["window"]
            for name in statistics:
                value = entry[name]
                figure = math.nan if value is None else float(value)
                self.feature_statistic.labels(*labels, name, window).set(figure)
            if window == first:
                for method, name in (("psi", "psi"), ("ks", "ks_statistic")):
                    value = entry[name]
                    figure = math.nan if value is None else float(value)
                    self.feature_drift.labels(*labels, method).set(figure)

    def clear_feature_statistics(
        self,
        route: str,
        variant: str,
        feature: str,
        window: str,
        statistics: Sequence[str],
        drift: bool,
    ) -> None:
        """A series no longer computed: its count 0 and its figures NaN (multiprocess files
        cannot drop a series), so that no alert fires on what was once true; ``drift``: the
        drift gauge's too (the window was the first)."""
        for name in statistics:
            figure = 0.0 if name == "count" else math.nan
            self.feature_statistic.labels(route, variant, feature, name, window).set(figure)
        for method in ("psi", "ks") if drift else ():
            self.feature_drift.labels(route, variant, feature, method).set(math.nan)

    def set_config_version(self, version: str) -> None:
        # An earlier version goes to 0 rather than away: multiprocess files cannot drop a series.
        if self._config_version is not None and self._config_version != version:
            self.config_info.labels(self._config_version).set(0)
        self.config_info.labels(version).set(1)
        self._config_version = version

    async def scrape(self) -> bytes:
        """The exposition, counting every request answered before the call, on every worker."""
        if self.multiprocess:
            await asyncio.sleep(SCRAPE_SETTLE_SECONDS)
        return self.exposition()

    def exposition(self) -> bytes:
        self.fold()
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)

    def process_exited(self) -> None:
        """Drop this worker's live gauges from the shared directory."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
