"""The monitored features of a request: the few configured values read from its body, for the
log to keep beside the prediction (docs/monitoring.md).

Each feature is its value, or a list of values, one per row of the request (a V2 tensor of
N rows, or the items a ``*`` pointer walks). A value that is absent, or not of the feature's
kind, is ``None``: a missing value, which is a statistic of its own. A body that cannot be
read has every feature missing.

The proxy reads nothing: a record carries its route's :data:`FeatureSpec`, the request's
body and the length of a binary body's JSON part, and the log reads the features when it
writes the record (:func:`~.records.features_text`): the SQLite log in its own process, off
the gateway's event loop; so this module, and the tensors module it reads binary bodies
with, need nothing but the standard library (orjson when it is there).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .tensors import HEADER_LENGTH, read_binary_body

try:  # the SQLite log's process runs with the standard library only (log_child.py)
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
    _dumps: Callable[[Any], bytes] | None = orjson.dumps
except ImportError:  # pragma: no cover - exercised by the log process
    _loads = json.loads
    _dumps = None

#: a route's monitored features, as the record carries them to the log: (name, categorical,
#: JSON pointer or None, V2 input or None, column) each
FeatureSpec = tuple[tuple[str, bool, str | None, str | None, int], ...]

#: a request's rows read for monitoring, at most (a bigger batch counts its first rows)
MAX_FEATURE_ROWS = 1000
_ANY = "*"
#: a category's text is kept to this many characters
MAX_CATEGORY_CHARS = 128
_HEADER_LENGTH = HEADER_LENGTH.encode()


class _Feature:
    __slots__ = ("categorical", "column", "input", "name", "tokens", "walks")

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
        #: the pointer has a ``*``: a value per item of a list
        self.walks = tokens is not None and any(key == _ANY for key, _ in tokens)
        self.input = input_name
        #: the column of an [N, k] input (an input of one column: 0)
        self.column = column


def _tokens(pointer: str) -> tuple[tuple[str, int], ...]:
    parts = (t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/"))
    return tuple((t, int(t) if t.isascii() and t.isdigit() else -1) for t in parts)


def features_text(features: Any) -> str | None:
    """A record's features as the store keeps them, read first if they are still to read
    (features.py): JSON text, NUL and control characters escaped (and an unpaired surrogate
    in a category), so that every store keeps it. The SQLite log's process calls this for
    each record it writes (log_child.py)."""
    if features is None or isinstance(features, str):
        return features
    if isinstance(features, (tuple, list)):  # to read (a spooled one comes back a list)
        spec, body, binary_header = features
        if not isinstance(spec, tuple):  # made a list on its way (JSON)
            spec = tuple(tuple(feature) for feature in spec)
        features = read_features(spec, body, binary_header)
    if _dumps is not None:
        try:
            return _dumps(features).decode()  # NUL and control characters escaped
        except TypeError:  # an unpaired surrogate: the standard library escapes it
            pass
    return json.dumps(features, separators=(",", ":"))


def feature_spec(monitoring: Any) -> FeatureSpec:
    """The spec of a route's ``monitoring`` section (config.MonitoringConfig)."""
    return tuple(
        (f.name, f.kind == "categorical", f.pointer, f.input, 0 if f.column is None else f.column)
        for f in monitoring.features
    )


def read_features(spec: FeatureSpec, body: bytes, binary_header: int) -> dict[str, Any]:
    """The features ``spec`` names of a request with ``body`` (see :meth:`FeatureReader.read`);
    each spec's reader is built once."""
    reader = _READERS.get(spec)
    if reader is None:
        reader = _READERS[spec] = FeatureReader(spec)
    return reader.read(body, binary_header) or {}


class FeatureReader:
    """Reads a route's monitored features from request bodies."""

    def __init__(self, spec: FeatureSpec) -> None:
        features = [
            _Feature(
                name,
                categorical,
                None if pointer is None else _tokens(pointer),
                input_name,
                column,
            )
            for name, categorical, pointer, input_name, column in spec
        ]
        self._names = [f.name for f in features]
        self._pointers = [f for f in features if f.tokens is not None]
        # the columns of each input together: its tensor is looked up once
        by_input: dict[str, list[_Feature]] = {}
        for feature in features:
            if feature.tokens is None:
                by_input.setdefault(feature.input or "", []).append(feature)
        self._inputs = list(by_input.items())

    def read(self, body: bytes, binary_header: int) -> dict[str, Any] | None:
        """The features of a request with ``body``: {name: value, or a list of values for a
        request of several rows}; ``binary_header`` is the length of a binary tensor body's
        JSON part (0: all JSON). None when the route monitors no feature."""
        if not self._names:
            return None
        doc = _document(body, binary_header)
        if doc is None:
            return dict.fromkeys(self._names)
        found: dict[str, Any] = {}
        for name, columns in self._inputs:
            tensor = _tensor(doc, name)
            if tensor is None:
                for feature in columns:
                    found[feature.name] = None
                continue
            data, width = tensor
            if len(data) == width and not isinstance(data[0], list):  # one row
                for feature in columns:
                    column = feature.column
                    value = data[column] if column < width else None
                    found[feature.name] = (
                        category_text(value) if feature.categorical else number(value)
                    )
            else:
                for feature in columns:
                    values = _column(data, width, feature.column)
                    found[feature.name] = _of_kind(values, feature.categorical)
        for feature in self._pointers:
            tokens = feature.tokens
            assert tokens is not None
            if feature.walks:
                found[feature.name] = _of_kind(_walk(doc, tokens, 0), feature.categorical)
            else:
                value = _resolve(doc, tokens)
                found[feature.name] = category_text(value) if feature.categorical else number(value)
        return found


def _resolve(doc: Any, tokens: tuple[tuple[str, int], ...]) -> Any:
    for key, index in tokens:
        if isinstance(doc, dict):
            doc = doc.get(key)
        elif isinstance(doc, list) and 0 <= index < len(doc):
            doc = doc[index]
        else:
            return None
    return doc


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
        return _loads(body)
    except (ValueError, RecursionError):  # orjson's and json's decode errors alike
        return None


#: each spec's reader (a route's, kept as long as the process: specs are few)
_READERS: dict[FeatureSpec, FeatureReader] = {}


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


def _tensor(doc: Any, name: str) -> tuple[list[Any], int] | None:
    """The data of the V2 input ``name`` and its row's width (1 for an input of one column),
    or None without one."""
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(inputs, list):
        return None
    for tensor in inputs:
        if isinstance(tensor, dict) and tensor.get("name") == name:
            data = tensor.get("data")
            if not isinstance(data, list) or not data:
                return None
            shape = tensor.get("shape")
            width = 1
            if isinstance(shape, list) and len(shape) >= 2 and isinstance(shape[-1], int):
                width = max(shape[-1], 1)
            return data, width
    return None


def _column(data: list[Any], width: int, column: int) -> list[Any]:
    """Column ``column`` of an input's data (flat or nested), a value per row, of its first
    MAX_FEATURE_ROWS rows."""
    if isinstance(data[0], list):  # nested: a list per row
        return [
            row[column] if isinstance(row, list) and column < len(row) else None
            for row in data[:MAX_FEATURE_ROWS]
        ]
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
