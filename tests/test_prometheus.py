"""Prometheus: the exposition passes promtool, workers aggregate, rules and dashboard hold."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from .conftest import GatewayFactory, Upstream, dead_url, route, wait_until
from .test_processes import INFER, GatewayProcess, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).parent.parent
RULES = ROOT / "config" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "config" / "grafana" / "model-gateway.json"


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: `make tools` installs it (Debian package prometheus)"
    return subprocess.run([tool, *args], input=stdin, capture_output=True, text=True, timeout=60)


def exported_names(exposition: str) -> set[str]:
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def busy_gateway_metrics(gateway: GatewayFactory, upstreams: dict[str, Upstream]) -> str:
    health = {"path": "/v2/health/ready", "interval": 0.05}
    shadow = {"name": "s", "url": upstreams["b"].url, "model_version": "2"}
    gw = gateway(
        [
            route(
                "fraud",
                "/v2/models/fraud",
                [("a", upstreams["a"].url, 3), ("b", upstreams["b"].url, 1)],
                health=health,
                shadows=[shadow],
                evaluation={"score": "/outputs/0/data/0"},
                monitoring={
                    "features": [{"name": "x0", "input": "features", "column": 0}],
                    "interval": 0.1,
                },
            ),
            route("dead", "/dead", [("d", dead_url(), 1)]),
            route(
                "retried",
                "/echo",
                [("d", dead_url(), 1), ("a", upstreams["a"].url, 1)],
                connect_retries=1,
                health={"passive_failures": 0},
            ),
        ]
    )
    for _ in range(20):
        httpx.post(f"{gw.url}/v2/models/fraud/infer", json=INFER)
        httpx.get(f"{gw.url}/echo/x")
    httpx.get(f"{gw.url}/dead")
    httpx.get(f"{gw.url}/nowhere")
    httpx.post(f"{gw.url}/admin/reload")

    def sampled(name: str) -> bool:
        return f"\n{name}{{" in httpx.get(f"{gw.url}/metrics").text

    # every kind of series present with samples: shadow copies answered, retries made
    wait_until(lambda: sampled("model_gateway_shadow_requests_total"), "the shadow copies")
    wait_until(lambda: sampled("model_gateway_feature_drift"), "the monitored statistics")
    assert sampled("model_gateway_upstream_retries_total")
    return httpx.get(f"{gw.url}/metrics").text


def test_exposition_passes_promtool_check_metrics(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    text = busy_gateway_metrics(gateway, upstreams)
    checked = promtool("check", "metrics", stdin=text)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == ""
    # the SPEC's metrics are all there, in base units, labelled by route and variant
    for name in (
        "model_gateway_requests_total",
        "model_gateway_request_duration_seconds_bucket",
        "model_gateway_upstream_duration_seconds_bucket",
        "model_gateway_upstream_errors_total",
        "model_gateway_requests_in_flight",
        "model_gateway_variant_up",
        "model_gateway_variant_weight",
        "model_gateway_log_queue_depth",
        "model_gateway_log_records_written_total",
        "model_gateway_log_records_dropped_total",
        "model_gateway_log_write_errors_total",
        "model_gateway_config_reloads_total",
        "model_gateway_config_reload_failures_total",
        "model_gateway_config_info",
        "model_gateway_build_info",
    ):
        assert name in exported_names(text), name
    assert (
        'model_gateway_requests_total{code="2xx",model_version="1",route="fraud",variant="a"}'
        in text
    )
    assert (
        'model_gateway_upstream_errors_total{reason="connect",route="dead",variant="d"} 1.0' in text
    )
    assert 'le="0.25"' in text and 'le="0.5"' in text and 'le="1.0"' in text
    assert "prediction_id" not in text


def test_alert_rules_pass_check_and_unit_tests() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tests = sorted(str(p) for p in (ROOT / "tests" / "prometheus").glob("*.yml"))
    assert tests
    result = promtool("test", "rules", *tests)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test() -> None:
    alerts = {
        rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    tested = set()
    for path in (ROOT / "tests" / "prometheus").glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            tested.update(
                t["alertname"] for t in case.get("alert_rule_test", []) if t["exp_alerts"]
            )
    assert alerts == tested


def test_dashboard_queries_name_only_exported_metrics(
    gateway: GatewayFactory, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    exported = exported_names(busy_gateway_metrics(gateway, upstreams))
    for expr in exprs:
        named = set(re.findall(r"\bmodel_gateway_\w+", expr))
        assert named, expr
        assert named <= exported, (expr, named - exported)
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("traffic split", "latency", "error", "availability", "prediction log"):
        assert topic in titles, topic
    # every expression is valid PromQL: promtool parses them as recording rules
    concrete = [e.replace("$__rate_interval", "5m").replace("$route", ".*") for e in exprs]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr{i}", "expr": e} for i, e in enumerate(concrete)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def scrape_total(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("model_gateway_requests_total{") and 'route="fraud"' in line
    )


def test_workers_aggregate_metrics_and_start_from_a_clean_directory(
    tmp_path: Path, upstreams: dict[str, Upstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. `serve --workers 2` with PROMETHEUS_MULTIPROC_DIR set; 60 requests on fresh connections.
    2. Every scrape, whichever worker answers it, counts all 60; promtool accepts it.
    3. A second run on the same directory starts from zero: the directory was cleaned.
    """
    metrics_dir = tmp_path / "prom"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    config, db = write_config(tmp_path, upstreams)
    runs = 2
    for _ in range(runs):
        gw = GatewayProcess(config, workers=2)
        try:
            assert scrape_total(gw.url) == 0
            for _ in range(60):
                assert httpx.post(f"{gw.url}/v2/models/fraud/infer", json=INFER).status_code == 200
            for _ in range(10):
                assert scrape_total(gw.url) == 60
            text = httpx.get(f"{gw.url}/metrics").text
            checked = promtool("check", "metrics", stdin=text)
            assert checked.returncode == 0, checked.stdout + checked.stderr
            assert "model_gateway_variant_up" in text
        finally:
            gw.terminate_and_wait()
        pids = {
            m.group(1)
            for line in gw.lines
            if (m := re.search(r"model_gateway\[(\d+)\]: model-gateway started", line))
        }
        assert len(pids) == 2, "".join(gw.lines)
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 60 * runs
    conn.close()
