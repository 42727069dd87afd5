"""Reading what a model server answers, whatever it answers: binary header lengths, numbers
past Python's limits, compressed bodies, and batches past their bound."""

from __future__ import annotations

import gzip
import zlib

import httpx
import pytest
from starlette.middleware.gzip import GZipMiddleware

from model_gateway.answers import MAX_DECOMPRESSED_BYTES, decompressed
from model_gateway.demo import create_model_server
from model_gateway.metrics import Metrics
from model_gateway.records import canonical_label
from model_gateway.store.writer import RecordWriter

from .conftest import GatewayFactory, Upstream, route, running, wait_until
from .test_feedback import EVALUATION
from .test_records import answers_for
from .test_store import record

V2 = {"outputs": [{"name": "score", "shape": [1], "data": [0.7]}]}


@pytest.mark.parametrize("length", ["²", "٣", "9" * 5000, "-1", "0x10", ""])
def test_a_binary_header_length_that_is_no_length_reads_nothing(length: str) -> None:
    """Before, '²' passed ``isdigit`` and failed ``int``, and 5,000 digits failed ``int`` too:
    the gateway answered 500 to a valid answer, and a shadow's record was lost."""
    answers = answers_for({"task": "binary", "score": "/outputs/0/data/0"})
    headers = {"inference-header-content-length": length}
    assert answers.document(b"\x00\x01", "application/octet-stream", headers, True) is None


def test_numbers_past_pythons_limit_are_text_or_no_label() -> None:
    """Python refuses to read or write an int past 4,300 digits: such a label is kept as text
    (and refused on a binary route with a reason), never a 500."""
    assert canonical_label("9" * 5000) == "9" * 5000
    assert canonical_label(" -" + "1" * 5000) == "-" + "1" * 5000
    assert canonical_label(10**5000) is None


def test_a_feedback_label_of_5000_digits_is_refused_with_a_reason(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = gateway([route("fraud", "/v2/models/fraud", [("a", upstreams["a"].url, 1)],
                        evaluation=EVALUATION)])  # fmt: skip
    r = httpx.post(f"{gw.url}/v2/models/fraud/infer", json={"inputs": [
        {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})  # fmt: skip
    wait_until(lambda: len(gw.records()) == 1, "the record written")
    answer = httpx.post(
        f"{gw.url}/feedback",
        json={"prediction_id": r.headers["x-prediction-id"], "label": "9" * 5000},
    )
    assert answer.status_code == 422
    assert "binary" in answer.json()["errors"][0]["reason"]


def test_compressed_answers_are_read_decompressed() -> None:
    doc = b'{"outputs": [{"data": [0.7]}]}'
    assert decompressed(gzip.compress(doc), "gzip") == doc
    assert decompressed(zlib.compress(doc), "deflate") == doc
    raw = zlib.compressobj(wbits=-15)
    assert decompressed(raw.compress(doc) + raw.flush(), "deflate") == doc
    assert decompressed(gzip.compress(doc)[:-4], "gzip") is None  # not whole
    assert decompressed(doc, "gzip") is None
    assert decompressed(gzip.compress(doc), "br") is None
    bomb = gzip.compress(b"\x00" * (MAX_DECOMPRESSED_BYTES + 1))
    assert len(bomb) < 64 * 1024 and decompressed(bomb, "gzip") is None


def test_a_gzip_answer_keeps_its_prediction_and_request_id(
    gateway: GatewayFactory,
) -> None:
    """A model server that compresses its answers (tritonclient asks for it with
    ``response_compression_algorithm``): the client gets the answer as it came, and the log
    still has the prediction, the score and the V2 id. Before, all three were lost."""
    compressing = GZipMiddleware(create_model_server("fraud", "1"), minimum_size=0)
    with running(compressing) as server:
        gw = gateway([route("fraud", "/v2/models/fraud", [("a", server.url, 1)],
                            evaluation=EVALUATION)])  # fmt: skip
        body = {"id": "gz-1", "inputs": [
            {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [3, 2, 3, 0]}]}  # fmt: skip
        answer = httpx.post(
            f"{gw.url}/v2/models/fraud/infer", json=body, headers={"accept-encoding": "gzip"}
        )
        assert answer.headers["content-encoding"] == "gzip"
        wait_until(lambda: len(gw.records()) == 1, "the record written")
        gw.stop()
    (logged,) = gw.records()
    outputs = answer.json()["outputs"]
    assert logged["request_id"] == "gz-1"
    assert logged["score"] == pytest.approx(outputs[0]["data"][0])
    assert logged["predicted"] == str(outputs[1]["data"][0])


def test_a_batch_past_its_bound_logs_its_first_rows_and_counts_the_rest(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """``max_batch_rows: 3``: a V1 batch of 10 is the request's record (batch_size 10) and 3
    rows; the other 7 are counted. Before, any number of rows was kept in memory and
    logged (400,000 rows took the gateway from 133 MB to 820 MB)."""
    gw = gateway([route("fraud", "/v1/models/fraud", [("a", upstreams["a"].url, 1)],
                        evaluation={"task": "binary", "max_batch_rows": 3})])  # fmt: skip
    httpx.post(f"{gw.url}/v1/models/fraud:predict", json={"instances": [[1, 2, 3, 4]] * 10})
    wait_until(lambda: len(gw.records()) == 4, "the request and 3 rows written")
    (request,) = [r for r in gw.records() if r["batch_of"] is None]
    assert request["batch_size"] == 10
    wait_until(
        lambda: (
            'model_gateway_batch_rows_unlogged_total{route="fraud"} 7.0'
            in httpx.get(f"{gw.url}/metrics").text
        ),
        "the rows past the bound counted",
    )


def test_a_batchs_rows_count_against_the_logs_bound() -> None:
    """The writer's bound holds records and rows alike: a batch of 5 takes 6 places, queued
    and while the store writes it."""
    writer = RecordWriter(
        object(),  # type: ignore[arg-type]  # nothing is written here
        Metrics(),
        queue_size=100,
        batch_size=10,
        overflow="block",
        write_retries=0,
    )
    batch = record(1)
    batch.batch_rows, batch.batch_size = [("1", None)] * 5, 5
    assert writer.admit()
    writer.offer(batch, reserved=True)
    assert writer.in_memory == 6
    writer._take()
    assert writer.in_memory == 6
