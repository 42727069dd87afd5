"""A variant redeployed with another model under the same name is two arms, not one."""

from __future__ import annotations

import sqlite3

import httpx
import yaml

from .conftest import GatewayFactory, Upstream, route, running, wait_until
from .test_feedback import EVALUATION, features
from .upstreams import UpstreamControl, create_upstream


def test_each_served_version_of_a_variant_is_its_own_arm(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """b serves version 2, then is pointed (a reload) at a server of version 3 under the same
    name. The report's arms are a@1, b@2 and b@3, with the counts of a GROUP BY variant,
    model version of the log, and each of b's versions is compared with a@1 on its own."""
    with running(create_upstream("c", "3", UpstreamControl())) as third:
        gw = gateway(
            [
                route(
                    "fraud",
                    "/v2/models/fraud",
                    [("a", upstreams["a"].url, 1), ("b", upstreams["b"].url, 1)],
                    evaluation=EVALUATION,
                )
            ],
            server={"config_poll_interval": 0},
        )
        labels = []
        with httpx.Client(base_url=gw.url) as client:
            for i in range(80):
                if i == 40:
                    doc = yaml.safe_load(gw.config_path.read_text())
                    doc["routes"][0]["variants"][1]["url"] = third.url
                    doc["routes"][0]["variants"][1]["model_version"] = "3"
                    gw.config_path.write_text(yaml.safe_dump(doc))
                    assert client.post("/admin/reload").json()["status"] == "reloaded"
                r = client.post("/v2/models/fraud/infer", json=features(i))
                labels.append({"prediction_id": r.headers["x-prediction-id"], "label": i % 2})
            wait_until(lambda: len(gw.records()) == 80, "every record written")
            assert client.post("/feedback", json=labels).json()["accepted"] == 80
            last = labels[-1]["prediction_id"]
            wait_until(
                lambda: client.get(f"/admin/predictions/{last}").json()["label"] is not None,
                "the labels joined",
            )
            report = client.get("/admin/report", params={"route": "fraud"}).json()
        gw.stop()
    db = sqlite3.connect(gw.db_path)
    grouped = {
        (variant, version): count
        for variant, version, count in db.execute(
            "SELECT variant, COALESCE(reported_version, configured_version), COUNT(*) "
            "FROM predictions GROUP BY 1, 2"
        )
    }
    db.close()
    arms = {(arm["variant"], arm["model_version"]): arm for arm in report["arms"]}
    assert set(arms) == {("a", "1"), ("b", "2"), ("b", "3")}
    assert {key: arm["requests"] for key, arm in arms.items()} == grouped
    assert all(arm["labelled"] == arm["requests"] for arm in arms.values())
    compared = {(c["challenger"], c["challenger_version"]) for c in report["comparisons"]}
    assert compared == {("b", "2"), ("b", "3")}
    assert {c["champion_version"] for c in report["comparisons"]} == {"1"}
    assert report["variants"]["b"]["model_versions"] == ["2", "3"]
