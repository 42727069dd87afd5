"""What an OpenAI-style answer says of itself: the model that served it, and the tokens used.

A whole answer (chat completion, completion, embeddings) carries ``model`` and ``usage``
(``prompt_tokens``, ``completion_tokens``). A streamed one carries ``model`` in every chunk
and, when the request asked for ``stream_options.include_usage``, ``usage`` in a last chunk
of its own before ``data: [DONE]``: the stream's tail, kept as it passes, is read for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

#: how much of a stream's end is kept to find its last events in
STREAM_TAIL_BYTES = 8192
#: a token count past this is not one (and would not fit a store's integer)
_MAX_TOKENS = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Usage:
    served_model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


NO_USAGE = Usage(None, None, None)


def usage_of(doc: dict[str, Any]) -> Usage:
    """The served model and token usage of a whole answer (NO_USAGE for one that reports no
    usage: an OpenAI-style answer always does, so other kinds cost one lookup)."""
    usage = doc.get("usage")
    if not isinstance(usage, dict):
        return NO_USAGE
    model = doc.get("model")
    return Usage(
        model if isinstance(model, str) else None,
        _count(usage.get("prompt_tokens")),
        _count(usage.get("completion_tokens")),
    )


def stream_usage(tail: bytes) -> Usage:
    """The served model and usage of a streamed answer from its last events: the usage of
    the last event that has one, the model of the last event that names one."""
    model: str | None = None
    for event in reversed(tail.replace(b"\r\n", b"\n").split(b"\n\n")):
        data = event.strip()
        if not data.startswith(b"data:"):
            continue
        try:
            doc = orjson.loads(data[5:])
        except orjson.JSONDecodeError:
            continue  # [DONE], or an event cut at the tail's start
        if not isinstance(doc, dict):
            continue
        found = usage_of(doc)
        named = doc.get("model")
        model = model or found.served_model or (named if isinstance(named, str) else None)
        if found.prompt_tokens is not None or found.completion_tokens is not None:
            return Usage(model, found.prompt_tokens, found.completion_tokens)
        if model is not None:
            # the events before the last one with a model carry no later usage
            return Usage(model, None, None)
    return Usage(model, None, None)


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_TOKENS:
        return value
    return None
