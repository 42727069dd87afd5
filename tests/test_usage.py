"""What an OpenAI-style answer says of its model and tokens, whatever a model server sends."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from model_gateway.records import COLUMNS, PredictionRecord
from model_gateway.usage import NO_USAGE, Usage, stream_usage, usage_of

from .test_store import record


def event(doc: Any) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def test_a_stream_gives_the_usage_of_its_last_events() -> None:
    chunks = [{"model": "m1", "choices": [{"delta": {"content": w}}]} for w in "abc"]
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    tail = b"".join(event(c) for c in chunks) + event({"model": "m1", "usage": usage})
    assert stream_usage(tail + b"data: [DONE]\n\n") == Usage("m1", 5, 3)
    # events written with CRLF, and a tail that begins inside an event
    crlf = (tail + b"data: [DONE]\n\n").replace(b"\n", b"\r\n")
    assert stream_usage(b'ens": 9}}\r\n\r\n' + crlf) == Usage("m1", 5, 3)
    # no usage asked for: the model only
    assert stream_usage(b"".join(event(c) for c in chunks)) == Usage("m1", None, None)
    assert stream_usage(b"data: [DONE]\n\n") == NO_USAGE


def test_counts_that_are_no_token_counts_are_left_out() -> None:
    for bad in (-1, 2**31, True, 1.5, "7", None):
        assert usage_of({"model": "m", "usage": {"prompt_tokens": bad}}).prompt_tokens is None
    assert usage_of({"model_name": "fraud", "outputs": []}) == NO_USAGE


json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["model", "usage", "prompt_tokens", "x"]), children)
    ),
    max_leaves=10,
)


@given(st.dictionaries(st.sampled_from(["model", "usage", "choices"]), json_value))
def test_any_answer_gives_a_usage_or_none(doc: dict[str, Any]) -> None:
    found = usage_of(doc)
    for count in (found.prompt_tokens, found.completion_tokens):
        assert count is None or 0 <= count < 2**31
    assert found.served_model is None or isinstance(found.served_model, str)


@given(st.binary(max_size=300), st.lists(json_value, max_size=4))
def test_any_stream_tail_gives_a_usage_or_none(noise: bytes, docs: list[Any]) -> None:
    # json, not orjson: integers past 64 bits and NaN, as a model server may write them
    tail = noise + b"".join(b"data: " + json.dumps(d).encode() + b"\n\n" for d in docs)
    found = stream_usage(tail)
    assert found.served_model is None or isinstance(found.served_model, str)


def test_a_spooled_row_of_the_release_before_is_replayed() -> None:
    """A spool written before streams and usage were recorded holds rows without those
    columns: they are read with the columns' defaults."""
    full = record(1).as_row()
    assert len(full) == len(COLUMNS)
    old = PredictionRecord.from_row(full[:29])
    assert old.as_row()[:29] == full[:29]
    assert (old.first_byte_ms, old.streamed, old.served_model) == (None, False, None)
