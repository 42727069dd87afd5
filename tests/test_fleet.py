"""Fleet mode: two real gateway processes on one PostgreSQL share one log, one feedback join
and one configuration history."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from model_gateway.cli import main

from .conftest import Upstream, wait_until
from .test_processes import INFER, GatewayProcess
from .test_store import POSTGRES, drop_schema

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_two_replicas_share_log_feedback_history_and_reports(
    tmp_path: Path, upstreams: dict[str, Upstream], capsys: object
) -> None:
    """1. `model-gateway migrate`, then two `serve` processes with one config on one schema.
    2. Sticky keys land on the same variant through either replica.
    3. Feedback posted to replica 2 joins predictions logged by replica 1, and vice versa.
    4. /admin/routing?at= answers the same on both; the report counts both replicas' traffic.
    """
    schema = f"mg_fleet_{uuid.uuid4().hex[:12]}"
    config = tmp_path / "fleet.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"config_poll_interval": 0},
                "storage": {"url": f"{POSTGRES}?schema={schema}"},
                "routes": [
                    {
                        "name": "fraud",
                        "path": "/v2/models/fraud",
                        "routing_key": "X-User-Id",
                        "evaluation": {"task": "binary", "prediction": "/outputs/1/data/0"},
                        "variants": [
                            {
                                "name": "a",
                                "url": upstreams["a"].url,
                                "model_version": "1",
                                "weight": 1,
                            },
                            {
                                "name": "b",
                                "url": upstreams["b"].url,
                                "model_version": "2",
                                "weight": 1,
                            },
                        ],
                    }
                ],
            }
        )
    )
    assert main(["migrate", "--config", str(config)]) == 0
    one, two = GatewayProcess(config), GatewayProcess(config)
    try:
        by_replica: dict[str, list[httpx.Response]] = {one.url: [], two.url: []}
        for i in range(40):
            for gw in (one, two):
                r = httpx.post(
                    f"{gw.url}/v2/models/fraud/infer",
                    json=INFER,
                    headers={"X-User-Id": f"user-{i}"},
                )
                assert r.status_code == 200
                by_replica[gw.url].append(r)
        for r1, r2 in zip(by_replica[one.url], by_replica[two.url], strict=True):
            assert r1.headers["x-model-variant"] == r2.headers["x-model-variant"]  # sticky agrees

        # labels for replica 1's predictions go to replica 2, and the other way round
        for target, source in ((two, one), (one, two)):
            items = [
                {"prediction_id": r.headers["x-prediction-id"], "label": 1}
                for r in by_replica[source.url]
            ]
            answer = httpx.post(f"{target.url}/feedback", json=items).json()
            assert answer["accepted"] == 40
            last = f"{target.url}/admin/predictions/{items[-1]['prediction_id']}"
            # joined at once if the prediction is stored, else by the joiner within a second
            wait_until(lambda url=last: httpx.get(url).json().get("label") == "1", "the join")

        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 1))
        routing = [
            httpx.get(f"{gw.url}/admin/routing", params={"at": now}).json() for gw in (one, two)
        ]
        assert routing[0]["config_version"] == routing[1]["config_version"]
        assert routing[0]["routes"] == routing[1]["routes"]

        report = httpx.get(f"{one.url}/admin/report").json()
        assert sum(v["requests"] for v in report["variants"].values()) == 80
        assert sum(v["labelled"] for v in report["variants"].values()) == 80
    finally:
        one.terminate_and_wait()
        two.terminate_and_wait()
        drop_schema(schema)
