"""The prediction record, and how a request and its response yield model name and version."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import uuid_utils

from .config import EvaluationConfig, RouteConfig, VersionSource

# Open Inference Protocol V2 and KServe V1 name the model in the path.
_MODEL_IN_PATH = re.compile(r"^/v[12]/models/([^/:]+)")


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
        )


COLUMNS = tuple(PredictionRecord.__dataclass_fields__)


def model_name_from_path(path: str) -> str | None:
    match = _MODEL_IN_PATH.match(path)
    return match.group(1) if match else None


def parse_json_object(body: bytes, content_type: str | None) -> dict[str, Any] | None:
    """The body as a JSON object when it is one; ``None`` for anything else, never an error."""
    if not body or content_type is None or "json" not in content_type:
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def answer_document(
    config: RouteConfig, body: bytes, content_type: str | None, plain: bool
) -> dict[str, Any] | None:
    """A model server's answer as a JSON object, when the route reads the served version from
    the body or evaluates answers and ``plain`` (the whole body, not compressed); else None."""
    if not plain or (config.version.pointer is None and config.evaluation is None):
        return None
    return parse_json_object(body, content_type)


def resolve_pointer(doc: Any, pointer: str) -> Any:
    """RFC 6901 JSON pointer lookup; ``None`` when the path does not exist."""
    for key, index in _pointer_tokens(pointer):
        if isinstance(doc, dict):
            doc = doc.get(key)
        elif isinstance(doc, list) and index is not None and index < len(doc):
            doc = doc[index]
        else:
            return None
    return doc


@functools.lru_cache(maxsize=256)
def _pointer_tokens(pointer: str) -> tuple[tuple[str, int | None], ...]:
    # Pointers come from the configuration, so each is split once rather than per request.
    if pointer == "":
        return ()
    tokens = (t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/"))
    return tuple((t, int(t) if t.isdigit() else None) for t in tokens)


def reported_version(
    source: VersionSource, headers: Mapping[str, str], doc: dict[str, Any] | None
) -> str | None:
    """The model version the server says it served: a header first, then the body.

    ``headers`` must look names up case-insensitively (aiohttp's response headers do).
    """
    if source.header is not None:
        value = headers.get(source.header)
        if value:
            return value
    if doc is not None and source.pointer is not None:
        value = resolve_pointer(doc, source.pointer)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
    return None


_DEFAULT_PREDICTION_POINTERS = ("/outputs/0/data/0", "/predictions/0")


def canonical_label(value: Any) -> str | None:
    """One spelling per label, so that 1, 1.0, "1" and true all compare equal."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str | int | float):
        return str(value)
    return None


def extract_prediction(
    evaluation: EvaluationConfig, doc: dict[str, Any] | None
) -> tuple[str | None, float | None]:
    """(prediction as canonical text, score) from a parsed response; ``None`` where absent."""
    if doc is None:
        return None, None
    score = None
    if evaluation.score is not None:
        raw = resolve_pointer(doc, evaluation.score)
        if isinstance(raw, int | float) and not isinstance(raw, bool) and math.isfinite(raw):
            score = float(raw)
    pointers = (evaluation.prediction,) if evaluation.prediction else _DEFAULT_PREDICTION_POINTERS
    predicted = None
    for pointer in pointers:
        predicted = canonical_label(resolve_pointer(doc, pointer))
        if predicted is not None:
            break
    if predicted is None and score is not None and evaluation.task == "binary":
        positive = canonical_label(evaluation.positive_label)
        negative = "0" if positive == "1" else f"not {positive}"
        predicted = positive if score >= evaluation.threshold else negative
    return predicted, score
