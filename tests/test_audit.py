"""The audit trail: schema upgrades, full records by id, secrets kept out, nothing lost."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_gateway.store.schema import LATEST_VERSION, MIGRATIONS
from model_gateway.store.sqlite import SQLiteStore

from .conftest import GatewayFactory, RunningGateway, Upstream, route, wait_until

INFER = {
    "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]
}


def test_older_database_is_upgraded_in_place(tmp_path: Path) -> None:
    """1. A database at schema version 1 holds one record.
    2. Opening it migrates it to the latest version.
    3. The record is still there, with the new columns at their defaults.
    """
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for statement in MIGRATIONS[0]:
        db.execute(statement.format(blob="BLOB"))
    db.execute("INSERT INTO schema_version VALUES (1)")
    db.execute(
        "INSERT INTO predictions (prediction_id, route, variant, configured_version, assignment,"
        " config_version, method, path, request_time, response_time, latency_ms, status)"
        " VALUES ('p1', 'r', 'a', '1', 'random', 'c', 'POST', '/p', 1, 2, 1000, 200)"
    )
    db.commit()
    db.close()

    async def upgrade() -> tuple[int, dict | None]:
        store = SQLiteStore(str(path))
        await store.open()
        try:
            return await store.schema_version(), await store.get_prediction("p1")
        finally:
            await store.close()

    version, record = asyncio.run(upgrade())
    assert version == LATEST_VERSION == len(MIGRATIONS)
    assert record is not None and record["shadow"] == 0 and record["request_headers"] is None
    assert record["predicted"] is None and record["score"] is None
    # opening again is a no-op
    assert asyncio.run(upgrade())[0] == LATEST_VERSION


def wait_for_record(gw: RunningGateway, prediction_id: str, **kwargs: object) -> httpx.Response:
    def found() -> httpx.Response | None:
        answer = httpx.get(f"{gw.url}/admin/predictions/{prediction_id}", **kwargs)  # type: ignore[arg-type]
        return answer if answer.status_code != 404 else None

    wait_until(found, f"{prediction_id} to become queryable")
    answer = found()
    assert answer is not None
    return answer


def test_full_record_by_prediction_id(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = gateway(
        [
            route(
                "fraud",
                "/v2/models/fraud",
                [("a", upstreams["a"].url, 1)],
                capture={"bodies": True, "headers": True},
            )
        ]
    )
    r = httpx.post(f"{gw.url}/v2/models/fraud/infer", json=INFER, headers={"X-Request-Id": "r-9"})
    record = wait_for_record(gw, r.headers["x-prediction-id"]).json()
    assert record["prediction_id"] == r.headers["x-prediction-id"]
    assert record["request_id"] == "r-9"
    assert record["variant"] == "a" and record["configured_version"] == "1"
    assert record["reported_version"] == "1"
    assert record["config_version"] == gw.app.loaded.version
    assert record["request_time"].endswith("Z") and "T" in record["request_time"]
    assert record["request_body"] == httpx.Request("POST", "http://x", json=INFER).content.decode()
    assert record["response_body"] == r.text
    assert record["request_headers"]["x-request-id"] == "r-9"
    assert record["response_headers"]["x-model-variant"] == "a"
    assert record["shadow"] is False
    assert httpx.get(f"{gw.url}/admin/predictions/unknown-id").status_code == 404


SECRETS = ("SECRET-AUTH-1a2b", "SECRET-COOKIE-3c4d", "SECRET-APIKEY-5e6f", "SECRET-SSN-7a8b")


def test_secrets_never_reach_the_database(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """1. A route captures headers and bodies, redacting X-Api-Key and the JSON field "ssn".
    2. A request carries Authorization, Cookie, X-Api-Key and an ssn in its body.
    3. After a graceful stop, no byte of the database files holds any of those secrets,
       while the rest of the request is kept.
    """
    gw = gateway(
        [
            route(
                "fraud",
                "/v2/models/fraud",
                [("a", upstreams["a"].url, 1)],
                capture={
                    "bodies": True,
                    "headers": True,
                    "redact_headers": ["X-Api-Key"],
                    "redact_fields": ["ssn"],
                },
            )
        ],
        admin={"token": "SECRET-ADMIN-9c0d"},
    )
    body = {**INFER, "parameters": {"customer": {"ssn": SECRETS[3], "segment": "retail"}}}
    r = httpx.post(
        f"{gw.url}/v2/models/fraud/infer",
        json=body,
        headers={
            "Authorization": f"Bearer {SECRETS[0]}",
            "Cookie": f"sid={SECRETS[1]}",
            "X-Api-Key": SECRETS[2],
        },
    )
    assert r.status_code == 200
    gw.stop()
    raw = b"".join(p.read_bytes() for p in gw.db_path.parent.glob(gw.db_path.name + "*"))
    for secret in (*SECRETS, "SECRET-ADMIN-9c0d"):
        assert secret.encode() not in raw, secret
    (record,) = gw.records()
    assert b'"segment":"retail"' in record["request_body"]
    assert b'"ssn":"[REDACTED]"' in record["request_body"]
    assert '"authorization":"[REDACTED]"' in record["request_headers"]
    assert '"x-api-key":"[REDACTED]"' in record["request_headers"]


def test_admin_token_from_the_environment(
    gateway: GatewayFactory, upstreams: dict[str, Upstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_GATEWAY_ADMIN_TOKEN", "from-env")
    gw = gateway([route("fraud", "/v2/models/fraud", [("a", upstreams["a"].url, 1)])])
    every = ("/admin/routing", "/admin/predictions/x", "/admin/report", "/admin/dead-letters",
             "/admin/experiments", "/admin/experiments/x")  # fmt: skip
    for path in every:
        assert httpx.get(f"{gw.url}{path}").status_code == 401, path
    assert httpx.post(f"{gw.url}/admin/reload").status_code == 401
    ok = {"Authorization": "Bearer from-env"}
    assert httpx.get(f"{gw.url}/admin/routing", headers=ok).status_code == 200
    assert httpx.post(f"{gw.url}/admin/reload", headers=ok).status_code == 200


def test_the_control_planes_own_404_and_405_are_json_errors(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """A control path with no endpoint, or a method its endpoint does not take, gets the
    gateway's JSON error (not the framework's plain text), with ``Allow`` on a 405."""
    gw = gateway([route("fraud", "/v2/models/fraud", [("a", upstreams["a"].url, 1)])])
    cases = [
        ("GET", "/admin/nope", 404, "not_found", "no endpoint /admin/nope", None),
        ("GET", "/admin/predictions/", 404, "not_found", "no endpoint /admin/predictions/", None),
        ("GET", "/metrics/x", 404, "not_found", "no endpoint /metrics/x", None),
        ("PUT", "/admin/routing", 405, "method_not_allowed", None, {"GET", "HEAD"}),
        (
            "GET",
            "/feedback",
            405,
            "method_not_allowed",
            "GET is not allowed on /feedback",
            {"POST"},
        ),
    ]
    for method, path, status, code, message, allow in cases:
        answer = httpx.request(method, f"{gw.url}{path}")
        assert answer.status_code == status, path
        assert answer.headers["content-type"] == "application/json"
        error = answer.json()["error"]
        assert error["code"] == code
        assert message is None or error["message"] == message
        allowed = answer.headers.get("allow")
        # the router lists the methods in no fixed order
        assert (None if allowed is None else set(allowed.split(", "))) == allow


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    n=st.integers(1, 60),
    concurrency=st.integers(1, 16),
    stop_after=st.integers(0, 60),
    slow=st.lists(st.booleans(), min_size=1, max_size=10),
)
@pytest.mark.slow
def test_every_response_received_has_exactly_one_record(
    gateway: GatewayFactory,
    upstreams: dict[str, Upstream],
    n: int,
    concurrency: int,
    stop_after: int,
    slow: list[bool],
) -> None:
    """For any mix of fast and slow requests and a graceful stop at any point among them:
    each response the client received (from a route) has exactly one record."""
    gw = gateway(
        [
            route(
                "fraud",
                "/v2/models/fraud",
                [("a", upstreams["a"].url, 1), ("b", upstreams["b"].url, 1)],
            ),
            route("slow", "/slow", [("a", upstreams["a"].url, 1)]),
        ]
    )

    async def scenario() -> list[httpx.Response]:
        received: list[httpx.Response] = []
        sent = 0
        stopper: asyncio.Future[None] | None = None
        async with httpx.AsyncClient(
            timeout=20, limits=httpx.Limits(max_connections=concurrency)
        ) as client:
            sem = asyncio.Semaphore(concurrency)

            async def one(i: int) -> None:
                nonlocal sent, stopper
                async with sem:
                    sent += 1
                    if sent > stop_after and stopper is None:
                        stopper = asyncio.ensure_future(asyncio.to_thread(gw.stop))
                    try:
                        if slow[i % len(slow)]:
                            r = await client.get(f"{gw.url}/slow?seconds=0.05")
                        else:
                            r = await client.post(f"{gw.url}/v2/models/fraud/infer", json=INFER)
                    except httpx.TransportError:
                        return  # refused or closed by the stopping server: no response, no record
                    received.append(r)

            await asyncio.gather(*(one(i) for i in range(n)))
        if stopper is not None:
            await stopper
        return received

    received = asyncio.run(scenario())
    gw.stop()
    ids = [rec["prediction_id"] for rec in gw.records()]
    assert len(ids) == len(set(ids)), "duplicate records"
    for r in received:
        assert ids.count(r.headers["x-prediction-id"]) == 1
    assert len(ids) == len(received)
