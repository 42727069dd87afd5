"""The binary tensor extension of the Open Inference Protocol (KServe V2, Triton).

A body may be a JSON header followed by raw tensor bytes: the ``Inference-Header-Content-
Length`` header gives the JSON part's length, and each tensor sent as bytes says how many in
``parameters.binary_data_size``, in the order the tensors are listed. tritonclient sends
inputs and asks for outputs this way by default. Values are little-endian; a BYTES element
is a 4-byte length followed by that many bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from typing import Any

try:  # the SQLite log's process reads features with the standard library only (log_child.py)
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - exercised by the log process
    _loads = json.loads

#: the header that gives the length of a binary body's JSON part
HEADER_LENGTH = "inference-header-content-length"

_FORMATS = {
    "BOOL": "?",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "FP16": "e",
    "FP32": "f",
    "FP64": "d",
}


def read_binary_body(body: bytes, header_length: int) -> dict[str, Any] | None:
    """The JSON part of a binary body, each binary tensor's values decoded into its
    ``data``; None for a body that does not hold what its header says."""
    if not 0 < header_length <= len(body):
        return None
    try:
        doc = _loads(body[:header_length])
    except (ValueError, RecursionError):  # orjson's and json's decode errors alike
        return None
    if not isinstance(doc, dict):
        return None
    offset = header_length
    for key in ("inputs", "outputs"):
        tensors = doc.get(key)
        if not isinstance(tensors, list):
            continue
        for tensor in tensors:
            parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
            size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
            if size is None:
                continue
            if not isinstance(size, int) or size < 0 or offset + size > len(body):
                return None
            values = decode(str(tensor.get("datatype")), body[offset : offset + size])
            if values is None:
                return None
            tensor["data"] = values
            offset += size
    return doc


def decode(datatype: str, raw: bytes) -> list[Any] | None:
    """A tensor's values from its bytes; None when they do not fit the datatype."""
    if datatype == "BYTES":
        values: list[Any] = []
        offset = 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                return None
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + length > len(raw):
                return None
            values.append(raw[offset : offset + length].decode("utf-8", "replace"))
            offset += length
        return values
    code = _FORMATS.get(datatype)
    if code is None:
        return None
    width = struct.calcsize(code)
    if len(raw) % width:
        return None
    return list(struct.unpack(f"<{len(raw) // width}{code}", raw))


def encode(datatype: str, values: Sequence[Any]) -> bytes:
    """A tensor's bytes from its values (flattened)."""
    if datatype == "BYTES":
        out = bytearray()
        for value in values:
            raw = value if isinstance(value, bytes) else str(value).encode()
            out += struct.pack("<I", len(raw)) + raw
        return bytes(out)
    return struct.pack(f"<{len(values)}{_FORMATS[datatype]}", *values)
