"""What the gateway reads from a model server's answer: the served version, the prediction
and its score (of each row of a batch), by JSON pointers from the route's configuration; the
answer decoded first when it is compressed or carries binary tensors.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Mapping
from typing import Any

import orjson

from .config import RouteConfig
from .records import bytes_as_text, canonical_label
from .tensors import HEADER_LENGTH, read_binary_body

#: a JSON pointer split into its tokens, each with its value as a list index (if it is one)
Pointer = tuple[tuple[str, int | None], ...]


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
    return tuple((t, int(t) if t.isascii() and t.isdigit() else None) for t in tokens)


_DEFAULT_PREDICTION_POINTERS = ("/outputs/0/data/0", "/predictions/0")


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
