"""The prediction record, and how a request and its response yield model name and version."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import uuid_utils

# Open Inference Protocol V2 and KServe V1 name the model in the path.
_MODEL_IN_PATH = re.compile(r"^/v[12]/models/([^/:]+)")

#: the longest client request id kept whole (X-Request-Id); a longer one is cut, and its
#: record marked escaped. Feedback names request ids of at most this length too.
MAX_REQUEST_ID_LENGTH = 256


def new_prediction_id() -> str:
    """A UUIDv7: unique, and sortable by creation time."""
    return str(uuid_utils.uuid7())


@dataclass(slots=True)
class PredictionRecord:
    """One proxied request, as the store keeps it. Field order is the store's column order."""

    prediction_id: str
    request_id: str | None
    route: str
    variant: str
    model_name: str | None
    configured_version: str
    reported_version: str | None
    assignment: str
    routing_key: str | None
    config_version: str
    method: str
    path: str
    request_time: float
    response_time: float
    latency_ms: float
    status: int
    error: str | None
    request_body: bytes | None
    response_body: bytes | None
    request_truncated: bool
    response_truncated: bool
    request_headers: str | None = None
    response_headers: str | None = None
    shadow: bool = False
    predicted: str | None = None
    score: float | None = None
    #: a shadow's record: the prediction id of the live answer to the same request
    shadow_of: str | None = None
    #: some text of this record held what no store can keep (NUL, an unpaired surrogate),
    #: written escaped instead (see :func:`storable_text`)
    escaped: bool = False
    #: an inference call (a method that sends the model something to predict on), not a
    #: readiness or metadata call; only these are predictions in the experiment's analysis
    inference: bool = True
    #: milliseconds from the request's arrival to its answer's head sent (a stream's first
    #: byte); None when no answer of the model server's was sent
    first_byte_ms: float | None = None
    #: the answer was streamed through as it came, not read whole
    streamed: bool = False
    #: the model an OpenAI-style answer says served it, and the tokens it reports (usage)
    served_model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: a row of a batch: the prediction id of its request's record (whose id it extends with
    #: ``/<row>``)
    batch_of: str | None = None
    #: a batch request's record: how many rows (each a prediction of its own); None for one
    batch_size: int | None = None
    #: the request's monitored features, to read (features.py: its route's spec, its body, a
    #: binary body's JSON length), or read ({name: value, or a value per row}); stored as
    #: JSON text (:func:`~.features.features_text`); None where the route monitors none
    features: Any = None
    #: the spool segment holding this record until the store has it (0: none); not a column
    spool_segment: int = 0
    #: a batch request's rows, (prediction, score) each, written as records of their own by
    #: :meth:`as_rows`; not a column
    batch_rows: list[tuple[str | None, float | None]] | None = None

    # Written out, not generated: the generated __init__ of a dataclass runs as plain Python
    # even in a compiled module, and a record is built for every request.
    def __init__(
        self,
        *,
        prediction_id: str,
        request_id: str | None,
        route: str,
        variant: str,
        model_name: str | None,
        configured_version: str,
        reported_version: str | None,
        assignment: str,
        routing_key: str | None,
        config_version: str,
        method: str,
        path: str,
        request_time: float,
        response_time: float,
        latency_ms: float,
        status: int,
        error: str | None,
        request_body: bytes | None,
        response_body: bytes | None,
        request_truncated: bool,
        response_truncated: bool,
        request_headers: str | None = None,
        response_headers: str | None = None,
        shadow: bool = False,
        predicted: str | None = None,
        score: float | None = None,
        shadow_of: str | None = None,
        escaped: bool = False,
        inference: bool = True,
        first_byte_ms: float | None = None,
        streamed: bool = False,
        served_model: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        batch_of: str | None = None,
        batch_size: int | None = None,
        features: Any = None,
        spool_segment: int = 0,
        batch_rows: list[tuple[str | None, float | None]] | None = None,
    ) -> None:
        self.prediction_id = prediction_id
        self.request_id = request_id
        self.route = route
        self.variant = variant
        self.model_name = model_name
        self.configured_version = configured_version
        self.reported_version = reported_version
        self.assignment = assignment
        self.routing_key = routing_key
        self.config_version = config_version
        self.method = method
        self.path = path
        self.request_time = request_time
        self.response_time = response_time
        self.latency_ms = latency_ms
        self.status = status
        self.error = error
        self.request_body = request_body
        self.response_body = response_body
        self.request_truncated = request_truncated
        self.response_truncated = response_truncated
        self.request_headers = request_headers
        self.response_headers = response_headers
        self.shadow = shadow
        self.predicted = predicted
        self.score = score
        self.shadow_of = shadow_of
        self.escaped = escaped
        self.inference = inference
        self.first_byte_ms = first_byte_ms
        self.streamed = streamed
        self.served_model = served_model
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.batch_of = batch_of
        self.batch_size = batch_size
        self.features = features
        self.spool_segment = spool_segment
        self.batch_rows = batch_rows

    def as_row(self) -> tuple[Any, ...]:
        return (
            self.prediction_id,
            self.request_id,
            self.route,
            self.variant,
            self.model_name,
            self.configured_version,
            self.reported_version,
            self.assignment,
            self.routing_key,
            self.config_version,
            self.method,
            self.path,
            self.request_time,
            self.response_time,
            self.latency_ms,
            self.status,
            self.error,
            self.request_body,
            self.response_body,
            int(self.request_truncated),
            int(self.response_truncated),
            self.request_headers,
            self.response_headers,
            int(self.shadow),
            self.predicted,
            self.score,
            self.shadow_of,
            int(self.escaped),
            int(self.inference),
            self.first_byte_ms,
            int(self.streamed),
            self.served_model,
            self.prompt_tokens,
            self.completion_tokens,
            self.batch_of,
            self.batch_size,
            self.features,
        )

    def as_rows(self) -> list[tuple[Any, ...]]:
        """The store's rows of this record: its own, and one per row of a batch, each a
        prediction of its own (id ``<id>/<row>``, request id ``<request id>/<row>``, a
        shadow's copy naming the same row of the live request), without the bodies."""
        own = self.as_row()
        if not self.batch_rows:
            return [own]
        out = [own]
        for row, (predicted, score) in enumerate(self.batch_rows):
            kept = _storable_or_none(predicted)
            out.append(
                PredictionRecord(
                    prediction_id=f"{self.prediction_id}/{row}",
                    request_id=None if self.request_id is None else f"{self.request_id}/{row}",
                    route=self.route,
                    variant=self.variant,
                    model_name=self.model_name,
                    configured_version=self.configured_version,
                    reported_version=self.reported_version,
                    assignment=self.assignment,
                    routing_key=self.routing_key,
                    config_version=self.config_version,
                    method=self.method,
                    path=self.path,
                    request_time=self.request_time,
                    response_time=self.response_time,
                    latency_ms=self.latency_ms,
                    status=self.status,
                    error=self.error,
                    request_body=None,
                    response_body=None,
                    request_truncated=False,
                    response_truncated=False,
                    shadow=self.shadow,
                    predicted=kept,
                    score=score,
                    shadow_of=None if self.shadow_of is None else f"{self.shadow_of}/{row}",
                    escaped=self.escaped or predicted != kept,
                    inference=self.inference,
                    first_byte_ms=self.first_byte_ms,
                    streamed=self.streamed,
                    served_model=self.served_model,
                    batch_of=self.prediction_id,
                ).as_row()
            )
        return out

    def spool_row(self) -> tuple[Any, ...]:
        """What the spool keeps of the record: its row, and a batch's rows after it."""
        row = self.as_row()
        return row if not self.batch_rows else (*row, self.batch_rows)

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> PredictionRecord:
        """The record of a row in :data:`COLUMNS` order (as :meth:`as_row` or
        :meth:`spool_row` makes it); a row of an earlier release, without the columns added
        since, takes their defaults."""
        batch_rows = None
        if row and isinstance(row[-1], list):  # no column holds a list
            row, batch_rows = row[:-1], [(p, s) for p, s in row[-1]]
        (
            prediction_id, request_id, route, variant, model_name, configured_version,
            reported_version, assignment, routing_key, config_version, method, path,
            request_time, response_time, latency_ms, status, error, request_body,
            response_body, request_truncated, response_truncated, request_headers,
            response_headers, shadow, predicted, score, shadow_of, escaped, inference,
            first_byte_ms, streamed, served_model, prompt_tokens, completion_tokens,
            batch_of, batch_size, features,
        ) = (*row, *_ADDED_COLUMN_DEFAULTS[len(row) - _COLUMNS_BEFORE_USAGE :])  # fmt: skip
        return cls(
            prediction_id=prediction_id,
            request_id=request_id,
            route=route,
            variant=variant,
            model_name=model_name,
            configured_version=configured_version,
            reported_version=reported_version,
            assignment=assignment,
            routing_key=routing_key,
            config_version=config_version,
            method=method,
            path=path,
            request_time=float(request_time),
            response_time=float(response_time),
            latency_ms=float(latency_ms),
            status=int(status),
            error=error,
            request_body=request_body,
            response_body=response_body,
            request_truncated=bool(request_truncated),
            response_truncated=bool(response_truncated),
            request_headers=request_headers,
            response_headers=response_headers,
            shadow=bool(shadow),
            predicted=predicted,
            score=None if score is None else float(score),
            shadow_of=shadow_of,
            escaped=bool(escaped),
            inference=bool(inference),
            first_byte_ms=None if first_byte_ms is None else float(first_byte_ms),
            streamed=bool(streamed),
            served_model=served_model,
            prompt_tokens=None if prompt_tokens is None else int(prompt_tokens),
            completion_tokens=None if completion_tokens is None else int(completion_tokens),
            batch_of=batch_of,
            batch_size=None if batch_size is None else int(batch_size),
            features=features,
            batch_rows=batch_rows,
        )

    def make_storable(self) -> bool:
        """Escape, in place, the text from outside (the client's request, the model server's
        answer) that a store cannot hold, cut a request id past
        :data:`MAX_REQUEST_ID_LENGTH`, and mark the record; ``True`` if anything was.

        PostgreSQL's TEXT refuses NUL, and no UTF-8 column takes an unpaired surrogate: one
        such value would fail its whole batch on every retry."""
        request_id = self.request_id
        cut = request_id is not None and len(request_id) > MAX_REQUEST_ID_LENGTH
        if cut:
            # indexed: PostgreSQL's index refuses a value past ~2.7 kB, and feedback never
            # names one longer than this
            self.request_id = request_id[:MAX_REQUEST_ID_LENGTH]  # type: ignore[index]
            self.escaped = True
        if not (
            unstorable(self.path)
            or unstorable(self.request_id)
            or unstorable(self.model_name)
            or unstorable(self.routing_key)
            or unstorable(self.error)
            or unstorable(self.reported_version)
            or unstorable(self.predicted)
            or unstorable(self.served_model)
            or unstorable(self.request_headers)
            or unstorable(self.response_headers)
        ):
            return cut
        self.path = storable_text(self.path)
        self.request_id = _storable_or_none(self.request_id)
        self.model_name = _storable_or_none(self.model_name)
        self.routing_key = _storable_or_none(self.routing_key)
        self.error = _storable_or_none(self.error)
        self.reported_version = _storable_or_none(self.reported_version)
        self.predicted = _storable_or_none(self.predicted)
        self.served_model = _storable_or_none(self.served_model)
        self.request_headers = _storable_or_none(self.request_headers)
        self.response_headers = _storable_or_none(self.response_headers)
        self.escaped = True
        return True


#: the store's columns, in the order of :meth:`PredictionRecord.as_row`
COLUMNS = tuple(
    name
    for name in PredictionRecord.__dataclass_fields__
    if name not in ("spool_segment", "batch_rows")
)
#: the columns a spooled row of the release before streams and token usage has, and the
#: defaults of the columns added since, so that a spool left by it is still replayed
_COLUMNS_BEFORE_USAGE = 29
_ADDED_COLUMN_DEFAULTS: tuple[Any, ...] = (None, 0, None, None, None, None, None, None)


def unstorable(text: str | None) -> bool:
    """Whether ``text`` holds what some store cannot keep: NUL, or an unpaired surrogate."""
    if text is None:
        return False
    if "\x00" in text:
        return True
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def bytes_as_text(text: str) -> str:
    """Text decoded with ``surrogateescape`` (each byte that was not UTF-8 held as a lone
    surrogate), with those bytes written ``\\xNN`` instead."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def storable_text(text: str) -> str:
    """``text`` with NUL written ``\\x00`` and each unpaired surrogate ``\\udXXX``, the
    escapes Python itself prints: text every store keeps as it is given."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _storable_or_none(text: str | None) -> str | None:
    return text if text is None or not unstorable(text) else storable_text(text)


def model_name_from_path(path: str) -> str | None:
    match = _MODEL_IN_PATH.match(path)
    return match.group(1) if match else None


_INTEGER = re.compile(r"[+-]?\d+")
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_TRUTH = {"true": "1", "false": "0"}


def canonical_label(value: Any) -> str | None:
    """One spelling per label, so that ``1``, ``1.0``, ``"1"``, ``"1.0"``, ``" 1 "``,
    ``true`` and ``"true"`` (any case) are the same label, ``"1"``; ``None`` for what is no
    label (an empty string, NaN, an object).

    Numbers are written as integers when they are whole, else as Python writes a float;
    text that is a number is read as that number (pandas writes ``1.0`` for ``1`` in any
    column with a blank); other text is kept, without the spaces around it."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        try:
            return str(value)
        except ValueError:  # past Python's limit for writing an int (4,300 digits)
            return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        truth = _TRUTH.get(text.lower())
        if truth is not None:
            return truth
        if _INTEGER.fullmatch(text):
            try:
                return str(int(text))
            except ValueError:  # too many digits to read as a number: kept as text
                return text
        if _DECIMAL.fullmatch(text):
            return canonical_label(float(text))
        return text
    return None
