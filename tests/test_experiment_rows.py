"""Which requests are the experiment: inference calls whose variant the weights chose.

Forced requests (``X-Model-Variant``), requests a connect retry moved to another variant,
and readiness or metadata calls are logged and counted as requests, but take no part in the
variants' quality, the comparisons or the split; each record says which it is
(``assignment``: random, sticky, forced, fallback; ``inference``), and so does the export.
"""

from __future__ import annotations

import csv
from pathlib import Path

import httpx
import pytest

from model_gateway.cli import main

from .conftest import GatewayFactory, Upstream, dead_url, route, wait_until
from .test_feedback import EVALUATION, features


def test_forced_and_metadata_calls_stay_out_of_the_quality_figures(
    gateway: GatewayFactory,
    upstreams: dict[str, Upstream],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """40 requests split at random, 10 forced to b and labelled against their prediction,
    and 10 readiness and metadata calls: b's figures are those of its random requests alone
    (accuracy 1.0, as every random label agrees), the forced and GET calls are excluded from
    the split, and the records and the export say why."""
    gw = gateway(
        [
            route(
                "fraud",
                "/v2/models/fraud",
                [("a", upstreams["a"].url, 1), ("b", upstreams["b"].url, 1)],
                evaluation=EVALUATION,
                allow_override=True,
            )
        ],
        server={"config_poll_interval": 0},
    )
    labels = []
    with httpx.Client(base_url=gw.url) as client:
        for i in range(50):
            forced = {"X-Model-Variant": "b"} if i >= 40 else {}
            r = client.post("/v2/models/fraud/infer", json=features(i), headers=forced)
            predicted = r.json()["outputs"][1]["data"][0]
            # the random ones labelled as predicted, the forced ones against it
            label = predicted if i < 40 else 1 - predicted
            labels.append({"prediction_id": r.headers["x-prediction-id"], "label": label})
        for path in ("/v2/models/fraud", "/v2/models/fraud/ready") * 5:
            assert client.get(path).status_code == 200
        wait_until(lambda: len(gw.records()) == 60, "every record written")
        assert client.post("/feedback", json=labels).json()["accepted"] == 50
        wait_until(
            lambda: (
                client.get(f"/admin/predictions/{labels[-1]['prediction_id']}").json()["label"]
                is not None
            ),
            "the labels joined",
        )
        report = client.get("/admin/report", params={"route": "fraud"}).json()
    records = gw.records()
    kinds = sorted((r["method"], r["assignment"], r["inference"]) for r in records)
    assert kinds.count(("POST", "forced", 1)) == 10
    assert kinds.count(("GET", "random", 0)) == 10
    assert kinds.count(("POST", "random", 1)) == 40
    random_b = [r for r in records if r["variant"] == "b" and r["assignment"] == "random"]
    random_b = [r for r in random_b if r["inference"]]
    b = report["variants"]["b"]
    assert b["labelled"] == len(random_b)
    assert b["accuracy"]["value"] == 1.0
    assert b["requests"] == len([r for r in records if r["variant"] == "b"])  # all calls
    split = report["sample_ratio"]
    assert split["excluded"] == 20
    assert sum(split["observed"].values()) == 40
    gw.stop()
    out = tmp_path / "export.csv"
    window = ["--since", "2000-01-01T00:00:00Z", "--until", "2100-01-01T00:00:00Z"]
    command = ["export", "--config", str(gw.config_path), "--route", "fraud", *window]
    assert main([*command, "--format", "csv", "--out", str(out)]) == 0
    exported = list(csv.DictReader(out.read_text().splitlines()))
    assert sorted((e["assignment"], e["inference"]) for e in exported) == sorted(
        (r["assignment"], str(bool(r["inference"]))) for r in records
    )


def test_a_request_a_connect_retry_moved_is_recorded_as_a_fallback(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """Half the weight on a variant that refuses connections: the requests drawn for it are
    answered by the other after a retry, recorded ``fallback`` under the variant that
    answered, and kept out of the split."""
    gw = gateway(
        [
            route(
                "fraud",
                "/v2/models/fraud",
                [("d", dead_url(), 1), ("a", upstreams["a"].url, 1)],
                connect_retries=1,
                health={"passive_failures": 0},
            )
        ],
        server={"config_poll_interval": 0},
    )
    with httpx.Client(base_url=gw.url) as client:
        for i in range(40):
            assert client.post("/v2/models/fraud/infer", json=features(i)).status_code == 200
        wait_until(lambda: len(gw.records()) == 40, "every record written")
        split = client.get("/admin/report", params={"route": "fraud"}).json()["sample_ratio"]
    records = gw.records()
    fallbacks = [r for r in records if r["assignment"] == "fallback"]
    assert fallbacks and all(r["variant"] == "a" for r in fallbacks)
    assert {r["assignment"] for r in records} == {"random", "fallback"}
    assert split["excluded"] == len(fallbacks)
    assert split["observed"].get("d", 0) == 0
