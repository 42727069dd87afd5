"""Every proxied request yields exactly one record in the store, shutdown included."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections import Counter
from pathlib import Path

import httpx
import pytest

from model_gateway.config import parse_config

from .conftest import GatewayFactory, Upstream, route, wait_until

# starts servers or processes, or simulates: not in make test-fast
pytestmark = pytest.mark.slow

INFER = {
    "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]
}


async def fire(url: str, n: int, concurrency: int = 32, **kwargs: object) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> httpx.Response:
            async with sem:
                return await client.post(
                    url,
                    json=INFER,
                    headers={"X-Request-Id": f"req-{i}", "X-User-Id": f"user-{i % 50}"},
                )

        return await asyncio.gather(*(one(i) for i in range(n)))


@pytest.mark.anyio
async def test_n_requests_make_exactly_n_records(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """1. A gateway splits 70/30 over two real upstreams.
    2. 400 concurrent requests go through it.
    3. It is stopped gracefully.
    4. The store holds exactly 400 records, one per prediction id the clients got, each with
       the variant and version the client was told.
    """
    gw = gateway(
        [
            route(
                "fraud",
                "/v2/models/fraud",
                [("a", upstreams["a"].url, 70), ("b", upstreams["b"].url, 30)],
                model_name="fraud",
            )
        ],
        storage={"batch_size": 37, "queue_size": 64},
    )
    responses = await fire(f"{gw.url}/v2/models/fraud/infer", 400)
    assert all(r.status_code == 200 for r in responses)
    await asyncio.to_thread(gw.stop)

    records = {r["prediction_id"]: r for r in gw.records()}
    assert len(records) == 400
    for response in responses:
        record = records[response.headers["x-prediction-id"]]
        assert record["variant"] == response.headers["x-model-variant"]
        assert record["reported_version"] == response.headers["x-model-version"]
        assert record["configured_version"] == {"a": "1", "b": "2"}[record["variant"]]
        assert record["model_name"] == "fraud"
        assert record["status"] == 200
    assert sorted(r["request_id"] for r in records.values()) == sorted(
        f"req-{i}" for i in range(400)
    )
    split = Counter(r["variant"] for r in records.values())
    assert 220 <= split["a"] <= 340  # 70 % of 400 = 280, sd ≈ 9


def test_record_fields(gateway: GatewayFactory, upstreams: dict[str, Upstream]) -> None:
    gw = gateway(
        [
            route(
                "fraud",
                "/v2/models/fraud",
                [("a", upstreams["a"].url, 1), ("b", upstreams["b"].url, 1)],
                routing_key="X-User-Id",
                hash_routing_key=True,
                capture={"bodies": True, "max_bytes": 40},
            )
        ]
    )
    r = httpx.post(
        f"{gw.url}/v2/models/fraud/infer",
        json=INFER,
        headers={"X-Request-Id": "abc-1", "X-User-Id": "alice"},
    )
    assert r.status_code == 200
    gw.stop()
    (record,) = gw.records()
    assert record["prediction_id"] == r.headers["x-prediction-id"]
    assert record["request_id"] == "abc-1"
    assert record["route"] == "fraud"
    assert record["model_name"] == "fraud"  # read from the V2 path
    assert record["assignment"] == "sticky"
    assert record["routing_key"] == hashlib.sha256(b"alice").hexdigest()[:32]
    assert record["config_version"] == gw.app.loaded.version
    assert record["method"] == "POST"
    assert record["path"] == "/v2/models/fraud/infer"
    assert record["request_time"] < record["response_time"]
    # latency is recorded, and is the span between the two timestamps
    assert record["latency_ms"] == pytest.approx(
        (record["response_time"] - record["request_time"]) * 1000, abs=1e-3
    )
    assert record["request_body"] == httpx.Request("POST", "http://x", json=INFER).content[:40]
    assert record["request_truncated"] == 1
    assert record["response_body"] == r.content[:40]
    assert record["response_truncated"] == 1
    # the configuration that routed it is kept
    db = sqlite3.connect(gw.db_path)
    (stored,) = db.execute("SELECT version, text FROM configs").fetchall()
    db.close()
    assert parse_config(stored[1]).version == stored[0] == record["config_version"]


@pytest.mark.parametrize("key_header", ["X-Request-Id", "X-Model-Variant", "X-Forwarded-For"])
def test_routing_key_may_be_a_header_the_gateway_reads_for_itself(
    gateway: GatewayFactory, upstreams: dict[str, Upstream], key_header: str
) -> None:
    """1. A route is keyed by a header the gateway also reads for its own use: the client's
       request id, the variant asked for (overrides are off), or a front proxy's address chain.
    2. Twenty keys are each sent twice.
    3. Each key lands on one variant both times, and both variants get keys.
    4. Every record is a sticky assignment holding its key.
    """
    gw = gateway(
        [
            route(
                "fraud",
                "/v2/models/fraud",
                [("a", upstreams["a"].url, 1), ("b", upstreams["b"].url, 1)],
                routing_key=key_header,
            )
        ]
    )
    variants_by_key: dict[str, set[str]] = {}
    for i in range(20):
        key = f"10.0.0.{i}"
        for _ in range(2):
            r = httpx.post(f"{gw.url}/v2/models/fraud/infer", json=INFER, headers={key_header: key})
            assert r.status_code == 200
            variants_by_key.setdefault(key, set()).add(r.headers["x-model-variant"])
    assert all(len(variants) == 1 for variants in variants_by_key.values())
    # 20 keys over 50/50 weights all on one variant: a chance of 2 in a million
    assert set().union(*variants_by_key.values()) == {"a", "b"}
    gw.stop()
    records = gw.records()
    assert {r["assignment"] for r in records} == {"sticky"}
    assert sorted(r["routing_key"] for r in records) == sorted(2 * list(variants_by_key))


def test_bodies_not_captured_unless_configured(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = gateway([route("fraud", "/v2/models/fraud", [("a", upstreams["a"].url, 1)])])
    httpx.post(f"{gw.url}/v2/models/fraud/infer", json=INFER)
    gw.stop()
    (record,) = gw.records()
    assert record["request_body"] is None and record["response_body"] is None


def test_errors_are_logged_too(gateway: GatewayFactory, upstreams: dict[str, Upstream]) -> None:
    gw = gateway(
        [
            route(
                "r", "/echo", [("a", upstreams["a"].url, 1)], max_body_bytes=10, allow_override=True
            )
        ]
    )
    assert httpx.post(f"{gw.url}/echo/x", content=b"x" * 11).status_code == 413
    assert httpx.get(f"{gw.url}/echo/x", headers={"X-Model-Variant": "zzz"}).status_code == 404
    gw.stop()
    (record,) = gw.records()  # the unknown variant was never routed: no record
    assert record["status"] == 413 and record["error"].startswith("payload_too_large")


def test_admin_prediction_lookup(gateway: GatewayFactory, upstreams: dict[str, Upstream]) -> None:
    gw = gateway([route("fraud", "/v2/models/fraud", [("a", upstreams["a"].url, 1)])])
    r = httpx.post(f"{gw.url}/v2/models/fraud/infer", json=INFER)
    pid = r.headers["x-prediction-id"]
    wait_until(  # written within the writer's next batch
        lambda: httpx.get(f"{gw.url}/admin/predictions/{pid}").status_code == 200,
        "the record written",
    )
    found = httpx.get(f"{gw.url}/admin/predictions/{pid}")
    assert found.status_code == 200
    assert found.json()["variant"] == "a"
    assert httpx.get(f"{gw.url}/admin/predictions/nope").status_code == 404


def test_admin_requires_token_when_configured(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = gateway(
        [route("fraud", "/v2/models/fraud", [("a", upstreams["a"].url, 1)])], admin={"token": "t0k"}
    )
    assert httpx.get(f"{gw.url}/admin/predictions/x").status_code == 401
    assert (
        httpx.get(
            f"{gw.url}/admin/predictions/x", headers={"Authorization": "Bearer bad"}
        ).status_code
        == 401
    )
    assert (
        httpx.get(
            f"{gw.url}/admin/predictions/x", headers={"Authorization": "Bearer t0k"}
        ).status_code
        == 404
    )
    # the proxied path never asks for the gateway's token
    assert httpx.post(f"{gw.url}/v2/models/fraud/infer", json=INFER).status_code == 200


def test_schema_newer_than_the_gateway_is_refused(
    tmp_path: Path, upstreams: dict[str, Upstream]
) -> None:
    from model_gateway.store.schema import LATEST_VERSION, SchemaTooNewError
    from model_gateway.store.sqlite import SQLiteStore

    db = tmp_path / "future.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (?)", (LATEST_VERSION + 1,))
    conn.commit()
    conn.close()

    async def open_it() -> None:
        store = SQLiteStore(str(db))
        try:
            await store.open()
        finally:
            await store.close()

    with pytest.raises(SchemaTooNewError, match="upgrade model-gateway"):
        asyncio.run(open_it())
