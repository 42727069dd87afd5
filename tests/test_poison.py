"""Values no store can hold, from every side of the gateway, on both stores.

A NUL byte or an unpaired surrogate from a client's path, a model server's answer or a
feedback item must neither stop the log nor lose a record: what cannot be stored as it is
is written escaped and marked, a row the store still refuses is kept in ``dead_letters``
with its reason, and every record behind it is written. Each case prints its figures.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from model_gateway.metrics import Metrics
from model_gateway.store import Store
from model_gateway.store.writer import RecordWriter

from .conftest import GatewayFactory, running, wait_until
from .test_store import POSTGRES, drop_schema, record, with_store

INFER = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}

# A model server's answers, as raw JSON text: a version with a newline (a header may not
# hold it), a predicted label with NUL, a version with an unpaired surrogate escape.
POISONED_ANSWERS = {
    "newline-version": b'{"model_version": "1\\n", "outputs": [{"name": "label", "data": [1]}]}',
    "nul-label": b'{"model_version": "2", "outputs": [{"name": "label", "data": ["a\\u0000b"]}]}',
    "nul-version": b'{"model_version": "3\\u0000", "outputs": []}',
}


def poisoned_model() -> Starlette:
    async def answer(request: Request) -> Response:
        kind = request.path_params["kind"]
        return Response(POISONED_ANSWERS[kind], media_type="application/json")

    async def plain(request: Request) -> Response:
        return Response(b'{"model_version": "1", "outputs": []}', media_type="application/json")

    return Starlette(
        routes=[
            Route("/poison/{kind}", answer, methods=["POST"]),
            Route("/{rest:path}", plain, methods=["GET", "POST"]),
        ]
    )


@pytest.fixture(params=["sqlite", "postgres"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'poison.db'}"
        return
    schema = f"mg_poison_{int(time.time() * 1000) % 10**9}_{id(request) % 10**6}"
    yield f"{POSTGRES}?schema={schema}"
    drop_schema(schema)


def stored(url: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every prediction and every dead letter in the store at ``url``."""

    async def read(store: Store) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        rows = []
        async for batch in store.iter_export("poison", 0, time.time() + 3600):
            rows.extend(batch)
        return rows, await store.list_dead_letters(1000)

    result: tuple[list[dict[str, Any]], list[dict[str, Any]]] = asyncio.run(with_store(url, read))
    return result


def full_rows(url: str) -> list[dict[str, Any]]:
    async def read(store: Store) -> list[dict[str, Any]]:
        rows = []
        async for batch in store.iter_export("poison", 0, time.time() + 3600):
            for row in batch:
                got = await store.get_prediction(row["prediction_id"])
                assert got is not None
                rows.append(got)
        return rows

    result: list[dict[str, Any]] = asyncio.run(with_store(url, read))
    return result


def test_poison_from_the_client_and_the_model_server_is_logged_escaped_and_stops_nothing(
    gateway: GatewayFactory, storage_url: str
) -> None:
    """A NUL in the path (``%00``), control characters in a header, a body that is not
    UTF-8, and answers holding a newline or NUL in the version or the label: each request
    is answered and logged (escaped and marked where the store could not hold the text),
    and the clean requests sent after them are all logged too."""
    with running(poisoned_model()) as model:
        gw = gateway(
            [
                {
                    "name": "poison",
                    "path": "/",
                    "variants": [
                        {"name": "a", "url": model.url, "model_version": "1", "weight": 1}
                    ],
                    "capture": {"bodies": True, "headers": True},
                    "evaluation": {"task": "binary", "prediction": "/outputs/0/data/0"},
                }
            ],
            storage={"url": storage_url},
            server={"config_poll_interval": 0},
        )
        answers: dict[str, httpx.Response] = {}
        with httpx.Client(base_url=gw.url, timeout=30) as client:
            answers["path"] = client.post("/v2/models/fraud/%00", json=INFER)
            answers["surrogate-path"] = client.post("/v2/models/%ED%A0%80x", json=INFER)
            answers["header"] = client.post(
                "/v2/models/fraud/infer",
                json=INFER,
                headers={"X-Request-Id": b"id\xff\xfe", "X-Other": b"caf\xe9\t!"},
            )
            answers["body"] = client.post("/v2/models/fraud/infer", content=b"\x00\xff\xfe{")
            for kind in POISONED_ANSWERS:
                answers[kind] = client.post(f"/poison/{kind}", json=INFER)
            clean = [client.post("/v2/models/fraud/infer", json=INFER) for _ in range(20)]
        assert {k: a.status_code for k, a in answers.items()} == dict.fromkeys(answers, 200)
        assert all(a.status_code == 200 for a in clean)
        # the header a client reads says what the model server said, escaped
        assert answers["newline-version"].headers["x-model-version"] == "1\\x0a"
        assert answers["nul-version"].headers["x-model-version"] == "3\\x00"
        gw.stop()
    rows = full_rows(storage_url)
    written, letters = stored(storage_url)
    print(
        f"\n{storage_url.split(':')[0]}: answered {len(answers) + len(clean)}, "
        f"written {len(written)}, escaped {sum(r['escaped'] for r in rows)}, "
        f"dead-lettered {len(letters)}"
    )
    assert len(rows) == len(answers) + len(clean)
    assert letters == []
    by_path = {r["path"]: r for r in rows}
    assert by_path["/v2/models/fraud/\\x00"]["escaped"] == 1
    by_version = {r["reported_version"]: r for r in rows}
    assert by_version["1\n"]["escaped"] == 0  # a newline is text every store keeps
    assert by_version["3\\x00"]["escaped"] == 1
    assert by_version["2"]["predicted"] == "a\\x00b"
    assert by_version["2"]["escaped"] == 1
    assert sum(r["escaped"] for r in rows) == 3
    bodies = [bytes(r["request_body"]) for r in rows if r["request_body"] is not None]
    assert b"\x00\xff\xfe{" in bodies  # bytes are kept as they came


def test_a_row_the_store_refuses_is_dead_lettered_and_the_rest_of_its_batch_written(
    storage_url: str,
) -> None:
    """A batch of 101 records whose 51st holds an integer past 64 bits (refused by both
    stores for its value): the other 100 are written, the refused one is kept in
    ``dead_letters`` with the store's reason and the record as JSON, and nothing is retried
    forever."""
    batch = [record(i, route_name="poison", t=time.time()) for i in range(101)]
    batch[50].status = 2**70

    async def work(store: Store) -> Metrics:
        metrics = Metrics()
        writer = RecordWriter(
            store, metrics, queue_size=1000, batch_size=512, overflow="block", write_retries=None
        )
        writer.start()
        for item in batch:
            assert writer.offer(item)
        await writer.close()
        return metrics

    metrics = asyncio.run(with_store(storage_url, work))
    written, letters = stored(storage_url)
    dead = metrics.log_dead_lettered._value.get()
    print(f"\n{storage_url.split(':')[0]}: written {len(written)}, dead-lettered {int(dead)}")
    assert len(written) == 100
    assert batch[50].prediction_id not in {r["prediction_id"] for r in written}
    assert len(letters) == 1
    letter = letters[0]
    assert letter["prediction_id"] == batch[50].prediction_id
    assert letter["kind"] == "prediction"
    assert "range" in letter["error"].lower() or "overflow" in letter["error"].lower()
    kept = json.loads(letter["record"])
    assert kept["status"] == 2**70
    assert kept["request_id"] == batch[50].request_id
    assert dead == 1
    assert metrics.log_written._value.get() == 100
    assert metrics.log_write_errors._value.get() == 0


def test_feedback_with_nul_or_a_lone_surrogate_is_refused_item_by_item(
    gateway: GatewayFactory, storage_url: str
) -> None:
    """A label, a prediction id or a source holding NUL or an unpaired surrogate (written as a
    JSON escape, which orjson refuses and the standard library reads) is rejected with its
    reason; the valid items of the same body are kept."""
    with running(poisoned_model()) as model:
        gw = gateway(
            [
                {
                    "name": "poison",
                    "path": "/",
                    "variants": [
                        {"name": "a", "url": model.url, "model_version": "1", "weight": 1}
                    ],
                }
            ],
            storage={"url": storage_url},
            server={"config_poll_interval": 0},
        )
        ok = httpx.post(f"{gw.url}/v2/models/fraud/infer", json=INFER)
        pid = ok.headers["x-prediction-id"]
        body = (
            "["
            f'{{"prediction_id": "{pid}", "label": "a\\u0000b"}},'
            f'{{"prediction_id": "{pid}", "label": "\\ud800"}},'
            '{"prediction_id": "x\\u0000", "label": 1},'
            f'{{"prediction_id": "{pid}", "label": 1, "source": "s\\udfff"}},'
            f'{{"prediction_id": "{pid}", "label": 1}}'
            "]"
        ).encode()
        answer = httpx.post(
            f"{gw.url}/feedback", content=body, headers={"content-type": "application/json"}
        )
        assert answer.status_code == 200, answer.text
        result = answer.json()
        assert result["accepted"] == 1
        assert [e["index"] for e in result["errors"]] == [0, 1, 2, 3]
        assert all("NUL" in e["reason"] or "surrogate" in e["reason"] for e in result["errors"])

        def labels() -> list[str]:
            shown = httpx.get(f"{gw.url}/admin/predictions/{pid}").json()
            return [f["label"] for f in shown.get("feedback", [])]

        wait_until(lambda: labels() == ["1"], "the valid label joined to its prediction")


def test_dead_letters_are_shown_under_admin(gateway: GatewayFactory, tmp_path: Path) -> None:
    """``GET /admin/dead-letters`` lists what the store refused, latest first, its record as
    the JSON text kept."""
    url = f"sqlite:///{tmp_path / 'dl.db'}"
    poisoned = record(1, route_name="poison", t=time.time())
    poisoned.status = 2**70

    async def work(store: Store) -> None:
        writer = RecordWriter(
            store, Metrics(), queue_size=10, batch_size=10, overflow="block", write_retries=None
        )
        writer.start()
        writer.offer(poisoned)
        await writer.close()

    asyncio.run(with_store(url, work))
    gw = gateway(
        [
            {
                "name": "r",
                "path": "/",
                "variants": [{"name": "a", "url": "http://127.0.0.1:9", "model_version": "1"}],
            }
        ],
        storage={"url": url},
        server={"config_poll_interval": 0},
    )
    shown = httpx.get(f"{gw.url}/admin/dead-letters").json()["dead_letters"]
    assert [d["prediction_id"] for d in shown] == [poisoned.prediction_id]
    assert json.loads(shown[0]["record"])["status"] == 2**70
    assert httpx.get(f"{gw.url}/admin/dead-letters?limit=0").status_code == 400
