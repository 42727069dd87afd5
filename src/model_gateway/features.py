"""The monitored features of a request: the few configured values read from its body, for the
log to keep beside the prediction (docs/monitoring.md).

This is all the proxy does for monitoring: each feature is a list of values, one per row of
the request (a V2 tensor of N rows, or the items a ``*`` pointer walks), written to the
record as compact JSON. Statistics are computed later, off the request path (drift.py).
A value that is absent, or not of the feature's kind, is ``None``: a missing value, which is
a statistic of its own. A body that cannot be read has every feature missing.
"""

from __future__ import annotations

from typing import Any

import orjson

from .config import MonitoringConfig
from .tensors import HEADER_LENGTH, read_binary_body

#: a request's rows read for monitoring, at most (a bigger batch counts its first rows)
MAX_FEATURE_ROWS = 1000
_ANY = "*"
#: a category's text is kept to this many characters
MAX_CATEGORY_CHARS = 128
_HEADER_LENGTH = HEADER_LENGTH.encode()


class _Feature:
    __slots__ = ("categorical", "column", "input", "name", "tokens")

    def __init__(
        self,
        name: str,
        categorical: bool,
        tokens: tuple[tuple[str, int], ...] | None,
        input_name: str | None,
        column: int,
    ) -> None:
        self.name = name
        self.categorical = categorical
        #: the pointer's tokens, each with its value as a list index (-1: not one)
        self.tokens = tokens
        self.input = input_name
        #: the column of an [N, k] input (an input of one column: 0)
        self.column = column


def _tokens(pointer: str) -> tuple[tuple[str, int], ...]:
    parts = (t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/"))
    return tuple((t, int(t) if t.isascii() and t.isdigit() else -1) for t in parts)


class FeatureReader:
    """Reads a route's monitored features from request bodies."""

    def __init__(self, monitoring: MonitoringConfig) -> None:
        self._features = [
            _Feature(
                f.name,
                f.kind == "categorical",
                None if f.pointer is None else _tokens(f.pointer),
                f.input,
                0 if f.column is None else f.column,
            )
            for f in monitoring.features
        ]

    def read(self, body: bytes, binary_header: int) -> str | None:
        """The features of a request with ``body`` as JSON text ({name: [value per row]});
        ``binary_header`` is the length of a binary tensor body's JSON part (0: all JSON).
        None when the route monitors no feature."""
        if not self._features:
            return None
        doc = _document(body, binary_header)
        found: dict[str, list[Any]] = {}
        for feature in self._features:
            if doc is None:
                values: list[Any] = [None]
            elif feature.tokens is not None:
                values = _walk(doc, feature.tokens, 0)
            else:
                values = _column(doc, feature.input, feature.column)
            if len(values) > MAX_FEATURE_ROWS:
                values = values[:MAX_FEATURE_ROWS]
            found[feature.name] = _of_kind(values, feature.categorical)
        try:
            return orjson.dumps(found).decode()
        except orjson.JSONEncodeError:  # text no JSON can hold (an unpaired surrogate)
            return orjson.dumps({name: [None] for name in found}).decode()


def binary_header_length(headers: list[tuple[bytes, bytes]]) -> int:
    """The JSON part's length of a binary tensor request, from its headers; 0 for JSON."""
    for name, value in headers:
        if len(name) == len(_HEADER_LENGTH) and name.lower() == _HEADER_LENGTH:
            try:
                return max(int(value), 0)
            except ValueError:
                return 0
    return 0


def _document(body: bytes, binary_header: int) -> Any:
    if binary_header > 0:
        return read_binary_body(body, binary_header)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _walk(doc: Any, tokens: tuple[tuple[str, int], ...], start: int) -> list[Any]:
    """The values ``tokens`` (from ``start``) point at: one, or one per item a ``*`` walks."""
    for i in range(start, len(tokens)):
        key, index = tokens[i]
        if key == _ANY and isinstance(doc, list):
            rows: list[Any] = []
            for item in doc[:MAX_FEATURE_ROWS]:
                rows += _walk(item, tokens, i + 1)
                if len(rows) >= MAX_FEATURE_ROWS:
                    break
            return rows
        if isinstance(doc, dict):
            doc = doc.get(key)
        elif isinstance(doc, list) and 0 <= index < len(doc):
            doc = doc[index]
        else:
            return [None]
    return [doc]


def _column(doc: Any, name: str | None, column: int) -> list[Any]:
    """Column ``column`` of the V2 input ``name`` (its data flat or nested), a value per row,
    of its first MAX_FEATURE_ROWS rows."""
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(inputs, list):
        return [None]
    for tensor in inputs:
        if isinstance(tensor, dict) and tensor.get("name") == name:
            break
    else:
        return [None]
    data = tensor.get("data")
    shape = tensor.get("shape")
    if not isinstance(data, list) or not data:
        return [None]
    if isinstance(data[0], list):  # nested: a list per row
        return [
            row[column] if isinstance(row, list) and column < len(row) else None
            for row in data[:MAX_FEATURE_ROWS]
        ]
    width = 1
    if isinstance(shape, list) and len(shape) >= 2 and isinstance(shape[-1], int):
        width = max(shape[-1], 1)
    if column >= width:
        return [None]
    return data[column : column + width * MAX_FEATURE_ROWS : width]


def category_text(value: Any) -> str | None:
    """A category's one spelling, the same from a request and from a training file: text as
    it is (cut to MAX_CATEGORY_CHARS), a bool as ``true`` or ``false``, a whole number without
    a fraction (pandas writes ``1.0`` for ``1`` in a column with blanks); None for what is
    no category."""
    if isinstance(value, str):
        return value[:MAX_CATEGORY_CHARS]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)[:MAX_CATEGORY_CHARS] if -(10**40) < value < 10**40 else None
    if isinstance(value, float):
        if not -1e300 < value < 1e300:
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def number(value: Any) -> float | None:
    """A numeric feature's value: a finite number (a bool is 0 or 1); None for what is not."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)) and -1e300 < value < 1e300:
        return float(value)
    return None


def _of_kind(values: list[Any], categorical: bool) -> list[Any]:
    """Each value as its feature's kind (:func:`category_text`, :func:`number`)."""
    if categorical:
        return [category_text(value) for value in values]
    return [number(value) for value in values]
