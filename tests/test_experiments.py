"""An experiment section: the champion named, not taken from the YAML order; its report since
its start, from the admin endpoint and the command line, on real processes."""

from __future__ import annotations

import copy
import random
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from model_gateway.config import parse_config
from model_gateway.errors import ConfigError
from model_gateway.experiments import DEFAULT_ALPHA, KEEP_RUNNING
from model_gateway.quality import build_report

from .conftest import GatewayFactory, Upstream, route, wait_until
from .test_feedback import EVALUATION, features
from .test_processes import GatewayProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EXPERIMENT = {
    "id": "fraud-v2",
    "start": "2026-01-01T00:00:00Z",
    "champion": "b",
    "primary_metric": "accuracy",
    "guardrails": ["error_ratio"],
    "minimum_detectable_effect": 0.1,
}


def config_doc(upstreams: dict[str, Upstream], experiment: dict[str, Any] | None) -> dict:
    doc = {
        "routes": [
            route(
                "fraud",
                "/v2/models/fraud",
                [("a", upstreams["a"].url, 1), ("b", upstreams["b"].url, 1)],
                evaluation=EVALUATION,
            )
        ]
    }
    if experiment is not None:
        doc["routes"][0]["experiment"] = experiment
    return doc


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"champion": "z"},
            "experiment.champion: 'z' is not a variant of this route (one of a, b)",
        ),
        (
            {"primary_metric": "macro_f1"},
            "experiment.primary_metric: 'macro_f1' is not a metric of a binary experiment",
        ),
        ({"guardrails": ["recall", "recall"]}, "experiment.guardrails: 'recall' is named twice"),
        ({"guardrails": ["accuracy"]}, "experiment.guardrails: 'accuracy' is named twice"),
        (
            {"minimum_detectable_effect": {"auc": 0.01}},
            "experiment.minimum_detectable_effect.auc: not the primary metric or a guardrail",
        ),
        ({"minimum_detectable_effect": 0}, "experiment.minimum_detectable_effect: must be a"),
        ({"start": "2026-01-01T00:00:00"}, "experiment.start: "),
        ({"alpha": 0.7}, "experiment.alpha: "),
        ({"id": "a b"}, "experiment.id: "),
    ],
)
def test_a_bad_experiment_section_is_named(
    upstreams: dict[str, Upstream], change: dict[str, Any], expected: str
) -> None:
    doc = config_doc(upstreams, {**EXPERIMENT, **change})
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(doc))
    assert any(expected in problem for problem in info.value.problems), info.value.problems


def test_an_experiment_needs_an_evaluation_and_a_unique_id(upstreams: dict[str, Upstream]) -> None:
    doc = config_doc(upstreams, EXPERIMENT)
    del doc["routes"][0]["evaluation"]
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(doc))
    assert info.value.problems == [
        "routes[0].experiment: needs the route's evaluation section (how a prediction is read)"
    ]
    doc = config_doc(upstreams, EXPERIMENT)
    doc["routes"].append({**copy.deepcopy(doc["routes"][0]), "name": "other", "path": "/other"})
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(doc))
    assert info.value.problems == [
        "routes[1].experiment.id: another route's experiment is 'fraud-v2'"
    ]


def rows(seed: int) -> list[dict[str, Any]]:
    """Labelled predictions of a (always right) and b (right 60 % of the time)."""
    rng = random.Random(seed)
    out = []
    for i in range(600):
        variant = "a" if i % 2 else "b"
        right = variant == "a" or rng.random() < 0.6
        predicted = str(rng.randrange(2))
        out.append(
            {
                "variant": variant,
                "model_version": {"a": "1", "b": "2"}[variant],
                "status": 200,
                "latency_ms": 1.0,
                "label": predicted if right else str(1 - int(predicted)),
                "predicted": predicted,
                "score": None,
                "assignment": "random",
                "inference": True,
                "config_version": "c",
            }
        )
    return out


def test_the_yaml_order_of_the_variants_does_not_change_the_verdict(
    upstreams: dict[str, Upstream],
) -> None:
    """With the champion named, the report is the same whichever variant is written first;
    before, the first variant was the champion, and swapping them swapped the verdict."""
    doc = config_doc(upstreams, EXPERIMENT)
    swapped = copy.deepcopy(doc)
    swapped["routes"][0]["variants"].reverse()
    reports = []
    for d in (doc, swapped):
        route_config = parse_config(yaml.safe_dump(d)).config.routes[0]
        reports.append(build_report(rows(1), route_config, 0.0, 1.0, {}))
    first, second = reports
    assert first["comparisons"] == second["comparisons"]
    (comparison,) = first["comparisons"]
    assert (comparison["champion"], comparison["challenger"]) == ("b", "a")
    assert comparison["decision"] == "challenger_better"
    assert first["experiment"]["champion_named"]


def test_a_route_without_an_experiment_takes_its_first_variant_and_says_so(
    upstreams: dict[str, Upstream],
) -> None:
    route_config = parse_config(yaml.safe_dump(config_doc(upstreams, None))).config.routes[0]
    report = build_report(rows(1), route_config, 0.0, 1.0, {})
    assert report["champion"] == "a"
    experiment = report["experiment"]
    assert not experiment["champion_named"] and "first variant" in experiment["note"]
    assert experiment["alpha"] == DEFAULT_ALPHA
    (comparison,) = report["comparisons"]
    assert comparison["decision"] == "challenger_worse"  # b, against a
    metrics = {m["metric"]: m for m in comparison["sequential"]}
    assert set(metrics) == {"f1", "precision", "recall", "accuracy", "auc", "error_ratio"}
    assert metrics["f1"]["role"] == "primary"
    assert all(m["minimum_detectable_effect"] == 0.02 for m in metrics.values())
    assert comparison["fixed_horizon"]  # today's figures, kept and named as what they are


def write_config(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_an_experiment_from_start_to_decision_on_real_processes(
    tmp_path: Path, upstreams: dict[str, Upstream]
) -> None:
    """The gateway as a process: 40 requests before the experiment; a reload adds the
    experiment, starting now, with b the champion though written second; 400 requests, each
    labelled (a always right, b right 60 % of the time). ``GET /admin/experiments/fraud-v2``
    counts only the 400, and decides that a is better; ``model-gateway report --experiment``
    says the same from the store; swapping the variants in the YAML (a reload) changes
    nothing of the verdict."""
    db = tmp_path / "log.db"
    doc = {**config_doc(upstreams, None), "storage": {"url": f"sqlite:///{db}"}}
    config = write_config(tmp_path, doc)
    gw = GatewayProcess(config)
    rng = random.Random(4)
    try:
        with httpx.Client(base_url=gw.url, timeout=30) as client:
            for i in range(40):
                assert client.post("/v2/models/fraud/infer", json=features(i)).status_code == 200
            wait_until(lambda: count(db) == 40, "the first 40 records written")
            start = time.time()
            experiment = {**EXPERIMENT, "start": datetime.fromtimestamp(start, UTC).isoformat()}
            doc["routes"][0]["experiment"] = experiment
            write_config(tmp_path, doc)
            assert client.post("/admin/reload").json()["status"] == "reloaded"
            labels = []
            for i in range(400):
                r = client.post("/v2/models/fraud/infer", json=features(i))
                predicted = orjson.loads(r.content)["outputs"][1]["data"][0]
                right = r.headers["x-model-variant"] == "a" or rng.random() < 0.6
                labels.append(
                    {
                        "prediction_id": r.headers["x-prediction-id"],
                        "label": predicted if right else 1 - predicted,
                    }
                )
            wait_until(lambda: count(db) == 440, "every record written")
            assert client.post("/feedback", json=labels).json()["accepted"] == 400
            last = labels[-1]["prediction_id"]
            wait_until(
                lambda: client.get(f"/admin/predictions/{last}").json()["label"] is not None,
                "the labels joined",
            )
            listed = client.get("/admin/experiments").json()["experiments"]
            assert [(e["id"], e["route"], e["champion"]) for e in listed] == [
                ("fraud-v2", "fraud", "b")
            ]
            assert client.get("/admin/experiments/nope").status_code == 404
            report = client.get("/admin/experiments/fraud-v2").json()
            assert sum(arm["requests"] for arm in report["arms"]) == 400
            assert report["experiment"]["id"] == "fraud-v2"
            assert report["experiment"]["champion_named"]
            (comparison,) = report["comparisons"]
            assert (comparison["champion"], comparison["challenger"]) == ("b", "a")
            assert comparison["decision"] == "challenger_better"
            primary = comparison["sequential"][0]
            assert (primary["metric"], primary["decision"]) == ("accuracy", "challenger_better")
            assert primary["adjusted_p_value"] <= 0.05 and primary["samples_needed"] == 0
            (guardrail,) = comparison["sequential"][1:]
            assert guardrail["metric"] == "error_ratio"
            assert guardrail["decision"] in (KEEP_RUNNING, "no_difference")

            doc["routes"][0]["variants"].reverse()
            write_config(tmp_path, doc)
            assert client.post("/admin/reload").json()["status"] == "reloaded"
            again = client.get("/admin/experiments/fraud-v2", params={"until": report["until"]})
            assert again.json()["comparisons"] == report["comparisons"]
    finally:
        gw.terminate_and_wait()
    assert "Traceback" not in "".join(gw.lines)
    command = [sys.executable, "-m", "model_gateway", "report", "--config", str(config)]
    shown = subprocess.run(
        [*command, "--experiment", "fraud-v2", "--until", report["until"]],
        capture_output=True,
        text=True,
        check=True,
    )
    assert orjson.loads(shown.stdout)["comparisons"] == report["comparisons"]
    wrong = subprocess.run([*command, "--experiment", "nope"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "--experiment: one of fraud-v2" in wrong.stderr


def count(db: Path) -> int:
    import sqlite3

    try:
        conn = sqlite3.connect(db)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return 0


def test_a_gateway_reports_decisions_for_a_route_without_an_experiment(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """``/admin/report?route=`` of a route with no experiment section: its first variant is
    the champion, said so, and the comparison has a decision (too few labels: keep running,
    with the samples still needed)."""
    gw = gateway(config_doc(upstreams, None)["routes"])
    with httpx.Client(base_url=gw.url) as client:
        labels = []
        for i in range(20):
            r = client.post("/v2/models/fraud/infer", json=features(i))
            labels.append({"prediction_id": r.headers["x-prediction-id"], "label": i % 2})
        wait_until(lambda: len(gw.records()) == 20, "every record written")
        client.post("/feedback", json=labels)
        last = labels[-1]["prediction_id"]
        wait_until(
            lambda: client.get(f"/admin/predictions/{last}").json()["label"] is not None,
            "the labels joined",
        )
        report = client.get("/admin/report", params={"route": "fraud"}).json()
    assert report["experiment"]["id"] is None and "first variant" in report["experiment"]["note"]
    (comparison,) = report["comparisons"]
    assert comparison["decision"] == KEEP_RUNNING
    primary = comparison["sequential"][0]
    assert primary["metric"] == "f1" and primary["samples_needed"] > 0
