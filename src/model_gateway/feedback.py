"""``POST /feedback``: parsing and validating labels, and joining them to predictions.

A body is one JSON object, a JSON array of them, or NDJSON (one object per line). Each item
names its prediction by ``prediction_id`` (the gateway's ``X-Prediction-Id``) or by the
client's ``request_id``, and carries a ``label``; ``timestamp`` (RFC 3339 or Unix seconds) and
``source`` are optional. Items are judged one by one: the valid ones are kept, each invalid
one is answered with its index and reason. Labels may arrive before their prediction has been
written; they wait and are joined when it is. A later label for a prediction supersedes an
earlier one in reports; both are kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from .background import cancel_and_wait, run_every
from .records import MAX_REQUEST_ID_LENGTH, canonical_label, new_prediction_id, unstorable
from .store.base import STORE_ERRORS

if TYPE_CHECKING:
    from .config import EvaluationConfig, RouteConfig
    from .live import LiveConfig
    from .metrics import Metrics
    from .store.base import Store

log = logging.getLogger("model_gateway.feedback")

MAX_ITEMS = 10_000
MAX_BODY_BYTES = 16 * 1024 * 1024
#: a stored id: a request id as kept (cut at its limit), and a batch row's "/<row>" after it
MAX_KEY_LENGTH = MAX_REQUEST_ID_LENGTH + len("/99999")
JOIN_INTERVAL_SECONDS = 1.0
# Times the gateway can write back as RFC 3339 (years 1 to 9999 in UTC); anything outside
# would be stored and then fail every answer that shows it.
EARLIEST_TIME = datetime(1, 1, 1, tzinfo=UTC).timestamp()
LATEST_TIME = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()


def parse_time(text: str) -> float | None:
    """Unix seconds from RFC 3339 text with an offset; ``None`` when it is not one, or names a
    moment outside years 1 to 9999 once converted to UTC."""
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            return None
        seconds = moment.timestamp()
    except (ValueError, OverflowError):
        return None
    return seconds if EARLIEST_TIME <= seconds <= LATEST_TIME else None


_FIELDS = frozenset(
    {
        "prediction_id",
        "request_id",
        "label",
        "timestamp",
        "source",
        "origin",
        "inclusion_probability",
        "outcome",
        "value",
    }
)
#: where a label came from: a downstream system (the default), a person, a bulk import
ORIGINS = ("downstream", "human", "import")
#: what a person did with a recommendation
OUTCOMES = ("accepted", "overridden")
#: the least inclusion probability a hand label may carry
MIN_INCLUSION_PROBABILITY = 1e-9


_UNSTORABLE = "holds NUL or an unpaired surrogate, which the store cannot keep"


class FeedbackBodyError(ValueError):
    """The body as a whole cannot be read (answered with 400)."""


@dataclass(frozen=True, slots=True)
class FeedbackItem:
    prediction_id: str | None
    request_id: str | None
    #: None when the item carries only a person's decision (outcome, value)
    label: str | None
    label_time: float
    source: str | None
    origin: str = "downstream"
    #: a hand label's chance of having been drawn into its labelling sample
    inclusion_probability: float | None = None
    outcome: str | None = None
    value: float | None = None

    def as_row(self, received_at: float) -> tuple[Any, ...]:
        return (
            new_prediction_id(),
            self.prediction_id,
            self.request_id,
            self.label,
            self.label_time,
            received_at,
            self.source,
            self.origin,
            self.inclusion_probability,
            self.outcome,
            self.value,
        )


def _loads(text: bytes) -> Any:
    """orjson, else the standard library for what orjson refuses but JSON allows (integers
    beyond 64 bits); raises ValueError for anything that is not JSON."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as first:
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            raise first from None


def parse_body(body: bytes, content_type: str | None) -> list[Any]:
    """The items of a body, each still unvalidated; NDJSON lines that are not JSON come back
    as :class:`FeedbackBodyError` instances so that they are rejected one by one."""
    ndjson = content_type is not None and ("ndjson" in content_type or "jsonl" in content_type)
    if not ndjson:
        try:
            doc = _loads(body)
        except ValueError as exc:
            if body.count(b"\n") < 1:
                raise FeedbackBodyError(f"malformed JSON: {exc}") from None
            ndjson = True  # several lines: read them as NDJSON
        else:
            if isinstance(doc, dict):
                return [doc]
            if isinstance(doc, list):
                return doc
            raise FeedbackBodyError("expected a JSON object, an array of objects, or NDJSON")
    items: list[Any] = []
    for number, line in enumerate(body.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            items.append(_loads(line))
        except ValueError:
            items.append(FeedbackBodyError(f"line {number}: malformed JSON"))
    return items


def validate_item(item: Any, now: float) -> FeedbackItem | str:
    """A valid item, or the reason it is rejected."""
    if isinstance(item, FeedbackBodyError):
        return str(item)
    if not isinstance(item, dict):
        return "an item must be a JSON object"
    unknown = sorted(set(item) - _FIELDS)
    if unknown:
        return f"unknown field(s): {', '.join(unknown)}"
    keys = {}
    for name in ("prediction_id", "request_id"):
        value = item.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not value or len(value) > MAX_KEY_LENGTH:
            return f"{name} must be a non-empty string of at most {MAX_KEY_LENGTH} characters"
        if unstorable(value):
            return f"{name} {_UNSTORABLE}"
        keys[name] = value
    if not keys:
        return "prediction_id or request_id is required"
    decision = _decision(item)
    if isinstance(decision, str):
        return decision
    label = None
    if item.get("label") is not None:
        raw_label = item["label"]
        if isinstance(raw_label, float) and not math.isfinite(raw_label):
            return "label must be finite"
        label = canonical_label(raw_label)
        if label is None:
            return "label must be a non-empty string, a finite number or a boolean"
        if unstorable(label):
            return f"label {_UNSTORABLE}"
    elif decision == (None, None):
        return "label is required"
    origin = item.get("origin", "downstream")
    if origin not in ORIGINS:
        return f"origin must be one of {', '.join(ORIGINS)}"
    weight = item.get("inclusion_probability")
    if weight is not None:
        if label is None:
            return "inclusion_probability belongs to a label"
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            return "inclusion_probability must be a number in (0, 1]"
        if not MIN_INCLUSION_PROBABILITY <= weight <= 1:
            # a weight of a billion rows and more is no sample's: a typo, or an attack on
            # the estimates
            return f"inclusion_probability must be a number in [{MIN_INCLUSION_PROBABILITY:g}, 1]"
    label_time = now
    if item.get("timestamp") is not None:
        parsed = _timestamp(item["timestamp"])
        if parsed is None:
            return "timestamp must be RFC 3339 with an offset, or Unix seconds"
        label_time = parsed
    source = item.get("source")
    if source is not None and not isinstance(source, str):
        return "source must be a string"
    if unstorable(source):
        return f"source {_UNSTORABLE}"
    return FeedbackItem(
        keys.get("prediction_id"),
        keys.get("request_id"),
        label,
        label_time,
        source,
        origin,
        None if weight is None else float(weight),
        *decision,
    )


def _decision(item: dict[str, Any]) -> tuple[str | None, float | None] | str:
    """A person's (outcome, value) on a recommendation, or the reason they are refused."""
    outcome = item.get("outcome")
    if outcome is not None and outcome not in OUTCOMES:
        return f"outcome must be one of {', '.join(OUTCOMES)}"
    value = item.get("value")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "value must be a finite number"
        try:
            value = float(value)
        except OverflowError:
            return "value must be a finite number"
        if not math.isfinite(value):
            return "value must be a finite number"
    return outcome, value


def label_problem(label: str, evaluation: EvaluationConfig) -> str | None:
    """Why ``label`` (canonical) is no label of the route's task, or None."""
    if evaluation.task == "regression":
        try:
            float(label)
        except ValueError:
            return f"label {label!r} is not a number, which a regression route needs"
        return None
    if evaluation.task == "binary":
        positive = canonical_label(evaluation.positive_label)
        if positive in ("0", "1") and label not in ("0", "1"):
            return (
                f"label {label!r} is neither 1 nor 0, the labels of this binary route "
                "(1, 1.0, true read as 1; 0, 0.0, false as 0)"
            )
    return None


async def judge_labels(
    store: Store, routes: dict[str, RouteConfig], items: list[tuple[int, FeedbackItem]]
) -> tuple[list[tuple[int, FeedbackItem]], list[tuple[int, str]], int]:
    """The items whose label fits the task of their prediction's route; (position, reason)
    for the others; and how many name no prediction stored yet (kept: they wait for it,
    and a label that does not fit is then left out of the quality figures)."""
    by_id = [i.prediction_id for _, i in items if i.prediction_id is not None]
    by_request = [i.request_id for _, i in items if i.request_id is not None]
    found = await store.routes_of(by_id, by_request)
    # an id of a row of a batch that is not stored: is its batch?
    batches = await store.routes_of(
        [_batch_of(key) for key in by_id if key not in found and "/" in key],
        [_batch_of(key) for key in by_request if key not in found and "/" in key],
    )
    kept: list[tuple[int, FeedbackItem]] = []
    refused: list[tuple[int, str]] = []
    waiting = 0
    for position, item in items:
        key = (item.prediction_id if item.prediction_id is not None else item.request_id) or ""
        stored = found.get(key)
        if stored is None:
            batch = batches.get(_batch_of(key)) if "/" in key else None
            if batch is not None and batch[1] is not None:
                refused.append(
                    (position, f"names no logged row of a batch request of {batch[1]} rows")
                )
                continue
            waiting += 1
            kept.append((position, item))
            continue
        route_name, batch_size = stored
        if batch_size is not None:
            refused.append(
                (
                    position,
                    f"names a batch request of {batch_size} rows: label its rows, as"
                    f" {key}/<row> (from 0)",
                )
            )
            continue
        route = routes.get(route_name)
        problem = None
        if route is not None and route.evaluation is not None and item.label is not None:
            problem = label_problem(item.label, route.evaluation)
        if problem is None:
            kept.append((position, item))
        else:
            refused.append((position, f"{problem} (route {route_name})"))
    return kept, refused, waiting


def _counted(row: dict[str, Any]) -> bool:
    """Whether a joined item is a label of the unweighted stream."""
    return row["label"] is not None and row["inclusion_probability"] is None


def _batch_of(key: str) -> str:
    """The id of the batch request a row's id (``<id>/<row>``) names."""
    return key.rsplit("/", 1)[0]


def _timestamp(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if 0 <= value <= LATEST_TIME else None
    if isinstance(value, str):
        return parse_time(value)
    return None


def outcome(positive: str, predicted: str, actual: str) -> str:
    """Confusion outcome of one binary prediction."""
    if predicted == positive:
        return "tp" if actual == positive else "fp"
    return "fn" if actual == positive else "tn"


class FeedbackJoiner:
    """Joins waiting labels to predictions now in the store, and counts the outcomes."""

    def __init__(self, store: Store, live: LiveConfig, metrics: Metrics) -> None:
        self._store = store
        self._live = live
        self._metrics = metrics
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="feedback-joiner")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _loop(self) -> None:
        await run_every(
            lambda: JOIN_INTERVAL_SECONDS,
            self.join_pending,
            task="feedback-join",
            what="joining feedback",
            errors=self._metrics.background_errors,
            log=log,
            quiet=STORE_ERRORS,
        )

    async def join_pending(self) -> int:
        async with self._lock:
            joined = await self._store.join_feedback(time.time())
        metrics = self._metrics
        routes = {r.name: r for r in self._live.loaded.config.routes}
        for row in joined:
            labels = (row["route"], row["variant"], row["model_version"])
            metrics.feedback_joined.labels(*labels).inc()
            if row["outcome"] is not None:
                metrics.feedback_decisions.labels(*labels, row["outcome"]).inc()
            route = routes.get(row["route"])
            evaluation = route.evaluation if route else None
            # the outcome counters count a prediction's first label, from the whole stream:
            # a hand label drawn into a weighted sample would bend them, and a decision alone
            # is no label
            if not row["first"] or evaluation is None or not _counted(row):
                continue
            self._count_outcome(evaluation, labels, row["predicted"], row["label"])
            # the same label measures the shadows' answers to the same request
            for copy in row["shadows"]:
                copy_labels = (row["route"], copy["variant"], copy["model_version"])
                self._count_outcome(evaluation, copy_labels, copy["predicted"], row["label"])
        return len(joined)

    def _count_outcome(
        self,
        evaluation: EvaluationConfig,
        labels: tuple[str, str, str],
        predicted: str | None,
        actual: str,
    ) -> None:
        """One labelled prediction into the confusion counters of its variant and version."""
        if predicted is None:
            return
        metrics = self._metrics
        if evaluation.task == "binary":
            positive = canonical_label(evaluation.positive_label) or ""
            result = outcome(positive, predicted, actual)
            metrics.feedback_outcomes.labels(*labels, result).inc()
        elif evaluation.task == "multiclass":
            if predicted == actual:
                metrics.feedback_class_outcomes.labels(*labels, actual, "tp").inc()
            else:
                metrics.feedback_class_outcomes.labels(*labels, actual, "fn").inc()
                metrics.feedback_class_outcomes.labels(*labels, predicted, "fp").inc()
