"""The prediction record, and how a request and its response yield model name and version."""

from __future__ import annotations

import functools
import math
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import uuid_utils

from .config import RouteConfig
from .tensors import HEADER_LENGTH, read_binary_body

# Open Inference Protocol V2 and KServe V1 name the model in the path.
_MODEL_IN_PATH = re.compile(r"^/v[12]/models/([^/:]+)")

#: the longest client request id kept whole (X-Request-Id); a longer one is cut, and its
#: record marked escaped. Feedback names request ids of at most this length too.
MAX_REQUEST_ID_LENGTH = 256

#: a JSON pointer split into its tokens, each with its value as a list index (if it is one)
Pointer = tuple[tuple[str, int | None], ...]


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
                    predicted=_storable_or_none(predicted),
                    score=score,
                    shadow_of=None if self.shadow_of is None else f"{self.shadow_of}/{row}",
                    escaped=self.escaped or predicted != _storable_or_none(predicted),
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
        if len(row) == len(COLUMNS) + 1:
            row, batch_rows = row[:-1], [(p, s) for p, s in row[-1]]
        (
            prediction_id, request_id, route, variant, model_name, configured_version,
            reported_version, assignment, routing_key, config_version, method, path,
            request_time, response_time, latency_ms, status, error, request_body,
            response_body, request_truncated, response_truncated, request_headers,
            response_headers, shadow, predicted, score, shadow_of, escaped, inference,
            first_byte_ms, streamed, served_model, prompt_tokens, completion_tokens,
            batch_of, batch_size,
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
_ADDED_COLUMN_DEFAULTS: tuple[Any, ...] = (None, 0, None, None, None, None, None)


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


def parse_json_object(body: bytes, content_type: str | None) -> dict[str, Any] | None:
    """The body as a JSON object when it is one; ``None`` for anything else, never an error."""
    if not body or content_type is None or "json" not in content_type:
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def resolve_pointer(doc: Any, pointer: str) -> Any:
    """RFC 6901 JSON pointer lookup; ``None`` when the path does not exist."""
    return _resolve_tokens(doc, _pointer_tokens(pointer))


def _resolve_tokens(doc: Any, tokens: Pointer) -> Any:
    for key, index in tokens:
        if isinstance(doc, dict):
            doc = doc.get(key)
        elif isinstance(doc, list) and index is not None and index < len(doc):
            doc = doc[index]
        else:
            return None
    return doc


def _rows_read(doc: dict[str, Any], tokens: Pointer) -> int:
    """How many rows a pointer reads in ``doc``: 1 for an answer of one row, 0 when it
    cannot tell (its output or list is missing); see :meth:`AnswerReader.rows`."""
    if len(tokens) == 4 and tokens[0][0] == "outputs" and tokens[2][0] == "data":
        outputs = doc.get("outputs")
        which = tokens[1][1]
        if not isinstance(outputs, list) or which is None or which >= len(outputs):
            return 0
        output = outputs[which]
        shape = output.get("shape") if isinstance(output, dict) else None
        if not isinstance(shape, list) or not shape:
            return 0
        n = shape[0]
        if n == 1:
            return 1  # the usual answer: decided at once
    found = _batch_of(doc, tokens)
    return 0 if found is None else found[1]


#: the most a compressed answer is decompressed to, to be read (a small answer can unpack
#: to gigabytes: past this it is not read)
MAX_DECOMPRESSED_BYTES = 8 * 1024 * 1024
_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}


def decompressed(body: bytes, encoding: str) -> bytes | None:
    """A gzip or deflate body decompressed, when it is whole and unpacks to at most
    :data:`MAX_DECOMPRESSED_BYTES`; None otherwise (or for another encoding)."""
    wbits = _WBITS.get(encoding.strip().lower())
    if wbits is None:
        return None
    try:
        inflater = zlib.decompressobj(wbits)
        out = inflater.decompress(body, MAX_DECOMPRESSED_BYTES)
        if inflater.unconsumed_tail or not inflater.eof:
            return None  # too large unpacked, or not whole
    except zlib.error:
        if wbits != 15:
            return None
        try:  # "deflate" as some servers send it: raw, without zlib's header
            inflater = zlib.decompressobj(-15)
            out = inflater.decompress(body, MAX_DECOMPRESSED_BYTES)
            if inflater.unconsumed_tail or not inflater.eof:
                return None
        except zlib.error:
            return None
    return out


def _batch_of(doc: dict[str, Any], tokens: Pointer) -> tuple[int, int, int] | None:
    """(position, rows, stride) of the batch a pointer reads in ``doc``: which of its tokens
    moves from row to row, how many rows, and by how much; None for an answer of one row (see
    :meth:`AnswerReader.rows`)."""
    if len(tokens) == 4 and tokens[0][0] == "outputs" and tokens[2][0] == "data":
        within, which = tokens[3][1], tokens[1][1]
        outputs = doc.get("outputs")
        if within is None or which is None or not isinstance(outputs, list):
            return None
        output = outputs[which] if which < len(outputs) else None
        if not isinstance(output, dict):
            return None
        shape, data = output.get("shape"), output.get("data")
        if not (isinstance(shape, list) and shape and isinstance(data, list)):
            return None
        n = shape[0]
        if not isinstance(n, int) or isinstance(n, bool) or n <= 1 or len(data) % n:
            return None
        stride = len(data) // n
        return (3, n, stride) if within < stride else None
    for position, (_, index) in enumerate(tokens):
        if index == 0:
            parent = _resolve_tokens(doc, tokens[:position])
            if isinstance(parent, list) and len(parent) > 1:
                return position, len(parent), 1
            return None
    return None


def _row_pointer(doc: dict[str, Any], tokens: Pointer, row: int, rows: int) -> Pointer | None:
    """``tokens`` moved to row ``row`` of a batch of ``rows``; None when it reads no batch
    of that many rows."""
    found = _batch_of(doc, tokens)
    if found is None or found[1] != rows:
        return tokens if row == 0 else None
    position, _, stride = found
    index = row * stride + (tokens[position][1] or 0)
    return (*tokens[:position], (str(index), index), *tokens[position + 1 :])


@functools.lru_cache(maxsize=256)
def _pointer_tokens(pointer: str) -> Pointer:
    # Pointers come from the configuration, so each is split once rather than per call
    # (the hot path holds its own already split, in AnswerReader).
    if pointer == "":
        return ()
    tokens = (t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/"))
    return tuple((t, int(t) if t.isdigit() else None) for t in tokens)


_DEFAULT_PREDICTION_POINTERS = ("/outputs/0/data/0", "/predictions/0")


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


class AnswerReader:
    """What the gateway reads from one route's answers: the served model version (a header,
    then a JSON pointer into the body) and, for a route that evaluates, the prediction and
    its score.

    Built once per route and (re)load from the route's configuration. Every attribute read
    on a pydantic model goes through its ``__getattr__`` hook, which costs more than all
    the reading itself; here the hot path reads plain fields, and pointers arrive split.
    """

    def __init__(self, config: RouteConfig) -> None:
        source = config.version
        self.version_header = source.header
        self.version_pointer = None if source.pointer is None else _pointer_tokens(source.pointer)
        evaluation = config.evaluation
        self.evaluates = evaluation is not None
        self.score_pointer: Pointer | None = None
        self.prediction_pointers: tuple[Pointer, ...] = ()
        #: a binary task without a predicted label: positive when score >= threshold
        self.by_threshold = False
        self.threshold = 0.5
        self.positive: str | None = None
        self.negative = ""
        if evaluation is not None:
            if evaluation.score is not None:
                self.score_pointer = _pointer_tokens(evaluation.score)
            # With a score and no prediction pointer, a binary label comes from the score
            # and the threshold only: the default pointers would read the first output,
            # which for predict_proba is the probability of class 0, not a label.
            if evaluation.prediction:
                pointers: tuple[str, ...] = (evaluation.prediction,)
            elif evaluation.score is not None:
                pointers = ()
            else:
                pointers = _DEFAULT_PREDICTION_POINTERS
            self.prediction_pointers = tuple(_pointer_tokens(p) for p in pointers)
            self.by_threshold = evaluation.task == "binary"
            self.threshold = evaluation.threshold
            self.positive = canonical_label(evaluation.positive_label)
            self.negative = "0" if self.positive == "1" else f"not {self.positive}"
        self.reads_body = self.version_pointer is not None or self.evaluates
        self.max_batch_rows = evaluation.max_batch_rows if evaluation is not None else 1
        #: the pointers that may read a batch, in the order that says how many rows it has
        self._batch_pointers = tuple(
            p for p in (*self.prediction_pointers, self.score_pointer) if p is not None
        )

    def document(
        self,
        body: bytes,
        content_type: str | None,
        headers: Mapping[str, str],
        whole: bool,
        encoding: str | None = None,
    ) -> dict[str, Any] | None:
        """The answer as a JSON object, when this route reads anything from the body and it
        is ``whole`` (not cut short); else None. A gzip or deflate answer is read decompressed
        (up to :data:`MAX_DECOMPRESSED_BYTES`; the client gets it as it came). A V2 answer
        with binary tensors (not JSON, with ``Inference-Header-Content-Length``) is its JSON
        part with the tensors' values in their ``data``. ``headers`` looks names up
        case-insensitively."""
        if not whole or not self.reads_body:
            return None
        if encoding is not None:
            decoded = decompressed(body, encoding)
            if decoded is None:
                return None
            body = decoded
        if content_type is not None and "json" in content_type:
            return parse_json_object(body, content_type)
        header_length = headers.get(HEADER_LENGTH)
        if (
            header_length is not None
            and 0 < len(header_length) <= 10
            and header_length.isascii()
            and header_length.isdigit()
        ):
            return read_binary_body(body, int(header_length))
        return None

    def version(self, headers: Mapping[str, str], doc: dict[str, Any] | None) -> str | None:
        """The model version the server says it served: a header first, then the body.

        ``headers`` must look names up case-insensitively (aiohttp's response headers do).
        """
        if self.version_header is not None:
            value = headers.get(self.version_header)
            if value:
                # aiohttp keeps a header's bytes that are not UTF-8 as surrogates, which
                # neither a store nor a metric label can hold: those bytes become \xNN
                return value if value.isascii() else bytes_as_text(value)
        if doc is not None and self.version_pointer is not None:
            found = _resolve_tokens(doc, self.version_pointer)
            if isinstance(found, (str, int, float)) and not isinstance(found, bool):
                return str(found)
        return None

    def prediction(self, doc: dict[str, Any] | None) -> tuple[str | None, float | None]:
        """(prediction as canonical text, score) from a parsed answer; ``None`` where absent."""
        if doc is None or not self.evaluates:
            return None, None
        return self._read(doc, self.prediction_pointers, self.score_pointer)

    def rows(
        self, doc: dict[str, Any] | None
    ) -> tuple[int, list[tuple[str | None, float | None]]] | None:
        """How many rows a batch answer holds, and (prediction, score) of each up to
        ``max_batch_rows``; None for an answer of one row.

        A pointer reads a batch in a V2 output (``/outputs/K/data/J``) whose ``shape`` starts
        with N > 1: element ``J`` of each of the N rows of its flattened data; elsewhere,
        where its first index 0 picks the first of a list of N > 1 (``/predictions/0``). The
        route's prediction pointer (else its score pointer) says how many rows there are.
        """
        if doc is None or not self.evaluates:
            return None
        n = 0
        for tokens in self._batch_pointers:
            n = _rows_read(doc, tokens)
            if n:  # the first pointer that can tell says how many rows
                break
        if n <= 1:
            return None
        rows = []
        for row in range(min(n, self.max_batch_rows)):
            predicted = tuple(
                moved
                for tokens in self.prediction_pointers
                if (moved := _row_pointer(doc, tokens, row, n)) is not None
            )
            score = (
                None
                if self.score_pointer is None
                else _row_pointer(doc, self.score_pointer, row, n)
            )
            rows.append(self._read(doc, predicted, score))
        return n, rows

    def _read(
        self, doc: dict[str, Any], predictions: tuple[Pointer, ...], score_pointer: Pointer | None
    ) -> tuple[str | None, float | None]:
        score = None
        if score_pointer is not None:
            raw = _resolve_tokens(doc, score_pointer)
            if isinstance(raw, (int, float)) and not isinstance(raw, bool) and math.isfinite(raw):
                score = float(raw)
        predicted = None
        for tokens in predictions:
            predicted = canonical_label(_resolve_tokens(doc, tokens))
            if predicted is not None:
                break
        if predicted is None and score is not None and self.by_threshold:
            predicted = self.positive if score >= self.threshold else self.negative
        return predicted, score
