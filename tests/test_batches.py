"""A batch request is one request, and each of its rows a prediction of its own: logged,
labelled and reported row by row, counted once in the split."""

from __future__ import annotations

import csv
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from model_gateway.cli import main
from model_gateway.records import PredictionRecord

from .conftest import GatewayFactory, Upstream, route, wait_until
from .test_feedback import EVALUATION
from .test_store import record

ROWS = np.array(
    [[0.1, 0.2, 0.1, 1.0], [3.0, 2.0, 3.0, 0.0], [1.2, 0.4, 2.0, 0.1], [2.5, 1.0, 2.8, 0.0],
     [0.0, 0.0, 0.0, 0.0]],
    dtype=np.float32,
)  # fmt: skip


def test_each_row_of_a_v2_batch_is_a_prediction_of_its_own(
    gateway: GatewayFactory, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    """tritonclient sends 5 rows in one tensor (binary). The log holds the request's record
    (``batch_size`` 5, no prediction of its own) and one per row, ``<id>/<row>`` and
    ``<request id>/<row>``, each with its row's prediction and score; labels by either id
    reach the row; the report counts 1 request and 5 labelled predictions, and the export has
    the rows. Before, the request was one record and only row 0 was evaluated."""
    gw = gateway(
        [
            route(
                "fraud",
                "/v2/models/fraud",
                [("a", upstreams["a"].url, 1)],
                evaluation=EVALUATION,
                shadows=[{"name": "c", "url": upstreams["b"].url, "model_version": "2"}],
            )
        ]
    )
    client = triton.InferenceServerClient(url=gw.url.removeprefix("http://"))
    features = triton.InferInput("features", list(ROWS.shape), "FP32")
    features.set_data_from_numpy(ROWS)
    result = client.infer("fraud", [features], request_id="batch-1")
    client.close()
    scores, labels = result.as_numpy("score"), result.as_numpy("label")
    wait_until(lambda: len(gw.records()) == 12, "the request, its 5 rows, and the shadow's 6")
    live = {r["prediction_id"]: r for r in gw.records() if not r["shadow"]}
    (request,) = [r for r in live.values() if r["batch_of"] is None]
    assert request["batch_size"] == 5 and request["predicted"] is None
    request_id = request["prediction_id"]
    for row in range(5):
        found = live[f"{request_id}/{row}"]
        assert found["batch_of"] == request_id and found["request_id"] == f"batch-1/{row}"
        assert found["predicted"] == str(labels[row])
        assert found["score"] == pytest.approx(float(scores[row]), abs=1e-6)
    copies = {r["prediction_id"]: r for r in gw.records() if r["shadow"]}
    assert sorted(r["shadow_of"] for r in copies.values() if r["batch_of"]) == [
        f"{request_id}/{row}" for row in range(5)
    ]

    labels_posted = [{"prediction_id": f"{request_id}/{row}", "label": row % 2} for row in (0, 1)]
    labels_posted += [{"request_id": f"batch-1/{row}", "label": row % 2} for row in (2, 3, 4)]
    assert httpx.post(f"{gw.url}/feedback", json=labels_posted).json()["accepted"] == 5
    wait_until(
        lambda: httpx.get(f"{gw.url}/admin/predictions/{request_id}/4").json()["label"] == "0",
        "the labels joined",
    )
    report = httpx.get(f"{gw.url}/admin/report", params={"route": "fraud"}).json()
    variant = report["variants"]["a"]
    assert (variant["requests"], variant["labelled"]) == (1, 5)
    assert sum(report["sample_ratio"]["observed"].values()) == 1
    assert report["label_coverage"]["predictions"] == {"a": 5}
    shadow = report["shadows"]["c"]
    assert (shadow["requests"], shadow["labelled"], shadow["compared_with_live"]) == (1, 5, 5)
    gw.stop()

    out = tmp_path / "export.csv"
    main(["export", "--config", str(gw.config_path), "--route", "fraud", "--out", str(out)])
    with out.open() as f:
        exported = [r for r in csv.DictReader(f) if r["shadow"] == "False"]
    assert sorted(r["batch_of"] for r in exported) == [""] + [request_id] * 5
    assert {r["batch_size"] for r in exported} == {"5", ""}


def test_each_instance_of_a_v1_batch_is_a_prediction_of_its_own(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """KServe V1: 3 ``instances`` give 3 rows, read at ``/predictions/<row>``; one instance
    stays one record with its prediction."""
    gw = gateway(
        [
            route(
                "fraud",
                "/v1/models/fraud",
                [("a", upstreams["a"].url, 1)],
                evaluation={"task": "binary"},
            )
        ]
    )
    three = httpx.post(
        f"{gw.url}/v1/models/fraud:predict", json={"instances": ROWS[:3].tolist()}
    ).json()["predictions"]
    one = httpx.post(f"{gw.url}/v1/models/fraud:predict", json={"instances": ROWS[:1].tolist()})
    wait_until(lambda: len(gw.records()) == 5, "both requests and the 3 rows written")
    rows = {r["prediction_id"]: r for r in gw.records()}
    single = rows[one.headers["x-prediction-id"]]
    assert single["batch_size"] is None and single["predicted"] == str(one.json()["predictions"][0])
    (batch,) = [r for r in rows.values() if r["batch_size"] == 3]
    assert [rows[f"{batch['prediction_id']}/{i}"]["predicted"] for i in range(3)] == [
        str(p) for p in three
    ]


def test_a_batch_survives_the_spool() -> None:
    """Durability answered writes a record to the spool before its answer: a batch's rows go
    with it, and a record read back gives the same rows to the store."""
    batch = record(1)
    batch.batch_rows = [("1", 0.9), ("0", None), (None, 0.2)]
    batch.batch_size = 3
    back = PredictionRecord.from_row(batch.spool_row())
    assert back.as_rows() == batch.as_rows()
    assert len(batch.as_rows()) == 4
    single = record(2)
    assert PredictionRecord.from_row(single.spool_row()).as_rows() == single.as_rows()
    assert len(single.as_rows()) == 1


def test_labels_that_name_no_row_of_a_batch_are_refused_with_a_reason(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """A label for a batch request itself (by its prediction id, or by the request id a
    tritonclient user knows) counts nowhere: refused, naming the rows to label. A row the
    batch does not have is refused too, rather than waiting forever. A request id at its
    256-character limit still labels its rows (``<id>/<row>`` is longer)."""
    gw = gateway([route("fraud", "/v1/models/fraud", [("a", upstreams["a"].url, 1)],
                        evaluation={"task": "binary"})])  # fmt: skip
    long_id = "R" * 256
    answer = httpx.post(
        f"{gw.url}/v1/models/fraud:predict",
        json={"instances": ROWS[:3].tolist()},
        headers={"x-request-id": long_id},
    )
    request_id = answer.headers["x-prediction-id"]
    wait_until(lambda: len(gw.records()) == 4, "the request and its 3 rows written")
    items = [
        {"prediction_id": request_id, "label": 1},
        {"request_id": long_id, "label": 1},
        {"prediction_id": f"{request_id}/7", "label": 1},
        {"request_id": f"{long_id}/1", "label": 1},
    ]
    result = httpx.post(f"{gw.url}/feedback", json=items).json()
    assert result["accepted"] == 1 and result["waiting"] == 0
    reasons = {e["index"]: e["reason"] for e in result["errors"]}
    assert reasons[0].startswith("names a batch request of 3 rows: label its rows")
    assert reasons[1].startswith("names a batch request of 3 rows")
    assert reasons[2] == "names no logged row of a batch request of 3 rows"
